"""The manifest: one Parquet part per committed shard, read as one pyarrow dataset.

The schema is versioned (``MANIFEST_VERSION`` in the Parquet schema metadata) and
documented in docs/MANIFEST.md; add columns freely, never change a column's meaning.
"""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from storage.layout import MANIFEST
from storage.objectstore import ObjectStore

MANIFEST_VERSION = "1"

MEMBER = pa.struct([
    ("name", pa.string()),      # tar member name, "<key>.<ext>"
    ("offset", pa.int64()),     # byte offset of the member's data in the tar
    ("size", pa.int64()),
    ("sha256", pa.string()),
])

SCHEMA = pa.schema(
    [
        # SPEC §4, required
        ("key", pa.string()),
        ("shard", pa.string()),          # the tar under shards/: "shard-000123.tar", or after a
                                         # repair "shard-000123/g1.tar" (storage.layout.shard_file)
        ("source", pa.string()),         # input shard URL
        ("status", pa.string()),         # "ok" | "error"
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sky_fraction", pa.float32()),
        ("disp_min", pa.float32()),      # raw range over the normalized pixels (teacher output, or 1/t)
        ("disp_max", pa.float32()),
        ("teacher", pa.string()),
        ("sky_model", pa.string()),
        # beyond the required
        ("source_kind", pa.string()),    # "pseudo" (teacher labels) or "gt"
        ("valid_fraction", pa.float32()),  # gt only: share of pixels valid.png marks valid
        ("degenerate", pa.bool_()),      # hi - lo ~ 0 or no non-sky pixel: label is all 0
        ("disp_p05", pa.float32()),      # percentiles of the normalized label over the pixels it was
                                         # normalized on (non-sky; and valid, for gt)
        ("disp_p50", pa.float32()),
        ("disp_p95", pa.float32()),
        ("members", pa.list_(MEMBER)),   # every member of this sample in the tar
        ("tar_size", pa.int64()),        # size of the whole output tar
        ("decode_s", pa.float32()),
        ("model_s", pa.float32()),       # this sample's share of its batch's model time (sky + teacher)
        ("encode_s", pa.float32()),
        ("sky_s", pa.float32()),         # the sky model's share (upload of the batch included)
        ("teacher_s", pa.float32()),     # the teacher's share
        ("notes", pa.string()),          # ok rows: what was dropped from the sample and why (e.g. its input json)
        ("worker", pa.string()),
        ("attempt", pa.int32()),
        ("labeled_at", pa.timestamp("ms", tz="UTC")),
        ("teacher_output", pa.string()),  # what the teacher outputs: "disparity" | "depth" |
                                         # "inverse_depth"; null for gt
        ("output_min", pa.float32()),    # range of the teacher's own output (its unit: metres for
        ("output_max", pa.float32()),    # depth, 1/m for inverse depth) over the normalized pixels; null for gt
        ("conf_mean", pa.float32()),     # the teacher's mean confidence (0..1) over non-sky pixels;
                                         # null when it gives none (conf.png)
        ("label_width", pa.int32()),     # the label members' size (job.json's label_size); null in
        ("label_height", pa.int32()),    # parts from before it existed: the image's, width x height
    ],
    metadata={b"depth_engine.manifest_version": MANIFEST_VERSION.encode()},
)


def to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts keyed by column name; missing columns are null) -> a table of SCHEMA."""
    columns = {f.name: [r.get(f.name) for r in rows] for f in SCHEMA}
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def encode_part(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(to_table(rows), buf, compression="zstd")
    return buf.getvalue()


def decode_part(data: bytes, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(data), columns=columns)


def tars_of(data: bytes) -> set[str]:
    """The tars a part's rows name (its ``shard`` column: one, or none for an empty part)."""
    return set(decode_part(data, columns=["shard"]).column("shard").to_pylist())


def dataset(output: ObjectStore) -> ds.Dataset:
    """The whole manifest of an OUTPUT as one pyarrow dataset (what a trainer reads)."""
    fs, root = output.arrow_filesystem()
    path = f"{root.rstrip('/')}/{MANIFEST.rstrip('/')}"
    return ds.dataset(path, filesystem=fs, format="parquet", schema=SCHEMA)
