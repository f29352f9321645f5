"""``label --repair-errors``: a committed shard's error rows relabeled into a new generation.

Checked against independent readers: the stdlib tarfile reads both generations (the kept
samples' member bytes must be identical), a fresh label of the fixed images is the reference
for the repaired ones, verify and the student loader read the OUTPUT after. A kill -9 at two
points of a repair (before the manifest part is replaced, before the old tar is removed) leaves
an OUTPUT that verify passes, and a rerun completes it.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from builders import photo_samples, write_shard
from helpers_cli import offline_cache, run  # noqa: F401 - the fixture applies to this module
from PIL import Image

from engine import job
from engine.config import LabelConfig
from engine.label import prepare
from labelers.sky import SkySegmenter
from labelers.teacher import Teacher
from pipelines.decode import SampleLimits
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.repair import RepairError, repair_shard
from pipelines.tasks import ShardTask
from pipelines.verify import verify
from storage import layout
from storage.commit import ClaimPolicy
from storage.manifest import decode_part
from storage.output import Output
from storage.stores import open_store

NAME = "shard-000000"
BROKEN = ("img0001", "img0005")      # undecodable bytes at first, fixed later
WIDE = "img0003"                     # refused by the aspect limit at first
LIMITS = SampleLimits(max_aspect=3.0)
SIZES = [(40, 56), (48, 40), (40, 56), (24, 96), (40, 56), (56, 48), (40, 56), (32, 64)]


@pytest.fixture(scope="module")
def labelers(tiny_models):
    return Labelers(Teacher.load(tiny_models.teacher, name="tiny-teacher"),
                    SkySegmenter.load(tiny_models.sky, name="tiny-sky"))


def samples(fixed: bool) -> list[dict]:
    out = photo_samples(SIZES)
    if not fixed:
        for s in out:
            if s["__key__"] in BROKEN:
                s["jpg"] = b"\xff\xd8 not a jpeg"
    return out


def labeled(tmp_path, labelers, output_url: str, limits: SampleLimits = LIMITS) -> tuple[str, object]:
    """The input shard with broken samples, labeled and committed; then the input fixed."""
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    url = write_shard(raw / f"{NAME}.tar", samples(fixed=False))
    output = open_store(output_url)
    r = label_shard(ShardTask(url, NAME), labelers, output, limits=limits)
    assert r.committed and r.errors == 3, r
    write_shard(raw / f"{NAME}.tar", samples(fixed=True))
    return url, output


def rows_of(output) -> list[dict]:
    return decode_part(output.get(layout.manifest_key(NAME))).to_pylist()


def members_by_tarfile(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def disparity(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int64)


def test_repair_relabels_only_the_error_rows_and_keeps_every_other_byte(tmp_path, labelers, store_url):
    url, output = labeled(tmp_path, labelers, store_url)
    before = rows_of(output)
    old_members = members_by_tarfile(output.get(layout.shard_key(NAME)))

    result = repair_shard(ShardTask(url, NAME), labelers, output, limits=SampleLimits())
    assert (result.committed, result.generation, result.targets, result.repaired) == (True, 1, 3, 3)

    after = rows_of(output)
    assert [r["key"] for r in after] == [r["key"] for r in before]
    assert {r["shard"] for r in after} == {f"{NAME}/g1.tar"}
    assert output.info(layout.shard_key(NAME)) is None                 # the old generation, removed
    new_members = members_by_tarfile(output.get(layout.shard_key(NAME, 1)))
    for old, new in zip(before, after):
        if old["status"] == "ok":           # kept: same members, bytes, checksums, label time
            assert [(m["name"], m["size"], m["sha256"]) for m in new["members"]] == \
                   [(m["name"], m["size"], m["sha256"]) for m in old["members"]]
            assert all(new_members[m["name"]] == old_members[m["name"]] for m in old["members"])
            assert new["labeled_at"] == old["labeled_at"] and new["attempt"] == old["attempt"]
        else:
            assert new["status"] == "ok" and new["labeled_at"] > old["labeled_at"], new
    assert set(new_members) == {m["name"] for r in after for m in r["members"]}

    # The repaired labels are what labeling the fixed images afresh gives (same batches: the
    # two 40x56 images together, the wide one alone).
    fresh_in = write_shard(tmp_path / "fresh.tar", [s for s in samples(fixed=True) if s["__key__"] in (*BROKEN, WIDE)])
    fresh_out = open_store(str(tmp_path / "fresh"))
    label_shard(ShardTask(fresh_in, "fresh"), labelers, fresh_out)
    reference = members_by_tarfile(fresh_out.get(layout.shard_key("fresh")))
    for key in (*BROKEN, WIDE):
        got, want = disparity(new_members[f"{key}.disp.png"]), disparity(reference[f"{key}.disp.png"])
        assert got.shape == want.shape and np.abs(got - want).max() <= 1, key
        assert new_members[f"{key}.jpg"] == reference[f"{key}.jpg"]

    assert verify(output).ok
    assert Output(output).tar_keys([NAME]) == {NAME: layout.shard_key(NAME, 1)}


def test_reason_chooses_the_rows_and_the_rest_stay_as_they_were(tmp_path, labelers):
    url, output = labeled(tmp_path, labelers, str(tmp_path / "out"))
    before = {r["key"]: r for r in rows_of(output)}
    reason = re.compile("recognised image format")
    assert reason.search(before[BROKEN[0]]["error"]) and not reason.search(before[WIDE]["error"]), before[WIDE]

    result = repair_shard(ShardTask(url, NAME), labelers, output, reason=reason, limits=SampleLimits())
    assert (result.targets, result.repaired) == (2, 2)
    after = {r["key"]: r for r in rows_of(output)}
    assert after[WIDE] == {**before[WIDE], "shard": f"{NAME}/g1.tar", "tar_size": after[WIDE]["tar_size"]}
    assert all(after[k]["status"] == "ok" for k in BROKEN)

    again = repair_shard(ShardTask(url, NAME), labelers, output, limits=SampleLimits())   # the wide one now
    assert (again.generation, again.repaired) == (2, 1)
    assert [o.key for o in output.list(layout.SHARDS)] == [layout.shard_key(NAME, 2)]
    assert verify(output).ok


def test_a_row_still_failing_stays_an_error_and_a_stale_generation_is_fenced(tmp_path, labelers):
    url, output = labeled(tmp_path, labelers, str(tmp_path / "out"))
    result = repair_shard(ShardTask(url, NAME), labelers, output, limits=LIMITS)   # the wide one still too wide
    assert (result.targets, result.repaired) == (3, 2)
    assert {r["key"]: r["status"] for r in rows_of(output)}[WIDE] == "error"

    # An attempt that read generation 0 and commits after generation 1 did: aborted, nothing changed.
    from storage.sink import ShardSink

    part = output.get(layout.manifest_key(NAME))
    with ShardSink(output, NAME, generation=1) as stale:
        stale.add("x", {"txt": b"x"}, {"key": "x", "status": "ok"})
        assert not stale.commit({"source_kind": "pseudo"}, {"id": "stale"}, ClaimPolicy.of(4),
                                replaces=layout.shard_file(NAME))
    assert output.get(layout.manifest_key(NAME)) == part and verify(output).ok


def test_a_damaged_member_stops_the_repair_and_changes_nothing(tmp_path, labelers):
    url, output = labeled(tmp_path, labelers, str(tmp_path / "out"))
    member = next(r for r in rows_of(output) if r["status"] == "ok")["members"][0]
    blob = bytearray(output.get(layout.shard_key(NAME)))
    blob[member["offset"]] ^= 0xFF
    output.put(layout.shard_key(NAME), bytes(blob))
    part = output.get(layout.manifest_key(NAME))
    with pytest.raises(RepairError, match=member["name"]):
        repair_shard(ShardTask(url, NAME), labelers, output, limits=SampleLimits())
    assert output.get(layout.manifest_key(NAME)) == part
    assert [o.key for o in output.list(layout.SHARDS)] == [layout.shard_key(NAME)]


CRASH = """
import os, signal, sys
from labelers.sky import SkySegmenter
from labelers.teacher import Teacher
from pipelines.decode import SampleLimits
from pipelines.pseudo_label import Labelers
from pipelines.repair import repair_shard
from pipelines.tasks import ShardTask
from storage.commit import ClaimPolicy
from storage.local import LocalStore
from storage.stores import open_store

