"""The command line as a user runs it: a subprocess, offline, with its own model cache."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run(*args, env=None, check=None):
    e = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                       env=e, timeout=600)
    if check is not None and p.returncode != check:
        raise AssertionError(f"exit {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr[-3000:]}")
    return p


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """Import into a test module to apply it there: no hub access, a private model cache."""
    monkeypatch.setenv("DEPTH_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
