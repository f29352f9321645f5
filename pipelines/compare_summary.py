"""The aggregates of `compare`, merged shard by shard in fixed memory: counts, each figure's
mean, quantiles and histogram (pipelines.sketch), the pairs beyond each threshold, per-shard
means, and the worst pairs for a contact sheet. Only the per-shard records grow, one per shard.
"""
from __future__ import annotations

import heapq
import itertools
from typing import TYPE_CHECKING

import numpy as np

from pipelines.compare_figures import SKY_IOU_MIN_SKY, THRESHOLDS, beyond
from pipelines.sketch import Hist

if TYPE_CHECKING:
    from pipelines.compare import ShardComparison

WORST = 24
# report counts <- ShardComparison fields
COUNTS = {"matched": "matched", "compared": "samples", "errors": "errors", "only_a": "only_a", "only_b": "only_b",
          "error_a": "error_a", "error_b": "error_b"}


def _hists() -> dict[str, Hist]:
    """One sketch per figure; quantiles are exact to a bin (scale: 0.005; values past ±4 fall
    in the end bins, the mean stays exact)."""
    return {"abs_rel": Hist(-4.0, 2.0, 6_000, log=True), "delta1": Hist(0.0, 1.0, 10_000),
            "pearson": Hist(-1.0, 1.0, 20_000), "sky_iou": Hist(0.0, 1.0, 10_000),
            "sky_fraction_diff": Hist(-1.0, 1.0, 20_000), "scale": Hist(-4.0, 4.0, 1_600)}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


class CompareSummary:
    """``add`` each ShardComparison as it comes back, in any order; ``to_json`` at the end.
    The worst ``worst`` pairs (inverted first, then by AbsRel) keep their rows, with the member
    places (``members``) a contact sheet fetches."""

    def __init__(self, worst: int = WORST):
        self.worst_n = worst
        self.shards = 0
        self.counts = dict.fromkeys(COUNTS, 0)
        self.bytes = {"labels": 0, "images": 0, "manifests": 0}
        self.no_overlap = self.disagree = 0
        self.beyond = dict.fromkeys(("inverted", *THRESHOLDS), 0)
        self.hists = _hists()
        self.per_shard: list[dict] = []
        self._worst: list[tuple] = []
        self._seq = itertools.count()

    def add(self, result: ShardComparison) -> None:
        self.shards += 1
        for k, field in COUNTS.items():
            self.counts[k] += getattr(result, field)
        self.bytes["labels"] += result.bytes_read - result.image_bytes
        self.bytes["images"] += result.image_bytes
        self.bytes["manifests"] += result.manifest_bytes
        rows = result.rows
        for name, hist in self.hists.items():
            hist.add(np.array([r[name] for r in rows if r[name] is not None], dtype=np.float64))
        for r in rows:
            self.no_overlap += r["status"] != "ok"
            self.disagree += r["disagree"]
            for crossed in beyond(r):
                self.beyond[crossed] += 1
            if r["abs_rel"] is not None:
                self._keep((bool(r["inverted"]), r["abs_rel"], r["shard"], r["key"], next(self._seq), r))
        self.per_shard.append({
            "shard": result.name, "pairs": result.samples, "abs_rel": _mean([r["abs_rel"] for r in rows]),
            "delta1": _mean([r["delta1"] for r in rows]), "disagree": sum(r["disagree"] for r in rows),
            "only_a": result.only_a, "only_b": result.only_b, "errors": result.errors})

    def _keep(self, entry: tuple) -> None:
        if len(self._worst) < self.worst_n:
            heapq.heappush(self._worst, entry)
        elif self.worst_n and entry[:4] > self._worst[0][:4]:
            heapq.heapreplace(self._worst, entry)

    @property
    def worst(self) -> list[dict]:
        """The worst pairs, worst first."""
        return [e[-1] for e in sorted(self._worst, key=lambda e: e[:4], reverse=True)]

    def to_json(self) -> dict:
        """counts (pairs; ``compared`` = ok + no_overlap), bytes read (ranged reads of the label
        members, of A's images with a teacher, and the manifest parts), the thresholds, the pairs
        beyond each, each figure's distribution, per-shard means, and the worst pairs."""
        figures = {}
        for name, h in self.hists.items():
            q = {f"p{round(p * 100):02d}": h.quantile(p) for p in (0.05, 0.5, 0.95)}
            figures[name] = {"n": h.n, "mean": h.total / h.n if h.n else None, **q,
                             "min": h.min if h.n else None, "max": h.max if h.n else None,
                             "histogram": h.display(20, zoom=True)}
        counts = {"shards": self.shards, **self.counts, "no_overlap": self.no_overlap,
                  "disagree": self.disagree, "inverted": self.beyond["inverted"]}
        return {"counts": counts, "bytes": dict(self.bytes),
                "thresholds": {**THRESHOLDS, "sky_iou_min_sky": SKY_IOU_MIN_SKY}, "beyond": dict(self.beyond),
                "figures": figures, "per_shard": sorted(self.per_shard, key=lambda s: s["shard"]),
                "worst": self.worst}
