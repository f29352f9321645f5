"""The tar reader and writer together, on random tars (issue 27's property test): zero blocks,
concatenated archives, compressed pieces, long, unicode, escaped-looking, unsafe, duplicate,
case-variant and ungrouped names, every member type. For each tar (fixed seed):

- every key an independent reader finds (tarfile with ignore_zeros, GNU tar's -i) gets exactly
  one row: the sample, or an error row (the key escaped where its name is unsafe);
- every sample the reader passes can be written with the engine's label members beside it, and
  what is written reads back, name for name and byte for byte, in tarfile and in webdataset.
"""
from __future__ import annotations

import gzip
import io
import random
import tarfile

import pytest
import webdataset as wds

from storage.names import check_member_name, escape_key
from storage.shards import TarShardWriter, UngroupedKeys, iter_tar_samples
from storage.label_format import WRITTEN

SEED, TARS = 2027, 150
KEYS = ["a", "b", "dir/c", "caf\u00e9", "\u05e9\u05dc\u05d5\u05dd", "caf%E9", "k" * 240, "k" * 247, "x y+z",
        "../evil", "/abs", "caf\udce9", "ctl\x01", "d//e", "s" * 300]
EXTS = ["jpg", "JPG", "png", "json", "txt", "disp.png", "cls"]
KINDS = [tarfile.REGTYPE] * 12 + [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE,
                                  tarfile.CHRTYPE]


def _archive(rng: random.Random, n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=rng.choice([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
                      encoding="utf-8", errors="surrogateescape") as t:
        for _ in range(n):
            key, ext, kind = rng.choice(KEYS), rng.choice(EXTS), rng.choice(KINDS)
            info = tarfile.TarInfo(key if kind == tarfile.DIRTYPE else f"{key}.{ext}")
            info.type, info.mtime = kind, 0
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "a.jpg"
            data = rng.randbytes(rng.randrange(0, 700)) if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data else None)
            if rng.random() < 0.1:   # a lone zero block between members
                t.fileobj.write(bytes(512))
                t.offset += 512
    return buf.getvalue()


def _random_tar(rng: random.Random) -> bytes:
    parts = [_archive(rng, rng.randrange(1, 12)) for _ in range(rng.choice([1, 1, 2, 3]))]
    if rng.random() < 0.25:
        return b"".join(gzip.compress(p) for p in parts)
    return b"".join(parts)


def _reference_keys(tar: bytes) -> set[str]:
    """Row keys by the independent reader: tarfile reading past zero blocks, webdataset's split."""
    from webdataset.tariterators import base_plus_ext

    if tar[:2] == b"\x1f\x8b":
        tar = gzip.decompress(tar)   # multi-member gzip
    keys = set()
    with tarfile.open(fileobj=io.BytesIO(tar), ignore_zeros=True, encoding="utf-8", errors="surrogateescape") as t:
        for m in t.getmembers():
            key, _ = base_plus_ext(m.name)
            if m.isdir() or key is None or m.name.startswith("__"):
                continue
            keys.add(key if check_member_name(key) is None else escape_key(key))
    return keys


def _rows(tar: bytes) -> list[dict]:
    try:
        return list(iter_tar_samples(io.BytesIO(tar)))
    except UngroupedKeys as e:
        return list(iter_tar_samples(io.BytesIO(tar), ungrouped=e.keys))


@pytest.mark.parametrize("chunk", range(3))
def test_every_key_gets_one_row_and_every_name_written_reads_back(chunk, tmp_path):
    rng = random.Random(SEED + chunk)
    for i in range(TARS // 3):
        tar = _random_tar(rng)
        rows = _rows(tar)
        keys = [r["__key__"] for r in rows]
        assert len(keys) == len(set(keys)), (i, keys)                      # one row per key
        assert set(keys) == _reference_keys(tar), (i, set(keys) ^ _reference_keys(tar))

        samples = [r for r in rows if "__error__" not in r]
        out = io.BytesIO()
        writer = TarShardWriter(out, mtime=0)
        written = {}
        for s in samples:
            members = {ext: data for ext, data in s.items() if ext != "__key__" and ext not in WRITTEN}
            members.update({ext: b"label" for ext in WRITTEN})             # every member the engine may add
            writer.add(s["__key__"], members)
            written.update({f"{s['__key__']}.{ext}": data for ext, data in members.items()})
        writer.close()
        with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as t:
            assert {m.name: t.extractfile(m).read() for m in t.getmembers()} == written
        path = tmp_path / f"{chunk}-{i}.tar"
        path.write_bytes(out.getvalue())
        back = {s["__key__"] for s in wds.WebDataset([str(path)], shardshuffle=False, empty_check=False)}
        assert back == {s["__key__"] for s in samples}
