"""``depth-engine label`` end to end, as a user runs it: a subprocess with a local Ray,
on local storage and on a real S3 HTTP endpoint; output read back by the webdataset
library and pyarrow."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
import webdataset as wds
from builders import bad_members, photo_samples, write_shard
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache
from PIL import Image

from engine.models import resolve
from storage.label_format import label_row_shape


def make_inputs(directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    bad = [{"__key__": k, ext: data} for k, (ext, data) in bad_members().items()]
    return [
        write_shard(directory / "shard-000000.tar", photo_samples([(64, 96), (96, 64), (80, 80)], "a")),
        write_shard(directory / "shard-000001.tar", photo_samples([(70, 50), (50, 70)], "b") + bad),
        write_shard(directory / "shard-000002.tar", photo_samples([(64, 64)], "c")),
    ]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_output_shards(tars: dict[str, bytes], table) -> None:
    """Every ok row's sample is in its tar with label members of its manifest label size."""
    rows = table.to_pylist()
    by_shard: dict[str, dict] = {}
    for name, blob in tars.items():
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"readback-{os.getpid()}-{name}"
        path.write_bytes(blob)
        by_shard[name] = {s["__key__"]: s for s in wds.WebDataset(str(path), shardshuffle=False)}
        path.unlink()
    for r in rows:
        got = by_shard[r["shard"]]
        if r["status"] != "ok":
            assert r["key"] not in got and r["error"]
            continue
        s = got[r["key"]]
        disp = np.asarray(Image.open(io.BytesIO(s["disp.png"])))
        sky = np.asarray(Image.open(io.BytesIO(s["sky.png"])))
        assert disp.dtype == np.uint16 and disp.shape == label_row_shape(r)
        assert sky.dtype == np.uint8 and sky.shape == disp.shape and set(np.unique(sky)) <= {0, 255}
        assert json.loads(s["json"])["teacher"] == r["teacher"]


def test_label_local_resume_and_refusals(tmp_path, tiny_models):
    make_inputs(tmp_path / "raw")
    out = tmp_path / "out"
    args = ["--teacher", tiny_models.teacher, "--sky", tiny_models.sky, "--workers", "1",
            "--batch-size", "4"]
    p = run("label", f"{tmp_path}/raw/", str(out), *args, "--json", check=0)
    summary = json.loads(p.stdout)
    assert summary["shards_committed"] == 3 and summary["shards_failed"] == 0
    assert (summary["samples_ok"], summary["samples_error"]) == (6, 3)
    assert 0 < summary["model_busy_fraction"] <= 1 and summary["images_per_second"] > 0

    table = ds.dataset(str(out / "manifest"), format="parquet").to_table()
    assert table.num_rows == 9 and len(set(table.column("key").to_pylist())) == 9
    check_output_shards({p.name: p.read_bytes() for p in (out / "shards").iterdir()}, table)

    job = json.loads((out / "job.json").read_text())
    weights = Path(tiny_models.teacher) / "model.safetensors"
    assert job["label"]["teacher"]["files"]["model.safetensors"] == sha256(weights)
    assert len(job["shards"]) == 3 and "AWS_SECRET" not in json.dumps(job)

    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    again = json.loads(run("label", f"{tmp_path}/raw/", str(out), *args, "--json", check=0).stdout)
    assert (again["shards_committed"], again["shards_skipped"]) == (0, 3)
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}

    st = json.loads(run("status", str(out), "--json", check=0).stdout)
    assert st == {"total": 3, "committed": 3, "failed": 0, "pending": 0, "failed_shards": []}

    other = run("label", f"{tmp_path}/raw/", str(out), "--teacher", tiny_models.other_teacher,
                "--sky", tiny_models.sky, check=2)
    assert "teacher" in other.stderr and "Traceback" not in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, needle", [
    (["label"], "arguments are required"),
    (["label", "a/", "b", "--batch-size", "0"], "--batch-size"),
    (["label", "a/", "b", "--dtype", "fp16", "--device", "cpu"], "needs --device cuda"),
    (["label", "/nonexistent-dir/", "/tmp/out-x"], "no input shard"),
    (["status", "/nonexistent-output"], "no job.json"),
])
def test_usage_errors_exit_2_with_one_line(argv, needle):
    p = run(*argv, check=2)
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_model_problems_exit_2_before_any_work(tmp_path, tiny_models):
    make_inputs(tmp_path / "raw")
    p = run("label", f"{tmp_path}/raw/", str(tmp_path / "o1"), "--teacher", tiny_models.teacher,
            "--sky", tiny_models.no_sky, check=2)
    assert "no class named 'sky'" in p.stderr and "Traceback" not in p.stderr
    p = run("label", f"{tmp_path}/raw/", str(tmp_path / "o2"), "--teacher", str(tmp_path / "nope"),
            "--sky", "none", check=2)
    assert "nope" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o1" / "shards").exists()


