"""Labels -> the members of an output sample and its manifest row (SPEC §3, §4)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import numpy as np

from labelers.device_label import QuantizedLabel
from labelers.normalize import (
    METRIC_OUTPUTS,
    normalize_disparity,
    normalize_output,
    to_depth,
)
from pipelines.sample import Sample
from storage.label_format import (
    CONF_MEMBER,
    DEPTH_MEMBER,
    DEPTH_SCALE,
    DISP_LEVELS,
    DISP_MEMBER,
    JSON_MEMBER,
    RESERVED,
    SKY_MEMBER,
    VALID_MEMBER,
    conf_png,
    depth_png,
    disparity_values_png,
    mask_png,
    quantize_disparity,
)
from storage.label_format import read_conf_png as read_conf_png
from storage.label_format import read_depth_png as read_depth_png

# The codecs and member names are storage.label_format's; the two readers above stay importable
# from here, where they were first (depth_png / read_depth_png is the --keep-depth codec).


@dataclass(slots=True)
class Encoded:
    """What the shard writer needs: members in write order, and the row without tar facts."""

    key: str
    members: dict[str, bytes]   # ext -> bytes; empty for an error sample
    row: dict


def depth_png_in_metres(label: dict) -> bool:
    """Whether an OUTPUT's ``depth.png`` members hold metres x 256, from job.json's ``label``: the
    engine wrote them (``keep_depth``), or a ``convert-gt`` carried an input's ``depth.png``
    through under ``--gt-scale 256`` (the same convention, as stored: no --max-depth, no sky)."""
    ground_truth = label.get("ground_truth") or {}
    return bool(label.get("keep_depth")) or ground_truth.get("scale") == DEPTH_SCALE


def conf_mean(confidence: np.ndarray | None, used: np.ndarray | None) -> float | None:
    """The manifest's ``conf_mean``: mean confidence over the non-sky pixels (all of them without a
    sky model), non-finite confidence counted as 0; None without a map."""
    if confidence is None:
        return None
    c = np.nan_to_num(np.asarray(confidence, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    c = c if used is None else c[used]
    return float(c.mean()) if c.size else None


def percentiles(values: np.ndarray, used: np.ndarray | None, degenerate: bool) -> list[float | None]:
    """p05/p50/p95 of the stored label (disp.png's values / 65535, numpy's linear
    interpolation) over the pixels it was normalized on (``used``): what a trainer reads, within
    half a step (1/131070) of the float label's, and taken on 2-byte integers, not a float copy."""
    if degenerate:
        return [None, None, None]
    v = values if used is None else values[used]
    if not v.size:
        return [None, None, None]
    return [float(p) / DISP_LEVELS for p in np.percentile(v, [5, 50, 95])]


def label_mask(sample: Sample) -> np.ndarray | None:
    """valid.png of a ground-truth sample: the pixels whose label a trainer may use, i.e. those
    with ground truth and the sky (whose label, disparity 0, is the definition's, as in
    pseudo-labels). None for pseudo-labels, where every pixel is labeled."""
    if sample.valid is None:
        return None
    return sample.valid if sample.sky is None else sample.valid | sample.sky


MAX_INPUT_JSON_BYTES = 1 << 20   # the input's own json member, kept inside the sample's json
MAX_INPUT_JSON_DEPTH = 64


def _depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def carried_metadata(extras: dict[str, bytes], notes: list[str] | None = None) -> dict:
    """The input's own json member, parsed, so the sample's json keeps it. Metadata never fails
    a sample: one that is too large, too deep or not JSON is dropped with a note (the input
    shard still has it), and NaN/Infinity become null, so the output json is strict."""
    raw = extras.get(JSON_MEMBER)
    if raw is None:
        return {}
    notes = [] if notes is None else notes
    non_finite = []
    too_deep = f"input json dropped: nested deeper than {MAX_INPUT_JSON_DEPTH} levels"
    if len(raw) > MAX_INPUT_JSON_BYTES:
        notes.append(f"input json dropped: {len(raw)} bytes exceeds {MAX_INPUT_JSON_BYTES}")
        return {}
    try:
        value = json.loads(raw, parse_constant=lambda c: non_finite.append(c))
    except RecursionError:    # the parser's own limit (about 1,000 levels) came first
        notes.append(too_deep)
        return {}
    except (ValueError, UnicodeDecodeError) as e:
        notes.append(f"input json dropped: not valid JSON ({str(e)[:120]})")
        return {}
    if _depth(value) > MAX_INPUT_JSON_DEPTH:
        notes.append(too_deep)
        return {}
    if non_finite:
        notes.append(f"input json: {len(non_finite)} NaN/Infinity value(s) written as null")
    return {"input": value}


def quantized(sample: Sample, kind: str | None) -> QuantizedLabel:
    """The label on the host, from the float map: normalized (SPEC §5.4; ``kind`` says how to read
    the teacher's output, None: ground truth, disparity already), quantized as disp.png stores it,
    its percentiles over the pixels it was normalized on."""
    label = (normalize_disparity(sample.raw, sample.sky, sample.valid) if kind is None
             else normalize_output(sample.raw, kind, sample.sky, sample.valid))
    values = quantize_disparity(label.disparity)
    return QuantizedLabel(values, label.lo, label.hi, label.degenerate, label.output_lo, label.output_hi,
                          percentiles(values, label.used, label.degenerate))


