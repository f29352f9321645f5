"""The reference training loop as a Ray Train job, on the cluster that labeled.

Each worker of a ``TorchTrainer`` runs the same ``train(cfg)`` that torchrun runs. Ray Train
creates the torch process group and sets RANK, WORLD_SIZE and LOCAL_RANK before the loop starts,
so ``train`` finds the group initialized and neither creates nor destroys one. Rank 0's history
comes back to the driver.

Ray Train's own checkpoints and storage are not used: the loop checkpoints to ``cfg.out`` and
every rank reads that checkpoint when it resumes. A run whose workers span several nodes needs
``--out`` on ``s3://`` or on a filesystem that every node mounts at the same path.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from pipelines.student.train import TrainConfig, train


class WorkerFailed(RuntimeError):
    """A worker stopped with an error that is not a configuration error; the message is one line."""


@dataclass(frozen=True)
class RayScaling:
    """How the job is placed; None means: decided from the cluster when the job starts."""

    ray_address: str | None = None        # else RAY_ADDRESS (set inside a Ray job), else a local Ray
    workers: int | None = None            # default: the cluster's GPUs, else 2
    gpus_per_worker: int | None = None    # default: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float | None = None  # default: the CPUs that go with each GPU, else a share of a node


@dataclass(frozen=True)
class Layout:
    workers: int
    gpus: int
    cpus: float


def layout(scaling: RayScaling, nodes: list[dict]) -> Layout:
    """The workers and each one's resources, from ``nodes`` (the ``Resources`` of the cluster's
    alive nodes). A layout the cluster cannot place is refused now (ValueError) rather than left
    waiting for resources that will never come."""
    total_gpus = int(sum(n.get("GPU", 0) for n in nodes))
    gpus = scaling.gpus_per_worker if scaling.gpus_per_worker is not None else int(total_gpus > 0)
    if gpus not in (0, 1):
        raise ValueError(f"--gpus-per-worker must be 0 or 1, got {gpus}: each worker trains on one device; "
                         "more GPUs means more workers (--ray-workers)")
    if gpus and not total_gpus:
        raise ValueError("--gpus-per-worker 1, but the Ray cluster has no GPU")
    workers = scaling.workers if scaling.workers is not None else (total_gpus if gpus else 2)
    if workers < 1:
        raise ValueError(f"--ray-workers must be at least 1, got {workers}")
    if gpus and workers > total_gpus:
        raise ValueError(f"{workers} workers with a GPU each, but the Ray cluster has {total_gpus} GPU(s)")
    cpus = scaling.cpus_per_worker
    if cpus is None:
        if gpus:    # as many CPUs as the node has per GPU: data loading runs beside the step
            cpus = min(int(n.get("CPU", 0)) // int(n["GPU"]) for n in nodes if n.get("GPU", 0) >= 1)
        else:
            cpus = max(int(n.get("CPU", 0)) for n in nodes) // workers
        cpus = max(1, cpus)
    if cpus <= 0:
        raise ValueError(f"--cpus-per-worker must be positive, got {cpus}")
    if _places(nodes, gpus, cpus) < workers:
        raise ValueError(f"the Ray cluster cannot place {workers} workers of {cpus:g} CPU(s)"
                         + (" and 1 GPU" if gpus else "") + " each; lower --ray-workers or --cpus-per-worker")
    return Layout(workers, gpus, float(cpus))


def _places(nodes: list[dict], gpus: int, cpus: float) -> int:
    """How many workers of this size fit on the nodes."""
    fits = 0
    for n in nodes:
        per = int(n.get("CPU", 0) // cpus)
        fits += min(per, int(n.get("GPU", 0))) if gpus else per
    return fits


def train_on_ray(cfg: TrainConfig, scaling: RayScaling) -> list[dict]:
    """Run (or resume) ``train(cfg)`` on Ray Train workers; returns rank 0's history. A
    configuration error in a worker is raised as ValueError, any other failure as WorkerFailed."""
    import ray

    started = _attach(scaling.ray_address)
    storage = tempfile.mkdtemp(prefix="depth-engine-ray-train-")   # Ray Train wants one; nothing is kept there
    try:
        import ray.train
        from ray.train.torch import TorchTrainer

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        lay = layout(scaling, nodes)
        resources = {"CPU": lay.cpus, **({"GPU": lay.gpus} if lay.gpus else {})}
        trainer = TorchTrainer(
            _per_worker, train_loop_config={"cfg": cfg, "cwd": os.getcwd()},
            scaling_config=ray.train.ScalingConfig(num_workers=lay.workers, use_gpu=bool(lay.gpus),
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(storage_path=storage, name="train-student"))
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise _one_line(e) from None
        return result.return_value or []
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if started:
            ray.shutdown()


def _attach(address: str | None) -> bool:
    """Attach to ``address``, else RAY_ADDRESS, else start a local Ray (as ``label`` does); True
    when this call started it. A Ray already initialized in this process is used as it is."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return False
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False,
             num_cpus=os.cpu_count())
    return True


def _per_worker(config: dict) -> list[dict]:
    """One Ray Train worker: the driver's working directory (relative paths in ``cfg`` mean what
    they meant there; Ray Train moves workers into its own run directory), this worker's GPU as
    the one ``train`` picks, then the loop."""
    if os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])
    _pin_device()
    return train(config["cfg"])


def _pin_device() -> None:
    """``train`` takes ``cuda:LOCAL_RANK`` (torchrun's rule). Ray shows each worker all GPUs that
    the node's workers hold and says which one is this worker's; its index in that list is not
    always the local rank (Ray lists GPU ids sorted as text, '10' before '2', but ranks them by
    number). LOCAL_RANK is set to that index, so DDP runs on the GPU Ray reserved."""
    from ray.train.torch import get_device

    device = get_device()
    if device.type == "cuda":
        os.environ["LOCAL_RANK"] = str(device.index)


def _one_line(error: Exception) -> Exception:
    """The failing workers' cause as one line: ValueError for a configuration error (preferred
    when several ranks failed: the others often fail only because a peer left), else WorkerFailed
    with the lowest failing rank's error (or Ray Train's own, when no worker failed)."""
    failures = getattr(error, "worker_failures", None) or {None: getattr(error, "controller_failure", error)}
    # Ray Train wraps a worker's exception with its traceback; the original is kept in _base_exc.
    causes = [(rank, getattr(exc, "_base_exc", exc)) for rank, exc in
              sorted(failures.items(), key=lambda item: -1 if item[0] is None else item[0])]
    config = [(rank, c) for rank, c in causes if isinstance(c, ValueError)]
    rank, cause = (config or causes)[0]
    text = (str(cause).strip().splitlines() or [""])[0]
    if config:
        return ValueError(text)
    who = "Ray Train" if rank is None else f"rank {rank}"
    return WorkerFailed(f"{who} failed: {type(cause).__name__}: {text}")
