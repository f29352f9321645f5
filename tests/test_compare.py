"""``depth-engine compare`` on the engine's runtime (a real local Ray), on local storage and on
a real S3 endpoint: every pair's figures against a numpy computation written here from the
tars (tarfile + PIL), unmatched and error rows counted, ``--sample`` reading about a tenth of
the label bytes, a teacher on the fly equal to the OUTPUT it labels. The per-sample flow in
process: tests/test_compare_flow.py."""
from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from builders import bad_members, photo_samples, write_shard
from PIL import Image

from engine import job
from engine.cli import main
from engine.compare import CompareConfig, compare
from engine.config import LabelConfig
from engine.label import label, prepare
from labelers.sky import SkySegmenter
from labelers.teacher import Teacher
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.tasks import ShardTask
from storage.manifest import decode_part
from storage.stores import open_store

SIZES = [(48, 64), (64, 48), (56, 56)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_models):
    """One input (two shards, error rows in the second) labeled by two different tiny teachers."""
    root = tmp_path_factory.mktemp("compare")
    bad = [{"__key__": k, ext: data} for k, (ext, data) in bad_members().items()]
    inputs = root / "in"
    inputs.mkdir()
    write_shard(inputs / "shard-000000.tar", photo_samples(SIZES * 10, "a"))
    write_shard(inputs / "shard-000001.tar", photo_samples(SIZES * 10, "b", seed=50) + bad)
    # Labeled in process (the label flow and job.json as `label` writes them): what is tested
    # here is compare on Ray, not labeling on Ray.
    sky = SkySegmenter.load(tiny_models.sky, name=tiny_models.sky)
    for name, teacher in (("A", tiny_models.teacher), ("B", tiny_models.other_teacher)):
        config = LabelConfig(input=f"{inputs}/", output=str(root / name), teacher=teacher, sky=tiny_models.sky)
        store = open_store(config.output)
        job.write(store, prepare(config).spec)
        labelers = Labelers(Teacher.load(teacher, name=teacher), sky)
        for shard in sorted(inputs.glob("*.tar")):
            label_shard(ShardTask(str(shard), shard.stem), labelers, store)
    return root


@pytest.fixture(scope="module", autouse=True)
def one_ray():
    """One local Ray for this file's comparisons, each of which would otherwise start and stop
    its own (compare attaches to a Ray already up, as to --ray-address)."""
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def own_ray(one_ray):
    """No shared Ray: the test's jobs start their own, with the environment the test set."""
    import ray

    ray.shutdown()


