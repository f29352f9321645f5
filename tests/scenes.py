"""Labeled scenes whose depth is known exactly, and a teacher test double that knows it.

A pinhole camera looks at a tilted plane and a sphere in front of it; the depth (the z of the
first surface hit) is solved per pixel in closed form, so the ground truth carries no noise.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from labelers.prediction import Prediction


def render(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, depth in metres float64) of the plane-and-sphere scene."""
    rng = np.random.default_rng(seed)
    f = float(max(height, width))
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    x, y = (u - (width - 1) / 2) / f, (v - (height - 1) / 2) / f       # ray (x, y, 1)
    # Plane n . X = c, tilted towards the camera at the bottom (a floor rising into a wall).
    n = np.array([0.1 * rng.uniform(-1, 1), 0.4 + 0.2 * rng.uniform(), 1.0])
    c = 5.0 + rng.uniform()
    depth = c / (n[0] * x + n[1] * y + n[2])
    # Sphere: |t r - C|^2 = R^2, nearest root; z = t because r_z = 1.
    centre = np.array([rng.uniform(-0.3, 0.3), rng.uniform(-0.2, 0.1), 3.0 + rng.uniform()])
    radius = 0.6 + 0.3 * rng.uniform()
    a = x * x + y * y + 1.0
    b = x * centre[0] + y * centre[1] + centre[2]
    disc = b * b - a * (centre @ centre - radius ** 2)
    hit = disc > 0
    t = np.where(hit, (b - np.sqrt(np.where(hit, disc, 0.0))) / a, np.inf)
    depth = np.where(hit & (t > 0) & (t < depth), t, depth)
    checker = ((u // 8 + v // 8) % 2)[..., None] * 40.0
    shade = (255.0 * (2.5 / depth))[..., None] * np.array([0.9, 0.7, 0.5])
    image = np.clip(shade + checker + rng.normal(0, 3, (height, width, 3)), 0, 255).astype(np.uint8)
    return image, depth


def with_invalid(depth: np.ndarray) -> np.ndarray:
    """The holes a real sensor leaves: zeros (no return), NaN and inf."""
    gt = depth.copy()
    gt[:6, :9] = 0.0
    gt[-3:, -4:] = np.nan
    gt[20, 5:15] = np.inf
    return gt


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def pfm(a: np.ndarray) -> bytes:
    """Little-endian single-channel PFM, rows bottom to top (the format's own order)."""
    h, w = a.shape
    return f"Pf\n{w} {h}\n-1.0\n".encode() + np.flipud(a).astype("<f4").tobytes()


def exr(a: np.ndarray, tmp_path) -> bytes:
    import OpenEXR

    path = str(tmp_path / f"gt-{hashlib.sha1(a.tobytes()).hexdigest()[:8]}.exr")
    with OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                      {"Z": a.astype(np.float32)}) as f:
        f.write(path)
    with open(path, "rb") as fh:
        return fh.read()


class ExactTeacher:
    """A teacher test double: returns a known disparity for each known image (looked up by its
    pixels), optionally distorted by ``scale * d + shift`` and Gaussian noise."""

    name = "exact-teacher"

    def __init__(self, scenes: list[tuple[np.ndarray, np.ndarray]], scale: float = 1.0, shift: float = 0.0,
                 noise: float = 0.0, seed: int = 0):
        """scenes: (image, exact disparity) pairs."""
        self.disparities = {self.digest(image): d for image, d in scenes}
        self.scale, self.shift, self.noise = scale, shift, noise
        self.rng = np.random.default_rng(seed)
        self.returned: dict[bytes, np.ndarray] = {}     # image digest -> what predict returned

    @staticmethod
    def digest(image: np.ndarray) -> bytes:
        return hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return (height, width)

    def predict(self, images):
        out = []
        for image in images:
            d = self.disparities[self.digest(image)]
            pred = self.scale * d + self.shift
            if self.noise:
                pred = pred + self.rng.normal(0, self.noise, d.shape)
            self.returned[self.digest(image)] = pred
            out.append(Prediction(pred.astype(np.float32)))
        return out
