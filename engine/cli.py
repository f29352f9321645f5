"""``depth-engine``: a thin edge over the Python API. Exit 0 on success, 2 on a usage or
configuration error (one line, no traceback), 3 when shards failed permanently."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from engine.config import DEFAULT_SKY, DEFAULT_TEACHER, DTYPES, ConfigError, LabelConfig
from engine.errors import JobAborted
from engine.progress import print_summary
from labelers.normalize import TEACHER_OUTPUTS
from storage.objectstore import StorageError


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(f"{self.prog}: {message}")


def _job_arguments(p: argparse.ArgumentParser) -> None:
    """What `label` and `convert-gt` share: the engine's inputs, outputs and resources."""
    p.add_argument("input", metavar="INPUT", help="brace pattern, prefix/, directory, glob or @FILE")
    p.add_argument("output", metavar="OUTPUT", help="s3://bucket/prefix/ or a local directory")
    p.add_argument("--sky", default=DEFAULT_SKY, metavar="MODEL|none",
                   help="sky segmentation model, or none (default: %(default)s)")
    _resource_arguments(p)
    p.add_argument("--retry-failed", action="store_true", help="retry shards that exhausted their attempts")
    _limit_arguments(p)


def _limit_arguments(p: argparse.ArgumentParser) -> None:
    """What one sample may cost a worker; beyond it the sample is an error row (README "Limits")."""
    from pipelines.decode import SampleLimits

    d = SampleLimits()
    p.add_argument("--max-image-pixels", type=int, default=d.max_pixels, metavar="N",
                   help="refuse images whose header claims more pixels (default: %(default)s)")
    p.add_argument("--max-aspect", type=float, default=d.max_aspect, metavar="R",
                   help="refuse images whose long side / short side exceeds R (default: %(default)s)")
    p.add_argument("--max-member-bytes", type=int, default=d.max_member_bytes, metavar="N",
                   help="refuse a sample with a tar member larger than N bytes, unread (default: %(default)s)")


def _limits(args):
    from pipelines.decode import SampleLimits

    try:
        return SampleLimits(max_pixels=args.max_image_pixels, max_aspect=args.max_aspect,
                            max_member_bytes=args.max_member_bytes)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _resource_arguments(p: argparse.ArgumentParser) -> None:
    """What every engine job takes (label, convert-gt, evaluate): batches, actors, device."""
    p.add_argument("--batch-size", type=int, default=8, metavar="N")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="CPU actors (GPU runs use one actor per GPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=list(DTYPES))
    p.add_argument("--max-attempts", type=int, default=3, metavar="N")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="attach to a running Ray cluster")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _ground_truth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gt-scale", type=float, default=1.0, metavar="S",
                   help="stored value / S = metres or disparity (KITTI png: 256, NYUv2 mm png: 1000)")
    p.add_argument("--max-depth", type=float, default=None, metavar="M",
                   help="depth beyond M metres is invalid (metric depth members only)")


def _rule(args):
    from labelers.ground_truth import GroundTruthRule

    try:
        return GroundTruthRule(scale=args.gt_scale, max_depth=args.max_depth)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _teacher_output_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher-output", choices=TEACHER_OUTPUTS, default=None,
                   help="what the teacher outputs, where its config does not say (DPT): relative "
                        "disparity, metric depth, or metric inverse depth (default: from the teacher's config)")


