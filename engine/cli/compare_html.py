"""`compare --html`: a comparison as one self-contained HTML page for a person. The counts, the
thresholds and the figures' distribution, then the worst pairs as a contact sheet: image | A | B |
|A − B| after aligning A to B | sky A | sky B, each pair's figures under it.

The pictures are fetched with ranged reads at the byte ranges the report's entries carry, decoded
with the label format's codecs, and embedded as data URIs, so the page needs no network. Where B
was a teacher run on the fly its labels were never stored: those cells say so."""
from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image

from engine.cli.audit_html import THUMB, _data_uri, _fmt, colorize
from pipelines.decode import decode_image
from pipelines.label_grid import common_grid
from storage import layout
from storage.label_format import read_disparity_png, read_mask_png
from storage.objectstore import ObjectStore, StorageError
from storage.output import Output

DIFF_FULL = 0.25            # |A − B| where the colour map tops out (yellow); labels are in [0, 1]
NO_DATA = (128, 128, 128)   # |A − B| on a pixel not valid in both (sky in A or in B): grey
PHOTO_QUALITY = 85          # the image as a JPEG thumbnail: a PNG of a photo would weigh ~5x more
NOT_STORED = "not stored"
COLUMNS = ("image", "A", "B", "|A − B| aligned", "sky A", "sky B")
FIGURES = (("abs_rel", "AbsRel"), ("delta1", "δ1"), ("scale", "scale"), ("shift", "shift"),
           ("pearson", "Pearson"), ("sky_iou", "sky IoU"))
_IN_A = ("image", "disp_a", "sky_a")     # members read from A's shard; disp_b and sky_b from B's
_DECODE = {"image": decode_image, "disp_a": lambda d: read_disparity_png(d, dtype=np.float64),
           "disp_b": lambda d: read_disparity_png(d, dtype=np.float64),
           "sky_a": read_mask_png, "sky_b": read_mask_png}


def diff_rgb(disp_a: np.ndarray, disp_b: np.ndarray, scale: float, shift: float,
             sky_a: np.ndarray | None = None, sky_b: np.ndarray | None = None) -> np.ndarray:
    """|scale·A + shift − B| colour-mapped (viridis, 0 → DIFF_FULL), NO_DATA where either label
    is sky (a mask not stored counts as no sky): the pixels the alignment was fitted on."""
    if disp_a.shape != disp_b.shape:
        raise ValueError(f"A is {_size(disp_a)}, B is {_size(disp_b)}")
    valid = np.ones(disp_a.shape, bool)
    for sky in (sky_a, sky_b):
        if sky is not None:
            if sky.shape != disp_a.shape:
                raise ValueError(f"a sky mask is {_size(sky)}, the labels {_size(disp_a)}")
            valid &= ~sky
    rgb = colorize(np.abs(scale * disp_a + shift - disp_b) / DIFF_FULL)
    rgb[~valid] = NO_DATA
    return rgb


