"""The CLI leaves cleanly once its work is done: exit 0 and the whole of its output, every run.

Interpreter teardown used to abort now and then (exit 134, "terminate called without an active
exception"): an Arrow pool thread still releasing a numpy-backed buffer of the audit's group_by
needed the GIL while Python finalized. ``main()`` run as the program now flushes and leaves with
``os._exit``; these runs would catch both the abort and output lost to a missing flush.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.bench.scale import synthetic_manifest
from storage import layout
from storage.stores import open_store

ROWS = 300


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> str:
    """A small OUTPUT of three manifest parts (three group_bys in the audit), written directly."""
    out = str(tmp_path_factory.mktemp("exit") / "out")
    synthetic_manifest(out, ROWS, per_part=100)
    shards = [f"/in/shard-{i:06d}.tar" for i in range(4)]   # three committed, one pending
    open_store(out).put(layout.JOB, json.dumps({"shards": shards}).encode())
    return out


def test_audit_json_exits_0_with_complete_output_every_run(output):
    for i in range(10):
        p = subprocess.run([sys.executable, "-m", "engine", "audit", output, "--json"],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"run {i}: exit {p.returncode}\nstderr: {p.stderr[-2000:]}"
        assert json.loads(p.stdout)["samples"] == ROWS, f"run {i}"


def _entry_points() -> list[list[str]]:
    script = Path(sys.executable).parent / "depth-engine"
    return [[sys.executable, "-m", "engine"]] + ([[str(script)]] if script.exists() else [])


@pytest.mark.parametrize("entry", _entry_points(), ids=lambda e: Path(e[-1]).name)
def test_output_redirected_to_a_file_is_complete(output, tmp_path, entry):
    """A file is block-buffered: without the flush before os._exit it would come back empty."""
    for command in (["audit", output, "--json"], ["status", output, "--json"]):
        path = tmp_path / f"{command[0]}.json"
        with open(path, "w") as f:
            p = subprocess.run([*entry, *command], stdout=f, stderr=subprocess.PIPE, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        report = json.loads(path.read_text())
        assert report["samples" if command[0] == "audit" else "committed"] == (ROWS if command[0] == "audit" else 3)


def test_main_called_with_argv_returns_instead_of_exiting(output, capsys):
    from engine.cli import main

    assert main(["status", output, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["committed"] == 3


@pytest.mark.parametrize("argv, code, fragment", [
    (["label", "/nowhere-at-all/", "OUT", "--json"], 2, "INPUT"),
    (["status", "s3://K3YID:S3CRET99@b/x/", "--json"], 2, "credentials do not go in a URL"),
])
def test_a_json_command_that_fails_still_prints_one_json_object(tmp_path, argv, code, fragment):
    """A script reading --json's stdout gets {"error", "exit_code"} when the command ends early (a full
    disk, a refused argument), not an empty stdout beside a line on stderr (issue 27, finding 12)."""
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    p = subprocess.run([sys.executable, "-m", "engine", *argv], capture_output=True, text=True, timeout=120)
    assert p.returncode == code, p.stderr
    doc = json.loads(p.stdout)
    assert doc["exit_code"] == code and fragment in doc["error"] and doc["error"] in p.stderr
    assert "S3CRET99" not in p.stdout + p.stderr
