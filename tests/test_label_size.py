"""``label --label-size image|teacher|N``: labels smaller than their image, checked against an
independent reference (each family's own post-processing at the image's size, then resized with
torch), and every reader of an OUTPUT of each kind."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from builders import photo_samples, write_shard
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache
from helpers_models import iou, pearson
from PIL import Image
from scenes import npy, png, render
from skimage import data as skdata

from labelers.geometry import FAMILIES
from storage.label_format import is_label_shape, label_size, parse_label_size

# -- the rule ------------------------------------------------------------------------------------


def test_label_size_rule_and_its_check():
    assert label_size("image", 1500, 2250) == (1500, 2250)
    assert label_size("teacher", 1500, 2250, 518) == (518, 777)
    assert label_size("teacher", 3024, 4032, 518) == (518, 691)
    assert label_size("teacher", 400, 300, 518) == (400, 300)        # never larger than the image
    assert label_size(1024, 1500, 2250) == (683, 1024)
    assert label_size(1024, 2250, 1500) == (1024, 683)
    assert label_size(4096, 1500, 2250) == (1500, 2250)
    assert [parse_label_size(v) for v in ("image", "Teacher", "640", 640)] == ["image", "teacher", 640, 640]
    for bad in ("0", "-3", "half", "1.5", ""):
        with pytest.raises(ValueError, match="--label-size"):
            parse_label_size(bad)
    with pytest.raises(ValueError, match="needs a teacher"):
        label_size("teacher", 100, 100, None)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(x) for x in rng.integers(1, 5000, 2))
        if max(h, w) / min(h, w) > 8:
            continue
        for rule, short in (("teacher", int(rng.integers(14, 1600))), (int(rng.integers(1, 3000)), None)):
            small = label_size(rule, h, w, short)
            assert is_label_shape(small, (h, w)), (rule, short, h, w, small)
    # Refused: larger than the image, another aspect, one side only.
    for label, image in [((1501, 2250), (1500, 2250)), ((518, 700), (1500, 2250)), ((1500, 1000), (1500, 2250)),
                         ((777, 518), (1500, 2250))]:
        assert not is_label_shape(label, image), (label, image)


# -- the teacher and sky model at a label's size, against the family's own at the image's ---------

def _photos() -> list[np.ndarray]:
    sources = [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    sizes = [(300, 450), (420, 280), (333, 500)]
    return [np.asarray(Image.fromarray(s).resize((w, h), Image.BILINEAR)) for s, (h, w) in zip(sources, sizes)]


def _reference_at(full: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The image-size map resized with torch: antialiased bilinear where it shrinks."""
    x = torch.from_numpy(np.ascontiguousarray(full, np.float32))[None, None]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_restores_to_the_label_size_like_its_own_post_processing(tmp_path, family):
    """Teacher.predict(images, sizes) against Teacher.predict(images) (the family's own
    post-processing, which test_teacher_families holds equal to transformers' pipeline) resized
    to the label's size with torch. Checked failing once on purpose: restoring with the label's
    width and height swapped is caught by the shape, and a map flipped left-right by Pearson."""
    from labelers.random_models import save_random_family
    from labelers.teacher import Teacher
    from pipelines.pseudo_label import Labelers

    path, _ = save_random_family(tmp_path / family, family, scale="tiny")
    teacher = Teacher.load(str(path), name=family)
    images = _photos()
    full = teacher.predict(images)
    for rule in ("teacher", 160):
        labelers = Labelers(teacher, label_size=rule)
        sizes = [labelers.label_shape(*im.shape[:2]) for im in images]
        small = teacher.predict(images, sizes)
        for image, f, s, size in zip(images, full, small, sizes):
            assert s.raw.shape == size and is_label_shape(size, image.shape[:2])
            reference = _reference_at(f.raw, size)
            # Two resampling chains of one map differ near the pixel scale only (a random model's
            # map has much there): compared below it, they must agree; and everywhere, loosely.
            smooth = lambda a: ndimage.gaussian_filter(a.astype(np.float64), 2.0)  # noqa: E731
            span = float(reference.max() - reference.min())
            assert pearson(smooth(s.raw), smooth(reference)) > 0.98, (family, rule, size)
            assert pearson(s.raw, reference) > 0.9, (family, rule, size)
            assert np.abs(smooth(s.raw) - smooth(reference)).max() <= 0.1 * span + 1e-6, (family, rule, size)
            if family == "depth_pro":   # metric inverse depth: the same 1/m whatever the label's size
                assert np.median(s.raw) == pytest.approx(np.median(f.raw), rel=0.05)
                assert s.fov_deg == pytest.approx(f.fov_deg)


