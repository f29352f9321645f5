"""`label --keep-depth`: a metric teacher's metres kept beside the label as `<key>.depth.png`
(16-bit, metres x 256, 0 = none: the KITTI convention), pinned in job.json, read by the
student loader with the same window as the label.

A tiny random Depth Anything *metric* model (test_teacher_output's builder) labels through the
real CLI on a local Ray; the member is read back with PIL alone and compared with the model's
own output computed here."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from builders import photo_samples, write_shard
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache
from helpers_models import pearson, reference_prediction
from PIL import Image
from test_teacher_output import save_metric_teacher

from engine.config import ConfigError, LabelConfig
from labelers.ground_truth import GroundTruthRule
from pipelines.encode import depth_png, read_depth_png
from pipelines.student.loader import DepthShards, LoaderConfig

SIZES = [(64, 96), (96, 64), (64, 64), (80, 64)]   # shorter side 64: a 64 crop is not resized
HALF_STEP = 1 / 512                                 # rounding to 1/256 m


@pytest.fixture(scope="module")
def metric_teacher(tmp_path_factory) -> str:
    return str(save_metric_teacher(tmp_path_factory.mktemp("metric") / "metric"))


def members_of(out, shard: str = "shard-000000") -> dict[str, dict]:
    return {s["__key__"]: s for s in wds.WebDataset(str(out / "shards" / f"{shard}.tar"), shardshuffle=False)}


def test_depth_png_codec():
    depth = np.array([[np.nan, np.inf, -1.0, 0.0, 1e-4, 1.0, 256.0],
                      [2.0 / 3, 255.99, 255.999, 256.5, 1e6, 7.25, 0.5]], np.float32)
    sky = np.zeros(depth.shape, bool)
    sky[1, 5] = True
    data = depth_png(depth, sky)
    with Image.open(io.BytesIO(data)) as im:          # PIL alone: what other tools see
        stored = np.asarray(im)
    assert im.mode in ("I;16", "I") and stored.dtype.kind in "iu"
    want = np.array([[0, 0, 0, 0, 1, 256, 65535], [171, 65533, 65535, 0, 0, 0, 128]])   # beyond 256 m: 0
    np.testing.assert_array_equal(stored, want)
    back = read_depth_png(data)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, want / 256)
    ok = want > 0
    clipped = (depth[ok] > 65535 / 256) | (depth[ok] < HALF_STEP)     # to 65535, or up to 1
    assert np.all(np.abs(back[ok] - depth[ok]) <= np.where(clipped, 1 / 256, HALF_STEP) + 1e-6)


def test_label_keeps_the_teachers_metres_and_the_loader_yields_them(tmp_path, tiny_models, metric_teacher):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    from labelers.teacher import Teacher

    samples = photo_samples(SIZES)
    (tmp_path / "raw").mkdir()
    write_shard(tmp_path / "raw" / "shard-000000.tar", samples)
    out = tmp_path / "out"
    summary = json.loads(run("label", f"{tmp_path}/raw/", str(out), "--teacher", metric_teacher,
                             "--sky", tiny_models.sky, "--workers", "1", "--batch-size", "4",
                             "--keep-depth", "--json", check=0).stdout)
    assert (summary["samples_ok"], summary["samples_error"]) == (len(SIZES), 0)
    label = json.loads((out / "job.json").read_text())["label"]
    assert label["keep_depth"] is True and label["teacher_output"] == "depth"

    engine_teacher = Teacher.load(metric_teacher, name="metric")            # the metres the engine had
    model = AutoModelForDepthEstimation.from_pretrained(metric_teacher).eval()
    processor = AutoImageProcessor.from_pretrained(metric_teacher)
    got = members_of(out)
    sky_seen = 0
    for s in samples:
        key = s["__key__"]
        rgb = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        with Image.open(io.BytesIO(got[key]["depth.png"])) as im:
            assert im.size == (rgb.shape[1], rgb.shape[0]) and im.mode in ("I;16", "I")
            depth = np.asarray(im).astype(np.float64) / 256
        sky = np.asarray(Image.open(io.BytesIO(got[key]["sky.png"]))) == 255
        metres = engine_teacher.predict([rgb])[0].raw.astype(np.float64)
        assert 0.05 < np.median(metres) < 20 and metres.std() > 0.5, key      # a real spread of metres
        keep = ~sky & np.isfinite(metres) & (metres > 0) & (metres < 65535 / 256)
        assert keep.mean() > 0.3, key
        assert np.abs(depth[keep] - metres[keep]).max() <= HALF_STEP + 1e-4, key
        assert np.all(depth[~keep] == 0), key                                  # sky, invalid: 0
        sky_seen += sky.sum()
        # the model's own forward, written apart from the engine (helpers_models)
        reference = reference_prediction(model, processor, rgb)
        assert pearson(depth[keep], reference[keep]) > 0.999, key
    assert sky_seen > 0                       # the tiny segmenter marks some sky, so 0 was checked there

    loaded = list(DepthShards(LoaderConfig((str(out),), crop=64, seed=1, flip=True)))
    assert sorted(s["key"] for s in loaded) == sorted(got)
    for s in loaded:
        key = s["key"]
        stored = read_depth_png(got[key]["depth.png"])
        disparity = np.asarray(Image.open(io.BytesIO(got[key]["disp.png"]))).astype(np.float32) / 65535
        assert s["depth"].dtype == s["disparity"].dtype and s["depth"].shape == (64, 64)
        crop = s["depth"].numpy()
        windows = [(t, l, m) for t in range(stored.shape[0] - 63) for l in range(stored.shape[1] - 63)
                   for m in (False, True) if np.array_equal(_window(stored, t, l, m), crop)]
        assert windows, key
        assert any(np.allclose(_window(disparity, t, l, m), s["disparity"].numpy(), atol=1e-6)
                   for t, l, m in windows), key                               # the label's window too
        assert np.all(crop[s["sky"].numpy()] == 0), key
    # The teacher's own depth is no ground truth: evaluate refuses to score it against itself.
    p = run("evaluate", str(out), "--teacher", metric_teacher, check=2)
    assert "not ground truth" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def _window(a, top, left, mirror, crop=64):
    w = a[top:top + crop, left:left + crop]
    return w[:, ::-1] if mirror else w


def test_a_disparity_teacher_is_refused_with_one_line(tmp_path, tiny_models):
    write_shard(tmp_path / "raw.tar", photo_samples([(64, 96)]))
    out = tmp_path / "out"
    p = run("label", str(tmp_path / "raw.tar"), str(out), "--teacher", tiny_models.teacher, "--sky", "none",
            "--keep-depth", check=2)
    assert "--keep-depth needs a teacher that outputs metric depth" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(ConfigError, match="ground truth"):
        LabelConfig(input="in", output="out", teacher=None, ground_truth=GroundTruthRule(), keep_depth=True)


def test_a_rerun_with_another_keep_depth_is_refused(tmp_path, metric_teacher):
    write_shard(tmp_path / "raw.tar", photo_samples([(64, 96), (80, 64)]))
    out = tmp_path / "out"
    args = ["label", str(tmp_path / "raw.tar"), str(out), "--teacher", metric_teacher, "--sky", "none",
            "--workers", "1"]
    run(*args, check=0)
    job = json.loads((out / "job.json").read_text())
    assert job["label"]["keep_depth"] is False
    assert all("depth.png" not in s for s in members_of(out, "raw").values())
    assert all("depth" not in s for s in DepthShards(LoaderConfig((str(out),), crop=32)))
    job["label"].pop("keep_depth")                  # an OUTPUT from before the field: False
    (out / "job.json").write_text(json.dumps(job))
    p = run(*args, "--keep-depth", check=2)
    assert "keep_depth: OUTPUT has false, this run asks for true" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    again = json.loads(run(*args, "--json", check=0).stdout)
    assert again["shards_skipped"] == 1


def test_convert_gt_carries_a_kitti_depth_png_under_its_name(tmp_path):
    """Ground truth in the KITTI convention keeps its name: the loader reads it like --keep-depth's."""
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 20 * 256, (64, 80)).astype(np.uint16)
    gt[:8] = 0                                                     # no ground truth there
    buf = io.BytesIO()
    Image.fromarray(gt).save(buf, format="PNG")
    sample = photo_samples([(64, 80)])[0]
    write_shard(tmp_path / "gt.tar", [{"__key__": sample["__key__"], "jpg": sample["jpg"], "depth.png": buf.getvalue()}])
    out = tmp_path / "out"
    run("convert-gt", str(tmp_path / "gt.tar"), str(out), "--gt-scale", "256", "--sky", "none", "--workers", "1",
        check=0)
    got = wds.WebDataset(str(out / "shards" / "gt.tar"), shardshuffle=False)
    member = next(iter(got))["depth.png"]
    assert member == buf.getvalue()
    np.testing.assert_array_equal(read_depth_png(member), gt / 256)
    (s,) = DepthShards(LoaderConfig((str(out),), crop=64, flip=False))
    assert any(np.array_equal(gt[:, l:l + 64] / 256, s["depth"].numpy()) for l in range(17))


def test_an_input_depth_png_is_replaced_with_a_note_and_refused_for_disparity():
    from pipelines.encode import encode
    from pipelines.sample import Sample

    metres = np.full((4, 6), 3.0, np.float32)
    models = {"teacher": "t", "teacher_output": "depth", "sky_model": "none"}
    sample = Sample("k", "src", image_ext="jpg", image_bytes=b"jpg", extras={"depth.png": b"theirs"},
                    height=4, width=6, raw=metres)
    enc = encode(sample, models, keep_depth=True)
    np.testing.assert_array_equal(read_depth_png(enc.members["depth.png"]), metres)
    assert "input depth.png replaced by the teacher's depth (--keep-depth)" in enc.row["notes"]
    plain = encode(Sample("k", "src", image_ext="jpg", image_bytes=b"jpg", extras={"depth.png": b"theirs"},
                          height=4, width=6, raw=metres), models)
    assert plain.members["depth.png"] == b"theirs" and plain.row["notes"] is None   # carried through
    with pytest.raises(ValueError, match="keep_depth needs"):
        encode(Sample("k", "src", image_ext="jpg", image_bytes=b"jpg", height=4, width=6, raw=metres),
               {**models, "teacher_output": "disparity"}, keep_depth=True)
