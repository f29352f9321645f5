"""A worker told to stop (SIGTERM: a spot notice, a pod eviction) while it holds a shard's
claim gives the shard up at once: its upload aborted, its claim released, the process gone,
and a retry with a claim of minutes commits without waiting for it.

First in a plain process (this file runs itself as the child: a shard held inside its claim
window, on local storage and on S3, where the open upload is a real multipart upload), then
with a real Ray: `depth-engine label` whose first commit is held inside its claim window by a
slow S3 endpoint, the actor holding the claim SIGTERMed, and the job finishing with the shard
retried elsewhere."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
from builders import photo_samples, write_shard
from faulty_s3 import FaultyS3
from helpers_output import check_agreement, list_objects, processes, read

from engine.bench.synthetic import jpeg, scene
from labelers.prediction import Prediction
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.tasks import ShardTask
from storage import layout
from storage.commit import ClaimPolicy
from storage.leases import current
from storage.stores import open_store

NAME = "shard-000000"
CLAIM_MINUTES = 300           # a claim that a retry must never wait out here
POLL = 0.1


class NoiseTeacher:
    """A model-free teacher: noise at the image's size (a 16-bit PNG of noise barely compresses,
    so two large images make a tar beyond one 5 MiB multipart part)."""

    name, output, device = "noise", "disparity", None

    def target_size(self, height, width):
        return height, width

    def predict(self, images):
        rng = np.random.default_rng(0)
        return [Prediction((0.1 + rng.random(im.shape[:2])).astype(np.float32)) for im in images]


class Stalls:
    """The output store, stalled at one moment of the commit, which it announces in ``ready``:
    ``window``, the first look for the manifest part (right after the claim is taken), never
    to return; or ``step``, the manifest part's write (inside the commit step), until the file
    ``ready.go`` appears."""

    def __init__(self, store, ready: str, where: str):
        self._store, self._ready, self._where = store, Path(ready), where

    def __getattr__(self, attr):
        return getattr(self._store, attr)

    def info(self, key):
        if self._where == "window" and key == layout.manifest_key(NAME):
            self._ready.write_text("in the claim window")
            threading.Event().wait()
        return self._store.info(key)

    def put(self, key, data, **kw):
        if self._where == "step" and key == layout.manifest_key(NAME):
            self._ready.write_text("in the commit step")
            while not self._ready.with_suffix(".go").exists():
                time.sleep(POLL)
        return self._store.put(key, data, **kw)


def _child(output: str, source: str, ready: str, where: str) -> None:
    """Label one shard in a worker thread, as a Ray actor does, with the main thread free to
    run the SIGTERM handler; the shard stalls in its commit (Stalls). The handler's start is
    announced in ``ready.stopping``."""
    from engine.runtime import preemption
    from storage import inflight
    from storage.s3 import S3Store

    if output.startswith("s3://"):
        bucket, _, prefix = output[5:].partition("/")
        store = S3Store(bucket, prefix, part_size=5 * 1024 * 1024)
    else:
        store = open_store(output)
    abandon = inflight.abandon

    def announced(timeout):
        Path(ready).with_suffix(".stopping").write_text("SIGTERM")
        return abandon(timeout)

    inflight.abandon = announced
    assert preemption.install()
    work = threading.Thread(target=label_shard, daemon=True,
                            args=(ShardTask(source, NAME), Labelers(NoiseTeacher()), Stalls(store, ready, where)),
                            kwargs={"claim": ClaimPolicy.of(CLAIM_MINUTES)})
    work.start()
    while work.is_alive():
        work.join(POLL)
    sys.exit(3)                                   # a stalled commit ends only with the process


def _start_child(output: str, source: str, ready: Path, where: str) -> subprocess.Popen:
    paths = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    child = subprocess.Popen([sys.executable, __file__, "child", output, source, str(ready), where],
                             env={**os.environ, "PYTHONPATH": paths}, stderr=subprocess.PIPE, text=True)
    _wait_for(ready.exists, f"the child's commit to stall ({where})", child)
    return child


def _never_wait(seconds: float) -> None:
    raise AssertionError("the retry waited for the shard's claim: the SIGTERMed attempt still held it")


def _incomplete(url: str) -> list[str]:
    """Uploads begun and never completed: S3 multipart uploads, or the local store's temp files."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        return [u["Key"] for u in boto3.client("s3").list_multipart_uploads(Bucket=bucket, Prefix=prefix)
                .get("Uploads", [])]
    return [str(p) for p in Path(url).rglob(".*.tmp-*")]