def test_sky_masks_at_the_label_size_agree_with_the_image_size_ones(tiny_models):
    from labelers.sky import SkySegmenter
    from pipelines.label_grid import resize_mask

    sky = SkySegmenter.load(tiny_models.sky)
    images = _photos()
    sizes = [label_size(160, *im.shape[:2]) for im in images]
    for full, small, size in zip(sky.masks(images), sky.masks(images, sizes), sizes):
        reference = resize_mask(full, size)
        assert small.shape == size and small.dtype == bool
        assert (small == reference).mean() > 0.95
        if reference.any():
            assert iou(small, reference) > 0.8


# -- an OUTPUT of each kind through every reader ----------------------------------------------------

def _gt_shard(directory, broken: bool) -> str:
    """Photos with ground truth carried through (depth.npy), so evaluate can score the labels,
    and a photo that is undecodable at first (``broken``), for a repair."""
    directory.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, (h, w) in enumerate([(120, 180), (150, 100), (96, 96)]):
        image, depth = render(h, w, seed=i)
        samples.append({"__key__": f"g{i}", "png": png(image), "depth.npy": npy(depth)})
    photos = photo_samples([(90, 140), (100, 70)], "p")
    if broken:
        photos[1]["jpg"] = b"\xff\xd8 not a jpeg"
    return write_shard(directory / "gt-000000.tar", samples + photos)


