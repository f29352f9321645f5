"""storage/shards.py against crafted tars: members are data, never paths.

Every tar is built here, with tarfile or by patching header bytes (tarfile cannot write sparse
or malformed members). Each case checks what the reader yields (a sample, an error dict, or
ShardFormatError), and where it matters that it stayed small: tracemalloc peaks, reads of the
underlying stream counted against the tar's size (a loop past EOF shows as a count, not as a
slow test), and an audit hook that sees any file the process opens for writing or creates.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import random
import re
import sys
import tarfile
import tracemalloc
from contextlib import contextmanager
from urllib.parse import unquote_to_bytes

import pytest
import webdataset as wds

from storage.shards import (
    DEFAULT_MAX_MEMBER_BYTES,
    ShardFormatError,
    TarShardWriter,
    UngroupedKeys,
    check_member_name,
    escape_key,
    iter_tar_samples,
)
from storage.names import unescape_key

BLOCK = tarfile.BLOCKSIZE
GiB = 2**30
UNSAFE_NAMES = ["../../x.jpg", "/tmp/x.jpg", "a/./b.jpg", "a\\b.jpg", "a\x01b.jpg", "caf\udce9.jpg",
                "s" * 300 + ".jpg", "a//b.jpg", "x\x7fy.jpg", "n\x00ul.jpg"]


# ---------------------------------------------------------------- building tars


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **fields) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mtime = kind, 0
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "a.jpg"
    for attr, value in fields.items():
        setattr(info, attr, value)
    if info.isreg():
        info.size = len(data)
    return info, data


def build(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.GNU_FORMAT, end: bool = True) -> bytes:
    """A tar of `members`; with end=False, without its end-of-archive blocks (to splice crafted ones after)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
        size = tar.offset
    return buf.getvalue() if end else buf.getvalue()[:size]


def header(name: str, kind: bytes, size: int, fmt: int = tarfile.GNU_FORMAT, **patch: bytes) -> bytes:
    """One header block; `patch` maps 'offset_<n>' to bytes written there before the checksum."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = tarfile.REGTYPE, size, 0
    block = bytearray(info.tobuf(fmt, "utf-8", "surrogateescape")[-BLOCK:])
    block[156:157] = kind
    for where, value in patch.items():
        at = int(where.removeprefix("offset_"))
        block[at:at + len(value)] = value
    return checksummed(block)


def checksummed(block: bytes | bytearray) -> bytes:
    block = bytearray(block)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def octal(n: int, width: int = 12) -> bytes:
    return b"%0*o\0" % (width - 1, n)


def gnu_sparse(name: str, realsize: int = GiB, extension_blocks: int = 0) -> bytes:
    """An old GNU sparse member ('S'): 512 stored bytes that expand to `realsize` bytes of file."""
    entry = octal(realsize - BLOCK) + octal(BLOCK)  # one 512-byte region at the end, holes before
    patch = {"offset_257": b"ustar  \0", "offset_386": entry, "offset_482": bytes([extension_blocks > 0]),
             "offset_483": octal(realsize)}
    blocks = [header(name, tarfile.GNUTYPE_SPARSE, BLOCK, **patch)]
    for i in range(extension_blocks):  # 21 map entries each, all 24 bytes, then isextended
        block = bytearray((octal(i * 2 * BLOCK) + octal(BLOCK)) * 21 + bytes(8))
        block[504] = i + 1 < extension_blocks
        blocks.append(bytes(block))
    return b"".join(blocks) + b"S" * BLOCK


def pax_sparse(name: str, realsize: int = GiB, map_entries: int = 1) -> bytes:
    """A pax 1.0 sparse member: the map is the first lines of the member's data."""
    sparse_map = pad(b"%d\n" % map_entries + b"1\n1\n" * (map_entries - 1) + b"%d\n%d\n" % (realsize - BLOCK, BLOCK))
    info, _ = member(f"./GNUSparseFile.0/{name}", bytes(len(sparse_map) + BLOCK))
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                        "GNU.sparse.realsize": str(realsize)}
    head = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return head + sparse_map + b"P" * BLOCK


def pax_record(keyword: str, value: bytes) -> bytes:
    """'<length> <keyword>=<value>\\n', the length counting its own digits."""
    body = b" %s=%s\n" % (keyword.encode(), value)
    length = len(body) + 1
    while length != len(str(length)) + len(body):
        length = len(str(length)) + len(body)
    return b"%d%s" % (length, body)


