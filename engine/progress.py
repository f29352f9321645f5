"""What a running job shows: the terminal progress bar, and without one (a pipe, --json) a line
every minute on stderr. Both say images done, images left (estimated), the steady-state rate
and the time left; the estimate is kept so the summary can set it beside the truth."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

LOG_EVERY = float(os.environ.get("DEPTH_ENGINE_PROGRESS_SECONDS", 60))
FIRST_ESTIMATE = 0.1       # the estimate the summary keeps: the first made with this share of shards done


@dataclass
class Eta:
    """Images and time left, from the shards finished so far.

    Images left: the finished shards' images per input byte times the bytes still to read
    (when every input's size is known), else their images per shard times the shards left.
    Pure arithmetic over what ``done`` is told; no clock of its own.
    """

    sizes: dict            # shard name -> input bytes, or None when unknown
    done_images: int = 0
    done_bytes: int = 0
    done_shards: int = 0
    left_shards: int = 0

    def __post_init__(self):
        self.left_shards = len(self.sizes)
        self.left_bytes = sum(s or 0 for s in self.sizes.values())
        self.by_bytes = bool(self.sizes) and all(s for s in self.sizes.values())

    def done(self, name: str, images: int) -> None:
        size = self.sizes.get(name)
        self.done_images += images
        self.done_shards += 1
        self.left_shards = max(0, self.left_shards - 1)
        if size:
            self.done_bytes += size
            self.left_bytes -= size

    def failed(self, name: str) -> None:
        self.left_shards = max(0, self.left_shards - 1)
        self.left_bytes -= self.sizes.get(name) or 0

    def images_left(self) -> float | None:
        if not self.done_shards:
            return None
        if self.by_bytes and self.done_bytes:
            return self.done_images / self.done_bytes * max(self.left_bytes, 0)
        return self.done_images / self.done_shards * self.left_shards

    def seconds_left(self, rate: float) -> float | None:
        left = self.images_left()
        return None if left is None or rate <= 0 else left / rate


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressBar:
    def __init__(self, shards: int, *, enabled: bool = True, sizes: dict | None = None,
                 log_every: float | None = None, stream=None):
        self.t0 = time.time()
        self.ready_at: float | None = None    # the first worker with its models loaded
        self.images = 0          # in finished shards
        self.errors = 0
        self.live_images = 0     # in shards still in flight
        self.finished: set[str] = set()
        self.eta = Eta(sizes or {})
        self.first_estimate: dict | None = None
        self.stream = stream or sys.stderr
        # Without a bar (a pipe, --json), a line every LOG_EVERY seconds instead.
        self.log_every = None if enabled else (LOG_EVERY if log_every is None else log_every)
        self.logged_at = time.time()
        self.shards = shards
        self.bar = tqdm(total=shards, unit="shard", file=self.stream, disable=not enabled,
                        dynamic_ncols=True, smoothing=0.1)
        self._refresh()

    def started(self, ready_at: float | None) -> None:
        self.ready_at = self.ready_at or ready_at

    def shard_done(self, result) -> None:
        self.finished.add(result.name)
        self.live_images = 0
        self.images += result.samples
        self.errors += result.errors
        self.eta.done(result.name, result.samples)
        self._keep_first_estimate()
        self.bar.update(1)
        self._refresh()

    def shard_failed(self, name: str, error: str) -> None:
        self.finished.add(name)
        self.eta.failed(name)
        self.bar.write(f"shard {name} failed permanently: {error}", file=self.stream)
        self.bar.update(1)
        self._refresh()

    def event(self, message: str) -> None:
        """A line above the bar (worker lost, retry): what an operator needs to see."""
        self.bar.write(message, file=self.stream)

    def live(self, inflight: dict) -> None:
        self.live_images = sum(p.get("samples", 0) for name, p in inflight.items()
                               if name not in self.finished)
        self._refresh()
        if self.log_every is not None and time.time() - self.logged_at >= self.log_every:
            self.logged_at = time.time()
            print(f"progress: {self.line()}", file=self.stream, flush=True)

    def rate(self) -> float:
        """Steady state: images since the first worker was ready, over the time since."""
        since = self.ready_at or self.t0
        return (self.images + self.live_images) / max(time.time() - since, 1e-9)

    def line(self) -> str:
        rate = self.rate()
        left = self.eta.images_left()
        left_images = None if left is None else max(0.0, left - self.live_images)
        seconds = None if left_images is None or rate <= 0 else left_images / rate
        return (f"{self.images + self.live_images:,} images done, ~{'?' if left_images is None else f'{left_images:,.0f}'} "
                f"left, {rate:.1f} images/s, ~{duration(seconds)} left; shards {len(self.finished)}/{self.shards}, "
                f"errors {self.errors}")

    def _keep_first_estimate(self) -> None:
        if self.first_estimate is not None or self.eta.done_shards < max(1, FIRST_ESTIMATE * self.shards):
            return
        seconds = self.eta.seconds_left(self.rate())
        if seconds is not None:
            now = time.time()
            self.first_estimate = {"at_shards": self.eta.done_shards, "made_after_seconds": round(now - self.t0, 2),
                                   "images_done": self.eta.done_images, "images_left": round(self.eta.images_left()),
                                   "predicted_end": now + seconds}

    def estimate(self, total_images: int) -> dict | None:
        """The first estimate beside what happened: predicted and actual images and seconds."""
        if self.first_estimate is None:
            return None
        e = dict(self.first_estimate)
        predicted = e.pop("predicted_end") - self.t0
        actual = time.time() - self.t0
        e.update(predicted_images=e["images_done"] + e["images_left"], actual_images=total_images,
                 predicted_seconds=round(predicted, 2), actual_seconds=round(actual, 2),
                 seconds_error=round((predicted - actual) / actual, 3) if actual > 0 else None)
        return e

    def _refresh(self) -> None:
        self.bar.set_postfix_str(self.line().replace(f"; shards {len(self.finished)}/{self.shards}", ""))

    def close(self) -> None:
        self.bar.close()
