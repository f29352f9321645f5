"""``label --dry-run``: the images pending (img2dataset's counts, or a sample extrapolated by
bytes), the rate (given, an earlier run's record, or a calibration on a real Ray worker with
the job's models), the projection, and nothing written to OUTPUT, local or S3."""
from __future__ import annotations

import io
import json
import os
import re
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from builders import write_shard
from helpers_cli import offline_cache  # noqa: F401 - autouse: offline, a private model cache
from PIL import Image

from engine import dry_run as dry_run_module
from engine import job
from engine.cli import main
from engine.cli.printing import print_estimate
from engine.config import ConfigError, LabelConfig
from engine.dry_run import dry_run, s3_requests_per_shard
from engine.label import label, prepare
from engine.models import resolve
from engine.pending_images import estimate_images
from storage import layout
from storage.stores import open_store

README = Path(__file__).resolve().parent.parent / "README.md"


def jpeg(h: int, w: int, rng) -> bytes:
    """Noise: its JPEG size grows with its pixels, as a photo's does."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def uneven_shards(directory: Path, n: int = 40, seed: int = 6) -> tuple[list[str], int]:
    """Shards of 1 to 60 samples, images from 16x16 to 120x160 (a shard leans small or large),
    every 9th sample without an image (json only, not an image); returns paths and true images."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths, images = [], 0
    for i in range(n):
        lean = rng.uniform(0.5, 1.5)
        samples = []
        for j in range(int(rng.integers(1, 61))):
            s = {"__key__": f"{i:05d}{j:04d}", "json": {"i": j}}
            if j % 9 != 8:
                h = int(np.clip(rng.integers(16, 121) * lean, 16, 160))
                s["jpg"] = jpeg(h, int(h * rng.uniform(0.8, 1.4)), rng)
                images += 1
            samples.append(s)
        paths.append(write_shard(directory / f"{i:05d}.tar", samples))
    return paths, images


