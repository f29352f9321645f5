"""One function per command: flags to a config, the job API, the result printed; an exit code.
Each imports its job where it runs, so a light command never pays for torch."""
from __future__ import annotations

import os
import sys

from engine.cli.parser import _limits, _rule
from engine.cli.printing import print_audit, print_json, print_repair, print_summary
from engine.config import DEFAULT_LABEL_SIZE, ConfigError, LabelConfig


def _label_size(args) -> str | int:
    """--label-size, or the OUTPUT's own (job.json) when it has one, or the default for a new OUTPUT."""
    if getattr(args, "label_size", None) is not None:
        return args.label_size
    from engine.job import pinned_label_size
    from storage.stores import open_store

    return pinned_label_size(open_store(args.output)) or DEFAULT_LABEL_SIZE


def _label(args) -> int:
    from engine.label import label

    gt = args.command == "convert-gt"
    config = LabelConfig(
        input=args.input, output=args.output, teacher=None if gt else args.teacher,
        teacher_output=None if gt else args.teacher_output, keep_depth=getattr(args, "keep_depth", False),
        draft_decode=getattr(args, "draft_decode", False),
        label_size="image" if gt else _label_size(args),
        ground_truth=_rule(args) if gt else None,
        sky=None if args.sky.lower() == "none" else args.sky, batch_size=args.batch_size,
        workers=args.workers, device=args.device, dtype=args.dtype,
        max_attempts=args.max_attempts, retry_failed=args.retry_failed,
        ray_address=args.ray_address, progress=sys.stderr.isatty() or not args.json, limits=_limits(args))
    if getattr(args, "dry_run", False):
        return _dry_run(args, config)
    _dry_run_flags_alone(args)
    if getattr(args, "repair_errors", False):
        from engine.repair import repair

        summary = repair(config, args.reason)
        print_repair(summary.to_json(), args.json)
        return summary.exit_code
    if getattr(args, "reason", None) is not None:
        raise ConfigError("--reason chooses the error rows of --repair-errors; add --repair-errors")
    summary = label(config)
    print_summary(summary.to_json(), args.json)
    return summary.exit_code


def _dry_run(args, config) -> int:
    from engine.cli.printing import print_estimate
    from engine.dry_run import dry_run

    if getattr(args, "repair_errors", False):
        raise ConfigError("--dry-run estimates a label run; --repair-errors has no dry run")
    estimate = dry_run(config, rate=args.rate, price_per_hour=args.price_per_hour, calibrate=args.calibrate)
    print_estimate(estimate.to_json(), args.json)
    return 0


def _dry_run_flags_alone(args) -> None:
    flags = {"--rate": getattr(args, "rate", None), "--price-per-hour": getattr(args, "price_per_hour", None),
             "--calibrate": getattr(args, "calibrate", False) or None}
    given = [flag for flag, value in flags.items() if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} only go with --dry-run")


def _evaluate(args) -> int:
    from engine.evaluate import EvalConfig, evaluate, print_report

    config = EvalConfig(source=args.source, teacher=args.teacher, teacher_output=args.teacher_output,
                        ground_truth=_rule(args),
                        batch_size=args.batch_size, workers=args.workers, device=args.device, dtype=args.dtype,
                        max_attempts=args.max_attempts, ray_address=args.ray_address,
                        progress=sys.stderr.isatty() or not args.json)
    report = evaluate(config)
    print_json(report) if args.json else print_report(report)
    return 3 if report["failed_shards"] else 0


def _compare(args) -> int:
    from engine.compare import CompareConfig, compare, print_report

    config = CompareConfig(a=args.a, b=args.b, sample=args.sample, out=args.out, worst=args.worst, sky=args.sky,
                           batch_size=args.batch_size, workers=args.workers, device=args.device, dtype=args.dtype,
                           max_attempts=args.max_attempts, ray_address=args.ray_address,
                           progress=sys.stderr.isatty() or not args.json)
    report = compare(config)
    if args.html:
        from engine.cli.compare_html import write_compare_html
        from storage.stores import open_store

        b = open_store(report["b"]) if report["b_kind"] == "output" else None
        write_compare_html(report, open_store(report["a"]), b, args.html)
    print_json(report) if args.json else print_report(report)
    return 3 if report["failed_shards"] else 0


def _status(args) -> int:
    from engine.status import status
    from storage.stores import open_store

    s = status(open_store(args.output))
    if args.json:
        print_json(s)
    else:
        print(f"{s['committed']} committed, {s['failed']} failed, {s['pending']} pending, of {s['total']}")
        for name in s["failed_shards"]:
            print(f"  failed: {name}")
    return 0


def _audit(args) -> int:
    from pipelines.audit import audit
    from storage.output import Output
    from storage.stores import open_store

    output = open_store(args.output)
    if not Output(output).is_output():
        raise ConfigError(f"{output.url} has no job.json and no manifest/: not a depth-engine OUTPUT")
    report = audit(output)
    if args.html:
        from engine.cli.audit_html import write_html

        write_html(report, output, args.html)
    if args.json:
        print_json(report)
    else:
        print_audit(report)
    return 0


def _verify(args) -> int:
    from pipelines.verify import NotAnOutput, verify
    from storage.stores import open_store

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
    requeued = {}
    if args.requeue:
        from storage.output import Output

        requeued = {bad.shard: Output(store).requeue(bad.shard, bad.problems) for bad in result.bad}
    if args.json:
        print_json({**result.to_json(), **({"requeued": requeued} if args.requeue else {})})
    elif result.ok:
        print(f"{result.checked} shards checked, all agree")
    else:
        print(f"{result.checked} shards checked, {len(result.bad)} disagree with their manifest part:")
        for bad in result.bad:
            print(f"  {bad.shard}:" + (f" requeued (record kept as {requeued[bad.shard]})" if requeued else ""))
            for problem in bad.problems:
                print(f"    {problem}")
        if requeued:
            print(f"{len(requeued)} shard(s) requeued: run the same label command again to relabel them")
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
                          accum=args.accum, val=args.val, val_every=args.val_every, exclude=tuple(args.exclude or ()))
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
    from engine.bench.cpu_side import STAND_IN_IMAGES
    from engine.bench.teachers import TEACHER_IMAGES

    images = (args.images if args.images is not None else TEACHER_IMAGES if args.teachers
              else STAND_IN_IMAGES if args.stand_in_rate else BenchConfig.images)
    cfg = BenchConfig(
        teacher=args.teacher, sky=args.sky, teacher_size=args.teacher_size, sky_size=args.sky_size,
        image_size=args.image_size, sky_image_size=args.sky_image_size, images=images, memory=args.memory, hostile=args.hostile, aspects=_aspects(args.aspects), teachers=args.teachers,
        train=args.train, batch_size=args.batch_size, workers=args.workers, device=args.device, dtype=args.dtype,
        workdir=args.workdir, plan=args.plan, audit=args.audit, compare=args.compare, chaos=args.chaos, repair=args.repair, output=args.output,
        repeats=args.repeats, baselines=not args.engine_only, flops=args.flops,
        stand_in_rate=args.stand_in_rate, threads=args.threads, **({"sizes": parse_sizes(args.sizes)} if args.sizes else {}))
    report = run_bench(cfg)
    print_json(report) if args.json else print_report(report)
    return 0


COMMANDS = {"label": _label, "convert-gt": _label, "evaluate": _evaluate, "compare": _compare, "status": _status, "audit": _audit, "verify": _verify, "bench": _bench,
            "train-student": _train_student,
            "demo": _demo}
