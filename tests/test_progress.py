"""The ETA: images left weighed by input bytes (else by shards), the line printed without a
bar, and a real job's summary holding its first estimate beside what happened."""
from __future__ import annotations

import io
import re
import time
import types

import pytest
from builders import photo_samples, write_shard

from engine import progress as progress_module
from engine.cli.printing import print_summary
from engine.config import LabelConfig
from engine.label import label
from engine.progress import Eta, ProgressBar


def test_images_left_by_bytes_then_by_shards():
    eta = Eta({"a": 100, "b": 300, "c": 200})
    assert eta.images_left() is None                      # nothing finished: no estimate
    eta.done("a", 10)
    assert eta.images_left() == pytest.approx(10 / 100 * 500)
    eta.failed("c")
    assert eta.images_left() == pytest.approx(10 / 100 * 300)
    unknown = Eta({"a": 100, "b": None, "c": 200})          # one size unknown (S3): per shard
    unknown.done("a", 10)
    assert unknown.images_left() == pytest.approx(10 * 2)
    assert unknown.seconds_left(rate=5.0) == pytest.approx(4.0)


def test_the_line_without_a_bar():
    out = io.StringIO()
    bar = ProgressBar(4, enabled=False, sizes={n: 1000 for n in "abcd"}, log_every=0, stream=out)
    bar.started(time.time() - 10)
    bar.shard_done(types.SimpleNamespace(name="a", samples=20, errors=1))
    bar.live({"b": {"samples": 5}})
    line = out.getvalue().strip()
    assert re.fullmatch(r"progress: 25 images done, ~55 left, \d+\.\d images/s, ~\d+m\d\ds left; "
                        r"shards 1/4, errors 1", line), line


def test_a_job_summary_holds_its_estimate_beside_the_truth(tmp_path, tiny_models, monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "LOG_EVERY", 0.0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(10):
        write_shard(inputs / f"shard-{i:06d}.tar", photo_samples([(48, 64)] * (2 + i % 3), f"s{i}-"))
    summary = label(LabelConfig(input=f"{inputs}/", output=str(tmp_path / "out"), teacher=tiny_models.teacher,
                                sky=None, workers=1, progress=False))
    total = summary.samples_ok + summary.samples_error
    e = summary.estimate
    assert e is not None and e["at_shards"] == 1 and e["actual_images"] == total == sum(2 + i % 3 for i in range(10))
    assert e["predicted_images"] == e["images_done"] + e["images_left"] and e["predicted_seconds"] > 0
    assert 0 < e["actual_seconds"] <= summary.wall_seconds          # the run's share of the job's wall time
    assert "progress: " in capsys.readouterr().err                              # the line, once a tick
    print_summary(summary.to_json(), as_json=False)
    assert re.search(r"estimate at 1 shard\(s\) done .*: [\d,]+ images in [\d.]+ s; actual: "
                     rf"{total} images in [\d.]+ s \(time [+-]\d", capsys.readouterr().out)
