"""The command line's grammar: every command, flag and default, and nothing that runs."""
from __future__ import annotations

import argparse

from engine.config import DEFAULT_SKY, DEFAULT_TEACHER, DTYPES, ConfigError
from labelers.normalize import TEACHER_OUTPUTS


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
    p.add_argument("--max-sample-bytes", type=int, default=d.max_sample_bytes, metavar="N",
                   help="refuse a sample whose members hold more than N bytes together, the rest unread "
                        "(default: %(default)s)")


def _limits(args):
    from pipelines.decode import SampleLimits

    try:
        return SampleLimits(max_pixels=args.max_image_pixels, max_aspect=args.max_aspect,
                            max_member_bytes=args.max_member_bytes, max_sample_bytes=args.max_sample_bytes)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _resource_arguments(p: argparse.ArgumentParser) -> None:
    """What every engine job takes (label, convert-gt, evaluate): batches, actors, device."""
    p.add_argument("--batch-size", type=int, default=8, metavar="N")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="CPU actors sharing the CPUs (default: one single-threaded actor per CPU, as memory allows; GPU runs use one actor per GPU)")
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
    lab.add_argument("--label-size", default=None, metavar="image|teacher|N",
                     help="the labels' size: the teacher's (the image's aspect, short side that of the teacher's "
                          "input: 518 for Depth Anything; the default for a new OUTPUT), the image's, or the long "
                          "side capped at N pixels; job.json pins it, and a rerun without it keeps the OUTPUT's")
    lab.add_argument("--draft-decode", action="store_true",
                     help="decode each JPEG in the DCT domain at the smallest 1/2, 1/4 or 1/8 scale that still "
                          "covers the models' input (1.6x faster decode at 3.4 MP, 1.7x at 12 MP); the models' "
                          "input moves by up to ~14 grey levels, past the processor path's own 1, so labels "
                          "differ beyond float noise: off by default; job.json pins it")
    lab.add_argument("--dry-run", action="store_true",
                     help="write nothing: say the shards and images pending, the rate, and the job's projected "
                          "wall time, worker-hours, output bytes, S3 requests and cost")
    lab.add_argument("--rate", type=float, default=None, metavar="IMAGES_PER_SECOND_PER_WORKER",
                     help="with --dry-run: images/s of one worker (default: the latest run recorded in OUTPUT, "
                          "else a calibration on one worker of the cluster)")
    lab.add_argument("--calibrate", action="store_true",
                     help="with --dry-run: calibrate even when OUTPUT records an earlier run's rate")
    lab.add_argument("--price-per-hour", type=float, default=None, metavar="USD",
                     help="with --dry-run: the price of one worker-hour (one GPU actor, or one CPU actor's "
                          "cores) for the cost")
    lab.add_argument("--repair-errors", action="store_true",
                     help="relabel only the error rows of committed shards (their inputs fixed since); each "
                          "such shard is rewritten as a new generation, its other samples copied byte for byte")
    lab.add_argument("--reason", default=None, metavar="REGEX",
                     help="with --repair-errors: only the error rows whose reason this matches (Python re.search)")

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

    cmp_ = sub.add_parser("compare", help="two label sets side by side, per sample: agreement after "
                          "scale-and-shift alignment, sky IoU, inverted labels")
    cmp_.add_argument("a", metavar="A", help="an OUTPUT")
    cmp_.add_argument("b", metavar="B", help="the reference: an OUTPUT, or a teacher (a model, "
                      "or plugin:NAME) that labels A's sampled images now")
    cmp_.add_argument("--sample", type=float, default=1.0, metavar="F",
                      help="compare a fraction of the samples, chosen by a hash of shard and key (default: all)")
    cmp_.add_argument("--out", default=None, metavar="PARQUET", help="one row per compared sample (local or s3://)")
    cmp_.add_argument("--html", default=None, metavar="FILE", help="write the worst pairs as a contact sheet")
    cmp_.add_argument("--worst", type=int, default=24, metavar="N", help="the worst pairs kept (default: 24)")
    cmp_.add_argument("--sky", default=None, metavar="MODEL",
                      help="B a teacher: its sky model, or none (default: the one A was labeled with)")
    _resource_arguments(cmp_)
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
    b.add_argument("--compare", type=int, default=0, metavar="N",
                   help="only compare: two synthetic OUTPUTs of N samples each, all and a 1%% sample")
    b.add_argument("--chaos", type=int, default=0, metavar="N",
                   help="only a chaos run: a job of N shards on a 3-node local Ray cluster, calm and while "
                        "workers are killed and a node removed, side by side")
    b.add_argument("--audit", type=int, default=0, metavar="ROWS",
                   help="only time `audit --json` over a synthetic manifest of ROWS rows")
    b.add_argument("--repair", type=int, default=0, metavar="N",
                   help="only label --repair-errors on a shard of N photos (5%% fixed since) beside relabeling it whole")
    b.add_argument("--output", default=None, metavar="URL",
                   help="OUTPUT prefix of the end-to-end runs (e.g. s3://bkt/bench/), or of --plan/--audit")
    b.add_argument("--repeats", type=int, default=3, metavar="N", help="timed runs of each figure (median reported)")
    b.add_argument("--engine-only", action="store_true", help="skip the model-only, Ray Data and naive figures")
    b.add_argument("--flops", action="store_true",
                   help="only count the models' FLOPs per image (one image of the first --sizes) and exit")
    b.add_argument("--stand-in-rate", type=float, default=0.0, metavar="R",
                   help="only the CPU side at photo sizes (0.3, 1, 3.4, 12 MP; or --sizes), the model step on a "
                        "stand-in accelerator of R images/s with realistic maps, and exit (e.g. 300)")
    b.add_argument("--threads", type=int, default=4, metavar="N", help="codec threads of the --stand-in-rate flow")
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
    ver.add_argument("--requeue", action="store_true",
                     help="move each bad shard's commit record aside (to requeued/, kept) so the next label run "
                          "relabels it")

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
    tr.add_argument("--exclude", action="append", metavar="PARQUET[:COLUMN]",
                    help="leave the (shard, key) rows of this Parquet file out of the --pseudo OUTPUTs; with "
                         ":COLUMN only the rows where that boolean column is true (e.g. `compare --out`'s "
                         "FILE:disagree); repeatable")

    demo = sub.add_parser("demo", help="label sample photos with a local Ray (offline-capable)")
    demo.add_argument("output", metavar="OUTPUT", nargs="?", default="demo-output")
    demo.add_argument("--json", action="store_true")
    return p
