"""Nothing "ok" that is not a label (issue 27, finding 5, the models' half): a teacher or sky
model whose output holds NaN or inf makes that sample an error row with the reason, and the
rest of the batch and the shard is labeled. Real architectures with tiny random weights, broken
the way weights break (a NaN head, an inf bias), saved and loaded back; a forward hook breaks one
image of a batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from builders import photo_samples, write_shard

from engine.bench.synthetic import scene
from labelers.prediction import NoLabel, Prediction, checked
from labelers.sky import SkySegmenter
from labelers.teacher import Teacher
from pipelines.decode import decode, sample_from_members
from pipelines.pseudo_label import Labelers, label_batch, label_shard
from pipelines.tasks import ShardTask
from storage import layout
from storage.manifest import decode_part
from storage.stores import open_store


def _broken(source: str, auto: str, parameter: str, value: float, tmp_path) -> str:
    model = getattr(transformers, auto).from_pretrained(source)
    with torch.no_grad():
        model.get_parameter(parameter).fill_(value)
    out = tmp_path / f"broken-{parameter}-{value}"
    model.save_pretrained(out)
    transformers.AutoImageProcessor.from_pretrained(source).save_pretrained(out)
    return str(out)


def _rows(labelers, tmp_path, n=3):
    src = write_shard(tmp_path / "s.tar", photo_samples([(48, 64)] * n))
    out = open_store(str(tmp_path / "out"))
    result = label_shard(ShardTask(src, "s"), labelers, out, batch_size=4, threads=2)
    assert result.committed
    return decode_part(out.get(layout.manifest_key("s"))).to_pylist()


@pytest.mark.parametrize("parameter, value", [("head.conv3.weight", float("nan")), ("head.conv3.bias", float("inf"))],
                         ids=["nan-weights", "inf-bias"])
@pytest.mark.parametrize("device_labels", [False, True], ids=["host-labels", "device-labels"])
def test_a_broken_teacher_gives_error_rows_not_ok_zero_labels(tiny_models, tmp_path, parameter, value, device_labels):
    teacher = Teacher.load(_broken(tiny_models.teacher, "AutoModelForDepthEstimation", parameter, value, tmp_path))
    rows = _rows(Labelers(teacher, SkySegmenter.load(tiny_models.sky), device_labels=device_labels), tmp_path)
    assert [r["status"] for r in rows] == ["error"] * 3
    assert all("the teacher's output holds" in r["error"] and "non-finite" in r["error"] for r in rows), rows[0]


def test_a_broken_sky_model_gives_error_rows_not_a_sky_free_label(tiny_models, tmp_path):
    sky = SkySegmenter.load(_broken(tiny_models.sky, "AutoModelForSemanticSegmentation",
                                    "decode_head.classifier.weight", float("nan"), tmp_path))
    rows = _rows(Labelers(Teacher.load(tiny_models.teacher), sky), tmp_path)
    assert [r["status"] for r in rows] == ["error"] * 3
    assert all("the sky model's output holds" in r["error"] for r in rows), rows[0]


@pytest.mark.parametrize("device_labels", [False, True], ids=["host-labels", "device-labels"])
def test_one_broken_image_of_a_batch_is_its_only_error(tiny_models, device_labels):
    teacher = Teacher.load(tiny_models.teacher)
    sky = SkySegmenter.load(tiny_models.sky)
    labelers = Labelers(teacher, sky, device_labels=device_labels)

    def batch():
        samples = [sample_from_members(s, "x.tar") for s in
                   ({"__key__": m["__key__"], "jpg": m["jpg"]} for m in photo_samples([(48, 64)] * 3))]
        return [decode(s) for s in samples]

    clean = batch()
    label_batch(clean, labelers)
    def nan_in_the_second(module, args, out):
        out.predicted_depth[1].fill_(float("nan"))   # in place: the model's own output, one image broken

    hook = teacher.model.register_forward_hook(nan_in_the_second)
    try:
        broken = batch()
        label_batch(broken, labelers)
    finally:
        hook.remove()
    assert [s.ok for s in broken] == [True, False, True]
    assert "the teacher's output holds" in broken[1].error
    for a, b in zip((clean[0], clean[2]), (broken[0], broken[2])):   # the others: the same labels as unbroken
        if device_labels:
            np.testing.assert_array_equal(a.label.values, b.label.values)
        else:
            np.testing.assert_array_equal(a.raw, b.raw)


def test_a_plugin_map_with_nan_or_a_nan_field_of_view_is_no_label():
    good = np.ones((4, 5), np.float32)
    assert isinstance(checked(good, 4, 5, "p"), Prediction)
    for bad in (np.where(np.eye(4, 5, dtype=bool), np.nan, good), np.full((4, 5), np.inf, np.float32)):
        got = checked(bad, 4, 5, "p")
        assert isinstance(got, NoLabel) and "non-finite values of 20" in got.reason
    got = checked(Prediction(good, fov_deg=float("nan")), 4, 5, "p")
    assert isinstance(got, NoLabel) and "field of view of nan" in got.reason


@pytest.mark.parametrize("family", ["depth_anything", "dpt", "glpn", "zoedepth", "depth_pro"])
def test_every_family_refuses_a_non_finite_output_of_one_image(family, tmp_path):
    """The check is the teacher's, shared by every family it loads: each breaks one image of two
    (Depth Pro also through its field of view), and only that one is a NoLabel."""
    from labelers.random_models import save_random_family

    path, _ = save_random_family(tmp_path / family, family, scale="tiny")
    teacher = Teacher.load(str(path))
    images = [scene(48, 64, 1), scene(48, 64, 2)]
    assert all(isinstance(p, Prediction) for p in teacher.predict(images))
    broken = ["predicted_depth"] + (["field_of_view"] if family == "depth_pro" else [])
    for name in broken:
        def nan_in_the_second(module, args, out, name=name):
            getattr(out, name)[1].fill_(float("nan"))

        hook = teacher.model.register_forward_hook(nan_in_the_second)
        try:
            got = teacher.predict(images)
        finally:
            hook.remove()
        assert isinstance(got[0], Prediction) and isinstance(got[1], NoLabel), (name, got)
        assert "the teacher's output holds" in got[1].reason
