"""What ``bench`` holds the engine against, on the same models, images and resources:

- model-only: the same batches through the same models (``label_batch``), images decoded
  beforehand, nothing read or written: the ceiling for end-to-end throughput;
- a plain Ray Data pipeline: ``read_webdataset -> map_batches(actor) -> write_webdataset``
  doing the same decode, sky, teacher, normalize and encode: the obvious alternative;
- the naive loop: one image at a time through transformers' ``pipeline("depth-estimation")``
  and ``pipeline("image-segmentation")``: what one writes first.

Each returns images/s per repeat; model load and actor start are timed apart from them.
"""
from __future__ import annotations

import io
import statistics
import time
from pathlib import Path

import numpy as np
import ray

from engine.runtime.actors import WorkerSpec, load_labelers
from pipelines.concurrency import Bucketer
from pipelines.decode import decode, sample_from_members
from pipelines.encode import encode
from pipelines.pseudo_label import label_batch
from pipelines.sample import Sample
from storage.label_format import (
    DISP_MEMBER,
    JSON_MEMBER,
    SKY_MEMBER,
    disparity_png,
    mask_png,
)
from storage.shards import iter_tar_samples
from storage.stores import locate


def rates(images: int, seconds: list[float]) -> dict:
    """Median images/s of the repeats and their spread."""
    per = [images / s for s in seconds]
    return {"images_per_second": statistics.median(per), "min": min(per), "max": max(per),
            "runs": [round(r, 4) for r in per], "images": images}


def shard_members(shards: list[str]):
    """(shard URL, WebDataset sample dict) for every sample of the shards, in order."""
    for url in shards:
        store, key = locate(url)
        with store.open_read(key) as stream:
            for members in iter_tar_samples(stream):
                yield url, members


def read_images(shards: list[str]) -> list[np.ndarray]:
    """Every image of the shards, decoded as the engine decodes (the model-only input)."""
    samples = (decode(sample_from_members(members, url)) for url, members in shard_members(shards))
    return [s.image for s in samples if s.ok]


def model_flops(teacher: str, sky: str | None, size: tuple[int, int]) -> dict:
    """FLOPs of one forward pass of each model for one image of ``size`` (H, W), counted by
    torch's FlopCounterMode (matmuls, convolutions, attention): the compute a GPU must do per
    image, whatever the engine around it. Resizes and the sky fold are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from engine.bench.synthetic import scene
    from labelers.sky import SkySegmenter
    from labelers.teacher import Teacher

    image = scene(*size)
    t = Teacher.load(teacher)
    with FlopCounterMode(display=False) as counter:
        t.predict([image])
    out = {"image": f"{size[1]}x{size[0]}", "teacher_gflops": counter.get_total_flops() / 1e9,
           "teacher_input": "x".join(map(str, t.target_size(*size)[::-1]))}
    del t
    out["sky_gflops"], out["sky_input"] = 0.0, None
    if sky:
        s = SkySegmenter.load(sky)
        with FlopCounterMode(display=False) as counter:
            s.masks([image])
        out["sky_gflops"] = counter.get_total_flops() / 1e9
        out["sky_input"] = "x".join(map(str, s.preprocess.target_size(*size)[::-1]))
    out["total_gflops"] = out["teacher_gflops"] + out["sky_gflops"]
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class ModelPass:
    """Pre-decoded images through the models, batched as the engine batches them, timed."""

    def __init__(self, spec: WorkerSpec, images: list[np.ndarray]):
        t0 = time.perf_counter()
        self.labelers = load_labelers(spec)
        self.load_seconds = time.perf_counter() - t0
        self.spec, self.images = spec, images
        for batch in self._batches()[:2]:                 # warm-up: kernels, allocator, caches
            label_batch(batch, self.labelers)

    def _batches(self) -> list[list[Sample]]:
        samples = [Sample(key=str(i), source="", image=im, height=im.shape[0], width=im.shape[1])
                   for i, im in enumerate(self.images)]
        bucketer, out = Bucketer(self.spec.batch_size, key=self.labelers.batch_key), []
        for s in samples:
            out += bucketer.add(s)
        return out + bucketer.flush()

    def loaded(self) -> float:
        return round(self.load_seconds, 2)

    def seconds(self) -> float:
        todo = self._batches()
        _sync(self.labelers.teacher.device)
        t0 = time.perf_counter()
        for batch in todo:
            label_batch(batch, self.labelers)
        _sync(self.labelers.teacher.device)
        return time.perf_counter() - t0


def model_only(spec: WorkerSpec, images: list[np.ndarray], repeats: int) -> dict:
    """The models alone on pre-decoded images, in this process."""
    models = ModelPass(spec, images)
    return {**rates(len(images), [models.seconds() for _ in range(repeats)]),
            "model_load_seconds": round(models.load_seconds, 2)}


def model_only_parallel(spec: WorkerSpec, images: list[np.ndarray], processes: int, repeats: int) -> dict:
    """The models alone in ``processes`` Ray actors at once (one CPU each), each on its share
    of the images; a repeat lasts until the slowest one is done."""
    actor = ray.remote(num_cpus=1)(ModelPass)
    shares = [images[i::processes] for i in range(processes)]
    actors = [actor.remote(spec, share) for share in shares if share]
    try:
        load = max(ray.get([a.loaded.remote() for a in actors]))   # every model loaded and warm
        seconds = [max(ray.get([a.seconds.remote() for a in actors])) for _ in range(repeats)]
    finally:
        for a in actors:
            ray.kill(a)
    return {**rates(len(images), seconds), "model_load_seconds": load}


@ray.remote(num_cpus=0)
class Clock:
    """When the first Ray Data labeling actor had its models loaded (steady state starts)."""

    def __init__(self):
        self.first: float | None = None

    def ready(self, t: float) -> None:
        self.first = t if self.first is None else min(self.first, t)

    def get(self) -> float | None:
        return self.first


class RayDataLabeler:
    """The map_batches actor: the engine's own stages over each batch Ray Data hands it."""

    def __init__(self, spec: WorkerSpec, clock):
        self.labelers = load_labelers(spec)
        self.models = self.labelers.names
        ray.get(clock.ready.remote(time.time()))

    def __call__(self, batch: dict) -> dict:
        samples = [decode(Sample(key=k, source=u, image_ext="jpg", image_bytes=b))
                   for k, u, b in zip(batch["__key__"], batch["__url__"], batch["jpg"])]
        ok = [s for s in samples if s.ok]
        if ok:
            label_batch(ok, self.labelers)
        encoded = [encode(s, self.models) for s in samples if s.ok]
        columns = ("jpg", DISP_MEMBER, SKY_MEMBER, JSON_MEMBER) if self.labelers.sky else ("jpg", DISP_MEMBER, JSON_MEMBER)
        out = {"__key__": np.array([e.key for e in encoded], dtype=object)}
        for c in columns:
            out[c] = np.array([e.members[c] for e in encoded], dtype=object)
        return out


