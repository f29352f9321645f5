"""labelers: the label definition of SPEC §5, checked against independent computations.

Models are tiny random transformers models saved with save_pretrained in a temp folder and
loaded back; references use PIL and the models' own processors, not the engine's code paths.
"""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch
from helpers_models import (
    blue_sky_scene,
    iou,
    natural_photos,
    official_lower_bound,
    pearson,
    reference_prediction,
    reference_sky,
)
from PIL import Image
from skimage import data as skdata

from labelers import sky as sky_module
from labelers.devices import autocast, resolve_device, resolve_dtype
from labelers.geometry import constrain_to_multiple, teacher_input_size
from labelers.loading import NoSafetensorsError
from labelers.normalize import normalize_disparity
from labelers.preprocess import ImagePreprocess
from labelers.random_models import (
    SKY_ID,
    save_random_segmenter,
    save_random_teacher,
    teacher_config,
)
from labelers.sky import NoSkyClassError, SkySegmenter, sky_from_logits
from labelers.teacher import Teacher, TeacherPreprocess

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_random_teacher(tmp_path_factory.mktemp("teacher"), size="tiny")


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return Teacher.load(str(teacher_dir), device="cpu")


@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory):
    return save_random_segmenter(tmp_path_factory.mktemp("segmenter"), size="tiny")


@pytest.fixture(scope="module")
def segmenter(segmenter_dir):
    return SkySegmenter.load(str(segmenter_dir), device="cpu")


@pytest.fixture(scope="module")
def photos():
    return natural_photos()


# ---------------------------------------------------------------- geometry


def test_constrain_to_multiple_rounds_then_respects_the_floor():
    assert constrain_to_multiple(20, 14) == 14  # 20/14 rounds to 1
    assert constrain_to_multiple(20, 14, min_val=16) == 28  # ... but 14 < 16: next multiple up
    assert constrain_to_multiple(518, 14, min_val=518) == 518
    assert constrain_to_multiple(3.2, 1) == 3


@pytest.mark.parametrize(
    "hw, expected",
    [((600, 400), (784, 518)), ((400, 600), (518, 784)), ((90, 130), (518, 742)), ((518, 518), (518, 518))],
)
def test_teacher_input_size_follows_the_official_rule(hw, expected):
    assert teacher_input_size(*hw, 518, 518, 14, True) == expected
    assert official_lower_bound(*hw, 518, 14) == expected


def test_teacher_input_size_properties_over_many_shapes():
    rng = np.random.default_rng(0)
    for height, width in rng.integers(16, 4000, size=(200, 2)):
        h, w = teacher_input_size(int(height), int(width), 518, 518, 14, True)
        assert (h, w) == official_lower_bound(int(height), int(width), 518, 14)
        assert h % 14 == 0 and w % 14 == 0
        assert min(h, w) == 518 and max(h, w) >= 518
        assert abs(math.log((h / w) / (height / width))) < math.log(1 + 14 / 518) + 1e-9


def test_teacher_input_size_without_aspect_is_the_processor_size():
    assert teacher_input_size(600, 400, 512, 512, 1, False) == (512, 512)
    assert teacher_input_size(600, 400, 518, 518, 14, False) == (518, 518)


