"""The compare flow in-process (no Ray, local stores): two real OUTPUTs of the same input,
labeled by two tiny random teachers, compared pair by pair against a numpy computation written
here from the PNG bytes; distorted, inverted and sky-less labels flagged; every sampled row
accounted for; a deterministic draw that reads a fraction of the bytes; a teacher on the fly
equal to the OUTPUT it labels."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import encode, photo_samples, write_shard
from PIL import Image

from engine.bench.synthetic import scene
from labelers.sky import SkySegmenter
from labelers.teacher import Teacher
from pipelines.compare import ROW_SCHEMA, TEACHER, compare_shard
from pipelines.compare_figures import NO_OVERLAP, beyond, compare_labels, sampled
from pipelines.compare_summary import CompareSummary
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.tasks import ShardTask
from storage import layout
from storage.sink import ShardSink
from storage.stores import open_store

NAME, SOLO = "in-000000", "in-000001"
SAME = [(48, 64)] * 12     # one size: the same batches in every labeling (no batch-mate noise)
BAD = b"this is not an image"


def _good(key: str, seed: int) -> dict:
    return {"__key__": key, "jpg": encode(scene(40, 56, seed), "JPEG", quality=95)}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models):
    """A: shards NAME and SOLO labeled by one teacher; B: NAME (from another copy of the input,
    with other extra samples) labeled by another. A's NAME ends with broken_both (error),
    broken_a (error), broken_b (ok), only_a; B's with broken_both, broken_a (ok), broken_b
    (error), only_b."""
    root = tmp_path_factory.mktemp("compare")
    (root / "in_a").mkdir()
    (root / "in_b").mkdir()
    same = photo_samples(SAME)
    src_a = write_shard(root / "in_a" / f"{NAME}.tar", same + [
        {"__key__": "broken_both", "jpg": BAD}, {"__key__": "broken_a", "jpg": BAD},
        _good("broken_b", 1), _good("only_a", 2)])
    src_b = write_shard(root / "in_b" / f"{NAME}.tar", same + [
        {"__key__": "broken_both", "jpg": BAD}, _good("broken_a", 3),
        {"__key__": "broken_b", "jpg": BAD}, _good("only_b", 4)])
    src_solo = write_shard(root / "in_a" / f"{SOLO}.tar", photo_samples([(48, 64)] * 3, prefix="solo"))
    sky = SkySegmenter.load(tiny_models.sky, name="tiny-sky")
    label_a = Labelers(Teacher.load(tiny_models.teacher, name="teacher-a"), sky)
    label_b = Labelers(Teacher.load(tiny_models.other_teacher, name="teacher-b"), sky)
    a, b = open_store(str(root / "A")), open_store(str(root / "B"))
    for src, name in ((src_a, NAME), (src_solo, SOLO)):
        label_shard(ShardTask(src, name), label_a, a, batch_size=8, threads=2)
    label_shard(ShardTask(src_b, NAME), label_b, b, batch_size=8, threads=2)
    return {"root": root, "a": a, "b": b, "label_b": label_b, "task": ShardTask(src_a, NAME),
            "solo": ShardTask(src_solo, SOLO)}


def members_of(store, name: str) -> dict[str, dict[str, bytes]]:
    """key -> ext -> bytes of a shard, read whole with the stdlib tar reader (not by offsets)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(store.path_of(layout.shard_key(name))) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return out


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def reference(a: dict[str, bytes], b: dict[str, bytes]) -> dict:
    """The figures written out again from the PNG bytes: lstsq alignment of A to B over the
    pixels non-sky in both with B > 0, B's farthest point as the depth floor, AbsRel and δ1 in
    depth space, np.corrcoef, IoU."""
    da, db = png(a["disp.png"]) / 65535.0, png(b["disp.png"]) / 65535.0
    sa, sb = png(a["sky.png"]) == 255, png(b["sky.png"]) == 255
    both = ~sa & ~sb
    m = both & (db > 0)
    union = (sa | sb).sum()
    sky = {"sky_iou": 1.0 if union == 0 else (sa & sb).sum() / union, "sky_fraction_diff": sa.mean() - sb.mean()}
    if not m.any():      # a degenerate B (all 0): nothing to align over
        return {"status": "no_overlap", "abs_rel": None, "delta1": None, "scale": None, "pearson": None, **sky}
    (s, t), *_ = np.linalg.lstsq(np.stack([da[m], np.ones(m.sum())], axis=1), db[m], rcond=None)
    pred, gt = 1 / np.maximum(s * da[m] + t, db[m].min()), 1 / db[m]
    return {"status": "ok", "abs_rel": np.mean(np.abs(pred - gt) / gt),
            "delta1": np.mean(np.maximum(pred / gt, gt / pred) < 1.25), "scale": s, "shift": t,
            "pixels": int(m.sum()), "pearson": np.corrcoef(da[both], db[both])[0, 1], "inverted": s < 0, **sky}


