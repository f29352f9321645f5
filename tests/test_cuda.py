"""The CUDA paths: one upload shared by both models through pinned memory, bf16 autocast,
GPU utilization sampling, one actor per GPU. They run only where CUDA is present; on CPU the
upload is the identity (checked here too), so the CPU suite covers everything else."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_models import natural_photos, pearson

from labelers.devices import GpuSampler, upload
from labelers.sky import SkySegmenter, sky_from_logits
from labelers.teacher import Teacher
from pipelines.pseudo_label import Labelers, label_batch
from pipelines.sample import Sample

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def samples(images):
    return [Sample(key=str(i), source="", image=im, height=im.shape[0], width=im.shape[1])
            for i, im in enumerate(images)]


def test_upload_is_the_identity_on_cpu_and_the_sampler_is_silent():
    images = list(natural_photos().values())[:2]
    assert all(a is b for a, b in zip(upload(images, "cpu"), images))
    with GpuSampler("cpu", period=0.001) as gpu:
        torch.ones(256, 256) @ torch.ones(256, 256)
    assert gpu.mean is None and gpu.samples == []


@cuda
def test_shared_upload_gives_the_labels_of_separate_numpy_inputs(tiny_models):
    images = list(natural_photos().values())
    on_gpu = Labelers(Teacher.load(tiny_models.teacher, device="cuda", dtype="fp32"),
                      SkySegmenter.load(tiny_models.sky, device="cuda", dtype="fp32"))
    tensors = upload(images, "cuda")
    assert all(t.is_cuda and t.dtype == torch.uint8 for t in tensors)
    batch = samples(images)
    label_batch(batch, on_gpu)                              # the engine's path: one upload
    separate = [p.raw for p in on_gpu.teacher.predict(images)], on_gpu.sky.masks(images)   # numpy in, per model
    for s, raw, sky in zip(batch, *separate):
        assert pearson(s.raw, raw) > 0.99999 and np.array_equal(s.sky, sky)


@cuda
def test_bf16_labels_agree_with_fp32(tiny_models):
    images = list(natural_photos().values())
    fp32 = Teacher.load(tiny_models.teacher, device="cuda", dtype="fp32").predict(images)
    bf16 = Teacher.load(tiny_models.teacher, device="cuda", dtype="bf16").predict(images)
    for a, b in zip((p.raw for p in fp32), (p.raw for p in bf16)):
        assert b.dtype == np.float32 and pearson(a, b) > 0.99


@cuda
def test_both_sky_folds_agree_on_cuda():
    torch.manual_seed(0)
    logits = torch.randn(150, 40, 60, device="cuda")
    a = sky_from_logits(logits, (2,), (300, 500), per_class=True)
    b = sky_from_logits(logits, (2,), (300, 500), per_class=False)
    assert a.is_cuda and torch.equal(a, b)


@cuda
def test_gpu_sampler_sees_a_busy_gpu():
    x = torch.randn(4096, 4096, device="cuda")
    with GpuSampler("cuda", period=0.05) as gpu:
        for _ in range(200):          # a fixed amount of work, long enough for several samples
            x = x @ x
            x = x / x.norm()
        torch.cuda.synchronize()
    if not gpu.samples:
        pytest.skip("NVML is not available to torch here (no pynvml)")
    assert 0 <= gpu.mean <= 100 and max(gpu.samples) > 0


@cuda
def test_one_actor_per_gpu():
    import ray

    from engine.config import LabelConfig
    from engine.runtime.session import actor_layout

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        lay = actor_layout(LabelConfig(input="x", output="y", teacher="t", sky=None))
        gpus = torch.cuda.device_count()
        assert (lay.actors, lay.options, lay.device, lay.torch_threads) == (gpus, {"num_gpus": 1, "num_cpus": 1}, "cuda", None)
        assert lay.codec_threads == max(4, 2 // gpus)
    finally:
        ray.shutdown()


@cuda
@pytest.mark.parametrize("kind", ["disparity", "depth", "inverse_depth"])
def test_the_label_made_on_cuda_is_the_hosts_bit_for_bit(kind):
    from test_device_label import _maps, assert_same, host

    from engine.bench.stand_in import sky_mask
    from labelers.device_label import quantize_on_device
    from storage.label_format import DISP_LEVELS

    raw, sky = _maps(kind, (518, 777)), sky_mask(518, 777)
    device = quantize_on_device(torch.from_numpy(raw).cuda(), kind, torch.from_numpy(sky).cuda(),
                                levels=DISP_LEVELS)
    assert_same(device, host(raw, kind, sky))


@cuda
def test_a_cuda_teacher_makes_its_labels_on_the_device(tiny_models):
    images = list(natural_photos().values())
    on_gpu = Labelers(Teacher.load(tiny_models.teacher, device="cuda", dtype="fp32"),
                      SkySegmenter.load(tiny_models.sky, device="cuda", dtype="fp32"))
    assert on_gpu.labels_on_device
    batch = samples(images)
    label_batch(batch, on_gpu)
    assert all(s.raw is None and s.label.values.dtype == np.uint16 for s in batch)
