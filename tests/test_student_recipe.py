"""The paper's student and its feature alignment: built from a DINOv2 encoder with a fresh DPT
head, and aligned on like features (the encoder's normed output, patch tokens only), so that a
student equal to the frozen encoder scores a loss of exactly 0 with no gradient.

The frozen DINOv2 here has a LayerNorm like a trained one (weights and biases far from 1 and 0):
with the plain LayerNorm of a fresh model the features before and after it point almost the
same way (mean cosine about 0.99), which would hide a comparison across the norm."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from labelers.random_models import TEACHER_SIZES
from pipelines.student.model import (
    PAPER_HEADS,
    from_dinov2,
    frozen_features,
    head_for,
    student_features,
)
from pipelines.student.train import TrainConfig, step_losses


def save_dinov2(directory, layers: int = 4, registers: int = 0, seed: int = 0):
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    kind = (Dinov2WithRegistersConfig, Dinov2WithRegistersModel) if registers else (Dinov2Config, Dinov2Model)
    extra = {"num_register_tokens": registers} if registers else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = kind[1](kind[0](hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                intermediate_size=64, patch_size=14, image_size=56, **extra))
        with torch.no_grad():     # a trained-looking final norm
            model.layernorm.weight.uniform_(0.2, 3.0)
            model.layernorm.bias.normal_(0.0, 1.0)
    model.save_pretrained(directory)
    return str(directory)


def batch(n: int = 3, size: int = 56, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, size, size, generator=gen),
            "disparity": torch.rand(n, size, size, generator=gen),
            "valid": torch.ones(n, size, size, dtype=torch.bool),
            "pseudo": torch.arange(n) >= 1}


def test_a_student_equal_to_the_frozen_encoder_has_zero_alignment_loss_and_no_gradient(tmp_path):
    from transformers import Dinov2Model

    frozen_dir = save_dinov2(tmp_path / "dinov2")
    student = from_dinov2(frozen_dir)
    frozen = Dinov2Model.from_pretrained(frozen_dir).eval()
    cfg = TrainConfig(labeled=("x",), pseudo=("y",), student=None, init=frozen_dir, frozen=None, out="")
    losses = step_losses(student.train(), frozen, batch(), cfg, torch.Generator().manual_seed(0))
    assert losses["feature"].item() == 0.0 and losses["feature"].requires_grad
    student.zero_grad()
    losses["feature"].backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert all(torch.count_nonzero(g) == 0 for g in grads)

    # What the old comparison did, the last layer before the final norm against the frozen
    # encoder's normed output: the same encoder scores as misaligned. It must not pass.
    x = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    out = student(pixel_values=x, output_hidden_states=True)
    before_norm = out.hidden_states[-1][:, 1:]
    cos = torch.nn.functional.cosine_similarity(before_norm, frozen_features(frozen, x), dim=-1)
    assert (cos <= 0.85).float().mean() > 0.5
    assert torch.equal(student_features(student, out.hidden_states), frozen_features(frozen, x))


def test_register_tokens_are_left_out_of_the_alignment(tmp_path):
    from transformers import Dinov2WithRegistersModel

    frozen = Dinov2WithRegistersModel.from_pretrained(save_dinov2(tmp_path / "reg", registers=4)).eval()
    x = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    tokens = frozen_features(frozen, x)
    assert tokens.shape == (1, 16, 32)                       # (56 / 14)^2 patches: no CLS, no registers
    assert torch.equal(tokens, frozen(pixel_values=x).last_hidden_state[:, 5:])


def test_the_student_has_the_dinov2_encoder_and_the_papers_head(tmp_path):
    from transformers import Dinov2Model

    frozen_dir = save_dinov2(tmp_path / "dinov2", layers=8)
    student = from_dinov2(frozen_dir, seed=3)
    encoder = Dinov2Model.from_pretrained(frozen_dir).state_dict()
    for name, value in student.backbone.state_dict().items():
        assert torch.equal(value, encoder[name]), name         # every encoder weight copied
    config = student.config
    assert config.backbone_config.out_features == ["stage2", "stage4", "stage6", "stage8"]
    assert (config.neck_hidden_sizes, config.fusion_hidden_size) == ([4, 8, 16, 32], 8)
    again = from_dinov2(frozen_dir, seed=3)
    other = from_dinov2(frozen_dir, seed=4)
    head = lambda m: torch.cat([p.flatten() for p in m.head.parameters()])  # noqa: E731
    assert torch.equal(head(student), head(again)) and not torch.equal(head(student), head(other))


def test_the_paper_head_sizes_agree_with_the_official_configurations():
    for size in ("vits", "vitb", "vitl"):      # the teacher sizes labelers.random_models builds
        spec = TEACHER_SIZES[size]
        head = head_for(spec.hidden, spec.layers)
        assert head == PAPER_HEADS[spec.hidden]
        assert (tuple(i + 1 for i in head.layers), head.neck, head.fusion) == (spec.out, spec.neck, spec.fusion)
    assert head_for(1536, 40).layers == (9, 19, 29, 39)          # ViT-G
    with pytest.raises(ValueError, match="four encoder layers"):
        head_for(32, 2)


def test_trim_applies_to_pseudo_labels_only(tmp_path, monkeypatch):
    import pipelines.student.train as train_module

    seen = []
    real = train_module.affine_invariant_loss
    monkeypatch.setattr(train_module, "affine_invariant_loss",
                        lambda *a, **k: seen.append(("labeled", k.get("trim", 0.0))) or real(*a, **k))
    real_cutmix = train_module.cutmix_loss
    monkeypatch.setattr(train_module, "cutmix_loss",
                        lambda *a, **k: seen.append(("pseudo", k.get("trim", 0.0))) or real_cutmix(*a, **k))
    frozen_dir = save_dinov2(tmp_path / "dinov2")
    from transformers import Dinov2Model

    cfg = TrainConfig(labeled=("x",), pseudo=("y",), student=None, init=frozen_dir, frozen=None, out="", trim=0.1)
    step_losses(from_dinov2(frozen_dir), Dinov2Model.from_pretrained(frozen_dir), batch(), cfg,
                torch.Generator().manual_seed(0))
    assert seen == [("labeled", 0.0), ("pseudo", 0.1)]


@pytest.mark.parametrize("kw, said", [
    ({"student": "s", "init": "d"}, "exactly one of them"),
    ({"student": None, "init": None}, "exactly one of them"),
    ({"student": "s", "init": None, "frozen": None}, "--frozen DIR"),
    ({"trim": 1.0}, "0 <= trim < 1"),
])
def test_the_recipe_is_checked(kw, said):
    base = dict(labeled=("x",), pseudo=("y",), student=None, init="d", frozen=None, out="")
    with pytest.raises(ValueError) as e:
        TrainConfig(**{**base, **kw})
    assert said in str(e.value)


def test_losses_are_finite_on_a_random_batch(tmp_path):
    frozen_dir = save_dinov2(tmp_path / "dinov2")
    from transformers import Dinov2Model

    cfg = TrainConfig(labeled=("x",), pseudo=("y",), student=None, init=frozen_dir, frozen=None, out="")
    losses = step_losses(from_dinov2(frozen_dir), Dinov2Model.from_pretrained(frozen_dir), batch(6), cfg,
                         torch.Generator().manual_seed(0))
    assert all(np.isfinite(float(v.detach())) for v in losses.values())
