"""The student's losses against per-image numpy loops written here from PAPER.md's formulas, and
against the properties that make them the right losses: affine invariance, masking, trimming,
area weighting, and no gradient where the feature tolerance is met."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.student.losses import (
    EPS,
    affine_invariant_loss,
    cutmix_loss,
    feature_alignment_loss,
    scale_shift_normalize,
)

# ---- independent references ---------------------------------------------------------------

def ref_normalize(x: np.ndarray) -> np.ndarray:
    """PAPER.md: t = median (the lower middle value for an even count), s = mean |x - t|."""
    t = np.sort(x)[(len(x) - 1) // 2]
    return (x - t) / max(np.mean(np.abs(x - t)), EPS)


def ref_affine(pred, target, valid, trim=0.0) -> float:
    losses = []
    for p, t, v in zip(pred, target, valid):
        n = int(v.sum())
        if n == 0:
            continue
        err = np.sort(np.abs(ref_normalize(p[v]) - ref_normalize(t[v])))
        losses.append(err[: n - math.floor(trim * n)].mean())
    return float(np.mean(losses)) if losses else 0.0


def random_maps(seed, b=4, h=9, w=11, p_valid=0.7):
    rng = np.random.default_rng(seed)
    pred = rng.normal(size=(b, h, w))
    target = rng.uniform(0.0, 1.0, size=(b, h, w)) ** 2
    valid = rng.random((b, h, w)) < p_valid
    return pred, target, valid


def t(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


# ---- scale_shift_normalize -------------------------------------------------------------------

def test_normalize_uses_the_lower_median_for_even_counts():
    d = t([[[4.0, 1.0, 3.0, 2.0, 100.0]]])
    valid = torch.tensor([[[True, True, True, True, False]]])
    # median of {1, 2, 3, 4} is 2 (lower), s = mean |{2, -1, 1, 0}| = 1; invalid pixel -> 0
    assert scale_shift_normalize(d, valid).tolist() == [[[2.0, -1.0, 1.0, 0.0, 0.0]]]
    assert torch.median(d[valid]).item() == 2.0


@pytest.mark.parametrize("seed", range(3))
def test_normalize_matches_reference_per_image(seed):
    pred, _, valid = random_maps(seed)
    got = scale_shift_normalize(t(pred), torch.tensor(valid)).numpy()
    for g, p, v in zip(got, pred, valid):
        np.testing.assert_allclose(g[v], ref_normalize(p[v]), rtol=1e-12)
        assert (g[~v] == 0).all()


def test_normalize_of_a_flat_map_is_finite():
    out = scale_shift_normalize(torch.full((1, 4, 4), 0.3), torch.ones(1, 4, 4, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(1, 4, 4))


# ---- affine_invariant_loss -------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("trim", [0.0, 0.1, 0.25])
def test_affine_loss_matches_numpy_reference(seed, trim):
    pred, target, valid = random_maps(seed)
    got = affine_invariant_loss(t(pred), t(target), torch.tensor(valid), trim=trim)
    assert got.item() == pytest.approx(ref_affine(pred, target, valid, trim), rel=1e-10)


def test_affine_loss_is_invariant_to_scale_and_shift_of_pred():
    pred, target, valid = random_maps(7)
    args = (t(target), torch.tensor(valid))
    base = affine_invariant_loss(t(pred), *args, trim=0.1)
    assert affine_invariant_loss(t(pred * 3 + 5), *args, trim=0.1).item() == pytest.approx(
        base.item(), rel=1e-10)
    # ... and per image: each image may carry its own scale and shift
    scale, shift = np.array([0.5, 2, 7, 1e3])[:, None, None], np.array([-4, 0, 9, 1])[:, None, None]
    assert affine_invariant_loss(t(pred * scale + shift), *args).item() == pytest.approx(
        affine_invariant_loss(t(pred), *args).item(), rel=1e-10)


def test_affine_loss_is_zero_when_pred_is_an_affine_copy_of_the_target():
    _, target, valid = random_maps(8)
    assert affine_invariant_loss(t(target), t(target), torch.tensor(valid)).item() == 0.0
    assert affine_invariant_loss(t(2 * target - 1), t(target), torch.tensor(valid)).item() \
        == pytest.approx(0.0, abs=1e-12)


def test_trim_drops_exactly_the_largest_tenth():
    rng = np.random.default_rng(3)
    for n in (10, 19, 20, 37):   # floor(0.1 n) = 1, 1, 2, 3
        pred, target = rng.normal(size=(1, 1, n)), rng.normal(size=(1, 1, n))
        valid = np.ones((1, 1, n), dtype=bool)
        err = np.sort(np.abs(ref_normalize(pred.ravel()) - ref_normalize(target.ravel())))
        dropped = n // 10
        got = affine_invariant_loss(t(pred), t(target), torch.tensor(valid), trim=0.1).item()
        assert got == pytest.approx(err[: n - dropped].mean(), rel=1e-10)
        assert got < err.mean()


def test_affine_loss_gradient_reaches_valid_pixels_only():
    pred, target, valid = random_maps(5)
    target[~valid] = np.nan   # holes must not leak into the loss or its gradient
    pred[~valid] = np.inf
    pred_t = t(pred, grad=True)
    loss = affine_invariant_loss(pred_t, t(target), torch.tensor(valid), trim=0.1)
    loss.backward()
    g = pred_t.grad.numpy()
    assert np.isfinite(loss.item()) and np.isfinite(g).all()
    assert (g[~valid] == 0).all()
    assert np.count_nonzero(g[valid]) > 0.8 * valid.sum()


def test_image_without_valid_pixels_is_ignored():
    pred, target, valid = random_maps(6)
    with_empty = valid.copy()
    with_empty[2] = False
    kept = [0, 1, 3]
    got = affine_invariant_loss(t(pred), t(target), torch.tensor(with_empty))
    expect = affine_invariant_loss(t(pred[kept]), t(target[kept]), torch.tensor(valid[kept]))
    assert got.item() == pytest.approx(expect.item(), rel=1e-12)


def test_no_valid_pixel_at_all_gives_zero_in_the_graph():
    pred = t(np.ones((2, 3, 3)), grad=True)
    loss = affine_invariant_loss(pred, t(np.ones((2, 3, 3))), torch.zeros(2, 3, 3, dtype=bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


# ---- cutmix_loss -----------------------------------------------------------------------------

def box_masks(b, h, w, seed):
    """True outside a random box (pixels from u_a), False inside (from u_b)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((b, h, w), dtype=bool)
    for m in mask:
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        m[y:y + rng.integers(2, h - y + 1), x:x + rng.integers(2, w - x + 1)] = False
    return mask


