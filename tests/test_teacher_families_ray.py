"""Each transformers depth family labels a shard on Ray, and its labels are the family's own output
turned into the paper's label (disparity, min-max per image).

DPT (aspect kept, BEiT backbone), GLPN and ZoeDepth: tiny random-weight models of the real
architectures (built by tests/test_teacher_families.py), saved with their PIL processors, label one
shard of mixed image sizes through the real CLI (`depth-engine label`, a local Ray, one worker,
batches of 4, sky off). Each image's label is compared with a reference computed here without the
engine: transformers' own `pipeline("depth-estimation")` (the processor, the model, its
post_process_depth_estimation), 1/depth on finite > 0 pixels for the metric families (GLPN,
ZoeDepth), min-max over those pixels. DPT is labeled with `--teacher-output disparity` and its raw
output is the disparity. Depth Anything relative and metric are covered by test_teacher_output.py.

A metric family's labels must also disagree with the unconverted depth: the same comparison without
1/depth fails (Pearson < 0), so dropping the conversion in the engine cannot pass this test.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
import webdataset as wds
from builders import encode, write_shard
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache
from helpers_models import pearson
from PIL import Image
from test_teacher_families import (
    _dpt_beit,
    _glpn,
    _images,
    _zoedepth,
    torchvision_resize_stand_in,  # noqa: F401 - a fixture, used below
)

from labelers.normalize import DEPTH, DISPARITY

SHAPES = [(120, 160), (600, 400), (90, 130), (333, 500)]  # H x W; the first four of _images()

FAMILIES = {  # name: (builder, --teacher-output flag, the kind the job must pin)
    "dpt": (_dpt_beit, ["--teacher-output", "disparity"], DISPARITY),
    "glpn": (_glpn, [], DEPTH),
    "zoedepth": (lambda: _zoedepth(32), [], DEPTH),
}


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """One input shard: PNG photos of mixed sizes (lossless, so both sides see the same pixels)."""
    images = _images()[: len(SHAPES)]
    assert [im.shape[:2] for im in images] == SHAPES
    samples = [{"__key__": f"img{i:04d}", "png": encode(im, "PNG")} for i, im in enumerate(images)]
    root = tmp_path_factory.mktemp("raw")
    write_shard(root / "shard-000000.tar", samples)
    return root, samples


def _save(family, directory):
    builder = FAMILIES[family][0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, processor = builder()
    model.eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


def _minmax(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    lo, hi = x[valid].min(), x[valid].max()
    return np.where(valid, (x - lo) / (hi - lo), 0.0)


@pytest.mark.usefixtures("torchvision_resize_stand_in")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_labels_on_ray_are_the_pipeline_output_as_disparity(tmp_path, shard, family):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation, pipeline

    raw_dir, samples = shard
    _, flag, kind = FAMILIES[family]
    teacher = _save(family, tmp_path / family)
    out = tmp_path / "out"
    summary = json.loads(run("label", f"{raw_dir}/", str(out), "--teacher", teacher, "--sky", "none", "--label-size", "image",
                             "--workers", "1", "--batch-size", "4", *flag, "--json", check=0).stdout)
    assert (summary["samples_ok"], summary["samples_error"]) == (len(samples), 0)
    assert json.loads((out / "job.json").read_text())["label"]["teacher_output"] == kind
    table = ds.dataset(str(out / "manifest"), format="parquet").to_table()
    assert set(table.column("teacher_output").to_pylist()) == {kind}
    got = {s["__key__"]: s for s in wds.WebDataset(str(out / "shards" / "shard-000000.tar"), shardshuffle=False)}
    assert set(got) == {s["__key__"] for s in samples}

    # The reference: the family's own pipeline, nothing of the engine.
    processor = AutoImageProcessor.from_pretrained(teacher)
    assert type(processor).__name__.endswith("Pil")
    model = AutoModelForDepthEstimation.from_pretrained(teacher).eval()
    estimator = pipeline("depth-estimation", model=model, image_processor=processor, device="cpu")
    for s in samples:
        image = Image.open(io.BytesIO(s["png"])).convert("RGB")
        raw = estimator(image)["predicted_depth"].numpy().astype(np.float64)
        assert raw.shape == (image.height, image.width)
        assert np.std(raw) > 1e-4 * abs(np.mean(raw))  # the random model gives a varying map
        if kind == DEPTH:
            valid = np.isfinite(raw) & (raw > 0)
            disp = np.where(valid, 1 / np.where(valid, raw, 1), 0.0)
        else:
            valid = np.isfinite(raw)
            disp = raw
        want = _minmax(disp, valid)

        label = np.asarray(Image.open(io.BytesIO(got[s["__key__"]]["disp.png"]))) / 65535.0
        assert label.shape == (image.height, image.width), (family, s["__key__"])
        assert valid.mean() > 0.99, (family, s["__key__"])
        r = pearson(label[valid], want[valid])
        assert r > 0.999, (family, s["__key__"], image.size, r)
        assert np.all(label[~valid] == 0)
        if kind == DEPTH:  # the same check without 1/depth fails: the conversion is what passes it
            assert pearson(label[valid], _minmax(raw, valid)[valid]) < 0, (family, s["__key__"])
