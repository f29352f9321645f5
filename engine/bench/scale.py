"""``bench --plan`` and ``bench --audit``: the figures that grow with the job, not the GPU:
resume planning over many committed shards, and the audit over a large manifest."""
from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.plan import plan
from storage import layout
from storage.manifest import SCHEMA
from storage.stores import open_store


def plan_figures(output_url: str, n: int) -> dict:
    """Time resume planning over an OUTPUT with n committed shards (and n + n/10 inputs). The
    placeholders are written unless a run before left them all there: a server still busy
    with 100,000 fresh writes lists slower, so a second run into the same OUTPUT times the
    listing alone."""
    out = open_store(output_url)
    names = [f"shard-{i:07d}" for i in range(n)]
    t0 = time.perf_counter()
    reused = all(out.info(layout.manifest_key(names[i])) is not None for i in (0, n // 2, n - 1))
    if reused:
        reused = sum(1 for _ in out.list(layout.MANIFEST)) == n
    if not reused:
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
            "build_seconds": round(built, 1), "placeholders_reused": reused}


def synthetic_manifest(output_url: str, rows: int, per_part: int = 10_000, seed: int = 0) -> None:
    """Manifest parts of ``per_part`` plausible rows (2 % errors) totalling ``rows``, written
    directly: the audit benchmark needs a manifest, not labels."""

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
