"""``label --repair-errors``: relabel only the error rows of committed shards, each shard rewritten
as its next generation (pipelines.repair) on the engine's actors.

Order of work, as ``label``: the job checked on the driver (the same teacher, sky model and label
parameters as job.json, or exit 2), the job lease, then a plan from the committed shards'
manifest parts: which have error rows that ``--reason`` matches, and which still keep a tar that
an interrupted repair superseded (removed here: only a committed shard's unreferenced tars, under
the job lease, so no attempt can be writing them). Pending and failed shards are left to a plain
``label`` run: a repair never labels a shard whole.
"""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

from engine import job
from engine.config import ConfigError, LabelConfig
from engine.label import prepare, worker_spec
from engine.lock import JobLock
from engine.models import weight_bytes
from engine.runtime.actors import LabelActor
from engine.runtime.run import run_shards
from engine.runtime.session import ray_session
from pipelines.repair import RepairResult, targets_of
from pipelines.tasks import ShardTask
from storage import layout
from storage.listing import list_expecting
from storage.manifest import decode_part
from storage.objectstore import ObjectStore
from storage.output import Output

_COLUMNS = ["key", "shard", "status", "error"]
_READERS = 16          # manifest parts read at once while planning


@dataclass
class RepairSummary:
    output: str
    reason: str | None                 # the --reason regex (None: every error row)
    shards_total: int = 0              # input shards
    shards_pending: int = 0            # not committed (a plain label run labels them)
    shards_to_repair: int = 0          # committed, with error rows the reason matches
    shards_repaired: int = 0           # committed as a new generation by this run
    shards_failed: int = 0             # repairs that failed every attempt (their shard is unchanged)
    rows_targeted: int = 0             # error rows chosen
    rows_repaired: int = 0             # of them, ok now
    rows_still_error: int = 0          # of them, an error again (the row says why)
    rows_missing: int = 0              # of them, no longer in the input shard (kept as they were)
    superseded_removed: int = 0        # tars of interrupted repairs removed
    copied_bytes: int = 0              # members carried over by ranged reads
    wall_seconds: float = 0.0
    workers: int = 0
    layout: str = ""
    failed_shards: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 3 if self.shards_failed else 0

    def to_json(self) -> dict:
        return {**asdict(self), "exit_code": self.exit_code}


@dataclass(frozen=True)
class _Part:
    current: str | None  # the tar the rows name (storage.layout.shard_file); None: they disagree
    targets: int        # error rows the reason matches


def compile_reason(reason: str | None) -> re.Pattern | None:
    if reason is None:
        return None
    try:
        return re.compile(reason)
    except re.error as e:
        raise ConfigError(f"--reason {reason!r} is no regular expression: {e}") from None


def repair(config: LabelConfig, reason: str | None = None) -> RepairSummary:
    t0 = time.time()
    pattern = compile_reason(reason)
    p = prepare(config)
    if job.check(p.output, p.spec) is None:
        raise ConfigError(f"{p.output.url} has no job.json: nothing was labeled there to repair")
    summary = RepairSummary(output=p.output.url, reason=reason, shards_total=len(p.shards))
    with JobLock(p.output, config.lease_seconds) as lock:
        p.output.abort_incomplete("", before=lock.acquired_at)   # uploads of attempts that died
        urls = {layout.shard_name(u): u for u in p.shards}
        committed = sorted(Output(p.output).committed(urls) & urls.keys())   # this INPUT's shards only
        summary.shards_pending = len(urls) - len(committed)
        parts = _read_parts(p.output, committed, pattern)
        summary.superseded_removed = _remove_superseded(p.output, parts)
        todo = [n for n in committed if parts[n].targets]
        summary.shards_to_repair = len(todo)
        if todo:
            spec = replace(worker_spec(config, p.output.url, p.teacher, p.sky, p.kind), repair=reason or "")
            with ray_session(config, weight_bytes(p.teacher, p.sky)) as lay:
                summary.workers, summary.layout = lay.actors, lay.describe()
                _run(config, [ShardTask(urls[n], n) for n in todo], spec, lay, summary, lock)
    summary.wall_seconds = time.time() - t0
    return summary


def _read_parts(store: ObjectStore, names: list[str], pattern: re.Pattern | None) -> dict[str, _Part]:
    """Each committed shard's current tar and how many of its error rows to relabel: a GET and a
    few columns of each part, read in parallel."""
    def one(name: str) -> _Part:
        table = decode_part(store.get(layout.manifest_key(name)), columns=_COLUMNS)
        rows = table.to_pylist()
        shards = {r["shard"] for r in rows} or {layout.shard_file(name)}
        return _Part(shards.pop() if len(shards) == 1 else None, len(targets_of(rows, pattern)))

    with ThreadPoolExecutor(_READERS) as pool:
        return dict(zip(names, pool.map(one, names)))


def _remove_superseded(store: ObjectStore, parts: dict[str, _Part]) -> int:
    """Delete each committed shard's tars other than the one its part names: what a repair
    that died between its commit and its clean-up left. A part whose rows disagree on their tar
    is left alone (verify reports it). Returns how many were removed."""
    current = {n: layout.SHARDS + p.current for n, p in parts.items() if p.current is not None}
    expected = [layout.shard_key(n) for n in parts]
    stale = []
    for o in list_expecting(store, layout.SHARDS, expected):
        try:
            name, _ = layout.parse_shard_file(o.key[len(layout.SHARDS):])
        except ValueError:
            continue
        if name in current and o.key != current[name]:
            stale.append(o.key)
    for key in stale:
        store.delete(key)
    return len(stale)


def _run(config, tasks, spec, lay, summary: RepairSummary, lock) -> None:
    def on_result(r: RepairResult) -> None:
        summary.rows_targeted += r.targets
        summary.rows_missing += r.missing
        if r.committed:
            summary.shards_repaired += 1
            summary.rows_repaired += r.repaired
            summary.rows_still_error += r.targets - r.repaired - r.missing
            summary.copied_bytes += r.copied_bytes

    def on_failure(task: ShardTask, errors: list[dict]) -> None:
        summary.shards_failed += 1
        summary.failed_shards.append(task.name)

    run_shards(tasks, LabelActor, spec, lay, max_attempts=config.max_attempts, on_result=on_result,
               on_failure=on_failure, progress=config.progress, command="repair", output=summary.output,
               should_stop=lambda: lock.lost and f"the job lease on {summary.output} was lost: {lock.lost}")
