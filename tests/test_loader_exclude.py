"""`LoaderConfig.exclude` / `train-student --exclude`: the (shard, key) rows of a Parquet file
(as `compare --out` writes) are left out of training, all of them or those where a boolean
column is true; bad files are refused with one line. Expected keys are the manifest's, read
with pyarrow alone, less the excluded ones."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import photo_samples, write_shard

from labelers.prediction import Prediction
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.student.loader import DepthShards, LoaderConfig, plan_shards
from pipelines.tasks import ShardTask
from storage.stores import open_store

CROP = 16


class _Teacher:
    """Disparity = brightness: no model to load, real labels."""

    output, device, name = "disparity", None, "brightness"

    def target_size(self, height, width):
        return height, width

    def predict(self, images):
        return [Prediction((1 + np.asarray(im, np.float32).mean(axis=2) / 255).astype(np.float32)) for im in images]


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> str:
    """Two shards of three photos each, labeled by the real flow."""
    root = tmp_path_factory.mktemp("exclude")
    out = open_store(str(root / "out"))
    for i in range(2):
        src = write_shard(root / f"in-{i}.tar", photo_samples([(40, 56), (48, 40), (44, 44)], f"s{i}-", seed=i))
        label_shard(ShardTask(src, f"shard-{i:06d}"), Labelers(_Teacher()), out, batch_size=4, threads=2)
    return str(root / "out")


def manifest_pairs(output: str) -> set[tuple[str, str]]:
    """(shard name, key) of every ok row, read with pyarrow alone."""
    rows = pq.read_table(str(Path(output) / "manifest")).to_pylist()
    return {(r["shard"].removesuffix(".tar"), r["key"]) for r in rows if r["status"] == "ok"}


def write_comparison(path: Path, rows: list[dict]) -> str:
    """A `compare --out`-like file: shard NAME (no .tar), key, the flags, a float figure."""
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
        [("shard", pa.string()), ("key", pa.string()), ("disagree", pa.bool_()), ("inverted", pa.bool_()),
         ("abs_rel", pa.float64())])), path)
    return str(path)


def loaded(output: str, *exclude: str) -> set[tuple[str, str]]:
    data = DepthShards(LoaderConfig((output,), crop=CROP, exclude=exclude))
    samples = list(data)
    assert len(samples) == len(data)                        # the plans' counts follow the exclusion
    pairs = [(s["shard"].removesuffix(".tar"), s["key"]) for s in samples]
    assert len(pairs) == len(set(pairs))
    return set(pairs)


@pytest.fixture(scope="module")
def comparison(output, tmp_path_factory) -> tuple[str, tuple[str, str], tuple[str, str]]:
    """The file, the pair two teachers disagree on, and a pair they agree on (other shard)."""
    pairs = sorted(manifest_pairs(output))
    bad, good = pairs[1], pairs[-1]
    assert bad[0] != good[0]
    path = write_comparison(tmp_path_factory.mktemp("cmp") / "compare.parquet", [
        {"shard": bad[0], "key": bad[1], "disagree": True, "inverted": False, "abs_rel": 0.9},
        {"shard": good[0], "key": good[1], "disagree": False, "inverted": None, "abs_rel": 0.01},
        {"shard": "shard-000009", "key": "elsewhere", "disagree": True, "inverted": True, "abs_rel": 1.0},
    ])
    return path, bad, good


def test_a_column_selects_the_rows_where_it_is_true(output, comparison):
    path, bad, good = comparison
    everything = manifest_pairs(output)
    assert len(everything) == 6 and loaded(output) == everything
    assert loaded(output, f"{path}:disagree") == everything - {bad}
    assert loaded(output, f"{path}:inverted") == everything          # true only for a pair not in it


def test_a_bare_path_leaves_out_every_row(output, comparison):
    path, bad, good = comparison
    assert loaded(output, path) == manifest_pairs(output) - {bad, good}


def test_files_add_up_and_a_tar_name_matches_too(output, comparison, tmp_path):
    path, bad, good = comparison
    other = sorted(manifest_pairs(output))[0]
    tar_named = write_comparison(tmp_path / "more.parquet", [
        {"shard": f"{other[0]}.tar", "key": other[1], "disagree": True, "inverted": False, "abs_rel": 0.5}])
    assert loaded(output, f"{path}:disagree", tar_named) == manifest_pairs(output) - {bad, other}


def test_an_s3_file_with_a_column(output, comparison, s3_bucket):
    path, bad, good = comparison
    open_store(f"s3://{s3_bucket}/runs/").put("compare.parquet", Path(path).read_bytes())
    assert loaded(output, f"s3://{s3_bucket}/runs/compare.parquet:disagree") == manifest_pairs(output) - {bad}
    assert loaded(output, f"s3://{s3_bucket}/runs/compare.parquet") == manifest_pairs(output) - {bad, good}


def _bad_files(tmp: Path, comparison: str) -> list[tuple[str, str]]:
    pq.write_table(pa.table({"name": ["a"], "key": ["k"]}), tmp / "noshard.parquet")
    pq.write_table(pa.table({"shard": [1], "key": ["k"]}), tmp / "intshard.parquet")
    (tmp / "text.parquet").write_text("shard,key\nx,y\n")
    return [(str(tmp / "noshard.parquet"), "needs columns 'shard' and 'key'"),
            (str(tmp / "intshard.parquet"), "column 'shard' is int64, not string"),
            (f"{comparison}:abs_rel", "column 'abs_rel' is double, not boolean"),
            (f"{comparison}:nosuch", "has no column 'nosuch'"),
            (str(tmp / "text.parquet"), "is not a Parquet file"),
            (str(tmp / "missing.parquet"), "no such file")]


def test_bad_files_are_refused_with_one_line(output, comparison, tmp_path):
    for spec, reason in _bad_files(tmp_path, comparison[0]):
        with pytest.raises(ValueError) as e:
            plan_shards(LoaderConfig((output,), exclude=(spec,)))
        assert reason in str(e.value) and spec in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))
    with pytest.raises(ValueError, match="tuple of Parquet URLs"):
        LoaderConfig((output,), exclude=comparison[0])                 # a lone string


def test_train_student_refuses_a_bad_file_before_loading_a_model(output, tmp_path):
    pq.write_table(pa.table({"shard": ["shard-000000"], "key": ["k"], "score": [0.5]}), tmp_path / "c.parquet")
    p = subprocess.run([sys.executable, "-m", "engine", "train-student", "--labeled", output, "--pseudo", output,
                        "--init", "dinov2", str(tmp_path / "no-model"), "--out", str(tmp_path / "run"),
                        "--exclude", f"{tmp_path / 'c.parquet'}:score", "--loader-workers", "0"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"depth-engine: exclude {tmp_path / 'c.parquet'}:score: column 'score' is double, not boolean"]