def render(report: dict, a: ObjectStore, b: ObjectStore | None) -> str:
    teacher = " (a teacher, labeling A's images then: its labels are not stored)" if b is None else ""
    parts = ["<h1>depth-engine compare</h1>",
             f"<p>A {html.escape(str(report['a']))}<br>B {html.escape(str(report['b']))}{teacher}</p>",
             _table("counts", [(k, html.escape(str(v))) for k, v in report["counts"].items()]),
             _table("disagree when", [(k, html.escape(str(v))) for k, v in report["thresholds"].items()]
                    + [("or", "inverted (scale &lt; 0)")]),
             _figures(report["figures"])]
    worst = report["worst"]
    parts.append(f"<h2>The {len(worst)} worst pairs</h2><p>disparity: viridis, yellow = near. |A − B|: A "
                 f"aligned to B (scale·A + shift), viridis from 0 (purple) to {DIFF_FULL:g} or more (yellow), "
                 f"grey where either is sky.</p>")
    if worst:
        parts.append("<table class=sheet><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
                     + "<th>figures</th></tr>")
        parts += [_pair(rank, entry, a, b) for rank, entry in enumerate(worst, 1)]
        parts.append("</table>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             f"th,td{{padding:2px 8px;text-align:left;vertical-align:top}}.sheet img{{max-width:{THUMB}px}}"
             ".sheet td{border-top:1px solid #ccc}.missing{color:#888;font-style:italic}.inv{color:#c00}"
             "small{display:block;max-width:14em}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>depth-engine compare</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_compare_html(report: dict, a: ObjectStore, b: ObjectStore | None, path: str) -> None:
    """The page of ``report`` (engine.compare) to ``path``; ``b`` None: B was a teacher."""
    page = render(report, a, b)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


class _Missing(Exception):
    """A cell that holds a word instead of a picture."""


def _pair(rank: int, entry: dict, a: ObjectStore, b: ObjectStore | None) -> str:
    """One row of the sheet. A member that cannot be read or decoded spoils its cells, not the page."""
    members, loaded = entry.get("members") or {}, {}
    first = layout.shard_file(entry["shard"])     # a pair without its sides' tars: as first labeled
    tars = {"a": entry.get("shard_a") or first, "b": entry.get("shard_b") or first}   # each side's generation

    def load(name: str):
        if name not in loaded:
            store, m = (a if name in _IN_A else b), members.get(name)
            if store is None or m is None:
                raise _Missing(NOT_STORED)
            tar = Output(store).tar_key(tars["a" if name in _IN_A else "b"])
            loaded[name] = _DECODE[name](store.read_range(tar, m["offset"], m["size"]))
        return loaded[name]

    def optional(name: str):
        try:
            return load(name)
        except _Missing:
            return None

    def diff() -> str:
        da, db = load("disp_a"), load("disp_b")
        if entry.get("scale") is None or entry.get("shift") is None:
            raise _Missing("not aligned")
        # labels of two sizes (label --label-size) are compared on the smaller's grid, as compare figured them
        da, db, (sky_a,), (sky_b,) = common_grid(da, db, (optional("sky_a"),), (optional("sky_b"),))
        return _png(diff_rgb(da, db, entry["scale"], entry["shift"], sky_a, sky_b))

    cells = [("image", lambda: _photo(load("image"))),
             ("A", lambda: _png(colorize(load("disp_a")))),
             ("B", lambda: _png(colorize(load("disp_b")))),
             ("A − B", diff),
             ("sky A", lambda: _png(_mask(load("sky_a")))),
             ("sky B", lambda: _png(_mask(load("sky_b"))))]
    key = html.escape(str(entry["key"]))
    return ("<tr class=pair>" + "".join(_cell(kind, key, make) for kind, make in cells)
            + f"<td><small>#{rank} {html.escape(str(entry['shard']))}/{key}<br>{_caption(entry)}</small></td></tr>")


def _cell(kind: str, key: str, make) -> str:
    try:
        return f'<td><img src="{make()}" alt="{kind} of {key}"></td>'
    except _Missing as e:
        return f"<td class=missing>{html.escape(str(e))}</td>"
    except (StorageError, OSError, ValueError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        return f"<td class=missing>unreadable: {html.escape(reason)}</td>"


def _caption(entry: dict) -> str:
    figures = " · ".join(f"{label} {_fmt(entry.get(name))}" for name, label in FIGURES)
    flags = (["<b class=inv>inverted</b>"] if entry.get("inverted") else []) + \
        (["<b>disagree</b>"] if entry.get("disagree") else [])
    return figures + ("<br>" + " ".join(flags) if flags else "")


def _png(rgb: np.ndarray) -> str:
    return _data_uri(Image.fromarray(rgb))


def _photo(rgb: np.ndarray) -> str:
    img = Image.fromarray(rgb)
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=PHOTO_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _mask(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 255, 0).astype(np.uint8)


def _figures(figures: dict) -> str:
    """The distribution of each figure over the compared pairs."""
    stats = ("mean", "p05", "p50", "p95")
    head = "<tr><th></th><th>n</th>" + "".join(f"<th>{c}</th>" for c in stats) + "</tr>"
    rows = "".join(f"<tr><th>{html.escape(name)}</th><td>{html.escape(str(f.get('n', '–')))}</td>"
                   + "".join(f"<td>{_fmt(f.get(c))}</td>" for c in stats) + "</tr>" for name, f in figures.items())
    return f"<h2>Figures</h2><table>{head}{rows}</table>"


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    return (f"<h2>{html.escape(title.capitalize())}</h2><table>"
            + "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>")


def _size(array: np.ndarray) -> str:
    return "×".join(str(n) for n in array.shape[:2])