def test_transformers_processor_uses_another_rule(teacher_dir):
    """The hub processor shrinks 600x400 to 518x350; the official rule gives 784x518."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(teacher_dir)
    image = np.zeros((600, 400, 3), np.uint8)
    theirs = tuple(processor(images=image, return_tensors="pt")["pixel_values"].shape[-2:])
    ours = TeacherPreprocess.from_processor(processor).target_size(600, 400)
    assert theirs == (518, 350)
    assert ours == (784, 518)
    assert min(theirs) < 518 <= min(ours)


def test_preprocess_reads_the_processor_not_a_constant(tmp_path):
    from transformers import AutoImageProcessor

    directory = save_random_teacher(tmp_path / "t266", size="tiny", image_size=266)
    processor = AutoImageProcessor.from_pretrained(directory)
    pre = TeacherPreprocess.from_processor(processor)
    assert (pre.size_h, pre.size_w, pre.multiple, pre.keep_aspect) == (266, 266, 14, True)
    assert pre.resample == "bicubic"
    assert pre.mean == tuple(processor.image_mean) and pre.std == tuple(processor.image_std)
    assert pre.rescale_factor == pytest.approx(1 / 255)
    assert pre.target_size(600, 400) == teacher_input_size(600, 400, 266, 266, 14, True)
    assert Teacher.load(str(directory)).target_size(600, 400)[1] == 266


def test_preprocess_refuses_a_filter_it_cannot_reproduce(teacher_dir):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(teacher_dir)
    processor.resample = 1  # lanczos
    with pytest.raises(ValueError, match="resample"):
        TeacherPreprocess.from_processor(processor)


@pytest.mark.parametrize("resample, code", [("nearest", 0), ("bilinear", 2), ("bicubic", 3)])
def test_torch_resize_reproduces_pil(resample, code):
    """The engine's resize vs PIL's (what the processors use), down and up, on a natural image."""
    image = skdata.astronaut()
    pre = ImagePreprocess(518, 518, 1, False, resample, None, None, None)
    for height, width in [(200, 300), (700, 650), (90, 130)]:
        ours = pre.pixels(image, (height, width), torch.device("cpu")).permute(1, 2, 0).numpy()
        theirs = np.asarray(Image.fromarray(image).resize((width, height), code), np.float32)
        diff = np.abs(ours - theirs)
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (height, width)
        if resample == "nearest":
            assert diff.max() == 0


# ---------------------------------------------------------------- teacher


def test_teacher_matches_an_independent_reference_in_one_batch(teacher, teacher_dir, photos):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    names = list(photos)
    shared = [teacher.target_size(*photos[n].shape[:2]) for n in ("rocket", "rocket_crop")]
    assert shared[0] == shared[1]  # these two run in one forward pass
    predictions = [p.raw for p in teacher.predict([photos[n] for n in names])]

    model = AutoModelForDepthEstimation.from_pretrained(teacher_dir).eval()
    processor = AutoImageProcessor.from_pretrained(teacher_dir)
    for name, prediction in zip(names, predictions):
        image = photos[name]
        assert prediction.shape == image.shape[:2] and prediction.dtype == np.float32
        reference = reference_prediction(model, processor, image)
        assert reference.std() > 0
        assert pearson(prediction, reference) > 0.999, name


def test_teacher_result_does_not_depend_on_batch_mates(teacher, photos):
    a, b, c = photos["rocket_crop"], photos["rocket"], photos["small"]  # a and b share a forward pass
    alone = teacher.predict([a])[0].raw
    together = teacher.predict([a, b, c])[0].raw
    scale = float(np.abs(alone).max())
    assert scale > 0
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5 * scale)


def test_teacher_rejects_images_that_are_not_uint8_rgb(teacher):
    with pytest.raises(ValueError, match="uint8"):
        teacher.predict([np.zeros((20, 20, 3), np.float32)])
    with pytest.raises(ValueError, match="HxWx3"):
        teacher.predict([np.zeros((20, 20), np.uint8)])


def test_teacher_without_safetensors_is_refused(tmp_path, teacher_dir):
    from transformers import AutoModelForDepthEstimation

    model = AutoModelForDepthEstimation.from_pretrained(teacher_dir)
    target = tmp_path / "pickle_only"
    model.save_pretrained(target)
    for weights in target.glob("*.safetensors"):
        weights.unlink()
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    with pytest.raises(NoSafetensorsError, match="safetensors"):
        Teacher.load(str(target))


def test_random_teacher_sizes_match_the_paper():
    """Depth Anything ViT-S/B/L have 24.8M, 97.5M, 335.3M parameters (built on the meta device)."""
    from transformers import DepthAnythingForDepthEstimation

    paper = {"vits": 24.8e6, "vitb": 97.5e6, "vitl": 335.3e6}
    for size, count in paper.items():
        with torch.device("meta"):
            model = DepthAnythingForDepthEstimation(teacher_config(size))
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(count, rel=0.002), size


# ---------------------------------------------------------------- sky


def test_sky_masks_match_the_processor_post_processing(segmenter, segmenter_dir, photos):
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    images = [photos[n] for n in ("rocket", "portrait", "small", "landscape")] + [blue_sky_scene(70, 110)]
    masks = segmenter.masks(images)
    model = AutoModelForSemanticSegmentation.from_pretrained(segmenter_dir).eval()
    processor = AutoImageProcessor.from_pretrained(segmenter_dir)
    for image, mask in zip(images, masks):
        assert mask.shape == image.shape[:2] and mask.dtype == bool
        assert iou(mask, reference_sky(model, processor, image, segmenter.sky_ids)) > 0.99


def test_chunked_upsampling_equals_full_argmax(monkeypatch):
    """sky_from_logits == argmax in sky ids of post_process_semantic_segmentation, chunks or not."""
    from transformers import SegformerImageProcessor
    from transformers.modeling_outputs import SemanticSegmenterOutput

    torch.manual_seed(0)
    logits = torch.randn(1, 7, 13, 17)
    logits[0, 6, :4] = logits[0, 2, :4]      # exact ties, sky first: argmax keeps the sky class
    logits[0, 5, -4:] = logits[0, 1, -4:]    # exact ties, sky second: argmax keeps class 1
    size = (50, 61)
    sky_ids = (2, 5)
    expected = SegformerImageProcessor().post_process_semantic_segmentation(
        SemanticSegmenterOutput(logits=logits), target_sizes=[size]
    )[0]
    expected = np.isin(expected.numpy(), sky_ids)
    assert 0 < expected.mean() < 1
    for per_class in (True, False):          # the CPU fold and the CUDA fold, both run here
        whole = sky_from_logits(logits[0], sky_ids, size, per_class).numpy()
        np.testing.assert_array_equal(whole, expected)
    monkeypatch.setattr(sky_module, "UPSAMPLE_BUDGET", 2 * size[0] * size[1])  # two classes at a time
    for per_class in (True, False):
        chunked = sky_from_logits(logits[0], sky_ids, size, per_class).numpy()
        np.testing.assert_array_equal(chunked, expected)


def test_random_segmenter_finds_a_plausible_sky(segmenter, photos):
    scene, rocket = segmenter.masks([blue_sky_scene(240, 320), photos["rocket"]])
    assert scene[:120].mean() > 0.9 and scene[120:].mean() < 0.1
    assert 0.05 < rocket.mean() < 0.95


def test_segmenter_without_sky_is_refused(tmp_path):
    directory = save_random_segmenter(tmp_path / "nosky", size="tiny", sky=False)
    with pytest.raises(NoSkyClassError, match="no class named 'sky'") as err:
        SkySegmenter.load(str(directory), name="my-segmenter")
    assert "my-segmenter" in str(err.value)


def test_sky_class_names_match_case_insensitively(tmp_path, segmenter_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(segmenter_dir)
    labels = dict(config.id2label)
    labels[SKY_ID] = "Sky"
    labels[4] = " SKY "
    config.id2label = labels
    config.label2id = {name: i for i, name in labels.items()}
    target = tmp_path / "capital_sky"
    target.mkdir()
    for item in segmenter_dir.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    config.save_pretrained(target)
    assert json.loads((target / "config.json").read_text())["id2label"][str(SKY_ID)] == "Sky"
    assert SkySegmenter.load(str(target)).sky_ids == (SKY_ID, 4)


# ---------------------------------------------------------------- normalize


def test_normalize_equals_a_direct_computation():
    rng = np.random.default_rng(1)
    raw = rng.normal(3.0, 2.0, (40, 50)).astype(np.float32)
    sky = np.zeros(raw.shape, bool)
    sky[:10] = True
    raw[0, 0] = 1e6  # a sky pixel must not set the range
    result = normalize_disparity(raw, sky=sky)

    ground = raw[~sky].astype(np.float64)
    lo, hi = ground.min(), ground.max()
    scaled = np.clip((raw.astype(np.float64) - lo) / (hi - lo), 0, 1)
    expected = np.where(sky, 0.0, scaled).astype(np.float32)
    np.testing.assert_array_equal(result.disparity, expected)
    assert (result.lo, result.hi) == (lo, hi)
    assert not result.degenerate
    assert result.disparity.dtype == np.float32
    assert np.all(result.disparity[sky] == 0)
    assert result.disparity[~sky].min() == 0 and result.disparity[~sky].max() == 1


def test_normalize_honours_the_invalid_mask_and_non_finite_values():
    rng = np.random.default_rng(2)
    raw = rng.uniform(1, 2, (20, 30))
    valid = rng.random(raw.shape) > 0.3
    raw[~valid] = 100.0  # out-of-range junk where invalid
    raw[5, 5] = np.nan
    raw[6, 6] = np.inf
    result = normalize_disparity(raw, valid=valid)
    used = valid & np.isfinite(raw)
    assert result.lo == raw[used].min() and result.hi == raw[used].max()
    assert np.all(result.disparity[~used] == 0)
    expected = (raw[used] - result.lo) / (result.hi - result.lo)
    np.testing.assert_allclose(result.disparity[used], expected, atol=1e-7)


@pytest.mark.parametrize(
    "raw, sky",
    [
        (np.full((8, 9), 4.25), None),  # constant
        (4.25 + np.random.default_rng(3).normal(0, 1e-9, (8, 9)), None),  # float noise only
        (np.random.default_rng(4).random((8, 9)), np.ones((8, 9), bool)),  # all sky
    ],
    ids=["constant", "noise", "all-sky"],
)
def test_normalize_degenerate_maps_are_all_zero(raw, sky):
    result = normalize_disparity(raw, sky=sky)
    assert result.degenerate
    assert result.disparity.shape == raw.shape and not result.disparity.any()
    if sky is not None and sky.all():
        assert math.isnan(result.lo) and math.isnan(result.hi)
    else:
        assert result.lo <= result.hi


def test_normalize_rejects_mismatched_masks():
    with pytest.raises(ValueError, match="shape"):
        normalize_disparity(np.zeros((4, 5)), sky=np.zeros((5, 4), bool))


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_half_precision_needs_cuda(name):
    with pytest.raises(ValueError, match=f"--dtype {name} needs a CUDA device; the CPU path runs in fp32"):
        resolve_dtype(name, torch.device("cpu"))


def test_dtype_and_device_resolution_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="--dtype"):
        resolve_dtype("fp8", torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_device("cuda")


def test_autocast_is_a_no_op_on_cpu():
    for dtype in (torch.float32, torch.bfloat16):
        assert isinstance(autocast(torch.device("cpu"), dtype), contextlib.nullcontext)
    with autocast(torch.device("cpu"), torch.float32):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_on_cuda_runs_in_half_precision():
    device = torch.device("cuda")
    dtype = resolve_dtype("auto", device)
    with autocast(device, dtype):
        assert (torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)).dtype == dtype
