"""What a teacher outputs (relative disparity, or metric depth) is decided on the driver from its
config, pinned in job.json, and turned into the paper's label (disparity, sky 0, min-max per
image): a metric teacher read as disparity would invert every label of the job, silently.

Tiny random-weight models of the real architectures (Depth Anything relative and metric, DPT),
labeled through the real CLI on a local Ray; labels checked against a reference computed here
with the models' own forward and numpy."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
import webdataset as wds
from builders import photo_samples, write_shard
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache
from helpers_models import iou, pearson, reference_prediction, reference_sky
from PIL import Image
from scenes import ExactTeacher, npy, png, render, with_invalid

from engine.models import ModelSourceError, teacher_output
from labelers.normalize import (
    DEPTH,
    DISPARITY,
    INVERSE_DEPTH,
    normalize_disparity,
    normalize_output,
    to_disparity,
)
from labelers.prediction import Prediction
from pipelines.evaluate import evaluate_shard, summarize
from pipelines.tasks import ShardTask

SIZES = [(120, 160), (90, 130), (200, 200), (64, 96), (121, 161)]


def save_metric_teacher(directory: Path) -> Path:
    """A random Depth Anything *metric* model (sigmoid x max_depth head): the relative random
    teacher's weights in a metric config, the last conv rescaled so the sigmoid does not saturate
    (outputs spread over 0..20 m instead of sitting at 20)."""
    from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

    from labelers.random_models import save_random_teacher

    path = save_random_teacher(directory, size="tiny", seed=3)
    relative = DepthAnythingForDepthEstimation.from_pretrained(path)
    config = relative.config
    config.depth_estimation_type, config.max_depth = "metric", 20
    model = DepthAnythingForDepthEstimation(config).eval()
    model.load_state_dict(relative.state_dict())
    seen = {}
    hook = model.head.conv3.register_forward_hook(lambda m, i, o: seen.setdefault("x", o.detach()))
    reference_prediction(model, AutoImageProcessor.from_pretrained(path), photo_rgb(120, 160))
    hook.remove()
    with torch.no_grad():
        gain = 1.5 / float(seen["x"].std())
        model.head.conv3.weight.mul_(gain)
        model.head.conv3.bias.mul_(gain).sub_(float(seen["x"].mean()) * gain)
    model.save_pretrained(path)
    return path


def save_tiny_dpt(directory: Path) -> Path:
    """A random DPTForDepthEstimation: its config does not say disparity or depth."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=64, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        DPTForDepthEstimation(config).eval().save_pretrained(directory)
    # Intel/dpt-large's settings: a square input (a plain-ViT DPT reassembles a square patch grid)
    processor = DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False, do_pad=False)
    processor.save_pretrained(directory)
    return directory


def config_only(directory: Path, config: dict) -> Path:
    """A folder resolve() accepts (config.json and a weights file, hashed, never loaded)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(b"not loaded: refused from config.json")
    return directory


def photo_rgb(height: int, width: int) -> np.ndarray:
    data = photo_samples([(height, width)])[0]["jpg"]
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("teachers")
    return {"metric": str(save_metric_teacher(root / "metric")), "dpt": str(save_tiny_dpt(root / "dpt"))}


def reference_label(teacher: str, sky_model: str, kind: str):
    """The label definition apart from the engine: predicted_depth at the engine's input size
    (helpers_models), 1/depth for a depth teacher, the sky model's own processor, min-max over
    non-sky valid pixels. Returns rgb -> (label, used pixels, sky, the model's raw output)."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForDepthEstimation,
        AutoModelForSemanticSegmentation,
    )

    t = AutoModelForDepthEstimation.from_pretrained(teacher).eval()
    tp = AutoImageProcessor.from_pretrained(teacher)
    s = AutoModelForSemanticSegmentation.from_pretrained(sky_model).eval()
    sp = AutoImageProcessor.from_pretrained(sky_model)
    sky_ids = [int(i) for i, n in s.config.id2label.items() if n.strip().lower() == "sky"]

    def label(rgb):
        raw = reference_prediction(t, tp, rgb).astype(np.float64)
        sky = reference_sky(s, sp, rgb, sky_ids)
        valid = np.isfinite(raw) & (raw > 0 if kind == DEPTH else True)
        disp = np.where(valid, 1 / np.where(valid, raw, 1), 0) if kind == DEPTH else raw
        used = valid & ~sky
        lo, hi = disp[used].min(), disp[used].max()
        return np.where(used, (disp - lo) / (hi - lo), 0.0), used, sky, raw

    return label


