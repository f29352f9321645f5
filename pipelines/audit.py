"""The audit: what an OUTPUT holds, before GPU-months are spent training on it.

One streaming pass over the manifest dataset in record batches (pyarrow), merged into
fixed-size sketches (pipelines.sketch), so memory does not grow with the row count:
counts, error reasons, sky and disparity statistics, image sizes, per-shard figures,
and flags for suspect samples and shards.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.sketch import Counts, Hist
from storage import layout
from storage.manifest import dataset
from storage.objectstore import ObjectStore
from storage.output import Output

COLUMNS = ["key", "shard", "status", "error", "width", "height", "sky_fraction", "disp_min",
           "disp_max", "degenerate", "disp_p05", "disp_p50", "disp_p95", "source_kind", "valid_fraction", "conf_mean"]
FLAG_KEYS = 50                 # keys kept per flag kind (the count is exact)


@dataclass(frozen=True)
class Thresholds:
    """What makes a sample or a shard suspect; documented in docs/AUDIT.md."""

    all_sky: float = 0.99      # sky_fraction at or above: the label is (nearly) all sky
    job_has_sky: float = 0.5   # a no-sky sample is suspect when this share of the job has sky
    flat_spread: float = 0.01  # disp_p95 - disp_p05 below: near-constant disparity
    tiny_side: int = 64        # an image side below: tiny image
    low_valid: float = 0.1     # ground truth: valid_fraction below: few labeled pixels
    low_conf: float = 0.5      # a teacher with confidence: conf_mean below: the teacher doubts the label
    error_factor: float = 3.0  # a shard's error rate above this x the job's (and 5 % + ...)
    error_floor: float = 0.05


def normalize_reason(error: str) -> str:
    """One reason per kind of failure: numbers, quoted names and hex digests vary per sample."""
    r = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", error)
    r = re.sub(r"\b[0-9a-f]{16,}\b", "…", r)
    r = re.sub(r"\d+", "N", r)
    return re.sub(r"\s+", " ", r).strip()


@dataclass
class _Flag:
    count: int = 0
    samples: list = field(default_factory=list)

    def add(self, shards: pa.Array, keys: pa.Array, mask: np.ndarray) -> None:
        """Count the flagged rows; keep the first FLAG_KEYS (only those become Python strings)."""
        self.count += int(mask.sum())
        room = FLAG_KEYS - len(self.samples)
        if room > 0 and mask.any():
            idx = pa.array(np.flatnonzero(mask)[:room])
            self.samples += [{"shard": s, "key": k} for s, k in
                             zip(shards.take(idx).to_pylist(), keys.take(idx).to_pylist())]


class _Audit:
    def __init__(self, t: Thresholds):
        self.t = t
        self.samples = self.ok = 0
        self.reasons: dict[str, int] = {}
        self.sky = Hist(0.0, 1.0, 10_000)
        self.raw_range = Hist(-6.0, 6.0, 12_000, log=True)
        self.label = {p: Hist(0.0, 1.0, 10_000) for p in ("disp_p05", "disp_p50", "disp_p95")}
        self.degenerate = 0
        self.width, self.height = Counts(), Counts()
        self.with_sky = 0
        self.kinds: dict[str, int] = {}
        self.valid = Hist(0.0, 1.0, 10_000)
        self.conf = Hist(0.0, 1.0, 10_000)
        self.shards: dict[str, list] = {}   # shard -> [samples, ok, sky_sum, sky_n]
        self.flags = {k: _Flag() for k in ("all_sky", "no_sky", "constant_disparity", "tiny_image", "low_valid",
                                                 "low_confidence")}

    def add(self, batch: pa.RecordBatch) -> None:
        b = {name: batch.column(name) for name in COLUMNS}
        n = batch.num_rows
        ok = np.asarray(pc.equal(b["status"], "ok").fill_null(False))
        self.samples += n
        self.ok += int(ok.sum())
        errs = pc.value_counts(pc.filter(b["error"], pa.array(~ok)).fill_null("unknown"))
        for item in errs.to_pylist():
            reason = normalize_reason(item["values"])
            self.reasons[reason] = self.reasons.get(reason, 0) + item["counts"]
        col = lambda name: np.asarray(b[name].to_numpy(zero_copy_only=False), dtype=np.float64)  # noqa: E731
        sky, w, h = col("sky_fraction"), col("width"), col("height")
        spread = col("disp_p95") - col("disp_p05")
        self.sky.add(sky[ok])
        self.raw_range.add((col("disp_max") - col("disp_min"))[ok])
        for p, hist in self.label.items():
            hist.add(col(p)[ok])
        degenerate = np.asarray(b["degenerate"].fill_null(False)) & ok
        self.degenerate += int(degenerate.sum())
        self.width.add(w[ok])
        self.height.add(h[ok])
        self.with_sky += int((sky[ok] > 0).sum())
        for item in pc.value_counts(b["source_kind"].fill_null("pseudo")).to_pylist():
            self.kinds[item["values"]] = self.kinds.get(item["values"], 0) + item["counts"]
        valid = col("valid_fraction")
        self.valid.add(valid[ok & np.isfinite(valid)])
        conf = col("conf_mean")
        self.conf.add(conf[ok & np.isfinite(conf)])
        self._per_shard(b["shard"], ok, sky)
        with np.errstate(invalid="ignore"):
            for kind, mask in (("all_sky", ok & (sky >= self.t.all_sky)),
                               ("no_sky", ok & (sky == 0)),
                               ("constant_disparity", degenerate | (ok & (spread < self.t.flat_spread))),
                               ("tiny_image", ok & (np.minimum(w, h) < self.t.tiny_side)),
                               ("low_valid", ok & (valid < self.t.low_valid)),
                               ("low_confidence", ok & (conf < self.t.low_conf))):
                self.flags[kind].add(b["shard"], b["key"], mask)

    def _per_shard(self, shard: pa.Array, ok: np.ndarray, sky: np.ndarray) -> None:
        """Grouped by dictionary codes and bincount: no Python object per row, and no Arrow pool
        thread left holding numpy-backed buffers when the process exits (a known abort)."""
        has_sky = ok & np.isfinite(sky)
        codes = shard.dictionary_encode()
        index, size = codes.indices.to_numpy(zero_copy_only=False), len(codes.dictionary)
        sums = [np.bincount(index, weights=w, minlength=size) for w in
                (None, ok, np.where(has_sky, sky, 0.0), has_sky)]
        for name, n, oks, sky_sum, sky_n in zip(codes.dictionary.to_pylist(), *sums):
            n, oks, sky_n = int(n), int(oks), int(sky_n)
            acc = self.shards.setdefault(name, [0, 0, 0.0, 0])
            acc[0] += n
            acc[1] += oks
            acc[2] += sky_sum
            acc[3] += sky_n

    def result(self, shard_counts: dict, output: str) -> dict:
        errors = self.samples - self.ok
        job_rate = errors / self.samples if self.samples else 0.0
        per_shard, suspect = [], []
        for name in sorted(self.shards):
            n, ok, sky_sum, sky_n = self.shards[name]
            per_shard.append({"shard": name, "samples": n, "ok": ok, "errors": n - ok,
                              "sky_fraction_mean": sky_sum / sky_n if sky_n else None})
            rate = (n - ok) / n if n else 0.0
            if rate > max(self.t.error_factor * job_rate, self.t.error_floor) or (n and ok == 0):
                suspect.append({"shard": name, "error_rate": rate})
        job_has_sky = self.ok and self.with_sky / self.ok >= self.t.job_has_sky
        flags = {k: {"count": f.count, "samples": f.samples} for k, f in self.flags.items()}
        if not job_has_sky:                         # no sky anywhere is not suspect then
            flags["no_sky"] = {"count": 0, "samples": []}
        return {
            "output": output,
            "samples": self.samples, "ok": self.ok, "errors": errors,
            "errors_by_reason": dict(sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
            "shards": shard_counts,
            "sky_fraction": {**self.sky.summary(), "histogram": self.sky.display()},
            "disparity": {
                "raw_range": {**self.raw_range.summary(), "histogram": self.raw_range.display(zoom=True)},
                "label_p05": self.label["disp_p05"].summary(),
                "label_p50": {**self.label["disp_p50"].summary(), "histogram": self.label["disp_p50"].display()},
                "label_p95": self.label["disp_p95"].summary(),
                "degenerate": self.degenerate,
            },
            "source_kind": dict(sorted(self.kinds.items())),
            "valid_fraction": self.valid.summary(),
            # the teacher's mean confidence per sample (conf_mean), where it gives one
            "confidence": {**self.conf.summary(), "histogram": self.conf.display()},
            "width": self.width.summary(), "height": self.height.summary(),
            "per_shard": per_shard,
            "flags": {"samples": flags, "shards": {"high_error_rate": suspect}},
            "thresholds": self.t.__dict__,
        }


def shard_counts(output: ObjectStore) -> dict:
    """committed / failed / pending of job.json's inputs and of every shard listed as committed or
    failed (an OUTPUT without job.json: those alone), from two listings."""
    view = Output(output)
    states = view.states()
    inputs = {layout.shard_name(u) for u in (view.job() or {}).get("shards", [])}
    return states.counts(sorted(inputs | states.committed | states.failed)).to_json()


def audit(output: ObjectStore, thresholds: Thresholds = Thresholds(), batch_rows: int = 1 << 16) -> dict:
    """The audit of one OUTPUT as a dict (what ``depth-engine audit --json`` prints)."""
    acc = _Audit(thresholds)
    counts = shard_counts(output)
    if counts["committed"]:
        manifest = dataset(output)
        # Part by part: the dataset scanner reads ahead as fast as storage allows, which
        # would hold a growing share of a large manifest in memory on a slow consumer.
        for part in manifest.get_fragments():
            for batch in part.to_batches(columns=COLUMNS, batch_size=batch_rows, schema=manifest.schema):
                if batch.num_rows:
                    acc.add(batch)
    return acc.result(counts, output.url)
