"""``verify`` on real outputs written by label_shard, on local storage and S3: an intact
OUTPUT agrees; a dropped member, a cut tar, a flipped byte or a wrong row is named, with the
shard it is in and nothing else. Tampering goes through the store, as a bad copy would."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from builders import bad_members, photo_samples, write_shard

from labelers.sky import SkySegmenter
from labelers.teacher import Teacher
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.tasks import ShardTask
from pipelines.verify import verify
from storage import layout
from storage.manifest import decode_part, encode_part
from storage.objectstore import ObjectStore
from storage.stores import open_store

NAMES = ["shard-000000", "shard-000001", "shard-000002"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=120)


@pytest.fixture(scope="module")
def labelers(tiny_models):
    return Labelers(Teacher.load(tiny_models.teacher, name="t"), SkySegmenter.load(tiny_models.sky, name="s"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    raw = tmp_path_factory.mktemp("raw")
    bad = [{"__key__": k, ext: data} for k, (ext, data) in bad_members().items()]
    samples = [photo_samples([(64, 96), (96, 64)], "a"), photo_samples([(70, 50)], "b") + bad,
               photo_samples([(64, 64), (48, 80)], "c")]
    return [write_shard(raw / f"{n}.tar", s) for n, s in zip(NAMES, samples)]


def build(url: str, inputs: list[str], labelers: Labelers) -> ObjectStore:
    """Three committed shards, one with error rows (no members), as the engine writes them."""
    out = open_store(url)
    for name, src in zip(NAMES, inputs):
        label_shard(ShardTask(src, name), labelers, out, batch_size=4, threads=2)
    return out


@pytest.fixture
def output(store_url, inputs, labelers) -> tuple[str, ObjectStore]:
    return store_url, build(store_url, inputs, labelers)


def rows(store: ObjectStore, name: str) -> list[dict]:
    return decode_part(store.get(layout.manifest_key(name))).to_pylist()


def drop_member(store: ObjectStore, name: str, suffix: str) -> str:
    """Rewrite the tar without its first member ending in `suffix`; returns that member."""
    src = tarfile.open(fileobj=io.BytesIO(store.get(layout.shard_key(name))))
    dropped = next(m.name for m in src.getmembers() if m.name.endswith(suffix))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for m in src.getmembers():
            if m.name != dropped:
                dst.addfile(m, src.extractfile(m))
    store.put(layout.shard_key(name), buf.getvalue())
    return dropped


def cut(store: ObjectStore, name: str, length: int | None = None) -> None:
    blob = store.get(layout.shard_key(name))
    store.put(layout.shard_key(name), blob[: len(blob) // 2 if length is None else length])


def test_an_intact_output_agrees(output):
    url, store = output
    result = verify(store)
    assert (result.checked, result.ok, result.bad) == (3, True, ())
    p = run("verify", url, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"checked": 3, "ok": True, "bad": []}
    p = run("verify", url, "--workers", "1")
    assert (p.returncode, p.stdout.strip()) == (0, "3 shards checked, all agree")


def test_a_missing_member_and_a_cut_tar_are_named(output):
    url, store = output
    dropped = drop_member(store, NAMES[0], ".disp.png")
    cut(store, NAMES[1])

    result = verify(url, workers=2)
    assert (result.checked, result.ok) == (3, False)
    assert [b.shard for b in result.bad] == NAMES[:2]
    missing, truncated = result.bad[0].problems, result.bad[1].problems
    assert f"member {dropped} missing from the tar" in missing
    assert any(p.startswith("tar size") for p in missing)
    assert any(p.startswith("tar truncated or unreadable") for p in truncated)

    p = run("verify", url, "--json")
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    assert set(doc) == {"checked", "ok", "bad"} and (doc["checked"], doc["ok"]) == (3, False)
    assert [set(b) for b in doc["bad"]] == [{"shard", "problems"}] * 2
    assert doc["bad"] == result.to_json()["bad"]
    human = run("verify", url)
    assert human.returncode == 1 and "3 shards checked, 2 disagree" in human.stdout
    assert dropped in human.stdout and NAMES[2] not in human.stdout


def test_a_flipped_byte_is_a_sha256_difference(tmp_path, inputs, labelers):
    store = build(str(tmp_path / "out"), inputs, labelers)
    member = rows(store, NAMES[2])[0]["members"][0]
    blob = bytearray(store.get(layout.shard_key(NAMES[2])))
    blob[member["offset"] + member["size"] // 2] ^= 0xFF
    store.put(layout.shard_key(NAMES[2]), bytes(blob))
    result = verify(store)
    assert [(b.shard, b.problems) for b in result.bad] == [
        (NAMES[2], (f"member {member['name']}: sha256 differs from the manifest's",))]


def test_cuts_inside_and_between_members_and_a_missing_tar(tmp_path, inputs, labelers):
    """tarfile ends quietly when a stream stops at a member boundary; verify does not."""
    store = build(str(tmp_path / "out"), inputs, labelers)
    first = rows(store, NAMES[0])[0]["members"][0]
    boundary = first["offset"] + -(-first["size"] // 512) * 512   # end of its padded data
    cut(store, NAMES[0], boundary)
    store.delete(layout.shard_key(NAMES[1]))
    inner = rows(store, NAMES[2])[0]["members"][0]
    cut(store, NAMES[2], inner["offset"] + inner["size"] // 2)
    bad = {b.shard: b.problems for b in verify(store).bad}
    assert set(bad) == set(NAMES)
    assert (f"tar truncated or unreadable: no end-of-archive blocks at byte {boundary} "
            f"(after member {first['name']})") in bad[NAMES[0]]
    assert bad[NAMES[1]] == ("tar missing",)
    assert f"tar truncated or unreadable: unexpected end of data (in member {inner['name']})" in bad[NAMES[2]]


def test_rows_that_disagree_with_their_pngs(tmp_path, inputs, labelers):
    """The PNGs decode to the row's label size; a label size that is not a downscale of the row's
    image is a problem of its own; error rows have no members; ok rows have some."""
    store = build(str(tmp_path / "out"), inputs, labelers)
    part = rows(store, NAMES[1])
    ok = next(r for r in part if r["status"] == "ok")
    elsewhere = rows(store, NAMES[2])
    other = next(r for r in elsewhere if r["status"] == "ok")
    error = next(r for r in part if r["status"] == "error")
    assert (ok["label_width"], ok["label_height"]) == (ok["width"], ok["height"])
    ok["width"] += 1
    ok["label_width"] += 1
    other["width"] *= 2                   # the image twice as wide, its labels as they were
    error["members"] = ok["members"]
    store.put(layout.manifest_key(NAMES[1]), encode_part(part))
    store.put(layout.manifest_key(NAMES[2]), encode_part(elsewhere))
    bad = {b.shard: b.problems for b in verify(store).bad}
    problems = bad[NAMES[1]]
    w, h = ok["width"], ok["height"]
    assert f"member {ok['key']}.disp.png is {w - 1}x{h}, the row says {w}x{h}" in problems
    assert f"member {ok['key']}.sky.png is {w - 1}x{h}, the row says {w}x{h}" in problems
    assert (f"row {other['key']}: label size {other['width'] // 2}x{other['height']} is not a downscale of its "
            f"image's {other['width']}x{other['height']}") in bad[NAMES[2]]
    assert f"error row {error['key']} has members (an error sample is not in the tar)" in problems


def test_not_an_output_and_bad_arguments_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    for argv, needle in [(["verify", str(tmp_path / "empty")], "not a depth-engine OUTPUT"),
                         (["verify", str(tmp_path), "--workers", "0"], "--workers"),
                         (["verify", "ftp://host/x"], "unsupported URL")]:
        p = run(*argv)
        assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1


def test_requeue_then_label_relabels_the_tampered_shard(job_s3_bucket, inputs, tiny_models):
    """verify --requeue moves the bad shard's commit record aside (kept); the same label command
    then relabels that shard alone, and verify passes. On S3 (a whole job: one server, ONE_S3);
    the record is moved through the ObjectStore calls every backend's own tests cover."""
    job_store_url = f"s3://{job_s3_bucket}/root/"
    from engine.config import LabelConfig
    from engine.label import label

    raw = os.path.dirname(inputs[0])
    config = LabelConfig(input=f"{raw}/", output=job_store_url, teacher=tiny_models.teacher, sky=tiny_models.sky,
                         workers=1, progress=False)
    assert label(config).shards_committed == len(NAMES)
    store = open_store(job_store_url)
    member = rows(store, NAMES[2])[0]["members"][0]
    blob = bytearray(store.get(layout.shard_key(NAMES[2])))
    blob[member["offset"] + member["size"] // 2] ^= 0xFF
    store.put(layout.shard_key(NAMES[2]), bytes(blob))
    record = store.get(layout.manifest_key(NAMES[2]))

    p = run("verify", job_store_url, "--requeue")
    assert p.returncode == 1 and f"{NAMES[2]}: requeued" in p.stdout and "1 shard(s) requeued" in p.stdout, p.stdout
    assert store.info(layout.manifest_key(NAMES[2])) is None
    kept = [o.key for o in store.list(layout.REQUEUED)]
    assert len(kept) == 2 and store.get(next(k for k in kept if k.endswith(".parquet"))) == record
    assert f"member {member['name']}" in json.loads(store.get(next(k for k in kept if k.endswith(".json"))))["problems"][0]
    p = run("status", job_store_url, "--json")
    assert json.loads(p.stdout)["pending"] == 1

    again = label(config)
    assert (again.shards_committed, again.shards_skipped) == (1, len(NAMES) - 1)
    assert verify(store).ok and run("verify", job_store_url).returncode == 0