def build_parser() -> Parser:
    p = Parser(prog="depth-engine", description="Depth Anything pseudo-labels at cluster scale.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    lab = sub.add_parser("label", help="label input shards into OUTPUT (resumes when rerun)")
    _job_arguments(lab)
    lab.add_argument("--teacher", default=DEFAULT_TEACHER, metavar="MODEL",
                     help="hub id, local directory or s3:// prefix, or plugin:NAME[:ARG] for a teacher "
                          "plugin (default: %(default)s)")
    _teacher_output_argument(lab)
    lab.add_argument("--keep-depth", action="store_true",
                     help="a metric teacher: also keep its metres as <key>.depth.png "
                          "(16-bit, metres x 256, 0 = none: the KITTI convention)")

    gt = sub.add_parser("convert-gt", help="convert labeled shards (image + depth/disparity) into the label format")
    _job_arguments(gt)
    _ground_truth_arguments(gt)

    ev = sub.add_parser("evaluate", help="a teacher's AbsRel and δ1 on a labeled INPUT or OUTPUT (MiDaS protocol)")
    ev.add_argument("source", metavar="OUTPUT_OR_INPUT",
                    help="an OUTPUT (its committed shards, stored labels scored too) or an INPUT pattern")
    ev.add_argument("--teacher", required=True, metavar="MODEL", help="hub id, local directory or s3:// prefix")
    _teacher_output_argument(ev)
    _ground_truth_arguments(ev)
    _resource_arguments(ev)

    st = sub.add_parser("status", help="committed / failed / pending shards of OUTPUT")
    st.add_argument("output", metavar="OUTPUT")
    st.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="measure end-to-end throughput and worker memory on synthetic shards")
    b.add_argument("--teacher", default=None, metavar="MODEL", help="default: a random-weight teacher")
    b.add_argument("--sky", default=None, metavar="MODEL|none", help="default: a random-weight segmenter")
    b.add_argument("--teacher-size", default="vits", choices=["tiny", "vits", "vitb", "vitl"])
    b.add_argument("--sky-size", default="b0", choices=["tiny", "b0", "b5"])
    b.add_argument("--image-size", type=int, default=518, metavar="N", help="random teacher's input size")
    b.add_argument("--sky-image-size", type=int, default=512, metavar="N", help="random segmenter's input size")
    b.add_argument("--images", type=int, default=None, metavar="N",
                   help="images per figure (default: 64; 6 with --teachers)")
    b.add_argument("--sizes", default=None, metavar="WxH,...")
    b.add_argument("--memory", action="store_true", help="also peak worker RSS for N and 10 N image shards")
    b.add_argument("--aspects", default=None, metavar="R,R,...",
                   help="only time the teacher on one image per aspect ratio (e.g. 1,2,4,8,16) and exit")
    b.add_argument("--teachers", action="store_true", help="only time each teacher family: the engine's teacher "
                   "beside transformers' own pipeline, and exit")
    b.add_argument("--train", action="store_true", help="only time the student trainer end to end beside its "
                   "model step alone (same model and batch), and exit")
    b.add_argument("--hostile", action="store_true",
                   help="also peak worker RSS for N hostile samples (lying headers, sparse members, 10x10000) beside N photos")
    b.add_argument("--batch-size", type=int, default=8, metavar="N")
    b.add_argument("--workers", type=int, default=None, metavar="N")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--dtype", default="auto", choices=list(DTYPES))
    b.add_argument("--workdir", default=None, metavar="DIR")
    b.add_argument("--plan", type=int, default=0, metavar="N",
                   help="only time resume planning over an OUTPUT with N committed shards")
    b.add_argument("--audit", type=int, default=0, metavar="ROWS",
                   help="only time `audit --json` over a synthetic manifest of ROWS rows")
    b.add_argument("--output", default=None, metavar="URL",
                   help="OUTPUT prefix of the end-to-end runs (e.g. s3://bkt/bench/), or of --plan/--audit")
    b.add_argument("--repeats", type=int, default=3, metavar="N", help="timed runs of each figure (median reported)")
    b.add_argument("--engine-only", action="store_true", help="skip the model-only, Ray Data and naive figures")
    b.add_argument("--flops", action="store_true",
                   help="only count the models' FLOPs per image (one image of the first --sizes) and exit")
    b.add_argument("--json", action="store_true")

    au = sub.add_parser("audit", help="manifest statistics and suspect samples/shards of OUTPUT")
    au.add_argument("output", metavar="OUTPUT")
    au.add_argument("--json", action="store_true")
    au.add_argument("--html", default=None, metavar="FILE", help="also write a self-contained HTML report")

    ver = sub.add_parser("verify", help="re-read every committed shard and check it against its manifest part")
    ver.add_argument("output", metavar="OUTPUT")
    ver.add_argument("--workers", type=int, default=None, metavar="N",
                     help="shards checked at once (default: up to 8)")
    ver.add_argument("--json", action="store_true")

    tr = sub.add_parser("train-student", help="train a Depth Anything student on labeled + pseudo-labeled OUTPUTs")
    tr.add_argument("--labeled", action="append", required=True, metavar="OUTPUT")
    tr.add_argument("--pseudo", action="append", required=True, metavar="OUTPUT")
    start = tr.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", nargs=2, metavar=("dinov2", "DIR"),
                       help="the paper's student: the encoder of the save_pretrained Dinov2Model in DIR, "
                            "a fresh DPT head sized as the paper's S/B/L/G")
    start.add_argument("--student", metavar="DIR",
                       help="fine-tune a save_pretrained DepthAnythingForDepthEstimation instead")
    tr.add_argument("--frozen", metavar="DIR", help="save_pretrained Dinov2Model to align to, kept frozen "
                                                    "(default: --init's DIR; needed with --student)")
    tr.add_argument("--out", required=True, metavar="DIR", help="run directory (resumes from its checkpoint)")
    tr.add_argument("--steps", type=int, default=1000)
    tr.add_argument("--batch-size", type=int, default=6)
    tr.add_argument("--crop", type=int, default=518, help="square training crop (paper: 518)")
    tr.add_argument("--lr", type=float, default=5e-6, help="encoder lr, AdamW, linear decay (paper: 5e-6)")
    tr.add_argument("--decoder-lr-factor", type=float, default=10.0, help="decoder lr = this x --lr (paper: 10)")
    tr.add_argument("--ratio", default="1:2", metavar="L:P",
                    help="labeled : pseudo-labeled samples in each batch (paper: 1:2)")
    tr.add_argument("--trim", type=float, default=0.1,
                    help="pseudo-labeled images: drop this share of each image's largest pixel losses "
                         "(Depth Anything V2: 0.1; labeled images keep all)")
    tr.add_argument("--alpha", type=float, default=0.85,
                    help="feature alignment tolerance: positions with cosine above it are left out (paper: 0.85)")
    tr.add_argument("--cutmix-p", type=float, default=0.5,
                    help="probability that a batch's pseudo-labeled images are CutMixed (paper: 0.5)")
    tr.add_argument("--ray", action="store_true", help="run as a Ray Train job (README: two ways to launch)")
    tr.add_argument("--ray-address", default=None, metavar="ADDR",
                    help="with --ray: attach to a running Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    tr.add_argument("--ray-workers", type=int, default=None, metavar="N",
                    help="with --ray: training workers (default: the cluster's GPUs, else 2)")
    tr.add_argument("--gpus-per-worker", type=int, default=None, metavar="G",
                    help="with --ray: 0 or 1 (default: 1 when the cluster has GPUs, else 0)")
    tr.add_argument("--cpus-per-worker", type=float, default=None, metavar="C",
                    help="with --ray: CPUs reserved per worker (default: the node's CPUs per GPU, else a share)")
    tr.add_argument("--save-every", type=int, default=100)
    tr.add_argument("--stop-after", type=int, default=None, metavar="N", help="run at most N steps now")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--loader-workers", type=int, default=2, metavar="N",
                    help="DataLoader worker processes per stream (labeled, pseudo) and rank; 0: in-process")
    tr.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                    help="autocast precision (auto: bf16 on CUDA, fp32 on CPU)")
    tr.add_argument("--clip-grad", type=float, default=1.0, metavar="NORM", help="max gradient norm (0: off)")
    tr.add_argument("--accum", type=int, default=1, metavar="N",
                    help="micro-batches of --batch-size per optimizer step (--steps counts optimizer steps)")
    tr.add_argument("--val", default=None, metavar="OUTPUT",
                    help="a convert-gt OUTPUT to score the student on (AbsRel, delta1); keeps best/")
    tr.add_argument("--val-every", type=int, default=None, metavar="N",
                    help="validate every N steps and at the last (default: every --save-every)")

    demo = sub.add_parser("demo", help="label sample photos with a local Ray (offline-capable)")
    demo.add_argument("output", metavar="OUTPUT", nargs="?", default="demo-output")
    demo.add_argument("--json", action="store_true")
    return p


