"""SIGTERM in an engine actor (a spot notice, a pod eviction): give the shard in flight up at
once, then exit, so the driver retries it elsewhere without waiting out its claim.

What a Ray worker does with SIGTERM by itself (measured on Ray 2.60): its own handler raises
SystemExit on the main thread, which starts a graceful exit that waits for the running method
to return: a whole shard, minutes, while its upload stays open and its claim, if it was
committing, stays held. So the engine's actors install this handler in their constructor,
which Ray runs on the worker's main thread (the only thread that may set one). Their methods
run in another thread (the actors have a second concurrency group), and the main thread sits
in Ray's task loop, which checks for signals every few milliseconds: the handler runs within
about 10 ms, even while the method's thread is busy in Python or in torch.

The handler aborts the uploads and releases the claims (storage.inflight, which waits for a
commit step in flight), then the process dies of its SIGTERM, never returning to the work it
interrupted. The driver sees the actor die at once and retries its shards. Ray's handler is
not chained: all it would add is the wait. A watchdog ends the process anyway after ``GRACE``
seconds should the store not answer (Kubernetes' default grace before SIGKILL is 30 s).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import suppress

from storage import inflight

GRACE = 20.0          # seconds the clean-up may take before the process ends regardless
STEP_WAIT = 10.0      # of which, waiting for a commit step in flight


def install() -> bool:
    """Handle SIGTERM in this process as above; False (nothing done) off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def _on_sigterm(signum, frame) -> None:
    watchdog = threading.Timer(GRACE, os._exit, (128 + signum,))
    watchdog.daemon = True
    watchdog.start()
    try:
        aborted, released = inflight.abandon(timeout=STEP_WAIT)
        with suppress(Exception):   # stderr may be mid-write in the interrupted thread
            print(f"depth-engine worker {os.getpid()}: SIGTERM: aborted {aborted} upload(s), released "
                  f"{released} shard claim(s); exiting", file=sys.stderr, flush=True)
    finally:
        signal.signal(signum, signal.SIG_DFL)     # die of the signal, as without a handler
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
