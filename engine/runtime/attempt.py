"""The envelope the runtime puts around any flow's result: who ran the attempt and what it
cost. Flows (label, convert-gt, evaluate) return their own result types and know nothing of
this; the driver sums the envelopes alike, whatever the flow."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Attempt:
    result: object                  # the flow's own result (ShardResult, ShardEvaluation, ...)
    worker: str
    attempt: int
    seconds: float                  # wall time of the attempt inside the actor
    peak_rss_bytes: int             # the worker process's peak so far
    gpu_utilization: float | None   # mean sampled GPU utilization (%), None without a GPU
    s3_requests: dict               # this attempt's S3 requests, by operation
    s3_retries: dict = field(default_factory=dict)   # of them, retries (storage.s3_client)


@dataclass
class Telemetry:
    """The attempts of one run, summed: what a summary or a benchmark reports of the workers."""

    attempts: int = 0
    peak_rss_bytes: int = 0
    s3_requests: dict = field(default_factory=dict)
    s3_retries: dict = field(default_factory=dict)
    _gpu: list = field(default_factory=list)     # (utilization, seconds)

    def add(self, a: Attempt) -> None:
        self.attempts += 1
        self.peak_rss_bytes = max(self.peak_rss_bytes, a.peak_rss_bytes)
        for op, n in a.s3_requests.items():
            self.s3_requests[op] = self.s3_requests.get(op, 0) + n
        for op, n in a.s3_retries.items():
            self.s3_retries[op] = self.s3_retries.get(op, 0) + n
        if a.gpu_utilization is not None:
            self._gpu.append((a.gpu_utilization, a.seconds))

    @property
    def gpu_utilization(self) -> float | None:
        """Mean utilization weighted by each attempt's time."""
        if not self._gpu:
            return None
        return sum(u * s for u, s in self._gpu) / max(sum(s for _, s in self._gpu), 1e-9)