def _wait_for(predicate, what: str, proc=None, polls: int = 1800) -> None:
    for _ in range(polls):
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"gave up waiting for {what}: the process ended ({proc.returncode}) "
                                 f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
        time.sleep(POLL)
    raise AssertionError(f"gave up waiting for {what}")


def test_sigterm_in_the_claim_window_releases_the_claim_and_aborts_the_upload(store_url, tmp_path):
    big = [{"__key__": f"big{i}", "jpg": jpeg(scene(1400, 1400, i), quality=80)} for i in range(2)]
    source = write_shard(tmp_path / f"{NAME}.tar", big)
    child = _start_child(store_url, source, tmp_path / "ready", "window")
    try:
        store = open_store(store_url)
        held = current(store, layout.claim_prefix(NAME))
        assert held is not None and not held.released
        assert len(_incomplete(store_url)) == 1           # an open upload to abort (S3: multipart)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGTERM, stderr[-3000:]
    assert store.info(layout.shard_key(NAME)) is None and store.info(layout.manifest_key(NAME)) is None
    assert _incomplete(store_url) == []

    retry = replace(ClaimPolicy.of(CLAIM_MINUTES), sleep=_never_wait)
    result = label_shard(ShardTask(source, NAME, attempt=2), Labelers(NoiseTeacher()), store, claim=retry)
    assert result.committed and result.ok == 2
    assert check_agreement(store_url)["committed"] == 1
    first, second = (json.loads(store.get(f"{layout.claim_prefix(NAME)}{epoch:012d}.json")) for epoch in (1, 2))
    assert first["released"] and second["released"] and second["owner"]["attempt"] == 2
    assert "aborted 1 upload(s), released 1 shard claim(s)" in stderr


def test_sigterm_during_a_commit_step_waits_for_it_and_leaves_the_shard_committed(tmp_path):
    """The fence: a claim is released only once no write made under it can still land. A
    SIGTERM that arrives while the manifest part is being written lets that write finish."""
    source = write_shard(tmp_path / f"{NAME}.tar", photo_samples([(64, 48), (48, 64)]))
    out = str(tmp_path / "out")
    ready = tmp_path / "ready"
    child = _start_child(out, source, ready, "step")
    try:
        child.send_signal(signal.SIGTERM)
        _wait_for(ready.with_suffix(".stopping").exists, "the SIGTERM handler to start", child)
        ready.with_suffix(".go").write_text("")      # the part's write goes on, the handler waiting
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGTERM, stderr[-3000:]
    assert check_agreement(out) == {"committed": 1, "rows": 2, "ok": 2}
    store = open_store(out)
    assert current(store, layout.claim_prefix(NAME)).released and _incomplete(out) == []


# -- on Ray ------------------------------------------------------------------------------------

