"""The reference training loop on CPU with tiny models: the loss falls, checkpoints reload,
and a stopped run resumes where it stopped."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import photo_samples, write_shard
from scenes import npy, png, render, with_invalid

from labelers.ground_truth import GroundTruthRule
from labelers.sky import SkySegmenter
from labelers.teacher import Teacher
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.student.train import TrainConfig, train
from pipelines.tasks import ShardTask
from storage.stores import open_store


def scene_samples(sizes, prefix: str, seed: int) -> list[dict]:
    out = []
    for j, (h, w) in enumerate(sizes):
        image, depth = render(h, w, seed=seed + j)
        out.append({"__key__": f"{prefix}{j:04d}", "png": png(image), "depth.npy": npy(with_invalid(depth))})
    return out


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    import transformers
    from transformers import Dinov2Config, Dinov2Model

    from labelers.random_models import save_random_teacher

    transformers.logging.set_verbosity_error()
    tmp = tmp_path_factory.mktemp("train")
    sky = SkySegmenter.load(tiny_models.sky)
    # Labeled: analytic scenes with holes in their depth, converted (valid.png); pseudo: photos.
    labelers = {"labeled": Labelers(None, sky, GroundTruthRule()),
                "pseudo": Labelers(Teacher.load(tiny_models.teacher), sky)}
    outs = {}
    for kind in ("labeled", "pseudo"):
        out = open_store(str(tmp / kind))
        for i in range(3):
            sizes = [(70, 90), (90, 70), (80, 80)] * 2
            samples = (scene_samples(sizes, f"{kind}{i}-", seed=10 * i) if kind == "labeled"
                       else photo_samples(sizes, prefix=f"{kind}{i}-", seed=i))
            src = write_shard(tmp / f"{kind}-{i}.tar", samples)
            label_shard(ShardTask(src, f"{kind}-{i}"), labelers[kind], out, batch_size=4, threads=2)
        outs[kind] = str(tmp / kind)
    student = save_random_teacher(tmp / "student", size="tiny", image_size=56, seed=3)
    torch.manual_seed(0)      # the frozen encoder the same whatever ran before in this process
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=56)).save_pretrained(tmp / "frozen")
    return tmp, outs, str(student), str(tmp / "frozen")


def cfg(setup, out, **kw):
    tmp, outs, student, frozen = setup
    base = dict(labeled=(outs["labeled"],), pseudo=(outs["pseudo"],), student=student, frozen=frozen,
                out=str(tmp / out), steps=30, batch_size=6, crop=56, lr=1e-3, save_every=10, progress=False)
    return TrainConfig(**{**base, **kw})


def test_thirty_steps_lower_the_loss_and_the_checkpoint_reloads(setup):
    from transformers import DepthAnythingForDepthEstimation

    history = train(cfg(setup, "run-a"))
    total = [h["total"] for h in history]
    assert len(total) == 30 and all(np.isfinite(total))
    assert np.mean(total[-5:]) < np.mean(total[:5])
    assert {"labeled", "unlabeled", "feature"} <= set(history[0])
    ck = setup[0] / "run-a" / "checkpoint"
    assert (ck / "model.safetensors").exists() and (ck / "optimizer.safetensors").exists()
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == 30
    DepthAnythingForDepthEstimation.from_pretrained(ck, use_safetensors=True)   # reloads


def test_a_stopped_run_resumes_where_it_stopped(setup):
    first = train(cfg(setup, "run-b", stop_after=12, save_every=6))
    assert [h["step"] for h in first] == list(range(1, 13))
    state = json.loads((setup[0] / "run-b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 12 and sum(state["streams"][0]["pseudo"]["consumed"].values()) > 0
    rest = train(cfg(setup, "run-b", save_every=6))
    assert [h["step"] for h in rest] == list(range(13, 31))
    log = [json.loads(line) for line in (setup[0] / "run-b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))


def test_two_ranks_under_torchrun_stop_and_resume_with_checkpoints_on_s3(setup, job_s3_bucket):
    """DDP on CPU (gloo): what a GPU run does with torchrun --nproc_per_node N, checkpointing to
    the S3 endpoint; a stopped run resumes from S3 alone, each rank at its own place."""
    import subprocess
    import sys

    from pipelines.student import checkpoint

    tmp, outs, student, frozen = setup
    url = f"s3://{job_s3_bucket}/runs/ddp/"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "engine"]
    args = [*torchrun, "train-student", "--labeled", outs["labeled"], "--pseudo", outs["pseudo"],
            "--student", student, "--frozen", frozen, "--out", url, "--steps", "6", "--crop", "56",
            "--lr", "1e-3", "--save-every", "3", "--loader-workers", "1"]
    store = open_store(url)
    for stop, reported in (("3", "step 3: total"), (None, "step 6: total")):
        p = subprocess.run(args + (["--stop-after", stop] if stop else []), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.count(reported) == 1                         # rank 0 reports
        if stop:      # mark the stopped run's log: a resume keeps rows up to its checkpoint, a restart rewrites them
            rows = [json.loads(line) for line in store.get("log.jsonl").decode().splitlines()]
            rows[1]["mark"] = "first run"
            store.put("log.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    pointer = checkpoint.latest(store)
    assert pointer.step == 6
    state = json.loads(store.get(f"{pointer.checkpoint}/trainer_state.json"))
    assert state["step"] == 6 and [sorted(s) for s in state["streams"]] == [["labeled", "pseudo"]] * 2
    log = [json.loads(line) for line in store.get("log.jsonl").decode().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and log[1].get("mark") == "first run"


def test_the_papers_student_from_dinov2_learns_and_starts_aligned(setup):
    """--init dinov2: the encoder is the frozen DINOv2 itself, so alignment starts at 0 and stays
    near it while the fresh head learns; the total loss falls."""
    from test_student_recipe import save_dinov2

    tmp, outs, _, _ = setup
    dinov2 = save_dinov2(tmp / "dinov2-4", layers=4)
    history = train(cfg(setup, "run-init", student=None, frozen=None, init=dinov2, steps=24, save_every=24,
                        lr=1e-4, decoder_lr_factor=30))
    total = [h["total"] for h in history]
    assert len(total) == 24 and all(np.isfinite(total))
    assert np.mean(total[-5:]) < np.mean(total[:5])
    assert history[0]["feature"] == 0.0 and max(h["feature"] for h in history[:5]) < 0.05


def test_a_run_directory_of_the_old_layout_resumes(setup):
    """Before the pointer, a run kept one real checkpoint/ directory; such a run resumes."""
    import os
    import shutil

    run = setup[0] / "run-old"
    train(cfg(setup, "run-old", stop_after=4, save_every=4, steps=8))
    target = os.readlink(run / "checkpoint")
    os.remove(run / "checkpoint")
    shutil.move(str(run / target), str(run / "checkpoint"))        # the old layout: no pointer
    os.remove(run / "latest.json")
    rest = train(cfg(setup, "run-old", save_every=4, steps=8))
    assert [h["step"] for h in rest] == [5, 6, 7, 8]
