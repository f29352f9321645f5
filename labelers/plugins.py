"""Teachers from outside transformers (Depth Anything 3, MoGe-2, UniDepth, a team's own model),
plugged in through a Python entry point, so that none of their dependencies enters ours.

A plugin is a class, registered by the package that ships it:

    # its pyproject.toml
    [project.entry-points."depth_engine.teachers"]
    da3 = "my_package.da3:DA3Teacher"

and named on the command line as ``--teacher plugin:NAME[:ARG]`` (ARG, e.g. a checkpoint path,
is the plugin's own business). The class has:

    output: str                          # what predict's raw maps hold: "disparity", "depth"
                                         #   (metres) or "inverse_depth" (1/m)
    @classmethod
    def load(cls, arg, *, device, dtype)  # on the worker, once: weights onto torch.device,
                                         #   dtype a torch.dtype (float32, or half on CUDA)
    def target_size(self, height, width) -> (h, w)   # images of one size share a predict call
    def predict(self, images) -> list[Prediction]     # labelers.prediction.Prediction per image,
                                         #   each at the image's own size
    @classmethod                         # optional: what identifies the weights (e.g. their
    def fingerprint(cls, arg) -> str     #   sha256); job.json pins it, every worker must agree

``images`` are uint8 HxWx3 RGB, numpy arrays (CPU) or torch tensors already on ``device``.
The driver imports the class and reads ``output`` (no weights are loaded there), so a plugin
that cannot be found or imported, or does not have this shape, is refused with one line
before any cluster time is spent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import import_module, metadata

import numpy as np

from labelers.normalize import TEACHER_OUTPUTS
from labelers.prediction import NoLabel, Prediction, checked

GROUP = "depth_engine.teachers"
PREFIX = "plugin:"
METHODS = ("load", "target_size", "predict")


class PluginError(ValueError):
    """A plugin that cannot be found, imported or used; the message says which and why."""


def is_plugin(source: str | None) -> bool:
    return bool(source) and source.startswith(PREFIX)


def parse(source: str) -> tuple[str, str | None]:
    """'plugin:NAME[:ARG]' -> (NAME, ARG or None); ARG may itself hold colons (s3://...)."""
    name, _, arg = source[len(PREFIX):].partition(":")
    if not name:
        raise PluginError(f"--teacher {source!r}: expected plugin:NAME[:ARG]")
    return name, arg or None


@dataclass(frozen=True)
class PluginRef:
    """A plugin found on this node: what job.json pins of it (``provenance``)."""

    source: str               # what the user gave: plugin:NAME[:ARG]
    name: str
    arg: str | None
    entry_point: str          # module:attr
    distribution: str | None  # the package that registers it, and its version
    version: str | None
    output: str
    sha256: str | None        # the plugin's fingerprint(arg), if it has one

    def provenance(self) -> dict:
        return {"source": self.source, "kind": "plugin", "entry_point": self.entry_point,
                "distribution": self.distribution, "version": self.version, "sha256": self.sha256}


def _entry_point(name: str) -> metadata.EntryPoint:
    found = {(ep.value, getattr(ep.dist, "name", None)): ep for ep in metadata.entry_points(group=GROUP)
             if ep.name == name}
    if not found:
        names = sorted({ep.name for ep in metadata.entry_points(group=GROUP)})
        raise PluginError(f"no teacher plugin named {name!r} (entry point group {GROUP!r}; installed: "
                          f"{', '.join(names) or 'none'})")
    if len(found) > 1:
        where = "; ".join(f"{value} from {dist}" for value, dist in sorted(found, key=str))
        raise PluginError(f"teacher plugin {name!r} is registered more than once ({where}); uninstall one")
    return next(iter(found.values()))


def _load_class(name: str, ep: metadata.EntryPoint):
    try:
        module, _, attr = ep.value.partition(":")
        cls = import_module(module.strip())
        for part in attr.strip().split(".") if attr else ():
            cls = getattr(cls, part)
    except Exception as e:  # noqa: BLE001 - any import-time failure of foreign code is the plugin's
        raise PluginError(f"teacher plugin {name!r} ({ep.value}) cannot be imported: "
                          f"{type(e).__name__}: {_last_line(e)}") from None
    missing = [m for m in METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise PluginError(f"teacher plugin {name!r} ({ep.value}) has no {', '.join(missing)}: "
                          f"a plugin class needs {', '.join(METHODS)} and output (see labelers/plugins.py)")
    output = getattr(cls, "output", None)
    if output not in TEACHER_OUTPUTS:
        raise PluginError(f"teacher plugin {name!r} ({ep.value}) declares output {output!r}; expected one of "
                          f"{', '.join(TEACHER_OUTPUTS)}")
    return cls


def _fingerprint(name: str, cls, arg: str | None) -> str | None:
    if not callable(getattr(cls, "fingerprint", None)):
        return None
    try:
        value = cls.fingerprint(arg)
    except Exception as e:  # noqa: BLE001
        raise PluginError(f"teacher plugin {name!r}: fingerprint({arg!r}) failed: "
                          f"{type(e).__name__}: {_last_line(e)}") from None
    return None if value is None else str(value)


def _last_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else ""


def _resolve(source: str) -> tuple[PluginRef, type]:
    name, arg = parse(source)
    ep = _entry_point(name)
    cls = _load_class(name, ep)
    dist = getattr(ep, "dist", None)
    ref = PluginRef(source, name, arg, ep.value, getattr(dist, "name", None), getattr(dist, "version", None),
                    cls.output, _fingerprint(name, cls, arg))
    return ref, cls


def find(source: str) -> PluginRef:
    """The plugin ``source`` names, checked on this node without loading weights."""
    return _resolve(source)[0]


@dataclass(frozen=True, eq=False)
class PluginTeacher:
    """A loaded plugin, with the engine's teacher interface (labelers.teacher.Teacher's): every
    result is checked, since a map of the wrong size would be stretched or cut silently later."""

    name: str
    output: str
    device: object
    dtype: object
    impl: object

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        h, w = self.impl.target_size(height, width)
        return int(h), int(w)

    def predict(self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]] | None = None) -> list[Prediction]:
        """The plugin's maps, checked at the image's size, then resized to ``sizes`` (the labels')."""
        out = list(self.impl.predict(list(images)))
        if len(out) != len(images):
            raise ValueError(f"teacher {self.name} returned {len(out)} results for {len(images)} images")
        out = [checked(p, int(im.shape[0]), int(im.shape[1]), self.name) for p, im in zip(out, images)]
        return out if sizes is None else [p if isinstance(p, NoLabel) else resized(p, size) for p, size in zip(out, sizes)]