def img2dataset_shards(directory: Path, counts: list[int], seed: int = 3) -> list[str]:
    """What img2dataset writes per shard: NNNNN.tar (the successes), NNNNN.parquet (every URL
    tried, with its status) and NNNNN_stats.json."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ok in enumerate(counts):
        failed = int(rng.integers(0, 5))
        samples = [{"__key__": f"{i:05d}{j:04d}", "jpg": jpeg(24, 32, rng), "txt": b"a caption",
                    "json": {"status": "success"}} for j in range(ok)]
        paths.append(write_shard(directory / f"{i:05d}.tar", samples))
        status = ["success"] * ok + ["failed_to_download"] * failed
        pq.write_table(pa.table({"key": [f"{i:05d}{j:04d}" for j in range(ok + failed)], "status": status}),
                       directory / f"{i:05d}.parquet")
        stats = {"count": ok + failed, "successes": ok, "failed_to_download": failed, "failed_to_resize": 0,
                 "duration": 1.5, "status_dict": {"success": ok}}
        (directory / f"{i:05d}_stats.json").write_text(json.dumps(stats))
    return paths


def listing(url: str) -> list[tuple[str, int, str | None]]:
    """Every object under ``url`` with its size and ETag (local: mtime and size): a rewrite shows."""
    return [(o.key, o.size, o.etag) for o in open_store(url).list()]


def config(inputs: str, output: str, models, **kw) -> LabelConfig:
    return LabelConfig(**{"input": inputs, "output": output, "teacher": models.teacher, "sky": models.sky,
                          "workers": 1, "batch_size": 4, "progress": False, **kw})


# -- images -----------------------------------------------------------------------------------------

def test_img2dataset_counts_are_exact_from_stats_then_parquet(tmp_path):
    counts = [7, 0, 13, 2, 25]
    paths = img2dataset_shards(tmp_path / "in", counts)
    est = estimate_images(paths)
    assert (est.images, est.method, est.from_stats, est.sample) == (sum(counts), "img2dataset stats", 5, None)

    for p in (tmp_path / "in").glob("*_stats.json"):
        p.unlink()
    est = estimate_images(paths)
    assert (est.images, est.method, est.from_parquet) == (sum(counts), "img2dataset parquet", 5)

    (tmp_path / "in" / "00004.parquet").unlink()     # one shard without: counted from its tar
    est = estimate_images(paths)
    assert (est.images, est.method, est.from_parquet, est.estimated) == (sum(counts), "mixed", 4, 1)


def test_bare_uneven_shards_sampled_and_extrapolated_by_bytes(tmp_path):
    paths, truth = uneven_shards(tmp_path / "in")
    est = estimate_images(paths)
    assert est.method == "sample" and est.estimated == len(paths)
    s = est.sample
    # their images per byte spread widely (relative std ~0.25): more than the first 16 are counted,
    # until one standard error of the extrapolation is under 2.5 %
    assert 16 < s["shards"] < s["of"] == 40 and 0.1 < s["relative_std"] < 1
    assert s["images_per_mib"]["min"] < s["images_per_mib"]["mean"] < s["images_per_mib"]["max"]
    assert 0 < s["relative_standard_error"] <= 0.025
    assert abs(est.images - truth) / truth < 0.10, (est.images, truth)
    first16 = estimate_images(paths, max_sample_shards=16)          # the first 16 alone: said to be looser
    assert first16.sample["shards"] == 16 and first16.sample["relative_standard_error"] > 0.025
    assert estimate_images(paths) == est                          # deterministic


def test_s3_requests_formula():
    assert s3_requests_per_shard(input_s3=False, output_s3=False, tar_bytes=1e6) == 0
    assert s3_requests_per_shard(input_s3=True, output_s3=False, tar_bytes=1e6) == 1
    assert s3_requests_per_shard(input_s3=True, output_s3=True, tar_bytes=1e6) == 1 + 13 + 2
    assert s3_requests_per_shard(input_s3=False, output_s3=True, tar_bytes=40 * 2**20) == 13 + 3 + 3


# -- the dry run without Ray ---------------------------------------------------------------------------

def test_given_rate_starts_no_ray_writes_nothing_and_prices(tmp_path, tiny_models, monkeypatch, capsys):
    counts = [30, 11, 52]
    img2dataset_shards(tmp_path / "in", counts)
    out = tmp_path / "out"
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("the dry run started Ray"))
    monkeypatch.setattr(dry_run_module, "_calibrated", lambda *a, **k: pytest.fail("it calibrated"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    est = dry_run(config(f"{tmp_path}/in/*.tar", str(out), tiny_models, workers=2), rate=2.5, price_per_hour=0.8)
    assert not out.exists()
    images = sum(counts)
    assert (est.images, est.rate_source, est.rate, est.workers, est.shards_pending) == (images, "given", 2.5, 2, 3)
    assert est.wall_seconds == pytest.approx(images / (2.5 * 2), abs=0.1)
    assert est.worker_hours == pytest.approx(images / 2.5 / 3600, rel=1e-3)
    assert est.cost == pytest.approx(images / 2.5 / 3600 * 0.8, abs=1e-4)
    assert (est.s3_requests, est.s3_requests_source) == (0, "no S3")

    print_estimate(est.to_json(), as_json=False)
    text = capsys.readouterr().out
    assert "nothing written" in text and f"~{images:,} pending (img2dataset stats)" in text
    assert re.search(r"2\.5 images/s per worker, from --rate", text) and "at $0.8/worker-hour" in text


def test_cli_json_fields_are_the_documented_ones(tmp_path, tiny_models, capsys):
    img2dataset_shards(tmp_path / "in", [4, 5])
    out = tmp_path / "out"
    code = main(["label", f"{tmp_path}/in/", str(out), "--teacher", tiny_models.teacher, "--sky", tiny_models.sky,
                 "--workers", "1", "--dry-run", "--rate", "3", "--price-per-hour", "1.5", "--json"])
    assert code == 0 and not out.exists()
    doc = json.loads(capsys.readouterr().out)
    section = README.read_text().split("### Before a job: --dry-run")[1].split("\n### ")[0]
    table = section.split("`--json` prints one object:")[1]
    documented = {name for line in table.splitlines() if line.startswith("| `")
                  for name in re.findall(r"`(\w+)`", line.split(" | ")[0])}
    assert documented == set(doc), (documented ^ set(doc))
    assert doc["cost"] == pytest.approx(doc["worker_hours"] * 1.5, abs=1e-4)
    assert main(["label", f"{tmp_path}/in/", str(out), "--rate", "3"]) == 2      # --rate alone: refused
    assert "only go with --dry-run" in capsys.readouterr().err and not out.exists()


def test_refuses_another_label_definition_and_writes_nothing(tmp_path, tiny_models, s3_server):
    img2dataset_shards(tmp_path / "in", [3])
    bucket = s3_server.bucket()
    for output in (str(tmp_path / "out"), f"s3://{bucket}/labels/"):
        other = config(f"{tmp_path}/in/", output, tiny_models)
        other = replace(other, teacher=tiny_models.other_teacher)
        job.write(open_store(output), prepare(other).spec)        # OUTPUT pins the other teacher
        before = listing(output)
        dry_run(config(f"{tmp_path}/in/", output, tiny_models), rate=1.0)   # nothing committed: replaceable
        assert listing(output) == before
        open_store(output).put(layout.manifest_key("00000"), b"")  # a committed shard's record
        before = listing(output)
        with pytest.raises(ConfigError, match="another definition"):
            dry_run(config(f"{tmp_path}/in/", output, tiny_models), rate=1.0)
        assert listing(output) == before
    assert main(["label", f"{tmp_path}/in/", str(tmp_path / "out"), "--teacher", tiny_models.teacher,
                 "--sky", tiny_models.sky, "--dry-run", "--rate", "1"]) == 2


def test_s3_input_and_output_estimated_and_left_untouched(tmp_path, tiny_models, s3_server):
    paths, truth = uneven_shards(tmp_path / "in", n=20, seed=11)
    bucket = s3_server.bucket()
    raw = open_store(f"s3://{bucket}/raw/")
    for p in paths:
        raw.put(os.path.basename(p), Path(p).read_bytes())
    before = listing(f"s3://{bucket}/")
    est = dry_run(config(f"s3://{bucket}/raw/", f"s3://{bucket}/labels/", tiny_models), rate=4.0)
    assert listing(f"s3://{bucket}/") == before
    assert est.images_method == "sample" and abs(est.images - truth) / truth < 0.10, (est.images, truth)
    # no tar size measured yet: one part's upload, the commit's 13, the input's GET
    assert (est.s3_requests_source, est.s3_requests) == ("formula", 20 * (1 + 13 + 2))


# -- on Ray: calibration, and an earlier run's record ------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray(s3_server):
    """One Ray for the module, started after the S3 endpoint is in the environment (its workers
    inherit it)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_calibration_runs_the_jobs_models_on_a_worker(tmp_path, tiny_models, local_ray):
    paths, _ = uneven_shards(tmp_path / "in", n=3, seed=5)
    out = tmp_path / "out"
    est = dry_run(config(f"{tmp_path}/in/", str(out), tiny_models), calibration_images=6)
    assert not out.exists()
    d = est.rate_detail
    assert est.rate_source == "calibration" and est.rate > 0 and d["images"] == 6
    host, pid = d["worker"].split(":")[:2]
    assert host == socket.gethostname()
    assert int(pid) != os.getpid()                               # a Ray worker process, not the driver
    assert (d["teacher"], d["teacher_sha256"]) == (tiny_models.teacher, resolve(tiny_models.teacher).sha256)
    assert (d["sky_model"], d["sky_sha256"]) == (tiny_models.sky, resolve(tiny_models.sky).sha256)
    assert d["stage_seconds"]["teacher"] > 0 and d["stage_seconds"]["sky"] > 0
    assert est.output_bytes_per_image > 0 and est.startup_seconds > 0 and d["sources"][0] == paths[0]


