"""The trainer's feeding, precision, validation and checkpoints, on CPU with tiny models: DataLoader
workers resume exactly, accumulation equals one big batch, a split that leaves a rank without a
shard is refused on every rank, validation scores as `evaluate` does, and a run checkpoints to S3
and resumes from S3 alone."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from builders import write_shard
from scenes import npy, png, render, with_invalid

import pipelines.student.train as train_module
from labelers.ground_truth import GroundTruthRule
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.student import checkpoint
from pipelines.student.train import TrainConfig, train
from pipelines.tasks import ShardTask
from storage.stores import open_store

VAL_MAX_DEPTH = 6.0   # the val OUTPUT's --max-depth: the far part of each plane is invalid


def convert(tmp, name: str, shards: int, per_shard: int, seed: int) -> str:
    """A convert-gt OUTPUT of analytic scenes (no model needed), with holes in the depth."""
    out = open_store(str(tmp / name))
    for i in range(shards):
        samples = []
        for j in range(per_shard):
            h, w = [(70, 90), (90, 70), (80, 80)][j % 3]
            image, depth = render(h, w, seed=seed + 10 * i + j)
            samples.append({"__key__": f"{name}{i}-{j:02d}", "png": png(image), "depth.npy": npy(with_invalid(depth))})
        src = write_shard(tmp / f"{name}-{i}.tar", samples)
        label_shard(ShardTask(src, f"{name}-{i}"), Labelers(None, None, GroundTruthRule()), out, batch_size=4, threads=2)
    return str(tmp / name)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import transformers
    from transformers import Dinov2Config, Dinov2Model

    from labelers.random_models import save_random_teacher

    transformers.logging.set_verbosity_error()
    tmp = tmp_path_factory.mktemp("feeding")
    outs = {"labeled": convert(tmp, "labeled", 3, 6, 0),
            "pseudo": convert(tmp, "pseudo", 3, 5, 100),     # 15 a epoch: a batch of 2 straddles epochs
            "one": convert(tmp, "one", 1, 3, 200),
            "val": convert(tmp, "val", 1, 3, 300)}
    (tmp / "val" / "job.json").write_text(json.dumps({"label": {"ground_truth": {"scale": 1.0,
                                                                                 "max_depth": VAL_MAX_DEPTH}}}))
    student = save_random_teacher(tmp / "student", size="tiny", image_size=56, seed=3)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=56)).save_pretrained(tmp / "frozen")
    return tmp, outs, str(student), str(tmp / "frozen")


def cfg(setup, out: str, **kw) -> TrainConfig:
    tmp, outs, student, frozen = setup
    base = dict(labeled=(outs["labeled"],), pseudo=(outs["pseudo"],), student=student, frozen=frozen,
                out=out if out.startswith("s3://") else str(tmp / out), steps=10, batch_size=3, crop=56, lr=1e-3,
                save_every=5, progress=False, loader_workers=2)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def batches_seen(monkeypatch) -> list:
    """(key, epoch) of every sample of every micro-batch the trainer takes."""
    seen = []
    real = train_module.mixed_batches

    def spy(*args, **kw):
        for batch in real(*args, **kw):
            seen.append(list(zip(batch["key"], batch["epoch"].tolist())))
            yield batch

    monkeypatch.setattr(train_module, "mixed_batches", spy)
    return seen


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in open(path).read().splitlines()]


def test_dataloader_workers_resume_on_the_very_batches_of_an_uninterrupted_run(setup, batches_seen):
    whole = train(cfg(setup, "whole"))
    uninterrupted = list(batches_seen)
    batches_seen.clear()
    parts = [train(cfg(setup, "parts", stop_after=3))]
    state = json.loads((setup[0] / "parts" / "checkpoint" / "trainer_state.json").read_text())["streams"][0]
    assert state["labeled"]["consumed"] == {"0": 2, "1": 1}        # worker 1 is next, not worker 0
    parts += [train(cfg(setup, "parts", stop_after=5)), train(cfg(setup, "parts"))]
    assert [[r["step"] for r in p] for p in parts] == [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
    assert batches_seen == uninterrupted and len(uninterrupted) == 10
    assert any(len({e for _, e in b}) == 2 for b in uninterrupted)   # a batch straddles two epochs
    rerun = [r for p in parts for r in p]
    for a, b in zip(whole, rerun):   # same data, same perturbations, same optimizer state: same losses
        assert a["total"] == pytest.approx(b["total"], rel=1e-4)
    assert [r["step"] for r in read_log(setup[0] / "parts" / "log.jsonl")] == list(range(1, 11))


def test_accumulating_two_batches_of_three_equals_one_batch_of_six(setup, monkeypatch, batches_seen):
    from safetensors.torch import load_file

    def per_sample_loss(student, frozen, batch, cfg, gen):   # no term couples the samples of a batch
        loss = ((student(pixel_values=batch["image"]).predicted_depth - batch["disparity"]) ** 2).mean()
        zero = loss.detach() * 0
        return {"labeled": zero, "unlabeled": zero, "feature": zero, "total": loss}

    monkeypatch.setattr(train_module, "step_losses", per_sample_loss)
    big = train(cfg(setup, "big", steps=1, batch_size=6, loader_workers=0))
    small = train(cfg(setup, "small", steps=1, batch_size=3, accum=2, loader_workers=0))
    assert sorted(batches_seen[0]) == sorted(batches_seen[1] + batches_seen[2])   # the same six samples
    assert len(small) == 1 and small[0]["total"] == pytest.approx(big[0]["total"], rel=1e-5)
    assert small[0]["grad_norm"] == pytest.approx(big[0]["grad_norm"], rel=1e-4)
    a, b = (load_file(str(setup[0] / run / "checkpoint" / "model.safetensors")) for run in ("big", "small"))
    # One AdamW step moves each weight by about lr * sign(gradient): equal runs agree to float noise,
    # except a rare weight whose gradient is ~0, where the noise decides; a second step moves all.
    moved_apart = sum(int(((a[k] - b[k]).abs() > 1e-4).sum()) for k in a)
    assert moved_apart <= 1e-4 * sum(v.numel() for v in a.values())
    state = json.loads((setup[0] / "small" / "checkpoint" / "trainer_state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 1                      # the lr schedule counts optimizer steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 autocast is refused only where there is no CUDA")
def test_bf16_without_cuda_is_one_line_and_exit_2(setup, tmp_path, capsys):
    from engine.cli import main

    tmp, outs, student, frozen = setup
    code = main(["train-student", "--labeled", outs["labeled"], "--pseudo", outs["pseudo"], "--student", student,
                 "--frozen", frozen, "--out", str(tmp_path / "run"), "--dtype", "bf16"])
    assert code == 2 and capsys.readouterr().err == \
        "depth-engine: train-student: --dtype bf16 needs a CUDA device; the CPU path runs in fp32\n"


def test_a_split_without_a_shard_for_every_rank_is_refused_on_every_rank(setup, tmp_path):
    """Every rank says why and exits 2 in seconds: none reaches a collective op to wait in."""
    from conftest import _free_port

    tmp, outs, student, frozen = setup
    command = ["-m", "engine", "train-student", "--labeled", outs["labeled"], "--pseudo", outs["one"],
               "--student", student, "--frozen", frozen, "--out", str(tmp_path / "run"), "--crop", "56"]
    line = ("depth-engine: train-student: 2 ranks but the pseudo-labeled OUTPUTs hold 1 shard with samples to "
            "train on: every rank needs at least one (use fewer ranks or more shards)\n")
    # Each rank alone, as torchrun starts it: one that reached the process group would wait for its
    # missing peer (30 min) instead of exiting.
    ranks = [subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
             for r in range(2)]
    try:
        assert [(p.communicate(timeout=60)[1], p.returncode) for p in ranks] == [(line, 2), (line, 2)]
    finally:
        for p in ranks:
            p.kill()
    # Under torchrun, which stops the other rank once one has failed.
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--log-dir",
                        str(tmp_path / "logs"), "--redirects", "3", *command], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and time.monotonic() - t0 < 60 and "exitcode  : 2" in p.stderr
    assert {e.read_text() for e in tmp_path.glob("logs/**/stderr.log")} <= {line, ""}
    assert not (tmp_path / "run").exists()


def independent_val_scores(model_dir, val_output: str, crop: int) -> list[tuple[float, float]]:
    """(AbsRel, δ1) per val sample, computed apart from the engine: tarfile, PIL and numpy, the
    documented protocol (centre square, least-squares scale and shift in disparity over valid
    pixels, floored at 1 / max depth, metrics in depth)."""
    import torch.nn.functional as F
    from PIL import Image
    from transformers import DepthAnythingForDepthEstimation

    model = DepthAnythingForDepthEstimation.from_pretrained(model_dir, use_safetensors=True).eval()
    out = []
    with tarfile.open(os.path.join(val_output, "shards", "val-0.tar")) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for key in sorted({n.split(".", 1)[0] for n in members}):
        image = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB"))
        depth = np.load(io.BytesIO(members[f"{key}.depth.npy"]))
        h, w = depth.shape
        s = min(h, w)
        rows, cols = slice((h - s) // 2, (h - s) // 2 + s), slice((w - s) // 2, (w - s) // 2 + s)
        x = np.asarray(Image.fromarray(image[rows, cols]).resize((crop, crop), Image.BICUBIC), np.float32) / 255
        x = (torch.from_numpy(x).permute(2, 0, 1)[None] - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
            / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        with torch.no_grad():
            pred = model(pixel_values=x).predicted_depth[None]
        pred = F.interpolate(pred, size=(s, s), mode="bilinear", align_corners=False)[0, 0].double().numpy()
        t = depth[rows, cols]
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(t) & (t > 0) & (t <= VAL_MAX_DEPTH)
        gt = 1 / t[ok]
        (scale, shift), *_ = np.linalg.lstsq(np.stack([pred[ok], np.ones(ok.sum())], 1), gt, rcond=None)
        d_pred, d_gt = 1 / np.maximum(scale * pred[ok] + shift, 1 / VAL_MAX_DEPTH), t[ok]
        ratio = np.maximum(d_pred / d_gt, d_gt / d_pred)
        out.append((float(np.mean(np.abs(d_pred - d_gt) / d_gt)), float(np.mean(ratio < 1.25))))
    return out


def test_validation_scores_like_evaluate_and_keeps_the_best_checkpoint(setup):
    from transformers import DepthAnythingForDepthEstimation

    from pipelines.student.errors import TrainSetupError

    tmp, outs, _, _ = setup
    train(cfg(setup, "val-run", steps=4, save_every=4, val=outs["val"], val_every=2, loader_workers=0))
    rows = [r for r in read_log(tmp / "val-run" / "log.jsonl") if "val" in r]
    assert [r["step"] for r in rows] == [2, 4] and all(r["val"]["samples"] == 3 for r in rows)
    mine = independent_val_scores(tmp / "val-run" / "checkpoint", outs["val"], 56)   # the step-4 weights
    assert rows[-1]["val"]["abs_rel"] == pytest.approx(np.mean([a for a, _ in mine]), rel=1e-4)
    assert rows[-1]["val"]["delta1"] == pytest.approx(np.mean([d for _, d in mine]), abs=1e-6)
    pointer = checkpoint.latest(open_store(str(tmp / "val-run")))
    best = min(rows, key=lambda r: r["val"]["abs_rel"])
    assert pointer.best == checkpoint.step_dir(best["step"]) and pointer.best_abs_rel == best["val"]["abs_rel"]
    assert os.readlink(tmp / "val-run" / "best") == pointer.best
    DepthAnythingForDepthEstimation.from_pretrained(tmp / "val-run" / "best", use_safetensors=True)
    assert sorted(p.name for p in (tmp / "val-run").glob("checkpoint-*")) == sorted({pointer.checkpoint, pointer.best})

    shutil.copytree(outs["val"], tmp / "pseudo-val")
    (tmp / "pseudo-val" / "job.json").write_text(json.dumps({"label": {"teacher": {}}}))
    with pytest.raises(TrainSetupError, match="holds pseudo-labels"):
        train(cfg(setup, "never", val=str(tmp / "pseudo-val")))


def test_checkpoints_on_s3_resume_from_s3_alone_and_are_never_half_written(setup, s3_bucket, monkeypatch, tmp_path):
    from transformers import DepthAnythingForDepthEstimation

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))        # every local temp of the trainer lands here
    url = f"s3://{s3_bucket}/runs/a/"
    store = open_store(url)
    first = train(cfg(setup, url, steps=6, save_every=2, stop_after=3, loader_workers=0))
    assert [r["step"] for r in first] == [1, 2, 3] and checkpoint.latest(store).step == 3
    assert {i.key.split("/")[0] for i in store.list()} == {"checkpoint-00000003", "latest.json", "log.jsonl"}

    real_upload = checkpoint._upload

    def dies_after_the_first_file(store, path, key):
        if not key.endswith("config.json"):
            raise OSError("preempted")
        real_upload(store, path, key)

    monkeypatch.setattr(checkpoint, "_upload", dies_after_the_first_file)
    with pytest.raises(OSError, match="preempted"):
        train(cfg(setup, url, steps=6, save_every=2, loader_workers=0))            # dies saving step 4
    assert checkpoint.latest(store).step == 3                                       # the pointer never moved
    monkeypatch.setattr(checkpoint, "_upload", real_upload)
    assert os.listdir(tmp_path) == []                                              # nothing local is left

    rest = train(cfg(setup, url, steps=6, save_every=2, loader_workers=0))
    assert [r["step"] for r in rest] == [4, 5, 6]
    assert [json.loads(line)["step"] for line in store.get("log.jsonl").decode().splitlines()] == list(range(1, 7))
    pointer = checkpoint.latest(store)
    assert pointer.step == 6 and sorted({i.key.split("/")[0] for i in store.list("checkpoint-")}) == [pointer.checkpoint]
    model_dir = checkpoint.fetch(store, pointer.checkpoint, tmp_path / "download")
    DepthAnythingForDepthEstimation.from_pretrained(model_dir, use_safetensors=True)
    assert json.loads((model_dir / "trainer_state.json").read_text())["step"] == 6
