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

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from pipelines.student.loader import DepthShards, LoaderConfig, mixed_batches
from pipelines.student.losses import affine_invariant_loss, cutmix_loss, feature_alignment_loss
from pipelines.student.model import from_dinov2, frozen_features, student_features
from pipelines.student.perturb import CutMix, StrongAugment

CHECKPOINT = "checkpoint"
# DINOv2 (and Depth Anything) see ImageNet-normalized RGB; the loader yields [0, 1].
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass(frozen=True)
class TrainConfig:
    labeled: tuple[str, ...]           # OUTPUTs with ground truth (source_kind gt) or any labels
    pseudo: tuple[str, ...]            # OUTPUTs of `depth-engine label`
    student: str | None                # save_pretrained DepthAnythingForDepthEstimation to fine-tune, or
    frozen: str | None                 # save_pretrained Dinov2Model, kept frozen (default: init)
    out: str                           # run directory: checkpoint/ and log.jsonl
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


class _Stream:
    """Endless samples of one dataset across epochs, counting what was consumed (for resume)."""

    def __init__(self, dataset: DepthShards, epoch: int = 0, consumed: int = 0):
        self.dataset, self.epoch, self.consumed = dataset, epoch, consumed

    def __iter__(self) -> Iterator[dict]:
        while True:
            self.dataset.set_epoch(self.epoch)
            self.dataset.load_state_dict({"epoch": self.epoch, "consumed": {"0": self.consumed}})
            got = False
            for sample in self.dataset:
                got = True
                self.consumed += 1
                yield sample
            if not got and self.consumed == 0:
                raise ValueError("a training OUTPUT has no sample that passes the filter")
            self.epoch, self.consumed = self.epoch + 1, 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}


def _save(run: Path, student, opt, sched, state: dict) -> None:
    from safetensors.torch import save_file

    tmp = run / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (student.module if hasattr(student, "module") else student).save_pretrained(tmp)
    tensors, meta = {}, {}
    for i, (pid, st) in enumerate(opt.state_dict()["state"].items()):
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
    meta["param_groups"] = opt.state_dict()["param_groups"]
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "optimizer": meta,
                                                          "scheduler": sched.state_dict()}, default=str))
    final = run / CHECKPOINT
    old = run / f"{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _restore(run: Path, opt, sched) -> dict | None:
    from safetensors.torch import load_file

    ck = run / CHECKPOINT
    if not (ck / "trainer_state.json").exists():
        return None
    state = json.loads((ck / "trainer_state.json").read_text())
    tensors = load_file(str(ck / "optimizer.safetensors"))
    opt_state: dict = {}
    for name, t in tensors.items():
        pid, key = name.split(".", 1)
        opt_state.setdefault(int(pid), {})[key] = t
    opt.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    sched.load_state_dict(state["scheduler"])
    return state


def train(cfg: TrainConfig) -> list[dict]:
    """Run (or resume) training; returns the per-step losses of this run. Under torchrun the
    process group is created here and destroyed on the way out: a gloo/NCCL group left to
    interpreter teardown can abort the process after the work is done."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    owns_group = world > 1 and not torch.distributed.is_initialized()
    if owns_group:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        return _train(cfg, rank, world)
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int) -> list[dict]:
    from tqdm import tqdm

    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    ck_student = run / CHECKPOINT
    resume = (ck_student / "trainer_state.json").exists()
    student, frozen = _load_models(cfg, device, checkpoint=str(ck_student) if resume else None)
    opt, sched = _optimizer(cfg, student)
    state = _restore(run, opt, sched) if resume else None
    start = state["step"] if state else 0
    # find_unused_parameters: DINOv2 keeps a mask token that depth estimation never uses.
    model = torch.nn.parallel.DistributedDataParallel(student, find_unused_parameters=True) if world > 1 else student

    def stream(outputs, key):
        ds = DepthShards(LoaderConfig(outputs=tuple(outputs), crop=cfg.crop, seed=cfg.seed), rank, world)
        per_rank = (state or {}).get("streams", [{}] * world)
        saved = (per_rank[rank] if rank < len(per_rank) else {}).get(key, {"epoch": 0, "consumed": 0})
        return _Stream(ds, saved["epoch"], saved["consumed"])

    streams = {"labeled": stream(cfg.labeled, "labeled"), "pseudo": stream(cfg.pseudo, "pseudo")}
    batches = mixed_batches(iter(streams["labeled"]), iter(streams["pseudo"]), cfg.batch_size, ratio=cfg.ratio)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + start + rank)
    history = []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress or rank != 0,
               unit="step")
    model.train()
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    with open(run / "log.jsonl", "a") as log:
        for step in bar:
            if step >= end:
                break
            batch = next(batches)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            losses = step_losses(model, frozen, batch, cfg, gen)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            opt.step()
            sched.step()
            row = {"step": step + 1, **{k: float(v.detach()) for k, v in losses.items()}}
            history.append(row)
            bar.set_postfix(lab=f"{row['labeled']:.3f}", unl=f"{row['unlabeled']:.3f}", feat=f"{row['feature']:.3f}")
            if rank == 0:
                log.write(json.dumps(row) + "\n")
            if (step + 1) % cfg.save_every == 0 or step + 1 in (cfg.steps, end):
                mine = {k: s.state() for k, s in streams.items()}
                everyone = [mine]
                if world > 1:                 # ranks read different shards: keep each one's place
                    everyone = [None] * world
                    torch.distributed.all_gather_object(everyone, mine)
                if rank == 0:
                    _save(run, student, opt, sched, {"step": step + 1, "streams": everyone,
                                                     "config": asdict(cfg)})
    return history