def _label(args) -> int:
    from engine.label import label

    gt = args.command == "convert-gt"
    config = LabelConfig(
        input=args.input, output=args.output, teacher=None if gt else args.teacher,
        teacher_output=None if gt else args.teacher_output, keep_depth=getattr(args, "keep_depth", False),
        ground_truth=_rule(args) if gt else None,
        sky=None if args.sky.lower() == "none" else args.sky, batch_size=args.batch_size,
        workers=args.workers, device=args.device, dtype=args.dtype,
        max_attempts=args.max_attempts, retry_failed=args.retry_failed,
        ray_address=args.ray_address, progress=sys.stderr.isatty() or not args.json, limits=_limits(args))
    summary = label(config)
    print_summary(summary.to_json(), args.json)
    return summary.exit_code


def _evaluate(args) -> int:
    from engine.evaluate import EvalConfig, evaluate, print_report

    config = EvalConfig(source=args.source, teacher=args.teacher, teacher_output=args.teacher_output,
                        ground_truth=_rule(args),
                        batch_size=args.batch_size, workers=args.workers, device=args.device, dtype=args.dtype,
                        max_attempts=args.max_attempts, ray_address=args.ray_address,
                        progress=sys.stderr.isatty() or not args.json)
    report = evaluate(config)
    print(json.dumps(report, indent=2)) if args.json else print_report(report)
    return 3 if report["failed_shards"] else 0


