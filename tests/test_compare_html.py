"""`compare --html`: the contact sheet of the worst pairs, on two real OUTPUTs labeled from one
INPUT by two teachers (test doubles, no model to load) and a hand-made report whose entries point
at real members. Checked with an HTML parser, PIL, and the tar read by Python's tarfile."""
from __future__ import annotations

import base64
import io
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from builders import photo_samples, write_shard
from PIL import Image

from engine.cli.compare_html import write_compare_html
from labelers.prediction import Prediction
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.tasks import ShardTask
from storage import layout
from storage.manifest import decode_part
from storage.stores import open_store

SHARD = "shard-000001"
ZERO = (68, 1, 84)           # |A − B| = 0: the first colour of viridis
NO_DATA = (128, 128, 128)    # sky in A or B


class _Teacher:
    output, device = "disparity", None

    def __init__(self, name: str, channel: int):
        self.name, self.channel = name, channel

    def target_size(self, height, width):
        return height, width

    def predict(self, images):
        return [Prediction((1 + np.asarray(im, np.float32)[..., self.channel] / 255).astype(np.float32))
                for im in images]


class _Sky:
    """The top `share` of the rows is sky."""

    device = None

    def __init__(self, name: str, share: float):
        self.name, self.share = name, share

    def masks(self, images):
        return [np.broadcast_to(np.arange(im.shape[0])[:, None] < round(im.shape[0] * self.share), im.shape[:2]).copy()
                for im in images]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> tuple[str, str, list[str]]:
    """OUTPUTs A and B of the same three photos (one larger than a thumbnail), and the keys."""
    root = tmp_path_factory.mktemp("compare-html")
    samples = photo_samples([(40, 56), (48, 40), (300, 400)], "p")
    src = write_shard(root / "in.tar", samples)
    for side, channel, share in (("a", 0, 0.25), ("b", 2, 0.4)):
        labelers = Labelers(_Teacher(f"teacher-{side}", channel), _Sky(f"sky-{side}", share))
        label_shard(ShardTask(src, SHARD), labelers, open_store(str(root / side)), batch_size=4, threads=2)
    return str(root / "a"), str(root / "b"), [s["__key__"] for s in samples]


def members(output: str, key: str) -> dict[str, dict]:
    """The sample's members as the manifest records them: member suffix -> {name, offset, size}."""
    rows = decode_part(open_store(output).get(layout.manifest_key(SHARD))).to_pylist()
    (row,) = [r for r in rows if r["key"] == key]
    return {m["name"][len(key) + 1:]: {k: m[k] for k in ("name", "offset", "size")} for m in row["members"]}


def entry(a: str, b: str | None, key: str, **figures) -> dict:
    ma, mb = members(a, key), members(b, key) if b else {}
    return {"shard": SHARD, "key": key, "abs_rel": 0.5, "delta1": 0.4, "scale": 1.0, "shift": 0.0, "pearson": 0.3,
            "sky_iou": 0.6, "inverted": False, "disagree": True, **figures,
            "members": {"image": ma["jpg"], "disp_a": ma["disp.png"], "sky_a": ma.get("sky.png"),
                        "disp_b": mb.get("disp.png"), "sky_b": mb.get("sky.png")}}


def report(a: str, b: str, worst: list[dict]) -> dict:
    return {"a": a, "b": b, "b_kind": "output",
            "counts": {"matched": 3, "compared": 3, "only_a": 0, "only_b": 1, "error_a": 0, "error_b": 0,
                       "disagree": 2, "inverted": 1},
            "thresholds": {"abs_rel": 0.25, "delta1": 0.75},
            "figures": {"abs_rel": {"n": 3, "mean": 0.31, "p05": 0.02, "p50": 0.3, "p95": 0.61},
                        "sky_iou": {"n": 3, "mean": 0.6, "p05": 0.6, "p50": 0.6, "p95": 0.6}},
            "worst": worst}


class Page(HTMLParser):
    """Rows of the sheet (tr class=pair): their cells' text and their images; and the page's."""

    def __init__(self, text: str):
        super().__init__()
        self.rows, self.imgs, self.text, self.external, self.tags = [], [], [], [], set()
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "tr" and a.get("class") == "pair":
            self.rows.append({"cells": [], "imgs": []})
        if tag == "td" and self.rows:
            self.rows[-1]["cells"].append("")
        if tag == "img":
            self.imgs.append(a)
            self.rows[-1]["imgs"].append(a)
        for k in ("src", "href"):
            if k in a and not a[k].startswith("data:"):
                self.external.append(a[k])

    def handle_data(self, data):
        self.text.append(data)
        if self.rows and self.rows[-1]["cells"]:
            self.rows[-1]["cells"][-1] += data