def resized(prediction: Prediction, size: tuple[int, int]) -> Prediction:
    """A Prediction at the image's size taken to the label's (bilinear, antialiased)."""
    import torch

    from labelers.teacher import label_resize

    if prediction.raw.shape == tuple(size):
        return prediction

    def resize(a):
        return None if a is None else label_resize(torch.from_numpy(a)[None, None], size, "bilinear")[0, 0].numpy()

    return Prediction(resize(prediction.raw), resize(prediction.confidence), prediction.fov_deg)


def load(source: str, *, device: str = "cpu", dtype: str = "auto", sha256: str | None = None) -> PluginTeacher:
    """Load the plugin on a worker. ``sha256``: the fingerprint job.json pins (None: the plugin
    has none); a node whose plugin gives another one refuses to start."""
    from labelers.devices import resolve_device, resolve_dtype

    ref, cls = _resolve(source)
    if ref.sha256 != sha256:
        raise PluginError(f"teacher plugin {source} on this node has fingerprint {ref.sha256}, job.json pins "
                          f"{sha256}: the node has other weights or another version")
    dev = resolve_device(device)
    precision = resolve_dtype(dtype, dev)
    return PluginTeacher(source, ref.output, dev, precision, cls.load(ref.arg, device=dev, dtype=precision))
