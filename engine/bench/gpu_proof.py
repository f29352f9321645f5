"""The GPU proof: one command that a GPU machine without network runs from a checkout, and one
JSON of what it measured (issue 26; README "The GPU proof").

It needs no Ray: the labeling runs in-process through ``label_shard`` on local storage, the hot
path a labeler actor runs. In order:

1. ``tests/test_cuda.py`` under pytest (its counts and the tests that passed);
2. random-weight models of the production sizes, saved and loaded back (Depth Anything
   V2-Large-sized teacher at 518, SegFormer-B5-sized sky model at 640);
3. JPEG photos of ~1 MP and SA-1B's size (2250x1500), labels at the teacher's size (the default);
4. per precision and batch size: the model step alone over decoded images (upload, both models,
   the resize back, the label made on the device: ``label_batch``), then the whole flow (read,
   decode, model step, encode, tar, commit) with its images/s, the ratio of the two, the GPU's
   sampled utilization and the CPU cores the flow used;
5. the label's difference between bf16 and fp32 (per image: Pearson and max |diff| of the
   normalized disparity; the worst image);
6. one profiled batch: the top operators by device time and the share of the profiled wall time
   the device was busy.

``--device cpu`` with tiny sizes runs the same steps on a CPU (tests/test_gpu_proof.py), so the
script is known to run the day a GPU comes; its figures there say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SA1B = {"1MP": (816, 1224), "3.4MP": (1500, 2250)}


@dataclass(frozen=True)
class ProofConfig:
    device: str = "cuda"
    teacher_size: str = "vitl"        # labelers.random_models.TEACHER_SIZES
    teacher_input: int = 518
    sky_size: str = "b5"              # labelers.random_models.SEGMENTER_SIZES
    sky_input: int = 640
    dtypes: tuple[str, ...] = ("bf16", "fp32")
    batch_sizes: tuple[int, ...] = (16, 32)
    photos: dict = field(default_factory=lambda: dict(SA1B))
    images: int = 256                 # per photo size: most of a second at 300 images/s
    threads: int = 0                  # codec threads; 0: the machine's cores (a GPU actor's share on one GPU)
    run_tests: bool = True
    profile: bool = True


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def environment(cfg: ProofConfig) -> dict:
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
           "cores": os.cpu_count(), "cuda": torch.cuda.is_available(), "device": cfg.device}
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    return env


def cuda_tests() -> dict:
    """tests/test_cuda.py under pytest: the counts, and which tests passed."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"ran": False, "reason": "pytest is not installed"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                       cwd=REPO, capture_output=True, text=True)
    out = p.stdout + p.stderr
    # The summary is stdout's last "... in 1.23s" line: a plugin may warn on stderr after it.
    summary = ([line for line in p.stdout.splitlines() if re.search(r"\bin [\d.]+s\b", line)] or [""])[-1]
    counts = {k.rstrip("s") if k.startswith("error") else k: int(n)
              for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    return {"ran": True, "exit_code": p.returncode, **counts,
            "passed_tests": re.findall(r"^PASSED (\S+)", out, re.M),
            "failed_tests": re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M), "tail": out[-2000:]}


def _labelers(teacher: str, sky: str, device: str, dtype: str):
    from labelers.sky import SkySegmenter
    from labelers.teacher import Teacher
    from pipelines.pseudo_label import Labelers

    return Labelers(Teacher.load(teacher, device=device, dtype=dtype, name="teacher"),
                    SkySegmenter.load(sky, device=device, dtype=dtype, name="sky"), label_size="teacher")


def _decoded(shard: Path, labelers) -> list:
    from pipelines.decode import sample_from_members
    from storage.shards import iter_tar_samples

    with open(shard, "rb") as f:
        return [labelers.decode(sample_from_members(m, str(shard))) for m in iter_tar_samples(f)]


