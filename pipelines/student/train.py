"""The reference student training loop of Depth Anything, on depth-engine's output.

Batches mix labeled and pseudo-labeled samples (1:2). The pseudo-labeled images get strong
perturbations and CutMix: they are the student's input only, and the labels come from
clean images. The loss is the mean of three terms:
- the labeled affine-invariant loss;
- the CutMix loss on pseudo-labels;
- feature alignment to a frozen DINOv2 (tolerance alpha), on like features: the student's encoder
  output after the encoder's final norm, patch tokens only (pipelines.student.model).

The student is built as the paper builds it (``init``: a DINOv2 encoder, a fresh DPT head) or
taken from a checkpoint (``student``). Encoder lr is 5e-6 and decoder lr 10x that, AdamW with
linear decay; Depth Anything V2's trim drops the largest 10 % of each pseudo-labeled image's
pixel losses (labeled images keep all theirs). Checkpoints are
safetensors (weights and optimizer state) plus a JSON trainer state, written atomically. A
run that finds a checkpoint in its directory resumes from it. Under ``torchrun`` every rank
reads its own share of the shards and gradients are averaged with DDP.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from labelers.devices import autocast, resolve_dtype
from pipelines.student import checkpoint
from pipelines.student.errors import TrainSetupError
from pipelines.student.feeding import Stream, check_split
from pipelines.student.loader import DepthShards, LoaderConfig, mixed_batches
from pipelines.student.losses import (
    affine_invariant_loss,
    cutmix_loss,
    feature_alignment_loss,
)
from pipelines.student.model import (
    MEAN,
    STD,
    from_dinov2,
    frozen_features,
    student_features,
)
from pipelines.student.perturb import CutMix, StrongAugment
from pipelines.student.runlog import RunLog
from storage.stores import open_store


@dataclass(frozen=True)
class TrainConfig:
    labeled: tuple[str, ...]           # OUTPUTs with ground truth (source_kind gt) or any labels
    pseudo: tuple[str, ...]            # OUTPUTs of `depth-engine label`
    student: str | None                # save_pretrained DepthAnythingForDepthEstimation to fine-tune, or
    frozen: str | None                 # save_pretrained Dinov2Model, kept frozen (default: init)
    out: str                           # run directory or s3:// prefix: checkpoints, latest.json, log.jsonl
    steps: int = 1000
    batch_size: int = 6                # labeled : pseudo = 1 : 2 inside each batch
    crop: int = 518
    lr: float = 5e-6                   # encoder; the decoder gets decoder_lr_factor x this
    decoder_lr_factor: float = 10.0
    alpha: float = 0.85                # feature alignment: positions with cos above it are left out
    trim: float = 0.1                  # pseudo-labeled images: share of largest pixel losses dropped (V2)
    cutmix_p: float = 0.5              # probability that a batch's pseudo-labeled images are CutMixed
    init: str | None = None            # save_pretrained Dinov2Model: the paper's student (its encoder,
                                       # a fresh DPT head); exclusive with student
    save_every: int = 100
    stop_after: int | None = None      # run at most this many steps now (a preemptible slot)
    seed: int = 0
    progress: bool = True
    ratio: tuple[int, int] = field(default=(1, 2))
    # feeding, validation, checkpoints
    loader_workers: int = 2            # DataLoader worker processes per stream (labeled, pseudo); 0: in-process
    dtype: str = "auto"                # autocast: auto = bf16 on CUDA, fp32 on CPU
    clip_grad: float = 1.0             # max global gradient norm; 0: no clipping
    accum: int = 1                     # micro-batches (of batch_size) per optimizer step; steps count these
    val: str | None = None             # convert-gt OUTPUT the student is scored on (rank 0)
    val_every: int | None = None       # validate every N steps and at the last; None: every save_every
    exclude: tuple[str, ...] = ()      # Parquet files (PATH or PATH:COLUMN) of (shard, key) rows left out of the
                                       # pseudo-labeled OUTPUTs (pipelines.student.exclude); --labeled keeps all

    def __post_init__(self):
        if not self.labeled or not self.pseudo:
            raise ValueError("train-student needs at least one labeled and one pseudo-labeled OUTPUT")
        if self.steps < 1 or self.batch_size < sum(self.ratio):
            raise ValueError(f"steps must be >= 1 and batch size >= {sum(self.ratio)}")
        if (self.student is None) == (self.init is None):
            raise ValueError("train-student starts from a DINOv2 encoder (--init dinov2 DIR) or from a "
                             "student checkpoint (--student DIR), exactly one of them")
        if self.frozen is None and self.init is None:
            raise ValueError("--frozen DIR (the DINOv2 to align to) is needed with --student")
        if not 0 <= self.trim < 1 or not 0 <= self.cutmix_p <= 1 or not -1 <= self.alpha <= 1:
            raise ValueError(f"need 0 <= trim < 1, 0 <= cutmix_p <= 1 and -1 <= alpha <= 1, "
                             f"got {self.trim}, {self.cutmix_p}, {self.alpha}")
        if self.loader_workers < 0 or self.accum < 1 or self.clip_grad < 0 or (self.val_every or 1) < 1:
            raise ValueError(f"need --loader-workers >= 0, --accum >= 1, --clip-grad >= 0 and --val-every >= 1, "
                             f"got {self.loader_workers}, {self.accum}, {self.clip_grad}, {self.val_every}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--dtype must be auto, fp32 or bf16, got {self.dtype!r}")


def _load_models(cfg: TrainConfig, device, checkpoint: str | None = None):
    """(student, frozen DINOv2) on ``device``: the student from the run's own ``checkpoint`` (a
    resume), else from ``cfg.student``, else built from ``cfg.init``; the frozen encoder defaults
    to ``cfg.init``."""
    import transformers
    from transformers import DepthAnythingForDepthEstimation, Dinov2Model

    transformers.logging.set_verbosity_error()
    if checkpoint or cfg.student:
        student = DepthAnythingForDepthEstimation.from_pretrained(checkpoint or cfg.student, use_safetensors=True)
    else:
        student = from_dinov2(cfg.init, seed=cfg.seed)
    student = student.float().to(device)
    frozen = Dinov2Model.from_pretrained(cfg.frozen or cfg.init, use_safetensors=True).float().eval().to(device)
    for p in frozen.parameters():
        p.requires_grad_(False)
    hs, hf = student.config.backbone_config.hidden_size, frozen.config.hidden_size
    if hs != hf:
        raise ValueError(f"the student's encoder width ({hs}) differs from the frozen DINOv2's ({hf})")
    return student, frozen


def _optimizer(cfg: TrainConfig, student):
    encoder = [p for n, p in student.named_parameters() if n.startswith("backbone.")]
    decoder = [p for n, p in student.named_parameters() if not n.startswith("backbone.")]
    opt = torch.optim.AdamW([{"params": encoder, "lr": cfg.lr},
                             {"params": decoder, "lr": cfg.lr * cfg.decoder_lr_factor}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / cfg.steps))
    return opt, sched


def step_losses(student, frozen, batch: dict, cfg: TrainConfig, gen: torch.Generator) -> dict:
    """The three losses of one mixed batch (tensors with grad)."""
    pseudo = batch["pseudo"]
    img, disp, valid = batch["image"], batch["disparity"], batch["valid"]
    lab, unl = ~pseudo, pseudo
    augment, cutmix = StrongAugment(), CutMix(p=cfg.cutmix_p)
    u = torch.stack([augment(x, gen) for x in img[unl]]) if unl.any() else img[unl]
    mixed = cutmix(u, gen)
    inputs = (torch.cat([img[lab], mixed.images]) - MEAN.to(img.device)) / STD.to(img.device)
    out = student(pixel_values=inputs, output_hidden_states=True)
    pred = out.predicted_depth
    n_lab = int(lab.sum())
    l_lab = affine_invariant_loss(pred[:n_lab], disp[lab], valid[lab])     # ground truth: no trim
    d_u, v_u = disp[unl], valid[unl]
    label_b, valid_b = d_u[mixed.partner], v_u[mixed.partner]
    l_unl = cutmix_loss(pred[n_lab:], d_u, label_b, mixed.mask, torch.where(mixed.mask, v_u, valid_b), trim=cfg.trim)
    l_feat = feature_alignment_loss(student_features(student, out.hidden_states), frozen_features(frozen, inputs),
                                    alpha=cfg.alpha)
    return {"labeled": l_lab, "unlabeled": l_unl, "feature": l_feat,
            "total": (l_lab + l_unl + l_feat) / 3}


def train_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of --dtype, resolved as the labelers resolve theirs (bf16 on a CPU is
    refused). auto on a GPU without bf16 trains in fp32: fp16 would need loss scaling. Resolved
    where training runs: a Ray driver without a GPU may start workers that have one."""
    try:
        dtype = resolve_dtype(name, device)
    except ValueError as e:
        raise TrainSetupError(f"train-student: {e}") from None
    return torch.float32 if dtype == torch.float16 else dtype