@pytest.mark.parametrize("which, kind", [("metric", DEPTH), ("relative", DISPARITY)])
def test_labels_follow_the_definition_for_metric_and_relative_teachers(tmp_path, tiny_models, teachers,
                                                                        which, kind):
    teacher = teachers["metric"] if which == "metric" else tiny_models.teacher
    samples = photo_samples(SIZES)
    (tmp_path / "raw").mkdir()
    write_shard(tmp_path / "raw" / "shard-000000.tar", samples)
    out = tmp_path / "out"
    args = ["label", f"{tmp_path}/raw/", str(out), "--teacher", teacher, "--sky", tiny_models.sky,
            "--workers", "1", "--batch-size", "4"]
    summary = json.loads(run(*args, "--json", check=0).stdout)
    assert (summary["samples_ok"], summary["samples_error"]) == (len(SIZES), 0)
    job = json.loads((out / "job.json").read_text())
    assert job["label"]["teacher_output"] == kind

    rows = {r["key"]: r for r in ds.dataset(str(out / "manifest"), format="parquet").to_table().to_pylist()}
    got = {s["__key__"]: s for s in wds.WebDataset(str(out / "shards" / "shard-000000.tar"), shardshuffle=False)}
    reference = reference_label(teacher, tiny_models.sky, kind)
    for s in samples:
        key = s["__key__"]
        rgb = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        want, used, want_sky, raw = reference(rgb)
        disp = np.asarray(Image.open(io.BytesIO(got[key]["disp.png"]))) / 65535.0
        sky = np.asarray(Image.open(io.BytesIO(got[key]["sky.png"]))) == 255
        assert iou(sky, want_sky) > 0.99, key
        both = used & ~sky
        assert both.mean() > 0.3, key
        assert pearson(disp[both], want[both]) > 0.999, key
        assert np.all(disp[sky] == 0)
        row, meta = rows[key], json.loads(got[key]["json"])
        assert row["teacher_output"] == meta["teacher_output"] == kind
        assert (row["output_min"], row["output_max"]) == pytest.approx((raw[used].min(), raw[used].max()), rel=2e-2)
        assert (meta["output_min"], meta["output_max"]) == pytest.approx((row["output_min"], row["output_max"]))
        if kind == DEPTH:   # disp_min/max: the range of 1/depth that was normalized
            assert (row["disp_min"], row["disp_max"]) == pytest.approx(
                (1 / row["output_max"], 1 / row["output_min"]), rel=1e-5)
        else:
            assert (row["disp_min"], row["disp_max"]) == pytest.approx((row["output_min"], row["output_max"]))

    if which == "relative":
        # An OUTPUT from before the kind was recorded: a relative teacher's rerun accepts it.
        job["label"].pop("teacher_output")
        (out / "job.json").write_text(json.dumps(job))
        again = json.loads(run(*args, "--json", check=0).stdout)
        assert again["shards_skipped"] == 1
        assert json.loads((out / "job.json").read_text())["label"]["teacher_output"] == DISPARITY


def test_job_pins_the_kind_and_a_rerun_with_another_is_refused(tmp_path, teachers):
    write_shard(tmp_path / "raw.tar", photo_samples([(64, 96), (80, 64)]))
    out = tmp_path / "out"
    args = ["label", str(tmp_path / "raw.tar"), str(out), "--teacher", teachers["dpt"], "--sky", "none",
            "--workers", "1"]
    run(*args, "--teacher-output", "depth", check=0)
    assert json.loads((out / "job.json").read_text())["label"]["teacher_output"] == DEPTH
    table = ds.dataset(str(out / "manifest"), format="parquet").to_table()
    assert set(table.column("teacher_output").to_pylist()) == {DEPTH}
    p = run(*args, "--teacher-output", "disparity", check=2)
    assert "teacher_output" in p.stderr and '"depth"' in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


