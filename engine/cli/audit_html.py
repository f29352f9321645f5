"""The audit as one self-contained HTML page for a person: headline numbers, histograms
(inline SVG), and a contact sheet of image | disparity | sky triplets for a random draw and
for each kind of flagged sample. Pictures are fetched with ranged reads at the offsets the
manifest records, and embedded as data URIs, so the page needs no network."""
from __future__ import annotations

import base64
import html
import io
import random

import numpy as np
from PIL import Image, ImageOps

from storage import layout
from storage.label_format import (
    DISP_MEMBER,
    SKY_MEMBER,
    image_member,
    label_row_shape,
    read_disparity_png,
)
from storage.manifest import decode_part
from storage.objectstore import ObjectStore
from storage.output import Output

THUMB = 224
RANDOM_DRAW = 12
PER_FLAG = 6
# viridis at 9 stops; linear interpolation between them is within a few levels of the original
_VIRIDIS = np.array([[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
                     [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float64)


def colorize(d: np.ndarray) -> np.ndarray:
    """Normalized disparity in [0, 1] -> RGB uint8 with a perceptual (viridis) colormap."""
    x = np.clip(d, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    i = np.minimum(x.astype(np.int64), len(_VIRIDIS) - 2)
    f = (x - i)[..., None]
    return np.rint(_VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f).astype(np.uint8)


def _data_uri(img: Image.Image) -> str:
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _svg_bars(counts: list, labels: list[str], title: str, width: int = 420, height: int = 140) -> str:
    n = max(len(counts), 1)
    top = max(max(counts, default=0), 1)
    bw = width / n
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - 20 - (c / top) * (height - 30):.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{(c / top) * (height - 30):.1f}" fill="#3b6fb6"><title>{html.escape(labels[i])}: {c}</title></rect>'
        for i, c in enumerate(counts))
    axis = (f'<text x="0" y="{height - 4}" font-size="10">{html.escape(labels[0]) if labels else ""}</text>'
            f'<text x="{width}" y="{height - 4}" font-size="10" text-anchor="end">'
            f'{html.escape(labels[-1]) if labels else ""}</text>')
    return (f'<figure><figcaption>{html.escape(title)}</figcaption><svg width="{width}" height="{height}" '
            f'role="img" aria-label="{html.escape(title)}">{bars}{axis}</svg></figure>')


def _hist_svg(hist: dict, title: str) -> str:
    edges, counts = hist["edges"], hist["counts"]
    labels = [f"{edges[i]:.3g}–{edges[i + 1]:.3g}" for i in range(len(counts))]
    return _svg_bars(counts, labels, title)


def _triplet(output: ObjectStore, row: dict) -> dict | None:
    """The image, its colorized disparity and its sky mask, read by ranged GETs."""
    members = {m["name"][len(row["key"]) + 1:]: m for m in row["members"] or []}
    tar = Output(output).tar_key(row["shard"])
    read = lambda m: output.read_range(tar, m["offset"], m["size"])  # noqa: E731
    image_ext = image_member(members)
    if image_ext is None or DISP_MEMBER not in members:
        return None
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(read(members[image_ext])))).convert("RGB")   # as labeled
    disp = read_disparity_png(read(members[DISP_MEMBER]), np.float64)
    out = {"image": _data_uri(img), "disp": _data_uri(Image.fromarray(colorize(disp)))}
    if SKY_MEMBER in members:
        out["sky"] = _data_uri(Image.open(io.BytesIO(read(members[SKY_MEMBER]))).convert("L"))
    return out


def _label_size(row: dict) -> str:
    """" · label w×h" where the labels are smaller than the image (label --label-size), else ""."""
    height, width = label_row_shape(row)
    return "" if (height, width) == (row["height"], row["width"]) else f" · label {width}×{height}"


def _rows_of(output: ObjectStore, shard: str, cache: dict) -> list[dict]:
    name = Output.name_of(shard)
    if name not in cache:
        cache[name] = decode_part(output.get(layout.manifest_key(name))).to_pylist()
    return cache[name]


def picks(report: dict, output: ObjectStore, seed: int = 0) -> dict[str, list[dict]]:
    """Rows to show: one ok row from each of up to RANDOM_DRAW random shards, and up to
    PER_FLAG rows of each flagged kind (each read from its own shard's manifest part)."""
    rnd = random.Random(seed)
    cache: dict = {}
    shards = [s["shard"] for s in report["per_shard"] if s["ok"]]
    out: dict[str, list[dict]] = {"random draw": []}
    for shard in rnd.sample(shards, min(RANDOM_DRAW, len(shards))):
        ok = [r for r in _rows_of(output, shard, cache) if r["status"] == "ok"]
        out["random draw"].append(rnd.choice(ok))
    for kind, flag in report["flags"]["samples"].items():
        wanted = flag["samples"][:PER_FLAG]
        rows = []
        for f in wanted:
            rows += [r for r in _rows_of(output, f["shard"], cache) if r["key"] == f["key"]]
        if rows:
            out[kind.replace("_", " ")] = rows
    return out


def render(report: dict, output: ObjectStore) -> str:
    r, s = report, report["shards"]
    head = [("samples", r["samples"]), ("ok", r["ok"]), ("errors", r["errors"]),
            ("shards committed", s["committed"]), ("failed", s["failed"]), ("pending", s["pending"]),
            ("sky fraction mean", _fmt(r["sky_fraction"]["mean"])),
            ("degenerate labels", r["disparity"]["degenerate"])]
    parts = [f"<h1>depth-engine audit</h1><p>{html.escape(r['output'])}</p>",
             "<table class=head>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in head) + "</table>",
             "<h2>Distributions</h2><div class=row>",
             _hist_svg(r["sky_fraction"]["histogram"], "sky fraction (ok samples)"),
             _hist_svg(r["disparity"]["raw_range"]["histogram"], "raw disparity range (log bins)"),
             _hist_svg(r["disparity"]["label_p50"]["histogram"], "median of the normalized label"),
             *([_hist_svg(r["confidence"]["histogram"], "teacher's mean confidence (conf_mean)")]
               if r.get("confidence", {}).get("count") else []),
             "</div>"]
    sizes = [("width", r["width"]), ("height", r["height"])]
    parts.append("<table><tr><th></th><th>min</th><th>p50</th><th>p95</th><th>max</th></tr>" + "".join(
        f"<tr><th>{k}</th>" + "".join(f"<td>{v.get(c)}</td>" for c in ("min", "p50", "p95", "max")) + "</tr>"
        for k, v in sizes) + "</table>")
    if r["errors_by_reason"]:
        reasons = list(r["errors_by_reason"].items())[:20]
        parts.append("<h2>Errors by reason</h2>" + _svg_bars([n for _, n in reasons], [k for k, _ in reasons],
                                                               "errors by reason")
                     + "<table>" + "".join(f"<tr><td>{n}</td><td>{html.escape(k)}</td></tr>" for k, n in reasons)
                     + "</table>")
    per = r["per_shard"][:500]
    parts.append("<h2>Per shard</h2>" + _svg_bars([p["errors"] for p in per], [p["shard"] for p in per],
                                                    "errors per shard")
                 + _svg_bars([round(100 * (p["sky_fraction_mean"] or 0)) for p in per], [p["shard"] for p in per],
                             "mean sky fraction per shard (%)"))
    suspect = r["flags"]["shards"]["high_error_rate"]
    if suspect:
        parts.append("<p>Suspect shards (error rate): " + ", ".join(
            f"{html.escape(x['shard'])} ({x['error_rate']:.0%})" for x in suspect) + "</p>")
    parts.append("<h2>Contact sheet</h2><p>image | disparity (viridis, yellow = near) | sky</p>")
    for title, rows in picks(r, output).items():
        count = r["flags"]["samples"].get(title.replace(" ", "_"), {}).get("count")
        parts.append(f"<h3>{html.escape(title)}" + (f" ({count} flagged)" if count else "") + "</h3><div class=sheet>")
        for row in rows:
            t = _triplet(output, row)
            if t is None:
                continue
            imgs = "".join(f'<img src="{t[k]}" alt="{k} of {html.escape(row["key"])}">'
                           for k in ("image", "disp", "sky") if k in t)
            parts.append(f'<div class=trip><div>{imgs}</div><small>{html.escape(row["shard"])}/'
                         f'{html.escape(row["key"])} · {row["width"]}×{row["height"]}{_label_size(row)} · sky '
                         f'{_fmt(row["sky_fraction"])}</small></div>')
        parts.append("</div>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
             "th,td{padding:2px 8px;text-align:left}.row{display:flex;flex-wrap:wrap;gap:1em}"
             ".sheet{display:flex;flex-wrap:wrap;gap:12px}.trip img{height:120px;margin-right:2px}"
             "figure{margin:0}figcaption{font-size:12px}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>depth-engine audit</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_html(report: dict, output: ObjectStore, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(report, output))


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"
