"""``label --draft-decode``: JPEGs decoded in the DCT domain at the scale the models need. The
array is smaller, the sample keeps the image's own size, labels come out at the label size, and
the picture is the full decode's, downscaled (checked against a box filter written here)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from builders import write_shard
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache
from PIL import Image

from engine.bench.cpu_side import photo
from engine.bench.stand_in import StandInSky, StandInTeacher
from engine.config import ConfigError, LabelConfig
from labelers.ground_truth import GroundTruthRule
from pipelines.decode import decode, decode_reduced, sample_from_members
from pipelines.pseudo_label import Labelers, label_batch
from pipelines.encode import encode


def _jpeg(image: np.ndarray, orientation: int | None = None) -> bytes:
    im = Image.fromarray(image)
    buf = io.BytesIO()
    if orientation is None:
        im.save(buf, format="JPEG", quality=92)
    else:
        exif = im.getexif()
        exif[0x0112] = orientation
        im.save(buf, format="JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


def _box(image: np.ndarray, k: int) -> np.ndarray:
    h, w = image.shape[0] // k * k, image.shape[1] // k * k
    return image[:h, :w].astype(np.float64).reshape(h // k, k, w // k, k, 3).mean(axis=(1, 3))


@pytest.mark.parametrize("orientation", [None, 6, 3])
def test_a_drafted_jpeg_is_the_full_decode_downscaled_and_keeps_the_images_size(orientation):
    image = photo(600, 904, seed=1)
    data = _jpeg(image, orientation)
    full, size = decode_reduced(data)
    asked = []
    small, drafted_size = decode_reduced(data, reduce=lambda h, w: asked.append((h, w)) or (140, 200))
    assert size == drafted_size == full.shape[:2]              # the image's own, after orientation
    assert asked == [size]
    assert small.shape[0] >= 140 and small.shape[1] >= 200     # covers what was asked
    (h, w), covers = full.shape[:2], lambda k: -(-full.shape[0] // k) >= 140 and -(-full.shape[1] // k) >= 200
    k = max(k for k in (1, 2, 4, 8) if covers(k))       # the smallest scale that covers (1/4, or 1/2 turned)
    assert k == (2 if orientation == 6 else 4) and small.shape[:2] == (-(-h // k), -(-w // k))
    box = _box(full, k)
    diff = np.abs(small[:box.shape[0], :box.shape[1]].astype(np.float64) - box)
    assert diff.mean() < 2.5, diff.mean()                      # the same picture, the same way up
    turned = np.abs(small[:box.shape[0], :box.shape[1]].astype(np.float64) - box[::-1, ::-1]).mean()
    assert turned > 10 * diff.mean()


def test_other_formats_decode_at_full_size_and_without_a_reduce_nothing_changes():
    image = photo(300, 452, seed=2)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    small, size = decode_reduced(buf.getvalue(), reduce=lambda h, w: (10, 10))
    np.testing.assert_array_equal(small, image)
    assert size == (300, 452)
    data = _jpeg(image)
    np.testing.assert_array_equal(decode_reduced(data)[0], np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("label_size", ["image", "teacher"])
def test_labels_of_a_drafted_decode_are_at_the_label_size(label_size):
    """The model step sees the small array and restores to the label size of the image's size."""
    labelers = Labelers(StandInTeacher(rate=1e6), StandInSky(), label_size=label_size, draft_decode=True)
    data = _jpeg(photo(1400, 2100, seed=0))
    sample = labelers.decode(sample_from_members({"__key__": "k", "jpg": data}, "s"))
    assert (sample.height, sample.width) == (1400, 2100)
    assert sample.image.shape[:2] == (700, 1050)               # 1/2 covers the sky's 640 and the teacher's 518x784
    assert labelers.decode_size(1400, 2100) == (640, labelers.teacher.target_size(1400, 2100)[1]) == (640, 784)
    label_batch([sample], labelers)
    want = labelers.label_shape(1400, 2100)
    assert sample.raw.shape == sample.sky.shape == want
    row = encode(sample, labelers.names).row
    assert (row["height"], row["width"], row["label_height"], row["label_width"]) == (1400, 2100, *want)
    full = decode(sample_from_members({"__key__": "k", "jpg": data}, "s"))
    assert full.image.shape[:2] == (1400, 2100)


def test_draft_decode_is_refused_without_a_teacher(tmp_path):
    with pytest.raises(ValueError, match="needs a teacher"):
        Labelers(None, None, GroundTruthRule(), draft_decode=True)
    with pytest.raises(ConfigError, match="--draft-decode"):
        LabelConfig(input="a/", output=str(tmp_path), teacher=None, ground_truth=GroundTruthRule(), draft_decode=True)


def test_the_cli_pins_draft_decode_and_refuses_a_rerun_without_it(tmp_path, tiny_models):
    photos = [photo(1100, 1660, seed=s) for s in range(2)]
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "shard-000000.tar",
                [{"__key__": f"p{i}", "jpg": _jpeg(p)} for i, p in enumerate(photos)])
    inputs, out = str(tmp_path / "in") + "/", tmp_path / "out"
    base = ["--teacher", tiny_models.teacher, "--sky", tiny_models.sky, "--workers", "1", "--json"]
    summary = json.loads(run("label", inputs, str(out), *base, "--draft-decode", check=0).stdout)
    assert summary["samples_ok"] == 2, summary
    label = json.loads((out / "job.json").read_text())["label"]
    assert label["draft_decode"] is True and label["label_size"] == "teacher"
    assert json.loads(run("verify", str(out), "--json", check=0).stdout)["ok"]
    refused = run("label", inputs, str(out), *base, check=2)
    assert "draft_decode" in refused.stderr and "Traceback" not in refused.stderr