REFUSALS = {
    "dpt": ({}, None, "--teacher-output"),
    "depth_pro": ({"model_type": "depth_pro", "architectures": ["DepthProForDepthEstimation"], "use_fov_model": True},
                  "depth", "outputs inverse_depth (use_fov_model true); --teacher-output depth would invert"),
    "unknown": ({"model_type": "tipsv2_dpt", "architectures": ["Tipsv2DptForDepthEstimation"]}, "depth",
                "no preprocessing rule for this family yet"),
    "chmv2": ({"model_type": "chmv2", "architectures": ["CHMv2ForDepthEstimation"]}, "depth", "canopy-height"),
    "prompt": ({"model_type": "prompt_depth_anything", "architectures": ["PromptDepthAnythingForDepthEstimation"]},
               "disparity", "prompt depth"),
    "metric-as-disparity": ({}, "disparity", "would invert its labels"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_exit_2_with_one_line_before_any_work(tmp_path, teachers, case):
    config, override, needle = REFUSALS[case]
    teacher = teachers.get(case) or (teachers["metric"] if case.startswith("metric")
                                     else str(config_only(tmp_path / case, config)))
    write_shard(tmp_path / "raw.tar", photo_samples([(64, 96)]))
    flag = ["--teacher-output", override] if override else []
    out = tmp_path / "out"
    p = run("label", str(tmp_path / "raw.tar"), str(out), "--teacher", teacher, "--sky", "none", *flag, check=2)
    assert needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()
    if case == "dpt":   # evaluate decides the same way
        p = run("evaluate", str(tmp_path / "raw.tar"), "--teacher", teacher, check=2)
        assert needle in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("config, override, want", [
    ({"model_type": "depth_anything"}, None, DISPARITY),                 # relative checkpoints predate the field
    ({"model_type": "depth_anything", "depth_estimation_type": "relative"}, None, DISPARITY),
    ({"model_type": "depth_anything", "depth_estimation_type": "metric"}, None, DEPTH),
    ({"model_type": "depth_anything", "depth_estimation_type": "metric"}, "depth", DEPTH),
    ({"model_type": "zoedepth"}, None, DEPTH),
    ({"model_type": "glpn"}, None, DEPTH),
    ({"model_type": "dpt"}, "disparity", DISPARITY),
    ({"model_type": "dpt"}, "depth", DEPTH),
    ({"model_type": "depth_pro"}, None, DISPARITY),             # DepthProConfig's default: no fov model
    ({"model_type": "depth_pro", "use_fov_model": True}, None, INVERSE_DEPTH),
    ({"model_type": "depth_pro", "use_fov_model": True}, "disparity", None),
    ({"model_type": "tipsv2_dpt"}, "depth", None),
    ({"model_type": "dpt"}, None, None),
    ({"model_type": "tipsv2_dpt"}, None, None),
    ({"model_type": "depth_anything", "depth_estimation_type": "other"}, None, None),
    ({"model_type": "glpn"}, "disparity", None),
    ({"model_type": "depth_anything"}, "depth", None),
    ({"model_type": "chmv2"}, "depth", None),
    ({"model_type": "prompt_depth_anything"}, "disparity", None),
    ({"model_type": "dpt"}, "inverse", None),
])
def test_teacher_output_from_config(config, override, want):
    if want is None:
        with pytest.raises(ModelSourceError):
            teacher_output(config, override)
    else:
        assert teacher_output(config, override) == want


def test_depth_becomes_disparity_and_bad_depth_is_left_out():
    raw = np.array([[2.0, 4.0, 0.0, -1.0], [np.inf, np.nan, 0.5, 8.0]], np.float32)
    sky = np.array([[0, 0, 0, 0], [0, 0, 0, 1]], bool)
    d = to_disparity(raw, DEPTH)
    ok = np.isfinite(raw) & (raw > 0)
    assert np.array_equal(np.isfinite(d), ok)
    np.testing.assert_allclose(d[ok], 1 / raw[ok])
    assert to_disparity(raw, DISPARITY) is raw
    with pytest.raises(ValueError):
        to_disparity(raw, "metres")

    label = normalize_output(raw, DEPTH, sky)
    used = ok & ~sky                                   # 2, 4, 0.5 m -> disparity 0.5, 0.25, 2
    r = 1 / raw[used].astype(np.float64)
    want = np.zeros(raw.shape)
    want[used] = (r - r.min()) / (r.max() - r.min())
    np.testing.assert_allclose(label.disparity, want, atol=1e-6)
    assert (label.lo, label.hi) == pytest.approx((0.25, 2.0))
    assert (label.output_lo, label.output_hi) == (0.5, 4.0)     # metres, over the used pixels
    assert not label.degenerate and label.disparity[~used].max() == 0

    same = normalize_output(raw, DISPARITY, sky)          # disparity: the old path, plus its range
    plain = normalize_disparity(raw, sky)
    np.testing.assert_array_equal(same.disparity, plain.disparity)
    assert (same.output_lo, same.output_hi) == (plain.lo, plain.hi) == (-1.0, 4.0)

    nothing = normalize_output(np.zeros((2, 2), np.float32), DEPTH)
    assert nothing.degenerate and not nothing.disparity.any() and np.isnan(nothing.output_lo)


class DepthTeacher(ExactTeacher):
    """Returns metric depth (``scale`` x the scene's depth), as a metric model does."""

    output = DEPTH

    def predict(self, images):
        return [Prediction(1 / p.raw) for p in super().predict(images)]


def test_evaluate_scores_a_metric_teacher_on_its_disparity(tmp_path):
    truth = [render(h, w, seed=i) for i, (h, w) in enumerate([(64, 96), (80, 80)])]
    samples = [{"__key__": f"s{i}", "png": png(image), "depth.npy": npy(with_invalid(depth))}
               for i, (image, depth) in enumerate(truth)]
    src = write_shard(tmp_path / "gt.tar", samples)
    teacher = DepthTeacher([(image, 1 / (3.0 * depth)) for image, depth in truth])
    good = summarize(evaluate_shard(ShardTask(src, "gt"), teacher).rows)["teacher"]
    assert good["samples"] == 2 and good["abs_rel"] < 1e-4 and good["delta1"] == 1.0
    teacher.output = DISPARITY                           # the defect: depth read as disparity
    bad = summarize(evaluate_shard(ShardTask(src, "gt"), teacher).rows)["teacher"]
    assert bad["abs_rel"] > 0.02                       # 0.05 on these scenes