def by_key(result) -> dict[str, dict]:
    return {r["key"]: r for r in result.rows}


def test_an_output_against_itself_agrees_exactly(world):
    result = compare_shard(world["task"], world["a"], world["a"], threads=2)
    assert (result.matched, result.only_a, result.only_b) == (len(SAME) + 4, 0, 0)
    assert (result.error_a, result.error_b, result.errors, result.samples) == (2, 2, 2, len(SAME) + 2)
    for row in result.rows:
        assert row["status"] == "ok" and row["abs_rel"] < 1e-12 and row["delta1"] == 1.0, row["key"]
        assert row["sky_iou"] == 1.0 and row["sky_fraction_diff"] == 0.0, row["key"]
        assert row["scale"] == pytest.approx(1.0, abs=1e-9) and row["shift"] == pytest.approx(0.0, abs=1e-9)
        assert not row["disagree"] and not row["inverted"]
    summary = CompareSummary()
    summary.add(result)
    report = summary.to_json()
    assert report["counts"]["disagree"] == 0 and report["figures"]["delta1"]["p05"] == 1.0
    assert report["figures"]["abs_rel"]["n"] == len(SAME) + 2 and report["figures"]["abs_rel"]["p95"] < 1e-12


def test_figures_equal_an_independent_numpy_computation(world):
    result = compare_shard(world["task"], world["a"], world["b"], threads=2)
    tar_a, tar_b = members_of(world["a"], NAME), members_of(world["b"], NAME)
    rows = by_key(result)
    assert set(rows) == {f"img{i:04d}" for i in range(len(SAME))}
    flat_b = {r["key"] for r in pq.read_table(world["b"].path_of(layout.manifest_key(NAME))).to_pylist()
              if r["degenerate"]}         # a random teacher's all-0 labels: nothing to align over
    assert {k for k, r in rows.items() if r["status"] == NO_OVERLAP} == flat_b & set(rows)
    for key, row in rows.items():
        want = reference(tar_a[key], tar_b[key])
        for figure, value in want.items():
            if value is None or isinstance(value, str):
                assert row[figure] == value, (key, figure)
            else:
                assert row[figure] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, figure)
        assert row["disagree"] == bool(beyond(row))
    assert all(set(r) == {*ROW_SCHEMA.names, "members"} for r in result.rows)
    table = pa.Table.from_pylist([{k: r[k] for k in ROW_SCHEMA.names} for r in result.rows], schema=ROW_SCHEMA)
    assert table.to_pylist() == [{k: r[k] for k in ROW_SCHEMA.names} for r in result.rows]   # --out loses nothing
    for key, row in rows.items():
        assert (row["shard_a"], row["shard_b"]) == (f"{NAME}.tar", f"{NAME}.tar")
        assert row["source_a"].endswith(f"in_a/{NAME}.tar") and row["source_b"].endswith(f"in_b/{NAME}.tar")
        places = row["members"]                               # where a contact sheet finds them
        assert places["image"]["name"] == f"{key}.jpg"
        for side, tar in (("a", tar_a), ("b", tar_b)):
            assert places[f"disp_{side}"]["name"] == f"{key}.disp.png"
            with open(world[side].path_of(layout.shard_key(NAME)), "rb") as f:
                f.seek(places[f"sky_{side}"]["offset"])
                assert f.read(places[f"sky_{side}"]["size"]) == tar[key]["sky.png"]


def test_unmatched_and_error_rows_are_counted_apart(world):
    a, b = world["a"], world["b"]
    result = compare_shard(world["task"], a, b, threads=2)
    assert (result.matched, result.only_a, result.only_b) == (len(SAME) + 3, 1, 1)     # only_a / only_b
    assert (result.error_a, result.error_b, result.errors) == (2, 2, 3)                # broken_both in both
    assert result.samples == len(result.rows) == len(SAME)
    solo = compare_shard(world["solo"], a, b, threads=2)                    # no such shard in B
    assert (solo.matched, solo.only_a, solo.only_b, solo.samples, solo.bytes_read) == (0, 3, 0, 0, 0)
    reverse = compare_shard(world["solo"], b, a, threads=2)
    assert (reverse.only_a, reverse.only_b) == (0, 3)
    summary = CompareSummary()
    for r in (result, solo):
        summary.add(r)
    report = summary.to_json()
    c = report["counts"]
    assert (c["shards"], c["matched"], c["only_a"], c["only_b"]) == (2, len(SAME) + 3, 4, 1)
    assert (c["error_a"], c["error_b"], c["errors"], c["compared"]) == (2, 2, 3, len(SAME))
    assert report["bytes"]["labels"] == result.bytes_read and report["bytes"]["images"] == 0
    assert [s["shard"] for s in report["per_shard"]] == [NAME, SOLO]
    assert report["per_shard"][1]["pairs"] == 0 and report["per_shard"][1]["abs_rel"] is None


