"""What a tar member may be called: one rule for the shard reader (which refuses the sample) and
the shard writer (which never writes the name).

Member names come from tars someone else made and end up as object keys, manifest strings and
file names on a trainer's disk, so a name is data to check, never a path to trust. A refused
name is still recorded, by `escape_key`, in a form that is safe anywhere and reversible.
"""

from __future__ import annotations

import re

MAX_NAME_BYTES = 1024
MAX_SEGMENT_BYTES = 255  # a file name on common file systems
_KEPT = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# The common case, decided by one regex: ASCII letters, digits and '._-' in segments that are not
# '.' or '..' (a segment of dots only is left to the full check), short enough. Planning checks
# every input name (100,000 shards: 1 s of CPU char by char).
_PLAIN = re.compile(r"(?!\.{1,2}(?:/|$))[A-Za-z0-9._-]{1,255}(?:/(?!\.{1,2}(?:/|$))[A-Za-z0-9._-]{1,255})*")


def check_member_name(name: str) -> str | None:
    """None when `name` is a safe relative member name ('dir/key.jpg'), else why it is not.

    Safe: UTF-8 (tarfile gives other bytes as surrogate escapes); no control character,
    backslash or leading '/'; '/'-separated segments that are neither empty, '.' nor '..';
    at most 255 bytes a segment and 1024 in all.
    """
    if len(name) <= MAX_NAME_BYTES and _PLAIN.fullmatch(name):
        return None
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return "not UTF-8"
    if not name:
        return "empty name"
    if name.startswith("/"):
        return "absolute path"
    if "\\" in name:
        return "backslash"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        return "control character"
    if len(raw) > MAX_NAME_BYTES:
        return f"{len(raw)} bytes, over {MAX_NAME_BYTES}"
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            return f"{segment!r} path segment" if segment else "empty path segment"
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            return f"a path segment over {MAX_SEGMENT_BYTES} bytes"
    return None


# Ends every escaped key. A real key never holds a '.' in its last segment (the key is the name
# up to the first dot of its last segment, as webdataset splits it), so an escaped key can never
# be a real one: `caf%E9.jpg` (a legal name, key `caf%E9`) and a non-UTF-8 `caf\xe9.jpg` (key
# `caf%E9.escaped`) are two rows.
ESCAPED = ".escaped"


def escape_key(name: str) -> str:
    """`name` as one segment of [A-Za-z0-9_-] and %XX, then ESCAPED: reversible byte for byte
    (`unescape_key`), and never equal to a key a legal name has.

    Every other byte of the name's raw bytes is percent-encoded, '.', '/' and '%' included.
    The result may be longer than a safe segment: it names a manifest row, never a tar member.
    """
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate tarfile never produces; still never raise
        raw = name.encode("utf-8", "surrogatepass")
    return "".join(chr(b) if b in _KEPT else f"%{b:02X}" for b in raw) + ESCAPED


def unescape_key(key: str) -> bytes:
    """The raw name bytes an escaped key stands for: `k.encode("utf-8", "surrogateescape")`."""
    from urllib.parse import unquote_to_bytes

    if not key.endswith(ESCAPED):
        raise ValueError(f"{quote_name(key)} is not an escaped key (it does not end in {ESCAPED!r})")
    return unquote_to_bytes(key.removesuffix(ESCAPED))


def quote_name(name: str) -> str:
    """A member name for a one-line message: repr (escapes controls and surrogates), cut if long."""
    return repr(name) if len(name) <= 120 else f"{name[:100]!r}... ({len(name)} characters)"
