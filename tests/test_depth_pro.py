"""Depth Pro as a teacher: its metric inverse depth and field of view become the paper's label,
the sample's intrinsics and, with --keep-depth, its metres.

DepthProImageProcessor needs torchvision, which is not installed here, so the reference is its
documented steps written out in this file: rescale (1/255) and normalize (mean, std 0.5), then a
float bilinear resize to the fixed size without antialiasing (F.interpolate, align_corners False);
the model's own forward (DepthProForDepthEstimation loaded back from the folder); and its
post_process_depth_estimation: the output times W / focal, focal = 0.5 W / tan(fov / 2), resized
bilinearly to the image, depth = 1 / clamp(x, 1e-4, 1e4). Nothing of the engine runs there.

The teacher is a tiny random-weight model of the real architecture (tiny Dinov2 encoders, the fov
model on), its decoder and fov head calibrated so the map varies and the field of view is near
60 degrees, saved beside a preprocessor_config.json written by hand as the hub checkpoint's is.
"""
from __future__ import annotations

import io
import json
import math
import shutil

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from builders import encode, write_shard
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache
from helpers_models import pearson
from PIL import Image
from test_teacher_families import _images
from test_teacher_output import config_only

from engine.models import ModelSourceError, teacher_output
from labelers.normalize import DISPARITY, INVERSE_DEPTH
from labelers.preprocess import DepthProSettings
from labelers.random_models import calibrate_depth_pro, init_decoder
from labelers.teacher import Teacher, TeacherPreprocess