def error_row(sample: Sample, models: dict) -> Encoded:
    return Encoded(sample.key, {}, {
        "key": sample.key, "source": sample.source, "status": "error", "error": sample.error,
        **models, "decode_s": sample.timings.get("decode"),
    })


def encode(sample: Sample, models: dict, keep_depth: bool = False) -> Encoded:
    """Stage 4: normalize (SPEC §5.4) and encode. ``models`` = {"teacher": ..., "teacher_output":
    ..., "sky_model": ...}; a teacher's raw output is turned into disparity as teacher_output says.
    ``keep_depth``: a metric teacher's metres are kept too, as ``depth.png`` (depth_png). A
    teacher's confidence becomes ``conf.png`` and ``conf_mean``, its field of view the json's
    ``intrinsics``."""
    if not sample.ok:
        return error_row(sample, models)
    t0 = time.perf_counter()
    kind = models.get("teacher_output")
    label = quantized(sample, kind) if sample.label is None else sample.label
    output_range = {"output_min": _finite(label.output_lo), "output_max": _finite(label.output_hi)}
    height, width = sample.height, sample.width
    label_height, label_width = label.values.shape
    sky_fraction = None if sample.sky is None else float(sample.sky.mean())
    valid = label_mask(sample)
    valid_fraction = None if valid is None else float(valid.mean())
    used = None if sample.sky is None else ~sample.sky
    if sample.valid is not None:
        used = sample.valid if used is None else used & sample.valid
    p05, p50, p95 = label.percentiles
    confidence_mean = conf_mean(sample.confidence, used)
    meta = {
        "source": sample.source, "key": sample.key, "width": width, "height": height,
        "label_width": label_width, "label_height": label_height,
        **models, "raw_min": _finite(label.lo), "raw_max": _finite(label.hi), **output_range,
        **({} if sample.fov_deg is None else {"intrinsics": _intrinsics(sample.fov_deg, width)}),
        **({} if confidence_mean is None else {"conf_mean": confidence_mean}),
        "degenerate": label.degenerate, "sky_fraction": sky_fraction,
        **({} if valid is None else {"ground_truth": sample.ground_truth, "valid_fraction": valid_fraction}),
        **carried_metadata(sample.extras, sample.notes),
    }
    members = {sample.image_ext: sample.image_bytes, DISP_MEMBER: disparity_values_png(label.values)}
    if sample.sky is not None:
        members[SKY_MEMBER] = mask_png(sample.sky)
    if valid is not None:
        members[VALID_MEMBER] = mask_png(valid)
    if sample.confidence is not None:
        members[CONF_MEMBER] = conf_png(sample.confidence)
    if keep_depth:
        if kind not in METRIC_OUTPUTS:
            raise ValueError(f"keep_depth needs a teacher that outputs metres ({', '.join(METRIC_OUTPUTS)}), got {kind!r}")
        members[DEPTH_MEMBER] = depth_png(to_depth(sample.raw, kind), sample.sky)
        if DEPTH_MEMBER in sample.extras:
            sample.notes.append(f"input {DEPTH_MEMBER} replaced by the teacher's depth (--keep-depth)")
    for ext in sorted(e for e in sample.extras if e in RESERVED and e != JSON_MEMBER):
        sample.notes.append(f"input {ext} replaced by the engine's")   # never carried: it would contradict the label
    if sample.notes:
        meta["notes"] = list(sample.notes)
    members[JSON_MEMBER] = json.dumps(meta, sort_keys=True, allow_nan=False).encode()
    for ext, value in sample.extras.items():
        if ext not in RESERVED and ext not in members:
            members[ext] = value
    sample.timings["encode"] = time.perf_counter() - t0
    row = {
        "key": sample.key, "source": sample.source, "status": "ok", "error": None,
        "width": width, "height": height, "label_width": label_width, "label_height": label_height,
        "sky_fraction": sky_fraction,
        "disp_min": _finite(label.lo), "disp_max": _finite(label.hi), **output_range, **models,
        "valid_fraction": valid_fraction, "conf_mean": confidence_mean, "degenerate": label.degenerate, "disp_p05": p05, "disp_p50": p50, "disp_p95": p95,
        "decode_s": sample.timings.get("decode"), "sky_s": sample.timings.get("sky"),
        "teacher_s": sample.timings.get("teacher"), "model_s": _model_seconds(sample.timings),
        "encode_s": sample.timings["encode"], "notes": "; ".join(sample.notes) or None,
    }
    return Encoded(sample.key, members, row)


def _intrinsics(fov_deg: float, width: int) -> dict:
    """What the teacher predicted of the camera: horizontal field of view, and the focal length
    in pixels at the image's width, 0.5 W / tan(fov / 2)."""
    return {"fov_deg": fov_deg, "focal_px": 0.5 * width / math.tan(math.radians(fov_deg) / 2)}


def _model_seconds(timings: dict) -> float | None:
    parts = [timings[k] for k in ("sky", "teacher") if k in timings]
    return sum(parts) if parts else None


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