def _device() -> torch.device:
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")


def _step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The perturbations' RNG of one optimizer step, a function of the step: a resumed run draws
    what an uninterrupted one would."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def train(cfg: TrainConfig) -> list[dict]:
    """Run (or resume) training; returns the per-step rows of this run. The data split and the
    validation OUTPUT are checked first, by every rank alike, so a run that cannot go on fails
    before any rank waits for another. Under torchrun the process group is created here and
    destroyed on the way out: a gloo/NCCL group left to interpreter teardown can abort the
    process after the work is done."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = _device()
    dtype = train_dtype(cfg.dtype, device)
    data = {name: DepthShards(LoaderConfig(outputs=tuple(outputs), crop=cfg.crop, seed=cfg.seed, exclude=exclude),
                              rank, world)
            for name, outputs, exclude in (("labeled", cfg.labeled, ()), ("pseudo", cfg.pseudo, cfg.exclude))}
    check_split(data["labeled"], "labeled")
    check_split(data["pseudo"], "pseudo-labeled")
    val = None
    if cfg.val:
        from pipelines.student.validate import open_val

        val = open_val(cfg.val)
    owns_group = world > 1 and not torch.distributed.is_initialized()
    if owns_group:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        return _train(cfg, rank, world, device, dtype, data, val)
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device, dtype: torch.dtype,
           data: dict[str, DepthShards], val) -> list[dict]:
    from tqdm import tqdm

    store = open_store(cfg.out)
    pointer = checkpoint.latest(store)
    with tempfile.TemporaryDirectory(prefix="depth-engine-resume-") as tmp:   # an S3 checkpoint lands here
        where = checkpoint.fetch(store, pointer.checkpoint, Path(tmp)) if pointer else None
        student, frozen = _load_models(cfg, device, checkpoint=str(where) if where else None)
        opt, sched = _optimizer(cfg, student)
        state = checkpoint.restore(where, opt, sched) if where else None
    start = state["step"] if state else 0
    saved = (state or {}).get("streams", [])
    if saved and len(saved) != world:
        raise TrainSetupError(f"train-student: the checkpoint in {cfg.out} was written by {len(saved)} rank(s), "
                              f"this run has {world}: resume with as many")
    streams = {name: Stream(ds, name, workers=cfg.loader_workers, per_batch=cfg.batch_size,
                            pin_memory=device.type == "cuda", state=saved[rank][name] if saved else None)
               for name, ds in data.items()}
    # find_unused_parameters: DINOv2 keeps a mask token that depth estimation never uses.
    model = torch.nn.parallel.DistributedDataParallel(student, find_unused_parameters=True) if world > 1 else student
    feeds = [iter(streams["labeled"]), iter(streams["pseudo"])]
    batches = mixed_batches(*feeds, cfg.batch_size, ratio=cfg.ratio)
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    val_every = cfg.val_every or cfg.save_every
    history, shown = [], {}
    log = RunLog(store, start) if rank == 0 else None
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress or rank != 0, unit="step")
    model.train()
    try:
        for step in range(start + 1, end + 1):       # the optimizer step this iteration makes
            row = {"step": step, **_optimizer_step(cfg, model, frozen, opt, sched, batches, data, device, dtype,
                                                   _step_generator(cfg.seed, step, rank), world)}
            history.append(row)
            validating = val is not None and (step % val_every == 0 or step == cfg.steps)
            result = None
            if validating and rank == 0:           # the other ranks go on to the gather below and wait
                from pipelines.student.validate import validate

                result = validate(student, val, cfg.crop, cfg.batch_size, device, dtype)
                shown["val"] = f"{result['abs_rel']:.4f}" if result["abs_rel"] is not None else "-"
            if log:
                log.write(row)
                if result:
                    log.write({"step": step, "val": result})
            shown.update(lab=f"{row['labeled']:.3f}", unl=f"{row['unlabeled']:.3f}", feat=f"{row['feature']:.3f}")
            bar.set_postfix(shown, refresh=False)
            bar.update()
            if step % cfg.save_every == 0 or step in (cfg.steps, end) or validating:
                mine = {name: ds.state_dict() for name, ds in data.items()}
                everyone = [mine]
                if world > 1:                 # ranks read different shards: keep each one's place
                    everyone = [None] * world
                    torch.distributed.all_gather_object(everyone, mine)
                if rank == 0:
                    log.sync()                # first: rows past the checkpoint are dropped on resume
                    pointer = checkpoint.advance(pointer, step, result["abs_rel"] if result else None)
                    checkpoint.save(store, pointer, student, opt, sched,
                                    {"step": step, "streams": everyone, "config": asdict(cfg)})
    finally:
        for feed in feeds:                    # stops the DataLoader workers now, not at exit
            feed.close()
        bar.close()
        if log:
            log.close()
    return history


def _optimizer_step(cfg: TrainConfig, model, frozen, opt, sched, batches, data: dict[str, DepthShards], device,
                    dtype, gen: torch.Generator, world: int) -> dict:
    """One optimizer step over cfg.accum micro-batches: their mean losses, the lr used and, with
    clipping, the gradient norm before it. Each micro-batch's samples are marked consumed."""
    losses = []
    for micro in range(cfg.accum):
        batch = next(batches)
        on_device = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        last = micro == cfg.accum - 1
        with model.no_sync() if world > 1 and not last else contextlib.nullcontext():  # one all-reduce a step
            with autocast(device, dtype):
                out = step_losses(model, frozen, on_device, cfg, gen)
            (out["total"] / cfg.accum).backward()
        data["labeled"].mark_consumed(batch, where=~batch["pseudo"])
        data["pseudo"].mark_consumed(batch, where=batch["pseudo"])
        losses.append(torch.stack([out[k].detach().float() for k in sorted(out)]))
    row = dict(zip(sorted(out), torch.stack(losses).mean(0).tolist()))   # one device sync per step
    row["lr"] = opt.param_groups[0]["lr"]
    if cfg.clip_grad:
        row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return row
