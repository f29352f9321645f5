"""What the runtime hands a flow (one shard to work on) and what a flow shows while it works
(live counters): shared by every flow and the engine that schedules them."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ShardTask:
    source: str        # input shard URL
    name: str          # output name (layout.shard_name(source))
    attempt: int = 1


@dataclass
class Progress:
    """Live counters of the shard in flight, read by the engine's progress bar."""

    samples: int = 0
    errors: int = 0
    model_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
