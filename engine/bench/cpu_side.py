"""``bench --stand-in-rate R``: the CPU side of a labeler at real photo sizes, with the model step
on a stand-in accelerator (engine.bench.stand_in) that costs 1/R s per image of device time
and returns maps with a real scene's statistics.

Per photo size (0.3, 1, 3.4 and 12 MP by default), on a shard of JPEG photos of that size:

- one plain PIL decode of the same JPEG into numpy (``np.asarray(Image.open(...))``): the unit of cost;
- each stage alone, one thread, CPU time per image: decode, the host's share of the model step
  (the device-to-host copy of the maps), normalization, percentiles, disp.png, sky.png, and
  the whole of ``encode``;
- the whole flow (``label_shard``: read, decode, bucket, model step, encode, tar, manifest,
  commit, with its codec threads), in-process on local storage: the process's CPU time per
  image, the images/s it sustains on this machine, and from them the images/s per core and the
  cores one GPU at R images/s needs.

Each figure is the median of ``repeats`` runs after a warm-up; every variant (``--label-size``
choices, draft decode) runs side by side on the same shard, so their ratios come from one run.
"""
from __future__ import annotations

import io
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# (H, W): a VGA frame, a 1 MP crop, an SA-1B photo (2250x1500), a 12 MP phone photo.
PHOTO_SIZES = {"0.3MP": (480, 640), "1MP": (816, 1224), "3.4MP": (1500, 2250), "12MP": (3024, 4032)}
JPEG_QUALITY = 90
GOAL_RATE = 300.0
STAND_IN_IMAGES = 16     # photos per size


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A colour photo of scikit-image's, resized to height x width, with sensor-like grain so its
    JPEG is a photo's size (about 0.2-0.3 byte per pixel, as SA-1B's at quality 90) and costs a photo's decode."""
    from skimage import data

    sources = [data.astronaut, data.coffee, data.chelsea, data.rocket]
    source = sources[seed % len(sources)]()
    image = np.asarray(Image.fromarray(source).resize((width, height), Image.BICUBIC), dtype=np.float32)
    grain = np.random.default_rng(seed).normal(0.0, 6.0, image.shape).astype(np.float32)
    return np.clip(image + grain, 0, 255).astype(np.uint8)


def write_photo_shard(path: Path, images: int, height: int, width: int) -> Path:
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = [_jpeg(photo(height, width, seed)) for seed in range(min(images, 4))]
    with wds.TarWriter(str(path)) as sink:
        for i in range(images):
            sink.write({"__key__": f"{path.stem}-{i:06d}", "jpg": encoded[i % len(encoded)]})
    return path


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _cpu() -> float:
    """CPU seconds of this process, every thread's."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_ms(fn, items, repeats: int) -> float:
    """Median over ``repeats`` of fn's CPU milliseconds per item, run on this thread alone."""
    for item in items[:1]:   # warm-up: caches, lazy imports
        fn(item)
    per = []
    for _ in range(repeats):
        t0 = time.thread_time()
        for item in items:
            fn(item)
        per.append(1000 * (time.thread_time() - t0) / len(items))
    return statistics.median(per)


def _best_cpu_ms(fn, items, repeats: int) -> float:
    """Mean over items of the least CPU milliseconds of ``repeats`` calls each, this thread: an
    operation's own cost without the page faults a fresh large buffer can add (glibc hands a
    ~10 MB array out as new pages in one state and reused ones in another: 15 or 32 ms for the
    same decode). The unit the flow is divided by, so the ratio errs against the engine."""
    best = []
    for item in items:
        fn(item)
        runs = []
        for _ in range(max(repeats, 3)):
            t0 = time.thread_time()
            fn(item)
            runs.append(time.thread_time() - t0)
        best.append(min(runs))
    return 1000 * statistics.mean(best)


@dataclass(frozen=True)
class Variant:
    """One way of running the flow, measured beside the others."""

    name: str
    options: dict = field(default_factory=dict)   # Labelers fields (label_size)


