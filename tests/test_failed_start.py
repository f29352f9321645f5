"""A failed start never blocks its own fix (issue 27, finding 9): a teacher whose weights file is
corrupt fails every worker's start (exit 2); job.json, written before the workers start, pins that
file's sha256, and used to refuse the rerun once the file was fixed ("another definition"). With no
shard committed under it, the rerun replaces it; once a shard is committed, it is pinned.
Through the CLI with a local Ray, as a user meets it."""
from __future__ import annotations

import json
import shutil

import pyarrow.dataset as ds
from builders import photo_samples, write_shard
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache


def test_a_broken_teacher_fixed_then_rerun_into_the_same_output(tmp_path, tiny_models):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_shard(raw / "s-000000.tar", photo_samples([(48, 64), (40, 56)]))
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_models.teacher, teacher)
    weights = teacher / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"\xff" * 8 + good[8:])           # the header's length: garbage
    out = tmp_path / "out"
    argv = ["label", f"{raw}/", str(out), "--teacher", str(teacher), "--sky", "none", "--workers", "1", "--json"]

    broken = run(*argv)
    assert broken.returncode == 2 and "cannot start" in broken.stderr, broken.stderr[-2000:]
    pinned = json.loads((out / "job.json").read_text())["label"]["teacher"]["sha256"]

    weights.write_bytes(good)                              # fixed: same path, other sha256
    fixed = run(*argv, check=0)
    assert json.loads(fixed.stdout)["shards_committed"] == 1
    assert "no shard was committed under it; replaced" in fixed.stderr
    now = json.loads((out / "job.json").read_text())["label"]["teacher"]["sha256"]
    assert now != pinned
    rows = ds.dataset(str(out / "manifest"), format="parquet").to_table().to_pylist()
    assert sorted(r["status"] for r in rows) == ["ok", "ok"]

    other = run("label", f"{raw}/", str(out), "--teacher", tiny_models.other_teacher, "--sky", "none", check=2)
    assert "another definition" in other.stderr and len(other.stderr.strip().splitlines()) == 1
    assert json.loads((out / "job.json").read_text())["label"]["teacher"]["sha256"] == now
