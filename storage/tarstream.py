"""A tar stream read forward only, with every cost bounded by the bytes it holds.

Shards come from outside: a header's claims are not trusted before they are paid for.
`tar_members` yields each member's header and a function that reads its data; the data not
read is skipped in bounded steps. Compressed streams are decompressed here, at most one read's
worth at a time, since tarfile's own stream decompresses each input chunk whole. tarfile's header
parsing is bounded by `_Header`. A stream that is not a whole tar raises ShardFormatError, the
one error a hostile stream produces; errors of the source itself (I/O, storage) pass unchanged.
"""

from __future__ import annotations

import bz2
import io
import lzma
import re
import tarfile
import zlib
from contextlib import contextmanager
from functools import partial
from typing import Any, BinaryIO, Callable, Iterator

from storage.names import quote_name

BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(BLOCK)
_MAX_HEADER_BYTES = 2**20  # a pax or GNU long-name header's data (names are at most 1 KiB)
_MAX_HEADER_CHAIN = 8  # extended headers before one member (GNU + pax use 2 to 4)
_READ_CHUNK = 2**20
_LONG_DIGITS = re.compile(rb"[0-9]{65}")
_DECOMPRESSORS = ((b"\x1f\x8b", "gzip", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
                  (b"BZh", "bzip2", bz2.BZ2Decompressor), (b"\xfd7zXZ\x00", "xz", lzma.LZMADecompressor))
# What a hostile stream makes tarfile raise (across Python versions); mapped to ShardFormatError.
_FORMAT_ERRORS = (tarfile.TarError, EOFError, ValueError, IndexError)
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
             tarfile.SOLARIS_XHDTYPE)


class ShardFormatError(ValueError):
    """The stream is not a readable tar, or a member repeats (names are the sample's identity)."""


def tar_members(fileobj: BinaryIO) -> Iterator[tuple[tarfile.TarInfo, Callable[[], bytes]]]:
    """(header, read) for each member in tar order; `read()` returns the member's data (call it
    before the next member, or not at all). Raises ShardFormatError where the tar is damaged,
    including a stream that ends without the end-of-archive block."""
    with _format_errors():
        tail = _Tail(_Decompressed(fileobj))
        tar = tarfile.open(fileobj=tail, mode="r|", tarinfo=_Header, encoding="utf-8", errors="surrogateescape")
    try:
        with _format_errors():
            while (info := tar.next()) is not None:
                tar.members = []  # stream mode would keep every header
                if info.size < 0:
                    raise ShardFormatError(f"damaged tar: member {quote_name(info.name)} has a negative size")
                yield info, partial(_read, tar, info)
                _skip_to(tar, tar.offset)
            if tail.unterminated():
                raise ShardFormatError("truncated tar: the stream ends without the end-of-archive block")
    finally:
        tar.close()


@contextmanager
def _format_errors() -> Iterator[None]:
    try:
        yield
    except ShardFormatError:
        raise
    except _FORMAT_ERRORS as e:
        raise ShardFormatError(f"unreadable tar: {str(e) or type(e).__name__}") from e


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    with _format_errors():
        if info.size > tar.offset - tar.fileobj.tell():
            raise ShardFormatError(f"damaged tar: member {quote_name(info.name)} claims more data than it stores")
        data = tar.fileobj.read(info.size)
    if len(data) != info.size:
        raise ShardFormatError(f"truncated tar: the stream ends inside member {quote_name(info.name)}")
    return data


def _skip_to(tar: tarfile.TarFile, offset: int) -> None:
    """Reads forward to the next header in bounded chunks (tarfile's own skip loops past EOF)."""
    while (left := offset - tar.fileobj.tell()) > 0:
        if not tar.fileobj.read(min(left, _READ_CHUNK)):
            raise ShardFormatError("truncated tar: the stream ends inside a member")
    if left < 0:
        raise ShardFormatError("damaged tar: a member's size points backwards")


