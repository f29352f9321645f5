"""Ground truth in the label format (SPEC §5.5) and the zero-shot metrics, in-process: readers
of every format, the validity rule, the conversion of an analytic scene checked pixel by pixel,
and evaluation with a teacher test double that knows the exact disparity."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from builders import write_shard
from helpers_models import reference_metrics
from PIL import Image
from scenes import ExactTeacher, exr, npy, pfm, png, render, with_invalid

from labelers.ground_truth import (
    GroundTruthError,
    GroundTruthRule,
    decode_ground_truth,
    find_member,
    read_values,
    to_disparity,
)
from labelers.prediction import Prediction
from pipelines.audit import audit
from pipelines.evaluate import evaluate_shard, summarize
from pipelines.metrics import align_scale_shift, evaluate_disparity
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.tasks import ShardTask
from storage.manifest import dataset
from storage.stores import open_store


def png16(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


# -- readers and the validity rule -----------------------------------------------------------

def test_every_format_reads_the_same_values(tmp_path):
    rng = np.random.default_rng(0)
    mm = rng.integers(0, 20000, (23, 37)).astype(np.float64)   # NYU-style millimetres
    assert np.array_equal(read_values("png", png16(mm)), mm)
    assert np.array_equal(read_values("npy", npy(mm)), mm)
    assert np.array_equal(read_values("pfm", pfm(mm)), mm)
    assert np.array_equal(read_values("exr", exr(mm, tmp_path)), mm)
    assert np.array_equal(read_values("npy", npy(mm[..., None].astype(np.float32))), mm)


def test_validity_rule_scale_and_max_depth():
    stored = np.array([[0, 256, 512, 2560], [np.nan, np.inf, -256, 25600]])
    disparity, valid = to_disparity(stored, "depth", GroundTruthRule(scale=256, max_depth=50))
    assert valid.tolist() == [[False, True, True, True], [False, False, False, False]]  # 100 m > 50 m
    assert np.allclose(disparity[valid], [1.0, 0.5, 0.1])
    assert np.isnan(disparity[~valid]).all()
    d2, v2 = to_disparity(stored, "disparity", GroundTruthRule(scale=256))
    assert v2.tolist() == [[False, True, True, True], [False, False, False, True]]
    assert np.allclose(d2[v2], [1, 2, 10, 100])
    with pytest.raises(GroundTruthError, match="metric depth"):
        to_disparity(stored, "disparity", GroundTruthRule(max_depth=10))
    for bad in ({"scale": 0}, {"scale": -1}, {"max_depth": 0}, {"scale": float("nan")}):
        with pytest.raises(ValueError):
            GroundTruthRule(**bad)


def test_member_lookup_and_clear_refusals():
    assert find_member({"json": b"{}", "depth.png": b""}) == ("depth.png", "depth", "png")
    assert find_member({"Disparity.NPY": b""}) == ("Disparity.NPY", "disparity", "npy")
    assert find_member({"json": b"{}", "txt": b""}) is None
    with pytest.raises(GroundTruthError, match="more than one"):
        find_member({"depth.png": b"", "disparity.npy": b""})
    with pytest.raises(GroundTruthError, match="not one of"):
        find_member({"depth.tiff": b""})
    with pytest.raises(GroundTruthError, match="cannot read npy"):
        read_values("npy", b"not numpy")
    with pytest.raises(GroundTruthError, match="single-channel"):
        read_values("png", png(np.zeros((4, 4, 3), np.uint8)))
    with pytest.raises(GroundTruthError, match="single-channel HxW"):
        read_values("npy", npy(np.zeros((2, 3, 4))))
    with pytest.raises(GroundTruthError, match="is 5x4 .WxH., the image is 4x5"):
        decode_ground_truth({"depth.npy": npy(np.ones((4, 5)))}, GroundTruthRule(), (5, 4))


# -- metrics against an independent computation --------------------------------------------

def test_alignment_and_metrics_match_lstsq():
    rng = np.random.default_rng(1)
    _, depth = render(40, 60, seed=3)
    gt = 1 / depth
    valid = rng.random(gt.shape) > 0.2
    pred = 2.5 * gt - 0.05 + rng.normal(0, 0.1, gt.shape)
    m = evaluate_disparity(pred, gt, valid)
    abs_rel, delta1, s, b = reference_metrics(pred, gt, valid)
    assert (m.scale, m.shift) == pytest.approx((s, b), rel=1e-9)
    assert m.abs_rel == pytest.approx(abs_rel, rel=1e-9) and m.delta1 == pytest.approx(delta1, rel=1e-12)
    assert m.pixels == valid.sum() and 0.01 < m.abs_rel < 0.5 and m.delta1 < 1
    assert align_scale_shift(np.full((3, 3), 4.0), gt[:3, :3], np.ones((3, 3), bool)) == (0.0, gt[:3, :3].mean())
    capped = evaluate_disparity(pred, gt, valid, max_depth=5.0)
    assert capped.abs_rel == pytest.approx(reference_metrics(pred, gt, valid, 5.0)[0], rel=1e-9)


# -- the analytic scene, converted and evaluated ---------------------------------------------

@pytest.fixture(scope="module")
def scene_shard(tmp_path_factory):
    """Four scenes, one per ground-truth format, with sensor holes; depth in metres (the png in
    millimetres, as NYUv2 stores it)."""
    root = tmp_path_factory.mktemp("scene")
    samples, truth = [], {}
    for i, (fmt, (h, w)) in enumerate(zip(["npy", "png", "pfm", "exr"], [(96, 128), (80, 150), (120, 90), (64, 64)])):
        image, depth = render(h, w, seed=i)
        gt = with_invalid(depth)
        if fmt == "png":
            mm = np.nan_to_num(np.rint(gt * 1000), nan=0, posinf=0)
            data, stored = png16(mm), mm / 1000
        elif fmt == "npy":
            data, stored = npy(gt), gt
        else:
            data = pfm(gt) if fmt == "pfm" else exr(gt, root)
            stored = gt.astype(np.float32).astype(np.float64)
        key = f"scene{i}"
        samples.append({"__key__": key, "png": png(image), f"depth.{fmt}": data, "json": {"scene": i}})
        truth[key] = (image, depth, stored)   # `stored`: the metres the member holds, as written
    units = {"scene1": 1000.0}                # stored values per metre (1 for the others)
    samples.append({"__key__": "nogt", "png": png(render(32, 32)[0])})
    samples.append({"__key__": "badgt", "png": png(render(32, 32)[0]), "depth.npy": npy(np.ones((8, 8)))})
    return write_shard(root / "scenes-000000.tar", samples), truth, units


def convert(src: str, out: str, rule: GroundTruthRule = GroundTruthRule()) -> None:
    label_shard(ShardTask(src, "scenes-000000"), Labelers(None, None, rule), open_store(out), batch_size=2, threads=2)


def read_tar(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_conversion_matches_the_label_definition(scene_shard, tmp_path):
    src, truth, units = scene_shard
    convert(src, str(tmp_path / "out"))
    rows = {r["key"]: r for r in dataset(open_store(str(tmp_path / "out"))).to_table().to_pylist()}
    members = read_tar(tmp_path / "out" / "shards" / "scenes-000000.tar")
    assert rows["nogt"]["status"] == "error" and "no ground-truth member" in rows["nogt"]["error"]
    assert rows["badgt"]["status"] == "error" and "8x8" in rows["badgt"]["error"]
    for key, (image, depth, gt) in truth.items():
        row = rows[key]
        assert (row["status"], row["source_kind"], row["teacher"]) == ("ok", "gt", "ground-truth")
        valid = np.isfinite(gt) & (gt > 0)
        disp = np.where(valid, 1 / np.where(valid, gt, 1), 0)
        lo, hi = disp[valid].min(), disp[valid].max()
        expected = np.where(valid, (disp - lo) / (hi - lo), 0)
        label = np.asarray(Image.open(io.BytesIO(members[f"{key}.disp.png"])), np.float64) / 65535
        stored_valid = np.asarray(Image.open(io.BytesIO(members[f"{key}.valid.png"]))) == 255
        assert np.array_equal(stored_valid, valid)
        assert np.abs(label - expected).max() <= 0.5 / 65535 + 1e-6   # float32, then 16 bits
        unit = units.get(key, 1.0)        # the default --gt-scale 1 reads the png as 1/mm
        assert (row["disp_min"], row["disp_max"]) == pytest.approx((lo / unit, hi / unit), rel=1e-6)
        assert row["valid_fraction"] == pytest.approx(valid.mean(), rel=1e-6)
        assert members[f"{key}.png"] == png(image)          # the image, unchanged
        gt_member = [m["name"] for m in row["members"] if ".depth." in m["name"]]
        assert len(gt_member) == 1                           # the ground truth is carried too


def test_audit_of_a_conversion_counts_kinds_and_flags_sparse_ground_truth(scene_shard, tmp_path):
    src, truth, units = scene_shard
    image, depth = render(60, 80, seed=7)
    sparse = np.zeros_like(depth)
    sparse[::5, ::5] = depth[::5, ::5]                    # lidar-like: 4 % of the pixels
    extra = write_shard(tmp_path / "sparse.tar", [{"__key__": "sparse", "png": png(image), "depth.npy": npy(sparse)}])
    out = open_store(str(tmp_path / "out"))
    for shard, name in ((src, "scenes-000000"), (extra, "sparse")):
        label_shard(ShardTask(shard, name), Labelers(None, None, GroundTruthRule()), out)
    r = audit(out)
    rows = [x for x in dataset(out).to_table().to_pylist() if x["status"] == "ok"]
    fractions = np.array([x["valid_fraction"] for x in rows])
    assert r["source_kind"] == {"gt": 7}
    assert r["valid_fraction"]["count"] == 5 and r["valid_fraction"]["mean"] == pytest.approx(fractions.mean(), abs=1e-4)
    assert r["valid_fraction"]["min"] == pytest.approx(0.04, abs=1e-4)
    assert r["flags"]["samples"]["low_valid"] == {"count": 1, "samples": [{"shard": "sparse.tar", "key": "sparse"}]}


def test_max_depth_marks_far_pixels_invalid(scene_shard, tmp_path):
    src, truth, units = scene_shard
    convert(src, str(tmp_path / "out"), GroundTruthRule(max_depth=4.0))
    members = read_tar(tmp_path / "out" / "shards" / "scenes-000000.tar")
    _, depth, gt = truth["scene0"]
    stored_valid = np.asarray(Image.open(io.BytesIO(members["scene0.valid.png"]))) == 255
    assert np.array_equal(stored_valid, np.isfinite(gt) & (gt > 0) & (gt <= 4.0))
    assert 0 < stored_valid.mean() < 0.9


@pytest.mark.parametrize("scale, shift", [(1.0, 0.0), (3.7, 0.25), (0.02, -0.001)])
def test_exact_teacher_scores_zero_under_any_scale_and_shift(scene_shard, tmp_path, scale, shift):
    src, truth, units = scene_shard
    out = tmp_path / "out"
    convert(src, str(out))
    teacher = ExactTeacher([(image, 1 / depth) for image, depth, _ in truth.values()], scale, shift)
    # The INPUT (with its bad samples), then the OUTPUT (where they are manifest rows only).
    for shard, counts in ((src, (4, 1, 1)), (str(out / "shards" / "scenes-000000.tar"), (4, 0, 0))):
        result = evaluate_shard(ShardTask(shard, "scenes-000000"), teacher, batch_size=2, threads=2)
        summary = summarize(result.rows)
        assert (summary["scored"], summary["errors"], summary["skipped"]) == counts
        # ~0: float32 predictions, and the png's whole millimetres (1e-4 relative at 5 m).
        assert summary["teacher"]["abs_rel"] < 1e-4 and summary["teacher"]["delta1"] == 1.0
        for row in result.rows:
            if row["status"] == "ok":
                unit = units.get(row["key"], 1.0)    # ground truth in 1/mm for the png
                assert row["teacher"]["scale"] == pytest.approx(1 / scale / unit, rel=1e-4)
    # The converted label itself, scored against the ground truth it came from: only the
    # 16-bit rounding separates them.
    assert summary["label"]["samples"] == 4 and summary["label"]["abs_rel"] < 1e-3
    assert summary["label"]["delta1"] == 1.0


def test_noisy_teacher_matches_an_independent_computation(scene_shard):
    src, truth, units = scene_shard
    teacher = ExactTeacher([(image, 1 / depth) for image, depth, _ in truth.values()], 2.0, 0.1, noise=0.02)
    result = evaluate_shard(ShardTask(src, "scenes-000000"), teacher)
    got = {r["key"]: r for r in result.rows if r["status"] == "ok"}
    expected = []
    for key, (image, depth, gt) in truth.items():
        pred = teacher.returned[ExactTeacher.digest(image)]
        valid = np.isfinite(gt) & (gt > 0)
        gt_disp = np.where(valid, 1 / np.where(valid, gt, 1), np.nan)
        abs_rel, delta1, *_ = reference_metrics(pred, gt_disp, valid)
        assert got[key]["teacher"]["abs_rel"] == pytest.approx(abs_rel, rel=1e-6)
        assert got[key]["teacher"]["delta1"] == pytest.approx(delta1, abs=1e-12)
        assert got[key]["pixels"] == valid.sum()
        expected.append((abs_rel, delta1))
    summary = summarize(result.rows)["teacher"]
    assert summary["abs_rel"] == pytest.approx(np.mean([e[0] for e in expected]), rel=1e-6)
    assert summary["delta1"] == pytest.approx(np.mean([e[1] for e in expected]), rel=1e-9)
    assert 0.005 < summary["abs_rel"] < 0.5 and summary["delta1"] < 1.0


def test_a_sample_that_cannot_be_scored_is_an_error_row_and_the_rest_is_scored(scene_shard):
    src, truth, units = scene_shard
    pairs = [(image, 1 / depth) for image, depth, _ in truth.values()]

    class NanOnFirst(ExactTeacher):
        def predict(self, images):
            out = super().predict(images)
            first = self.digest(pairs[0][0])
            return [Prediction(np.full_like(p.raw, np.nan)) if self.digest(im) == first else p
                    for im, p in zip(images, out)]

    rows = {r["key"]: r for r in evaluate_shard(ShardTask(src, "scenes-000000"), NanOnFirst(pairs)).rows}
    assert rows["scene0"]["status"] == "error" and "cannot score" in rows["scene0"]["reason"]
    assert all(rows[k]["status"] == "ok" and rows[k]["teacher"]["delta1"] == 1.0 for k in ("scene1", "scene2", "scene3"))
