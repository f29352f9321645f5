"""The stand-in accelerator's labels have a real map's statistics (so byte and encode figures
taken with it are honest), and ``bench --stand-in-rate`` reports its figures consistently.
Figures are printed, never asserted against a time."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache
from PIL import Image


def _png16_bytes_per_pixel(disparity: np.ndarray) -> float:
    """The engine's codec written out independently: min-max over finite pixels, x 65535,
    16-bit grey PNG at zlib level 1, with Pillow directly."""
    d = np.asarray(disparity, dtype=np.float64)
    ok = np.isfinite(d)
    lo, hi = d[ok].min(), d[ok].max()
    value = np.where(ok, np.rint((d - lo) / (hi - lo) * 65535), 0).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(value).save(buf, format="PNG", compress_level=1)
    return len(buf.getvalue()) / d.size


def _ground_truth() -> np.ndarray:
    from skimage import data

    return np.asarray(data.stereo_motorcycle()[2], dtype=np.float32)


def test_stand_in_labels_compress_like_a_real_disparity_map():
    """The stand-in's disp.png at the motorcycle's own size costs what the motorcycle's ground
    truth costs stored the same way (1.2 B/px), not a random teacher's ~0.01. Checked failing once
    by handing the check a random-weight-like map (a faint ramp): 0.04 B/px."""
    from engine.bench.stand_in import StandInTeacher
    from pipelines.encode import encode
    from pipelines.sample import Sample
    from storage.label_format import DISP_MEMBER

    truth = _png16_bytes_per_pixel(_ground_truth())
    assert 1.0 < truth < 1.5
    (prediction,) = StandInTeacher(rate=1e6).predict([np.zeros((500, 741, 3), np.uint8)])
    assert prediction.raw.shape == (500, 741) and np.isfinite(prediction.raw).all()
    sample = Sample("k", "src", image_ext="jpg", image_bytes=b"", height=500, width=741, raw=prediction.raw)
    members = encode(sample, {"teacher": "stand-in", "teacher_output": "disparity", "sky_model": "none"}).members
    engine = len(members[DISP_MEMBER]) / prediction.raw.size
    assert 0.85 * truth < engine < 1.25 * truth, (engine, truth)
    flat = np.linspace(1.0, 1.001, 741, dtype=np.float32)[None].repeat(500, 0)
    assert _png16_bytes_per_pixel(flat) < 0.2 * truth


def test_stand_in_map_is_the_reference_scene_through_a_teachers_resolution():
    """At the teacher's 518 short side and back, the map keeps the scene: Pearson with the
    (hole-filled) ground truth > 0.98 on its measured pixels, portrait images get it upright."""
    from engine.bench.stand_in import image_map, sky_mask, teacher_map

    truth = _ground_truth()
    ok = np.isfinite(truth)
    restored = image_map(*truth.shape)
    assert np.corrcoef(restored[ok], truth[ok])[0, 1] > 0.98
    assert min(teacher_map(*truth.shape).shape) == 518 and min(teacher_map(1500, 1000).shape) == 518
    assert teacher_map(1500, 1000).shape[0] > teacher_map(1500, 1000).shape[1]
    sky = sky_mask(400, 600)
    assert sky[0].all() and not sky[-1].any() and 0.1 < sky.mean() < 0.3


def test_stand_in_rate_bench_reports_cpu_side_per_size(tmp_path, capsys):
    from engine.bench import print_report

    r = json.loads(run("bench", "--stand-in-rate", "300", "--sizes", "160x120,90x120", "--images", "3",
                       "--repeats", "1", "--workdir", str(tmp_path), "--json", check=0).stdout)
    c = r["cpu_side"]
    assert c["rate"] == 300 and set(c["sizes"]) == {"160x120", "90x120"}
    for f in c["sizes"].values():
        assert f["plain_decode_ms"] > 0 and f["disp_png_bytes_per_pixel"] > 0.3
        assert {"decode", "normalize", "percentiles", "disp.png", "encode (all)"} <= set(f["stage_cpu_ms"])
        for v in f["variants"].values():
            cpu = v["cpu_ms_per_image"]
            assert v["cores_per_gpu"] == pytest.approx(300 * cpu / 1000, abs=0.06)
            assert v["images_per_second_per_core"] == pytest.approx(1000 / cpu, rel=0.01)
            assert v["plain_decodes_per_image"] == pytest.approx(cpu / f["plain_decode_ms"], rel=0.02)
            assert v["output_bytes_per_image"] > f["width"] * f["height"] * 0.3
        assert len(f["variants"]) == 3 and f["pools"]["threads"] > 0 and f["pools"]["processes"] > 0
        for codecs in f["codecs"].values():    # every encoder measured reads back exactly
            assert len(codecs) >= 8 and all(c["bit_exact"] and c["bytes_per_pixel"] > 0 for c in codecs.values())
        assert set(f["draft_effect"]) == {"draft vs full decode (engine resize)", "engine vs PIL resize (full decode)"}
    print_report(r)
    out = capsys.readouterr().out
    assert "stand-in accelerator at 300 images/s" in out and "cores/GPU" in out and "grey levels" in out
    bad = run("bench", "--stand-in-rate", "-1", "--workdir", str(tmp_path), check=2)
    assert "--stand-in-rate" in bad.stderr


def test_draft_effect_is_measured_against_pil_and_is_zero_where_no_draft_applies():
    """The teacher-input comparison behind --draft-decode's default: at 2250x1500 the 1/2-scale
    decode moves the input by whole grey levels (past the ~1 level of the engine's resize against
    PIL's, the independent reference), at 816x1224 no draft applies and nothing moves. Seen
    failing once on purpose by comparing the draft against itself (max 0)."""
    from engine.bench.cpu_side import _jpeg, photo
    from engine.bench.draft_effect import draft_effect

    big = draft_effect([_jpeg(photo(1500, 2250, 0))])
    draft, noise = big["draft vs full decode (engine resize)"], big["engine vs PIL resize (full decode)"]
    assert noise["max_abs"] <= 1 and noise["pearson"] > 0.99999
    assert draft["max_abs"] > 2 and draft["mean_abs"] > 0.1 and 0.99 < draft["pearson"] < 0.99995
    small = draft_effect([_jpeg(photo(816, 1224, 0))])["draft vs full decode (engine resize)"]
    assert small == {"max_abs": 0.0, "mean_abs": 0.0, "pearson": 1.0}
