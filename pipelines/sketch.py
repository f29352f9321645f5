"""Streaming histograms: merge record batches of any number of rows in fixed memory and
answer mean, quantiles and a display histogram at the end. Quantiles are exact to one bin
(1e-4 for values in [0, 1]; 0.12 % relative for the log-binned ones)."""
from __future__ import annotations

import numpy as np


class Hist:
    """Counts over fixed bins on [lo, hi] (or on log10 of the value when ``log``)."""

    def __init__(self, lo: float, hi: float, bins: int, log: bool = False):
        self.lo, self.hi, self.bins, self.log = lo, hi, bins, log
        self.counts = np.zeros(bins, dtype=np.int64)
        self.n = 0
        self.total = 0.0
        self.min = np.inf
        self.max = -np.inf

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return
        self.n += v.size
        self.total += float(v.sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        x = np.log10(np.maximum(v, 10.0 ** self.lo)) if self.log else v
        idx = np.clip(((x - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64), 0, self.bins - 1)
        self.counts += np.bincount(idx, minlength=self.bins)

    def _edge(self, i: float) -> float:
        x = self.lo + (self.hi - self.lo) * i / self.bins
        return 10.0 ** x if self.log else x

    def quantile(self, q: float) -> float | None:
        """The centre of the bin holding the q-th value (clamped to the observed range)."""
        if not self.n:
            return None
        i = int(np.searchsorted(np.cumsum(self.counts), q * self.n, side="left"))
        i = min(i, self.bins - 1)
        return float(min(max(self._edge(i + 0.5), self.min), self.max))

    def summary(self) -> dict:
        if not self.n:
            return {"count": 0, "mean": None, "min": None, "p50": None, "p95": None, "max": None}
        return {"count": self.n, "mean": self.total / self.n, "min": self.min,
                "p50": self.quantile(0.5), "p95": self.quantile(0.95), "max": self.max}

    def display(self, bins: int = 20, zoom: bool = False) -> dict:
        """A coarse histogram for people: ``bins`` equal groups of the fine bins, over the
        whole range, or (``zoom``) over the fine bins that hold values."""
        lo, hi = 0, self.bins
        if zoom and self.n:
            nz = np.flatnonzero(self.counts)
            lo, hi = int(nz[0]), int(nz[-1]) + 1
        step = max(1, -(-(hi - lo) // bins))
        starts = list(range(lo, hi, step))
        return {"edges": [self._edge(i) for i in starts] + [self._edge(min(starts[-1] + step, self.bins))],
                "counts": [int(self.counts[i:i + step].sum()) for i in starts]}


class Counts:
    """Exact counts of integer values (image sides: few distinct values even at 60M rows)."""

    def __init__(self):
        self.values: dict[int, int] = {}

    def add(self, values: np.ndarray) -> None:
        u, c = np.unique(np.asarray(values)[~np.isnan(np.asarray(values, dtype=np.float64))].astype(np.int64),
                         return_counts=True)
        for k, n in zip(u.tolist(), c.tolist()):
            self.values[k] = self.values.get(k, 0) + n

    def summary(self) -> dict:
        if not self.values:
            return {"count": 0, "min": None, "p50": None, "p95": None, "max": None, "mean": None, "common": []}
        keys = np.array(sorted(self.values))
        counts = np.array([self.values[k] for k in keys])
        cum = np.cumsum(counts)
        n = int(cum[-1])
        q = lambda p: int(keys[np.searchsorted(cum, p * n, side="left")])  # noqa: E731
        common = sorted(self.values.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        return {"count": n, "min": int(keys[0]), "p50": q(0.5), "p95": q(0.95), "max": int(keys[-1]),
                "mean": float((keys * counts).sum() / n), "common": [[k, c] for k, c in common]}
