"""Each depth family's own geometry: the teacher's raw output equals the family's pipeline.

For DPT (keep_aspect_ratio True and False), GLPN and ZoeDepth, a tiny random-weight model of the
real architecture is saved with its PIL image processor (transformers 5.x runs these without
torchvision) and loaded back with Teacher.load. Teacher.predict on images of mixed sizes, in one
call, is compared with transformers' own `pipeline("depth-estimation")` run on each image alone
(its processor, the model, its post_process_depth_estimation). Nothing of the engine runs on the
reference side.

ZoeDepth's post-processing calls torchvision's resize (bicubic, antialias=False), which is not
installed here; the test gives the processor module a stand-in that runs the same float
interpolation (F.interpolate, bicubic, align_corners=False), so the processor's own padding
removal still runs.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata

from labelers.geometry import dpt_input_size
from labelers.random_models import init_decoder
from labelers.teacher import Teacher, TeacherPreprocess
from tests.helpers_models import pearson

SHAPES = [(120, 160), (600, 400), (90, 130), (333, 500), (330, 500)]


def _images() -> list[np.ndarray]:
    """Natural images at the sizes above (the last two may share a target size)."""
    sources = [skdata.chelsea(), skdata.astronaut(), skdata.coffee(), skdata.rocket(), skdata.rocket()]
    out = []
    for (h, w), src in zip(SHAPES, sources):
        out.append(np.asarray(Image.fromarray(src).resize((w, h), Image.BILINEAR)))
    out[2] = np.ascontiguousarray(skdata.chelsea()[100:190, 200:330])  # an unresized crop
    return out


def _beit(image_size: int):
    from transformers import BeitConfig

    return BeitConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=image_size,
        patch_size=16, out_features=["stage1", "stage2", "stage3", "stage4"], use_relative_position_bias=True,
        reshape_hidden_states=False,
    )


def _dpt(config, keep_aspect: bool, multiple: int):
    """A random DPTForDepthEstimation of ``config`` and its PIL processor at 384."""
    from transformers import DPTForDepthEstimation, DPTImageProcessorPil

    model = DPTForDepthEstimation(config)
    init_decoder([*model.neck.modules(), *model.head.modules()])
    processor = DPTImageProcessorPil(
        size={"height": 384, "width": 384}, keep_aspect_ratio=keep_aspect, ensure_multiple_of=multiple, resample=3,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    return model, processor


def _dpt_vit():
    """Intel/dpt-large's layout: a plain ViT DPT (square inputs only), 384x384, no aspect kept."""
    from transformers import DPTConfig

    return _dpt(DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=384,
        patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 16, 16], fusion_hidden_size=16,
    ), keep_aspect=False, multiple=1)


def _dpt_beit():
    """Intel/dpt-beit's layout: DPT on a BEiT backbone, aspect kept, sides multiples of 32."""
    from transformers import DPTConfig

    return _dpt(DPTConfig(
        backbone_config=_beit(384), neck_hidden_sizes=[8, 16, 16, 16], fusion_hidden_size=16,
        reassemble_hidden_size=32, is_hybrid=False,
    ), keep_aspect=True, multiple=32)


def _glpn():
    from transformers import GLPNConfig, GLPNForDepthEstimation, GLPNImageProcessorPil

    config = GLPNConfig(
        num_encoder_blocks=4, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 16, 16], num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16, sr_ratios=[8, 4, 2, 1],
    )
    return GLPNForDepthEstimation(config), GLPNImageProcessorPil()  # size_divisor 32, bilinear, no normalize


def _zoedepth(multiple):
    """ZoeDepth on a tiny BEiT; the processor pads (reflect) and keeps the aspect ratio."""
    from transformers import (
        ZoeDepthConfig,
        ZoeDepthForDepthEstimation,
        ZoeDepthImageProcessorPil,
    )

    config = ZoeDepthConfig(
        backbone_config=_beit(384), neck_hidden_sizes=[8, 16, 16, 16], fusion_hidden_size=16,
        reassemble_hidden_size=32, num_relative_features=8, bottleneck_features=16, bin_embedding_dim=16,
        bin_configurations=[{"n_bins": 8, "min_depth": 1e-3, "max_depth": 10.0, "name": "nyu"}],
        num_attractors=[4, 2, 2, 1], patch_transformer_hidden_size=16, patch_transformer_intermediate_size=32,
        patch_transformer_num_attention_heads=2,
    )
    model = ZoeDepthForDepthEstimation(config)
    init_decoder([m for name, m in model.named_modules() if not name.startswith("backbone")])
    return model, ZoeDepthImageProcessorPil(ensure_multiple_of=multiple)