def model_only(samples: list, labelers, batch_size: int, device: str) -> dict:
    """The model step alone (pipelines.pseudo_label.label_batch) over decoded images, after a
    warm-up batch: images/s."""
    from pipelines.pseudo_label import label_batch
    from pipelines.sample import Sample

    def fresh(s: Sample) -> Sample:
        return Sample(s.key, s.source, image_ext=s.image_ext, image_bytes=b"", image=s.image,
                      height=s.height, width=s.width)

    label_batch([fresh(s) for s in samples[:batch_size]], labelers)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        label_batch([fresh(s) for s in samples[i:i + batch_size]], labelers)
    _sync(device)
    wall = time.perf_counter() - t0
    return {"images_per_second": round(len(samples) / wall, 2), "seconds": round(wall, 3)}


def end_to_end(shard: Path, labelers, batch_size: int, threads: int, out: Path, device: str) -> dict:
    """The whole flow in-process (label_shard on local storage): images/s, the CPU cores it used,
    the GPU's mean sampled utilization."""
    from labelers.devices import GpuSampler
    from pipelines.pseudo_label import label_shard
    from pipelines.tasks import ShardTask
    from storage.stores import open_store

    label_shard(ShardTask(str(shard), "warmup"), labelers, open_store(str(out / "warmup")), batch_size=batch_size,
                threads=threads)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    with GpuSampler(device, period=0.2) as gpu:
        result = label_shard(ShardTask(str(shard), "timed"), labelers, open_store(str(out / "timed")),
                             batch_size=batch_size, threads=threads)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    if result.errors:
        raise RuntimeError(f"{result.errors} error rows in the proof's photos: {result.error_reasons}")
    return {"images_per_second": round(result.ok / wall, 2), "seconds": round(wall, 3),
            "cpu_cores_used": round(cpu / wall, 2), "gpu_utilization": None if gpu.mean is None else round(gpu.mean, 1),
            "output": str(out / "timed")}


