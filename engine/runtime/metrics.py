"""The engine's metrics, through Ray's metrics API, so they appear wherever the cluster's
Prometheus scrapes Ray (every node's metrics export port; Ray prefixes each name with ``ray_``).

The driver records them, from what it already receives: each attempt's envelope and flow
result, each retry and permanent failure, its queue. So every attempt counts exactly once,
wherever its actor ran, and a counter's total equals the manifest's rows (images labeled = ok
rows, sample errors = error rows). Every series carries its command (label, convert-gt,
evaluate, compare) and OUTPUT. Recording never fails a job: without Ray, or once Ray refuses a
record, it is a no-op. ``deploy/grafana/depth-engine-dashboard.json`` charts them.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass

import ray

from storage.objectstore import redact
from storage.s3_client import request_counts, retry_counts

log = logging.getLogger(__name__)

# Not "job": Prometheus gives that label to the scrape target and renames a scraped one exported_job.
JOB_TAGS = ("command", "output")


@dataclass(frozen=True)
class MetricDef:
    name: str           # Prometheus conventions: units in the name, counters end in _total
    kind: str           # "counter" | "gauge"
    description: str
    tags: tuple[str, ...] = ()      # beside JOB_TAGS


IMAGES = MetricDef("depth_engine_images_labeled_total", "counter",
                   "Samples whose manifest row is ok (evaluate, compare: samples scored).")
SAMPLE_ERRORS = MetricDef("depth_engine_sample_errors_total", "counter",
                          "Samples whose row is an error, by reason class.", ("reason_class",))
ATTEMPTS = MetricDef("depth_engine_shard_attempts_total", "counter", "Shard attempts that ended, ok or failed.")
RETRIES = MetricDef("depth_engine_shard_retries_total", "counter", "Failed shard attempts that were retried.")
FAILED = MetricDef("depth_engine_shards_failed_total", "counter",
                   "Shards that failed every attempt (OUTPUT/failed/).")
STAGE_SECONDS = MetricDef("depth_engine_stage_seconds_total", "counter",
                          "Worker seconds spent per stage of the flow.", ("stage",))
MODEL_BUSY = MetricDef("depth_engine_model_busy_ratio", "gauge",
                       "Model time over attempt time, over the attempts so far (0..1).")
QUEUE = MetricDef("depth_engine_queue_depth_shards", "gauge", "Shards waiting for an actor (retries included).")
S3_REQUESTS = MetricDef("depth_engine_s3_requests_total", "counter",
                        "S3 HTTP requests sent by workers and driver, retries included.", ("operation",))
GPU = MetricDef("depth_engine_gpu_utilization_percent", "gauge",
                "Mean GPU utilization of a worker's last attempt.", ("worker",))
S3_RETRIES = MetricDef("depth_engine_s3_retries_total", "counter",
                       "Of those S3 requests, the retries (throttling, 5xx, cut connections).", ("operation",))
DEFINITIONS = (IMAGES, SAMPLE_ERRORS, ATTEMPTS, RETRIES, FAILED, STAGE_SECONDS, MODEL_BUSY, QUEUE, S3_REQUESTS,
               S3_RETRIES, GPU)

# The reasons the engine writes into a row's `error` (pipelines.decode, storage.shards' refusals,
# the ground-truth readers, evaluate), in a handful of classes; the first match wins.
REASON_CLASSES = (
    ("limit_member_bytes", re.compile(r"member .* is \d+ bytes, over the \d+-byte limit")),
    ("unsafe_member", re.compile(r"member .*(unsafe name|empty or reserved extension|are not read|"
                                 r"only regular files are read)")),
    ("limit_pixels", re.compile(r"image too large: ")),
    ("limit_aspect", re.compile(r"aspect ratio .* exceeds --max-aspect")),
    ("truncated", re.compile(r"truncated JPEG|cannot (decode image|read image header): .*truncated", re.IGNORECASE)),
    ("decode", re.compile(r"cannot decode image|not a recognised image format|cannot read image header|"
                          r"empty image member|image has no pixels")),
    ("missing_image", re.compile(r"no image member")),
    ("ground_truth", re.compile(r".*ground[- ]truth")),
    ("stored_label", re.compile(r"(cannot read )?stored disp\.png")),
)
OTHER = "other"


def reason_class(reason: str | None) -> str:
    """The class of one row's error reason; ``other`` for a reason no rule knows."""
    for name, pattern in REASON_CLASSES:
        if reason and pattern.match(reason):
            return name
    return OTHER


def error_classes(result) -> dict[str, int]:
    """A flow result's error rows by class: the reasons it carries (``error_reasons`` of a
    labeled shard, the error ``rows`` of an evaluation), the rest of ``errors`` as other."""
    reasons = dict(getattr(result, "error_reasons", None) or {})
    if not reasons:
        for row in getattr(result, "rows", None) or ():
            if row.get("status") == "error":
                reason = row.get("reason") or row.get("error")
                reasons[reason] = reasons.get(reason, 0) + 1
    classes: dict[str, int] = {}
    for reason, n in reasons.items():
        name = reason_class(reason)
        classes[name] = classes.get(name, 0) + n
    rest = getattr(result, "errors", 0) - sum(classes.values())
    if rest > 0:
        classes[OTHER] = classes.get(OTHER, 0) + rest
    return classes


