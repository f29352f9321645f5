"""``bench --train``: the student trainer end to end beside its model step alone, in one run, with
the same model, batch size and recipe.

- end to end: ``train(cfg)``, the real loop: DataLoader workers reading and decoding the OUTPUTs'
  shards, crop and flip, strong augmentation, CutMix, the three losses, backward, clipping,
  AdamW. log.jsonl has no times, so whole runs of two lengths are timed: their difference over
  the difference in steps is the steady-state step, with start-up (model load, the first
  DataLoader, the final checkpoint) cancelled out.
- model step: the trainer's own optimizer step over batches that the same loader decoded
  beforehand and that are held in memory: the ceiling the loop can reach. Decoding those batches
  in this process is timed too: the loader's work per step, on one core.

The OUTPUTs are built here, as a user's would be: a labeled one from ground truth (convert-gt's
rule on synthetic metric depth, with holes) and a pseudo-labeled one by a random-weight teacher.
The student is the paper's (``--init dinov2``) on a random DINOv2 of ViT-S width with fewer
layers and a smaller crop, so that a CPU step takes about a second; the photos are scaled down
with the crop, so the loader resizes them by about what a 518 crop does to web photos.
"""
from __future__ import annotations

import io
import itertools
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TrainBench:
    hidden: int = 384              # ViT-S width and heads
    heads: int = 6
    layers: int = 4                # ViT-S has 12
    crop: int = 196                # the paper's is 518
    batch_size: int = 6            # labeled : pseudo = 1 : 2
    loader_workers: int = 2        # the trainer's default, per stream
    shards: int = 4                # per OUTPUT
    per_shard: int = 24
    sizes: tuple = ((240, 320), (320, 240), (288, 384), (256, 256))   # (H, W)
    short: int = 4                 # steps of the short and the long end-to-end runs
    long: int = 16


def train_figures(root: Path, bench: TrainBench = TrainBench(), repeats: int = 3) -> dict:
    from pipelines.student.train import TrainConfig

    outputs = build_outputs(root / "outputs", bench)
    init = save_encoder(root / "dinov2", bench)

    def config(out: str, steps: int) -> TrainConfig:
        return TrainConfig(labeled=(outputs["labeled"],), pseudo=(outputs["pseudo"],), student=None, frozen=None,
                           init=init, out=str(root / out), steps=steps, batch_size=bench.batch_size,
                           crop=bench.crop, save_every=steps, progress=False, loader_workers=bench.loader_workers)

    _timed_run(config("warm-up", 2))           # imports and first-call costs, in neither figure
    runs: dict[int, list[float]] = {bench.short: [], bench.long: []}
    for r in range(repeats):
        for steps in runs:
            runs[steps].append(_timed_run(config(f"run-{steps}-{r}", steps)))
    per_step = (statistics.median(runs[bench.long]) - statistics.median(runs[bench.short])) / (bench.long - bench.short)
    model, decode = model_step_seconds(config("model-only", bench.long), bench.long - bench.short, repeats)
    model_step = statistics.median(model)
    return {"bench": asdict(bench), "parameters_m": round(_parameters(config("-", 1)) / 1e6, 2),
            "end_to_end": {"steps_per_second": round(1 / per_step, 3), "seconds_per_step": round(per_step, 4),
                           "run_seconds": {str(k): [round(t, 2) for t in v] for k, v in runs.items()}},
            "model_step": {"steps_per_second": round(1 / model_step, 3), "seconds_per_step": round(model_step, 4),
                           "runs": [round(t, 4) for t in model]},
            "loader_seconds_per_batch": round(decode, 4), "ratio": round(model_step / per_step, 3)}


def _timed_run(cfg) -> float:
    from pipelines.student.train import train

    t0 = time.perf_counter()
    train(cfg)
    return time.perf_counter() - t0


def model_step_seconds(cfg, steps: int, repeats: int, held: int = 8) -> tuple[list[float], float]:
    """Seconds per step of the trainer's optimizer step alone (``repeats`` timings of ``steps``
    steps after two warm-up steps), on up to ``held`` batches decoded beforehand, cycled; and the
    seconds that decoding took per batch."""
    import torch

    from pipelines.student.loader import DepthShards, LoaderConfig, mixed_batches
    from pipelines.student.train import (
        _device,
        _load_models,
        _optimizer,
        _optimizer_step,
        train_dtype,
    )

    data = {name: DepthShards(LoaderConfig(outputs=outputs, crop=cfg.crop, seed=cfg.seed))
            for name, outputs in (("labeled", cfg.labeled), ("pseudo", cfg.pseudo))}
    t0 = time.perf_counter()
    batches = list(itertools.islice(mixed_batches(iter(data["labeled"]), iter(data["pseudo"]), cfg.batch_size,
                                                  ratio=cfg.ratio), held))
    decode = (time.perf_counter() - t0) / len(batches)
    device = _device()
    dtype = train_dtype(cfg.dtype, device)
    student, frozen = _load_models(cfg, device)
    opt, sched = _optimizer(replace(cfg, steps=10 ** 9), student)    # lr stays up: every step does the full work
    student.train()
    cycle = itertools.cycle(batches)

    def run(n: int) -> None:
        for step in range(n):
            _optimizer_step(cfg, student, frozen, opt, sched, cycle, data, device, dtype,
                            torch.Generator().manual_seed(step), 1)

    run(2)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(steps)
        out.append((time.perf_counter() - t0) / steps)
    return out, decode


