"""``depth-engine demo``: the embedded default. Sample photos shipped by scikit-image
become two input shards on local storage, labeled with a local Ray.

Models: Depth-Anything-V2-Small (Apache-2.0) and SegFormer-b0 when the hub or the local
cache can serve them; offline, tiny random-weight models of the same architectures,
which show the machinery, not depth quality (and the demo says so).
"""
from __future__ import annotations

import io
import json
import os
import socket
import sys
from pathlib import Path

from PIL import Image

from engine.config import DEFAULT_LABEL_SIZE, LabelConfig
from engine.models import ModelSourceError, cache_root, resolve

DEMO_TEACHER = "depth-anything/Depth-Anything-V2-Small-hf"
DEMO_SKY = "nvidia/segformer-b0-finetuned-ade-512-512"
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "retina", "immunohistochemistry", "camera", "horse", "moon", "page"]


def sample_photos() -> list[tuple[str, Image.Image]]:
    from skimage import data

    out = []
    for name in PHOTOS:
        try:
            out.append((name, Image.fromarray(getattr(data, name)())))
        except Exception:  # noqa: BLE001 - a photo that needs a download is skipped
            continue
    return out


def write_input_shards(directory: Path, photos, per_shard: int = 6) -> list[Path]:
    """WebDataset shards written with the webdataset library, as a user's would be."""
    import webdataset as wds

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(0, len(photos), per_shard):
        path = directory / f"demo-{i // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for name, img in photos[i:i + per_shard]:
                buf = io.BytesIO()
                img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode).save(buf, format="JPEG", quality=90)
                sink.write({"__key__": name, "jpg": buf.getvalue(),
                            "json": json.dumps({"origin": "skimage.data", "name": name}).encode()})
        paths.append(path)
    return paths


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def demo_models() -> tuple[str, str, bool]:
    """(teacher, sky, real): the small real models if they can be had, else random ones."""
    online = hub_reachable()
    try:
        for m in (DEMO_TEACHER, DEMO_SKY):
            resolve(m, local_only=not online)
        return DEMO_TEACHER, DEMO_SKY, True
    except ModelSourceError:
        pass
    from labelers.random_models import save_random_segmenter, save_random_teacher

    root = cache_root() / "demo-models"
    teacher, sky = root / "random-teacher-tiny", root / "random-segmenter-tiny"
    if not (teacher / "config.json").exists():
        save_random_teacher(teacher, size="tiny")
    if not (sky / "config.json").exists():
        save_random_segmenter(sky, size="tiny")
    return str(teacher), str(sky), False


def run_demo(output: str, *, as_json: bool = False) -> int:
    from engine.cli.printing import print_summary
    from engine.job import pinned_label_size
    from engine.label import label
    from storage.stores import open_store

    out = Path(output).resolve()
    inputs = out.parent / f"{out.name}-input"
    photos = sample_photos()
    write_input_shards(inputs, photos)
    teacher, sky, real = demo_models()
    if not real:
        print("depth-engine demo: the hub is not reachable and the real models are not cached, so the demo\n"
              "uses tiny random-weight models: the labels show the machinery, not depth quality.",
              file=sys.stderr)
    size = pinned_label_size(open_store(str(out))) or DEFAULT_LABEL_SIZE   # as `label` would
    summary = label(LabelConfig(input=str(inputs) + "/", output=str(out), teacher=teacher, sky=sky,
                                label_size=size, batch_size=4, workers=1, progress=not as_json))
    print_summary(summary.to_json(), as_json)
    if not as_json:
        print(f"\ninput shards: {inputs}/\nlabeled shards: {out}/shards/\nmanifest: {out}/manifest/ "
              f"(python -c \"import pyarrow.dataset as d; print(d.dataset('{out}/manifest').to_table())\")\n"
              f"status: depth-engine status {out}")
    return summary.exit_code
