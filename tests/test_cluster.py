"""Faults on a multi-node Ray cluster (ray.cluster_utils.Cluster: three nodes on this
machine) against a real S3 HTTP endpoint: a second job refused while one runs, the driver
killed with SIGKILL and rerun, a garbage shard, and an endpoint that throttles and cuts
downloads. After each: every good shard committed, every manifest part agrees with its tar,
no key twice, and a resume rewrote nothing already committed. Workers killed (SIGKILL and
SIGTERM) and a node removed mid-job are tests/test_chaos.py's run, on a cluster of its own."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from builders import photo_samples, write_shard
from faulty_s3 import FaultyS3
from helpers_output import check_agreement, list_objects, read

GOOD = 8          # good input shards per job
PER_SHARD = 6


@dataclass
class Env:
    cluster: object
    workers: list
    proxy: FaultyS3
    models: object
    tmp: Path

    def env(self) -> dict:
        return {**os.environ, "AWS_ENDPOINT_URL": self.proxy.url, "DEPTH_ENGINE_LEASE_SECONDS": "20",
                "DEPTH_ENGINE_CLAIM_SECONDS": "10",
                "DEPTH_ENGINE_CACHE": str(self.tmp / "cache"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def env(s3_server, tiny_models, tmp_path_factory):
    from ray.cluster_utils import Cluster

    proxy = FaultyS3(s3_server.endpoint)
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = proxy.url     # what every node of the cluster will use
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
    yield Env(cluster, workers, proxy, tiny_models, tmp_path_factory.mktemp("cluster"))
    cluster.shutdown()
    proxy.close()


@pytest.fixture
def job(env, s3_server):
    """Fresh input shards in a fresh bucket; returns (input, output, bucket)."""
    bucket = s3_server.bucket("cl")
    s3 = s3_server.client()
    d = env.tmp / uuid.uuid4().hex[:8]
    d.mkdir()
    for i in range(GOOD):
        path = write_shard(d / f"shard-{i:06d}.tar", photo_samples([(60 + i, 80), (80, 60 + i)] * (PER_SHARD // 2),
                                                                   prefix=f"s{i}-"))
        s3.upload_file(path, bucket, f"raw/{Path(path).name}")
    return f"s3://{bucket}/raw/", f"s3://{bucket}/out/", bucket


def label_cmd(env, inp, out, *extra):
    return [sys.executable, "-m", "engine", "label", inp, out, "--ray-address", env.cluster.address,
            "--teacher", env.models.teacher, "--sky", env.models.sky, "--workers", "3",
            "--batch-size", "2", "--json", *extra]


def start(env, inp, out, *extra):
    return subprocess.Popen(label_cmd(env, inp, out, *extra), env=env.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p, timeout=300):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()                  # never leave a driver holding the cluster for the next test
        out, err = p.communicate()
        raise AssertionError(f"label did not finish in {timeout} s: {err[-3000:]}") from None
    return p.returncode, out, err


def wait_commits(out, n, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() <= deadline:
        if len(list_objects(out, "manifest")) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"job ended before {n} commits: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} commits after {timeout} s")


def assert_complete(out, shards=GOOD):
    counts = check_agreement(out)
    assert counts["committed"] == shards and counts["ok"] == shards * PER_SHARD
    return counts


def rows(out) -> list[dict]:
    import io
    return [r for part in list_objects(out, "manifest")
            for r in pq.read_table(io.BytesIO(read(out, f"manifest/{part}"))).to_pylist()]


def wait_listed(out, sub, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not list_objects(out, sub):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"nothing under {sub} while the job ran")
        time.sleep(0.1)


def test_a_second_job_refused_then_the_driver_killed_and_rerun_resumes_without_rewriting(env, job, s3_server):
    inp, out, bucket = job
    p = start(env, inp, out)
    # The second job while the first holds the lease (before its actors even start: the
    # labeling itself is fast enough to end while a second process starts up).
    wait_listed(out, "locks/job", p)
    second = subprocess.run(label_cmd(env, inp, out), env=env.env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "being labeled by another job" in second.stderr
    wait_commits(out, 2, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = {**list_objects(out, "manifest"), **{f"tar:{k}": v for k, v in list_objects(out, "shards").items()}}
    committed = [k for k in before if not k.startswith("tar:")]
    assert committed
    check_agreement(out)                                      # consistent right after the crash
    code, stdout, stderr = finish(start(env, inp, out))
    assert code == 0, stderr[-3000:]
    assert_complete(out)
    after = list_objects(out, "manifest")
    tars = list_objects(out, "shards")
    for part in committed:                                    # not rewritten by the resume
        name = part[: -len(".parquet")]
        assert after[part] == before[part] and tars[f"{name}.tar"] == before[f"tar:{name}.tar"]
    # the killed attempts' multipart uploads were cleaned up by the rerun
    assert not s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_a_garbage_shard_fails_alone_then_retry_failed_commits_it(env, job, s3_server):
    inp, out, bucket = job
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="raw/shard-000099.tar", Body=b"not a tar at all " * 100)
    code, stdout, stderr = finish(start(env, inp, out, "--max-attempts", "2"))
    assert code == 3, stderr[-3000:]
    assert json.loads(stdout)["failed_shards"] == ["shard-000099"]
    marker = json.loads(read(out, "failed/shard-000099.json"))
    assert marker["attempts"] == 2 and marker["error"]
    assert_complete(out)
    st = subprocess.run([sys.executable, "-m", "engine", "status", out, "--json"], env=env.env(),
                        capture_output=True, text=True)
    assert json.loads(st.stdout) == {"total": GOOD + 1, "committed": GOOD, "failed": 1, "pending": 0,
                                     "failed_shards": ["shard-000099"]}
    # without --retry-failed the failed shard stays skipped; after fixing the input it commits
    s3.upload_file(write_shard(env.tmp / "fixed.tar", photo_samples([(64, 64)] * PER_SHARD, prefix="fx")),
                   bucket, "raw/shard-000099.tar")
    code, stdout, _ = finish(start(env, inp, out))
    assert code == 3 and json.loads(stdout)["shards_committed"] == 0
    code, stdout, stderr = finish(start(env, inp, out, "--retry-failed"))
    assert code == 0, stderr[-3000:]
    assert "shard-000099.json" not in list_objects(out, "failed")
    assert_complete(out, GOOD + 1)


def test_throttling_and_cut_downloads_cost_no_attempt(env, job):
    inp, out, _ = job
    env.proxy.faults(throttle_every=6, cut_every=3)
    before = (env.proxy.throttled, env.proxy.cut)
    try:
        code, stdout, stderr = finish(start(env, inp, out))
    finally:
        env.proxy.faults(0, 0)
    assert code == 0, stderr[-3000:]
    assert env.proxy.throttled > before[0] and env.proxy.cut > before[1]
    assert_complete(out)
    assert {r["attempt"] for r in rows(out)} == {1}, stderr[-3000:]
