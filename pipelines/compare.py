"""`compare A B` on one shard: how far apart are two labelings of the same images?

    manifest parts of A and B -> sampled rows -> match by (input shard, key) -> count
        -> ranged reads of the label members -> figures per pair (pipelines.compare_figures)

A and B are OUTPUTs; B may instead be a teacher, which then labels A's sampled images on the
fly through the label flow (label_batch, then the stored label's normalization and 16-bit
codec), so that comparing with a teacher equals comparing with an OUTPUT it labeled. Only the
label members of the sampled pairs are read, by ranged reads at the manifest's offsets: a 1 %
draw reads about 1 % of the label bytes. Nothing is written and, like ``label_shard``, nothing
here knows about Ray. Every sampled row is accounted for: compared, unmatched on one side, or
not compared because it is an error row on either side.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa

from labelers.normalize import normalize_output
from pipelines.compare_figures import compare_labels, sampled
from pipelines.compare_summary import CompareSummary as CompareSummary
from pipelines.concurrency import Bucketer, prefetch_map
from pipelines.decode import SampleLimits
from pipelines.label_grid import common_grid
from pipelines.sample import Sample
from pipelines.tasks import Progress, ShardTask
from storage import layout
from storage.label_format import (
    DISP_MEMBER,
    SKY_MEMBER,
    VALID_MEMBER,
    disparity_png,
    image_member,
    read_disparity_png,
    read_mask_png,
)
from storage.manifest import decode_part
from storage.objectstore import ObjectStore
from storage.output import Output

# CompareSummary lives in pipelines.compare_summary; it is importable from here too, beside the
# ShardComparison it sums.

if TYPE_CHECKING:     # the label flow imports torch: only a teacher comparison pays for it
    from pipelines.pseudo_label import Labelers

TEACHER = "teacher"   # source_b / shard_b of a pair whose B a teacher labeled on the fly
_COLUMNS = ["key", "shard", "source", "status", "members"]

# `compare --out`: one row per compared pair (a row dict less its "members"). `shard` is the shard's
# name and `key` the sample's, as in every OUTPUT of the same input: the student loader's exclude
# filter reads (shard, key) and a boolean column such as `disagree`.
ROW_SCHEMA = pa.schema([
    ("shard", pa.string()), ("key", pa.string()),
    ("source_a", pa.string()), ("source_b", pa.string()),   # input shard URLs ("teacher": labeled on the fly)
    ("shard_a", pa.string()), ("shard_b", pa.string()),     # the rows' tar file names
    ("status", pa.string()),                                # "ok" | "no_overlap"
    ("pixels", pa.int64()), ("abs_rel", pa.float64()), ("delta1", pa.float64()),
    ("scale", pa.float64()), ("shift", pa.float64()), ("pearson", pa.float64()),
    ("sky_iou", pa.float64()), ("sky_fraction_a", pa.float64()), ("sky_fraction_b", pa.float64()),
    ("sky_fraction_diff", pa.float64()), ("inverted", pa.bool_()), ("disagree", pa.bool_()),
])


@dataclass
class ShardComparison:
    """One shard pair's rows (one per compared pair) and the counters the engine sums."""

    name: str
    source: str
    rows: list[dict] = field(default_factory=list)
    samples: int = 0          # pairs compared (status ok or no_overlap)
    errors: int = 0           # matched pairs not compared: an error row on either side
    matched: int = 0          # sampled rows present in A and B
    only_a: int = 0           # sampled rows of A without a row in B, and the reverse
    only_b: int = 0
    error_a: int = 0          # matched pairs whose A row is an error (both sides: counted in both)
    error_b: int = 0
    bytes_read: int = 0       # ranged reads of label members (and, with a teacher, of A's images)
    image_bytes: int = 0      # the part of bytes_read that is images (a teacher only)
    manifest_bytes: int = 0   # the two manifest parts
    seconds: float = 0.0
    worker: str = ""
    attempt: int = 1


class _Reader:
    """Ranged reads of members at the manifest's offsets, counting the bytes (from threads)."""

    def __init__(self, store: ObjectStore):
        self.store, self.bytes = store, 0
        self._lock = threading.Lock()

    def __call__(self, row: dict, member: dict) -> bytes:
        tar = Output(self.store).tar_key(row["shard"])
        data = self.store.read_range(tar, member["offset"], member["size"])
        if len(data) != member["size"]:
            raise ValueError(f"{self.store.url_of(tar)}: {member['name']} is {member['size']} bytes in the "
                             f"manifest, {len(data)} could be read")
        with self._lock:
            self.bytes += len(data)
        return data


def _members(row: dict) -> dict[str, dict]:
    """A row's members by the part of the name after "<key>."."""
    cut = len(row["key"]) + 1
    return {m["name"][cut:]: m for m in row["members"] or []}


