"""The label job's configuration: typed, validated when built, shared by the CLI and
the Python API."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.errors import ConfigError
from labelers.normalize import TEACHER_OUTPUTS
from storage.label_format import parse_label_size

if TYPE_CHECKING:  # decoding's and ground truth's modules (PIL) load when a job is built, not with the CLI
    from labelers.ground_truth import GroundTruthRule
    from pipelines.decode import SampleLimits

DEFAULT_TEACHER = "depth-anything/Depth-Anything-V2-Large-hf"
DEFAULT_SKY = "nvidia/segformer-b5-finetuned-ade-640-640"
# A new OUTPUT's labels (`label` without --label-size): at the teacher's size, what the paper's student
# trains on, at a quarter of the CPU and a third of the bytes of image-sized labels on SA-1B photos
# (README, "The label's size").
DEFAULT_LABEL_SIZE = "teacher"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "fp16", "bf16")


def _default_limits() -> SampleLimits:
    from pipelines.decode import SampleLimits

    return SampleLimits()


@dataclass(frozen=True, kw_only=True)
class ActorJob:
    """What a read-only job on the engine's actors takes besides its own fields (evaluate,
    compare): batches, actors, device, precision, attempts, the cluster, threads, the bar.
    Keyword-only, so each job's own fields keep their places; checked by check_resources."""

    batch_size: int = 8
    workers: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_attempts: int = 3
    ray_address: str | None = None
    threads: int = 4
    progress: bool = True


@dataclass(frozen=True)
class LabelConfig:
    input: str
    output: str
    teacher: str | None = DEFAULT_TEACHER  # None with ground_truth: `convert-gt`
    teacher_output: str | None = None      # "disparity" | "depth"; None: from the teacher's config
    keep_depth: bool = False               # also keep a depth teacher's metres (depth.png)
    # "image" | "teacher" | N (storage.label_format.label_size). The CLI's default for a new OUTPUT
    # is DEFAULT_LABEL_SIZE; this one, the image's, is SPEC §3's, for callers that lay labels on images.
    label_size: str | int = "image"
    draft_decode: bool = False             # JPEGs decoded at the models' DCT scale (--draft-decode)
    sky: str | None = DEFAULT_SKY          # None: no sky segmentation (--sky none)
    ground_truth: GroundTruthRule | None = None   # labels from the samples' own ground truth
    batch_size: int = 8
    workers: int | None = None             # CPU actors; GPU runs use one actor per GPU
    device: str = "auto"
    dtype: str = "auto"
    max_attempts: int = 3
    retry_failed: bool = False
    ray_address: str | None = None
    threads: int = 4                       # decode/encode threads per actor
    limits: SampleLimits = field(default_factory=_default_limits)   # per-sample bytes, pixels, aspect
    progress: bool = True
    # The job lease (one label per OUTPUT): a dead driver's lease lapses after this long.
    lease_seconds: float = field(default_factory=lambda: float(os.environ.get("DEPTH_ENGINE_LEASE_SECONDS", 60)))
    # A shard's commit claim (storage.commit): a retry waits at most about twice this when
    # an attempt died inside its commit. Must leave room for completing one upload.
    claim_seconds: float = field(default_factory=lambda: float(os.environ.get("DEPTH_ENGINE_CLAIM_SECONDS", 60)))

    def __post_init__(self):
        if not self.input:
            raise ConfigError("INPUT is empty")
        if not self.output:
            raise ConfigError("OUTPUT is empty")
        if (self.teacher is None) == (self.ground_truth is None):
            raise ConfigError("a job labels with a teacher or converts ground truth, exactly one of them")
        check_teacher_output(self)
        try:
            object.__setattr__(self, "label_size", parse_label_size(self.label_size))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.label_size != "image" and self.teacher is None:
            raise ConfigError("--label-size: a ground-truth conversion keeps its labels at the image's size")
        if self.draft_decode and self.teacher is None:
            raise ConfigError("--draft-decode: a ground-truth conversion decodes its images at full size")
        if self.keep_depth and self.teacher is None:
            raise ConfigError("--keep-depth keeps a teacher's depth; ground truth carries its own member")
        check_resources(self)
        if self.claim_seconds < 4:
            raise ConfigError(f"the shard claim must be >= 4 s, got {self.claim_seconds}")
        if self.lease_seconds <= 0:
            raise ConfigError(f"the job lease must be > 0 s, got {self.lease_seconds}")


def check_teacher_output(config) -> None:
    """--teacher-output names a kind, and only beside a teacher (label, evaluate)."""
    if config.teacher_output is None:
        return
    if config.teacher_output not in TEACHER_OUTPUTS:
        raise ConfigError(f"--teacher-output must be one of {', '.join(TEACHER_OUTPUTS)}, "
                          f"got {config.teacher_output!r}")
    if config.teacher is None:
        raise ConfigError("--teacher-output describes a teacher; ground truth has none")


def check_resources(config) -> None:
    """The settings every engine job shares (label, convert-gt, evaluate): batches, actors,
    attempts, device and precision."""
    if config.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {config.batch_size}")
    if config.workers is not None and config.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {config.workers}")
    if config.max_attempts < 1:
        raise ConfigError(f"--max-attempts must be >= 1, got {config.max_attempts}")
    if config.device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {config.device!r}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    if config.dtype in ("fp16", "bf16") and config.device == "cpu":
        raise ConfigError(f"--dtype {config.dtype} needs --device cuda; the CPU path runs in fp32")
    if config.threads < 1:
        raise ConfigError(f"threads must be >= 1, got {config.threads}")