def _status(args) -> int:
    from engine.status import status
    from storage.objectstore import open_store

    s = status(open_store(args.output))
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(f"{s['committed']} committed, {s['failed']} failed, {s['pending']} pending, of {s['total']}")
        for name in s["failed_shards"]:
            print(f"  failed: {name}")
    return 0


def _audit(args) -> int:
    from engine import job
    from pipelines.audit import audit
    from storage.objectstore import open_store

    output = open_store(args.output)
    if job.read(output) is None and not any(True for _ in output.list("manifest/")):
        raise ConfigError(f"{output.url} has no job.json and no manifest/: not a depth-engine OUTPUT")
    report = audit(output)
    if args.html:
        from pipelines.audit_html import write_html

        write_html(report, output, args.html)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_audit(report)
    return 0


def print_audit(r: dict) -> None:
    s = r["shards"]
    print(f"{r['samples']} samples: {r['ok']} ok, {r['errors']} errors; shards: {s['committed']} committed, "
          f"{s['failed']} failed, {s['pending']} pending of {s['total']}")
    for reason, n in list(r["errors_by_reason"].items())[:10]:
        print(f"  {n:>8}  {reason}")
    if r["source_kind"].get("gt") and r["valid_fraction"]["count"]:
        kinds = ", ".join(f"{n} {k}" for k, n in r["source_kind"].items())
        v = r["valid_fraction"]
        print(f"samples by source: {kinds}; valid fraction of ground truth: mean {v['mean']:.3f}, min {v['min']:.3f}")
    conf = r["confidence"]
    if conf["count"]:
        print(f"teacher confidence (conf_mean): mean {conf['mean']:.3f}, p50 {conf['p50']:.3f}, min {conf['min']:.3f}")
    sky, rng = r["sky_fraction"], r["disparity"]["raw_range"]
    if sky["count"]:
        print(f"sky fraction: mean {sky['mean']:.3f}, p50 {sky['p50']:.3f}, p95 {sky['p95']:.3f}")
    if rng["count"]:
        print(f"raw disparity range: p50 {rng['p50']:.4g}, p95 {rng['p95']:.4g}; "
              f"degenerate labels: {r['disparity']['degenerate']}")
    for kind, f in r["flags"]["samples"].items():
        if f["count"]:
            print(f"flagged {kind}: {f['count']} samples, e.g. {f['samples'][0]['shard']}/{f['samples'][0]['key']}")
    for sh in r["flags"]["shards"]["high_error_rate"]:
        print(f"flagged shard {sh['shard']}: error rate {sh['error_rate']:.1%}")


