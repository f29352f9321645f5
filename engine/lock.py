"""One ``label`` per OUTPUT at a time: the job lease.

The driver holds a lease in ``OUTPUT/locks/job/`` (storage.leases) and renews it from a
heartbeat thread. A second ``label`` finds a live lease and exits 2, naming the running job.
It takes the lease over once the first has been silent longer than the lease, or at once
when the first ran on this host and its pid is gone (a driver killed with SIGKILL).
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time

from engine.config import ConfigError
from storage import layout
from storage.leases import Lease, LeaseHeld, LeaseLost, acquire
from storage.objectstore import ObjectStore


def _owner(what: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "what": what,
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _dead_here(owner: dict) -> bool:
    """True only when we can be sure: the holder ran on this host and its pid is gone."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class JobLock:
    """Context manager: hold OUTPUT's job lease for the duration of a run."""

    def __init__(self, output: ObjectStore, ttl: float, what: str = "label"):
        self.output, self.ttl, self.what = output, ttl, what
        self.lease: Lease | None = None
        self.lost: str | None = None       # set by the heartbeat when the lease was lost
        self.acquired_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "JobLock":
        try:
            self.lease = acquire(self.output, layout.JOB_LOCK, _owner(self.what), self.ttl,
                                 is_dead=_dead_here)
        except LeaseHeld as e:
            o, left = e.record.owner, max(0, e.record.expires - time.time())
            raise ConfigError(
                f"{self.output.url} is being labeled by another job ({o.get('what')} on "
                f"{o.get('host')} pid {o.get('pid')}, started {o.get('started')}); "
                f"if that job is dead, its lease lapses in {left:.0f} s") from None
        self.acquired_at = self.lease.record.acquired
        self._thread = threading.Thread(target=self._beat, name="job-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.lease.renew()
            except LeaseLost as e:
                self.lost = str(e)
                return
            except Exception:  # noqa: BLE001 - a transient storage error: try again next beat
                continue

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.lease and not self.lost:
            try:
                self.lease.release()
            except Exception:  # noqa: BLE001 - the lease lapses by itself
                pass
