"""Checkpoints of a training run, on local disk or S3, that no reader ever sees half written.

    OUT/checkpoint-<step>/    model.safetensors, config.json, optimizer.safetensors, trainer_state.json
    OUT/latest.json           {"step", "checkpoint", "best", "best_abs_rel"}: written last
    OUT/checkpoint, OUT/best  on local disk only: symlinks to the latest and the best step directory

One scheme for both stores: a step directory is complete before latest.json names it, and
latest.json is replaced in one atomic write (a rename on disk, one PUT on S3), so whoever follows
the pointer finds a whole checkpoint. S3 cannot rename a prefix, which is why there is a pointer
at all. After the pointer moved, step directories other than the latest and the best are deleted.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from storage.local import LocalStore
from storage.objectstore import ObjectStore

POINTER = "latest.json"
_STEP_DIR = re.compile(r"\.?checkpoint-\d+")   # a step directory, or one being written (".checkpoint-N.tmp-...")
_CHUNK = 8 << 20


@dataclass(frozen=True)
class Pointer:
    step: int
    checkpoint: str                  # the step directory of the latest checkpoint
    best: str | None = None          # the step directory with the lowest validation AbsRel so far
    best_abs_rel: float | None = None


def step_dir(step: int) -> str:
    return f"checkpoint-{step:08d}"


def advance(previous: Pointer | None, step: int, abs_rel: float | None) -> Pointer:
    """The pointer once `step` is saved: it becomes the best when its validation AbsRel (None: not
    validated) is the lowest yet."""
    here = step_dir(step)
    old_best = previous.best_abs_rel if previous else None
    if abs_rel is not None and math.isfinite(abs_rel) and (old_best is None or abs_rel < old_best):
        return Pointer(step, here, here, abs_rel)
    return Pointer(step, here, previous.best if previous else None, old_best)


def latest(store: ObjectStore) -> Pointer | None:
    try:
        return Pointer(**json.loads(store.get(POINTER)))
    except FileNotFoundError:
        return _adopt_legacy(store)


def _adopt_legacy(store: ObjectStore) -> Pointer | None:
    """A run directory from before the pointer (one real ``checkpoint/`` directory, renamed into
    place on each save) becomes a step directory and a pointer, so the run resumes rather than
    starting over."""
    if not isinstance(store, LocalStore):
        return None
    old = Path(store.path_of("checkpoint"))
    if old.is_symlink() or not (old / "trainer_state.json").is_file():
        return None
    step = int(json.loads((old / "trainer_state.json").read_text())["step"])
    pointer = Pointer(step, step_dir(step))
    os.replace(old, store.path_of(pointer.checkpoint))
    store.put(POINTER, json.dumps(asdict(pointer)).encode())
    _link(store, "checkpoint", pointer.checkpoint)
    return pointer


def save(store: ObjectStore, pointer: Pointer, student, opt, sched, state: dict) -> None:
    """Write the step directory `pointer` names, then the pointer, then prune."""
    local = isinstance(store, LocalStore)
    if local:       # staged beside its final place: published by one rename
        os.makedirs(store.root, exist_ok=True)
        stage = Path(store.root) / f".{pointer.checkpoint}.tmp-{uuid.uuid4().hex}"
    else:
        stage = Path(tempfile.mkdtemp(prefix="depth-engine-checkpoint-"))
    try:
        _write(stage, student, opt, sched, state)
        if local:
            final = store.path_of(pointer.checkpoint)
            shutil.rmtree(final, ignore_errors=True)      # an unpublished attempt at this step
            os.replace(stage, final)
        else:
            for path in sorted(stage.iterdir()):
                _upload(store, path, f"{pointer.checkpoint}/{path.name}")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    store.put(POINTER, json.dumps(asdict(pointer)).encode())
    if local:
        _link(store, "checkpoint", pointer.checkpoint)
        if pointer.best:
            _link(store, "best", pointer.best)
    _prune(store, {pointer.checkpoint, pointer.best})


def fetch(store: ObjectStore, directory: str, into: Path) -> Path:
    """A step directory as a local path: itself on disk; from S3, downloaded under `into`."""
    if isinstance(store, LocalStore):
        return Path(store.path_of(directory))
    for info in store.list(directory + "/"):
        path = into / info.key
        path.parent.mkdir(parents=True, exist_ok=True)
        with store.open_read(info.key) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    return into / directory


def restore(directory: Path, opt, sched) -> dict:
    """Load the optimizer and scheduler state of a step directory; returns its trainer state."""
    from safetensors.torch import load_file

    state = json.loads((directory / "trainer_state.json").read_text())
    opt_state: dict = {}
    for name, t in load_file(str(directory / "optimizer.safetensors")).items():
        pid, key = name.split(".", 1)
        opt_state.setdefault(int(pid), {})[key] = t
    opt.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    sched.load_state_dict(state["scheduler"])
    return state


def _write(directory: Path, student, opt, sched, state: dict) -> None:
    from safetensors.torch import save_file

    (student.module if hasattr(student, "module") else student).save_pretrained(directory)
    opt_state = opt.state_dict()
    tensors = {f"{pid}.{k}": v.contiguous() for pid, st in opt_state["state"].items()
               for k, v in st.items() if torch.is_tensor(v)}
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "trainer_state.json").write_text(json.dumps(
        {**state, "optimizer": {"param_groups": opt_state["param_groups"]}, "scheduler": sched.state_dict()},
        default=str))


def _upload(store: ObjectStore, path: Path, key: str) -> None:
    with open(path, "rb") as src, store.open_write(key) as dst:
        while chunk := src.read(_CHUNK):
            dst.write(chunk)
        dst.commit()


def _link(store: LocalStore, name: str, target: str) -> None:
    """Point the symlink `name` at `target` atomically (a new link renamed over the old one)."""
    temp = store.path_of(f".{name}.tmp-{uuid.uuid4().hex}")
    os.symlink(target, temp)
    os.replace(temp, store.path_of(name))


def _prune(store: ObjectStore, keep: set) -> None:
    if isinstance(store, LocalStore):
        for entry in os.scandir(store.root):
            if _STEP_DIR.match(entry.name) and entry.name not in keep and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
        return
    for info in list(store.list("checkpoint-")):
        if info.key.split("/", 1)[0] not in keep:
            store.delete(info.key)