def pax_header(records: bytes) -> bytes:
    return header("././@PaxHeader", tarfile.XHDTYPE, len(records)) + pad(records)


def entries(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    return build(members, fmt, end=False)


END = bytes(2 * BLOCK)


# ---------------------------------------------------------------- watching the reader


class ReadBudgetExceeded(BaseException):
    """Raised through the reader (no except clause catches it): reading went on past any bound."""


class CountingReader(io.RawIOBase):
    """The tar's bytes, counting read calls and bytes; refuses to go on past `max_calls`."""

    def __init__(self, data: bytes, max_calls: int | None = None) -> None:
        super().__init__()
        self._f = io.BytesIO(data)
        self.calls, self.bytes = 0, 0
        self.max_calls = max_calls if max_calls is not None else len(data) // BLOCK + 64

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.calls += 1
        if self.calls > self.max_calls:
            raise ReadBudgetExceeded(f"{self.calls} reads of a {len(self._f.getbuffer())}-byte tar")
        n = self._f.readinto(buffer)
        self.bytes += n
        return n


_WRITES: list | None = None
_WRITE_EVENTS = {"os.mkdir", "os.symlink", "os.link", "os.rename", "os.chmod", "os.utime", "os.chown",
                 "os.truncate", "os.remove", "shutil.copyfile", "tempfile.mkstemp", "tempfile.mkdtemp"}


def _audit(event: str, args: tuple) -> None:
    if _WRITES is None:
        return
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or \
                  (flags is not None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing:
            _WRITES.append((event, path))
    elif event in _WRITE_EVENTS:
        _WRITES.append((event, args[0] if args else None))


sys.addaudithook(_audit)  # process-wide and permanent, so it does nothing unless a test is watching


@contextmanager
def watched(tmp_path, monkeypatch):
    """Runs the body in an empty cwd; yields the list of writes the audit hook saw (must stay [])."""
    global _WRITES
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    _WRITES = writes = []
    try:
        yield writes
    finally:
        _WRITES = None
    assert list(cwd.iterdir()) == []


def read_all(data: bytes, **kwargs) -> list[dict]:
    return list(iter_tar_samples(io.BytesIO(data), **kwargs))


def peak_of(call) -> tuple[object, int]:
    """(call's result or exception, tracemalloc peak in bytes while it ran)."""
    tracemalloc.start()
    try:
        try:
            result = call()
        except ShardFormatError as e:
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------- member types


@pytest.mark.parametrize("kind, word", [
    (tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"), (tarfile.CHRTYPE, "character device"),
    (tarfile.BLKTYPE, "block device"), (tarfile.FIFOTYPE, "fifo"), (b"V", "tar type b'V'"),
])
def test_non_regular_members_make_an_error_row_and_the_shard_goes_on(kind, word):
    good = [member("a.jpg", b"A"), member("a.json", b"{}")]
    bad = [member("x.json", b"{}"), member("x.jpg", kind=kind), member("x.txt", b"t")]  # read, refused, skipped
    got = read_all(build(good + bad + [member("z.jpg", b"Z")]))
    assert got[0] == {"__key__": "a", "jpg": b"A", "json": b"{}"}
    assert got[1].keys() == {"__key__", "__error__"} and got[1]["__key__"] == "x"
    assert word in got[1]["__error__"] and "'x.jpg'" in got[1]["__error__"]
    assert got[2:] == [{"__key__": "z", "jpg": b"Z"}]


def test_directories_are_structure_not_samples():
    tar = build([member("d", kind=tarfile.DIRTYPE), member("d/a.jpg", b"A"), member("d/sub.x", kind=tarfile.DIRTYPE),
                 member("d/a.json", b"{}"), member("e.jpg", b"E")])
    assert read_all(tar) == [{"__key__": "d/a", "jpg": b"A", "json": b"{}"}, {"__key__": "e", "jpg": b"E"}]


def test_regular_members_and_webdataset_skip_rules():
    tar = build([member("__meta__", b"m"), member("__x__/y.jpg", b"m"), member("noext", b"n"),
                 member("a.JPG", b"A"), member("a.disp.png", b"D"), member("dir/k.jpg", b"K")])
    assert read_all(tar) == [{"__key__": "a", "jpg": b"A", "disp.png": b"D"}, {"__key__": "dir/k", "jpg": b"K"}]


# ---------------------------------------------------------------- sparse members


@pytest.mark.parametrize("sparse", [gnu_sparse, pax_sparse], ids=["gnu-S", "pax-1.0"])
def test_sparse_member_claiming_a_gibibyte_is_refused_unread(sparse, tmp_path, monkeypatch):
    tar = entries([member("a.jpg", b"A")]) + sparse("big.jpg") + entries([member("z.jpg", b"Z")]) + END
    assert len(tar) < 13_000
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:  # stdlib agrees it is a 1 GiB sparse file
        big = t.getmember("big.jpg")
        assert big.issparse() and big.size == GiB
    with watched(tmp_path, monkeypatch) as writes:
        got, peak = peak_of(lambda: read_all(tar))
    assert writes == []
    assert got[0] == {"__key__": "a", "jpg": b"A"} and got[2] == {"__key__": "z", "jpg": b"Z"}
    assert got[1]["__key__"] == "big" and "sparse" in got[1]["__error__"] and str(GiB) in got[1]["__error__"]
    assert peak < 50 * 2**20, peak


def test_sparse_maps_are_never_parsed():
    """tarfile would keep 21 map entries per 512-byte GNU extension block, and read a pax 1.0 map
    of any length from the member's data: both grow with the stream, not with any limit."""
    for tar in (gnu_sparse("big.jpg", extension_blocks=8000) + END,
                pax_sparse("big.jpg", map_entries=1_000_000) + END):
        got, peak = peak_of(lambda: read_all(tar))
        assert [set(s) for s in got] == [{"__key__", "__error__"}]
        assert peak < 3 * 2**20, peak


# ---------------------------------------------------------------- sizes


def test_member_over_the_limit_is_refused_and_never_read(tmp_path, monkeypatch):
    tar = build([member("a.jpg", b"A" * 1000), member("big.jpg", b"B" * 5000), member("big.json", b"{}"),
                 member("z.jpg", b"Z")])
    got = read_all(tar, max_member_bytes=1000)
    assert got[0] == {"__key__": "a", "jpg": b"A" * 1000}  # at the limit: read
    assert got[1] == {"__key__": "big", "__error__": "member 'big.jpg' is 5000 bytes, over the 1000-byte limit; not read"}
    assert got[2] == {"__key__": "z", "jpg": b"Z"}
    assert DEFAULT_MAX_MEMBER_BYTES == 512 * 2**20

    huge = build([member("big.jpg", bytes(40 * 2**20)), member("z.jpg", b"Z")])
    with watched(tmp_path, monkeypatch) as writes:
        got, peak = peak_of(lambda: read_all(huge, max_member_bytes=1000))
    assert writes == [] and [s["__key__"] for s in got] == ["big", "z"] and "__error__" in got[0]
    assert peak < 8 * 2**20, peak  # skipped in chunks, never held


@pytest.mark.parametrize("size_field", [b"\x80" + (2**80).to_bytes(11, "big"), octal(8**11 - 1)],
                         ids=["base256-2^80", "octal-8GiB"])
def test_a_size_claim_past_the_stream_ends_at_eof(size_field):
    """tarfile's forward skip loops once per 10 KiB of the claimed size even past EOF."""
    tar = entries([member("a.jpg", b"A")]) + header("big.jpg", tarfile.REGTYPE, 0, offset_124=size_field) + b"x" * 700
    stream = CountingReader(tar, max_calls=50)
    got = []
    with pytest.raises(ShardFormatError, match="truncated"):
        for sample in iter_tar_samples(stream):
            got.append(sample["__key__"])
    assert got == ["a"]


def test_negative_size_is_damage():
    tar = header("a.jpg", tarfile.REGTYPE, 0, offset_124=b"\xff" * 12) + END
    with pytest.raises(ShardFormatError, match="negative size"):
        read_all(tar)


# ---------------------------------------------------------------- compressed shards


def test_compressed_shards_read_whole_and_their_damage_is_found():
    tar = build([member("a.jpg", b"A" * 3000), member("b.jpg", b"B")])
    for compress in (gzip.compress, bz2.compress, lzma.compress):
        packed = compress(tar)
        assert read_all(packed) == [{"__key__": "a", "jpg": b"A" * 3000}, {"__key__": "b", "jpg": b"B"}]
        with pytest.raises(ShardFormatError, match="ends early|truncated"):
            read_all(packed[: len(packed) // 2])
        with pytest.raises(ShardFormatError, match="end-of-archive"):  # whole stream, tar cut after 'a'
            read_all(compress(tar[: BLOCK + 3072]))
        cut = 1500                      # one tar compressed in two pieces (pigz, pbzip2, xz -T)
        assert read_all(compress(tar[:cut]) + compress(tar[cut:]) + bytes(100)) == read_all(tar)
        with pytest.raises(ShardFormatError, match="what follows a .* stream"):
            read_all(packed + b"junk")
    bad_crc = bytearray(gzip.compress(tar))
    bad_crc[-8] ^= 1
    with pytest.raises(ShardFormatError, match="invalid gzip data"):
        read_all(bytes(bad_crc))


def test_a_bzip2_bomb_is_decompressed_in_bounded_steps():
    """tarfile's stream decompresses each 10 KiB of input whole: here a few hundred bytes hold 64 MiB."""
    packer = bz2.BZ2Compressor()
    parts = [packer.compress(entries([member("a.jpg", b"A")]) + header("big.jpg", tarfile.REGTYPE, 64 * 2**20))]
    parts += [packer.compress(bytes(2**20)) for _ in range(64)]
    parts += [packer.compress(entries([member("z.jpg", b"Z")]) + END), packer.flush()]
    bomb = b"".join(parts)
    assert len(bomb) < 1000
    got, peak = peak_of(lambda: read_all(bomb, max_member_bytes=1000))
    assert [s["__key__"] for s in got] == ["a", "big", "z"] and "__error__" in got[1]
    assert peak < 8 * 2**20, peak


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
@pytest.mark.parametrize("name", UNSAFE_NAMES + ["dir/.jpg"], ids=repr)
def test_unsafe_names_become_escaped_error_rows(name, fmt):
    if "\0" in name and fmt == tarfile.GNU_FORMAT:
        pytest.skip("a NUL ends a ustar name field; only a pax path can hold one")
    named = member(name, b"X", pax_headers={"path": name} if fmt == tarfile.PAX_FORMAT else {})
    tar = build([member("a.jpg", b"A"), named, member("dir/key.jpg", b"K")], fmt)
    got = read_all(tar)
    assert got[0] == {"__key__": "a", "jpg": b"A"} and got[2] == {"__key__": "dir/key", "jpg": b"K"}
    row = got[1]
    assert row.keys() == {"__key__", "__error__"} and "unsafe name" in row["__error__"]
    raw_key = name.rpartition(".")[0].encode("utf-8", "surrogateescape")
    assert unescape_key(row["__key__"]) == raw_key
    assert re.fullmatch(r"[A-Za-z0-9_%-]+\.escaped", row["__key__"]) and row["__key__"] == escape_key(name.rpartition(".")[0])
    assert "\n" not in row["__error__"] and row["__error__"].isprintable()


def test_check_member_name():
    for good in ("a.jpg", "dir/key.jpg", "a/b/c.disp.png", "caf\u00e9.jpg", "k" * 251 + ".jpg", "-_.x"):
        assert check_member_name(good) is None, good
    for bad in UNSAFE_NAMES + ["", ".", "..", "a/", "a/..", "x" * 256, "/".join(["d" * 200] * 6), "\ud800.jpg"]:
        assert check_member_name(bad), repr(bad)


def test_escape_key_is_reversible_and_one_safe_segment():
    rng = random.Random(7)
    names = ["a.b/c%d", "../x", "caf\udce9", "\u00e9\x00/", ""] + \
            [rng.randbytes(rng.randrange(40)).decode("utf-8", "surrogateescape") for _ in range(500)]
    for name in names:
        escaped = escape_key(name)
        assert re.fullmatch(r"[A-Za-z0-9_%-]*\.escaped", escaped), escaped
        assert unescape_key(escaped) == name.encode("utf-8", "surrogateescape")
        assert unquote_to_bytes(escaped.removesuffix(".escaped")) == name.encode("utf-8", "surrogateescape")
    assert escape_key("dir/key-1_A") == "dir%2Fkey-1_A.escaped" and escape_key("%2E") == "%252E.escaped"
    with pytest.raises(ValueError, match="not an escaped key"):
        unescape_key("caf%E9")


def test_an_escaped_key_never_collides_with_a_legal_one():
    """`caf%E9.jpg` is a legal name (key `caf%E9`); a non-UTF-8 `caf\\xe9.jpg` escaped to the same
    string gave two rows with one key."""
    tar = build([member("caf%E9.jpg", b"L"), member("caf\udce9.jpg", b"X"), member("caf%25E9.jpg", b"P")])
    got = read_all(tar)
    keys = [s["__key__"] for s in got]
    assert len(set(keys)) == 3 and keys[0] == "caf%E9" and keys[2] == "caf%25E9"
    assert got[0] == {"__key__": "caf%E9", "jpg": b"L"} and unescape_key(keys[1]) == b"caf\xe9"


def test_writer_refuses_unsafe_names_and_writes_what_readers_accept(tmp_path):
    shard = TarShardWriter(io.BytesIO(), mtime=0)
    for name in UNSAFE_NAMES:
        key = name.rpartition(".")[0]
        with pytest.raises(ValueError):
            shard.add(key, {"jpg": b"x"})
    for ext in ("j\x01pg", "__key__", "__error__", "s" * 300):
        with pytest.raises(ValueError):
            shard.add("k", {ext: b"x"})

    path = tmp_path / "out.tar"
    expected = {"dir/key": {"jpg": b"J", "json": b"{}"}, "caf\u00e9": {"png": b"P"}, "k-1_x": {"disp.png": b"D"}}
    with open(path, "wb") as f:
        shard = TarShardWriter(f, mtime=0)
        for key, members in expected.items():
            shard.add(key, members)
        shard.close()
    with tarfile.open(path) as tar:
        assert all(m.isreg() and check_member_name(m.name) is None for m in tar.getmembers())
    loaded = list(wds.WebDataset(str(path), shardshuffle=False))  # an independent reader
    assert [s["__key__"] for s in loaded] == list(expected)
    assert all(s[ext] == data for s, members in zip(loaded, expected.values()) for ext, data in members.items())
    with open(path, "rb") as f:
        assert read_all(f.read()) == [{"__key__": k, **m} for k, m in expected.items()]


# ---------------------------------------------------------------- headers


def test_damaged_header_mid_stream_is_an_error_not_the_end():
    """tarfile ends the stream silently at a bad checksum: b would be the last sample, c lost."""
    tar = bytearray(build([member("a.jpg", b"A"), member("b.jpg", b"B"), member("c.jpg", b"C")]))
    tar[4 * BLOCK + 10] ^= 0xFF  # c.jpg's header: 'b' may not be complete, 'a' is
    got = []
    with pytest.raises(ShardFormatError, match="bad checksum"):
        for sample in iter_tar_samples(io.BytesIO(bytes(tar))):
            got.append(sample["__key__"])
    assert got == ["a"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("records, message", [
    (b"1" * 200_000, "malformed pax"),  # one long digit run: quadratic regex search in tarfile
    (pax_record("comment", b"1" * 200_000), "run of more than 64 digits"),
    (b"2 " * 20_000 + b"=\n", "malformed pax"),  # overlapping records: quadratic keyword memory
    (b"99 path=x.jpg\n", "malformed pax"),  # a record longer than the header
], ids=["digits", "digit-value", "overlapping", "overlong"])
def test_pax_headers_tarfile_would_choke_on_are_damage(records, message):
    tar = pax_header(records) + entries([member("a.jpg", b"A")]) + END
    got, peak = peak_of(lambda: read_all(tar))
    assert isinstance(got, ShardFormatError) and message in str(got), got
    assert peak < 8 * 2**20, peak


def test_extended_headers_are_bounded():
    name = b"x" * (2**20 + 1)
    oversized = header("././@LongLink", tarfile.GNUTYPE_LONGNAME, len(name)) + pad(name) + END
    chain = b"".join(header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 6) + pad(b"%d.jpg\0" % i)
                     for i in range(300)) + entries([member("a.jpg", b"A")]) + END
    for tar, message in ((oversized, "extended tar header of"), (chain, "extended tar headers before")):
        got, peak = peak_of(lambda: read_all(tar))
        assert isinstance(got, ShardFormatError) and message in str(got), got
        assert peak < 8 * 2**20, peak
    long = "d/" + "k" * 200  # a GNU long name, after a pax path: both still read
    ok = pax_header(pax_record("path", b"dir/pax.jpg")) + entries([member("p.jpg", b"P"), member(long + ".jpg", b"L")])
    assert read_all(ok + END) == [{"__key__": "dir/pax", "jpg": b"P"}, {"__key__": long, "jpg": b"L"}]


def _keys_by_gnu_tar_rules(tar: bytes) -> list[str]:
    """The member keys an independent reader finds: tarfile reading on past zero blocks (GNU tar -i)."""
    with tarfile.open(fileobj=io.BytesIO(tar), ignore_zeros=True) as t:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in t.getmembers()))


@pytest.mark.parametrize("layout", ["lone-zero-block", "concatenated", "concatenated-gzip"])
def test_every_key_after_a_zero_block_or_a_second_archive_is_read(layout):
    """tarfile stops at the first zero block: the keys after a lone one, or in a second archive
    appended to the first (`cat a.tar b.tar`), had no row and no error."""
    first, second = [member("a.jpg", b"A"), member("b.jpg", b"B")], [member("c.jpg", b"C"), member("d.jpg", b"D")]
    if layout == "lone-zero-block":
        tar = entries(first) + bytes(BLOCK) + entries(second) + END
    else:
        tar = build(first) + build(second)
    assert _keys_by_gnu_tar_rules(tar) == ["a", "b", "c", "d"]
    if layout == "concatenated-gzip":   # each archive compressed on its own, then concatenated
        tar = gzip.compress(build(first)) + gzip.compress(build(second))
    assert [s["__key__"] for s in read_all(tar)] == ["a", "b", "c", "d"]


def test_only_the_stream_end_ends_a_tar():
    """What follows a zero block is a header or the stream's end; an empty tar is still empty."""
    assert read_all(END) == [] and read_all(bytes(BLOCK)) == []
    junk = entries([member("a.jpg", b"A")]) + END + b"\x01" * BLOCK
    with pytest.raises(ShardFormatError, match="damaged tar: invalid header"):
        read_all(junk)
    dangling = entries([member("a.jpg", b"A")]) + pax_header(pax_record("path", b"b.jpg")) + END
    with pytest.raises(ShardFormatError, match="extended header is followed by the end"):
        read_all(dangling)


def test_a_key_the_output_cannot_carry_is_an_error_row_not_a_failed_shard():
    """A 255-byte segment is a legal input name, but `<key>.depth.png` would not be: the sample is
    refused on reading, never at write (where it failed the whole shard on every attempt)."""
    longest = "k" * (255 - len(".depth.png"))
    tar = build([member("a.jpg", b"A"), member("k" * 247 + ".jpg", b"K"), member(longest + ".jpg", b"L"),
                 member("z.jpg", b"Z")])
    got = read_all(tar)
    assert [s["__key__"] for s in got] == ["a", "k" * 247, longest, "z"]
    assert "cannot carry" in got[1]["__error__"] and "over 255 bytes" in got[1]["__error__"]
    assert got[2] == {"__key__": longest, "jpg": b"L"}     # the longest key the output can carry
    assert "__error__" not in got[0] and "__error__" not in got[3]


# ---------------------------------------------------------------- fuzz


def _base_tar() -> bytes:
    long = "d/" + "n" * 120  # a pax header in the base, so mutations reach its parser
    return build([member("a.jpg", b"A" * 700), member("a.json", b"{}"), member(f"{long}.jpg", b"L" * 100),
                  member("b.jpg", b"B" * 1500), member("b.disp.png", b"D" * 20), member("c.jpg", b"C")],
                 fmt=tarfile.PAX_FORMAT)


def _headers(tar: bytes) -> list[int]:
    """Offsets of the header blocks of a well-formed tar."""
    offsets, pos = [], 0
    while pos + BLOCK <= len(tar) and tar[pos:pos + BLOCK] != bytes(BLOCK):
        offsets.append(pos)
        size = int(tar[pos + 124:pos + 136].rstrip(b"\0 ") or b"0", 8)
        pos += BLOCK + -(-size // BLOCK) * BLOCK
    return offsets


_FUZZ_TYPES = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
               tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, b"S", b"V", b"M", b"x", b"g", b"L", b"K", b"\xff"]
_FUZZ_NAMES = [b"a.jpg", b"b.jpg", b"../e.jpg", b"/abs.jpg", b"__meta__", b"noext", b"x.\x01", b"caf\xe9.jpg",
               b"a/./b.png", b"k.JPG", b"q." + b"e" * 90]
_FUZZ_SIZES = [0, 1, 511, 512, 4097, 8**11 - 1, -1]


def _size_field(rng: random.Random) -> bytes:
    n = rng.choice(_FUZZ_SIZES + [rng.randrange(2**40)])
    if n < 0 or n >= 8**11 or rng.random() < 0.2:
        return (b"\xff" if n < 0 else b"\x80") + (n % 2**88).to_bytes(11, "big")
    return octal(n)


def _mutate(base: bytes, heads: list[int], rng: random.Random) -> bytes:
    tar = bytearray(base)
    for _ in range(rng.randrange(1, 4)):
        at = rng.choice(heads)
        what = rng.randrange(6)
        if what == 0:
            tar[at + 156] = rng.choice(_FUZZ_TYPES)[0]
        elif what == 1:
            tar[at + 124:at + 136] = _size_field(rng)
        elif what == 2:
            name = rng.choice(_FUZZ_NAMES)
            tar[at:at + 100] = name[:100].ljust(100, b"\0")
        elif what == 3:  # sparse fields of an old GNU header
            tar[at + 482] = rng.randrange(2)
            tar[at + 483:at + 495] = _size_field(rng)
        elif what == 4:
            for _ in range(rng.randrange(1, 6)):
                tar[at + rng.randrange(BLOCK)] = rng.randrange(256)
        else:  # anywhere, data and pax records included
            tar[rng.randrange(len(tar))] = rng.randrange(256)
        if rng.random() < 0.9:  # most keep a valid checksum, to get past it
            tar[at:at + BLOCK] = checksummed(tar[at:at + BLOCK])
    if rng.random() < 0.3:
        del tar[rng.randrange(len(tar) + 1):]
    if rng.random() < 0.8:
        return bytes(tar)
    gz = bytearray(gzip.compress(bytes(tar), mtime=0))
    if rng.random() < 0.5:  # gzip header flags (extra field, name, comment) over a short stream
        gz[3] = rng.randrange(256)
        del gz[rng.randrange(4, 40):]
    elif rng.random() < 0.5:
        del gz[rng.randrange(10, len(gz)):]
    return bytes(gz)


_FUZZ_PAX = [("path", b"p.jpg"), ("path", b"../p.jpg"), ("size", b"100"), ("size", b"-3"), ("size", b"1" * 30),
             ("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0"), ("GNU.sparse.name", b"s.jpg"),
             ("GNU.sparse.realsize", b"x"), ("GNU.sparse.map", b"0,1,2"), ("GNU.sparse.size", b"9"),
             ("hdrcharset", b"BINARY"), ("mtime", b"nan"), ("uid", b"-1"), ("linkpath", b"\xff")]


def _random_tar(rng: random.Random) -> bytes:
    """A tar of random headers: types, names, sizes that may disagree with the data, pax records."""
    parts = []
    for _ in range(rng.randrange(1, 7)):
        if rng.random() < 0.3:
            records = b"".join(pax_record(*rng.choice(_FUZZ_PAX)) for _ in range(rng.randrange(1, 4)))
            kind = rng.choice([tarfile.XHDTYPE, tarfile.XGLTYPE])
            parts.append(header("pax", kind, len(records)) + pad(records))
        if rng.random() < 0.15:
            name = rng.choice(_FUZZ_NAMES) + b"\0"
            parts.append(header("././@LongLink", rng.choice([b"L", b"K"]), len(name)) + pad(name))
        data = rng.randbytes(rng.choice([0, 1, 100, 512, 3000, 5000]))
        name = rng.choice(_FUZZ_NAMES).decode("utf-8", "surrogateescape")
        block = bytearray(header(name[:100], rng.choice(_FUZZ_TYPES), len(data)))
        if rng.random() < 0.3:
            block[124:136] = _size_field(rng)
        parts.append(checksummed(block) + pad(data))
    tar = b"".join(parts) + (END if rng.random() < 0.8 else b"")
    return tar[: rng.randrange(len(tar) + 1)] if rng.random() < 0.2 else tar


def _check_samples(samples: list[dict]) -> None:
    for s in samples:
        assert isinstance(s.get("__key__"), str)
        if "__error__" in s:
            assert s.keys() == {"__key__", "__error__"} and isinstance(s["__error__"], str) and s["__error__"]
        else:
            assert len(s) > 1 and all(isinstance(v, bytes) and len(v) <= 4096 for k, v in s.items() if k != "__key__")


@pytest.mark.timeout(120)
def test_fuzz_mutated_tars(tmp_path, monkeypatch):
    base = _base_tar()
    heads = _headers(base)
    assert len(heads) >= 7 and read_all(base)  # the base has pax headers and reads whole
    rng = random.Random(1234)
    outcomes = {"samples": 0, "errors": 0, "shard_errors": 0}
    with watched(tmp_path, monkeypatch) as writes:
        for case in range(600):
            tar = _mutate(base, heads, rng) if case % 2 else _random_tar(rng)
            stream = CountingReader(tar)
            tracemalloc.start()
            try:
                try:
                    samples = list(iter_tar_samples(stream, max_member_bytes=4096))
                except ShardFormatError:
                    outcomes["shard_errors"] += 1
                except ReadBudgetExceeded as e:
                    pytest.fail(f"case {case}: {e}")
                except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
                    pytest.fail(f"case {case}: {type(e).__name__}: {e}")
                else:
                    _check_samples(samples)
                    outcomes["samples"] += sum("__error__" not in s for s in samples)
                    outcomes["errors"] += sum("__error__" in s for s in samples)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 64 * 2**20, (case, peak)
            assert stream.bytes <= len(tar), case
    assert writes == []
    assert all(outcomes.values()), outcomes  # the mutations reach every outcome


# ---------------------------------------------------------------- one row per key, whatever the layout


def _layout_tar(names: list[str]) -> bytes:
    return build([member(n, n.encode()) for n in names])


@pytest.mark.parametrize("names, bad", [
    (["a.jpg", "a.jpg", "b.jpg"], "repeats the extension of 'a.jpg'"),            # an exact duplicate
    (["a.JPG", "a.jpg", "b.jpg"], "repeats the extension of 'a.JPG'"),            # case variants
    (["a.jpg", "a.json", "a.JSON", "b.jpg"], "repeats the extension of 'a.json'"),
], ids=["duplicate", "case-jpg", "case-json"])
def test_a_repeated_member_is_its_samples_error_row(names, bad):
    got = read_all(_layout_tar(names))
    assert [s["__key__"] for s in got] == ["a", "b"]
    assert bad in got[0]["__error__"] and got[0].keys() == {"__key__", "__error__"}
    assert got[1] == {"__key__": "b", "jpg": b"b.jpg"}


def test_ungrouped_keys_are_named_from_the_headers_then_one_error_row_each():
    """webdataset reads `a.jpg g1.jpg a.json g2.jpg` as four samples, two keyed 'a'."""
    tar = _layout_tar(["a.jpg", "g1.jpg", "a.json", "g2.jpg", "c.jpg", "g1.txt", "d.jpg"])
    assert [s["__key__"] for s in wds.WebDataset([_file(tar)], shardshuffle=False)] == ["a", "g1", "a", "g2", "c",
                                                                                        "g1", "d"]
    with pytest.raises(UngroupedKeys) as e:
        read_all(tar)
    assert e.value.keys == {"a", "g1"} and "and 1 more keys" in str(e.value)
    got = read_all(tar, ungrouped=e.value.keys)
    assert [s["__key__"] for s in got] == ["a", "g1", "g2", "c", "d"]     # one row per key, at its first group
    assert all("reappears after other keys" in s["__error__"] for s in got[:2])
    assert got[2:] == [{"__key__": "g2", "jpg": b"g2.jpg"}, {"__key__": "c", "jpg": b"c.jpg"},
                       {"__key__": "d", "jpg": b"d.jpg"}]


def _file(data: bytes) -> str:
    import tempfile

    f = tempfile.NamedTemporaryFile(suffix=".tar", delete=False)
    f.write(data)
    f.close()
    return f.name
