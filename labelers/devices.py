"""Device and precision choices, resolved once so a bad flag fails at start, not mid-job."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """auto -> cuda when available, else cpu; an explicit cuda without CUDA is a config error."""
    if isinstance(name, torch.device):
        name = str(name)
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} needs CUDA, but torch sees no CUDA device here")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"--device must be auto, cpu or cuda[:N], got {name!r}")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> bf16 (fp16 where bf16 is unsupported) on CUDA, fp32 on CPU.

    Half precision on CPU is refused rather than silently slow and numerically different.
    """
    name = name.strip().lower()
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        if not on_cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto, fp32, fp16 or bf16, got {name!r}")
    if name != "fp32" and not on_cuda:
        raise ValueError(f"--dtype {name} needs a CUDA device; the CPU path runs in fp32")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision on CUDA for fp16/bf16; a no-op context everywhere else.

    Weights stay fp32 under autocast, so reductions and the output keep full precision.
    """
    if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def upload(images: Sequence[np.ndarray], device: torch.device | str) -> list:
    """uint8 HxWx3 images as tensors on ``device``, uploaded once for every model that reads
    them: through pinned memory with non-blocking copies on CUDA, so the copies overlap;
    unchanged (numpy) on CPU, where there is nothing to move."""
    device = torch.device(device)
    if device.type != "cuda":
        return list(images)
    return [torch.from_numpy(np.ascontiguousarray(im)).pin_memory().to(device, non_blocking=True)
            for im in images]


class GpuSampler:
    """Samples the GPU's utilization (NVML, through torch) every ``period`` seconds while in
    use; ``mean`` is None where there is no GPU or no NVML."""

    def __init__(self, device: torch.device | str, period: float = 0.5):
        self.device, self.period = torch.device(device), period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "GpuSampler":
        if self.device.type == "cuda" and self._read() is not None:
            self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _read(self) -> float | None:
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:  # noqa: BLE001 - no NVML (pynvml) in this environment
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            value = self._read()
            if value is not None:
                self.samples.append(value)

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None
