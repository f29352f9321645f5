"""Strong perturbations: the colour operations against Python's colorsys and PIL's ImageEnhance,
the blur against a numpy convolution, and StrongAugment / CutMix against their properties
(determinism, range, identity when switched off, exact pasting, a permutation of partners)."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from pipelines.student.perturb import (
    CutMix,
    StrongAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    grayscale,
    hsv_to_rgb,
    rgb_to_hsv,
)

OFF = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def image(seed=0, shape=(3, 12, 16)):
    return torch.rand(shape, generator=gen(seed))


def quantized(seed=0, h=12, w=16):
    """An 8-bit image as PIL sees it, and the same pixels as a float tensor in [0, 1]."""
    a = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(a), torch.from_numpy(a).permute(2, 0, 1).double() / 255


def as_pil_array(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).double() / 255


# ---- colour operations -----------------------------------------------------------------------

def test_hsv_matches_colorsys_and_round_trips():
    img = image(1, (3, 5, 7)).double()
    img[:, 0, 0] = 0.4   # a grey pixel: hue and saturation 0
    img[:, 0, 1] = 0.0   # black
    hsv = rgb_to_hsv(img)
    for y in range(5):
        for x in range(7):
            ref = colorsys.rgb_to_hsv(*img[:, y, x].tolist())
            np.testing.assert_allclose(hsv[:, y, x].tolist(), ref, atol=1e-12)
    torch.testing.assert_close(hsv_to_rgb(hsv), img, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shift", [0.1, -0.25, 0.5])
def test_hue_shift_matches_colorsys(shift):
    img = image(2, (3, 4, 6)).double()
    out = adjust_hue(img, shift)
    for y in range(4):
        for x in range(6):
            h, s, v = colorsys.rgb_to_hsv(*img[:, y, x].tolist())
            ref = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
            np.testing.assert_allclose(out[:, y, x].tolist(), ref, atol=1e-12)


def test_hue_shift_of_zero_leaves_the_image():
    img = image(3)
    torch.testing.assert_close(adjust_hue(img, 0.0), img, atol=1e-6, rtol=0)
    keep = StrongAugment(brightness=0, contrast=0, saturation=0, hue=0, jitter_p=1.0,
                         grayscale_p=0.0, blur_p=0.0)
    torch.testing.assert_close(keep(img, gen()), img, atol=1e-6, rtol=0)


@pytest.mark.parametrize("factor", [0.4, 1.3])
def test_brightness_contrast_saturation_match_pil(factor):
    pil, img = quantized(4)
    tol = 1.5 / 255   # PIL rounds to 8 bits, and rounds the contrast mean to a grey level
    for ours, theirs in ((adjust_brightness, ImageEnhance.Brightness),
                         (adjust_contrast, ImageEnhance.Contrast),
                         (adjust_saturation, ImageEnhance.Color)):
        ref = as_pil_array(theirs(pil).enhance(factor))
        torch.testing.assert_close(ours(img, factor), ref, atol=tol, rtol=0)


def test_grayscale_matches_pil_luma():
    pil, img = quantized(5)
    ref = torch.from_numpy(np.array(pil.convert("L"))).double() / 255
    torch.testing.assert_close(grayscale(img)[0], ref, atol=1 / 255, rtol=0)


# ---- blur ------------------------------------------------------------------------------------

def ref_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Full 2-D kernel, numpy reflect padding (edge pixel not repeated), loop over offsets."""
    r = int(np.ceil(3 * sigma))
    x = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k2 = np.outer(k, k) / k.sum() ** 2
    c, h, w = img.shape
    padded = np.pad(img, ((0, 0), (r, r), (r, r)), mode="reflect")
    out = np.zeros_like(img)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out += k2[dy, dx] * padded[:, dy:dy + h, dx:dx + w]
    return out


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_blur_matches_numpy_convolution(sigma):
    img = image(6, (3, 14, 17)).double()
    np.testing.assert_allclose(gaussian_blur(img, sigma).numpy(), ref_blur(img.numpy(), sigma),
                               atol=1e-12)


def high_frequency_energy(img: torch.Tensor) -> float:
    lap = 4 * img[..., 1:-1, 1:-1] - img[..., :-2, 1:-1] - img[..., 2:, 1:-1] \
        - img[..., 1:-1, :-2] - img[..., 1:-1, 2:]
    return float((lap ** 2).mean())


def test_blur_removes_high_frequencies_and_keeps_the_mean():
    img = image(7, (3, 32, 32))
    blurred = StrongAugment(jitter_p=0.0, grayscale_p=0.0, blur_p=1.0)(img, gen(7))
    assert high_frequency_energy(blurred) < 0.5 * high_frequency_energy(img)
    assert blurred.mean().item() == pytest.approx(img.mean().item(), abs=0.01)


def test_blur_fits_a_kernel_larger_than_the_image():
    img = image(8, (3, 3, 40))
    out = gaussian_blur(img, 2.0)
    assert out.shape == img.shape and torch.isfinite(out).all()


# ---- StrongAugment ---------------------------------------------------------------------------

def test_augment_is_deterministic_for_a_seed_and_varies_across_seeds():
    batch = image(9, (4, 3, 12, 16))
    aug = StrongAugment(jitter_p=1.0, blur_p=1.0)
    assert torch.equal(aug(batch, gen(1)), aug(batch, gen(1)))
    assert not torch.equal(aug(batch, gen(1)), aug(batch, gen(2)))


