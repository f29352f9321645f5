"""Training samples from labeled OUTPUTs (PAPER.md step 4-5), read only through the documented format.

What the loader relies on is SPEC §2-4 and docs/MANIFEST.md, nothing of the engine: the manifest
says which samples exist and which pass a filter, and each shard tar holds exactly its ok rows
(`<key>.<image ext>`, `<key>.disp.png`, optional `<key>.sky.png` and `<key>.valid.png`, and
`<key>.depth.png` in metres x 256 where job.json says so: `label --keep-depth`, or a
`convert-gt --gt-scale 256` that carried the input's `depth.png`).

The unit of work is a shard, streamed front to back once, so a trainer reads each byte of the
OUTPUT once per epoch and never seeks. An epoch is a permutation of all shards, split by rank
then by DataLoader worker; the sample augmentations come from an RNG keyed by the sample, so an
epoch is reproducible whatever the split, and resumable by counting.

    data = DepthShards(LoaderConfig(outputs=("s3://labels/crawl-v1/",)), rank, world_size)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=4)
"""
from __future__ import annotations

import hashlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow.dataset as ds
import torch
from PIL import Image

from pipelines.decode import decode_image
from pipelines.encode import depth_png_in_metres
from pipelines.student.exclude import check_specs, excluded_keys
from storage import label_format as fmt
from storage.manifest import dataset
from storage.output import Output
from storage.shards import iter_tar_samples
from storage.stores import open_store

_OK = ds.field("status") == "ok"
_MANIFEST_THREADS = 8  # manifest parts are small: reading several at once hides S3 latency


@dataclass(frozen=True)
class LoaderConfig:
    outputs: tuple[str, ...]            # OUTPUT URLs (local directories or s3://bucket/prefix/)
    crop: int = 518                     # square training crop (Depth Anything: 518)
    filter: ds.Expression | None = None  # manifest rows to train on; None: status == "ok"
    seed: int = 0
    flip: bool = True                   # random horizontal flip, p = 0.5
    exclude: tuple[str, ...] = ()       # Parquet files (PATH or PATH:COLUMN) of (shard, key) rows to leave out

    def __post_init__(self) -> None:
        if isinstance(self.outputs, str) or not self.outputs:
            raise ValueError("LoaderConfig.outputs must be a non-empty tuple of OUTPUT URLs")
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "exclude", check_specs(self.exclude))
        if self.crop < 1:
            raise ValueError(f"crop must be positive, got {self.crop}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy seed sequences), got {self.seed}")


@dataclass(frozen=True)
class ShardPlan:
    """One shard's share of the filter, stored as whichever key set is smaller.

    A 62M-image crawl cannot hold every key in each worker; with the default filter the
    excluded set is empty, since the tar holds exactly the ok rows (SPEC §3).
    """

    output: int          # index into LoaderConfig.outputs
    shard: str           # output shard file name, "<name>.tar"
    count: int           # samples of this shard that pass the filter
    keys: frozenset      # the kept keys (exclude=False) or the ok keys filtered out (exclude=True)
    exclude: bool

    def wants(self, key: str) -> bool:
        return (key in self.keys) != self.exclude


def _part_plans(fragment, schema, keep, output: int, excluded: dict[str, frozenset]) -> list[ShardPlan]:
    """Plans of the shards one manifest part describes (one, for a depth-engine OUTPUT); the
    keys `excluded` names (shard name -> keys, pipelines.student.exclude) count as filtered out."""
    table = fragment.to_table(
        schema=schema, filter=_OK,
        columns={"key": ds.field("key"), "shard": ds.field("shard"), "keep": keep})
    rows: dict[str, tuple[list, list]] = {}
    for key, shard, kept in zip(*(table.column(c).to_pylist() for c in ("key", "shard", "keep"))):
        kept = kept and key not in excluded.get(Output.name_of(shard), ())
        rows.setdefault(shard, ([], []))[0 if kept else 1].append(key)  # null (e.g. no sky model): out
    plans = []
    for shard, (kept, dropped) in rows.items():
        if kept:
            exclude = len(dropped) < len(kept)
            plans.append(ShardPlan(output, shard, len(kept), frozenset(dropped if exclude else kept), exclude))
    return plans


