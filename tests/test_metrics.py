"""The engine's metrics as a cluster's Prometheus sees them: a local Ray with a metrics export
port, a small ``label`` job in-process (good photos, bad samples of four reason classes, a
damaged tar that fails every attempt), then the port scraped until the counters arrive. The
figures they must show are read independently, from the manifest parts with pyarrow."""
from __future__ import annotations

import glob
import json
import pathlib
import re
import socket
import time
import urllib.request

import pyarrow.parquet as pq
import pytest
import ray
from builders import bad_members, encode, photo_samples, write_shard

from engine.bench.synthetic import scene
from engine.runtime import metrics
from engine.runtime.metrics import JobMetrics, reason_class
from pipelines.decode import SampleLimits

MAX_ATTEMPTS = 2
_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> list[tuple[str, dict, float]]:
    """(name, labels, value) of every sample the node's metrics endpoint serves."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out.append((m["name"], dict(_LABEL.findall(m["labels"] or "")), float(m["value"])))
    return out


def engine_counters(port: int, output: str) -> dict:
    """The engine's series of this job, keyed by (name without Ray's prefix, extra label)."""
    found = {}
    for name, labels, value in scrape(port):
        if name.startswith("ray_depth_engine_") and labels.get("command") == "label" and labels.get("output") == output:
            extra = labels.get("reason_class") or labels.get("stage") or labels.get("operation") or ""
            found[(name.removeprefix("ray_"), extra)] = value
    return found


@pytest.fixture(scope="module")
def metrics_port():
    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 1000})
    yield port
    ray.shutdown()


def test_reason_classes_of_the_rows_the_engine_writes():
    assert reason_class("member 'k.tif' is 600000000 bytes, over the 536870912-byte limit; not read") \
        == "limit_member_bytes"
    assert reason_class("member '../../x.jpg' has an unsafe name ('..' path segment)") == "unsafe_member"
    assert reason_class("member 'x.jpg' is a symbolic link; links, devices and fifos are not read") == "unsafe_member"
    assert reason_class("image too large: 12000x12000 = 144.0 MP exceeds --max-image-pixels 128 MP") == "limit_pixels"
    assert reason_class("aspect ratio 40.0:1 (400x10) exceeds --max-aspect 8") == "limit_aspect"
    assert reason_class("truncated JPEG: its last rows are the decoder's grey fill (scans missing)") == "truncated"
    assert reason_class("cannot decode image: OSError: image file is truncated (3 bytes not processed)") == "truncated"
    assert reason_class("cannot read image header: OSError: Truncated File Read") == "truncated"
    assert reason_class("not a recognised image format") == "decode"
    assert reason_class("no image member (members: json, txt)") == "missing_image"
    assert reason_class("no ground-truth member (<key>.depth.<ext> or <key>.disparity.<ext>; members: jpg)") \
        == "ground_truth"
    assert reason_class("something nobody wrote a rule for") == reason_class(None) == "other"


def test_recording_without_ray_or_with_a_broken_agent_is_a_no_op(monkeypatch):
    if not ray.is_initialized():
        JobMetrics("label", "/out").attempt_failed(retried=True)     # no Ray: nothing, no error

    def broken():
        raise RuntimeError("metrics agent is down")

    monkeypatch.setattr(metrics, "instruments", broken)
    m = JobMetrics("label", "/out")
    m.attempt_failed(retried=False)
    m.tick(3)
    assert not m.on


def test_a_label_job_publishes_its_counters(metrics_port, tmp_path, tiny_models):
    from engine.config import LabelConfig
    from engine.label import label

    raw = tmp_path / "raw"
    raw.mkdir()
    bad = [{"__key__": k, ext: data} for k, (ext, data) in bad_members().items()]
    bad += [{"__key__": "strip", "jpg": encode(scene(10, 200, 1), "JPEG")},      # aspect 20:1
            {"__key__": "large", "jpg": encode(scene(100, 100, 2), "JPEG")}]     # 10,000 pixels
    write_shard(raw / "a.tar", photo_samples([(64, 96), (96, 64)], "a"))
    write_shard(raw / "b.tar", photo_samples([(48, 80)], "b") + bad)
    (raw / "c.tar").write_bytes(b"this is not a tar archive\n" * 40)           # fails every attempt
    out = tmp_path / "out"
    summary = label(LabelConfig(input=f"{raw}/", output=str(out), teacher=tiny_models.teacher, sky=tiny_models.sky,
                                workers=1, progress=False, max_attempts=MAX_ATTEMPTS,
                                limits=SampleLimits(max_pixels=8_000)))
    assert (summary.shards_committed, summary.shards_failed) == (2, 1)

    rows = pq.read_table(glob.glob(str(out / "manifest" / "*.parquet"))).to_pylist()
    ok = sum(r["status"] == "ok" for r in rows)
    errors: dict[str, int] = {}
    for r in rows:
        if r["status"] != "ok":
            errors[reason_class(r["error"])] = errors.get(reason_class(r["error"]), 0) + 1
    assert (ok, errors) == (3, {"truncated": 1, "decode": 2, "limit_aspect": 1, "limit_pixels": 1})
    attempts = 2 + MAX_ATTEMPTS

    images, found = ("depth_engine_images_labeled_total", ""), {}
    for _ in range(60):           # Ray's agent reports each interval: poll until every series is in
        found = engine_counters(metrics_port, str(out))
        if found.get(images, 0) >= ok and found.get(("depth_engine_shard_attempts_total", ""), 0) >= attempts \
                and found.get(("depth_engine_shards_failed_total", ""), 0) >= 1 \
                and sum(v for (n, _), v in found.items() if n == "depth_engine_sample_errors_total") >= len(rows) - ok:
            break
        time.sleep(0.5)
    assert found.get(images) == ok, found
    assert {c: v for (n, c), v in found.items() if n == "depth_engine_sample_errors_total"} == errors, found
    assert found[("depth_engine_shard_attempts_total", "")] == attempts
    assert found[("depth_engine_shard_retries_total", "")] == MAX_ATTEMPTS - 1
    assert found[("depth_engine_shards_failed_total", "")] == 1
    stages = {c for (n, c) in found if n == "depth_engine_stage_seconds_total"}
    assert {"decode", "sky", "teacher", "encode", "write", "commit"} <= stages, stages


def test_the_dashboard_charts_every_metric_and_only_those():
    dashboard = pathlib.Path(__file__).parent.parent / "deploy" / "grafana" / "depth-engine-dashboard.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    charted = {m for e in exprs for m in re.findall(r"ray_(depth_engine_\w+)", e)}
    assert charted == {d.name for d in metrics.DEFINITIONS}