def picture(img: dict) -> Image.Image:
    header, b64 = img["src"].split(",", 1)
    assert header in ("data:image/png;base64", "data:image/jpeg;base64")
    pic = Image.open(io.BytesIO(base64.b64decode(b64)))
    pic.load()
    return pic


def test_the_sheet_has_a_row_per_pair_and_every_picture_decodes(outputs, tmp_path):
    a, b, keys = outputs
    worst = [entry(a, b, keys[2], scale=-0.5, shift=0.7, inverted=True), entry(a, None, keys[0], disagree=False)]
    r = report(a, 'B <labels> & "more"', worst)
    path = tmp_path / "compare.html"
    write_compare_html(r, open_store(a), open_store(b), str(path))
    html = path.read_text(encoding="utf-8")
    page = Page(html)
    text = " ".join(page.text)
    assert not page.external and "labels" not in page.tags and 'B <labels> & "more"' in text    # escaped
    assert a in text and all(f"{k} {v}" in text for k, v in r["counts"].items())
    assert "abs_rel 0.25" in text and "delta1 0.75" in text and "sky_iou" in text and "0.610" in text
    assert len(page.rows) == 2 and len(page.imgs) == 6 + 3
    first, second = page.rows
    assert keys[2] in first["cells"][-1] and keys[0] in second["cells"][-1]
    assert [c for c in first["cells"] if c] == [first["cells"][-1]]          # six pictures, then the caption
    assert second["cells"][2:4] + second["cells"][5:6] == ["not stored"] * 3  # B, |A − B|, sky B
    assert '<b class=inv>inverted</b>' in html and ".inv{color:#c00}" in html
    assert html.count("<b class=inv>") == 1                                   # only the inverted pair
    for img in page.imgs:
        pic = picture(img)
        assert 0 < pic.width <= 256 and 0 < pic.height <= 256
    big = {i["alt"].split(" of ")[0]: picture(i) for i in first["imgs"]}
    assert big["image"].format == "JPEG" and big["image"].size == (224, 168)   # 400x300 as a thumbnail
    assert set(big) == {"image", "A", "B", "A − B", "sky A", "sky B"}
    assert len(html.encode()) < 1_000_000


def test_a_pair_compared_with_itself_is_zero_where_neither_is_sky(outputs, tmp_path):
    a, _, keys = outputs
    same = entry(a, a, keys[1], abs_rel=0.0, delta1=1.0, pearson=1.0, sky_iou=1.0, disagree=False)
    path = tmp_path / "self.html"
    write_compare_html(report(a, a, [same]), open_store(a), open_store(a), str(path))
    (row,) = Page(path.read_text(encoding="utf-8")).rows
    diff = np.asarray(next(picture(i) for i in row["imgs"] if i["alt"].startswith("A − B of")).convert("RGB"))
    with tarfile.open(Path(a) / layout.shard_key(SHARD)) as tar:
        sky = np.asarray(Image.open(tar.extractfile(f"{keys[1]}.sky.png")).convert("L")) > 127
    assert diff.shape[:2] == sky.shape == (48, 40) and 0 < sky.sum() < sky.size
    assert np.all(diff[~sky] == ZERO) and np.all(diff[sky] == NO_DATA)


def test_b_a_teacher_and_an_unreadable_member(outputs, tmp_path):
    a, b, keys = outputs
    broken = entry(a, b, keys[1])
    broken["members"]["sky_a"] = broken["members"]["image"]        # a JPEG where a PNG mask should be
    path = tmp_path / "teacher.html"
    write_compare_html(report(a, "depth-anything/Depth-Anything-V2-Small-hf", [entry(a, b, keys[0]), broken]),
                       open_store(a), None, str(path))
    page = Page(path.read_text(encoding="utf-8"))
    assert "a teacher" in " ".join(page.text) and len(page.rows) == 2
    for row in page.rows:
        assert row["cells"][2:4] + row["cells"][5:6] == ["not stored"] * 3
    assert len(page.rows[0]["imgs"]) == 3 and len(page.rows[1]["imgs"]) == 2
    assert page.rows[1]["cells"][4].startswith("unreadable: ")