url, out, teacher, sky, point = sys.argv[1:]
def dying(method, prefix):
    def call(self, key, *a, **kw):
        if key.startswith(prefix):
            os.kill(os.getpid(), signal.SIGKILL)
        return method(self, key, *a, **kw)
    return call
if point == "before-part":      # the new tar is complete, the part still names the old one
    LocalStore.put = dying(LocalStore.put, "manifest/")
else:                           # the part names the new tar, the old one is not removed yet
    LocalStore.delete = dying(LocalStore.delete, "shards/")
labelers = Labelers(Teacher.load(teacher, name="tiny-teacher"), SkySegmenter.load(sky, name="tiny-sky"))
repair_shard(ShardTask(url, "%s"), labelers, open_store(out), limits=SampleLimits(), claim=ClaimPolicy.of(2))
""" % NAME


@pytest.mark.parametrize("point", ["before-part", "before-removal"])
def test_kill_9_during_a_repair_leaves_a_whole_generation_and_a_rerun_completes(tmp_path, labelers, tiny_models,
                                                                                 point):
    out = str(tmp_path / "out")
    url, output = labeled(tmp_path, labelers, out)
    before = rows_of(output)
    p = subprocess.run([sys.executable, "-c", CRASH, url, out, tiny_models.teacher, tiny_models.sky, point],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]

    keys = sorted(o.key for o in output.list(layout.SHARDS))
    assert keys == [layout.shard_key(NAME), layout.shard_key(NAME, 1)]      # both tars are whole objects
    current = rows_of(output)
    assert verify(output).ok                                                  # the part names a whole tar
    if point == "before-part":
        assert current == before
    else:
        assert {r["shard"] for r in current} == {f"{NAME}/g1.tar"}
        assert all(r["status"] == "ok" for r in current if r["key"] in BROKEN)

    # The rerun: the repair again (before-part), then the superseded tar removed by the engine's plan.
    if point == "before-part":
        # its claim was held when it died: taken over once it lapsed (seconds here, as the dead attempt set it)
        again = repair_shard(ShardTask(url, NAME), labelers, output, limits=LIMITS, claim=ClaimPolicy.of(2))
        assert again.generation == 1
    config = LabelConfig(input=url, output=out, teacher=tiny_models.teacher, sky=tiny_models.sky,
                         progress=False, limits=LIMITS)
    job.write(output, prepare(config).spec)   # what the label run that made this OUTPUT wrote
    from engine.repair import repair

    summary = repair(config, reason="recognised image format")
    assert (summary.shards_to_repair, summary.superseded_removed) == (0, point == "before-removal"), summary
    assert [o.key for o in output.list(layout.SHARDS)] == [layout.shard_key(NAME, 1)]
    assert verify(output).ok


def test_the_command_repairs_on_ray_and_the_readers_follow(tmp_path, labelers, tiny_models):
    """``label --repair-errors`` on the engine's actors (local Ray; the flow's tests above run on
    every store, S3 included); then verify, status, audit and the student loader read the new
    generation."""
    from pipelines.student.loader import DepthShards, LoaderConfig

    store_url = str(tmp_path / "out")
    url, output = labeled(tmp_path, labelers, store_url)
    args = [url, store_url, "--teacher", tiny_models.teacher, "--sky", tiny_models.sky, "--workers", "1"]
    config = LabelConfig(input=url, output=store_url, teacher=tiny_models.teacher, sky=tiny_models.sky)
    job.write(output, prepare(config).spec)

    p = run("label", *args, "--reason", "x")
    assert p.returncode == 2 and "--repair-errors" in p.stderr, p.stderr
    p = run("label", *args, "--repair-errors", "--reason", "(", "--json")
    assert p.returncode == 2 and "--reason" in p.stderr, p.stderr

    p = run("label", *args, "--repair-errors", "--json", check=0)
    s = json.loads(p.stdout)
    assert (s["shards_repaired"], s["rows_targeted"], s["rows_repaired"], s["rows_still_error"]) == (1, 3, 3, 0), s
    assert s["copied_bytes"] > 0 and s["exit_code"] == 0
    assert run("verify", store_url).returncode == 0
    assert json.loads(run("status", store_url, "--json", check=0).stdout)["committed"] == 1
    audit = json.loads(run("audit", store_url, "--json", check=0).stdout)
    assert (audit["samples"], audit["errors"]) == (len(SIZES), 0), audit
    run("audit", store_url, "--html", str(tmp_path / "audit.html"), check=0)   # images by ranged reads of g1
    assert (tmp_path / "audit.html").read_text().count("data:image/png;base64") >= 2
    keys = {x["key"] for x in DepthShards(LoaderConfig((store_url,), crop=16, flip=False))}
    assert keys == {s["__key__"] for s in samples(fixed=True)}

    p = run("label", *args, "--repair-errors", "--json", check=0)   # nothing left to repair: no cluster
    s = json.loads(p.stdout)
    assert (s["shards_to_repair"], s["shards_repaired"], s["workers"]) == (0, 0, 0), s


def test_an_ungrouped_key_stays_one_error_row_until_the_input_groups_it(tmp_path, labelers):
    """The repair reads the input as label does: a key whose members are apart is one error row
    (not a failed repair); once the input holds it together, the repair labels it."""
    good = photo_samples([(40, 56), (48, 40), (40, 56)])
    a, b, c = good

    def shard(grouped: bool, broken_c: bool) -> str:
        import webdataset as wds

        path = tmp_path / f"{NAME}.tar"
        cj = b"\xff\xd8 not a jpeg" if broken_c else c["jpg"]
        members = ([("img0000.jpg", a["jpg"]), ("img0000.json", b"{}"), ("img0001.jpg", b["jpg"])] if grouped else
                   [("img0000.jpg", a["jpg"]), ("img0001.jpg", b["jpg"]), ("img0000.json", b"{}")])
        with tarfile.open(path, "w") as t:
            for name, data in [*members, ("img0002.jpg", cj)]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        assert len(list(wds.WebDataset([str(path)], shardshuffle=False))) == (3 if grouped else 4)
        return str(path)

    output = open_store(str(tmp_path / "out"))
    url = shard(grouped=False, broken_c=True)
    first = label_shard(ShardTask(url, NAME), labelers, output)
    assert first.committed and (first.ok, first.errors) == (1, 2)
    status = {r["key"]: (r["status"], r["error"] or "") for r in rows_of(output)}
    assert status["img0001"][0] == "ok" and "reappears after other keys" in status["img0000"][1]

    shard(grouped=False, broken_c=False)                   # c fixed, the layout not
    result = repair_shard(ShardTask(url, NAME), labelers, output)
    assert result.committed and (result.targets, result.repaired) == (2, 1)
    assert {r["key"]: r["status"] for r in rows_of(output)} == {"img0000": "error", "img0001": "ok", "img0002": "ok"}

    shard(grouped=True, broken_c=False)                    # the layout fixed too
    result = repair_shard(ShardTask(url, NAME), labelers, output)
    assert result.committed and (result.targets, result.repaired) == (1, 1)
    assert {r["status"] for r in rows_of(output)} == {"ok"} and verify(output).ok
