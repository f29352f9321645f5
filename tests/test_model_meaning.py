"""job.json pins what the models mean, not only their weights (issue 27, finding 8): the same
sky weights with two id2label entries swapped label other pixels as sky, so a rerun with them
into an OUTPUT holding committed shards is refused on the driver; a sky id the model's logits
cannot hold, or an id2label key that is no class index, is refused with one line."""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace

import pytest
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache

from engine import job
from engine.config import ConfigError, LabelConfig
from engine.label import prepare
from engine.models import resolve
from engine.runtime.actors import WorkerSpec, load_labelers
from storage import layout
from storage.stores import open_store


def _sky_with(tmp_path, tiny_models, edit) -> str:
    d = tmp_path / f"sky-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(tiny_models.sky, d)
    config = json.loads((d / "config.json").read_text())
    edit(config)
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def _swap(config):   # sky (2) and tree (4) trade places: same weights, another meaning
    config["id2label"]["2"], config["id2label"]["4"] = "tree", "sky"
    config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}


def _raw(tmp_path):
    from builders import photo_samples, write_shard

    (tmp_path / "raw").mkdir(exist_ok=True)
    write_shard(tmp_path / "raw" / "s-000000.tar", photo_samples([(40, 56)]))
    return f"{tmp_path / 'raw'}/"


def test_another_id2label_with_the_same_weights_is_another_definition(tmp_path, tiny_models):
    swapped = _sky_with(tmp_path, tiny_models, _swap)
    a, b = resolve(tiny_models.sky), resolve(swapped)
    assert a.sha256 == b.sha256 and a.config_sha256 != b.config_sha256
    raw, out = _raw(tmp_path), tmp_path / "out"
    first = LabelConfig(input=raw, output=str(out), teacher=tiny_models.teacher, sky=tiny_models.sky)
    job.write(open_store(str(out)), prepare(first).spec)
    open_store(str(out)).put(layout.manifest_key("s-000000"), b"")          # a committed shard
    with pytest.raises(ConfigError, match="another definition; sky: .* config sha256"):
        job.check(open_store(str(out)), prepare(replace(first, sky=swapped)).spec)
    p = run("label", raw, str(out), "--teacher", tiny_models.teacher, "--sky", swapped, check=2)
    assert "another definition" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_an_output_pinned_before_configs_were_is_judged_by_its_weights(tmp_path, tiny_models):
    raw = _raw(tmp_path)
    spec = prepare(LabelConfig(input=raw, output=str(tmp_path / "o"), teacher=tiny_models.teacher,
                               sky=tiny_models.sky)).spec
    old = copy.deepcopy(spec.to_json())
    for part in ("teacher", "sky"):
        old["label"][part].pop("config_sha256")
    assert job.differences(old, spec) == []
    old["label"]["sky"]["sha256"] = "0" * 64
    assert job.differences(old, spec) and "sky:" in job.differences(old, spec)[0]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["id2label"].update({"200": c["id2label"].pop("2")}), "are not the class indices 0..5"),
    (lambda c: c["id2label"].update({"abc": c["id2label"].pop("2")}), "key 'abc' is not a class index"),
], ids=["sky-id-beyond-the-logits", "key-not-an-index"])
def test_a_sky_id_the_logits_cannot_hold_is_refused_in_one_line(tmp_path, tiny_models, edit, message):
    sky = _sky_with(tmp_path, tiny_models, edit)
    out = tmp_path / "out"
    p = run("label", _raw(tmp_path), str(out), "--teacher", tiny_models.teacher, "--sky", sky, check=2)
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert not out.exists()


def test_a_worker_that_sees_another_config_refuses_to_start(tmp_path, tiny_models):
    swapped = _sky_with(tmp_path, tiny_models, _swap)
    ref, pinned = resolve(swapped), resolve(tiny_models.sky)
    spec = WorkerSpec(output=str(tmp_path / "o"), teacher=None, teacher_sha256=None, sky=swapped,
                      sky_sha256=ref.sha256, sky_config_sha256=pinned.config_sha256,
                      ground_truth=None)
    with pytest.raises(RuntimeError, match=f"has config sha256 {ref.config_sha256[:12]}, job.json pins "
                                           f"{pinned.config_sha256[:12]}"):
        load_labelers(spec)


def test_a_config_whose_sizes_are_not_its_weights_says_which(tmp_path, tiny_models):
    """transformers raised 'look at the above report!' and logged the report: a worker's one line
    showed no report (issue 27, finding 12)."""
    from labelers.teacher import Teacher

    d = tmp_path / "teacher"
    shutil.copytree(tiny_models.teacher, d)
    config = json.loads((d / "config.json").read_text())
    config["fusion_hidden_size"] *= 2
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        Teacher.load(str(d))
    message = str(e.value)
    assert "its config does not match its weights (" in message and "tensors differ in shape, e.g. " in message
    assert "weights [" in message and "config [" in message and "\n" not in message