def test_augment_draws_each_image_of_a_batch_on_its_own():
    batch = image(10).expand(3, 3, 12, 16)
    out = StrongAugment(jitter_p=1.0)(batch, gen(3))
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])


def test_augment_keeps_shape_and_range():
    aug = StrongAugment(brightness=2.0, contrast=2.0, saturation=2.0, hue=0.5, jitter_p=1.0)
    for seed in range(20):
        for img in (image(seed), image(seed, (2, 3, 9, 5))):
            out = aug(img, gen(seed))
            assert out.shape == img.shape and out.dtype == img.dtype
            assert out.min() >= 0 and out.max() <= 1


def test_augment_switched_off_is_the_identity():
    img = image(11, (2, 3, 12, 16))
    assert torch.equal(StrongAugment(**OFF)(img, gen()), img)


def test_grayscale_gives_equal_channels():
    out = StrongAugment(**{**OFF, "grayscale_p": 1.0})(image(12, (2, 3, 8, 8)), gen())
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_augment_rejects_bad_settings_and_inputs():
    with pytest.raises(ValueError):
        StrongAugment(hue=0.6)
    with pytest.raises(ValueError):
        StrongAugment(blur_p=1.5)
    with pytest.raises(ValueError):
        StrongAugment()(torch.zeros(1, 8, 8), gen())


# ---- CutMix ----------------------------------------------------------------------------------

def check_mix(images: torch.Tensor, result, area=(0.02, 0.40)):
    """The mixed batch is u_a on the mask and u_b = images[partner] off it, the part from u_b
    is one box of the drawn size, and unmixed images are untouched."""
    b, _, h, w = images.shape
    mask, partner = result.mask, result.partner
    assert mask.dtype == torch.bool and mask.shape == (b, h, w)
    assert sorted(partner.tolist()) == list(range(b))                 # a permutation
    m = mask[:, None].expand_as(images)
    assert torch.equal(result.images[m], images[m])
    assert torch.equal(result.images[~m], images[partner][~m])
    for i in range(b):
        if partner[i] == i:
            assert mask[i].all()
            continue
        box = ~mask[i]
        rows, cols = box.any(1).nonzero().ravel(), box.any(0).nonzero().ravel()
        bh, bw = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == bh and cols[-1] - cols[0] + 1 == bw
        assert box.sum() == bh * bw                                   # one solid rectangle
        tol = (0.5 * (bh + bw) + 1) / (h * w)                         # whole-pixel sides
        assert area[0] - tol <= box.sum() / (h * w) <= area[1] + tol


def test_cutmix_pastes_a_box_from_the_partner():
    images = image(13, (6, 3, 24, 40))
    for seed in range(30):
        check_mix(images, CutMix(p=0.5)(images, gen(seed)))


def test_cutmix_with_p_one_mixes_every_image_with_another():
    images = image(14, (5, 3, 20, 20))
    for seed in range(10):
        result = CutMix(p=1.0)(images, gen(seed))
        assert (result.partner != torch.arange(5)).all()
        assert (~result.mask).flatten(1).any(1).all()
        check_mix(images, result)


def test_cutmix_with_p_zero_leaves_the_batch():
    images = image(15, (4, 3, 8, 8))
    result = CutMix(p=0.0)(images, gen())
    assert torch.equal(result.images, images) and result.mask.all()
    assert torch.equal(result.partner, torch.arange(4))


def test_cutmix_single_image_has_no_partner():
    images = image(16, (1, 3, 8, 8))
    result = CutMix(p=1.0)(images, gen())
    assert torch.equal(result.images, images) and result.mask.all()


def test_cutmix_is_deterministic_for_a_seed():
    images = image(17, (6, 3, 16, 16))
    a, b = CutMix()(images, gen(5)), CutMix()(images, gen(5))
    assert all(torch.equal(x, y) for x, y in ((a.images, b.images), (a.mask, b.mask),
                                               (a.partner, b.partner)))


def test_cutmix_box_size_and_clipping():
    images = image(18, (2, 3, 20, 20))
    square = CutMix(p=1.0, area=(0.25, 0.25), aspect=(1.0, 1.0))(images, gen())
    assert ((~square.mask).flatten(1).sum(1) == 100).all()        # 10 x 10
    # width sqrt(0.4 * 400 * 10) = 40 > 20 is clipped to the image, height sqrt(16) = 4 stays
    wide = CutMix(p=1.0, area=(0.4, 0.4), aspect=(10.0, 10.0))(images, gen())
    box = ~wide.mask
    assert (box.all(2).sum(1) == 4).all() and (box.flatten(1).sum(1) == 80).all()  # full rows


def test_cutmix_is_decided_per_batch_with_probability_p():
    images = torch.zeros(8, 3, 4, 4)
    g = gen(19)
    draws = [CutMix(p=0.5)(images, g).partner != torch.arange(8) for _ in range(400)]
    assert all(bool(d.all()) or not bool(d.any()) for d in draws)     # whole batch or none
    rate = torch.stack(draws).double().mean().item()
    assert rate == pytest.approx(0.5, abs=0.07)