def ray_data_pipeline(spec: WorkerSpec, shards: list[str], out_dir: Path, actors: int, actor_options: dict,
                      repeats: int) -> dict:
    """read_webdataset -> map_batches(RayDataLabeler) -> write_webdataset, timed from the first
    actor with loaded models to the last shard written."""
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    seconds, startup, images = [], [], 0
    for r in range(repeats):
        clock = Clock.remote()
        ds = ray.data.read_webdataset(shards, decoder=None, include_paths=False).map_batches(
            RayDataLabeler, fn_constructor_kwargs={"spec": spec, "clock": clock}, batch_size=spec.batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors), batch_format="numpy", **actor_options)
        t0 = time.time()
        ds.write_webdataset(str(out_dir / f"run-{r}"), encoder=None)   # members are bytes already
        end = time.time()
        first = ray.get(clock.get.remote()) or t0
        seconds.append(end - first)
        startup.append(first - t0)
        ray.kill(clock)
        images = sum(len(_tar_keys(p)) for p in (out_dir / f"run-{r}").glob("*.tar"))
    return {**rates(images, seconds), "startup_seconds": round(statistics.median(startup), 2)}


def _tar_keys(path: Path) -> set[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name.split(".", 1)[0] for m in tar.getmembers()}


def naive_loop(teacher: str, sky: str | None, shards: list[str], out_dir: Path, device: str, repeats: int) -> dict:
    """One image at a time through transformers' pipelines, written with webdataset's TarWriter."""
    import webdataset as wds
    from PIL import Image
    from transformers import pipeline

    from labelers.normalize import normalize_disparity

    t0 = time.perf_counter()
    depth = pipeline("depth-estimation", model=teacher, device=device)
    seg = pipeline("image-segmentation", model=sky, device=device) if sky else None
    load = time.perf_counter() - t0
    samples = [(m["__key__"], m["jpg"]) for _, m in shard_members(shards)]

    def label_one(data: bytes) -> dict:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        raw = depth(image)["predicted_depth"].float().cpu().numpy()
        sky_mask = None
        if seg is not None:
            found = [np.asarray(s["mask"]) > 0 for s in seg(image) if s["label"].strip().lower() == "sky"]
            sky_mask = np.logical_or.reduce(found) if found else np.zeros(raw.shape, bool)
        label = normalize_disparity(raw, sky_mask)
        members = {DISP_MEMBER: disparity_png(label.disparity)}
        if sky_mask is not None:
            members[SKY_MEMBER] = mask_png(sky_mask)
        return members

    label_one(samples[0][1])                      # warm-up
    seconds = []
    for r in range(repeats):
        t0 = time.perf_counter()
        with wds.TarWriter(str(out_dir / f"naive-{r}.tar")) as sink:
            for key, data in samples:
                sink.write({"__key__": key, "jpg": data, **label_one(data)})
        seconds.append(time.perf_counter() - t0)
    return {**rates(len(samples), seconds), "model_load_seconds": round(load, 2)}