def test_label_s3_brace_input_teacher_from_bucket(tmp_path, tiny_models, job_s3_bucket):
    s3 = boto3.client("s3")
    for path in make_inputs(tmp_path / "raw"):
        s3.upload_file(path, job_s3_bucket, f"raw/{Path(path).name}")
    for f in Path(tiny_models.teacher).iterdir():
        s3.upload_file(str(f), job_s3_bucket, f"models/teacher/{f.name}")
    out = f"s3://{job_s3_bucket}/labeled/"
    p = run("label", f"s3://{job_s3_bucket}/raw/shard-{{000000..000001}}.tar", out,
            "--teacher", f"s3://{job_s3_bucket}/models/teacher/", "--sky", tiny_models.sky,
            "--workers", "1", "--json", check=0)
    summary = json.loads(p.stdout)
    assert (summary["shards_committed"], summary["samples_ok"], summary["samples_error"]) == (2, 5, 3)
    # The workers' requests: each shard read once, and per shard its claim, tar and manifest part.
    assert summary["s3_requests"]["GetObject"] >= 2 and summary["s3_requests"]["PutObject"] >= 6
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert len(secret) < 12 or secret not in p.stdout + p.stderr

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    fs = pafs.S3FileSystem(endpoint_override=endpoint, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                           access_key=os.environ["AWS_ACCESS_KEY_ID"],
                           secret_key=os.environ["AWS_SECRET_ACCESS_KEY"])
    table = ds.dataset(f"{job_s3_bucket}/labeled/manifest", filesystem=fs, format="parquet").to_table()
    assert table.num_rows == 8
    keys = s3.list_objects_v2(Bucket=job_s3_bucket, Prefix="labeled/shards/")["Contents"]
    tars = {Path(k["Key"]).name: s3.get_object(Bucket=job_s3_bucket, Key=k["Key"])["Body"].read() for k in keys}
    assert set(tars) == {"shard-000000.tar", "shard-000001.tar"}
    check_output_shards(tars, table)
    job = json.loads(s3.get_object(Bucket=job_s3_bucket, Key="labeled/job.json")["Body"].read())
    assert job["label"]["teacher"]["kind"] == "s3"
    assert job["label"]["teacher"]["sha256"] == resolve(tiny_models.teacher).sha256


def test_ctrl_c_stops_cleanly_and_the_rerun_finishes(tmp_path, tiny_models):
    import signal
    import time

    from helpers_output import check_agreement

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(6):
        write_shard(raw / f"shard-{i:06d}.tar", photo_samples([(64, 96)] * 6, prefix=f"k{i}-"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "engine", "label", f"{raw}/", str(out), "--teacher", tiny_models.teacher,
           "--sky", tiny_models.sky, "--workers", "1", "--batch-size", "2"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((out / "manifest").glob("*.parquet")) and time.monotonic() <= deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "run the same command again to resume" in err.lower() and "Traceback" not in err
    done = check_agreement(str(out))["committed"]           # nothing half-written is referenced
    assert 1 <= done <= 6
    again = run("label", *cmd[4:], "--json", check=0)
    assert json.loads(again.stdout)["shards_skipped"] == done
    assert check_agreement(str(out))["committed"] == 6
    assert not [f for f in out.rglob("*") if ".tmp-" in f.name]    # interrupted writes cleaned up


def test_demo_runs_offline_and_writes_spec_output(tmp_path):
    """The README's first command: offline it falls back to random models and says so."""
    from helpers_output import check_agreement

    out = tmp_path / "demo"
    p = run("demo", str(out), "--json", check=0)
    assert "random-weight models" in p.stderr
    summary = json.loads(p.stdout)
    assert summary["shards_committed"] == 2 and summary["samples_ok"] >= 8 and summary["samples_error"] == 0
    counts = check_agreement(str(out))
    assert counts["ok"] == summary["samples_ok"]
    table = ds.dataset(str(out / "manifest"), format="parquet").to_table()
    check_output_shards({p.name: p.read_bytes() for p in (out / "shards").iterdir()}, table)
    assert (tmp_path / "demo-input").is_dir()