def _verify(args) -> int:
    from pipelines.verify import NotAnOutput, verify
    from storage.objectstore import open_store

    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    try:
        store = open_store(args.output)
    except ValueError as e:  # a URL no store can open
        raise ConfigError(str(e)) from None
    try:
        result = verify(store, workers=args.workers)
    except NotAnOutput as e:
        raise ConfigError(str(e)) from None
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    elif result.ok:
        print(f"{result.checked} shards checked, all agree")
    else:
        print(f"{result.checked} shards checked, {len(result.bad)} disagree with their manifest part:")
        for bad in result.bad:
            print(f"  {bad.shard}:")
            for problem in bad.problems:
                print(f"    {problem}")
    return 0 if result.ok else 1


def _train_student(args) -> int:
    from pipelines.student.errors import TrainSetupError
    from pipelines.student.train import TrainConfig, train

    try:
        if args.init and args.init[0] != "dinov2":
            raise ValueError(f"--init {args.init[0]}: the student is built from a DINOv2 encoder: --init dinov2 DIR")
        cfg = TrainConfig(labeled=tuple(args.labeled), pseudo=tuple(args.pseudo), student=args.student,
                          init=args.init[1] if args.init else None,
                          frozen=args.frozen, out=args.out, steps=args.steps, batch_size=args.batch_size,
                          crop=args.crop, lr=args.lr, decoder_lr_factor=args.decoder_lr_factor,
                          ratio=_ratio(args.ratio), trim=args.trim, alpha=args.alpha, cutmix_p=args.cutmix_p,
                          save_every=args.save_every, stop_after=args.stop_after, seed=args.seed,
                          loader_workers=args.loader_workers, dtype=args.dtype, clip_grad=args.clip_grad,
                          accum=args.accum, val=args.val, val_every=args.val_every)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ray_flags = (args.ray_address, args.ray_workers, args.gpus_per_worker, args.cpus_per_worker)
    if not args.ray and any(v is not None for v in ray_flags):
        raise ConfigError("--ray-address, --ray-workers, --gpus-per-worker and --cpus-per-worker need --ray")
    try:
        history = _on_ray(cfg, args) if args.ray else train(cfg)
    except TrainSetupError as e:
        raise ConfigError(str(e)) from None
    if history is None:
        return 1
    if history and os.environ.get("RANK", "0") == "0":
        last = history[-1]
        print(f"step {last['step']}: total {last['total']:.4f} (labeled {last['labeled']:.4f}, "
              f"unlabeled {last['unlabeled']:.4f}, feature {last['feature']:.4f}); checkpoint: {args.out.rstrip('/')}/latest.json")
    return 0


def _on_ray(cfg, args) -> list[dict] | None:
    """``train-student --ray``: the loop on Ray Train workers. A configuration error in a worker
    exits 2, any other worker failure prints its one line and gives None (exit 1)."""
    from pipelines.student.on_ray import RayScaling, WorkerFailed, train_on_ray
    from storage.objectstore import redact

    scaling = RayScaling(ray_address=args.ray_address, workers=args.ray_workers,
                         gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker)
    try:
        return train_on_ray(cfg, scaling)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except WorkerFailed as e:
        print(redact(f"depth-engine: {e}"), file=sys.stderr)
        return None


def _ratio(text: str) -> tuple[int, int]:
    try:
        labeled, pseudo = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--ratio must be L:P (two whole numbers, e.g. 1:2), got {text!r}") from None
    return labeled, pseudo


def _demo(args) -> int:
    from engine.demo import run_demo

    return run_demo(args.output, as_json=args.json)