class _Decompressed(io.RawIOBase):
    """The tar bytes of a plain, gzip, bzip2 or xz stream, never more per read than asked for.

    tarfile's own stream decompresses each 10 KiB it reads whole, and 10 KiB of bzip2 can hold
    gigabytes. Streams concatenated (multi-member gzip, pbzip2's or parallel xz's many streams)
    are read on, as GNU tar does; zero padding after the last is allowed, anything else is damage.
    Only the decompressor's errors become ShardFormatError; the source's stay its own.
    """

    def __init__(self, source: BinaryIO) -> None:
        super().__init__()
        self._source, self._pending = source, b""
        while len(self._pending) < 6 and (more := source.read(6 - len(self._pending))):
            self._pending += more
        self._magic, self._kind, self._make = next((c for c in _DECOMPRESSORS if self._pending.startswith(c[0])),
                                                   (b"", None, None))
        self._d = self._make() if self._make else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            if self._d is None:  # plain tar
                data = self._pending[: len(view)] or self._source.read(len(view))
                self._pending = self._pending[len(data):]
            elif self._d.eof:
                if not self._next_stream():
                    return 0
                continue
            else:
                try:
                    data = self._d.decompress(self._pending, len(view))
                except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
                    raise ShardFormatError(f"unreadable tar: invalid {self._kind} data ({e})") from None
                self._pending = getattr(self._d, "unconsumed_tail", b"")  # zlib hands it back
                if not data and not self._d.eof:
                    if not (more := self._source.read(_READ_CHUNK)):
                        raise ShardFormatError(f"truncated tar: the {self._kind} stream ends early")
                    self._pending += more
                    continue
            view[: len(data)] = data
            return len(data)

    def _next_stream(self) -> bool:
        """After one compressed stream ends: start the next (True), or find the end (False)."""
        rest = self._d.unused_data
        while len(rest) < len(self._magic) and (more := self._source.read(_READ_CHUNK)):
            rest += more
        if rest.startswith(self._magic):
            self._d, self._pending = self._make(), rest
            return True
        while rest:
            if rest.strip(b"\0"):
                raise ShardFormatError(f"unreadable tar: what follows a {self._kind} stream is not {self._kind} data")
            rest = self._source.read(_READ_CHUNK)
        return False