@pytest.mark.parametrize("trim", [0.0, 0.1])
def test_cutmix_loss_is_the_area_weighted_sum_of_the_two_regions(trim):
    pred, label_a, valid = random_maps(11)
    label_b = np.random.default_rng(12).uniform(size=pred.shape)
    mask = box_masks(*pred.shape, seed=13)
    per_image = []
    for i in range(len(pred)):
        s = slice(i, i + 1)
        m, v = mask[s], valid[s]
        inside = affine_invariant_loss(t(pred[s]), t(label_a[s]), torch.tensor(v & m), trim)
        outside = affine_invariant_loss(t(pred[s]), t(label_b[s]), torch.tensor(v & ~m), trim)
        per_image.append(m.mean() * inside.item() + (1 - m.mean()) * outside.item())
    got = cutmix_loss(t(pred), t(label_a), t(label_b), torch.tensor(mask), torch.tensor(valid),
                      trim=trim)
    assert got.item() == pytest.approx(np.mean(per_image), rel=1e-10)


def test_cutmix_loss_with_a_full_mask_is_the_affine_loss():
    pred, label_a, valid = random_maps(14)
    full = torch.ones(pred.shape, dtype=torch.bool)
    got = cutmix_loss(t(pred), t(label_a), t(np.full(pred.shape, np.nan)), full,
                      torch.tensor(valid), trim=0.1)
    assert got.item() == pytest.approx(
        affine_invariant_loss(t(pred), t(label_a), torch.tensor(valid), trim=0.1).item(),
        rel=1e-12)


def test_cutmix_loss_is_zero_when_each_region_matches_its_own_label_up_to_affine():
    _, label_a, _ = random_maps(15)
    label_b = np.random.default_rng(16).uniform(size=label_a.shape)
    mask = box_masks(*label_a.shape, seed=17)
    pred = np.where(mask, 4 * label_a + 1, 0.2 * label_b - 3)  # unrelated scales per region
    loss = cutmix_loss(t(pred, grad=True), t(label_a), t(label_b), torch.tensor(mask))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


# ---- feature_alignment_loss ------------------------------------------------------------------

def ref_alignment(student, frozen, alpha):
    s = student.reshape(-1, student.shape[-1])
    f = frozen.reshape(-1, frozen.shape[-1])
    cos = (s * f).sum(1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(f, axis=1))
    kept = cos[cos <= alpha]
    return 1 - kept.mean() if len(kept) else 0.0


def test_feature_alignment_matches_reference_and_leaves_out_aligned_positions():
    rng = np.random.default_rng(0)
    frozen = rng.normal(size=(2, 12, 16))
    student = rng.normal(size=(2, 12, 16))
    aligned = np.zeros((2, 12), dtype=bool)
    aligned[0, :5] = aligned[1, 3:6] = True
    student[aligned] = frozen[aligned] * 2 + 0.01 * rng.normal(size=(8, 16))  # cos ~ 1 > alpha
    student_t = t(student, grad=True)
    frozen_t = t(frozen, grad=True)
    loss = feature_alignment_loss(student_t, frozen_t, alpha=0.85)
    assert loss.item() == pytest.approx(ref_alignment(student, frozen, 0.85), rel=1e-10)
    loss.backward()
    norms = student_t.grad.norm(dim=-1).numpy()
    assert (norms[aligned] == 0).all()
    assert (norms[~aligned] > 0).all()
    assert frozen_t.grad is None   # frozen encoder: detached


def test_feature_alignment_is_zero_without_gradient_when_features_agree():
    f = torch.randn(2, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    student = f.clone().requires_grad_()
    loss = feature_alignment_loss(student, f)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_feature_alignment_on_maps_equals_tokens():
    gen = torch.Generator().manual_seed(2)
    student, frozen = torch.randn(2, 2, 16, 3, 4, dtype=torch.float64, generator=gen)
    tokens = lambda x: x.flatten(2).transpose(1, 2)   # (B, C, H, W) -> (B, HW, C)
    alpha = 0.1
    assert feature_alignment_loss(student, frozen, alpha).item() == pytest.approx(
        ref_alignment(tokens(student).numpy(), tokens(frozen).numpy(), alpha), rel=1e-10)


def test_feature_alignment_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        feature_alignment_loss(torch.zeros(1, 4, 8), torch.zeros(1, 4, 9))
