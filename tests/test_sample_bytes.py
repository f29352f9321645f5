"""Memory is bounded per sample, not per member (issue 27, finding 10): every member of a sample
is held until the sample is written, and samples are read ahead, so a sample's members count
against the worker's budget (pipelines.decode.reserve) and all of them together are capped by
--max-sample-bytes, the rest unread. tracemalloc sees every member's bytes (and numpy's arrays;
not torch's, which these tiny models keep small)."""
from __future__ import annotations

import io
import os
import tarfile
import tracemalloc

import pytest
from builders import encode

from engine.bench.synthetic import scene
from labelers.teacher import Teacher
from pipelines.decode import SampleLimits
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.tasks import ShardTask
from storage import layout
from storage.manifest import decode_part
from storage.shards import iter_tar_samples
from storage.stores import open_store

MiB = 2**20


def _tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_sample_over_the_byte_limit_is_an_error_row_and_the_rest_is_unread():
    tar = _tar([("a", {"jpg": b"A", "b0": bytes(400), "b1": bytes(400), "b2": bytes(400), "b3": bytes(400)}),
                ("z", {"jpg": b"Z", "b0": bytes(900)})])
    got = list(iter_tar_samples(io.BytesIO(tar), max_sample_bytes=1000))
    assert got[0].keys() == {"__key__", "__error__"}
    assert "holds over 1000 bytes of members (--max-sample-bytes): 'a.b2' brings them to 1201" in got[0]["__error__"]
    assert got[1] == {"__key__": "z", "jpg": b"Z", "b0": bytes(900)}
    with pytest.raises(ValueError, match="--max-sample-bytes must be >= 1"):
        SampleLimits(max_sample_bytes=0)


def test_many_member_samples_are_held_within_the_workers_budget(tiny_models, tmp_path):
    """12 samples of a photo and 8 incompressible 1 MiB members, with a budget of 8 MB
    (--max-image-pixels 200000: 2 x 200000 pixels at 20 bytes): without counting members the
    read-ahead held ~20 samples, 160+ MiB; counted, a few."""
    photo = encode(scene(40, 56, 1), "JPEG", quality=90)
    samples = [(f"s{i:02d}", {"jpg": photo, **{f"m{j}": os.urandom(MiB) for j in range(8)}}) for i in range(12)]
    src = tmp_path / "many.tar"
    src.write_bytes(_tar(samples))
    del samples
    out = open_store(str(tmp_path / "out"))
    labelers = Labelers(Teacher.load(tiny_models.teacher))
    limits = SampleLimits(max_pixels=200_000)
    tracemalloc.start()
    try:
        result = label_shard(ShardTask(str(src), "many"), labelers, out, batch_size=4, threads=2, limits=limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.committed and result.ok == 12
    rows = decode_part(out.get(layout.manifest_key("many"))).to_pylist()
    assert all(len(r["members"]) >= 10 for r in rows)             # every member carried
    assert peak < 48 * MiB, f"{peak / MiB:.0f} MiB traced at peak"
