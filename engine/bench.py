"""``depth-engine bench``: figures to reproduce before a job, on the user's own machine.

What it measures today, in one run:
- the engine end to end (``label`` with a local Ray: storage -> shards -> manifest) on
  synthetic shards: images/s and the fraction of actor time inside the models;
- with ``--memory``: one worker's peak RSS labeling a shard of N images and one of 10 N
  images, each in a fresh worker, so a reader can see that memory is flat in shard size.
- with ``--audit N``: ``audit --json`` time and peak memory over a synthetic manifest of N rows;
- with ``--plan N``: resume planning time for an OUTPUT holding N committed shards
  (placeholder manifest parts; planning reads listings only, never a part).
Model load and cluster start are outside the steady-state figures (``label`` reports
images/s over the shard work only).
"""
from __future__ import annotations

import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import ConfigError, LabelConfig
from engine.synthetic import DEFAULT_SIZES, write_shard


@dataclass(frozen=True)
class BenchConfig:
    teacher: str | None = None            # None: a random-weight teacher of teacher_size
    sky: str | None = None                # None: a random-weight segmenter; "none": no sky
    teacher_size: str = "vits"
    sky_size: str = "b0"
    image_size: int = 518                 # processor size of the random teacher
    images: int = 64
    sizes: list = field(default_factory=lambda: list(DEFAULT_SIZES))
    memory: bool = False
    batch_size: int = 8
    workers: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    workdir: str | None = None
    plan: int = 0                         # committed shards for the planning figure
    audit: int = 0                        # manifest rows for the audit figure
    output: str | None = None             # where to build that OUTPUT (default: workdir)

    def __post_init__(self):
        if self.images < 1:
            raise ConfigError(f"--images must be >= 1, got {self.images}")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'640x480,500x375' (W x H, as image tools print them) -> [(480, 640), (375, 500)]."""
    try:
        out = [(int(h), int(w)) for w, h in (s.lower().split("x") for s in text.split(",") if s)]
    except ValueError:
        raise ConfigError(f"--sizes must look like 640x480,500x375, got {text!r}") from None
    if not out or min(min(s) for s in out) < 1:
        raise ConfigError(f"--sizes must look like 640x480,500x375, got {text!r}")
    return out


def _models(cfg: BenchConfig, root: Path) -> tuple[str, str | None, dict]:
    from labelers.random_models import save_random_segmenter, save_random_teacher

    teacher, sky = cfg.teacher, cfg.sky
    desc = {}
    if teacher is None:
        path = root / f"random-teacher-{cfg.teacher_size}-{cfg.image_size}"
        if not (path / "config.json").exists():
            save_random_teacher(path, size=cfg.teacher_size, image_size=cfg.image_size)
        teacher = str(path)
        desc["teacher"] = f"random {cfg.teacher_size} at {cfg.image_size}"
    if sky is None:
        path = root / f"random-segmenter-{cfg.sky_size}"
        if not (path / "config.json").exists():
            save_random_segmenter(path, size=cfg.sky_size)
        sky = str(path)
        desc["sky"] = f"random {cfg.sky_size}"
    return teacher, None if sky == "none" else sky, desc


def _label(cfg: BenchConfig, inputs: str, output: str, teacher: str, sky: str | None):
    from engine.label import label

    return label(LabelConfig(input=inputs, output=output, teacher=teacher, sky=sky,
                             batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device,
                             dtype=cfg.dtype, progress=False))


def machine() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def plan_figures(output_url: str, n: int) -> dict:
    """Time resume planning over an OUTPUT with n committed shards (and n + n/10 inputs)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from engine.plan import plan
    from storage import layout
    from storage.objectstore import open_store

    out = open_store(output_url)
    names = [f"shard-{i:07d}" for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda name: out.put(layout.manifest_key(name), b"\0"), names))
    built = time.perf_counter() - t0
    inputs = [f"s3://raw/{name}.tar" for name in names] + [f"s3://raw/new-{i:07d}.tar" for i in range(n // 10)]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        p = plan(out, inputs)
        times.append(time.perf_counter() - t0)
    assert len(p.committed) == n and len(p.todo) == n // 10
    return {"output": output_url, "committed_shards": n, "inputs": len(inputs),
            "plan_seconds": sorted(times)[1], "plan_seconds_all": [round(t, 3) for t in times],
            "build_seconds": round(built, 1)}


def synthetic_manifest(output_url: str, rows: int, per_part: int = 10_000, seed: int = 0) -> None:
    """Manifest parts of ``per_part`` plausible rows (2 % errors) totalling ``rows``, written
    directly: the audit benchmark needs a manifest, not labels."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage import layout
    from storage.manifest import SCHEMA
    from storage.objectstore import open_store

    out = open_store(output_url)
    rng = np.random.default_rng(seed)
    parts = max(1, -(-rows // per_part))
    per = rows // parts
    for i in range(parts):
        n = per + (1 if i < rows % parts else 0)
        ok = rng.random(n) > 0.02
        lo = rng.random(n).astype(np.float32)
        cols = {
            "key": pa.array([f"k{i:05d}-{j:06d}" for j in range(n)]),
            "shard": pa.array([f"shard-{i:06d}.tar"] * n),
            "source": pa.array([f"s3://raw/shard-{i:06d}.tar"] * n),
            "status": pa.array(np.where(ok, "ok", "error")),
            "error": pa.array(np.where(ok, None, rng.choice(
                ["cannot decode image: image file is truncated (12 bytes not processed)", "empty image member"], n))),
            "width": pa.array(rng.choice([640, 500, 1024, 1280, 48], n).astype(np.int32)),
            "height": pa.array(rng.choice([480, 375, 768, 720, 60], n).astype(np.int32)),
            "sky_fraction": pa.array(np.clip(rng.beta(0.5, 2.0, n), 0, 1).astype(np.float32)),
            "disp_min": pa.array(lo), "disp_max": pa.array(lo + rng.gamma(2.0, 5.0, n).astype(np.float32)),
            "degenerate": pa.array(rng.random(n) < 0.001),
            "disp_p05": pa.array(rng.random(n).astype(np.float32) * 0.1),
            "disp_p50": pa.array(rng.random(n).astype(np.float32) * 0.5 + 0.2),
            "disp_p95": pa.array(rng.random(n).astype(np.float32) * 0.1 + 0.85),
        }
        arrays = [cols[f.name].cast(f.type) if f.name in cols else pa.nulls(n, f.type) for f in SCHEMA]
        table = pa.Table.from_arrays(arrays, schema=SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        out.put(layout.manifest_key(f"shard-{i:06d}"), buf.getvalue())


def audit_figures(output_url: str, rows: int) -> dict:
    """Time ``depth-engine audit --json`` over a synthetic manifest of ``rows`` rows, in a
    child process so its peak RSS is its own."""
    import json
    import resource
    import subprocess
    import sys
    import time

    t0 = time.perf_counter()
    synthetic_manifest(output_url, rows)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "engine", "audit", output_url, "--json"],
                       capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    report = json.loads(p.stdout)
    assert report["samples"] == rows
    return {"output": output_url, "rows": rows, "audit_seconds": round(seconds, 2),
            "audit_peak_rss_mb": round(peak, 1), "build_seconds": round(built, 1)}


def run_bench(cfg: BenchConfig) -> dict:
    root = Path(cfg.workdir or tempfile.mkdtemp(prefix="depth-engine-bench-"))
    if cfg.audit:
        return {"machine": machine(), "audit": audit_figures(cfg.output or str(root / "audit-output"), cfg.audit)}
    if cfg.plan:
        return {"machine": machine(), "plan": plan_figures(cfg.output or str(root / "plan-output"), cfg.plan)}
    teacher, sky, desc = _models(cfg, root / "models")
    report = {"machine": machine(), "models": {"teacher": desc.get("teacher", teacher),
                                               "sky": desc.get("sky", sky or "none")}}
    per_shard = max(1, cfg.images // 4)
    for i in range(0, cfg.images, per_shard):
        write_shard(root / "e2e" / f"bench-{i // per_shard:06d}.tar", min(per_shard, cfg.images - i),
                    cfg.sizes, seed=i)
    s = _label(cfg, f"{root}/e2e/", str(root / "out-e2e"), teacher, sky)
    report["end_to_end"] = {k: v for k, v in s.to_json().items()
                            if k in ("samples_ok", "samples_error", "wall_seconds", "images_per_second",
                                     "model_busy_fraction", "workers", "device", "peak_worker_rss_mb")}
    if cfg.memory:
        report["memory"] = {}
        for label_, n in (("small", cfg.images), ("large", 10 * cfg.images)):
            shard = write_shard(root / f"mem-{label_}" / f"mem-{label_}.tar", n, cfg.sizes)
            r = _label(cfg, str(shard), str(root / f"out-mem-{label_}"), teacher, sky)
            report["memory"][label_] = {"images": n, "peak_worker_rss_mb": round(r.peak_worker_rss_mb, 1),
                                        "images_per_second": round(r.images_per_second, 3)}
        m = report["memory"]
        m["large_over_small"] = round(m["large"]["peak_worker_rss_mb"] / m["small"]["peak_worker_rss_mb"], 3)
    report["workdir"] = str(root)
    return report


def print_report(r: dict) -> None:
    print(f"machine: {r['machine']}")
    if "audit" in r:
        a = r["audit"]
        print(f"audit: {a['audit_seconds']:.1f} s, peak RSS {a['audit_peak_rss_mb']:.0f} MiB for {a['rows']} rows")
        return
    if "plan" in r:
        p = r["plan"]
        print(f"planning: {p['plan_seconds']:.2f} s for {p['committed_shards']} committed shards "
              f"({p['inputs']} inputs) in {p['output']}")
        return
    print(f"models: teacher {r['models']['teacher']}, sky {r['models']['sky']}")
    e = r["end_to_end"]
    print(f"end to end: {e['images_per_second']:.2f} images/s over {e['samples_ok']} images, "
          f"models busy {100 * e['model_busy_fraction']:.1f}% of actor time, "
          f"peak worker RSS {e['peak_worker_rss_mb']:.0f} MiB ({e['workers']} worker(s) on {e['device']})")
    if "memory" in r:
        m = r["memory"]
        print(f"memory: peak worker RSS {m['small']['peak_worker_rss_mb']:.0f} MiB for {m['small']['images']} images, "
              f"{m['large']['peak_worker_rss_mb']:.0f} MiB for {m['large']['images']} images "
              f"(ratio {m['large_over_small']:.3f})")
