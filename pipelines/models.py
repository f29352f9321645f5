"""Where a model comes from, and proof of which one it was.

MODEL (SPEC §1) is a hub id, a local directory, or an ``s3://`` prefix holding a
``save_pretrained`` folder. Every form resolves to a local directory on this node (an
s3 prefix is downloaded once per node into a cache) plus a provenance record for
job.json: id, revision or path, sha256 of the weights, license where stated.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from storage.objectstore import is_s3, open_store

WEIGHT_SUFFIX = ".safetensors"


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
        files=files, license=_license(Path(path)), architecture=archs[0],
    )


def id2label(ref: ModelRef) -> dict:
    return _read_json(Path(ref.path) / "config.json").get("id2label") or {}


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


def _from_s3(url: str) -> str:
    """Download every object under the prefix into the node cache, once (a file lock
    makes concurrent actors on one node wait for the first download)."""
    prefix = url if url.endswith("/") else url + "/"
    store = open_store(prefix)
    objects = [o for o in store.list() if not o.key.endswith("/")]
    if not objects:
        raise ModelSourceError(f"model prefix {url} holds no objects")
    # The listing (keys, sizes, ETags) names the version: a changed object gets a new cache dir.
    version = hashlib.sha256(json.dumps(
        [(o.key, o.size, o.etag) for o in objects]).encode()).hexdigest()[:16]
    target = cache_root() / "models" / hashlib.sha256(prefix.encode()).hexdigest()[:16] / version
    done = target / ".complete"
    target.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            for o in objects:
                dest = target / o.key
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(dest.name + ".part")
                with store.open_read(o.key) as src, open(tmp, "wb") as f:
                    while chunk := src.read(8 << 20):
                        f.write(chunk)
                os.replace(tmp, dest)
            done.touch()
    return str(target)


def _weights(path: Path, source: str) -> dict:
    files = sorted(p for p in path.rglob(f"*{WEIGHT_SUFFIX}"))
    if not files:
        found = ", ".join(sorted(p.name for p in path.iterdir() if p.is_file())[:8])
        raise ModelSourceError(
            f"model {source!r} has no .safetensors weights (found: {found or 'nothing'}); "
            "depth-engine loads safetensors only")
    return {str(p.relative_to(path)): _sha256_file(p) for p in files}


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return {}


def _license(path: Path) -> str | None:
    """The license from the model card's front matter, as the hub shows it."""
    card = path / "README.md"
    if not card.exists():
        return None
    text = card.read_text(errors="replace")
    front = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    found = re.search(r"^license:\s*(\S.*)$", front.group(1) if front else "", re.M)
    return found.group(1).strip().strip("'\"") if found else None
