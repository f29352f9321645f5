"""``bench --repair N``: what ``label --repair-errors`` costs beside its alternative, relabeling
the shard whole. One input shard of N photos of which ``BROKEN`` (5 %) are undecodable is
labeled; the broken samples are then fixed in the input, and the same shard is both repaired
(the error rows labeled, every other member copied by ranged reads) and relabeled whole into a
second OUTPUT, alternately, in one process with the same models: the medians and their ratio,
the bytes copied and the bytes the relabel wrote."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from engine.bench.synthetic import DEFAULT_SIZES, jpeg, scene

BROKEN = 0.05


def _write_input(path: Path, images: int, broken: set[int]) -> str:
    import webdataset as wds

    cache: dict = {}
    with wds.TarWriter(str(path)) as sink:
        for i in range(images):
            h, w = DEFAULT_SIZES[i % len(DEFAULT_SIZES)]
            if (h, w, i % 3) not in cache:
                cache[(h, w, i % 3)] = jpeg(scene(h, w, seed=i % 3))
            sink.write({"__key__": f"img-{i:07d}", "jpg": b"\xff\xd8 broken" if i in broken else cache[(h, w, i % 3)],
                        "json": json.dumps({"index": i}).encode()})
    return str(path)


def repair_figures(root: Path, images: int, teacher: str, sky: str | None, repeats: int, batch_size: int = 8,
                   output: str | None = None) -> dict:
    from labelers.sky import SkySegmenter
    from labelers.teacher import Teacher
    from pipelines.decode import SampleLimits
    from pipelines.pseudo_label import Labelers, label_shard
    from pipelines.repair import repair_shard
    from pipelines.tasks import ShardTask
    from storage import layout
    from storage.stores import open_store

    root.mkdir(parents=True, exist_ok=True)
    labelers = Labelers(Teacher.load(teacher, name="teacher"), SkySegmenter.load(sky, name="sky") if sky else None)
    broken = set(range(0, images, max(1, round(1 / BROKEN))))
    url = _write_input(root / "shard-000000.tar", images, broken)
    base = (output or str(root / "out")).rstrip("/")
    repair_s, relabel_s, copied, written = [], [], 0, 0
    for r in range(repeats):
        out = open_store(f"{base}/repair-{r}/")
        _write_input(root / "shard-000000.tar", images, broken)
        label_shard(ShardTask(url, "shard-000000"), labelers, out, batch_size=batch_size)
        _write_input(root / "shard-000000.tar", images, set())          # the inputs fixed
        t0 = time.perf_counter()
        result = repair_shard(ShardTask(url, "shard-000000"), labelers, out, batch_size=batch_size,
                              limits=SampleLimits())
        repair_s.append(time.perf_counter() - t0)
        assert result.committed and result.repaired == len(broken), result
        copied = result.copied_bytes
        whole = open_store(f"{base}/relabel-{r}/")
        t0 = time.perf_counter()
        full = label_shard(ShardTask(url, "shard-000000"), labelers, whole, batch_size=batch_size)
        relabel_s.append(time.perf_counter() - t0)
        written = full.tar_size
        assert whole.info(layout.shard_key("shard-000000")) is not None
    rep, rel = statistics.median(repair_s), statistics.median(relabel_s)
    return {"images": images, "repaired": len(broken), "repeats": repeats, "repair_seconds": rep,
            "relabel_seconds": rel, "repair_over_relabel": rep / rel, "copied_bytes": copied,
            "relabel_tar_bytes": written, "output": base}


def print_repair(r: dict) -> None:
    print(f"repair: {r['repaired']} of {r['images']} samples relabeled, the rest copied "
          f"({r['copied_bytes'] / 2**20:.1f} MiB by ranged reads): {r['repair_seconds']:.2f} s; relabeling the "
          f"shard whole: {r['relabel_seconds']:.2f} s; ratio {r['repair_over_relabel']:.3f} "
          f"(median of {r['repeats']}, same process and models, {r['output']})")
