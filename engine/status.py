"""``status``: committed / failed / pending shards, from OUTPUT alone (job.json + listings)."""
from __future__ import annotations

from engine import job
from engine.config import ConfigError
from engine.plan import plan
from storage.objectstore import ObjectStore


def status(output: ObjectStore) -> dict:
    doc = job.read(output)
    if doc is None:
        raise ConfigError(f"{output.url} has no job.json: not a depth-engine OUTPUT (or nothing ran yet)")
    p = plan(output, doc.get("shards", []))
    pending = p.total - len(p.committed) - len(p.failed)
    return {"total": p.total, "committed": len(p.committed), "failed": len(p.failed),
            "pending": pending, "failed_shards": p.failed}