class StallingS3:
    """A loopback proxy in front of an S3 endpoint that holds the first HEAD of a manifest part
    made while the shard's claim is taken (a commit inside its claim window) until ``go``."""

    def __init__(self, upstream: str, bucket: str):
        self.bucket = bucket
        self.stalled = threading.Event()     # set once a commit is held; .shard names it
        self.go = threading.Event()
        self.shard: str | None = None
        self._lock = threading.Lock()
        self._direct = boto3.session.Session().client("s3", endpoint_url=upstream)
        self._proxy = FaultyS3(upstream, hold=self._hold)
        self.url = self._proxy.url

    def _hold(self, method: str, path: str) -> None:
        m = re.search(r"/(?P<out>[^?]*/)manifest/(?P<name>[^/?]+)\.parquet", path)
        if method == "HEAD" and m and self._first(m["out"], m["name"]):
            self.go.wait()

    def _first(self, out: str, name: str) -> bool:
        """The first look for a part while its claim is held: the one to stall."""
        prefix = out.split("/", 1)[1] + layout.claim_prefix(name)
        with self._lock:
            if self.shard is not None:
                return False
            if not self._direct.list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("KeyCount"):
                return False
            self.shard = name
        self.stalled.set()
        return True

    def close(self) -> None:
        self.go.set()
        self._proxy.close()


def _summary(stdout: str) -> dict:
    """The --json summary: stdout holds it alone (Ray's notice that a worker died, which Ray
    prints to the driver's stdout, goes to stderr under --json: engine.cli.printing)."""
    return json.loads(stdout)


def test_a_sigtermed_actor_holding_a_claim_of_minutes_is_retried_at_once(s3_server, tiny_models, tmp_path):
    bucket = s3_server.bucket("pre")
    s3 = s3_server.client()
    for i in range(4):
        path = write_shard(tmp_path / f"shard-{i:06d}.tar", photo_samples([(60 + i, 80), (80, 60), (64, 64)],
                                                                         prefix=f"s{i}-"))
        s3.upload_file(path, bucket, f"raw/{Path(path).name}")
    out = f"s3://{bucket}/out/"
    proxy = StallingS3(s3_server.endpoint, bucket)
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "DEPTH_ENGINE_CLAIM_SECONDS": str(CLAIM_MINUTES),
           "DEPTH_ENGINE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    job = subprocess.Popen([sys.executable, "-m", "engine", "label", f"s3://{bucket}/raw/", out,
                            "--teacher", tiny_models.teacher, "--sky", tiny_models.sky, "--workers", "2",
                            "--batch-size", "2", "--json"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(proxy.stalled.is_set, "a commit held inside its claim window", job, polls=3000)
        claim = f"out/{layout.claim_prefix(proxy.shard)}{1:012d}.json"
        holder = json.loads(s3.get_object(Bucket=bucket, Key=claim)["Body"].read())
        pid = int(holder["owner"]["worker"].split(":")[1])
        assert pid in processes("ray::LabelActor", under={job.pid})     # this job's actor, no other
        os.kill(pid, signal.SIGTERM)
        _wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the SIGTERMed actor to exit", job)
        proxy.go.set()                    # only now: its look for the part must never return
        # A retry that waited out the claim (10 minutes) would end this wait first.
        stdout, stderr = job.communicate(timeout=400)
    finally:
        job.kill()
        proxy.close()
    assert job.returncode == 0, stderr[-3000:]
    summary = _summary(stdout)
    assert summary["shards_committed"] == 4 and summary["shards_failed"] == 0
    assert check_agreement(out) == {"committed": 4, "rows": 12, "ok": 12}
    assert f"shard {proxy.shard} attempt 1/3 failed (worker died" in stderr and "retrying" in stderr
    rows = pq.read_table(io.BytesIO(read(out, f"manifest/{proxy.shard}.parquet"))).to_pylist()
    assert {r["attempt"] for r in rows} == {2} and {r["worker"] for r in rows} != {holder["owner"]["worker"]}
    first = json.loads(s3.get_object(Bucket=bucket, Key=claim)["Body"].read())
    assert first["released"] and first["owner"] == holder["owner"]      # given back by the SIGTERMed actor
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert list_objects(out, "shards").keys() == {f"shard-{i:06d}.tar" for i in range(4)}


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _child(*sys.argv[2:6])
