"""Whether a decoded image holds all the data its file promises, for the ways a decoder reports
success on less: each check reads only the file's structure (markers, chunk lengths), never
its pixels twice, and returns the reason a sample is refused, or None.

- A JPEG's scans stop early (an end marker appended to a cut file): a baseline JPEG's missing
  rows are libjpeg's grey fill (pipelines.decode checks the last rows); a progressive JPEG
  shows its coarse scans as a blurred but complete-looking image. Every coefficient of every
  component must be coded to full precision (a scan with Al = 0 covering it) by the scans the
  file holds; libjpeg's progressive scripts, and every encoder that writes a whole image, do.
  A cut inside the last scan leaves that scan's header in place and is not seen here.
- A PNG's zlib stream ends cleanly before the rows do: Pillow stops at the stream's end and
  leaves the rest zero. The inflated size of the IDAT data is what the header's rows need.
"""
from __future__ import annotations

import re
import struct
import zlib

_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")   # the next marker after entropy-coded data
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_ALL = (1 << 64) - 1                                  # coefficients 0..63 of one component
_INFLATE_STEP = 1 << 20                               # bytes inflated at a time when counting


def jpeg_scans_missing(data: bytes) -> str | None:
    """Why the JPEG's scans do not code the whole image, or None (also None for a file whose
    markers cannot be walked: the decoder has already judged it)."""
    components: list[int] = []
    full: dict[int, int] = {}                         # component id -> coefficients coded at Al = 0
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0xD9:                            # the end of the (first) image
            break
        length = int.from_bytes(data[i + 2:i + 4], "big")
        segment = data[i + 4:i + 2 + length]
        if marker in _SOF and not components and len(segment) >= 6:
            components = [segment[6 + 3 * c] for c in range(segment[5]) if 6 + 3 * c < len(segment)]
            full = dict.fromkeys(components, 0)
        elif marker == 0xDA and len(segment) >= 1:
            n = segment[0]
            if len(segment) < 1 + 2 * n + 3:
                return None
            ss, se, approx = segment[1 + 2 * n], segment[2 + 2 * n], segment[3 + 2 * n]
            if approx & 0x0F == 0 and ss <= se <= 63:
                bits = ((1 << (se + 1)) - 1) ^ ((1 << ss) - 1)
                for c in range(n):
                    cid = segment[1 + 2 * c]
                    if cid in full:
                        full[cid] |= bits
            if full and all(v == _ALL for v in full.values()):
                return None                           # whole: a baseline JPEG stops at its first scan
            found = _MARKER.search(data, i + 2 + length)
            if found is None:
                break
            i = found.start()
            continue
        i += 2 + length
    short = {c: bin(v).count("1") for c, v in full.items() if v != _ALL}
    if not short:
        return None
    which = ", ".join(f"component {c}: {n} of 64" for c, n in short.items())
    return (f"truncated JPEG: its scans end before every coefficient is coded to full precision ({which}); "
            "the decoder would show a blurred image")


_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}            # PNG colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_rows_missing(data: bytes) -> str | None:
    """Why the PNG's image data holds fewer rows than its header, or None."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    i, header, idat = 8, None, []
    while i + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        body = data[i + 8:i + 8 + length]
        if kind == b"IHDR" and len(body) >= 13:
            header = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND" or (idat and kind != b"IDAT"):
            break                                     # the IDAT chunks are consecutive
        i += 12 + length
    if header is None or header[3] not in _CHANNELS or not idat:
        return None
    width, height, depth, colour, _, _, interlace = header
    bits = depth * _CHANNELS[colour]
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    need = 0
    for x0, y0, dx, dy in passes:
        w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if w > 0 and h > 0:
            need += h * (1 + -(-w * bits // 8))
    have = _inflated_size(b"".join(idat), need)
    if have is None or have >= need:
        return None
    return (f"truncated PNG: its image data holds {have} of the {need} bytes its {width}x{height} rows need; "
            "the decoder would leave the rest black")


def _inflated_size(stream: bytes, limit: int) -> int | None:
    """Bytes the zlib stream inflates to, counted up to ``limit`` in bounded steps; None when
    the stream is damaged (the decoder reports that itself)."""
    d, n, pending = zlib.decompressobj(), 0, stream
    try:
        while n < limit and not d.eof:
            out = d.decompress(pending, _INFLATE_STEP)
            pending = d.unconsumed_tail
            n += len(out)
            if not out and not pending:
                break
    except zlib.error:
        return None
    return n