def _parameters(cfg) -> int:
    from pipelines.student.model import from_dinov2

    return sum(p.numel() for p in from_dinov2(cfg.init).parameters())


def save_encoder(directory: Path, bench: TrainBench) -> str:
    """A random DINOv2 of the bench's size, saved as ``--init dinov2`` reads it."""
    from transformers import Dinov2Config, Dinov2Model

    if not (directory / "config.json").exists():
        Dinov2Model(Dinov2Config(hidden_size=bench.hidden, num_hidden_layers=bench.layers,
                                 num_attention_heads=bench.heads, intermediate_size=4 * bench.hidden,
                                 patch_size=14, image_size=bench.crop)).save_pretrained(directory)
    return str(directory)


def build_outputs(root: Path, bench: TrainBench) -> dict[str, str]:
    """A labeled OUTPUT (ground truth) and a pseudo-labeled one (a random tiny teacher), labeled in
    this process as the engine's workers label a shard."""
    from labelers.ground_truth import GroundTruthRule
    from labelers.random_models import save_random_teacher
    from labelers.teacher import Teacher
    from pipelines.pseudo_label import Labelers, label_shard
    from pipelines.tasks import ShardTask
    from storage.stores import open_store

    teacher = Teacher.load(str(save_random_teacher(root / "teacher", size="tiny", image_size=56)))
    labelers = {"labeled": Labelers(None, None, GroundTruthRule()), "pseudo": Labelers(teacher, None)}
    outputs = {}
    for kind, labeler in labelers.items():
        out = root / kind
        if not (out / "manifest").exists():
            store = open_store(str(out))
            for i in range(bench.shards):
                src = _input_shard(root / "inputs" / f"{kind}-{i:03d}.tar", bench, seed=100 * i,
                                   depth=kind == "labeled")
                label_shard(ShardTask(str(src), f"{kind}-{i:03d}"), labeler, store, batch_size=8, threads=2)
        outputs[kind] = str(out)
    return outputs


def _input_shard(path: Path, bench: TrainBench, seed: int, depth: bool) -> Path:
    """JPEG photos (engine.bench.synthetic scenes), with metric depth (``depth.npy``, 0 = no depth)
    when ``depth``."""
    import webdataset as wds

    from engine.bench.synthetic import jpeg, scene

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for i in range(bench.per_shard):
            h, w = bench.sizes[i % len(bench.sizes)]
            sample = {"__key__": f"{path.stem}-{i:05d}", "jpg": jpeg(scene(h, w, seed=seed + i))}
            if depth:
                sample["depth.npy"] = _npy(_depth(h, w, seed + i))
            sink.write(sample)
    return path


def _depth(h: int, w: int, seed: int) -> np.ndarray:
    """Metres: a ground plane rising to the horizon, a box in front, and a hole (no depth)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(1, 0.05, h, dtype=np.float32)[:, None]
    depth = np.broadcast_to(2.0 / y, (h, w)).copy()
    top, left = rng.integers(h // 4, h // 2), rng.integers(0, w // 2)
    depth[top:top + h // 4, left:left + w // 4] = 1.5
    depth[: h // 10, : w // 5] = 0.0
    return depth


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def print_train(r: dict) -> None:
    b = r["bench"]
    print(f"student: random DINOv2 {b['hidden']} wide, {b['layers']} layers + DPT head ({r['parameters_m']}M "
          f"parameters), crop {b['crop']}, batch {b['batch_size']}, {b['loader_workers']} loader workers per stream")
    e, m = r["end_to_end"], r["model_step"]
    print(f"trainer end to end: {e['steps_per_second']:.3f} steps/s ({e['seconds_per_step']:.3f} s/step; "
          f"runs of {b['short']} and {b['long']} steps: {e['run_seconds']})")
    print(f"model step alone:   {m['steps_per_second']:.3f} steps/s ({m['seconds_per_step']:.3f} s/step); "
          f"decoding a batch in one process: {r['loader_seconds_per_batch']:.3f} s")
    print(f"end to end / model step: {r['ratio']:.3f} (goal >= 0.9)")
