"""The light commands (``--help``, ``status``, ``audit``, ``verify``) read an OUTPUT without
the models' libraries: each runs in a fresh interpreter through ``engine.cli.main`` and leaves
torch, transformers and ray unimported (a package ``__init__`` or a module-level import that
pulls one in would cost every such command a second or more; docs/BENCHMARKS.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from builders import photo_samples, write_shard

from labelers.sky import SkySegmenter
from labelers.teacher import Teacher
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.tasks import ShardTask
from storage import layout
from storage.stores import open_store

HEAVY = ("torch", "transformers", "ray")
ROOT = Path(__file__).resolve().parents[1]

# Run in the child: the command, then its exit code and the heavy modules it imported, as the last line.
CHILD = """
import json, sys
from engine.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:  # --help leaves through argparse's exit
    code = e.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


@pytest.fixture(scope="module")
def output(tmp_path_factory, tiny_models) -> str:
    """Two shards labeled by the tiny models and committed, a third one pending."""
    root = tmp_path_factory.mktemp("light")
    labelers = Labelers(Teacher.load(tiny_models.teacher, name="t"), SkySegmenter.load(tiny_models.sky, name="s"))
    out = open_store(str(root / "out"))
    inputs = [str(root / f"in-{i}.tar") for i in range(3)]
    for i, src in enumerate(inputs[:2]):
        write_shard(src, photo_samples([(64, 96), (70, 50)], f"p{i}"))
        label_shard(ShardTask(src, layout.shard_name(src)), labelers, out, batch_size=4, threads=2)
    out.put(layout.JOB, json.dumps({"shards": inputs}).encode())
    return out.url


def run_light(*args: str) -> tuple[dict, str]:
    """(the child's exit code and heavy modules, the command's own output)."""
    p = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    *printed, last = p.stdout.strip().splitlines()
    return json.loads(last), "\n".join(printed)


@pytest.mark.parametrize("command", ["--help", "status", "audit", "verify"])
def test_light_command_imports_no_model_library(output, command):
    args = [command] if command == "--help" else [command, output, "--json"]
    result, printed = run_light(*args)
    assert result["code"] == 0, printed
    assert result["heavy"] == [], f"`depth-engine {command}` imported {', '.join(result['heavy'])}"
    if command == "--help":
        assert "usage: depth-engine" in printed
    else:
        report = json.loads(printed)
        expected = {"status": ("committed", 2), "audit": ("samples", 4), "verify": ("checked", 2)}[command]
        assert report[expected[0]] == expected[1], report
