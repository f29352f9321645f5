"""``label --dry-run``: what a label job would take and cost, with nothing written to OUTPUT.

The job is validated exactly as ``label`` validates it (engine.label.prepare, and job.json's
label definition, read and never written), then planned from listings. Three figures make the
projection, each from the best source at hand:

- pending images: img2dataset's own counts where it left them beside a shard, else a
  deterministic sample of shards counted from their tar headers and extrapolated by input bytes
  (engine.pending_images);
- images/s per worker: ``--rate``, else the latest run's record in OUTPUT (engine.runs), else a
  calibration: one actor of the cluster, with the job's models and layout, labels a few real
  input images (pipelines.calibrate);
- workers: the layout ``label`` would choose on the cluster now (engine.runtime.session).

Pure functions first; ``dry_run`` at the end puts them together.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace

from engine import job, runs
from engine import plan as planning
from engine.config import ConfigError, LabelConfig
from engine.label import prepare, worker_spec
from engine.models import weight_bytes
from engine.pending_images import SAMPLE_SHARDS, estimate_images
from storage.objectstore import is_s3
from storage.s3 import PART_SIZE

CALIBRATION_IMAGES = 16            # real images a calibration labels (after a warm-up batch)
CALIBRATION_SHARDS = 4             # pending shards it may read them from

# S3 requests of one shard's first attempt, as the workers make them (storage.commit, leases):
# the commit claim is taken (LIST, create-only PUT, LIST + GET to confirm), the manifest part
# looked for (HEAD), the claim renewed twice (LIST + GET + PUT each), the part written (PUT) and
# the claim released (PUT): 13. The tar's upload adds PUT + HEAD below one part, else
# CreateMultipartUpload + a PUT per part + Complete + HEAD. An S3 input adds its one GET.
COMMIT_REQUESTS = 13


# -- rate, requests, projection --------------------------------------------------------------------

@dataclass(frozen=True)
class Rate:
    per_worker: float                     # images/s of one worker
    source: str                           # "given" | "previous run" | "calibration"
    detail: dict
    bytes_per_image: float | None = None  # output tar bytes per image, where measured
    startup_seconds: float | None = None  # cluster start and model load seen, where measured
    s3_requests_per_shard: float | None = None   # measured by an earlier run


def from_record(r: runs.RunRecord) -> Rate:
    detail = {"record": r.key, "at": r.at, "images": r.images, "seconds": r.seconds, "workers": r.workers,
              "device": r.device, "layout": r.layout, "teacher": r.teacher, "sky": r.sky}
    return Rate(r.images_per_second_per_worker, "previous run", detail, r.output_bytes_per_image or None,
                r.startup_seconds, r.s3_requests_per_shard)


def s3_requests_per_shard(*, input_s3: bool, output_s3: bool, tar_bytes: float, part_size: int = PART_SIZE) -> int:
    """The workers' S3 requests for one shard's first attempt (COMMIT_REQUESTS above)."""
    upload = 2 if tar_bytes < part_size else math.ceil(tar_bytes / part_size) + 3
    return int(input_s3) + (COMMIT_REQUESTS + upload if output_s3 else 0)


@dataclass
class Estimate:
    """What ``label --dry-run`` says (README "Before a job: --dry-run" lists every field)."""

    output: str
    shards_total: int
    shards_committed: int
    shards_failed: int
    shards_pending: int
    shards_to_label: int
    images: int
    images_method: str
    images_exact_shards: int
    images_sample: dict | None
    rate: float | None
    rate_source: str | None
    rate_detail: dict
    workers: int
    device: str
    layout: str
    wall_seconds: float | None
    startup_seconds: float | None
    worker_hours: float | None
    output_bytes_per_image: float | None
    output_bytes: int | None
    s3_requests_per_shard: float | None
    s3_requests: int | None
    s3_requests_source: str | None
    price_per_hour: float | None
    cost: float | None

    def to_json(self) -> dict:
        return asdict(self)


def project(images: int, shards: int, rate: Rate | None, workers: int, *, input_s3: bool, output_s3: bool,
            price_per_hour: float | None) -> dict:
    """Wall time on ``workers`` at ``rate`` per worker, worker-hours, output bytes, S3 requests
    and cost. A job uses no more workers than it has shards."""
    busy = max(1, min(workers, shards))
    out: dict = {"wall_seconds": None, "worker_hours": None, "output_bytes": None, "s3_requests": None,
                 "s3_requests_per_shard": None, "s3_requests_source": None, "cost": None}
    if rate is None or rate.per_worker <= 0:
        return out
    wall = images / (rate.per_worker * busy)
    hours = wall * busy / 3600
    out.update(wall_seconds=round(wall, 1), worker_hours=round(hours, 6),
               cost=round(hours * price_per_hour, 4) if price_per_hour is not None else None)
    if rate.bytes_per_image:
        out["output_bytes"] = round(images * rate.bytes_per_image)
    if not (input_s3 or output_s3):
        out.update(s3_requests=0, s3_requests_per_shard=0, s3_requests_source="no S3")
    elif rate.s3_requests_per_shard:
        out.update(s3_requests_per_shard=rate.s3_requests_per_shard, s3_requests_source="previous run",
                   s3_requests=round(rate.s3_requests_per_shard * shards))
    else:
        tar = images / max(shards, 1) * (rate.bytes_per_image or 0)
        per = s3_requests_per_shard(input_s3=input_s3, output_s3=output_s3, tar_bytes=tar)
        out.update(s3_requests_per_shard=per, s3_requests_source="formula", s3_requests=per * shards)
    return out


# -- the dry run -----------------------------------------------------------------------------------

def dry_run(config: LabelConfig, *, rate: float | None = None, price_per_hour: float | None = None,
            calibrate: bool = False, calibration_images: int = CALIBRATION_IMAGES,
            sample_shards: int = SAMPLE_SHARDS) -> Estimate:
    """What ``label(config)`` would do, cost and take; nothing is written to OUTPUT.

    The rate: ``rate`` (images/s per worker) when given, else the latest run recorded in
    OUTPUT, else (or with ``calibrate``) a calibration on one worker of the cluster. Ray is
    started only to calibrate; otherwise the layout is read from an attached cluster or from
    this machine as a local Ray would see it."""
    if rate is not None and not rate > 0:
        raise ConfigError(f"--rate must be > 0 images/s per worker, got {rate}")
    if price_per_hour is not None and not price_per_hour >= 0:
        raise ConfigError(f"--price-per-hour must be >= 0, got {price_per_hour}")
    if calibration_images < 1 or sample_shards < 1:
        raise ConfigError("calibration images and sample shards must be >= 1")
    p = prepare(config)
    job.check(p.output, p.spec)
    todo = planning.plan(p.output, p.shards, retry_failed=config.retry_failed)
    images = estimate_images(todo.todo, sample_shards=sample_shards)
    record = runs.latest(p.output)
    spec = worker_spec(config, p.output.url, p.teacher, p.sky, p.kind)
    model_bytes = weight_bytes(p.teacher, p.sky)

    chosen: Rate | None = None
    if rate is not None:
        chosen = Rate(rate, "given", {})
    elif record is not None and not calibrate:
        chosen = from_record(record)
    if chosen is None and todo.todo:
        from engine.runtime.session import ray_session

        with ray_session(config, model_bytes) as lay:
            chosen = _calibrated(todo.todo[:CALIBRATION_SHARDS], spec, lay, calibration_images)
    else:
        lay = _layout(config, model_bytes)
    if chosen is not None and record is not None:     # what the earlier run measured, where not measured now
        chosen = replace(chosen, bytes_per_image=chosen.bytes_per_image or record.output_bytes_per_image or None,
                         s3_requests_per_shard=chosen.s3_requests_per_shard or record.s3_requests_per_shard or None)

    states = todo.total - len(todo.committed) - len(todo.failed)
    pending_shards = len(todo.todo)
    proj = project(images.images, pending_shards, chosen, lay.actors,
                   input_s3=any(is_s3(u) for u in todo.todo), output_s3=is_s3(p.output.url),
                   price_per_hour=price_per_hour)
    return Estimate(
        output=p.output.url, shards_total=todo.total, shards_committed=len(todo.committed),
        shards_failed=len(todo.failed), shards_pending=states, shards_to_label=pending_shards,
        images=images.images, images_method=images.method,
        images_exact_shards=images.from_stats + images.from_parquet, images_sample=images.sample,
        rate=round(chosen.per_worker, 4) if chosen else None, rate_source=chosen.source if chosen else None,
        rate_detail=chosen.detail if chosen else {}, workers=max(1, min(lay.actors, pending_shards or lay.actors)),
        device=lay.device, layout=lay.describe(), startup_seconds=chosen.startup_seconds if chosen else None,
        output_bytes_per_image=chosen.bytes_per_image if chosen else None, price_per_hour=price_per_hour, **proj)


def _layout(config: LabelConfig, model_bytes: int):
    """The actors ``label`` would lay out now, without starting Ray: an attached (or already
    running) cluster is asked, else this machine is read as a local Ray would see it."""
    import ray

    from engine.runtime.session import actor_layout, local_resources, ray_session

    if ray.is_initialized() or config.ray_address or os.environ.get("RAY_ADDRESS"):
        with ray_session(config, model_bytes) as lay:
            return lay
    return actor_layout(config, model_bytes, local_resources())


def _calibrated(sources: list[str], spec, lay, images: int) -> Rate:
    """One actor with the job's models and layout labels ``images`` real images of ``sources``
    (pipelines.calibrate); its start (model load) is timed apart from the rate."""
    import ray

    from engine.runtime.actors import CalibrateActor

    spec = replace(spec, device=lay.device, threads=lay.codec_threads, torch_threads=lay.torch_threads)
    t0 = time.time()
    actor = CalibrateActor.options(**lay.options).remote(spec)
    try:
        ray.get(actor.ready.remote())
        started = time.time() - t0
        result = ray.get(actor.calibrate.remote(sources, images))
    except ray.exceptions.RayError as e:
        lines = str(e).strip().splitlines()
        raise ConfigError(f"the calibration worker failed: {lines[-1] if lines else type(e).__name__}") from None
    finally:
        ray.kill(actor)
    if not result["images_per_second"] > 0:
        raise ConfigError(f"the calibration measured no rate ({result['images']} images); pass --rate")
    return Rate(result["images_per_second"], "calibration", {**result, "startup_seconds": round(started, 2)},
                result["bytes_per_image"] or None, round(started, 2))
