"""``status``: committed / failed / pending shards, from OUTPUT alone (job.json + listings)."""
from __future__ import annotations

from engine import job
from engine.config import ConfigError
from storage import layout
from storage.objectstore import ObjectStore
from storage.output import Output


def status(output: ObjectStore) -> dict:
    doc = job.read(output)
    if doc is None:
        raise ConfigError(f"{output.url} has no job.json: not a depth-engine OUTPUT (or nothing ran yet)")
    names = [layout.shard_name(u) for u in doc.get("shards", [])]   # every shard the job was asked for
    states = Output(output).states(names)
    return {**states.counts(names).to_json(), "failed_shards": sorted(n for n in names if n in states.failed)}
