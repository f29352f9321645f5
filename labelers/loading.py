"""Loading a model and its processor from a save_pretrained folder or a hub id.

Weights load from safetensors only (SPEC §1): a pickle checkpoint can run code when unpickled,
and labeling jobs load models named on a command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class NoSafetensorsError(ValueError):
    """The model has no safetensors weights, and the engine loads no other format."""


def _refuse(source: str) -> NoSafetensorsError:
    return NoSafetensorsError(
        f"model {source!r} has no safetensors weights (model.safetensors); the engine loads "
        "weights from safetensors only — convert the checkpoint with save_pretrained first"
    )


def load_image_processor(source: str, *, revision: str | None = None, family: str | None = None):
    """The model's image processor; for Depth Pro (``family``, its config.model_type) its saved
    settings (DepthProSettings) instead: DepthProImageProcessor needs torchvision, which the engine
    does without, and the engine runs the processor's steps itself anyway."""
    from transformers import AutoImageProcessor
    from transformers.image_processing_base import ImageProcessingMixin

    from labelers.preprocess import DepthProSettings

    if family == "depth_pro":
        saved, _ = ImageProcessingMixin.get_image_processor_dict(source, revision=revision)
        return DepthProSettings.from_dict(saved)
    return AutoImageProcessor.from_pretrained(source, revision=revision, trust_remote_code=False)


def load_pretrained(auto_model, source: str, *, revision: str | None, device: torch.device):
    """(fp32 model in eval mode on device, image processor) for a local folder or a hub id."""
    path = Path(source)
    # What from_pretrained(use_safetensors=True) looks for; any other *.safetensors is not loaded.
    if path.is_dir() and not any((path / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        raise _refuse(source)
    try:
        model = auto_model.from_pretrained(source, revision=revision, use_safetensors=True, trust_remote_code=False)
    except OSError as err:  # a hub repo without safetensors; other errors pass through
        message = str(err)
        if "safetensors" in message and ("does not appear to have" in message or "no file named" in message):
            raise _refuse(source) from err
        raise
    except RuntimeError as err:   # transformers points at a report it logged, which a worker's one line loses
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise ValueError(_mismatch(auto_model, source, revision)) from None
    processor = load_image_processor(source, revision=revision, family=model.config.model_type)
    # fp32 weights whatever the checkpoint's dtype: half precision comes from autocast on CUDA.
    return model.float().eval().to(device), processor


def _mismatch(auto_model, source: str, revision: str | None) -> str:
    """The shapes a config asks for that its weights do not have, in one line: the report
    transformers logs instead of raising. Loaded again, mismatches allowed, for their list."""
    _, info = auto_model.from_pretrained(source, revision=revision, use_safetensors=True, trust_remote_code=False,
                                         ignore_mismatched_sizes=True, output_loading_info=True)
    found = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])   # a set in transformers 5
    first = ", ".join(f"{key}: weights {list(a)}, config {list(b)}" for key, a, b in found[:2])
    return (f"model {source}: its config does not match its weights ({len(found)} tensors differ in shape, "
            f"e.g. {first}); the config.json beside these weights is not theirs")