BEFORE = Variant("labels at image size", {"label_size": "image"})
TEACHER_SIZE = Variant("labels at teacher size", {"label_size": "teacher"})
DRAFT = Variant("teacher size, --draft-decode", {"label_size": "teacher", "draft_decode": True})


def variants() -> list[Variant]:
    return [BEFORE, TEACHER_SIZE, DRAFT]


def cpu_side_figures(root: Path, *, rate: float = GOAL_RATE, sizes: dict | None = None, images: int = 8,
                     threads: int = 4, batch_size: int = 8, repeats: int = 3) -> dict:
    """The figures above, per photo size and variant."""
    import os

    from engine.bench.codecs import codec_figures
    from engine.bench.draft_effect import draft_effect
    from engine.bench.pools import pool_figures
    from engine.bench.stand_in import StandInSky, StandInTeacher, image_map, sky_mask
    from engine.runtime.allocator import keep_freed_buffers
    from pipelines.decode import decode, sample_from_members
    from pipelines.encode import encode, percentiles
    from pipelines.pseudo_label import Labelers, label_shard
    from pipelines.tasks import ShardTask
    from labelers.normalize import normalize_disparity
    from storage.label_format import disparity_png, mask_png, quantize_disparity
    from storage.shards import iter_tar_samples
    from storage.stores import open_store

    keep_freed_buffers()   # as a labeler actor does (engine.runtime.allocator)
    sizes = sizes or PHOTO_SIZES
    out = {"rate": rate, "images": images, "threads": threads, "batch_size": batch_size,
           "repeats": repeats, "cores": os.cpu_count(), "sizes": {}}
    for size_name, (height, width) in sizes.items():
        slug = size_name.replace(".", "_")   # a dot in a tar key would split it
        shard = write_photo_shard(root / "photos" / f"{slug}.tar", images, height, width)
        with open(shard, "rb") as f:
            members = list(iter_tar_samples(f))
        jpegs = [m["jpg"] for m in members]
        fig = {"height": height, "width": width, "megapixels": round(height * width / 1e6, 2),
               "jpeg_bytes_per_pixel": round(statistics.mean(len(j) for j in jpegs) / (height * width), 3)}
        plain = _best_cpu_ms(lambda b: np.asarray(Image.open(io.BytesIO(b))), jpegs, repeats)
        fig["plain_decode_ms"] = round(plain, 3)

        samples = [decode(sample_from_members(m, str(shard))) for m in members]
        raw, sky = image_map(height, width), sky_mask(height, width)
        label = normalize_disparity(raw, sky)
        models = {"teacher": "stand-in", "teacher_output": "disparity", "sky_model": "stand-in-sky"}

        def encoded(s):
            s.raw, s.sky = raw.copy(), sky.copy()
            return encode(s, models)

        drafting = Labelers(StandInTeacher(rate=rate), StandInSky(), label_size="teacher", draft_decode=True)
        stages = {
            "decode": _cpu_ms(lambda m: decode(sample_from_members(m, str(shard))), members, repeats),
            "decode (draft)": _cpu_ms(lambda m: drafting.decode(sample_from_members(m, str(shard))), members, repeats),
            "host copy": _cpu_ms(lambda _: (raw.copy(), sky.copy()), members, repeats),
            "normalize": _cpu_ms(lambda _: normalize_disparity(raw, sky), members, repeats),
            "percentiles": _cpu_ms(lambda _: percentiles(quantize_disparity(label.disparity), ~sky, False), members, repeats),
            "disp.png": _cpu_ms(lambda _: disparity_png(label.disparity), members, repeats),
            "sky.png": _cpu_ms(lambda _: mask_png(sky), members, repeats),
            "encode (all)": _cpu_ms(encoded, samples, repeats),
        }
        fig["stage_cpu_ms"] = {k: round(v, 2) for k, v in stages.items()}
        fig["disp_png_bytes_per_pixel"] = round(len(disparity_png(label.disparity)) / (height * width), 3)
        small = drafting.label_shape(height, width)
        fig["codecs"] = {
            f"{h}x{w}": codec_figures(quantize_disparity(normalize_disparity(image_map(height, width, h, w),
                                                                             sky_mask(h, w)).disparity), repeats)
            for h, w in dict.fromkeys([(height, width), small])}

        fig["draft_effect"] = draft_effect(jpegs[:4])
        fig["pools"] = pool_figures(members, image_map(height, width, *small), sky_mask(*small))
        fig["variants"] = {}
        for n, variant in enumerate(variants()):
            runs = []
            for r in range(repeats + 1):   # the first is the warm-up
                teacher = StandInTeacher(rate=rate)
                labelers = Labelers(teacher, StandInSky(), **variant.options)
                store = open_store(str(root / "out" / slug / f"variant-{n}" / f"run-{r}"))
                c0, t0 = _cpu(), time.perf_counter()
                result = label_shard(ShardTask(str(shard), f"run-{r}"), labelers, store, batch_size=batch_size,
                                     threads=threads)
                wall, cpu = time.perf_counter() - t0, _cpu() - c0
                if result.ok != images:
                    raise RuntimeError(f"{variant.name} at {size_name}: {result.errors} error rows {result.error_reasons}")
                if r:
                    runs.append((wall, cpu, result.tar_size))
            wall = statistics.median(w for w, _, _ in runs)
            cpu_ms = round(statistics.median(1000 * c / images for _, c, _ in runs), 1)   # the figures below from it
            fig["variants"][variant.name] = {
                "cpu_ms_per_image": round(cpu_ms, 1),
                "plain_decodes_per_image": round(cpu_ms / plain, 2),
                "images_per_second": round(images / wall, 2),
                "images_per_second_per_core": round(1000 / cpu_ms, 2),
                "cores_per_gpu": round(rate * cpu_ms / 1000, 1),
                "output_bytes_per_image": round(runs[-1][2] / images),
            }
        out["sizes"][size_name] = fig
    return out


