"""``depth-engine convert-gt`` and ``depth-engine evaluate`` as a user runs them: subprocesses
with a local Ray, on local storage and a real S3 endpoint, with tiny random-weight models; the
Middlebury motorcycle pair from scikit-image as a real labeled sample."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pytest
from builders import write_shard
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache
from helpers_models import reference_metrics, reference_prediction
from scenes import npy, png, render, with_invalid
from skimage import data as skdata

from engine.evaluate import print_report


def scene_shards(directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(2):
        samples = []
        for i, (h, w) in enumerate([(64, 96), (80, 80)]):
            image, depth = render(h, w, seed=10 * s + i)
            samples.append({"__key__": f"s{s}-{i}", "png": png(image), "depth.npy": npy(with_invalid(depth))})
        shards.append(write_shard(directory / f"scenes-{s:06d}.tar", samples))
    return shards


def motorcycle_shard(directory: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """The left view and its ground-truth disparity (inf where Middlebury has none)."""
    left, _, disparity = skdata.stereo_motorcycle()
    directory.mkdir(parents=True, exist_ok=True)
    path = write_shard(directory / "motorcycle-000000.tar",
                       [{"__key__": "motorcycle", "png": png(left), "disparity.npy": npy(disparity),
                         "json": {"dataset": "Middlebury 2014", "view": "left"}}])
    return path, left, disparity


def test_convert_gt_then_status_audit_verify_resume_and_refusals(tmp_path, tiny_models):
    scene_shards(tmp_path / "raw")
    out = str(tmp_path / "gt")
    p = run("convert-gt", str(tmp_path / "raw") + "/", out, "--sky", tiny_models.sky,
            "--max-depth", "80", "--workers", "1", "--json", check=0)
    summary = json.loads(p.stdout)
    assert (summary["shards_committed"], summary["samples_ok"], summary["samples_error"]) == (2, 4, 0)
    job = json.loads((tmp_path / "gt" / "job.json").read_text())
    assert job["label"]["definition"].startswith("ground-truth/") and job["label"]["teacher"] is None
    assert job["label"]["ground_truth"] == {"scale": 1.0, "max_depth": 80.0}

    with tarfile.open(tmp_path / "gt" / "shards" / "scenes-000000.tar") as tar:
        names = tar.getnames()
    assert {"s0-0.png", "s0-0.disp.png", "s0-0.sky.png", "s0-0.valid.png", "s0-0.depth.npy", "s0-0.json"} <= set(names)

    status = json.loads(run("status", out, "--json", check=0).stdout)
    assert (status["committed"], status["pending"], status["failed"]) == (2, 0, 0)
    audit = json.loads(run("audit", out, "--json", check=0).stdout)
    assert audit["source_kind"] == {"gt": 4} and audit["ok"] == 4
    assert audit["valid_fraction"]["count"] == 4 and 0.9 < audit["valid_fraction"]["mean"] < 1.0
    assert "valid fraction of ground truth" in run("audit", out, check=0).stdout
    verified = json.loads(run("verify", out, "--json", check=0).stdout)
    assert verified["ok"] and verified["checked"] == 2

    again = json.loads(run("convert-gt", str(tmp_path / "raw") + "/", out, "--sky", tiny_models.sky,
                           "--max-depth", "80", "--json", check=0).stdout)
    assert (again["shards_skipped"], again["shards_committed"]) == (2, 0)
    # One OUTPUT, one label definition: pseudo-labels or another ground-truth rule are refused.
    for argv in (["label", "--teacher", tiny_models.teacher], ["convert-gt", "--max-depth", "10"]):
        refused = run(argv[0], str(tmp_path / "raw") + "/", out, "--sky", tiny_models.sky, *argv[1:], check=2)
        assert "another definition" in refused.stderr and "Traceback" not in refused.stderr
    bad = run("convert-gt", str(tmp_path / "raw") + "/", str(tmp_path / "x"), "--gt-scale", "0", check=2)
    assert "--gt-scale must be a positive number" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_motorcycle_end_to_end_with_a_tiny_random_teacher(tmp_path, tiny_models, capsys):
    """convert-gt, a pseudo-label job and evaluate of the three sources, scored against numpy.
    In process on one local Ray: the commands' own CLI runs are this file's other tests."""
    import ray

    from engine.config import LabelConfig
    from engine.evaluate import EvalConfig, evaluate
    from engine.label import label
    from labelers.ground_truth import GroundTruthRule

    src, left, disparity = motorcycle_shard(tmp_path / "raw")
    gt_out, pseudo_out = str(tmp_path / "gt"), str(tmp_path / "pseudo")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False, num_cpus=2)
    try:
        assert label(LabelConfig(input=src, output=gt_out, teacher=None, ground_truth=GroundTruthRule(), sky=None,
                                 workers=1, progress=False)).exit_code == 0
        # A pseudo-label job over the same labeled input carries the ground truth through.
        assert label(LabelConfig(input=src, output=pseudo_out, teacher=tiny_models.teacher, sky=None, workers=1,
                                 progress=False)).exit_code == 0
        reports = {name: evaluate(EvalConfig(source=source, teacher=tiny_models.teacher, workers=1, progress=False))
                   for name, source in (("input", src), ("gt", gt_out), ("pseudo", pseudo_out))}
    finally:
        ray.shutdown()

    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    model = AutoModelForDepthEstimation.from_pretrained(tiny_models.teacher).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_models.teacher)
    pred = reference_prediction(model, processor, left)
    valid = np.isfinite(disparity) & (disparity > 0)
    abs_rel, delta1, *_ = reference_metrics(pred, disparity.astype(np.float64), valid)

    for name, r in reports.items():
        assert r["source_kind"] == name and r["summary"]["scored"] == 1
        (row,) = r["samples"]
        assert row["key"] == "motorcycle" and row["ground_truth"] == "disparity.npy"
        assert row["pixels"] == valid.sum() and 0.9 * valid.size < row["pixels"] < valid.size
        assert row["teacher"]["abs_rel"] == pytest.approx(abs_rel, rel=2e-3)
        assert row["teacher"]["delta1"] == pytest.approx(delta1, abs=2e-3)
    assert reports["input"]["summary"]["label"]["samples"] == 0
    # The converted label scored against its own ground truth: 16-bit rounding only.
    assert reports["gt"]["summary"]["label"]["abs_rel"] < 1e-3
    assert reports["gt"]["summary"]["label"]["delta1"] == 1.0
    # The stored pseudo-label is the teacher's output, normalized: it scores as the teacher does.
    assert reports["pseudo"]["summary"]["label"]["abs_rel"] == pytest.approx(abs_rel, rel=1e-2)
    assert "pseudo-label of" in reports["pseudo"]["stored_label"]

    # The table the command prints without --json, from the same report.
    print_report(reports["gt"])
    table = capsys.readouterr().out
    assert "AbsRel" in table and "stored label" in table and "paper KITTI" in table
    assert f"{reports['gt']['summary']['teacher']['abs_rel']:.4f}" in table


def test_evaluate_usage_errors_exit_2(tmp_path, tiny_models):
    p = run("evaluate", str(tmp_path / "nothing-here") + "/", "--teacher", tiny_models.teacher, check=2)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run("evaluate", str(tmp_path), check=2)
    assert "--teacher" in p.stderr


def test_convert_gt_and_evaluate_on_s3(tmp_path, tiny_models, job_s3_bucket):
    s3 = boto3.client("s3")
    for path in scene_shards(tmp_path / "raw"):
        s3.upload_file(path, job_s3_bucket, f"labeled/{Path(path).name}")
    out = f"s3://{job_s3_bucket}/gt/"
    summary = json.loads(run("convert-gt", f"s3://{job_s3_bucket}/labeled/", out, "--sky", "none",
                             "--workers", "1", "--json", check=0).stdout)
    assert (summary["shards_committed"], summary["samples_ok"]) == (2, 4)
    assert json.loads(run("verify", out, "--json", check=0).stdout)["ok"]
    r = json.loads(run("evaluate", out, "--teacher", tiny_models.teacher, "--workers", "1", "--json",
                       check=0).stdout)
    assert r["source_kind"] == "gt" and r["summary"]["scored"] == 4 and r["shards"]["evaluated"] == 2
    assert r["summary"]["label"]["abs_rel"] < 1e-3
    assert 0 <= r["summary"]["teacher"]["delta1"] <= 1 and r["summary"]["teacher"]["abs_rel"] > 0