def plan_shards(config: LoaderConfig) -> list[ShardPlan]:
    """Every shard with at least one sample passing the filter, sorted by (output index, shard).

    Error rows are never planned: they have nothing in the tar. A row whose filter value is
    null is left out (e.g. `sky_fraction < x` on an OUTPUT labeled with `--sky none`).
    """
    plans: list[ShardPlan] = []
    excluded = excluded_keys(config.exclude)
    for index, url in enumerate(config.outputs):
        manifest = dataset(open_store(url))
        keep = _OK if config.filter is None else config.filter
        with ThreadPoolExecutor(_MANIFEST_THREADS) as pool:
            parts = pool.map(lambda f: _part_plans(f, manifest.schema, keep, index, excluded),
                             manifest.get_fragments())
            found = [p for part in parts for p in part]
        names = [p.shard for p in found]
        if len(names) != len(set(names)):
            raise ValueError(f"{url}: a shard's rows are split across manifest parts (not a depth-engine OUTPUT)")
        plans.extend(found)
    return sorted(plans, key=lambda p: (p.output, p.shard))


def _stable_int(*parts: str) -> int:
    """A process-independent hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest(), "little")


def sample_rng(seed: int, epoch: int, output: int, shard: str, key: str) -> np.random.Generator:
    """The augmentation RNG of one sample: independent of rank, worker and OUTPUT location."""
    return np.random.default_rng([seed, epoch, 1, output, _stable_int(shard, key)])


def epoch_order(plans: list[ShardPlan], seed: int, epoch: int) -> list[ShardPlan]:
    return [plans[i] for i in np.random.default_rng([seed, epoch, 0]).permutation(len(plans))]


def split(items: list, part: int, parts: int) -> list:
    """Round-robin share `part` of `parts`: the first len % parts shares get one item more."""
    return items[part::parts]


# -- decoding (SPEC §3) and the training transform (PAPER.md step 5) ------------------------------

def decode_rgb(data: bytes) -> np.ndarray:
    """The image as the teacher saw it (SPEC §5.1): the labeler's own decoding (EXIF
    orientation, every mode to uint8 RGB), so the student's pixels are the labeled ones."""
    return decode_image(data)


