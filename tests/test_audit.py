"""``audit`` recomputed independently from the manifest (pyarrow + numpy) on an OUTPUT
with errors, several shards, a failed and a pending shard, and suspect samples."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pyarrow.dataset as ds
import pytest
from builders import bad_members, encode, photo_samples, write_shard

from labelers.prediction import Prediction
from labelers.sky import SkySegmenter
from labelers.teacher import Teacher
from pipelines.audit import audit
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.tasks import ShardTask
from storage import layout
from storage.stores import open_store


@pytest.fixture(scope="module")
def output(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    labelers = Labelers(Teacher.load(tiny_models.teacher, name="t"), SkySegmenter.load(tiny_models.sky, name="s"))
    out = open_store(str(tmp / "out"))
    sky_blue = np.full((80, 100, 3), (90, 150, 235), np.uint8)
    shards = {
        "a": photo_samples([(96, 128), (128, 96), (100, 100)] * 3, "a"),
        "b": photo_samples([(40, 50), (90, 120)], "b") + [{"__key__": "allsky", "jpg": encode(sky_blue, "JPEG")}],
        "c": [{"__key__": k, ext: data} for k, (ext, data) in bad_members().items()]
             + photo_samples([(70, 90)], "c"),
    }
    for name, samples in shards.items():
        src = write_shard(tmp / f"{name}.tar", samples)
        label_shard(ShardTask(src, name), labelers, out, batch_size=4, threads=2)
    out.put(layout.failed_key("d"), json.dumps({"shard": "d", "error": "x", "attempts": 3}).encode())
    out.put(layout.JOB, json.dumps({"shards": [f"/in/{n}.tar" for n in "abcde"]}).encode())
    return tmp / "out"


def q(values, p):
    return float(np.quantile(values, p, method="inverted_cdf"))


def test_every_figure_matches_an_independent_computation(output):
    r = audit(open_store(str(output)))
    t = ds.dataset(str(output / "manifest"), format="parquet").to_table().to_pylist()
    ok = [x for x in t if x["status"] == "ok"]
    assert (r["samples"], r["ok"], r["errors"]) == (len(t), len(ok), len(t) - len(ok))
    reasons: dict = {}
    for x in t:
        if x["status"] == "error":
            k = re.sub(r"\d+", "N", x["error"])
            reasons[k] = reasons.get(k, 0) + 1
    assert r["errors_by_reason"] == reasons and sum(reasons.values()) == 3
    assert r["shards"] == {"total": 5, "committed": 3, "failed": 1, "pending": 1}

    sky = np.array([x["sky_fraction"] for x in ok])
    s = r["sky_fraction"]
    assert s["count"] == len(ok) and s["mean"] == pytest.approx(sky.mean(), abs=1e-6)
    assert s["p50"] == pytest.approx(q(sky, 0.5), abs=1e-4) and s["p95"] == pytest.approx(q(sky, 0.95), abs=1e-4)
    counts, edges = np.histogram(sky, bins=20, range=(0, 1))
    assert s["histogram"]["counts"] == counts.tolist() and s["histogram"]["edges"] == pytest.approx(edges)

    rng = np.array([x["disp_max"] - x["disp_min"] for x in ok if x["disp_max"] is not None])
    d = r["disparity"]["raw_range"]
    assert d["mean"] == pytest.approx(rng.mean(), rel=1e-5)
    assert sum(d["histogram"]["counts"]) == len(rng) and d["histogram"]["edges"][0] <= rng.min() * 1.003
    assert d["p50"] == pytest.approx(q(rng, 0.5), rel=3e-3) and d["p95"] == pytest.approx(q(rng, 0.95), rel=3e-3)
    for p in ("disp_p05", "disp_p50", "disp_p95"):
        v = np.array([x[p] for x in ok if x[p] is not None])
        got = r["disparity"][p.replace("disp", "label")]
        assert got["count"] == len(v) and got["mean"] == pytest.approx(v.mean(), abs=1e-6)
        assert got["p50"] == pytest.approx(q(v, 0.5), abs=1e-4)
    assert r["disparity"]["degenerate"] == sum(x["degenerate"] for x in ok) >= 1

    for side in ("width", "height"):
        v = np.array([x[side] for x in ok])
        vals, cnt = np.unique(v, return_counts=True)
        common = sorted(zip(vals.tolist(), cnt.tolist()), key=lambda kv: (-kv[1], kv[0]))[:10]
        assert r[side] == {"count": len(v), "min": v.min(), "p50": q(v, 0.5), "p95": q(v, 0.95),
                           "max": v.max(), "mean": pytest.approx(v.mean()), "common": [list(c) for c in common]}

    per = {}
    for x in t:
        e = per.setdefault(x["shard"], {"shard": x["shard"], "samples": 0, "ok": 0, "errors": 0, "sky": []})
        e["samples"] += 1
        e["ok" if x["status"] == "ok" else "errors"] += 1
        if x["status"] == "ok":
            e["sky"].append(x["sky_fraction"])
    want = [{**{k: v for k, v in e.items() if k != "sky"},
             "sky_fraction_mean": pytest.approx(np.mean(e["sky"])) if e["sky"] else None}
            for _, e in sorted(per.items())]
    assert r["per_shard"] == want


def test_flags_name_the_suspect_samples_and_shards(output):
    r = audit(open_store(str(output)))
    flags = r["flags"]["samples"]
    keys = lambda kind: {f["key"] for f in flags[kind]["samples"]}  # noqa: E731
    assert "b0000" in keys("tiny_image") and flags["tiny_image"]["count"] == 1       # 40 x 50
    assert "allsky" in keys("all_sky") and "allsky" in keys("constant_disparity")
    rows = ds.dataset(str(output / "manifest"), format="parquet").to_table().to_pylist()
    ok = [x for x in rows if x["status"] == "ok"]
    job_has_sky = sum(x["sky_fraction"] > 0 for x in ok) / len(ok) >= 0.5
    want = {
        "all_sky": sum(x["sky_fraction"] >= 0.99 for x in ok),
        "no_sky": sum(x["sky_fraction"] == 0 for x in ok) if job_has_sky else 0,
        "constant_disparity": sum(x["degenerate"] or (x["disp_p95"] - x["disp_p05"] < 0.01) for x in ok),
        "tiny_image": sum(min(x["width"], x["height"]) < 64 for x in ok),
        "low_valid": 0,      # pseudo-labels: every pixel labeled (tests/test_ground_truth.py has gt)
        "low_confidence": 0,  # a teacher without confidence (test_confidence_... below has one)
    }
    assert {k: f["count"] for k, f in flags.items()} == want
    for kind, f in flags.items():
        assert len(f["samples"]) == min(want[kind], 50)
    # shard c: 3 errors of 4 samples, far above the job's rate
    job_rate = (len(rows) - len(ok)) / len(rows)
    per = {}
    for x in rows:
        per.setdefault(x["shard"], []).append(x["status"] != "ok")
    suspect = sorted(s for s, e in per.items() if np.mean(e) > max(3 * job_rate, 0.05) or all(e))
    assert [s["shard"] for s in r["flags"]["shards"]["high_error_rate"]] == suspect == ["c.tar"]


def test_audit_cli_json_equals_the_api(output):
    p = subprocess.run([sys.executable, "-m", "engine", "audit", str(output), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == json.loads(json.dumps(audit(open_store(str(output)))))
    bad = subprocess.run([sys.executable, "-m", "engine", "audit", str(output / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a depth-engine OUTPUT" in bad.stderr


def test_html_report_is_self_contained_and_its_pictures_decode(output, tmp_path):
    import base64
    import io
    from html.parser import HTMLParser

    from PIL import Image

    page = tmp_path / "audit.html"
    p = subprocess.run([sys.executable, "-m", "engine", "audit", str(output), "--html", str(page)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.imgs, self.svgs, self.text, self.external = [], 0, [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img":
                self.imgs.append(a)
            if tag == "svg":
                self.svgs += 1
            for k in ("src", "href"):
                if k in a and not a[k].startswith("data:"):
                    self.external.append(a[k])

        def handle_data(self, data):
            self.text.append(data)

    c = Collect()
    c.feed(page.read_text())
    text = " ".join(c.text)
    assert not c.external                                   # opens with no network
    r = audit(open_store(str(output)))
    assert str(r["samples"]) in text and "random draw" in text and "all sky" in text and "tiny image" in text
    assert c.svgs >= 5                                       # sky, range, label, errors, per shard
    kinds = {}
    for img in c.imgs:
        kind = img["alt"].split(" of ")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
        header, b64 = img["src"].split(",", 1)
        assert header == "data:image/png;base64"
        pic = Image.open(io.BytesIO(base64.b64decode(b64)))
        pic.load()
        assert min(pic.size) > 0
    assert kinds["image"] == kinds["disp"] == kinds["sky"] >= 3     # triplets


class _ConfidentTeacher:
    """A teacher that gives each image its own confidence level (a ramp around it), and depth."""

    output, device, name = "depth", None, "conf"

    def __init__(self, levels):
        self.levels, self.seen = iter(levels), []

    def target_size(self, height, width):
        return height, width

    def predict(self, images):
        out = []
        for im in images:
            h, w = im.shape[:2]
            level = next(self.levels)
            conf = np.clip(level + np.linspace(-0.05, 0.05, w)[None, :].repeat(h, 0), 0, 1).astype(np.float32)
            depth = (1 + im.mean(axis=2) / 64).astype(np.float32)
            out.append(Prediction(depth, conf))
        return out


def test_confidence_histogram_and_low_confidence_flag(tmp_path):
    levels = [0.05, 0.2, 0.45, 0.55, 0.7, 0.95, 0.6, 0.8]
    samples = photo_samples([(48, 64)] * len(levels), "k")
    src = write_shard(tmp_path / "k.tar", samples)
    out = open_store(str(tmp_path / "out"))
    label_shard(ShardTask(src, "k"), Labelers(_ConfidentTeacher(levels)), out, batch_size=3, threads=2)
    r = audit(out)
    rows = ds.dataset(str(tmp_path / "out" / "manifest"), format="parquet").to_table().to_pylist()
    conf = np.array([x["conf_mean"] for x in rows])
    assert conf == pytest.approx(levels, abs=1e-3)            # each image's own level, in tar order
    c = r["confidence"]
    assert c["count"] == len(levels) and c["mean"] == pytest.approx(conf.mean(), abs=1e-6)
    assert c["min"] == pytest.approx(conf.min(), abs=1e-4) and c["p50"] == pytest.approx(q(conf, 0.5), abs=1e-4)
    counts, edges = np.histogram(conf, bins=20, range=(0, 1))
    assert c["histogram"]["counts"] == counts.tolist() and c["histogram"]["edges"] == pytest.approx(edges)
    low = r["flags"]["samples"]["low_confidence"]
    assert low["count"] == int((conf < 0.5).sum()) == 3
    assert {f["key"] for f in low["samples"]} == {x["key"] for x in rows if x["conf_mean"] < 0.5}
    from engine.cli.audit_html import render

    assert "mean confidence (conf_mean)" in render(r, out)
