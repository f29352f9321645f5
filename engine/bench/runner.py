"""``depth-engine bench``: figures to reproduce before a job, on the user's own machine.

In one run, on the same synthetic shards (mixed sizes and aspect ratios, JPEG), the same
models and the same resources, after a warm-up, each repeated (median and spread):

- model-only: the engine's batches through the models, no I/O (the ceiling);
- end to end: ``label`` with Ray, storage -> shards -> manifest (local, or ``--output s3://``);
- a plain Ray Data pipeline doing the same labeling (read_webdataset -> map_batches -> write);
- the naive per-image loop over transformers' pipelines;

and the ratios of the engine to each. Steady-state rates exclude cluster start and model load,
which are reported apart. ``--memory``: one worker's peak RSS for a shard of N images and one
of 10 N, each in a fresh worker. ``--hostile``: one worker's peak RSS for a shard of N hostile
samples (lying JPEG headers, 1 GiB sparse members, 10x10000 images) beside N ordinary photos.
``--plan N`` / ``--audit N``: see engine.bench.scale. ``--compare N``: see engine.bench.compare. ``--chaos N``: see engine.bench.chaos. ``--teachers``: see engine.bench.teachers.
``--train``: see engine.bench.train. ``--stand-in-rate R``: see engine.bench.cpu_side.
"""
from __future__ import annotations

import os
import platform
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.bench.scale import audit_figures, plan_figures
from engine.bench.synthetic import DEFAULT_SIZES, write_hostile_shard, write_many_member_shard, write_shard
from engine.config import ConfigError, LabelConfig


