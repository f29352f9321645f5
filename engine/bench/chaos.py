"""``bench --chaos N``: what faults cost a job, and that it survives them. One job of N shards
on a 3-node local Ray cluster (``ray.cluster_utils.Cluster``: three raylets on this machine),
run twice in one invocation: calm, then while a labeling worker is killed every
``KILL_EVERY`` seconds (SIGKILL and SIGTERM in turn: a crash, a spot notice) and, once, a
non-head node is removed. It prints the kills, the node removals, the retries (attempts
beyond each shard's first), both wall times and their ratio, and whether the chaos run
committed every shard exactly once and ``verify`` passed.

``Chaos`` is the fault injector alone; tests/test_chaos.py runs it against the CLI.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Self

KILL_EVERY = 5.0          # seconds between faults, at least
POLL = 0.5
REMOVE_AT = 3             # the fault turn at which a node is removed instead of a worker killed
IMAGES_PER_SHARD = 4
MAX_ATTEMPTS = 20         # a shard may be hit several times; the bench measures, it does not fail
ACTOR = "ray::LabelActor"


class Chaos:
    """``with Chaos(cluster): ...``: a fault every ``every`` seconds at most: one labeling worker
    of ``cluster`` (never one still loading its models) gets the next of ``signals``, or, at
    fault number ``remove_at``, a non-head node is removed. With ``progress`` (a count that
    grows as the job commits), each fault also waits for ``per_fault`` more of it, so faults
    never come faster than the job can make progress between them, on any machine. Counts
    what it did in ``kills`` (by signal name) and ``removals``."""

    def __init__(self, cluster, every: float = KILL_EVERY, *, progress: Callable[[], int] | None = None,
                 per_fault: int = 1, remove_at: int | None = REMOVE_AT,
                 signals=(signal.SIGKILL, signal.SIGTERM), max_faults: int | None = None, seed: int = 0):
        self.cluster, self.every, self.remove_at, self.signals = cluster, every, remove_at, signals
        self.progress, self.per_fault, self.max_faults = progress or (lambda: 0), per_fault, max_faults
        self.kills: Counter = Counter()      # signal name -> workers killed with it
        self.removals = 0
        self.error: Exception | None = None
        self.events: list[str] = []         # what happened when, in words
        self._t0 = 0.0
        self._random = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    @property
    def faults(self) -> int:
        return sum(self.kills.values()) + self.removals

    def __enter__(self) -> Self:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error

    def _run(self) -> None:
        try:
            self._faults()
        except Exception as e:  # noqa: BLE001 - raised in the caller's thread, on the way out
            self.error = e

    def _faults(self) -> None:
        while self.max_faults is None or self.faults < self.max_faults:
            wanted = self.progress() + self.per_fault
            if self._stop.wait(self.every) or not self._until(self._progressed, wanted) \
                    or not self._until(self._fault):
                return

    def _until(self, done: Callable[..., bool], *args) -> bool:
        """Poll ``done(*args)`` until it is true (True) or the chaos is stopped (False)."""
        while not done(*args):
            if self._stop.wait(POLL):
                return False
        return True

    def _event(self, what: str) -> None:
        self.events.append(f"{time.perf_counter() - self._t0:6.1f} s: {what}")

    def _progressed(self, wanted: int) -> bool:
        return self.progress() >= wanted

    def _fault(self) -> bool:
        if self.faults + 1 == self.remove_at and self.cluster.worker_nodes:
            self.cluster.remove_node(self._random.choice(list(self.cluster.worker_nodes)))
            self.removals += 1
            self._event(f"a node removed ({self.progress()} committed)")
            return True
        sig = self.signals[sum(self.kills.values()) % len(self.signals)]
        try:
            os.kill(self._random.choice(workers(self.cluster)), sig)
        except (IndexError, ProcessLookupError):     # none ready just now, or it just died
            return False
        self.kills[signal.Signals(sig).name] += 1
        self._event(f"{signal.Signals(sig).name} to a worker ({self.progress()} committed)")
        return True


def workers(cluster) -> list[int]:
    """Pids of the cluster's labeling actors that have loaded their models (Ray titles a
    process ``ray::LabelActor.__init__`` while its constructor runs)."""
    raylets = {p.process.pid for node in cluster.list_all_nodes() for p in node.all_processes.get("raylet", [])}
    return [pid for pid, title in command_lines().items()
            if title.startswith(ACTOR) and not title.endswith("__init__") and descends(pid, raylets)]


def command_lines() -> dict[int, str]:
    """pid -> the first word of its command line (Ray titles its workers ray::Class.method)."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                out[int(d)] = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
    return out