class _Tail(io.RawIOBase):
    """Passes reads through, remembering the last block and whether EOF was seen.

    tarfile stops silently when a stream ends exactly between two members, which is how a
    truncated copy often ends; the last block then is member data, not the zero end-of-archive
    block, and this lets the reader tell the two apart without seeking.
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        super().__init__()
        self._f, self.tail, self.eof = fileobj, b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._f.read(len(view))
        if not data:
            self.eof = True
            return 0
        view[: len(data)] = data
        self.tail = (self.tail + data)[-BLOCK:] if len(data) < BLOCK else data[-BLOCK:]
        return len(data)

    def __repr__(self) -> str:
        return "<tar stream>"

    def unterminated(self) -> bool:
        """EOF reached and the last block is not the zero end-of-archive block."""
        return self.eof and self.tail != bytes(BLOCK)


class _Header(tarfile.TarInfo):
    """tarfile's header parsing, bounded. These hook tarfile's private per-type methods (the only
    place a header can be refused before tarfile acts on it); each bounds one hostile case:

    - a damaged header stops tarfile silently mid-stream: here it is ShardFormatError;
    - pax / long-name data is read whole into memory: at most _MAX_HEADER_BYTES, and at most
      _MAX_HEADER_CHAIN such headers (each recursing once) before a member;
    - tarfile's pax parsing before Python 3.11.10 / 3.12.6 (CVE-2024-6232) is quadratic in time
      on long digit runs and in memory on overlapping records: only well-formed records reach it;
    - sparse maps (GNU 'S' extension blocks, pax 0.0/0.1/1.0) are never parsed; a 1.0 map is read
      from the member's data without bound. The member is marked sparse and refused unread.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        """The next member's header. Zero blocks before it are skipped up to the stream's end:
        tarfile stops at the first one, which loses every member after a lone zero block or in a
        second archive appended to the first (`cat a.tar b.tar`, which GNU tar reads with -i).
        Only the stream's end ends the tar; what follows a zero block must be a valid header."""
        buf = tar.fileobj.read(BLOCK)
        if buf == _ZERO_BLOCK and tar.__dict__.get("_header_chain", 0):
            raise ShardFormatError("damaged tar: an extended header is followed by the end of the archive")
        zeros = 0
        while buf == _ZERO_BLOCK:
            buf, zeros = tar.fileobj.read(BLOCK), zeros + 1
        if not buf and zeros:   # the end of a tar that had its end-of-archive block
            raise tarfile.EOFHeaderError("end of file header")
        try:
            obj = cls.frombuf(buf, tar.encoding, tar.errors)   # b"": EmptyHeaderError, an empty stream
            obj.offset = tar.fileobj.tell() - BLOCK
            return obj._proc_member(tar)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:
            raise ShardFormatError(f"damaged tar: {e} (header at byte {tar.fileobj.tell() - len(buf)})") from None

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type not in _EXTENDED:
            return super()._proc_member(tar)
        if not 0 <= self.size <= _MAX_HEADER_BYTES:
            raise ShardFormatError(f"extended tar header of {self.size} bytes (at most {_MAX_HEADER_BYTES})")
        depth = tar.__dict__.get("_header_chain", 0)
        if depth >= _MAX_HEADER_CHAIN:
            raise ShardFormatError(f"more than {_MAX_HEADER_CHAIN} extended tar headers before a member")
        tar._header_chain = depth + 1
        try:
            return super()._proc_member(tar)
        finally:
            tar._header_chain = depth

    def _proc_pax(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        data = tar.fileobj.read(self._block(self.size))
        if len(data) != self._block(self.size):
            raise ShardFormatError("truncated tar: the stream ends inside a pax header")
        _check_pax_records(data, self.size)
        stream = tar.fileobj
        tar.fileobj = _Replay(data, stream)  # tarfile reads the header's data first, then on
        try:
            return super()._proc_pax(tar)
        finally:
            tar.fileobj = stream

    def _proc_sparse(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        _, extended, realsize = self._sparse_structs
        del self._sparse_structs
        while extended:  # skip the map's extension blocks
            block = tar.fileobj.read(BLOCK)
            if len(block) != BLOCK:
                raise ShardFormatError("truncated tar: the stream ends inside a sparse map")
            extended = block[504]
        self.sparse = []  # sparse, map not kept
        self.offset_data = tar.fileobj.tell()
        tar.offset = self.offset_data + self._block(self.size)
        self.size = realsize
        return self

    def _proc_gnusparse_00(self, next: tarfile.TarInfo, pax_headers: dict, buf: bytes) -> None:
        next.sparse = []

    def _proc_gnusparse_01(self, next: tarfile.TarInfo, pax_headers: dict) -> None:
        next.sparse = []

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: dict, tar: tarfile.TarFile) -> None:
        next.sparse = []


class _Replay:
    """tarfile's stream, whose next read returns a header's data already read and checked."""

    def __init__(self, data: bytes, stream: Any) -> None:
        self._data, self._stream = data, stream

    def read(self, size: int) -> bytes:
        data, self._data = self._data, None
        return self._stream.read(size) if data is None else data

    def tell(self) -> int:
        return self._stream.tell()

    def seek(self, pos: int) -> int:
        return self._stream.seek(pos)


def _check_pax_records(data: bytes, size: int) -> None:
    """Pax data must be whole '<length> <keyword>=<value>\\n' records and no digit run over 64."""
    pos = 0
    while pos < size:
        space = data.find(b" ", pos, pos + 21)
        end = pos + int(data[pos:space]) if space > pos and data[pos:space].isdigit() else -1
        if not (space + 2 < end <= size and data[end - 1] == 10 and data.find(b"=", space + 2, end) > 0):
            raise ShardFormatError(f"damaged tar: malformed pax header record at byte {pos} of the header")
        pos = end
    if _LONG_DIGITS.search(data):
        raise ShardFormatError("damaged tar: a pax header holds a run of more than 64 digits")