def _places(a: dict, b: dict | None) -> dict[str, dict | None]:
    """Where a contact sheet finds the pair's members (name, offset, size): the image, disp_a and
    sky_a in A's shard, disp_b and sky_b in B's; None where there is none (B a teacher, no sky)."""
    place = lambda members, ext: (None if ext not in members else  # noqa: E731
                                  {k: members[ext][k] for k in ("name", "offset", "size")})
    ma, mb = _members(a), _members(b) if b else {}
    return {"image": place(ma, image_member(ma)), "disp_a": place(ma, DISP_MEMBER), "sky_a": place(ma, SKY_MEMBER),
            "disp_b": place(mb, DISP_MEMBER), "sky_b": place(mb, SKY_MEMBER)}


@dataclass(slots=True)
class _Label:
    disparity: np.ndarray
    sky: np.ndarray | None = None
    valid: np.ndarray | None = None


def _stored_label(row: dict, read: _Reader) -> _Label:
    """disp.png, and sky.png / valid.png where the sample has them, of one ok row."""
    members = _members(row)
    if DISP_MEMBER not in members:
        raise ValueError(f"{row['shard']}: ok row {row['key']!r} has no {DISP_MEMBER} member")
    mask = lambda ext: read_mask_png(read(row, members[ext])) if ext in members else None  # noqa: E731
    return _Label(read_disparity_png(read(row, members[DISP_MEMBER]), np.float64), mask(SKY_MEMBER),
                  mask(VALID_MEMBER))


def _row(name: str, a: dict, b: dict | None, la: _Label, lb: _Label) -> dict:
    try:
        da, db, (sky_a, valid_a), (sky_b, valid_b) = common_grid(la.disparity, lb.disparity, (la.sky, la.valid),
                                                                 (lb.sky, lb.valid))
        figures = compare_labels(da, db, sky_a, sky_b, valid_a, valid_b)
    except ValueError as e:
        raise ValueError(f"{name}: sample {a['key']!r}: {e}") from None
    return {"shard": name, "key": a["key"], "source_a": a["source"], "source_b": b["source"] if b else TEACHER,
            "shard_a": a["shard"], "shard_b": b["shard"] if b else TEACHER, **figures.to_json(),
            "members": _places(a, b)}


def _part(store: ObjectStore, name: str) -> tuple[list[dict], int]:
    """The rows of shard ``name``'s manifest part (none when it is absent) and its size."""
    try:
        data = store.get(layout.manifest_key(name))
    except FileNotFoundError:
        return [], 0
    return decode_part(data).select(_COLUMNS).to_pylist(), len(data)


def match(rows_a: list[dict], rows_b: list[dict]) -> tuple[list[tuple[dict, dict]], int, int]:
    """Pairs of rows of the same sample (input shard name and key), in A's order, and the rows
    left on each side. A key a part holds twice (only error rows can) is matched once; its other
    row counts as unmatched, so no row goes uncounted."""
    ident = lambda r: (layout.shard_name(r["source"]), r["key"])  # noqa: E731
    index: dict = {}
    extra_b = 0
    for r in rows_b:
        if index.setdefault(ident(r), r) is not r:
            extra_b += 1
    pairs, only_a, seen = [], 0, set()
    for r in rows_a:
        k = ident(r)
        if k in index and k not in seen:
            seen.add(k)
            pairs.append((r, index[k]))
        else:
            only_a += 1
    return pairs, only_a, len(index) - len(seen) + extra_b


def compare_shard(task: ShardTask, a: ObjectStore, b: ObjectStore | None, *, fraction: float = 1.0,
                  labelers: Labelers | None = None, batch_size: int = 8, threads: int = 4, worker: str = "",
                  progress: Progress | None = None) -> ShardComparison:
    """Compare shard ``task.name`` of OUTPUT ``a`` with the same shard of OUTPUT ``b``, or with
    ``labelers`` run on A's images (``b`` None). Only the samples ``sampled(name, key, fraction)``
    are read. A shard absent on one side leaves every sampled row of the other unmatched.
    Raises on a shard-level failure (storage, an unreadable label, labels of two sizes)."""
    t0 = time.perf_counter()
    progress = progress or Progress()
    result = ShardComparison(task.name, task.source, worker=worker, attempt=task.attempt)
    if (b is None) == (labelers is None):
        raise ValueError("compare with an OUTPUT B or with a teacher, exactly one of them")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the sample fraction must be in [0, 1], got {fraction}")
    rows_a, result.manifest_bytes = _part(a, task.name)
    rows_a = [r for r in rows_a if sampled(task.name, r["key"], fraction)]
    read, read_b = _Reader(a), None if b is None else _Reader(b)
    with ThreadPoolExecutor(threads, thread_name_prefix="compare") as pool:
        if b is None:
            result.matched = len(rows_a)
            result.error_a = sum(r["status"] != "ok" for r in rows_a)
            _count_errors(result, result.error_a, progress)
            _teacher_pairs(task.name, [r for r in rows_a if r["status"] == "ok"], read, labelers, pool,
                           batch_size, result, progress)
        else:
            rows_b, size_b = _part(b, task.name)
            result.manifest_bytes += size_b
            rows_b = [r for r in rows_b if sampled(task.name, r["key"], fraction)]
            _output_pairs(task.name, rows_a, rows_b, read, read_b, pool, threads, result, progress)
    result.bytes_read = read.bytes + (read_b.bytes if read_b else 0) + result.image_bytes
    result.seconds = time.perf_counter() - t0
    return result