def print_cpu_side(c: dict) -> None:
    print(f"stand-in accelerator at {c['rate']:g} images/s per GPU; {c['images']} photos per size, "
          f"{c['threads']} codec threads, batch {c['batch_size']}, median of {c['repeats']}, {c['cores']} cores")
    for name, f in c["sizes"].items():
        print(f"\n{name} ({f['width']}x{f['height']}, JPEG {f['jpeg_bytes_per_pixel']} B/px): "
              f"plain PIL decode {f['plain_decode_ms']:.1f} CPU-ms")
        print("  stages alone, CPU-ms per image: " + ", ".join(f"{k} {v:.1f}" for k, v in f["stage_cpu_ms"].items()))
        print(f"  disp.png {f['disp_png_bytes_per_pixel']} B/px at the image's size")
        for grid, codecs in f.get("codecs", {}).items():
            print(f"  16-bit PNG encoders on the {grid} label: " + "; ".join(
                f"{k} {v['cpu_ms']:.1f} ms {v['bytes_per_pixel']} B/px{'' if v['bit_exact'] else ' NOT EXACT'}"
                for k, v in codecs.items()))
        for comparison, e in f.get("draft_effect", {}).items():
            print(f"  teacher input, {comparison}: max |diff| {e['max_abs']:g} grey levels, "
                  f"mean {e['mean_abs']:g}, Pearson {e['pearson']:.6f}")
        p = f["pools"]
        print(f"  decode + encode at teacher size, images/s: 1 thread {p['one_thread']:.1f}, "
              f"{p['workers']} threads {p['threads']:.1f}, {p['workers']} processes {p['processes']:.1f}")
        print(f"  {'flow':34}{'CPU-ms/img':>11}{'decodes':>9}{'img/s':>8}{'img/s/core':>11}"
              f"{'cores/GPU':>10}{'KiB/img':>9}")
        for vname, v in f["variants"].items():
            print(f"  {vname:34}{v['cpu_ms_per_image']:>11.1f}{v['plain_decodes_per_image']:>9.2f}"
                  f"{v['images_per_second']:>8.2f}{v['images_per_second_per_core']:>11.2f}"
                  f"{v['cores_per_gpu']:>10.1f}{v['output_bytes_per_image'] / 1024:>9.0f}")