def test_a_previous_run_gives_the_rate_and_the_s3_requests(tmp_path, tiny_models, local_ray, s3_server):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(1)
    for i, n in enumerate([3, 5, 2]):
        write_shard(inputs / f"shard-{i:06d}.tar",
                    [{"__key__": f"k{i}-{j}", "jpg": jpeg(40, 56, rng)} for j in range(n)])
    output = f"s3://{s3_server.bucket()}/labels/"
    cfg = config(f"{inputs}/", output, tiny_models)
    before = dry_run(cfg, rate=1.0)                                 # nothing recorded yet: the formula
    assert (before.s3_requests_source, before.images, listing(output)) == ("formula", 10, [])

    summary = label(cfg)
    assert sum(summary.s3_requests.values()) == before.s3_requests == 3 * (13 + 2)
    write_shard(inputs / "shard-000003.tar", [{"__key__": f"k3-{j}", "jpg": jpeg(40, 56, rng)} for j in range(4)])
    kept = listing(output)
    est = dry_run(cfg)                                              # no --rate: the run's record
    assert listing(output) == kept
    record = json.loads(open_store(output).get(next(k for k, _, _ in kept if k.startswith("runs/"))))
    assert est.rate_source == "previous run" and est.rate == record["images_per_second_per_worker"] > 0
    assert (record["images"], record["shards"], record["s3_requests_per_shard"]) == (10, 3, 15)
    assert (est.shards_committed, est.shards_pending, est.images) == (3, 1, 4)
    assert (est.s3_requests_source, est.s3_requests) == ("previous run", 15)
    assert est.wall_seconds == pytest.approx(4 / est.rate, abs=0.1)
    assert est.output_bytes == pytest.approx(4 * record["output_bytes_per_image"], abs=1)