def _output_pairs(name: str, rows_a: list[dict], rows_b: list[dict], read_a: _Reader, read_b: _Reader,
                  pool: ThreadPoolExecutor, threads: int, result: ShardComparison, progress: Progress) -> None:
    """Match, count, then compare the pairs ok on both sides, reading ``threads`` ahead."""
    pairs, result.only_a, result.only_b = match(rows_a, rows_b)
    result.matched = len(pairs)
    result.error_a = sum(pa["status"] != "ok" for pa, _ in pairs)
    result.error_b = sum(pb["status"] != "ok" for _, pb in pairs)
    ok = [(pa, pb) for pa, pb in pairs if pa["status"] == "ok" and pb["status"] == "ok"]
    _count_errors(result, len(pairs) - len(ok), progress)

    def compare(pair: tuple[dict, dict]) -> dict:
        return _row(name, *pair, _stored_label(pair[0], read_a), _stored_label(pair[1], read_b))

    for row in prefetch_map(compare, ok, pool, depth=2 * threads):
        result.rows.append(row)
        result.samples += 1
        progress.samples += 1


def _count_errors(result: ShardComparison, n: int, progress: Progress) -> None:
    result.errors += n
    progress.errors += n


# -- B as a teacher ---------------------------------------------------------------------------------

@dataclass(slots=True)
class _Item:
    index: int
    row: dict
    sample: Sample
    label: _Label | None = None    # A's stored label


def _teacher_pairs(name: str, rows: list[dict], read: _Reader, labelers: Labelers, pool: ThreadPoolExecutor,
                   batch_size: int, result: ShardComparison, progress: Progress) -> None:
    """A's ok rows against ``labelers`` run on their images: decoded as the label flow decodes a
    sample, batched by the teacher's input size as label_shard batches, labeled by label_batch,
    and stored (in memory) as the label flow stores it. An image that does not decode is an
    error on B's side."""
    from pipelines.pseudo_label import label_batch

    if labelers.teacher is None:
        raise ValueError("compare with a teacher needs a teacher; ground truth is a convert-gt OUTPUT")
    kind, limits = labelers.names["teacher_output"], SampleLimits()
    images = _Reader(read.store)     # counted apart from the labels

    def load(item: _Item) -> _Item:
        members = _members(item.row)
        s = item.sample
        s.image_ext = image_member(members)
        if s.image_ext is None:
            s.fail(f"no image member (members: {', '.join(sorted(members)) or 'none'})")
            return item
        s.image_bytes = images(item.row, members[s.image_ext])
        labelers.decode(s, limits)
        s.image_bytes = None
        if s.ok:
            item.label = _stored_label(item.row, read)
        return item

    def finish(item: _Item) -> dict:
        s = item.sample
        label = normalize_output(s.raw, kind, s.sky, None)   # as pipelines.encode makes the label
        stored = read_disparity_png(disparity_png(label.disparity), np.float64)   # and the codec stores it
        row = _row(name, item.row, None, item.label, _Label(stored, s.sky))
        s.raw = s.sky = None
        return row

    done: dict[int, dict] = {}
    pending: deque = deque()

    def step(batch: list[_Item]) -> None:
        seconds = label_batch([it.sample for it in batch], labelers)
        progress.model_seconds += seconds
        pending.extend((it.index, pool.submit(finish, it)) for it in batch)
        while len(pending) > 2 * batch_size:
            collect()

    def collect() -> None:
        index, future = pending.popleft()
        done[index] = future.result()
        result.samples += 1
        progress.samples += 1

    items = (_Item(i, r, Sample(key=r["key"], source=r["source"])) for i, r in enumerate(rows))
    half = limits.inflight_pixels // 2      # label_shard's batch and pending bounds, in pixels
    pixels: Callable[[_Item], int] = lambda it: it.sample.height * it.sample.width  # noqa: E731
    bucketer = Bucketer(batch_size, key=lambda it: labelers.batch_key(it.sample), cost=pixels,
                        max_batch_cost=half, max_pending_cost=half)
    for item in prefetch_map(load, items, pool, depth=2 * batch_size):
        if not item.sample.ok:
            result.error_b += 1
            _count_errors(result, 1, progress)
            continue
        for batch in bucketer.add(item):
            step(batch)
    for batch in bucketer.flush():
        step(batch)
    while pending:
        collect()
    result.rows.extend(done[i] for i in sorted(done))
    result.image_bytes = images.bytes
