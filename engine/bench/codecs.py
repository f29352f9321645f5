"""The 16-bit PNG encoders of well-kept libraries on a realistic label: CPU time and bytes, each
file read back by Pillow and compared to the values, so a codec that is fast because it is wrong
shows as such. What storage.label_format's choice (imagecodecs' libpng, one fixed row filter) was
picked from; the figures are in docs/BENCHMARKS.md ("The label codec")."""
from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image


def _pillow(level: int):
    def encode(values: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(values).save(buf, format="PNG", compress_level=level)
        return buf.getvalue()
    return encode


def encoders() -> dict:
    """name -> encode(uint16 HxW) -> PNG bytes, for the libraries installed here."""
    out = {f"Pillow, zlib level {level}": _pillow(level) for level in range(4)}
    try:
        import cv2

        out["OpenCV, level 1"] = lambda v: cv2.imencode(".png", v, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()
        out["OpenCV, level 1, Paeth + RLE"] = lambda v: cv2.imencode(".png", v, [
            cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH,
            cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])[1].tobytes()
    except ImportError:
        pass
    import imagecodecs

    png = imagecodecs.PNG
    out["imagecodecs libpng, level 1"] = lambda v: bytes(imagecodecs.png_encode(v, level=1))
    out["imagecodecs libpng, level 1, Up"] = lambda v: bytes(imagecodecs.png_encode(
        v, level=1, filter=png.FILTER.UP))
    out["imagecodecs libspng, level 1"] = lambda v: bytes(imagecodecs.spng_encode(v, level=1))
    from storage.label_format import disparity_values_png

    out["the engine's (libpng, level 1, Paeth + RLE)"] = disparity_values_png
    return out


def codec_figures(values: np.ndarray, repeats: int = 3) -> dict:
    """Per encoder: median CPU-ms of one encode of ``values`` (uint16), bytes per pixel, and
    whether Pillow reads the values back exactly."""
    out = {}
    for name, encode in encoders().items():
        data = encode(values)
        times = []
        for _ in range(repeats):
            t0 = time.thread_time()
            encode(values)
            times.append(time.thread_time() - t0)
        with Image.open(io.BytesIO(data)) as im:
            exact = bool(np.array_equal(np.asarray(im), values))
        out[name] = {"cpu_ms": round(1000 * float(np.median(times)), 2),
                     "bytes_per_pixel": round(len(data) / values.size, 3), "bit_exact": exact}
    return out