def descends(pid: int, ancestors: set[int]) -> bool:
    """Whether ``pid`` is a descendant of one of ``ancestors`` (a cluster's raylets)."""
    while pid > 1:
        try:   # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid in ancestors:
            return True
    return False


def three_nodes(cpus_per_node: int):
    """A head and two worker nodes of ``cpus_per_node`` CPUs each, on this machine."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=cpus_per_node)
    cluster.wait_for_nodes()
    return cluster


def outcome(output: str, shards: int) -> dict:
    """What an OUTPUT shows after a run: committed shards, whether each is committed once
    with unique keys, the retries its rows record (attempt - 1, summed), and ``verify``."""
    from pipelines.verify import verify
    from storage import layout
    from storage.manifest import decode_part
    from storage.stores import open_store

    store = open_store(output)
    parts = [o.key for o in store.list(layout.MANIFEST) if o.key.endswith(".parquet")]
    keys: list = []
    retries = 0
    for part in parts:
        table = decode_part(store.get(part), columns=["source", "key", "attempt"]).to_pylist()
        keys += [(r["source"], r["key"]) for r in table]
        retries += max((r["attempt"] for r in table), default=1) - 1
    return {"committed": len(parts), "committed_once": len(parts) == shards and len(keys) == len(set(keys)),
            "retries": retries, "verify_ok": verify(store).ok}


def chaos_figures(cfg, root: Path, teacher: str, sky: str | None) -> dict:
    """The same job calm and under chaos on one 3-node cluster (see the module's docstring)."""
    import ray

    from engine.bench.synthetic import write_shard
    from engine.config import ConfigError, LabelConfig
    from engine.label import label
    from storage import layout
    from storage.stores import open_store

    n = cfg.chaos
    if n < 1:
        raise ConfigError(f"--chaos must be >= 1 shards, got {n}")
    inputs = root / "chaos-input"
    for i in range(n):
        write_shard(inputs / f"chaos-{i:06d}.tar", IMAGES_PER_SHARD, cfg.sizes, seed=i)
    base = (cfg.output or str(root / "chaos-output")).rstrip("/")
    cluster = three_nodes(max(1, (os.cpu_count() or 3) // 3))
    report = {"shards": n, "images_per_shard": IMAGES_PER_SHARD, "nodes": 3, "kill_every_seconds": KILL_EVERY}
    try:
        for run in ("calm", "chaos"):
            config = LabelConfig(input=f"{inputs}/", output=f"{base}/{run}/", teacher=teacher, sky=sky,
                                 batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device,
                                 dtype=cfg.dtype, max_attempts=MAX_ATTEMPTS, ray_address=cluster.address,
                                 progress=False)
            store = open_store(config.output)
            chaos = Chaos(cluster, progress=lambda store=store: sum(1 for _ in store.list(layout.MANIFEST))) \
                if run == "chaos" else None
            t0 = time.perf_counter()
            with chaos or nullcontext():
                summary = label(config)
            report[run] = {"seconds": round(time.perf_counter() - t0, 2), "exit_code": summary.exit_code,
                           "failed": summary.shards_failed, "kills": dict(chaos.kills) if chaos else {},
                           "node_removals": chaos.removals if chaos else 0, **outcome(config.output, n)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    report["chaos_over_calm"] = round(report["chaos"]["seconds"] / report["calm"]["seconds"], 3)
    return report


def print_chaos(r: dict) -> None:
    c = r["chaos"]
    kills = ", ".join(f"{v} {k}" for k, v in sorted(c["kills"].items())) or "none"
    print(f"chaos: {r['shards']} shards of {r['images_per_shard']} images on {r['nodes']} nodes; a fault every "
          f"{r['kill_every_seconds']:g} s")
    print(f"faults survived: {kills} kills, {c['node_removals']} node removal(s); retries {c['retries']}")
    print(f"wall time: chaos {c['seconds']:.1f} s, calm {r['calm']['seconds']:.1f} s "
          f"(ratio {r['chaos_over_calm']:.2f})")
    for run in ("calm", "chaos"):
        x = r[run]
        print(f"{run}: exit {x['exit_code']}, {x['committed']}/{r['shards']} committed, "
              f"each once: {'yes' if x['committed_once'] else 'NO'}, verify: {'passed' if x['verify_ok'] else 'FAILED'}")