FAMILIES = {
    "dpt-fixed": _dpt_vit,
    "dpt-keep-aspect": _dpt_beit,
    "glpn": _glpn,
    "zoedepth-32": lambda: _zoedepth(32),  # the hub checkpoints' setting
    "zoedepth-default": lambda: _zoedepth(1 / 32),  # the processor class default
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, processor = FAMILIES[request.param]()
    path = tmp_path_factory.mktemp(request.param)
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return request.param, path


@pytest.fixture
def torchvision_resize_stand_in(monkeypatch):
    """ZoeDepthImageProcessorPil.post_process_depth_estimation calls torchvision's tvF.resize."""
    from transformers.models.zoedepth import image_processing_pil_zoedepth as zoe

    def resize(image, size, interpolation, antialias):
        assert interpolation == "bicubic" and antialias is False
        return F.interpolate(image[None], size=list(size), mode="bicubic", align_corners=False)[0]

    stand_in = types.SimpleNamespace(resize=resize, InterpolationMode=types.SimpleNamespace(BICUBIC="bicubic"))
    monkeypatch.setattr(zoe, "tvF", stand_in, raising=False)


def _pipeline_depth(path, image: np.ndarray) -> np.ndarray:
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation, pipeline

    model = AutoModelForDepthEstimation.from_pretrained(path).eval()
    processor = AutoImageProcessor.from_pretrained(path)
    assert type(processor).__name__.endswith("Pil")  # no torchvision here: the PIL backend
    depth_estimator = pipeline("depth-estimation", model=model, image_processor=processor, device="cpu")
    return depth_estimator(Image.fromarray(image))["predicted_depth"].numpy()


def test_target_sizes_equal_the_processor_input_sizes(saved):
    """The size the teacher feeds the model is the processor's pixel_values size, exactly."""
    from transformers import AutoImageProcessor

    family, path = saved
    processor = AutoImageProcessor.from_pretrained(path)
    teacher = Teacher.load(str(path))
    rng = np.random.default_rng(0)
    shapes = SHAPES + [tuple(int(v) for v in rng.integers(40, 900, 2)) for _ in range(12)]
    for h, w in shapes:
        pixels = processor(images=np.zeros((h, w, 3), np.uint8), return_tensors="pt")["pixel_values"]
        assert teacher.target_size(h, w) == tuple(pixels.shape[-2:]), (family, h, w)


def test_model_inputs_equal_the_processor(saved):
    """The pixels themselves (resize, padding, rescale, normalize) against the PIL processor."""
    from transformers import AutoImageProcessor

    family, path = saved
    processor = AutoImageProcessor.from_pretrained(path)
    pre = Teacher.load(str(path)).preprocess
    for image in _images():
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        ours = pre.pixels(image, pre.target_size(*image.shape[:2]), torch.device("cpu"))
        assert ours.shape == theirs.shape
        # In grey levels: PIL's filters are reproduced within a few levels at a few pixels.
        levels = (ours - theirs).abs() * torch.tensor(pre.std or (1.0,) * 3).view(3, 1, 1) * 255
        if pre.rescale_factor is None:
            levels = levels / 255
        assert levels.max() <= 3.01 and (levels > 1.01).float().mean() < 0.01, (family, image.shape)
        assert pearson(ours.numpy(), theirs.numpy()) > 0.9999


@pytest.mark.usefixtures("torchvision_resize_stand_in")
def test_teacher_equals_the_family_pipeline(saved):
    family, path = saved
    teacher = Teacher.load(str(path))
    assert teacher.preprocess.family == family.split("-")[0]
    images = _images()
    predictions = [p.raw for p in teacher.predict(images)]  # one call, grouped by target size
    for image, ours in zip(images, predictions):
        theirs = _pipeline_depth(path, image)
        assert ours.shape == image.shape[:2] == theirs.shape
        assert np.std(theirs) > 1e-4 * abs(np.mean(theirs))  # the random model gives a varying map
        assert pearson(ours, theirs) > 0.999, (family, image.shape)
        assert np.abs(ours - theirs).max() < 0.05 * (theirs.max() - theirs.min()), (family, image.shape)


def test_families_are_chosen_from_the_config(saved):
    family, path = saved
    pre = Teacher.load(str(path)).preprocess
    expected = {
        "dpt-fixed": ("dpt", "dpt", "none", "pil", "bicubic"),
        "dpt-keep-aspect": ("dpt", "dpt", "none", "pil", "bicubic"),
        "glpn": ("glpn", "divisor-floor", "none", "pil", "bilinear"),
        "zoedepth-32": ("zoedepth", "dpt", "zoedepth", "align-corners", "bilinear"),
        "zoedepth-default": ("zoedepth", "dpt", "zoedepth", "align-corners", "bilinear"),
    }[family]
    assert (pre.family, pre.rule, pre.pad, pre.resize_mode, pre.resample) == expected


def test_dpt_scales_as_little_as_possible_unlike_depth_anything():
    """600x400 at 384, multiple 32: DPT fits the width (576x384), Depth Anything the shorter side."""
    from labelers.geometry import teacher_input_size

    assert dpt_input_size(600, 400, 384, 384, 32, True) == (576, 384)
    assert dpt_input_size(120, 160, 384, 384, 32, True) == (288, 384)
    assert teacher_input_size(600, 400, 384, 384, 32, True) == (576, 384)
    assert teacher_input_size(300, 500, 384, 384, 32, True) == (384, 640)
    assert dpt_input_size(300, 500, 384, 384, 32, True) == (224, 384)
    assert dpt_input_size(600, 400, 384, 384, 1, False) == (384, 384)


def test_depth_anything_keeps_its_rule_and_bilinear_resize(tmp_path):
    from labelers.random_models import save_random_teacher

    teacher = Teacher.load(str(save_random_teacher(tmp_path / "da", size="tiny")))
    pre = teacher.preprocess
    assert (pre.family, pre.rule, pre.pad, pre.resize_mode) == ("depth_anything", "lower-bound", "none", "pil")
    assert teacher.target_size(600, 400) == (784, 518)


def test_unknown_family_is_refused():
    from transformers import DPTImageProcessorPil

    with pytest.raises(ValueError, match="no preprocessing rule for depth models of type 'chmv2'"):
        TeacherPreprocess.from_processor(DPTImageProcessorPil(), family="chmv2")
