"""The terminal progress bar: shards, images, images/s, ETA, errors (on stderr)."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


class ProgressBar:
    def __init__(self, shards: int, *, enabled: bool = True):
        self.t0 = time.time()
        self.images = 0          # in finished shards
        self.errors = 0
        self.live_images = 0     # in shards still in flight
        self.finished: set[str] = set()
        self.bar = tqdm(total=shards, unit="shard", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, smoothing=0.1)
        self._refresh()

    def shard_done(self, result) -> None:
        self.finished.add(result.name)
        self.live_images = 0
        self.images += result.samples
        self.errors += result.errors
        self.bar.update(1)
        self._refresh()

    def shard_failed(self, name: str, error: str) -> None:
        self.finished.add(name)
        self.bar.write(f"shard {name} failed permanently: {error}", file=sys.stderr)
        self.bar.update(1)
        self._refresh()

    def event(self, message: str) -> None:
        """A line above the bar (worker lost, retry): what an operator needs to see."""
        self.bar.write(message, file=sys.stderr)

    def live(self, inflight: dict) -> None:
        self.live_images = sum(p.get("samples", 0) for name, p in inflight.items()
                               if name not in self.finished)
        self._refresh()

    def _refresh(self) -> None:
        images = self.images + self.live_images
        rate = images / max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"images={images} {rate:.1f} img/s errors={self.errors}")

    def close(self) -> None:
        self.bar.close()
