"""How fast one worker labels: a few real input images through ``label_shard`` itself, into
a scratch directory on the worker's own disk, timed after a warm-up.

The same flow as a real shard (decode and encode threads around the models, batching, the
tar writer and the commit), so the rate is what a label actor would reach, less the time
to read its input (the images are read once, beforehand) and the per-shard requests to
OUTPUT. Nothing here knows about Ray or OUTPUT: the engine runs it in a calibration actor.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

from pipelines.decode import SampleLimits
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.tasks import ShardTask
from storage.label_format import image_member
from storage.local import LocalStore
from storage.shards import TarShardWriter, iter_tar_samples
from storage.stores import locate


@dataclass(frozen=True)
class Calibration:
    images: int                  # samples labeled in the timed pass
    seconds: float               # its wall time (after the warm-up pass)
    warmup_seconds: float        # the first batch, labeled once before: first-call costs
    tar_bytes: int               # the label tar the timed pass wrote
    stage_seconds: dict = field(default_factory=dict)
    sources: tuple[str, ...] = ()   # the input shards the images came from

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_image(self) -> float:
        return self.tar_bytes / self.images if self.images else 0.0


def first_samples(sources: list[str], n: int, limits: SampleLimits) -> tuple[list[dict], list[str]]:
    """The first ``n`` samples with an image member, in order over ``sources`` (each read only
    as far as needed), and the sources they came from."""
    samples: list[dict] = []
    used: list[str] = []
    for source in sources:
        store, key = locate(source)
        with store.open_read(key) as stream:
            for s in iter_tar_samples(stream, max_member_bytes=limits.max_member_bytes,
                                   max_sample_bytes=limits.max_sample_bytes):
                if "__error__" not in s and image_member(s):
                    samples.append(s)
                    if source not in used:
                        used.append(source)
                    if len(samples) >= n:
                        return samples, used
    return samples, used


def calibrate(samples: list[dict], labelers: Labelers, *, batch_size: int, threads: int,
              limits: SampleLimits, sources: tuple[str, ...] = ()) -> Calibration:
    """Label ``samples`` twice through ``label_shard``: their first batch as a warm-up, then
    all of them, timed. Everything is written under a temporary directory, removed after."""
    scratch = tempfile.mkdtemp(prefix="depth-engine-calibrate-")
    try:
        out = LocalStore(os.path.join(scratch, "out"))
        warm = label_shard(ShardTask(_tar(scratch, "warmup", samples[:batch_size]), "warmup"), labelers, out,
                           batch_size=batch_size, threads=threads, limits=limits)
        timed = label_shard(ShardTask(_tar(scratch, "timed", samples), "timed"), labelers, out,
                            batch_size=batch_size, threads=threads, limits=limits)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Calibration(images=timed.samples, seconds=timed.seconds, warmup_seconds=warm.seconds,
                       tar_bytes=timed.tar_size, stage_seconds={k: round(v, 4) for k, v in timed.stage_seconds.items()},
                       sources=tuple(sources))


def _tar(directory: str, name: str, samples: list[dict]) -> str:
    path = os.path.join(directory, f"{name}.tar")
    with open(path, "wb") as f:
        writer = TarShardWriter(f)
        for i, s in enumerate(samples):   # keys of their own: two input shards may share one
            writer.add(f"s{i:06d}", {k: v for k, v in s.items() if not k.startswith("__")})
        writer.close()
    return path
