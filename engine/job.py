"""OUTPUT/job.json: what the output is (SPEC §2). It pins the label definition so that
one OUTPUT never mixes two, and names the input shards so ``status`` reads OUTPUT alone."""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
import logging
from importlib import metadata

from engine.config import ConfigError, LabelConfig
from engine.models import ModelRef
from labelers.normalize import DISPARITY
from storage import layout
from storage.objectstore import ObjectStore
from storage.output import Output

log = logging.getLogger(__name__)

LABEL_DEFINITION = "depth-anything/v1: disparity, sky=0, min-max over non-sky, uint16 png"
GT_DEFINITION = "ground-truth/v1: disparity 1/t, sky=0, min-max over valid non-sky, uint16 png, valid.png"


def engine_version() -> str:
    try:
        return metadata.version("depth-engine")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class JobSpec:
    label: dict          # the label definition: models and parameters that change labels
    shards: list[str]    # input shard URLs
    input: str
    parameters: dict     # how it ran: batch size, device, ... (free to change between runs)

    @classmethod
    def build(cls, config: LabelConfig, shards: list[str], teacher: ModelRef | None,
              sky: ModelRef | None, teacher_input: dict | None,
              teacher_output: str | None = None) -> "JobSpec":
        gt = config.ground_truth
        label = {
            "definition": GT_DEFINITION if gt else LABEL_DEFINITION,
            "teacher": teacher.provenance() if teacher else None,
            # what the teacher's output is ("disparity" | "depth"), hence how labels were made from it
            **({"teacher_output": teacher_output or DISPARITY} if teacher else {}),
            # whether samples carry the teacher's metres as depth.png (--keep-depth)
            **({"keep_depth": config.keep_depth} if teacher else {}),
            # the labels' size (storage.label_format.label_size); absent: the image's, as before it existed
            "label_size": config.label_size,
            # JPEGs decoded in the DCT domain at the scale the models need (--draft-decode)
            **({"draft_decode": config.draft_decode} if teacher else {}),
            "sky": sky.provenance() if sky else None,
            "teacher_input": teacher_input,
            **({"ground_truth": {"scale": gt.scale, "max_depth": gt.max_depth}} if gt else {}),
        }
        parameters = {k: getattr(config, k) for k in
                      ("batch_size", "workers", "device", "dtype", "max_attempts", "threads")}
        return cls(label=label, shards=shards, input=config.input, parameters=parameters)

    def identity(self) -> dict:
        """What must match for two runs to write into one OUTPUT."""
        def model(m):   # the weights, and what the config says they mean (absent: pinned before it was)
            if m is None:
                return None
            return {"sha256": m["sha256"], "source": m["source"],
                    **({"config_sha256": m["config_sha256"]} if m.get("config_sha256") else {})}

        return {"definition": self.label["definition"], "teacher": model(self.label["teacher"]),
                "teacher_output": teacher_output(self.label),
                "keep_depth": bool(self.label.get("keep_depth", False)),   # absent: from before it existed
                "label_size": label_size_of(self.label),
                "draft_decode": bool(self.label.get("draft_decode", False)),   # absent: from before it existed
                "sky": model(self.label["sky"]), "teacher_input": self.label["teacher_input"],
                "ground_truth": self.label.get("ground_truth")}

    def to_json(self, created: str | None = None) -> dict:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        return {"engine_version": engine_version(), "created": created or now, "updated": now,
                "input": self.input, "label": self.label, "parameters": self.parameters,
                "shards": self.shards}


def teacher_output(label: dict) -> str | None:
    """The label's teacher output kind; job.json written before it was recorded held only
    disparity teachers (the engine then read every output as disparity). None: ground truth."""
    if not label.get("teacher"):
        return None
    return label.get("teacher_output", DISPARITY)


def label_size_of(label: dict) -> str | int:
    """job.json's label size rule; absent (an OUTPUT from before it existed): the image's."""
    return label.get("label_size", "image")


def pinned_label_size(output: ObjectStore) -> str | int | None:
    """The label size an existing OUTPUT's job.json pins (None: no job.json yet)."""
    doc = read(output)
    return None if doc is None else label_size_of(doc.get("label", {}))


def source_kind(doc: dict) -> str:
    """"gt" for a `convert-gt` OUTPUT, "pseudo" for a `label` OUTPUT."""
    return "gt" if doc.get("label", {}).get("ground_truth") else "pseudo"


def read(output: ObjectStore) -> dict | None:
    return Output(output).job()


def differences(old: dict, new: JobSpec) -> list[str]:
    """Human-readable differences of the label definition, empty when compatible."""
    previous = JobSpec(label=old["label"], shards=[], input="", parameters={}).identity()
    current = new.identity()
    for part in ("teacher", "sky"):   # an OUTPUT from before configs were pinned: the weights decide
        if isinstance(previous.get(part), dict) and isinstance(current[part], dict) \
                and "config_sha256" not in previous[part]:
            current[part] = {k: v for k, v in current[part].items() if k != "config_sha256"}
    out = []
    for part in current:
        if previous.get(part) != current[part]:
            out.append(f"{part}: OUTPUT has {_short(previous.get(part))}, this run asks for {_short(current[part])}")
    return out


def _short(v) -> str:
    if isinstance(v, dict) and "sha256" in v:
        config = f", config sha256 {v['config_sha256'][:12]}" if v.get("config_sha256") else ""
        return f"{v['source']} (weights sha256 {v['sha256'][:12]}{config})"
    return json.dumps(v, sort_keys=True)


def check(output: ObjectStore, spec: JobSpec) -> dict | None:
    """OUTPUT's job.json, refused (exit 2) when it pins another label definition than ``spec``
    and a shard was committed under it. None: there is none, or nothing was committed under it
    (a start that failed on a broken model, since fixed), so ``write`` replaces it: a failed
    start never blocks its own fix. Reads only: a dry run asks the same question as ``write``."""
    old = read(output)
    if old is None or not (diff := differences(old, spec)):
        return old
    if Output(output).committed():
        raise ConfigError(f"{output.url} holds labels of another definition; " + "; ".join(diff)
                          + " (use a new OUTPUT)")
    return None


def write(output: ObjectStore, spec: JobSpec) -> dict:
    """Create or extend job.json: refuses a different label definition once a shard is committed
    under it (exit 2), keeps the union of input shards across runs so status sees every shard
    ever asked for. A definition nothing was committed under is replaced, with one line, and its
    failed shards' records go with it (they failed under the other definition)."""
    old = check(output, spec)
    if old is None and (previous := read(output)) is not None:
        for name in Output(output).failed():
            output.delete(layout.failed_key(name))
        log.warning("%s: job.json pinned another definition (%s) and no shard was committed under it; replaced",
                    output.url, "; ".join(differences(previous, spec)))
    if old is not None:
        shards = list(dict.fromkeys([*old.get("shards", []), *spec.shards]))
        spec = JobSpec(spec.label, shards, spec.input, spec.parameters)
    doc = spec.to_json(created=old.get("created") if old else None)
    output.put(layout.JOB, json.dumps(doc, indent=2).encode())
    return doc