def decode_sample(sample: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A tar sample -> (image uint8 HxWx3, disparity float32, valid bool, sky bool), the labels
    hxw: the image's size, or a downscale of it (``label --label-size``), refused otherwise.

    Pseudo-labels carry no valid.png: every pixel is valid, sky included (its label, 0, says
    "farthest"). Ground-truth conversions carry one. No sky.png (`--sky none`): no sky.
    The codecs are storage.label_format's.
    """
    key = sample["__key__"]
    image_ext = fmt.image_member(sample)
    if image_ext is None or fmt.DISP_MEMBER not in sample:
        raise ValueError(f"sample {key!r}: no image or no disp.png (members: {sorted(sample)})")
    image = decode_rgb(sample[image_ext])
    disparity = fmt.read_disparity_png(sample[fmt.DISP_MEMBER])
    shape = disparity.shape
    valid = fmt.read_mask_png(sample[fmt.VALID_MEMBER]) if fmt.VALID_MEMBER in sample else np.ones(shape, bool)
    sky = fmt.read_mask_png(sample[fmt.SKY_MEMBER]) if fmt.SKY_MEMBER in sample else np.zeros(shape, bool)
    if not (valid.shape == sky.shape == shape and fmt.is_label_shape(shape, image.shape[:2])):
        raise ValueError(f"sample {key!r}: labels {disparity.shape}, {sky.shape}, {valid.shape} are not one "
                         f"size, the image's {image.shape[:2]} or a downscale of it")
    return image, disparity, valid, sky


def training_transform(image: np.ndarray, disparity: np.ndarray, valid: np.ndarray | None,
                       sky: np.ndarray | None, crop: int, rng: np.random.Generator,
                       flip: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shorter side resized to `crop`, a random crop x crop window, a horizontal flip with p 0.5.

    One geometry for image and labels; only the interpolation differs: bicubic for the image,
    bilinear for disparity (a label must not overshoot), nearest for masks (they stay binary).
    Returns image float32 (3, crop, crop) in [0, 1], disparity float32, valid and sky bool.
    The RNG is drawn in a fixed order (row offset, column offset, flip), so equal RNGs give
    equal samples.
    """
    out = transform_sample(image, disparity, valid, sky, crop, rng, flip)
    return out["image"], out["disparity"], out["valid"], out["sky"]


def transform_sample(image: np.ndarray, disparity: np.ndarray, valid: np.ndarray | None,
                     sky: np.ndarray | None, crop: int, rng: np.random.Generator, flip: bool = True,
                     depth: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """training_transform as a dict, plus `depth` (metres, 0 = none) when given: the same
    window, resized nearest (bilinear would blend a depth edge, or a pixel without depth, into
    distances that are nowhere in the scene).

    The labels may be a downscale of the image (``label --label-size``): the window is laid out
    on the label's grid, and every array, image included, is resized once from its own grid to
    the same (rh, rw) before the crop, so image and labels stay aligned whatever their sizes."""
    h, w = disparity.shape
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or not fmt.is_label_shape((h, w), image.shape[:2]):
        raise ValueError(f"image must be uint8 HxWx3 of the labels' size {(h, w)} or larger at their aspect, "
                         f"got {image.dtype} {image.shape}")
    valid = np.ones((h, w), bool) if valid is None else valid
    sky = np.zeros((h, w), bool) if sky is None else sky
    scale = crop / min(h, w)
    rh, rw = max(crop, round(h * scale)), max(crop, round(w * scale))
    top = int(rng.integers(0, rh - crop + 1))
    left = int(rng.integers(0, rw - crop + 1))
    mirror = bool(flip and rng.random() < 0.5)

    def geometry(array: np.ndarray, resample: Image.Resampling) -> np.ndarray:
        if (rh, rw) != array.shape[:2]:
            array = np.asarray(Image.fromarray(array).resize((rw, rh), resample))
        out = array[top:top + crop, left:left + crop]
        return np.ascontiguousarray(out[:, ::-1] if mirror else out)

    rgb = geometry(image, Image.Resampling.BICUBIC)
    disp = geometry(np.ascontiguousarray(disparity, np.float32), Image.Resampling.BILINEAR)
    masks = [geometry(m.astype(np.uint8), Image.Resampling.NEAREST).astype(bool) for m in (valid, sky)]
    rgb = rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    out = {"image": rgb, "disparity": np.clip(disp, 0.0, 1.0), "valid": masks[0], "sky": masks[1]}
    if depth is not None:
        if depth.shape != (h, w):
            raise ValueError(f"depth must be {(h, w)}, got {depth.shape}")
        out["depth"] = geometry(np.ascontiguousarray(depth, np.float32), Image.Resampling.NEAREST)
    return out


# -- the dataset ----------------------------------------------------------------------------------

class DepthShards(torch.utils.data.IterableDataset):
    """Samples of one rank's shards for one epoch: dicts of image float32 (3, C, C) in [0, 1],
    disparity float32 (C, C) in [0, 1], valid and sky bool (C, C), and the sample's identity:
    key, shard, output (URL), epoch, worker and num_workers (the DataLoader worker that read it).
    Where the sample has `depth.png` in metres x 256 (`_has_metric_depth`), also `depth`
    float32 (C, C) in metres, 0 where there is none (mask with `depth > 0`), same window.

    Split: all shards (sorted by output index, then shard name) are permuted with (seed, epoch),
    dealt round-robin to ranks, then each rank's list round-robin to its DataLoader workers.
    Every sample that passes the filter is seen exactly once per epoch across ranks x workers.
    Shards do not divide evenly in general: the first `n % world_size` ranks (and workers) get
    one shard more, so ranks see different sample counts; a DDP trainer must not assume equal
    epochs (`rank_sizes()` gives them; an endless stream across epochs sidesteps the question).

    Resume contract: a sample counts as consumed when the trainer says so. Call
    `mark_consumed(x)` with each sample or collated batch after using it (it reads the sample's
    `worker` field; samples of another epoch than the current one are not counted, so a batch
    that straddles an epoch boundary in an endless stream is marked as it is), save
    `state_dict()` with the checkpoint, and `load_state_dict()` it into a
    fresh dataset before iterating: each worker then skips the first `consumed[worker]` samples
    of its (deterministic) stream, whole shards without reading them, and yields exactly the
    rest, with the same crops. The same seed, outputs, filter, rank, world size and number of
    workers are required; a state from another split is refused. Counting yielded samples is
    not enough with DataLoader workers, which prefetch ahead of the trainer. Worker copies are
    made when an iterator starts: call `set_epoch`/`load_state_dict` before `iter(loader)`, and
    do not use `persistent_workers=True`.
    """

    def __init__(self, config: LoaderConfig, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.plans = plan_shards(config)
        self.depth = [_has_metric_depth(url) for url in config.outputs]   # per OUTPUT: yield `depth`?
        self.fingerprint = _stable_int(*(f"{p.output}/{p.shard}/{p.count}" for p in self.plans))
        self.epoch = 0
        self._consumed: Counter = Counter()
        self._num_workers: int | None = None

    # -- epochs and the split
    def set_epoch(self, epoch: int) -> None:
        """Start `epoch`; the consumed counts are kept only when the epoch does not change."""
        if epoch != self.epoch:
            self._consumed, self._num_workers = Counter(), None
        self.epoch = epoch

    def shards(self, worker: int = 0, num_workers: int = 1, epoch: int | None = None) -> list[ShardPlan]:
        """The shards one worker of this rank streams in `epoch`, in order."""
        order = epoch_order(self.plans, self.config.seed, self.epoch if epoch is None else epoch)
        return split(split(order, self.rank, self.world_size), worker, num_workers)

    def rank_sizes(self, epoch: int | None = None) -> list[int]:
        """Samples each rank gets in `epoch` (they differ by up to one shard's worth)."""
        order = epoch_order(self.plans, self.config.seed, self.epoch if epoch is None else epoch)
        return [sum(p.count for p in split(order, r, self.world_size)) for r in range(self.world_size)]

    def __len__(self) -> int:
        return self.rank_sizes()[self.rank]

    # -- resume
    def mark_consumed(self, x, where=None) -> None:
        """Count samples as consumed: a sample or batch dict, a worker id, or worker ids.

        `where` (bool per sample) picks this dataset's samples out of a mixed batch:
        `labeled.mark_consumed(batch, where=~batch["pseudo"])`.
        """
        def per_sample(v) -> list[int]:
            return [int(v)] if isinstance(v, (int, np.integer)) else [int(i) for i in torch.as_tensor(v).flatten()]

        workers = per_sample(x["worker"] if isinstance(x, dict) else x)
        keep = [True] * len(workers) if where is None else [bool(k) for k in torch.as_tensor(where).flatten()]
        if isinstance(x, dict) and "epoch" in x:       # a finished epoch's samples: its count is gone
            keep = [k and e == self.epoch for k, e in zip(keep, per_sample(x["epoch"]))]
        if isinstance(x, dict) and "num_workers" in x:
            sizes = [n for n, k in zip(per_sample(x["num_workers"]), keep) if k]
            self._num_workers = sizes[0] if sizes else self._num_workers
        self._consumed.update(w for w, k in zip(workers, keep) if k)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": {str(w): n for w, n in sorted(self._consumed.items())},
                "num_workers": self._num_workers, "seed": self.config.seed, "rank": self.rank,
                "world_size": self.world_size, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Only `epoch` and `consumed` are required; the other fields are checked when present."""
        mine = self.state_dict()
        for name in ("seed", "rank", "world_size", "fingerprint"):
            if state.get(name) is not None and state[name] != mine[name]:
                what = "the OUTPUTs or the filter changed" if name == "fingerprint" else \
                    f"{name} {state[name]} != {mine[name]}"
                raise ValueError(f"cannot resume from this state: {what}")
        self.epoch = int(state["epoch"])
        self._consumed = Counter({int(w): int(n) for w, n in state.get("consumed", {}).items()})
        self._num_workers = state.get("num_workers")

    # -- iteration
    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skip = self._consumed.get(worker, 0)
        if skip and self._num_workers not in (None, num_workers):
            raise ValueError(f"state was saved with {self._num_workers} DataLoader workers, "
                             f"resumed with {num_workers}: the split would differ")
        for plan in self.shards(worker, num_workers):
            if skip >= plan.count:
                skip -= plan.count        # a whole shard consumed: not even opened
                continue
            for sample in self._shard_samples(plan, skip):
                yield {**sample, "epoch": self.epoch, "worker": worker, "num_workers": num_workers}
            skip = 0

    def _shard_samples(self, plan: ShardPlan, skip: int) -> Iterator[dict]:
        cfg, url = self.config, self.config.outputs[plan.output]
        seen = 0
        output = Output(open_store(url))
        tar = output.tar_key(plan.shard)
        with output.store.open_read(tar) as stream:
            for sample in iter_tar_samples(stream):
                key = sample["__key__"]
                if not plan.wants(key):
                    continue
                seen += 1
                if seen <= skip:
                    continue
                image, disparity, valid, sky = decode_sample(sample)
                depth = None
                if self.depth[plan.output] and fmt.DEPTH_MEMBER in sample:
                    depth = fmt.read_depth_png(sample[fmt.DEPTH_MEMBER])
                    if depth.shape != disparity.shape:
                        raise ValueError(f"sample {key!r}: depth.png is {depth.shape}, the label {disparity.shape}")
                rng = sample_rng(cfg.seed, self.epoch, plan.output, plan.shard, key)
                arrays = transform_sample(image, disparity, valid, sky, cfg.crop, rng, cfg.flip, depth)
                yield {**{name: torch.from_numpy(a) for name, a in arrays.items()},
                       "key": key, "shard": plan.shard, "output": url}
        if seen != plan.count:
            raise ValueError(f"{output.store.url_of(tar)}: the manifest lists {plan.count} samples to "
                             f"train on, the tar holds {seen} of them (check it with `depth-engine verify`)")


def _has_metric_depth(url: str) -> bool:
    """Whether this OUTPUT's `depth.png` members are metres x 256 (job.json says; an OUTPUT
    without job.json, or whose depth.png is in another unit, yields no `depth`)."""
    doc = Output(open_store(url)).job()
    return doc is not None and depth_png_in_metres(doc.get("label") or {})


# -- mixing labeled and pseudo-labeled samples (PAPER.md step 4) --------------------------------

def mixed_batches(labeled: Iterable[dict], pseudo: Iterable[dict], batch_size: int,
                  ratio: tuple[int, int] = (1, 2)) -> Iterator[dict]:
    """Batches of `batch_size` with labeled:pseudo = ratio (1:2 in Depth Anything), collated.

    Each batch holds round(batch_size * a / (a + b)) labeled samples first, then pseudo ones;
    `pseudo` is a bool vector saying which are which. Exactly that many samples are taken
    from each stream per batch, nothing read ahead, so a stream's count of samples taken is
    its count consumed at a step boundary (or mark them: `pseudo_data.mark_consumed(batch,
    where=batch["pseudo"])`). Stops when a stream runs short (the partial batch is dropped):
    pass endless streams (e.g. epoch after epoch) to train by steps.
    Fields common to all samples are collated (tensors stacked, strings listed).
    """
    a, b = ratio
    if a < 0 or b < 0 or a + b == 0:
        raise ValueError(f"invalid ratio {ratio}")
    n_lab = round(batch_size * a / (a + b))
    n_pseudo = batch_size - n_lab
    if (a and not n_lab) or (b and not n_pseudo):
        raise ValueError(f"batch size {batch_size} is too small for ratio {a}:{b}")
    return _mix(iter(labeled), iter(pseudo), n_lab, n_pseudo)  # checked now, not at the first batch


def _mix(labeled: Iterator[dict], pseudo: Iterator[dict], n_lab: int, n_pseudo: int) -> Iterator[dict]:
    while True:
        samples = [s for _, s in zip(range(n_lab), labeled)]   # range first: no sample is lost
        if len(samples) < n_lab:
            return
        samples += [s for _, s in zip(range(n_pseudo), pseudo)]
        if len(samples) < n_lab + n_pseudo:
            return
        common = set.intersection(*(set(s) for s in samples))
        batch = torch.utils.data.default_collate([{k: s[k] for k in common} for s in samples])
        batch["pseudo"] = torch.arange(n_lab + n_pseudo) >= n_lab
        yield batch
