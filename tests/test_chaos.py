"""A chaos run: `depth-engine label` of a few dozen shards on a 3-node cluster
(ray.cluster_utils.Cluster) while a labeling worker is killed every few seconds, with SIGKILL
(a crash) and SIGTERM (a spot notice) in turn, and a non-head node is removed once. The job
ends with every shard committed exactly once, each manifest part agreeing with its tar, and
`depth-engine verify` passing. Faults wait for the job to commit a little between them
(engine.bench.chaos): on a slow machine the run stays bounded, on a fast one every fault still
happens before the job ends."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
from builders import photo_samples, write_shard
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache
from helpers_output import check_agreement, list_objects, read

from engine.bench.chaos import Chaos, three_nodes

SHARDS = 24
PER_SHARD = 3
FAULTS = 5            # the third is the node removal: 4 kills (SIGKILL, SIGTERM in turn) and 1 node
PER_FAULT = 2         # shards committed between two faults: all of them happen, on any machine


def test_a_job_survives_workers_killed_every_few_seconds_and_a_node_removed(tmp_path, tiny_models):
    (tmp_path / "raw").mkdir()
    for i in range(SHARDS):
        write_shard(tmp_path / "raw" / f"shard-{i:06d}.tar",
                    photo_samples([(40 + i, 56), (56, 40), (48, 48)], prefix=f"s{i}-"))
    out = str(tmp_path / "out")
    cluster = three_nodes(1)
    job = None
    try:
        job = subprocess.Popen(
            [sys.executable, "-m", "engine", "label", str(tmp_path / "raw"), out, "--ray-address", cluster.address,
             "--teacher", tiny_models.teacher, "--sky", tiny_models.sky, "--workers", "3", "--batch-size", "2",
             "--max-attempts", "10", "--json"],
            env={**os.environ, "DEPTH_ENGINE_CLAIM_SECONDS": "5"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        with Chaos(cluster, every=2.0, progress=lambda: len(list_objects(out, "manifest")), per_fault=PER_FAULT,
                   max_faults=FAULTS) as chaos:
            stdout, stderr = job.communicate(timeout=480)
    finally:
        if job is not None:
            job.kill()
        cluster.shutdown()
    assert job.returncode == 0, stderr[-3000:]
    assert stdout.rstrip().endswith("}") and stdout.startswith("{"), stdout[-1500:]
    summary = json.loads(stdout)    # the JSON alone: Ray's notices of dead workers went to stderr
    assert summary["shards_committed"] + summary["shards_skipped"] == SHARDS and not summary["failed_shards"]
    # every shard exactly once: one part each, each key once, every part agreeing with its tar
    assert check_agreement(out) == {"committed": SHARDS, "rows": SHARDS * PER_SHARD, "ok": SHARDS * PER_SHARD}
    assert list_objects(out, "shards").keys() == {f"shard-{i:06d}.tar" for i in range(SHARDS)}
    verified = run("verify", out, "--json", check=0)
    assert json.loads(verified.stdout) == {"checked": SHARDS, "ok": True, "bad": []}
    # the faults happened, and the job retried around them
    assert chaos.removals == 1 and chaos.kills["SIGKILL"] >= 1 and chaos.kills["SIGTERM"] >= 1, chaos.events
    attempts = [pq.read_table(io.BytesIO(read(out, f"manifest/{p}")), columns=["attempt"]).column(0)[0].as_py()
                for p in list_objects(out, "manifest")]
    retries = sum(a - 1 for a in attempts)
    assert retries >= 1 and "retrying" in stderr and "lost (worker died" in stderr
    print(f"chaos: {dict(chaos.kills)} kills, {chaos.removals} node removal(s), {retries} retries:",
          *chaos.events, sep="\n  ")