def members(output: Path, name: str) -> dict[str, dict[str, bytes]]:
    """Every sample's members of one shard, read with tarfile (not the engine's reader)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(output / "shards" / f"{name}.tar") as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def reference(a: dict[str, bytes], b: dict[str, bytes]) -> dict:
    """The protocol written out in numpy: B the reference; least squares on valid, non-sky
    pixels of both with B > 0; depths; AbsRel and δ1; Pearson; sky IoU."""
    disp = lambda m: np.asarray(Image.open(io.BytesIO(m["disp.png"])), dtype=np.float64) / 65535  # noqa: E731
    da, db = disp(a), disp(b)
    mask_of = lambda m, name, absent: (np.asarray(Image.open(io.BytesIO(m[name]))) > 0  # noqa: E731
                                       if name in m else np.full(da.shape, absent))
    sa, sb = mask_of(a, "sky.png", False), mask_of(b, "sky.png", False)
    valid = mask_of(a, "valid.png", True) & mask_of(b, "valid.png", True)
    mask = ~sa & ~sb & valid & (db > 0)
    p, t = da[mask], db[mask]
    (scale, shift), *_ = np.linalg.lstsq(np.stack([p, np.ones_like(p)], 1), t, rcond=None)
    aligned = np.maximum(scale * p + shift, t.min())
    depth_p, depth_t = 1 / aligned, 1 / t
    ratio = np.maximum(depth_p / depth_t, depth_t / depth_p)
    union = (sa | sb).sum()
    return {"abs_rel": np.mean(np.abs(depth_p - depth_t) / depth_t), "delta1": np.mean(ratio < 1.25),
            "scale": scale, "shift": shift, "pearson": np.corrcoef(da[~sa & ~sb & valid], db[~sa & ~sb & valid])[0, 1],
            "sky_iou": (sa & sb).sum() / union if union else 1.0}


def rows_of(path: Path) -> dict[tuple[str, str], dict]:
    return {(r["shard"], r["key"]): r for r in pq.read_table(path).to_pylist()}


def ok_keys(output: Path) -> set[tuple[str, str]]:
    keys = set()
    for part in (output / "manifest").glob("*.parquet"):
        t = decode_part(part.read_bytes()).to_pylist()
        keys |= {(part.stem, r["key"]) for r in t if r["status"] == "ok"}
    return keys


def test_an_output_against_itself(pair, tmp_path):
    r = compare(CompareConfig(a=str(pair / "A"), b=str(pair / "A"), out=str(tmp_path / "self.parquet"),
                              progress=False))
    rows = rows_of(tmp_path / "self.parquet")
    assert set(rows) == ok_keys(pair / "A") and r["counts"]["compared"] == len(rows) == 60
    for row in rows.values():
        assert row["abs_rel"] == pytest.approx(0, abs=1e-12) and row["delta1"] == 1 and row["sky_iou"] == 1
        assert row["scale"] == pytest.approx(1) and not row["inverted"] and not row["disagree"]
    assert r["counts"]["error_a"] == r["counts"]["error_b"] == len(bad_members())
    assert r["counts"]["only_a"] == r["counts"]["only_b"] == 0


def test_two_teachers_equal_numpy_for_every_pair(pair, tmp_path, capsys):
    out, html = tmp_path / "ab.parquet", tmp_path / "ab.html"
    code = main(["compare", str(pair / "A"), str(pair / "B"), "--out", str(out), "--html", str(html),
                 "--worst", "5"])
    assert code == 0, capsys.readouterr().err
    rows = rows_of(out)
    assert set(rows) == ok_keys(pair / "A")
    for name in ("shard-000000", "shard-000001"):
        a, b = members(pair / "A", name), members(pair / "B", name)
        for key in (k for k in a if (name, k) in rows):
            want, got = reference(a[key], b[key]), rows[(name, key)]
            for figure, value in want.items():
                assert got[figure] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key, figure)
    printed = capsys.readouterr().out
    assert "60 pairs compared" in printed and f"error rows: {len(bad_members())} in A" in printed
    assert html.read_text().count("<tr") >= 5


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unmatched_and_failed_shards_are_counted(pair, tmp_path):
    """B without shard 0 and without one key of shard 1, plus a shard A lacks; A's copy with
    one tar gone: that shard fails (exit 3), the others are compared and written."""
    b = copy(pair / "B", tmp_path / "B")
    (b / "manifest" / "shard-000000.parquet").unlink()
    part = b / "manifest" / "shard-000001.parquet"
    table = decode_part(part.read_bytes())
    dropped = table["key"][0].as_py()
    pq.write_table(table.slice(1), part)
    shutil.copy(part, b / "manifest" / "shard-000009.parquet")
    r = compare(CompareConfig(a=str(pair / "A"), b=str(b), progress=False))
    c = r["counts"]
    assert c["only_a"] == 30 + 1 and c["only_b"] == table.num_rows - 1
    assert c["compared"] == 30 - 1 and dropped not in {w["key"] for w in r["worst"]}
    a = copy(pair / "A", tmp_path / "A")
    (a / "shards" / "shard-000001.tar").unlink()
    code = main(["compare", str(a), str(pair / "B"), "--out", str(tmp_path / "part.parquet"),
                 "--max-attempts", "1", "--json"])
    assert code == 3
    assert {k[0] for k in rows_of(tmp_path / "part.parquet")} == {"shard-000000"}


def test_refusals_are_one_line(pair, tmp_path, capsys):
    for argv, needle in (
        (["compare", str(tmp_path / "nothing"), str(pair / "B")], "is not a depth-engine OUTPUT"),
        (["compare", str(pair / "A"), str(tmp_path / "nothing")], "neither a depth-engine OUTPUT nor a teacher"),
        (["compare", str(pair / "A"), str(pair / "B"), "--sample", "0"], "--sample must be a fraction"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
    assert not (tmp_path / "nothing").exists()


def test_a_teacher_on_the_fly_equals_the_output_it_labels(pair, tiny_models, tmp_path):
    stored = compare(CompareConfig(a=str(pair / "A"), b=str(pair / "B"), out=str(tmp_path / "b.parquet"),
                                   progress=False))
    live = compare(CompareConfig(a=str(pair / "A"), b=tiny_models.other_teacher, out=str(tmp_path / "t.parquet"),
                                 progress=False))
    assert live["b_kind"] == "teacher" and live["counts"]["compared"] == stored["counts"]["compared"]
    want, got = rows_of(tmp_path / "b.parquet"), rows_of(tmp_path / "t.parquet")
    assert set(want) == set(got)
    # Equal up to float noise: B was labeled by one 2-thread actor, the teacher now runs in
    # 1-thread actors on other batch-mates, so sums round differently (a 16-bit level at most).
    for k, row in want.items():
        for figure in ("abs_rel", "delta1", "scale", "shift", "pearson", "sky_iou"):
            assert got[k][figure] == pytest.approx(row[figure], rel=1e-4, abs=1e-6), (k, figure)


def _upload(s3, bucket: str, local: Path, prefix: str) -> str:
    for f in local.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local)}")
    return f"s3://{bucket}/{prefix}/"


def test_an_interrupted_comparison_leaves_no_rows_file(pair, tmp_path, monkeypatch):
    """Ctrl-C (here: raised by the driver after the first shard) stops the actors and leaves
    neither --out nor its temporary file; a rerun writes it whole."""
    from pipelines.compare import CompareSummary

    real_add = CompareSummary.add

    def interrupted(self, result):
        real_add(self, result)
        raise KeyboardInterrupt

    monkeypatch.setattr(CompareSummary, "add", interrupted)
    out = tmp_path / "rows" / "cmp.parquet"
    out.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        compare(CompareConfig(a=str(pair / "A"), b=str(pair / "B"), out=str(out), progress=False))
    assert list(out.parent.iterdir()) == []
    monkeypatch.setattr(CompareSummary, "add", real_add)
    compare(CompareConfig(a=str(pair / "A"), b=str(pair / "B"), out=str(out), progress=False))
    assert set(rows_of(out)) == ok_keys(pair / "A")


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_a_ground_truth_output_as_the_reference(tmp_path, tiny_models):
    """B a convert-gt OUTPUT (valid.png, no sky.png): every pair against numpy, invalid
    pixels left out, A's sky against B's none."""
    from labelers.ground_truth import GroundTruthRule

    inputs = tmp_path / "in"
    inputs.mkdir()
    samples = photo_samples(SIZES * 4, "g")
    rng = np.random.default_rng(3)
    for s_ in samples:
        h, w = np.asarray(Image.open(io.BytesIO(s_["jpg"]))).shape[:2]
        depth = np.linspace(1.0, 20.0, h * w).reshape(h, w) * rng.uniform(0.9, 1.1, (h, w))
        depth[: h // 5] = 0                                                   # no ground truth there
        s_["depth.npy"] = _npy(depth.astype(np.float32))
    write_shard(inputs / "shard-000000.tar", samples)
    label(LabelConfig(input=f"{inputs}/", output=str(tmp_path / "A"), teacher=tiny_models.teacher,
                      sky=tiny_models.sky, workers=1, progress=False))
    label(LabelConfig(input=f"{inputs}/", output=str(tmp_path / "G"), teacher=None, sky=None,
                      ground_truth=GroundTruthRule(), workers=1, progress=False))
    out = tmp_path / "ag.parquet"
    compare(CompareConfig(a=str(tmp_path / "A"), b=str(tmp_path / "G"), out=str(out), progress=False))
    rows = rows_of(out)
    assert len(rows) == len(samples)
    a, g = members(tmp_path / "A", "shard-000000"), members(tmp_path / "G", "shard-000000")
    assert all("valid.png" in m and "sky.png" not in m for m in g.values())
    for (name, key), got in rows.items():
        for figure, value in reference(a[key], g[key]).items():
            assert got[figure] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, figure)


# The two tests below change the environment Ray's workers must see (an S3 endpoint, a plugin's
# path), and a Ray keeps the environment it started with: each starts its own, so they come last.

def test_on_s3_a_tenth_reads_a_tenth(pair, job_s3_bucket, own_ray):
    s3 = boto3.client("s3")
    a, b = _upload(s3, job_s3_bucket, pair / "A", "A"), _upload(s3, job_s3_bucket, pair / "B", "B")
    full = compare(CompareConfig(a=a, b=b, progress=False))
    tenth = compare(CompareConfig(a=a, b=b, sample=0.1, progress=False))
    again = compare(CompareConfig(a=a, b=b, sample=0.1, progress=False))
    assert full["counts"]["compared"] == 60
    assert 1 <= tenth["counts"]["compared"] <= 15
    assert [w["key"] for w in tenth["worst"]] == [w["key"] for w in again["worst"]]   # deterministic
    label_bytes = tenth["bytes"]["labels"] / full["bytes"]["labels"]
    gets = tenth["s3_requests"]["GetObject"] / full["s3_requests"]["GetObject"]
    assert 0.03 < label_bytes < 0.25 and gets < 0.3, (label_bytes, gets)


def test_a_plugin_teacher_on_the_fly_equals_the_output_it_labels(pair, tiny_models, tmp_path, monkeypatch, own_ray):
    """B a teacher plugin (plugin:NAME:ARG): the same figures as the OUTPUT it labeled."""
    import os
    import sys

    site = Path(__file__).parent / "plugin_site"
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    import tiny_depth_plugin

    weights = tiny_depth_plugin.save_weights(tmp_path / "tiny.safetensors")
    teacher = f"plugin:tiny:{weights}"
    label(LabelConfig(input=f"{pair}/in/", output=str(tmp_path / "P"), teacher=teacher, sky=tiny_models.sky,
                      workers=1, progress=False))
    stored = compare(CompareConfig(a=str(pair / "A"), b=str(tmp_path / "P"), out=str(tmp_path / "p.parquet"),
                                   progress=False))
    live = compare(CompareConfig(a=str(pair / "A"), b=teacher, out=str(tmp_path / "l.parquet"), progress=False))
    assert live["b_kind"] == "teacher" and live["counts"]["compared"] == stored["counts"]["compared"] == 60
    want, got = rows_of(tmp_path / "p.parquet"), rows_of(tmp_path / "l.parquet")
    assert set(want) == set(got)
    for k, row in want.items():
        for figure in ("abs_rel", "delta1", "scale", "shift", "pearson", "sky_iou"):
            assert got[k][figure] == pytest.approx(row[figure], rel=1e-4, abs=1e-6), (k, figure)
    sys.modules.pop("tiny_depth_plugin", None)