@dataclass(frozen=True)
class BenchConfig:
    teacher: str | None = None            # None: a random-weight teacher of teacher_size
    sky: str | None = None                # None: a random-weight segmenter; "none": no sky
    teacher_size: str = "vits"
    sky_size: str = "b0"
    image_size: int = 518                 # processor size of the random teacher
    sky_image_size: int = 512             # processor size of the random segmenter
    images: int = 64
    sizes: list = field(default_factory=lambda: list(DEFAULT_SIZES))
    memory: bool = False
    hostile: bool = False                 # peak worker RSS: a hostile shard beside an ordinary one
    aspects: list = field(default_factory=list)   # only the teacher's time per image by aspect ratio
    teachers: bool = False                # only each teacher family: the engine beside transformers' own
    train: bool = False                   # only the student trainer: end to end beside its model step
    batch_size: int = 8
    workers: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    workdir: str | None = None
    plan: int = 0                         # committed shards for the planning figure
    audit: int = 0                        # manifest rows for the audit figure
    compare: int = 0                      # samples per side for the compare figure
    chaos: int = 0                        # shards of the chaos run (engine.bench.chaos)
    repair: int = 0                       # photos in the shard of the repair figure
    output: str | None = None             # OUTPUT of the end-to-end runs, or of --plan/--audit
    repeats: int = 3
    baselines: bool = True                # model-only, Ray Data and naive figures beside the engine's
    flops: bool = False                   # only the models' FLOPs per image
    stand_in_rate: float = 0.0            # only the CPU side, model step on a stand-in accelerator (images/s)
    threads: int = 4                      # codec threads of the --stand-in-rate flow

    def __post_init__(self):
        if self.images < 1:
            raise ConfigError(f"--images must be >= 1, got {self.images}")
        if self.stand_in_rate < 0:
            raise ConfigError(f"--stand-in-rate must be > 0 images/s, got {self.stand_in_rate}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1, got {self.repeats}")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'640x480,500x375' (W x H, as image tools print them) -> [(480, 640), (375, 500)]."""
    try:
        out = [(int(h), int(w)) for w, h in (s.lower().split("x") for s in text.split(",") if s)]
    except ValueError:
        raise ConfigError(f"--sizes must look like 640x480,500x375, got {text!r}") from None
    if not out or min(min(s) for s in out) < 1:
        raise ConfigError(f"--sizes must look like 640x480,500x375, got {text!r}")
    return out


def _models(cfg: BenchConfig, root: Path) -> tuple[str, str | None, dict]:
    from labelers.random_models import save_random_segmenter, save_random_teacher

    teacher, sky = cfg.teacher, cfg.sky
    desc = {}
    if teacher is None:
        path = root / f"random-teacher-{cfg.teacher_size}-{cfg.image_size}"
        if not (path / "config.json").exists():
            save_random_teacher(path, size=cfg.teacher_size, image_size=cfg.image_size)
        teacher = str(path)
        desc["teacher"] = f"random {cfg.teacher_size} at {cfg.image_size}"
    if sky is None:
        path = root / f"random-segmenter-{cfg.sky_size}-{cfg.sky_image_size}"
        if not (path / "config.json").exists():
            save_random_segmenter(path, size=cfg.sky_size, image_size=cfg.sky_image_size)
        sky = str(path)
        desc["sky"] = f"random {cfg.sky_size} at {cfg.sky_image_size}"
    return teacher, None if sky == "none" else sky, desc


def _config(cfg: BenchConfig, inputs: str, output: str, teacher: str, sky: str | None) -> LabelConfig:
    return LabelConfig(input=inputs, output=output, teacher=teacher, sky=sky, batch_size=cfg.batch_size,
                       workers=cfg.workers, device=cfg.device, dtype=cfg.dtype, progress=False)


def _label(cfg: BenchConfig, inputs: str, output: str, teacher: str, sky: str | None):
    from engine.label import label

    return label(_config(cfg, inputs, output, teacher, sky))


def machine() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_bench(cfg: BenchConfig) -> dict:
    root = Path(cfg.workdir or tempfile.mkdtemp(prefix="depth-engine-bench-"))
    if cfg.stand_in_rate:
        from engine.bench.cpu_side import PHOTO_SIZES, cpu_side_figures

        sizes = PHOTO_SIZES if cfg.sizes == list(DEFAULT_SIZES) else {f"{w}x{h}": (h, w) for h, w in cfg.sizes}
        return {"machine": machine(), "cpu_side": cpu_side_figures(
            root / "cpu-side", rate=cfg.stand_in_rate, sizes=sizes, images=cfg.images, threads=cfg.threads,
            batch_size=cfg.batch_size, repeats=cfg.repeats)}
    if cfg.audit:
        return {"machine": machine(), "audit": audit_figures(cfg.output or str(root / "audit-output"), cfg.audit)}
    if cfg.compare:
        from engine.bench.compare import compare_figures

        return {"machine": machine(), "compare": compare_figures(cfg.output or str(root / "compare"), cfg.compare)}
    if cfg.chaos:
        from engine.bench.chaos import chaos_figures

        teacher, sky, desc = _models(cfg, root / "models")
        return {"machine": machine(), "models": desc, "chaos": chaos_figures(cfg, root, teacher, sky)}
    if cfg.plan:
        return {"machine": machine(), "plan": plan_figures(cfg.output or str(root / "plan-output"), cfg.plan)}
    if cfg.repair:
        from engine.bench.repair import repair_figures

        teacher, sky, desc = _models(cfg, root)
        return {"machine": machine(), "models": desc, "repair": repair_figures(
            root / "repair", cfg.repair, teacher, sky, cfg.repeats, cfg.batch_size, cfg.output)}
    if cfg.train:
        from engine.bench.train import train_figures

        return {"machine": machine(), "train": train_figures(root / "train", repeats=cfg.repeats)}
    if cfg.teachers:
        from engine.bench.teachers import teacher_figures

        return {"machine": machine(), "teachers": teacher_figures(root / "teacher-families", images=cfg.images,
                                                                  repeats=cfg.repeats)}
    if cfg.aspects:
        from engine.bench.aspect import aspect_figures

        teacher, _, desc = _models(cfg, root / "models")
        return {"machine": machine(), "models": {"teacher": desc.get("teacher", teacher)},
                "aspects": aspect_figures(teacher, cfg.aspects, device=cfg.device, repeats=cfg.repeats)}
    if not cfg.flops:
        _e2e_base(cfg, root, check=True)
    teacher, sky, desc = _models(cfg, root / "models")
    if cfg.flops:
        from engine.bench.baselines import model_flops

        return {"machine": machine(), "models": {"teacher": desc.get("teacher", teacher), "sky": desc.get("sky", sky)},
                "flops": model_flops(teacher, sky, cfg.sizes[0])}
    report = {"machine": machine(), "models": {"teacher": desc.get("teacher", teacher),
                                               "sky": desc.get("sky", sky or "none")},
              "images": cfg.images, "sizes": [f"{w}x{h}" for h, w in cfg.sizes],
              "batch_size": cfg.batch_size, "repeats": cfg.repeats}
    per_shard = max(1, cfg.images // 4)
    shards = [str(write_shard(root / "e2e" / f"bench-{i // per_shard:06d}.tar", min(per_shard, cfg.images - i),
                              cfg.sizes, seed=i)) for i in range(0, cfg.images, per_shard)]

    from engine.models import resolve, weight_bytes
    from engine.runtime.session import ray_session

    config = _config(cfg, "-", "-", teacher, sky)
    with ray_session(config, weight_bytes(*(resolve(m) for m in (teacher, sky) if m))) as lay:
        report["device"], report["workers"], report["layout"] = lay.device, lay.actors, lay.describe()
        e2e = _end_to_end(cfg, root, teacher, sky)
        report["end_to_end"] = e2e
        if cfg.baselines:
            report.update(_baselines(cfg, root, shards, teacher, sky, lay))
            report["ratios"] = {f"end_to_end / {k}": round(e2e["images_per_second"] / report[k]["images_per_second"], 3)
                                for k in ("model_only_best", "model_only", "model_only_per_core", "ray_data", "naive")
                                if report.get(k, {}).get("images_per_second")}
        if cfg.memory:
            report["memory"] = _memory(cfg, root, teacher, sky)
        if cfg.hostile:
            report["hostile"] = _hostile(cfg, root, teacher, sky)
    report["workdir"] = str(root)
    return report


def _end_to_end(cfg: BenchConfig, root: Path, teacher: str, sky: str | None) -> dict:
    from engine.bench.baselines import rates

    base = _e2e_base(cfg, root)
    runs = [_label(cfg, f"{root}/e2e/", f"{base}/run-{r}/", teacher, sky) for r in range(cfg.repeats)]
    last = runs[-1]
    images = last.samples_ok + last.samples_error
    sizes = _output_sizes(f"{base}/run-{cfg.repeats - 1}/")
    requests = sum(last.s3_requests.values())
    return {**rates(images, [images / r.images_per_second for r in runs]),
            "output_bytes_per_image": round(sizes["shards"] / max(images, 1)),
            "manifest_bytes_per_row": round(sizes["manifest"] / max(images, 1)),
            "s3_requests": last.s3_requests,
            "s3_requests_per_shard": round(requests / max(last.shards_committed, 1), 2) if requests else None,
            "startup_seconds": round(sorted(r.startup_seconds for r in runs)[len(runs) // 2], 2),
            "model_busy_fraction": round(last.model_busy_fraction, 4),
            "stage_seconds": last.stage_seconds, "gpu_utilization": last.gpu_utilization,
            "peak_worker_rss_mb": round(max(r.peak_worker_rss_mb for r in runs), 1),
            "samples_error": last.samples_error, "output": base}


def _e2e_base(cfg: BenchConfig, root: Path, check: bool = False) -> str:
    """Where the end-to-end runs write; with ``check``, refuse a place that holds a run already
    (``label`` would only resume there, leaving nothing to time)."""
    from engine import job
    from storage.stores import open_store

    base = (cfg.output or str(root / "out-e2e")).rstrip("/")
    for r in range(cfg.repeats if check else 0):
        if job.read(open_store(f"{base}/run-{r}/")) is not None:
            raise ConfigError(f"{base}/run-{r}/ already holds a bench run; pass a fresh --output or --workdir")
    return base


def _output_sizes(url: str) -> dict:
    from storage.stores import open_store

    store = open_store(url)
    return {part: sum(o.size for o in store.list(f"{part}/")) for part in ("shards", "manifest")}


def _baselines(cfg, root, shards, teacher, sky, lay) -> dict:
    """The models alone in both CPU layouts (one process with every core's threads; one
    single-threaded process per core, side by side) or on the GPU, then Ray Data and the naive
    loop with the layout ``label`` chose."""
    import gc

    import ray

    from engine.bench.baselines import (
        model_only,
        model_only_parallel,
        naive_loop,
        ray_data_pipeline,
        read_images,
    )
    from engine.models import resolve
    from engine.runtime.actors import WorkerSpec

    refs = {name: resolve(m).sha256 if m else None for name, m in (("teacher", teacher), ("sky", sky))}
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    spec = WorkerSpec(output="", teacher=teacher, teacher_sha256=refs["teacher"], sky=sky, sky_sha256=refs["sky"],
                      device=lay.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
                      torch_threads=cpus if lay.device == "cpu" else None)
    images = read_images(shards)
    out = {"model_only": {**model_only(spec, images, cfg.repeats), "layout": f"1 process x {cpus} threads"
                          if lay.device == "cpu" else "1 GPU"}}
    gc.collect()
    if lay.device == "cpu" and cpus > 1:
        out["model_only_per_core"] = {**model_only_parallel(replace(spec, torch_threads=1), images, cpus, cfg.repeats),
                                      "layout": f"{cpus} processes x 1 thread"}
    best = max((k for k in ("model_only", "model_only_per_core") if k in out),
               key=lambda k: out[k]["images_per_second"])
    out["model_only_best"] = {**out[best], "which": best}
    try:
        import ray.data  # noqa: F401 - ray[data] is an extra
    except ImportError:
        out["ray_data"] = {"skipped": "Ray Data is not installed: pip install 'depth-engine[bench]'"}
    else:
        # Ray Data's read and write tasks need a CPU of their own beside the actors.
        options = {"num_gpus": 1} if lay.device == "cuda" else {"num_cpus": 1}
        actors = lay.actors if lay.device == "cuda" else max(1, min(lay.actors, cpus - 1))
        (root / "ray-data").mkdir(parents=True, exist_ok=True)
        out["ray_data"] = ray_data_pipeline(replace(spec, torch_threads=max(1, cpus // actors)), shards,
                                            root / "ray-data", actors, options, cfg.repeats)
    (root / "naive").mkdir(parents=True, exist_ok=True)
    out["naive"] = naive_loop(teacher, sky, shards, root / "naive", lay.device, cfg.repeats)
    return out


def _memory(cfg: BenchConfig, root: Path, teacher: str, sky: str | None) -> dict:
    memory = {}
    for label_, n in (("small", cfg.images), ("large", 10 * cfg.images)):
        shard = write_shard(root / f"mem-{label_}" / f"mem-{label_}.tar", n, cfg.sizes)
        r = _label(cfg, str(shard), str(root / f"out-mem-{label_}"), teacher, sky)
        memory[label_] = {"images": n, "peak_worker_rss_mb": round(r.peak_worker_rss_mb, 1),
                          "images_per_second": round(r.images_per_second, 3)}
    memory["large_over_small"] = round(memory["large"]["peak_worker_rss_mb"] / memory["small"]["peak_worker_rss_mb"], 3)
    return memory


def _hostile(cfg: BenchConfig, root: Path, teacher: str, sky: str | None) -> dict:
    """One fresh worker per shard: N ordinary photos, then N samples built to exhaust memory.
    Within the limits, the hostile shard costs no more than the ordinary one (goal: <= 1.5x)."""
    figures = {}
    for kind, build in (("ordinary", write_shard), ("hostile", write_hostile_shard),
                        ("many_members", write_many_member_shard)):
        shard = build(root / f"hostile-{kind}" / f"{kind}.tar", cfg.images)
        r = _label(cfg, str(shard), str(root / f"out-hostile-{kind}"), teacher, sky)
        figures[kind] = {"images": cfg.images, "samples_ok": r.samples_ok, "samples_error": r.samples_error,
                         "peak_worker_rss_mb": round(r.peak_worker_rss_mb, 1),
                         "shard_mb": round(shard.stat().st_size / 2**20, 1)}
        shard.unlink()
    for kind in ("hostile", "many_members"):
        figures[f"{kind}_over_ordinary"] = round(
            figures[kind]["peak_worker_rss_mb"] / figures["ordinary"]["peak_worker_rss_mb"], 3)
    return figures


def print_report(r: dict) -> None:
    print(f"machine: {r['machine']}")
    if "cpu_side" in r:
        from engine.bench.cpu_side import print_cpu_side

        print_cpu_side(r["cpu_side"])
        return
    if "train" in r:
        from engine.bench.train import print_train

        print_train(r["train"])
        return
    if "teachers" in r:
        from engine.bench.teachers import print_teachers

        print_teachers(r["teachers"])
        return
    if "aspects" in r:
        print(f"teacher {r['models']['teacher']}, one image at a time:")
        for a in r["aspects"]:
            print(f"  aspect {a['aspect']:>5g}:1  input {a['teacher_input']:>10}  {a['tokens']:>6} tokens  "
                  f"{a['seconds']:.3f} s  ({a['time_vs_first']:.2f}x aspect {r['aspects'][0]['aspect']:g})")
        return
    if "chaos" in r:
        from engine.bench.chaos import print_chaos

        print_chaos(r["chaos"])
        return
    if "repair" in r:
        from engine.bench.repair import print_repair

        print_repair(r["repair"])
        return
    if "compare" in r:
        from engine.bench.compare import print_compare

        print_compare(r["compare"])
        return
    if "audit" in r:
        a = r["audit"]
        print(f"audit: {a['audit_seconds']:.1f} s, peak RSS {a['audit_peak_rss_mb']:.0f} MiB for {a['rows']} rows")
        return
    if "plan" in r:
        p = r["plan"]
        print(f"planning: {p['plan_seconds']:.2f} s for {p['committed_shards']} committed shards "
              f"({p['inputs']} inputs) in {p['output']}")
        return
    if "flops" in r:
        f = r["flops"]
        print(f"models: teacher {r['models']['teacher']}, sky {r['models']['sky']}")
        print(f"GFLOPs per {f['image']} image: teacher {f['teacher_gflops']:.1f} at {f['teacher_input']}, "
              f"sky {f['sky_gflops']:.1f} at {f['sky_input']}, total {f['total_gflops']:.1f}")
        return
    print(f"models: teacher {r['models']['teacher']}, sky {r['models']['sky']}; {r['images']} images "
          f"({', '.join(r['sizes'])}), batch {r['batch_size']}, median of {r['repeats']}")
    print(f"layout label chose: {r.get('layout', r['workers'])}")
    rows = [("engine end to end", r["end_to_end"]), *[(name, r[key]) for key, name in
            (("model_only", "model only"), ("model_only_per_core", "model only"),
             ("ray_data", "Ray Data pipeline"), ("naive", "naive per-image loop"))
            if key in r]]
    print(f"{'':24}{'images/s':>10}{'min':>9}{'max':>9}")
    for name, f in rows:
        if "skipped" in f:
            print(f"{name:24}  skipped: {f['skipped']}")
        else:
            print(f"{name:24}{f['images_per_second']:>10.3f}{f['min']:>9.3f}{f['max']:>9.3f}"
                  + (f"  {f['layout']}" if f.get("layout") else ""))
    if "model_only_best" in r:
        print(f"best model-only layout measured: {r['model_only_best']['layout']}")
    for name, value in r.get("ratios", {}).items():
        print(f"{name}: {value:.3f}")
    e = r["end_to_end"]
    print(f"engine: start-up {e['startup_seconds']:.1f} s (excluded), models busy {100 * e['model_busy_fraction']:.1f}% "
          f"of actor time, peak worker RSS {e['peak_worker_rss_mb']:.0f} MiB"
          + (f", GPU {e['gpu_utilization']:.0f}% busy" if e.get("gpu_utilization") is not None else ""))
    print(f"output: {e['output_bytes_per_image'] / 1024:.1f} KiB of tar and {e['manifest_bytes_per_row']} B of "
          f"manifest per image" + (f"; {e['s3_requests_per_shard']} S3 requests per shard {e['s3_requests']}"
                                   if e.get("s3_requests_per_shard") else ""))
    if e.get("stage_seconds"):
        print("worker time by stage (last run): " + ", ".join(f"{k} {v:.2f} s" for k, v in e["stage_seconds"].items()))
    if "memory" in r:
        m = r["memory"]
        print(f"memory: peak worker RSS {m['small']['peak_worker_rss_mb']:.0f} MiB for {m['small']['images']} images, "
              f"{m['large']['peak_worker_rss_mb']:.0f} MiB for {m['large']['images']} images "
              f"(ratio {m['large_over_small']:.3f})")
    if "hostile" in r:
        h = r["hostile"]
        print(f"hostile input: peak worker RSS {h['hostile']['peak_worker_rss_mb']:.0f} MiB for {h['hostile']['images']} "
              f"hostile samples ({h['hostile']['samples_error']} refused), {h['ordinary']['peak_worker_rss_mb']:.0f} MiB "
              f"for as many photos (ratio {h['hostile_over_ordinary']:.3f}; goal <= 1.5)")
        m = h["many_members"]
        print(f"many-member samples: peak worker RSS {m['peak_worker_rss_mb']:.0f} MiB for {m['images']} samples of a "
              f"photo and 8 x 8 MiB members ({m['shard_mb']:.0f} MiB of shard; ratio {h['many_members_over_ordinary']:.3f}; "
              "goal <= 1.5)")