def _labels(output: str) -> dict[str, np.ndarray]:
    """disp.png / 65535 of every sample in an OUTPUT, read with Pillow."""
    import tarfile

    from PIL import Image

    labels = {}
    for tar in sorted(Path(output, "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".disp.png"):
                    png = np.asarray(Image.open(io.BytesIO(t.extractfile(m).read())), dtype=np.float64)
                    labels[m.name[: -len(".disp.png")]] = png / 65535.0
    return labels


def label_difference(a: str, b: str) -> dict:
    """Per image of two OUTPUTs of the same photos: Pearson and max |diff| of the normalized
    disparity; the worst image of each, and the mean |diff| over all."""
    la, lb = _labels(a), _labels(b)
    if set(la) != set(lb) or not la:
        raise ValueError(f"the two outputs hold different samples ({len(la)} and {len(lb)})")
    pearson, max_abs, mean_abs = [], [], []
    for key in sorted(la):
        x, y = la[key].ravel(), lb[key].ravel()
        both_vary = x.std() > 0 and y.std() > 0
        pearson.append(float(np.corrcoef(x, y)[0, 1]) if both_vary else float(np.array_equal(x, y)))
        max_abs.append(float(np.abs(x - y).max()))
        mean_abs.append(float(np.abs(x - y).mean()))
    return {"images": len(la), "pearson_min": round(min(pearson), 6), "max_abs_max": round(max(max_abs), 6),
            "mean_abs": round(float(np.mean(mean_abs)), 6)}


def profile_batch(samples: list, labelers, batch_size: int, device: str, top: int = 12) -> dict:
    """One model step under torch.profiler: the top operators by device time (CPU time on a CPU)
    and the share of the wall time the device was busy (its kernels' time summed: overlap
    would count twice, so it errs high)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipelines.pseudo_label import label_batch
    from pipelines.sample import Sample

    batch = [Sample(s.key, s.source, image_ext=s.image_ext, image_bytes=b"", image=s.image, height=s.height,
                    width=s.width) for s in samples[:batch_size]]
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        label_batch(batch, labelers)
        _sync(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    averages = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(averages, key=lambda e: getattr(e, key, 0.0), reverse=True)[:top]
    busy = sum(getattr(e, "self_device_time_total", 0.0) for e in averages) if cuda else None
    return {"images": len(batch), "wall_ms": round(wall_us / 1000, 2), "sorted_by": key,
            "device_busy_fraction": None if busy is None else round(busy / wall_us, 3),
            "top": [{"name": e.key, "ms": round(getattr(e, key, 0.0) / 1000, 3), "calls": e.count} for e in rows]}


def run_proof(cfg: ProofConfig, work: Path) -> dict:
    import torch

    from engine.bench.cpu_side import write_photo_shard
    from engine.runtime.allocator import keep_freed_buffers
    from labelers.random_models import save_random_segmenter, save_random_teacher

    keep_freed_buffers()   # as a labeler actor does
    report = {"config": {**asdict(cfg), "photos": {k: list(v) for k, v in cfg.photos.items()}},
              "environment": environment(cfg)}
    if cfg.run_tests:
        report["cuda_tests"] = cuda_tests()
    teacher = str(save_random_teacher(work / "teacher", size=cfg.teacher_size, image_size=cfg.teacher_input))
    sky = str(save_random_segmenter(work / "sky", size=cfg.sky_size, image_size=cfg.sky_input))
    threads = cfg.threads or os.cpu_count() or 4
    shards = {name: write_photo_shard(work / "photos" / f"{name.replace('.', '_')}.tar", cfg.images, h, w)
              for name, (h, w) in cfg.photos.items()}
    runs, outputs = [], {}
    for dtype in cfg.dtypes:
        labelers = _labelers(teacher, sky, cfg.device, dtype)
        for name, shard in shards.items():
            samples = _decoded(shard, labelers)
            for batch in cfg.batch_sizes:
                alone = model_only(samples, labelers, batch, cfg.device)
                flow = end_to_end(shard, labelers, batch, threads, work / "out" / f"{dtype}-{name}-{batch}", cfg.device)
                outputs[(dtype, name, batch)] = flow.pop("output")
                runs.append({"dtype": dtype, "photos": name, "batch_size": batch, "threads": threads,
                             "model_only": alone, "end_to_end": flow,
                             "end_to_end_over_model_only": round(flow["images_per_second"] / alone["images_per_second"], 3)})
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
            if cfg.profile and dtype == cfg.dtypes[0] and name == next(iter(shards)):
                report["profile"] = profile_batch(samples, labelers, cfg.batch_sizes[0], cfg.device)
        del labelers
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    report["runs"] = runs
    if "bf16" in cfg.dtypes and "fp32" in cfg.dtypes:
        batch = cfg.batch_sizes[0]
        report["bf16_vs_fp32"] = {name: label_difference(outputs[("bf16", name, batch)], outputs[("fp32", name, batch)])
                                  for name in shards}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench.gpu_proof", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-proof.json", help="where the JSON goes")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny models and photos (a check that it runs, on any device)")
    p.add_argument("--dtypes", default=None, help="comma-separated, e.g. bf16,fp32 (default), fp32 on a CPU")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 16,32)")
    p.add_argument("--images", type=int, default=None, help="photos per size (default 256)")
    p.add_argument("--no-tests", action="store_true", help="skip tests/test_cuda.py")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    a = p.parse_args(argv)
    options = {}
    if a.tiny:
        options.update(teacher_size="tiny", teacher_input=56, sky_size="tiny", sky_input=64, batch_sizes=(2, 4),
                       photos={"small": (60, 90), "wide": (72, 144)}, images=4)
    if a.device == "cpu":
        options.setdefault("dtypes", ("fp32",))
    if a.dtypes:
        options["dtypes"] = tuple(a.dtypes.split(","))
    if a.batch_sizes:
        options["batch_sizes"] = tuple(int(b) for b in a.batch_sizes.split(","))
    if a.images:
        options["images"] = a.images
    cfg = ProofConfig(device=a.device, run_tests=not a.no_tests, **options)
    with tempfile.TemporaryDirectory(dir=a.workdir) as work:
        report = run_proof(cfg, Path(work))
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