def rewrite(src, dst, name: str, change: dict) -> None:
    """A copy of shard ``name`` of OUTPUT ``src`` into ``dst`` with some members replaced
    (``change``: key -> {ext: new bytes}), written by the shard sink so the offsets are new."""
    tar = members_of(src, name)
    rows = pq.read_table(src.path_of(layout.manifest_key(name))).to_pylist()
    with ShardSink(dst, name) as sink:
        for row in rows:
            members = {**tar[row["key"]], **change.get(row["key"], {})} if row["status"] == "ok" else {}
            kept = {k: v for k, v in row.items() if k not in ("members", "shard", "tar_size", "labeled_at")}
            sink.add(row["key"], members, kept)
        assert sink.commit({"source_kind": "pseudo", "worker": "test", "attempt": 1}, owner={"worker": "test"})


def png16(d: np.ndarray) -> bytes:
    return encode(Image.fromarray(np.rint(np.clip(d, 0, 1) * 65535).astype(np.uint16)), "PNG")


def test_distorted_inverted_and_skyless_labels_are_flagged(world, tmp_path):
    a = world["a"]
    tar = members_of(a, NAME)
    disp = {k: png(tar[k]["disp.png"]) / 65535.0 for k in ("img0003", "img0007")}
    sky7 = png(tar["img0007"]["sky.png"]) == 255
    assert (png(tar["img0011"]["sky.png"]) == 255).mean() > 0.05
    bent = open_store(str(tmp_path / "bent"))
    rewrite(a, bent, NAME, {
        "img0003": {"disp.png": png16(disp["img0003"] ** 6)},                           # not affine
        "img0007": {"disp.png": png16(np.where(sky7, 0.0, 1.0 - disp["img0007"]))},     # near is far
        "img0011": {"sky.png": encode(np.zeros((48, 64), np.uint8), "PNG")},            # no sky
    })
    result = compare_shard(world["task"], a, bent, threads=2)
    rows = by_key(result)
    assert rows["img0003"]["disagree"] and "abs_rel" in beyond(rows["img0003"]) and not rows["img0003"]["inverted"]
    assert rows["img0007"]["inverted"] and rows["img0007"]["scale"] < 0 and rows["img0007"]["disagree"]
    assert rows["img0011"]["sky_iou"] == 0.0 and beyond(rows["img0011"]) == ["sky_iou"]
    assert rows["img0011"]["abs_rel"] < 1e-12            # the depth still agrees off the sky
    assert [k for k, r in rows.items() if r["disagree"]] == ["img0003", "img0007", "img0011"]
    summary = CompareSummary(worst=2)
    summary.add(result)
    report = summary.to_json()
    assert [w["key"] for w in report["worst"]] == ["img0007", "img0003"]   # inverted first
    assert report["worst"][0]["members"]["disp_b"]["name"] == "img0007.disp.png"
    assert (report["counts"]["disagree"], report["counts"]["inverted"], report["beyond"]["sky_iou"]) == (3, 1, 1)
    assert report["beyond"]["abs_rel"] >= 1


def synthetic_pair(root, n: int = 60) -> tuple:
    """Two OUTPUTs of one shard of ``n`` samples with random labels, written by the shard sink
    without a model (a draw needs many samples, not real ones)."""
    rng = np.random.default_rng(0)
    sky = np.zeros((32, 32), bool)
    sky[:8] = True
    stores = []
    for side in "ab":
        store = open_store(str(root / side))
        with ShardSink(store, "syn-000000") as sink:
            for i in range(n):
                members = {"jpg": encode(scene(32, 32, i), "JPEG"),
                           "disp.png": png16(np.where(sky, 0, rng.random(sky.shape))),
                           "sky.png": encode(np.where(sky, 255, 0).astype(np.uint8), "PNG")}
                sink.add(f"k{i:03d}", members, {"key": f"k{i:03d}", "source": "/in/syn-000000.tar", "status": "ok"})
            assert sink.commit({"source_kind": "pseudo", "worker": "test", "attempt": 1}, owner={"worker": "test"})
        stores.append(store)
    return stores


