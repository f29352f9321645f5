"""OUTPUT/runs/<UTC stamp>.json: what one finished ``label`` run measured.

A job's next dry run (engine.dry_run) plans with the rate the same models reached on the same
OUTPUT, which beats any guess. One small object per run, written by the driver after its last
shard; read by listing runs/ and taking the greatest key (the stamps sort by time).
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field, fields

from storage import layout
from storage.objectstore import ObjectStore


@dataclass(frozen=True)
class RunRecord:
    at: str                            # when the run ended (UTC, ISO 8601)
    images: int                        # samples labeled (ok and error rows)
    shards: int                        # shards committed by the run
    seconds: float                     # steady state: first ready worker to last shard
    startup_seconds: float             # cluster start and model load
    workers: int                       # actors that took shards
    device: str
    layout: str
    images_per_second: float           # all workers together, steady state
    images_per_second_per_worker: float
    output_bytes: int                  # the tars written
    output_bytes_per_image: float
    s3_requests: dict = field(default_factory=dict)   # the workers' S3 requests, by operation
    s3_requests_per_shard: float = 0.0
    teacher: str | None = None
    sky: str | None = None
    batch_size: int = 0
    key: str = ""                      # where it was read from (not stored)

    @classmethod
    def of(cls, summary, *, shards: int, workers: int, seconds: float, output_bytes: int, teacher: str | None,
           sky: str | None, batch_size: int) -> RunRecord:
        """The record of a run from its summary (engine.label.Summary)."""
        images = summary.samples_ok + summary.samples_error
        requests = sum(summary.s3_requests.values())
        return cls(at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), images=images,
                   shards=shards, seconds=round(seconds, 3), startup_seconds=round(summary.startup_seconds, 3),
                   workers=workers, device=summary.device, layout=summary.layout,
                   images_per_second=round(summary.images_per_second, 4),
                   images_per_second_per_worker=round(summary.images_per_second / max(workers, 1), 4),
                   output_bytes=output_bytes, output_bytes_per_image=round(output_bytes / max(images, 1), 1),
                   s3_requests=dict(summary.s3_requests),
                   s3_requests_per_shard=round(requests / max(shards, 1), 2),
                   teacher=teacher, sky=sky, batch_size=batch_size)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "key"}


def write(output: ObjectStore, record: RunRecord) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    key = layout.run_key(stamp)
    output.put(key, json.dumps(record.to_json(), indent=2).encode())
    return key


def latest(output: ObjectStore) -> RunRecord | None:
    """The newest run's record; None when no run finished here (or its record is unreadable:
    it only informs an estimate)."""
    keys = [o.key for o in output.list(layout.RUNS) if o.key.endswith(".json")]
    if not keys:
        return None
    key = max(keys)
    try:
        doc = json.loads(output.get(key))
        known = {f.name for f in fields(RunRecord)}
        return RunRecord(**{k: v for k, v in doc.items() if k in known and k != "key"}, key=key)
    except (FileNotFoundError, ValueError, TypeError):
        return None