def _members(output) -> dict[str, dict[str, bytes]]:
    out: dict = {}
    for tar in sorted((output / "shards").rglob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def test_label_size_outputs_through_verify_resume_compare_evaluate_and_the_loader(tmp_path, tiny_models):
    """OUTPUTs at --label-size 64 and teacher beside one at the image's size: their PNGs are the
    rule's size, verify passes, a rerun resumes, another --label-size is refused (exit 2), a
    repair relabels at the pinned size, the audit page says the label's size, compare lays A over B, evaluate scores the labels against the carried ground truth, and the
    student loader yields aligned crops."""
    from pipelines.student.loader import DepthShards, LoaderConfig

    _gt_shard(tmp_path / "in", broken=True)
    inputs = str(tmp_path / "in") + "/"
    base = ["--teacher", tiny_models.teacher, "--sky", tiny_models.sky, "--workers", "1", "--json"]
    outs = {}
    for rule in ("image", "64", "teacher"):
        out = tmp_path / f"out-{rule}"
        flag = [] if rule == "teacher" else ["--label-size", rule]   # a new OUTPUT's default: the teacher's
        summary = json.loads(run("label", inputs, str(out), *base, *flag, check=0).stdout)
        assert summary["samples_ok"] == 4, summary
        outs[rule] = out
        doc = json.loads((out / "job.json").read_text())
        assert doc["label"]["label_size"] == (int(rule) if rule.isdigit() else rule)
        for key, members in _members(out).items():
            meta = json.loads(members["json"])
            h, w = meta["height"], meta["width"]
            want = {"image": (h, w), "64": label_size(64, h, w), "teacher": label_size("teacher", h, w, 518)}[rule]
            assert (meta["label_height"], meta["label_width"]) == want
            for ext in ("disp.png", "sky.png"):
                assert Image.open(io.BytesIO(members[ext])).size == (want[1], want[0]), (rule, key, ext)
        assert json.loads(run("verify", str(out), "--json", check=0).stdout)["ok"]
    # A rerun with the same size resumes (nothing to do); with another it is refused.
    again = json.loads(run("label", inputs, str(outs["64"]), *base, "--label-size", "64", check=0).stdout)
    assert again["shards_skipped"] == 1 and again["shards_committed"] == 0
    refused = run("label", inputs, str(outs["64"]), *base, "--label-size", "image", check=2)
    assert "label_size" in refused.stderr and "Traceback" not in refused.stderr
    # Without --label-size a rerun keeps the OUTPUT's size (a new OUTPUT got the teacher's, above).
    kept = json.loads(run("label", inputs, str(outs["64"]), *base, check=0).stdout)
    assert kept["shards_skipped"] == 1 and kept["shards_committed"] == 0
    # repair: the photo fixed since is relabeled at the OUTPUT's label size.
    _gt_shard(tmp_path / "in", broken=False)
    repaired = json.loads(run("label", inputs, str(outs["64"]), *base, "--label-size", "64", "--repair-errors",
                              check=0).stdout)
    assert repaired["rows_repaired"] == 1, repaired
    fixed = _members(outs["64"])["p0001"]
    assert Image.open(io.BytesIO(fixed["disp.png"])).size == label_size(64, 100, 70)[::-1]
    assert json.loads(run("verify", str(outs["64"]), "--json", check=0).stdout)["ok"]
    run("audit", str(outs["64"]), "--html", str(tmp_path / "audit.html"), check=0)
    assert "· label " in (tmp_path / "audit.html").read_text()
    # compare: A at 64 against B at the image's size, on A's grid; the same teacher, so they agree.
    r = json.loads(run("compare", str(outs["64"]), str(outs["image"]), "--json", check=0).stdout)
    assert r["counts"]["compared"] == 4 and r["counts"]["error_b"] == 1, r["counts"]
    assert r["figures"]["pearson"]["min"] > 0.95, r["figures"]["pearson"]
    # evaluate: the stored labels scored against the carried ground truth, laid over its grid.
    scored = {}
    for rule in ("image", "64"):
        e = json.loads(run("evaluate", str(outs[rule]), "--teacher", tiny_models.teacher, "--workers", "1",
                           "--json", check=0).stdout)
        assert e["summary"]["scored"] == 3, e
        scored[rule] = e["summary"]["label"]["abs_rel"]
    assert scored["64"] == pytest.approx(scored["image"], rel=0.25, abs=0.02)
    # The loader: crops of every sample, the image's and the labels' at the crop size.
    for rule, count in (("64", 5), ("teacher", 4)):
        samples = list(DepthShards(LoaderConfig((str(outs[rule]),), crop=48, seed=0)))
        assert len(samples) == count
        for s in samples:
            assert s["image"].shape == (3, 48, 48) and s["disparity"].shape == (48, 48) == s["sky"].shape


def test_loader_crops_of_a_small_label_align_with_the_same_crop_at_the_image_size(tmp_path):
    """The same photo labeled at the image's size and at the teacher's (stand-in teacher, a real
    scene's map): with one RNG the loader's image crops are equal and the label crops agree to
    resampling noise. Checked failing once on purpose: a label shifted by two label pixels
    (np.roll) fails the difference bounds."""
    from engine.bench.cpu_side import photo
    from engine.bench.stand_in import StandInSky, StandInTeacher
    from pipelines.pseudo_label import Labelers, label_shard
    from pipelines.student.loader import decode_sample, transform_sample
    from pipelines.tasks import ShardTask
    from storage.stores import open_store

    image = photo(800, 1200)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    (tmp_path / "in").mkdir()
    src = write_shard(tmp_path / "in" / "p-000000.tar", [{"__key__": "p", "jpg": buf.getvalue()}])
    crops = {}
    for rule in ("image", "teacher"):
        out = tmp_path / f"out-{rule}"
        label_shard(ShardTask(src, "s"), Labelers(StandInTeacher(1e6), StandInSky(), label_size=rule),
                    open_store(str(out)))
        (members,) = _members(out).values()
        rgb, disparity, valid, sky = decode_sample({"__key__": "p", **members})
        assert disparity.shape == ((800, 1200) if rule == "image" else (518, 777))
        crops[rule] = [transform_sample(rgb, disparity, valid, sky, 384, np.random.default_rng(seed))
                       for seed in range(4)]
    for full, small in zip(crops["image"], crops["teacher"]):
        assert np.array_equal(full["image"], small["image"])
        diff = np.abs(full["disparity"] - small["disparity"])
        # Resampling noise, and the sky's edge (a jump to 0) a pixel off here and there.
        assert np.mean(diff) < 0.004 and np.mean(diff > 0.03) < 0.01, (np.mean(diff), np.mean(diff > 0.03))
        assert pearson(full["disparity"], small["disparity"]) > 0.999
        assert (full["sky"] == small["sky"]).mean() > 0.99