SHAPES = [(120, 160), (600, 400), (90, 130), (333, 500)]  # H x W; the first four of _images()
SIZE = 64  # the tiny model's input: its patch size (16) over the smallest scale (0.25)
HALF_STEP = 1 / 512  # depth.png stores round(metres x 256)
# As apple/DepthPro-hf saves it, at the tiny model's size.
PROCESSOR = {
    "image_processor_type": "DepthProImageProcessorFast", "do_resize": True, "size": {"height": SIZE, "width": SIZE},
    "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}


def _dinov2() -> dict:
    return {"model_type": "dinov2", "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 2,
            "image_size": 16, "patch_size": 4, "mlp_ratio": 2, "out_features": ["stage2"], "out_indices": [2]}


def reference_pixels(rgb: np.ndarray, resample: str = "bilinear") -> torch.Tensor:
    """DepthProImageProcessor's documented steps: rescale and normalize first, then resize the
    float image with torchvision (no antialias: F.interpolate; PIL's nearest is NEAREST_EXACT)."""
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() * PROCESSOR["rescale_factor"]
    x = (x - 0.5) / 0.5
    if resample == "nearest":
        return F.interpolate(x, size=(SIZE, SIZE), mode="nearest-exact")[0]
    return F.interpolate(x, size=(SIZE, SIZE), mode=resample, align_corners=False, antialias=False)[0]


def reference_depth(model, rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """(depth in metres at the image's size, fov in degrees): the processor, the model's own
    forward on this image alone, post_process_depth_estimation written out."""
    height, width = rgb.shape[:2]
    with torch.no_grad():
        out = model(pixel_values=reference_pixels(rgb)[None])
    fov = out.field_of_view[0]
    focal = 0.5 * width / torch.tan(0.5 * torch.deg2rad(fov))
    x = out.predicted_depth[0] * width / focal
    x = F.interpolate(x[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    return (1 / torch.clamp(x, 1e-4, 1e4)).numpy().astype(np.float64), float(fov)


def _minmax(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    lo, hi = x[valid].min(), x[valid].max()
    return np.where(valid, (x - lo) / (hi - lo), 0.0)


def save_depth_pro(directory) -> str:
    """A random DepthProForDepthEstimation with its fov model. Kaiming init of the decoder and the
    fov head (else the map is near-constant and the fov head dead), then the last convs set so
    the canonical inverse depth is about 0.6 +- 0.12 (> 0 after the ReLU) and the fov about 60
    degrees, varying per image."""
    from transformers import DepthProConfig, DepthProForDepthEstimation

    config = DepthProConfig(
        patch_size=16, fusion_hidden_size=32, intermediate_hook_ids=[1, 0], intermediate_feature_dims=[8, 8],
        scaled_images_feature_dims=[16, 16, 8], use_fov_model=True,
        image_model_config=_dinov2(), patch_model_config=_dinov2(), fov_model_config=_dinov2(),
    )
    with torch.random.fork_rng(devices=[]):   # the same weights whatever ran before in this process
        torch.manual_seed(0)
        model = DepthProForDepthEstimation(config).eval()
        init_decoder([*model.fusion_stage.modules(), *model.head.modules(), *model.fov_model.head.modules()])
    calibrate_depth_pro(model, torch.stack([reference_pixels(im) for im in _images()]))
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return str(directory)


@pytest.fixture(scope="module")
def depth_pro(tmp_path_factory) -> str:
    return save_depth_pro(tmp_path_factory.mktemp("depth_pro") / "depth_pro")


def test_label_keep_depth_and_intrinsics_on_ray_are_depth_pros_own(tmp_path, depth_pro):
    from transformers import DepthProForDepthEstimation

    images = _images()[: len(SHAPES)]
    assert [im.shape[:2] for im in images] == SHAPES
    samples = [{"__key__": f"img{i:04d}", "png": encode(im, "PNG")} for i, im in enumerate(images)]
    write_shard(tmp_path / "shard-000000.tar", samples)
    out = tmp_path / "out"
    summary = json.loads(run("label", str(tmp_path / "shard-000000.tar"), str(out), "--teacher", depth_pro,
                             "--sky", "none", "--workers", "1", "--batch-size", "4", "--keep-depth", "--label-size", "image", "--json",
                             check=0).stdout)
    assert (summary["samples_ok"], summary["samples_error"]) == (len(samples), 0)
    label = json.loads((out / "job.json").read_text())["label"]
    assert (label["teacher_output"], label["keep_depth"]) == (INVERSE_DEPTH, True)
    assert label["teacher_input"]["resize_mode"] == "float"
    table = ds.dataset(str(out / "manifest"), format="parquet").to_table()
    assert set(table.column("teacher_output").to_pylist()) == {INVERSE_DEPTH}
    got = {s["__key__"]: s for s in wds.WebDataset(str(out / "shards" / "shard-000000.tar"), shardshuffle=False)}
    model = DepthProForDepthEstimation.from_pretrained(depth_pro).eval()
    fovs = []
    for s, rgb in zip(samples, images):
        key, (height, width) = s["__key__"], rgb.shape[:2]
        depth, fov = reference_depth(model, rgb)
        fovs.append(fov)
        assert 0 < fov < 180 and np.std(depth) > 0.05 * np.mean(depth), key  # a sane fov, a varying map
        valid = np.isfinite(depth) & (depth > 0)
        assert valid.mean() > 0.99, key
        disp = np.where(valid, 1 / np.where(valid, depth, 1), 0.0)

        ours = np.asarray(Image.open(io.BytesIO(got[key]["disp.png"]))) / 65535.0
        assert ours.shape == (height, width), key
        assert pearson(ours[valid], _minmax(disp, valid)[valid]) > 0.999, key
        assert np.all(ours[~valid] == 0), key
        # the same comparison without 1/depth fails: the conversion is what passes it
        assert pearson(ours[valid], _minmax(depth, valid)[valid]) < 0, key

        intrinsics = json.loads(got[key]["json"])["intrinsics"]
        assert intrinsics["fov_deg"] == pytest.approx(fov, abs=1e-3), key
        assert intrinsics["focal_px"] == pytest.approx(0.5 * width / math.tan(math.radians(intrinsics["fov_deg"]) / 2))

        with Image.open(io.BytesIO(got[key]["depth.png"])) as im:
            metres = np.asarray(im).astype(np.float64) / 256
        kept = valid & (depth < 256)
        assert kept.mean() > 0.99, key
        # rounding, and float noise far below a step (batched forward vs one image: < 1e-5 relative)
        assert np.all(np.abs(metres[kept] - depth[kept]) <= HALF_STEP + 3e-5 * depth[kept]), key
    assert max(fovs) - min(fovs) > 0.5  # each image's own fov, not one for the batch


def test_model_input_is_the_processors_documented_steps(depth_pro):
    pre = Teacher.load(depth_pro).preprocess
    assert (pre.family, pre.rule, pre.resize_mode, pre.resample) == ("depth_pro", "fixed", "float", "bilinear")
    for rgb in _images():
        assert pre.target_size(*rgb.shape[:2]) == (SIZE, SIZE)
        ours = pre.pixels(rgb, (SIZE, SIZE), torch.device("cpu"))
        assert (ours - reference_pixels(rgb)).abs().max() < 1e-5, rgb.shape
    for code, resample in ((0, "nearest"), (3, "bicubic")):  # the other filters it reproduces
        pre = TeacherPreprocess.from_processor(DepthProSettings.from_dict({**PROCESSOR, "resample": code}))
        rgb = _images()[1]
        ours = pre.pixels(rgb, pre.target_size(*rgb.shape[:2]), torch.device("cpu"))
        assert (ours - reference_pixels(rgb, resample)).abs().max() < 1e-5, resample


@pytest.mark.parametrize("change, needle", [
    ({"resample": 1}, "unsupported resample filter 1"),   # LANCZOS: no torch twin
    ({"do_resize": False}, "does not resize"),
    ({"size": {"shortest_edge": 64}}, "height and width"),
    ({"image_processor_type": "DPTImageProcessor"}, "names DPTImageProcessor"),
])
def test_a_processor_config_it_cannot_reproduce_is_refused(change, needle):
    with pytest.raises(ValueError, match=needle):
        TeacherPreprocess.from_processor(DepthProSettings.from_dict({**PROCESSOR, **change}), family="depth_pro")


def test_class_defaults_fill_what_the_config_leaves_out():
    pre = TeacherPreprocess.from_processor(DepthProSettings.from_dict({}), family="depth_pro")
    assert (pre.size_h, pre.size_w, pre.resample, pre.mean, pre.std) == (1536, 1536, "bilinear", (0.5,) * 3, (0.5,) * 3)
    assert pre.rescale_factor == pytest.approx(1 / 255)


def test_without_the_fov_model_the_raw_map_is_relative_and_has_no_fov(tmp_path, depth_pro):
    """use_fov_model false: the same weights, no focal length, so no metres: the clamped
    canonical inverse depth, read as disparity."""
    from transformers import DepthProForDepthEstimation

    folder = tmp_path / "no_fov"
    shutil.copytree(depth_pro, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "use_fov_model": False}))
    assert teacher_output(config) == INVERSE_DEPTH
    assert teacher_output({**config, "use_fov_model": False}) == DISPARITY
    model = DepthProForDepthEstimation.from_pretrained(folder).eval()
    images = _images()[:3]
    for rgb, got in zip(images, Teacher.load(str(folder)).predict(images)):
        with torch.no_grad():
            out = model(pixel_values=reference_pixels(rgb)[None])
        assert out.field_of_view is None and got.fov_deg is None
        x = F.interpolate(out.predicted_depth[None], size=rgb.shape[:2], mode="bilinear", align_corners=False)
        want = torch.clamp(x[0, 0], 1e-4, 1e4).numpy()
        assert pearson(got.raw, want) > 0.9999 and np.abs(got.raw - want).max() < 1e-3 * want.max()


@pytest.mark.parametrize("config, override, want", [
    ({}, None, DISPARITY),                                  # DepthProConfig's default: no fov model
    ({"use_fov_model": True}, None, INVERSE_DEPTH),
    ({"use_fov_model": True}, "inverse_depth", INVERSE_DEPTH),
    ({"use_fov_model": False}, "disparity", DISPARITY),
    ({"use_fov_model": True}, "depth", None),
    ({"use_fov_model": True}, "disparity", None),
    ({"use_fov_model": False}, "inverse_depth", None),
])
def test_teacher_output_from_the_config(config, override, want):
    config = {"model_type": "depth_pro", **config}
    if want is None:
        with pytest.raises(ModelSourceError, match="use_fov_model"):
            teacher_output(config, override)
    else:
        assert teacher_output(config, override) == want


def test_a_contradicting_teacher_output_is_refused_with_one_line(tmp_path):
    teacher = config_only(tmp_path / "dp", {"model_type": "depth_pro", "architectures": ["DepthProForDepthEstimation"],
                                            "use_fov_model": True})
    write_shard(tmp_path / "raw.tar", [{"__key__": "a", "png": encode(_images()[2], "PNG")}])
    out = tmp_path / "out"
    p = run("label", str(tmp_path / "raw.tar"), str(out), "--teacher", str(teacher), "--sky", "none",
            "--teacher-output", "depth", check=2)
    assert "outputs inverse_depth (use_fov_model true)" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()