def _aspects(text: str | None) -> list[float]:
    try:
        aspects = [float(a) for a in (text or "").split(",") if a]
    except ValueError:
        raise ConfigError(f"--aspects must look like 1,2,4,8, got {text!r}") from None
    if text and (not aspects or min(aspects) < 1):
        raise ConfigError(f"--aspects must be ratios >= 1, like 1,2,4,8, got {text!r}")
    return aspects


def _bench(args) -> int:
    from engine.bench import BenchConfig, parse_sizes, print_report, run_bench
    from engine.bench_teachers import TEACHER_IMAGES

    images = args.images if args.images is not None else TEACHER_IMAGES if args.teachers else BenchConfig.images
    cfg = BenchConfig(
        teacher=args.teacher, sky=args.sky, teacher_size=args.teacher_size, sky_size=args.sky_size,
        image_size=args.image_size, sky_image_size=args.sky_image_size, images=images, memory=args.memory, hostile=args.hostile, aspects=_aspects(args.aspects), teachers=args.teachers,
        train=args.train, batch_size=args.batch_size, workers=args.workers, device=args.device, dtype=args.dtype,
        workdir=args.workdir, plan=args.plan, audit=args.audit, output=args.output,
        repeats=args.repeats, baselines=not args.engine_only, flops=args.flops, **({"sizes": parse_sizes(args.sizes)} if args.sizes else {}))
    report = run_bench(cfg)
    print(json.dumps(report, indent=2)) if args.json else print_report(report)
    return 0


COMMANDS = {"label": _label, "convert-gt": _label, "evaluate": _evaluate, "status": _status, "audit": _audit, "verify": _verify, "bench": _bench,
            "train-student": _train_student,
            "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        # Run as the program (`python -m engine`, the `depth-engine` script): leave without
        # interpreter teardown. An Arrow pool thread can still be dropping the last reference to
        # a numpy-backed buffer (the audit's Acero group_by) when Python finalizes; the buffer's
        # destructor takes the GIL, CPython then ends that thread with pthread_exit, and the unwind
        # through a noexcept destructor is std::terminate: exit 134 after complete output. So: do
        # here what teardown would do that matters (Ray is shut down by the commands that start it;
        # an attached driver is disconnected here), flush, and _exit. A caller passing argv returns.
        code = main(sys.argv[1:])
        try:
            if "ray" in sys.modules and sys.modules["ray"].is_initialized():
                sys.modules["ray"].shutdown()
        except Exception:  # noqa: BLE001 - the cluster notices a driver that is gone
            pass
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):  # a closed pipe: Python's own exit says 120 then
                code = code or 120
        os._exit(code)
    # Library chatter (weight-loading bars, backend notices) would bury the progress bar;
    # set before transformers is imported, and inherited by local Ray workers.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # A hub repo with only pickle weights is refused, not converted behind the user's back.
    os.environ.setdefault("DISABLE_SAFETENSORS_CONVERSION", "1")
    logging.basicConfig(level=os.environ.get("DEPTH_ENGINE_LOG", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    # Every message is redacted: a URL or a server may echo credentials (storage.objectstore.redact).
    except UsageError as e:
        from storage.objectstore import redact

        print(redact(str(e)), file=sys.stderr)
        return 2
    except ConfigError as e:
        from storage.objectstore import redact

        print(redact(f"depth-engine: {e}"), file=sys.stderr)
        return 2
    except StorageError as e:
        from storage.objectstore import redact

        print(redact(f"depth-engine: storage: {e}"), file=sys.stderr)
        return 2
    except JobAborted as e:
        from storage.objectstore import redact

        print(redact(f"depth-engine: stopped: {e}. Committed shards are kept; run the same command again to "
                     "resume."), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("depth-engine: interrupted; committed shards are kept. Run the same command again to resume.",
              file=sys.stderr)
        return 130
    except Exception:  # a bug: its traceback as Python would print it, with credentials blanked
        import traceback

        from storage.objectstore import redact

        print(redact(traceback.format_exc()).rstrip(), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
