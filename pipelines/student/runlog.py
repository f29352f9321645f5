"""log.jsonl of a training run, on local disk or S3, with each step once across resumes."""
from __future__ import annotations

import json
import os

from storage.local import LocalStore
from storage.objectstore import ObjectStore

LOG = "log.jsonl"


def _step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except ValueError:          # the torn last line of a run killed while writing it
        return None


class RunLog:
    """Rows of steps after the checkpoint a run resumes from are dropped: those steps run again.

    On local disk each row is appended and flushed as it comes (`tail -f` works). S3 cannot
    append: there the log is held in memory and uploaded whole by `sync`, which the trainer calls
    with every checkpoint, so the log on S3 goes exactly as far as the checkpoint.
    """

    def __init__(self, store: ObjectStore, resumed_step: int):
        self.store = store
        try:
            old = store.get(LOG).decode().splitlines()
        except FileNotFoundError:
            old = []
        kept = [line for line in old if (step := _step(line)) is not None and step <= resumed_step]
        self.lines = kept       # S3: the whole log, uploaded by sync
        self.file = None
        if isinstance(store, LocalStore):
            if kept != old:
                store.put(LOG, "".join(line + "\n" for line in kept).encode())
            os.makedirs(store.root, exist_ok=True)
            self.file = open(store.path_of(LOG), "a")

    def write(self, row: dict) -> None:
        line = json.dumps(row)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        else:
            self.lines.append(line)

    def sync(self) -> None:
        if self.file is None:
            self.store.put(LOG, "".join(line + "\n" for line in self.lines).encode())

    def close(self) -> None:
        if self.file:
            self.file.close()
        else:
            self.sync()
