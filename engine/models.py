"""Where a model comes from, and proof of which one it was.

MODEL (SPEC §1) is a hub id, a local directory, or an ``s3://`` prefix holding a
``save_pretrained`` folder. Every form resolves to a local directory on this node (an
s3 prefix is downloaded once per node into a cache) plus a provenance record for
job.json: id, revision or path, sha256 of the weights, license where stated.

The driver also checks here, from config.json alone, what a worker would otherwise find out by
dying while loading: a model for another task, a model that asks for remote code, weights that
``from_pretrained(use_safetensors=True)`` would not load.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from labelers.geometry import FAMILIES
from labelers.normalize import DEPTH as OUTPUT_DEPTH
from labelers.normalize import DISPARITY as OUTPUT_DISPARITY
from labelers.normalize import INVERSE_DEPTH as OUTPUT_INVERSE_DEPTH
from labelers.normalize import TEACHER_OUTPUTS
from storage.names import check_member_name
from storage.objectstore import is_s3
from storage.stores import open_store

SAFE_WEIGHTS = "model.safetensors"             # what from_pretrained(use_safetensors=True) loads,
SAFE_INDEX = "model.safetensors.index.json"   # or, when that is absent, the shards this names
DEPTH = "depth-estimation"
SEGMENTATION = "semantic-segmentation"
_AUTO_CLASS = {DEPTH: "AutoModelForDepthEstimation", SEGMENTATION: "AutoModelForSemanticSegmentation"}


class ModelSourceError(ValueError):
    """A model that cannot be found, reached or trusted; the message says which and why."""


@dataclass(frozen=True)
class ModelRef:
    source: str               # what the user gave
    path: str                 # local directory on this node
    kind: str                 # "hub" | "local" | "s3"
    revision: str | None      # hub commit, or None
    sha256: str               # over the weight files, name-sorted
    files: dict               # weight file -> sha256
    license: str | None
    architecture: str | None
    config_sha256: str | None = None   # over config.json and preprocessor_config.json (config_sha256)

    def provenance(self) -> dict:
        d = asdict(self)
        d.pop("path")
        return d


def cache_root() -> Path:
    return Path(os.environ.get("DEPTH_ENGINE_CACHE", Path.home() / ".cache" / "depth-engine"))


def resolve(source: str, *, local_only: bool = False) -> ModelRef:
    """Resolve MODEL to a local directory and its provenance (downloads at most once per node)."""
    if is_s3(source):
        path, kind, revision = _from_s3(source), "s3", None
    elif os.path.isdir(source):
        path, kind, revision = os.path.abspath(source), "local", None
    elif _looks_like_hub_id(source):
        path, revision = _from_hub(source, local_only=local_only)
        kind = "hub"
    else:
        raise ModelSourceError(f"model {source!r} is neither a directory, an s3:// prefix nor a hub id")
    files = _weights(Path(path), source)
    config = _read_json(Path(path) / "config.json")
    archs = config.get("architectures") or [None]
    return ModelRef(
        source=source, path=str(path), kind=kind, revision=revision,
        sha256=hashlib.sha256("".join(files[k] for k in sorted(files)).encode()).hexdigest(),
        files=files, license=_license(Path(path)), architecture=archs[0], config_sha256=config_sha256(Path(path)),
    )


# What a saved config records of its saving, not of the model: left out of its sha256.
_SAVING_KEYS = frozenset({"transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype",
                          "processor_class"})
CONFIG_FILES = ("config.json", "preprocessor_config.json")


def config_sha256(path: Path) -> str:
    """sha256 of what the model's files say it means: its config (id2label, the sky class, a
    metric head's max depth, ...) and its processor's settings, as canonical JSON without the
    keys that only record the saving. Same weights with another config label differently, so
    job.json pins this beside the weights' sha256."""
    doc = {name: {k: v for k, v in _read_json(path / name).items() if k not in _SAVING_KEYS}
           for name in CONFIG_FILES if (path / name).is_file()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_config(ref: ModelRef) -> dict:
    """The model's config.json (the driver decides from it; no weights are loaded)."""
    return _read_json(Path(ref.path) / "config.json")


def id2label(ref: ModelRef) -> dict:
    return model_config(ref).get("id2label") or {}


def check_task(ref: ModelRef, task: str) -> None:
    """Refuse a model that is not a ``task`` model (DEPTH or SEGMENTATION) or that asks for
    code from its repository, from its config alone (no weights loaded, no code run): found
    here it is one line; found by the workers it is every actor dying while loading."""
    from transformers.models.auto import modeling_auto

    check_no_remote_code(ref)
    config = model_config(ref)
    mapping = {DEPTH: modeling_auto.MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES,
               SEGMENTATION: modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES}[task]
    model_type, arch = config.get("model_type"), (config.get("architectures") or [None])[0]
    classes = mapping.get(model_type) or ()
    classes = (classes,) if isinstance(classes, str) else tuple(classes)
    if not classes or (arch and arch not in classes):
        what = f"a {arch} (model_type {model_type!r})" if arch else f"a {model_type!r} model"
        raise ModelSourceError(f"model {ref.source!r} is {what}, not a {task} model: expected one "
                               f"that {_AUTO_CLASS[task]} loads")


# What predicted_depth holds, per model_type of AutoModelForDepthEstimation (transformers 5).
# depth_anything and depth_pro say it in their configs (teacher_output); the others are fixed,
# undecided, or not monocular depth at all.
_KNOWN_OUTPUT = {"glpn": OUTPUT_DEPTH, "zoedepth": OUTPUT_DEPTH}
_NOT_DEPTH = {
    "chmv2": "a canopy-height model, not monocular depth",
    "prompt_depth_anything": "needs a prompt depth map as a second input, which depth-engine does not give",
}
_UNDECIDED = {
    "dpt": "its config does not say what it outputs (MiDaS DPT: disparity; the KITTI/NYU fine-tunes: "
           "metric depth)",
}


def teacher_output(config: dict, override: str | None = None, *, name: str = "MODEL") -> str:
    """What the teacher's output holds (normalize.TEACHER_OUTPUTS), from its config.json
    (``override``: --teacher-output). Decided once, on the driver, and pinned in job.json: taking
    metric depth for disparity inverts every label of the job, silently.

    Depth Anything: depth_estimation_type "relative" (or absent: the relative checkpoints predate
    the field) is disparity, "metric" depth; GLPN and ZoeDepth output depth. Depth Pro with its
    fov model (use_fov_model; DepthProConfig's default is false) gives metric inverse depth;
    without it, its canonical inverse depth has no metres (no focal length), so it is disparity.
    Where the config does not say (DPT, unknown types), ``override`` must; it may never contradict
    a known kind."""
    if override is not None and override not in TEACHER_OUTPUTS:
        raise ModelSourceError(f"--teacher-output must be one of {', '.join(TEACHER_OUTPUTS)}, got {override!r}")
    model_type = config.get("model_type")
    if model_type in _NOT_DEPTH:
        raise ModelSourceError(f"teacher {name} is a {model_type!r} model: {_NOT_DEPTH[model_type]}")
    if model_type not in FAMILIES:   # the workers could not reproduce its preprocessing: refuse here
        raise ModelSourceError(f"teacher {name} is a {model_type!r} model: depth-engine has no preprocessing "
                               f"rule for this family yet (supported: {', '.join(FAMILIES)})")
    known, why = _KNOWN_OUTPUT.get(model_type), f"model_type {model_type!r}"
    if model_type == "depth_anything":
        kind = config.get("depth_estimation_type", "relative")
        known = {"relative": OUTPUT_DISPARITY, "metric": OUTPUT_DEPTH}.get(kind)
        why = f"depth_estimation_type {kind!r}"
    if model_type == "depth_pro":
        fov = bool(config.get("use_fov_model", False))
        known, why = (OUTPUT_INVERSE_DEPTH if fov else OUTPUT_DISPARITY), f"use_fov_model {str(fov).lower()}"
    if known and override and override != known:
        harm = "would invert its labels" if OUTPUT_DEPTH in (known, override) else "contradicts it"
        raise ModelSourceError(f"teacher {name} outputs {known} ({why}); --teacher-output {override} {harm}")
    if known or override:
        return known or override
    reason = _UNDECIDED.get(model_type, f"depth-engine does not know what a {why} model outputs")
    raise ModelSourceError(f"teacher {name}: {reason}; pass --teacher-output disparity or "
                           "--teacher-output depth to say which")


def teacher_output_of(ref: ModelRef, override: str | None = None) -> str:
    """teacher_output of a resolved model (its config.json; no weights loaded)."""
    return teacher_output(model_config(ref), override, name=ref.source)


def check_no_remote_code(ref: ModelRef) -> None:
    """depth-engine runs no code from model repositories: refuse an ``auto_map`` (in the model's
    or its processor's config) and a model_type that transformers would need code for."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    path = Path(ref.path)
    for name in ("config.json", "preprocessor_config.json"):
        if "auto_map" in _read_json(path / name):
            raise ModelSourceError(f"model {ref.source!r} asks for remote code (auto_map in {name}); "
                                   "depth-engine runs no code from model repositories")
    model_type = _read_json(path / "config.json").get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise ModelSourceError(f"model {ref.source!r} has no model_type in config.json; "
                               "pass a save_pretrained folder")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelSourceError(f"model {ref.source!r} has model_type {model_type!r}, which transformers "
                               "does not know; depth-engine runs no code from model repositories")


def _looks_like_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source)) and not source.startswith(".")


def _from_hub(repo_id: str, *, local_only: bool) -> tuple[str, str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.md", "*.txt", "*.model"]
    try:
        path = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only)
    except LocalEntryNotFoundError:
        raise ModelSourceError(
            f"model {repo_id!r} is not in the local Hugging Face cache and the hub cannot be "
            "reached; pass a local directory or an s3:// prefix holding a save_pretrained folder"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelSourceError(f"model {repo_id!r} could not be fetched from the hub: {e}") from None
    revision = Path(path).name if Path(path).parent.name == "snapshots" else None
    return path, revision


def safe_relative_path(path: str) -> bool:
    """Whether ``path`` ('/'-separated) stays below the directory it is joined to on every
    platform: the tar member name rule (storage.names), the one rule for names from outside."""
    return check_member_name(path) is None


def _inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` resolved, or None when that is not inside ``root``: a second guard
    after safe_relative_path, against a symlink or a case that rule missed."""
    dest = (root / relative).resolve()
    return dest if dest.is_relative_to(root.resolve()) else None


def _from_s3(url: str) -> str:
    """Download every object under the prefix into the node cache, once (a file lock
    makes concurrent actors on one node wait for the first download). Every key is checked
    before anything is written: a key such as ``../../x`` must not write outside the cache."""
    prefix = url if url.endswith("/") else url + "/"
    store = open_store(prefix)
    objects = [o for o in store.list() if not o.key.endswith("/")]
    if not objects:
        raise ModelSourceError(f"model prefix {url} holds no objects")
    bad = [o.key for o in objects if not safe_relative_path(o.key)]
    if bad:
        raise ModelSourceError(f"model prefix {url} holds a key that is not a plain relative path "
                               f"({bad[0]!r}); refusing to download it")
    # The listing (keys, sizes, ETags) names the version: a changed object gets a new cache dir.
    version = hashlib.sha256(json.dumps(
        [(o.key, o.size, o.etag) for o in objects]).encode()).hexdigest()[:16]
    target = cache_root() / "models" / hashlib.sha256(prefix.encode()).hexdigest()[:16] / version
    done = target / ".complete"
    target.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            try:
                for o in objects:
                    dest = _inside(target, o.key)
                    if dest is None:
                        raise ModelSourceError(f"model prefix {url}: the key {o.key!r} would be written "
                                               f"outside {target}")
                    _download(store, o.key, dest)
            except OSError as e:
                raise ModelSourceError(f"model {url} could not be downloaded into {target}: {e}") from None
            done.touch()
    return str(target)


def _download(store, key: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with store.open_read(key) as src, open(tmp, "wb") as f:
        while chunk := src.read(8 << 20):
            f.write(chunk)
    os.replace(tmp, dest)


def _weights(path: Path, source: str) -> dict:
    """sha256 of each weight file a worker will load: exactly those, so job.json proves them."""
    return {name: _sha256_file(path / name) for name in weight_files(path, source)}


def weight_files(path: Path, source: str) -> list[str]:
    """The files ``from_pretrained(use_safetensors=True)`` loads from ``path``: model.safetensors,
    else the shards model.safetensors.index.json names. Anything else (a stray other.safetensors
    beside a pickle) is refused here, on the driver, rather than by every worker."""
    if "transformers_weights" in _read_json(path / "config.json"):
        raise ModelSourceError(f"model {source!r} names its own weights file in config.json "
                               f"(transformers_weights); depth-engine loads {SAFE_WEIGHTS} or {SAFE_INDEX}")
    if (path / SAFE_WEIGHTS).is_file():
        return [SAFE_WEIGHTS]
    if not (path / SAFE_INDEX).is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir() if p.is_file())[:8])
        raise ModelSourceError(
            f"model {source!r} has no {SAFE_WEIGHTS} and no {SAFE_INDEX} (found: {found or 'nothing'}); "
            "depth-engine loads safetensors weights only, saved by save_pretrained")
    weight_map = _read_json(path / SAFE_INDEX).get("weight_map")
    shards = list(dict.fromkeys(weight_map.values())) if isinstance(weight_map, dict) else []
    if not shards:
        raise ModelSourceError(f"model {source!r}: {SAFE_INDEX} names no weight shards")
    for name in shards:
        if not isinstance(name, str) or not safe_relative_path(name):
            raise ModelSourceError(f"model {source!r}: {SAFE_INDEX} names the shard {name!r}, "
                                   "which is not a plain relative path")
        if not (path / name).is_file():
            raise ModelSourceError(f"model {source!r}: {SAFE_INDEX} names the shard {name!r}, "
                                   "which is missing")
    return sorted(shards)


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_json(p: Path) -> dict:
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"{p} is not readable JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ModelSourceError(f"{p} is not a JSON object")
    return doc


def _license(path: Path) -> str | None:
    """The license from the model card's front matter, as the hub shows it."""
    card = path / "README.md"
    if not card.exists():
        return None
    text = card.read_text(errors="replace")
    front = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    found = re.search(r"^license:\s*(\S.*)$", front.group(1) if front else "", re.M)
    return found.group(1).strip().strip("'\"") if found else None


def weight_bytes(*refs) -> int:
    """Bytes of the weight files of the models given (None and plugins count 0): what each
    actor holds in memory, for the layout."""
    total = 0
    for ref in refs:
        if isinstance(ref, ModelRef):
            total += sum(os.path.getsize(os.path.join(ref.path, f)) for f in ref.files
                         if os.path.exists(os.path.join(ref.path, f)))
    return total
