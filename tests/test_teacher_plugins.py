"""Teacher plugins: a model outside transformers, found through the `depth_engine.teachers` entry
point group, labels a shard on Ray like any teacher; a broken plugin is refused with one line.

The plugin is tests/plugin_site/tiny_depth_plugin.py, registered by the installed-distribution
metadata beside it (tiny_depth_plugin-0.1.dist-info/entry_points.txt, what `pip install` of a
plugin package writes); PYTHONPATH puts that folder on the path of the CLI and its Ray workers.
Its tiny random-weight model, saved as safetensors and loaded back, gives metric depth, a
confidence map and a field of view. The reference is the plugin's own output, computed here by
importing the plugin module, turned into the label with numpy (1/depth, min-max).
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import webdataset as wds
from builders import encode, write_shard
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache
from helpers_models import pearson
from PIL import Image
from test_teacher_families import _images

from labelers import plugins
from labelers.prediction import Prediction

SITE = Path(__file__).parent / "plugin_site"
SHAPES = [(120, 160), (600, 400), (90, 130), (333, 500), (330, 500)]  # the last two share a target size


@pytest.fixture
def site(monkeypatch):
    """The plugin's distribution on the path: this process's, and the CLI's and its workers'."""
    monkeypatch.syspath_prepend(str(SITE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")])))
    import tiny_depth_plugin

    return tiny_depth_plugin


@pytest.fixture
def weights(site, tmp_path):
    return site.save_weights(tmp_path / "tiny.safetensors")


def _minmax(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    lo, hi = x[valid].min(), x[valid].max()
    return np.where(valid, (x - lo) / (hi - lo), 0.0)


def test_entry_point_is_found_with_its_distribution_and_fingerprint(site, weights):
    ref = plugins.find(f"plugin:tiny:{weights}")
    assert (ref.name, ref.arg, ref.entry_point) == ("tiny", weights, "tiny_depth_plugin:TinyDepth")
    assert (ref.distribution, ref.version, ref.output) == ("tiny-depth-plugin", "0.1", "depth")
    assert ref.sha256 == site.TinyDepth.fingerprint(weights) and len(ref.sha256) == 64
    assert plugins.parse("plugin:da3:s3://bucket/ckpt:v2") == ("da3", "s3://bucket/ckpt:v2")


def test_plugin_labels_a_shard_on_ray_with_its_confidence_and_field_of_view(site, weights, tmp_path):
    images = _images()
    assert [im.shape[:2] for im in images] == SHAPES
    samples = [{"__key__": f"img{i:04d}", "png": encode(im, "PNG")} for i, im in enumerate(images)]
    (tmp_path / "raw").mkdir()
    write_shard(tmp_path / "raw" / "shard-000000.tar", samples)
    out = tmp_path / "out"
    teacher = f"plugin:tiny:{weights}"
    summary = json.loads(run("label", f"{tmp_path / 'raw'}/", str(out), "--teacher", teacher, "--sky", "none",
                             "--workers", "1", "--batch-size", "4", "--keep-depth", "--label-size", "image", "--json",
                             check=0).stdout)
    assert (summary["samples_ok"], summary["samples_error"]) == (len(samples), 0)

    label = json.loads((out / "job.json").read_text())["label"]
    assert label["teacher_output"] == "depth" and label["keep_depth"] is True
    assert label["teacher"] == {"source": teacher, "kind": "plugin", "entry_point": "tiny_depth_plugin:TinyDepth",
                                "distribution": "tiny-depth-plugin", "version": "0.1",
                                "sha256": site.TinyDepth.fingerprint(weights)}
    rows = {r["key"]: r for r in ds.dataset(str(out / "manifest"), format="parquet").to_table().to_pylist()}
    got = {s["__key__"]: s for s in wds.WebDataset(str(out / "shards" / "shard-000000.tar"), shardshuffle=False)}

    model = site.TinyDepth.load(weights, device="cpu", dtype=None)      # the reference: the plugin itself
    for s, image in zip(samples, images):
        key = s["__key__"]
        ref = model.predict([image])[0]
        depth = ref.raw.astype(np.float64)
        valid = np.isfinite(depth) & (depth > 0)
        assert valid.all() and depth.std() > 0.3                        # a varying map, metres
        want = _minmax(1 / depth, valid)
        disp = np.asarray(Image.open(io.BytesIO(got[key]["disp.png"]))) / 65535.0
        assert disp.shape == image.shape[:2]
        assert pearson(disp[valid], want[valid]) > 0.999, key
        assert np.abs(disp - want).max() < 2e-3, key
        assert pearson(disp[valid], _minmax(depth, valid)[valid]) < 0, key   # the 1/depth is what passes

        conf = np.asarray(Image.open(io.BytesIO(got[key]["conf.png"])))
        assert conf.dtype == np.uint8 and conf.shape == image.shape[:2]
        assert np.abs(conf / 255.0 - ref.confidence).max() <= 0.5 / 255 + 1e-6, key
        assert rows[key]["conf_mean"] == pytest.approx(float(ref.confidence.mean()), abs=1e-5)

        stored = np.asarray(Image.open(io.BytesIO(got[key]["depth.png"]))).astype(np.float64) / 256
        assert np.abs(stored - depth).max() <= 0.5 / 256 + 1e-4, key

        meta = json.loads(got[key]["json"])
        width = image.shape[1]
        assert meta["intrinsics"]["fov_deg"] == pytest.approx(ref.fov_deg, abs=1e-9)
        assert meta["intrinsics"]["focal_px"] == pytest.approx(0.5 * width / math.tan(math.radians(ref.fov_deg) / 2))
        assert meta["conf_mean"] == pytest.approx(rows[key]["conf_mean"], abs=1e-6)
        assert rows[key]["teacher"] == teacher and rows[key]["teacher_output"] == "depth"
        assert rows[key]["output_min"] == pytest.approx(depth.min(), rel=1e-5)

    from pipelines.verify import verify
    from storage.stores import open_store

    checked = verify(open_store(str(out)))                      # conf.png is checked like the other label PNGs
    assert (checked.checked, checked.bad) == (1, ())

    # Other weights under the same plugin are another label definition: refused before any work.
    other = site.save_weights(tmp_path / "other.safetensors", seed=1)
    p = run("label", f"{tmp_path / 'raw'}/", str(out), "--teacher", f"plugin:tiny:{other}", "--sky", "none",
            "--keep-depth", check=2)
    assert "another definition" in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("teacher, flag, said", [
    ("plugin:nope", [], "no teacher plugin named 'nope' (entry point group 'depth_engine.teachers'; installed: "),
    ("plugin:not-importable", [], "cannot be imported: ModuleNotFoundError: No module named 'tiny_depth_plugin_gone'"),
    ("plugin:no-predict", [], "has no predict: a plugin class needs load, target_size, predict and output"),
    ("plugin:bad-output", [], "declares output 'metres'; expected one of disparity, depth, inverse_depth"),
    ("plugin:tiny:W", ["--teacher-output", "disparity"], "outputs depth; --teacher-output disparity contradicts it"),
    ("plugin:tiny-relative:W", ["--keep-depth"], "--keep-depth needs a teacher that outputs metric depth"),
])
def test_a_broken_plugin_is_refused_with_one_line(site, weights, tmp_path, teacher, flag, said):
    from engine.config import ConfigError, LabelConfig
    from engine.label import label

    teacher = teacher.replace(":W", f":{weights}")
    config = LabelConfig(input=str(tmp_path / "raw.tar"), output=str(tmp_path / "out"), teacher=teacher,
                         sky=None, keep_depth="--keep-depth" in flag,
                         teacher_output=flag[1] if "--teacher-output" in flag else None)
    write_shard(tmp_path / "raw.tar", [{"__key__": "a", "png": encode(_images()[0], "PNG")}])
    with pytest.raises(ConfigError) as e:
        label(config)
    assert said in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()                               # refused before anything is written


def test_the_cli_says_the_one_line_and_exits_2(site, tmp_path):
    write_shard(tmp_path / "raw.tar", [{"__key__": "a", "png": encode(_images()[0], "PNG")}])
    p = run("label", str(tmp_path / "raw.tar"), str(tmp_path / "out"), "--teacher", "plugin:not-importable",
            "--sky", "none", check=2)
    assert p.stderr.strip().splitlines() == [
        "depth-engine: teacher plugin 'not-importable' (tiny_depth_plugin_gone:Teacher) cannot be imported: "
        "ModuleNotFoundError: No module named 'tiny_depth_plugin_gone'"]


class _Wrong:
    """A plugin implementation whose results do not fit the images it was given."""

    output = "depth"

    def __init__(self, result):
        self.result = result

    def target_size(self, height, width):
        return height, width

    def predict(self, images):
        return [self.result(im) for im in images]


@pytest.mark.parametrize("result, said", [
    (lambda im: Prediction(np.ones((4, 4), np.float32)), "returned a float32 map of shape (4, 4) for a 20x30 image"),
    (lambda im: np.ones(im.shape[:2], np.uint8), "returned a uint8 map"),
    (lambda im: Prediction(np.ones(im.shape[:2], np.float32), np.full(im.shape[:2], 2.0, np.float32)),
     "returned confidence in [2, 2]; expected [0, 1]"),
    (lambda im: Prediction(np.ones(im.shape[:2], np.float32), fov_deg=180.0), "field of view of 180.0 degrees"),
])
def test_results_that_do_not_fit_the_image_are_an_error_not_a_stretched_label(result, said):
    teacher = plugins.PluginTeacher("plugin:wrong", "depth", "cpu", None, _Wrong(result))
    with pytest.raises(ValueError) as e:
        teacher.predict([np.zeros((20, 30, 3), np.uint8)])
    assert said in str(e.value)
    ok = plugins.PluginTeacher("plugin:ok", "depth", "cpu", None, _Wrong(lambda im: np.ones(im.shape[:2], np.float64)))
    (p,) = ok.predict([np.zeros((20, 30, 3), np.uint8)])
    assert isinstance(p, Prediction) and p.raw.dtype == np.float32 and p.confidence is None and p.fov_deg is None