def test_a_sample_fraction_is_deterministic_and_reads_a_fraction_of_the_bytes(tmp_path):
    a, b = synthetic_pair(tmp_path)
    task = ShardTask("/in/syn-000000.tar", "syn-000000")
    full = compare_shard(task, a, b, threads=2)
    labels = [len(members_of(store, "syn-000000")[f"k{i:03d}"][ext]) for store in (a, b)
              for i in range(60) for ext in ("disp.png", "sky.png")]
    assert full.samples == 60 and full.bytes_read == sum(labels)     # the label members only
    tenth = compare_shard(task, a, b, fraction=0.1, threads=2)
    again = compare_shard(task, a, b, fraction=0.1, threads=2)
    keys = [r["key"] for r in tenth.rows]
    assert keys == [r["key"] for r in again.rows]
    assert keys == [r["key"] for r in full.rows if sampled("syn-000000", r["key"], 0.1)]
    assert 2 <= len(keys) <= 15 and tenth.matched == len(keys)
    assert 0.03 <= tenth.bytes_read / full.bytes_read <= 0.25
    assert tenth.manifest_bytes == full.manifest_bytes       # the parts are read whole
    assert compare_shard(task, a, b, fraction=0.0, threads=2).bytes_read == 0


def test_a_teacher_on_the_fly_equals_the_output_it_labeled(world):
    stored = by_key(compare_shard(world["task"], world["a"], world["b"], threads=2))
    live = compare_shard(world["task"], world["a"], None, labelers=world["label_b"], batch_size=8, threads=2)
    assert (live.matched, live.only_a, live.only_b, live.error_a, live.error_b) == (len(SAME) + 4, 0, 0, 2, 0)
    rows = by_key(live)
    assert live.samples == len(rows) == len(SAME) + 2 and set(stored) < set(rows)
    for key, want in stored.items():
        got = rows[key]
        assert (got["source_b"], got["shard_b"], got["members"]["disp_b"]) == (TEACHER, TEACHER, None)
        assert got["status"] == want["status"]
        for figure in ("abs_rel", "delta1", "scale", "shift", "pearson", "sky_iou", "sky_fraction_diff"):
            if want[figure] is None:
                assert got[figure] is None, (key, figure)
            else:
                assert got[figure] == pytest.approx(want[figure], abs=1e-9), (key, figure)
    tar = members_of(world["a"], NAME)
    assert live.image_bytes == sum(len(tar[k]["jpg"]) for k in rows)           # A's images, read once
    assert live.bytes_read == live.image_bytes + sum(len(tar[k][e]) for k in rows for e in ("disp.png", "sky.png"))


# -- the pure part -----------------------------------------------------------------------------------

def test_compare_labels_edge_cases():
    d = np.linspace(0.1, 1.0, 12).reshape(3, 4)
    with pytest.raises(ValueError, match=r"A \(3, 4\), B \(4, 3\)"):
        compare_labels(d, d.T, None, None)
    same = compare_labels(d, d, None, None)
    assert same.sky_iou is None and same.sky_fraction_a is None and same.abs_rel < 1e-12
    empty = np.zeros(d.shape, bool)
    assert compare_labels(d, d, empty, empty).sky_iou == 1.0            # both empty: they agree
    sky = np.zeros(d.shape, bool)
    sky[0] = True
    one_sided = compare_labels(d, d, sky, None)                         # None: no sky pixel
    assert (one_sided.sky_iou, one_sided.sky_fraction_b, one_sided.sky_fraction_diff) == (0.0, 0.0, 4 / 12)
    assert one_sided.disagree and one_sided.abs_rel < 1e-12
    none = compare_labels(d, np.zeros_like(d), None, None)              # B has no pixel > 0
    assert none.status == NO_OVERLAP and none.abs_rel is None and not none.disagree
    assert compare_labels(d, d, None, None, valid_a=empty).status == NO_OVERLAP
    flat = compare_labels(np.full(d.shape, 0.5), d, None, None)
    assert flat.pearson is None and flat.scale == 0.0


def test_sampled_is_stable_and_bounded():
    keys = [f"k{i}" for i in range(2000)]
    assert all(sampled("s", k, 1.0) for k in keys) and not any(sampled("s", k, 0.0) for k in keys)
    draw = [k for k in keys if sampled("s", k, 0.1)]
    assert 150 < len(draw) < 250 and draw == [k for k in keys if sampled("s", k, 0.1)]
    assert set(draw) <= {k for k in keys if sampled("s", k, 0.5)}        # a larger draw holds a smaller
    with pytest.raises(ValueError):
        sampled("s", "k", 1.5)