def output_id(url: str) -> str:
    """The OUTPUT (or source) a run is about, credentials blanked, long URLs shortened to a
    prefix and a hash."""
    url = redact(url.rstrip("/"))
    if len(url) <= 120:
        return url
    return f"{url[:100]}...{hashlib.sha1(url.encode()).hexdigest()[:12]}"


_session: tuple | None = None
_instruments: dict = {}


def instruments() -> dict | None:
    """Ray's metric objects by name, made on first use in each Ray session (None without Ray)."""
    global _session, _instruments
    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    session = (context.get_node_id(), context.get_job_id())
    if session != _session:
        from ray.util.metrics import Counter, Gauge

        _instruments = {d.name: (Counter if d.kind == "counter" else Gauge)(d.name, d.description, JOB_TAGS + d.tags)
                        for d in DEFINITIONS}
        _session = session
    return _instruments


class JobMetrics:
    """One run's recorder on the driver. Any failure to record turns it off for the rest of
    the run (logged once): a job never fails for its metrics."""

    def __init__(self, command: str, output: str):
        self.tags = {"command": command, "output": output}
        self.model_seconds = self.busy_seconds = 0.0
        self.gpu: dict[str, float] = {}         # worker -> utilization of its last attempt
        self.s3_seen = request_counts()         # the driver's own requests, counted from here
        self.retries_seen = retry_counts()
        self.on = True
        self.queued = 0

    @classmethod
    def for_run(cls, command: str, output: str) -> JobMetrics:
        return cls(command, output_id(output))

    def _add(self, metric: MetricDef, value: float, **tags: str) -> None:
        if value > 0:
            self._record(metric, "inc", value, tags)

    def _set(self, metric: MetricDef, value: float, **tags: str) -> None:
        self._record(metric, "set", value, tags)

    def _record(self, metric: MetricDef, method: str, value: float, tags: dict) -> None:
        if not self.on:
            return
        try:
            found = instruments()
            if found is None:
                self.on = False
                return
            getattr(found[metric.name], method)(float(value), tags={**self.tags, **tags})
        except Exception as exc:  # noqa: BLE001 - metrics are never worth a job
            self.on = False
            log.warning("metrics are off for this run: %s: %s", type(exc).__name__, exc)

    def attempt_done(self, a) -> None:
        """An attempt that returned (``a``: its Attempt envelope)."""
        r = a.result
        self._add(ATTEMPTS, 1)
        if getattr(r, "committed", True):       # else another attempt's rows are the manifest's
            ok = getattr(r, "ok", None)
            self._add(IMAGES, ok if ok is not None else getattr(r, "samples", 0) - getattr(r, "errors", 0))
            for cls, n in error_classes(r).items():
                self._add(SAMPLE_ERRORS, n, reason_class=cls)
        for stage, seconds in (getattr(r, "stage_seconds", None) or {}).items():
            self._add(STAGE_SECONDS, seconds, stage=stage)
        for op, n in a.s3_requests.items():
            self._add(S3_REQUESTS, n, operation=op)
        for op, n in a.s3_retries.items():
            self._add(S3_RETRIES, n, operation=op)
        if hasattr(r, "model_seconds"):
            self.model_seconds += r.model_seconds
            self.busy_seconds += getattr(r, "seconds", 0.0) or a.seconds
            self._set(MODEL_BUSY, self.model_seconds / self.busy_seconds if self.busy_seconds else 0.0)
        if a.gpu_utilization is not None:
            self.gpu[a.worker] = a.gpu_utilization
            self._set(GPU, a.gpu_utilization, worker=a.worker)

    def attempt_failed(self, retried: bool) -> None:
        """An attempt that raised or lost its actor: retried, or the shard's last."""
        self._add(ATTEMPTS, 1)
        self._add(RETRIES if retried else FAILED, 1)

    def tick(self, queued: int) -> None:
        """Once a second: the queue, the driver's S3 requests, and the gauges refreshed (Ray
        drops a gauge that is not set again within two report intervals)."""
        self.queued = queued
        self._set(QUEUE, queued)
        now, retried = request_counts(), retry_counts()
        for op, n in now.items():
            self._add(S3_REQUESTS, n - self.s3_seen.get(op, 0), operation=op)
        for op, n in retried.items():       # counted once each: a reading may dip while a call is in flight
            if n > self.retries_seen.get(op, 0):
                self._add(S3_RETRIES, n - self.retries_seen.get(op, 0), operation=op)
                self.retries_seen[op] = n
        self.s3_seen = now
        if self.busy_seconds:
            self._set(MODEL_BUSY, self.model_seconds / self.busy_seconds)
        for worker, utilization in self.gpu.items():
            self._set(GPU, utilization, worker=worker)

    def close(self) -> None:
        """The run is over: nothing queued; the driver's last S3 requests counted."""
        self.tick(0)
