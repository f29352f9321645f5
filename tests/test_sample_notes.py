"""What a row says about its sample (issue 27, finding 12): which of two image members was
labeled, that an input's own label members were replaced, and an audit sheet that shows an
EXIF-rotated image as it was labeled, beside its label."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from builders import encode, exif_rotated_jpeg, write_shard
from PIL import Image

from engine.bench.synthetic import scene
from labelers.sky import SkySegmenter
from labelers.teacher import Teacher
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.tasks import ShardTask
from storage import layout
from storage.manifest import decode_part
from storage.output import Output
from storage.stores import open_store


@pytest.fixture(scope="module")
def labeled(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("notes")
    photo = encode(scene(40, 56, 1), "JPEG", quality=90)
    samples = [
        {"__key__": "two", "jpg": photo, "png": encode(scene(40, 56, 2), "PNG")},
        {"__key__": "own", "jpg": photo, "disp.png": b"not ours", "sky.png": b"nor this"},
        {"__key__": "turned", "jpg": exif_rotated_jpeg(40, 96)},
        {"__key__": "plain", "jpg": photo},
    ]
    src = write_shard(tmp / "s.tar", samples)
    out = open_store(str(tmp / "out"))
    labelers = Labelers(Teacher.load(tiny_models.teacher), SkySegmenter.load(tiny_models.sky))
    assert label_shard(ShardTask(src, "s"), labelers, out, batch_size=4, threads=2).committed
    rows = {r["key"]: r for r in decode_part(out.get(layout.manifest_key("s"))).to_pylist()}
    return out, rows


def _json_member(out, row) -> dict:
    member = next(m for m in row["members"] if m["name"].endswith(".json"))
    return json.loads(out.read_range(Output(out).tar_key(row["shard"]), member["offset"], member["size"]))


def test_two_image_members_say_which_was_labeled(labeled):
    out, rows = labeled
    assert rows["two"]["notes"] == "2 image members: jpg labeled (the first), png carried"
    assert {m["name"] for m in rows["two"]["members"]} >= {"two.jpg", "two.png", "two.disp.png"}
    assert rows["plain"]["notes"] is None


def test_an_inputs_own_label_members_are_replaced_with_a_note(labeled):
    out, rows = labeled
    assert rows["own"]["notes"] == "input disp.png replaced by the engine's; input sky.png replaced by the engine's"
    assert "input disp.png replaced by the engine's" in _json_member(out, rows["own"])["notes"]
    disp = next(m for m in rows["own"]["members"] if m["name"] == "own.disp.png")
    data = out.read_range(Output(out).tar_key(rows["own"]["shard"]), disp["offset"], disp["size"])
    assert data != b"not ours" and Image.open(io.BytesIO(data)).size == (56, 40)


def test_the_audit_sheet_shows_a_turned_image_as_labeled(labeled):
    from engine.cli.audit_html import _triplet

    out, rows = labeled
    row = rows["turned"]
    assert (row["width"], row["height"]) == (40, 96)          # oriented: stored 96 wide, 40 high
    pictures = {k: Image.open(io.BytesIO(base64.b64decode(v.split(",", 1)[1]))) for k, v in _triplet(out, row).items()}
    aspect = {k: p.size[0] / p.size[1] for k, p in pictures.items()}
    assert aspect["image"] == pytest.approx(aspect["disp"], rel=0.05) and aspect["image"] < 1, aspect
    assert np.asarray(pictures["image"]).shape[:2] == np.asarray(pictures["sky"]).shape[:2]
