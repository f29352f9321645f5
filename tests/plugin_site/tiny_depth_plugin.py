"""A teacher plugin as a team would ship one for a model outside transformers, made tiny for
depth-engine's tests: a few random-weight convolutions that give metric depth (metres), a
confidence map in [0, 1] and a field of view. Its weights are a safetensors file, named by the
ARG of ``--teacher plugin:tiny:ARG``. Registered by tiny_depth_plugin-0.1.dist-info (an
installed distribution's entry points, which is what ``pip install`` of a plugin package
writes)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labelers.prediction import Prediction

SHORT_SIDE = 64      # the model sees the image with its shorter side at 64, sides multiples of 8


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=2, dilation=2),
                         nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))


def save_weights(path, seed: int = 0) -> str:
    """Random weights, saved as the plugin loads them."""
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _net()
        for conv in net[::2]:      # so the random maps vary over the image
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    save_file(net.state_dict(), str(path))
    return str(path)


class TinyDepth:
    """Metric depth, 0.5..~10 m, a confidence map and a field of view, per image."""

    output = "depth"

    def __init__(self, net: nn.Module, device: torch.device):
        self.net, self.device = net, device

    @classmethod
    def load(cls, arg, *, device, dtype):
        from safetensors.torch import load_file

        net = _net()
        net.load_state_dict(load_file(arg))
        return cls(net.float().eval().to(device), torch.device(device))

    @classmethod
    def fingerprint(cls, arg) -> str:
        with open(arg, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        scale = SHORT_SIDE / min(height, width)
        return max(8, round(height * scale / 8) * 8), max(8, round(width * scale / 8) * 8)

    def _heads(self, image) -> tuple[torch.Tensor, torch.Tensor, float]:
        x = torch.as_tensor(np.array(image) if isinstance(image, np.ndarray) else image, device=self.device)
        height, width = x.shape[:2]
        x = x.permute(2, 0, 1)[None].float() / 255.0 - 0.5
        x = F.interpolate(x, size=self.target_size(height, width), mode="bilinear", align_corners=False)
        with torch.inference_mode():
            y = self.net(x)
        y = F.interpolate(y, size=(height, width), mode="bilinear", align_corners=False)[0]
        depth = 0.5 + F.softplus(4 * y[0]) * 2
        confidence = torch.sigmoid(4 * y[1])
        fov = 40.0 + 40.0 * float(torch.sigmoid(y[2].mean()))
        return depth, confidence, fov

    def predict(self, images):
        out = []
        for image in images:
            depth, confidence, fov = self._heads(image)
            out.append(Prediction(depth.cpu().numpy(), confidence.cpu().numpy(), fov))
        return out


class TinyDisparity(TinyDepth):
    """The same model read as relative disparity, without confidence or field of view."""

    output = "disparity"

    def predict(self, images):
        return [Prediction(p.raw) for p in super().predict(images)]


class NoPredict:
    output = "depth"

    @classmethod
    def load(cls, arg, *, device, dtype):
        return cls()

    def target_size(self, height, width):
        return height, width


class BadOutput(TinyDepth):
    output = "metres"
