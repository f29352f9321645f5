"""The depth teacher: its raw output (relative disparity, metric depth, or Depth Pro's metric
inverse depth and field of view) for a batch of images (SPEC §5.1-5.2)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from functools import partial
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from labelers.device_label import quantize_on_device
from labelers.model import InferenceModel, load_for_inference
from labelers.normalize import DISPARITY
from labelers.prediction import NoLabel, Prediction, non_finite
from labelers.preprocess import ImagePreprocess, family_of_processor, float_resize

# How each family's post_process_depth_estimation brings the output back to the image size.
# Depth Anything keeps the official code's bilinear resize (SPEC §5.4), not its processor's bicubic.
# Depth Pro's resizes with its processor's resample (depth_pro_inverse_depth).
UPSAMPLE = {"depth_anything": "bilinear", "dpt": "bicubic", "glpn": "bicubic", "zoedepth": "bicubic"}
# Depth Pro's post-processing clamps its inverse depth here (1/m with a field of view): 0.1 mm to 10 km.
INVERSE_DEPTH_RANGE = (1e-4, 1e4)


def depth_pro_inverse_depth(
    depth: torch.Tensor, height: int, width: int, fov_deg: torch.Tensor | None, resample: str
) -> torch.Tensor:
    """DepthProImageProcessor.post_process_depth_estimation short of its last step (depth = 1 /
    this): the canonical inverse depth times W / focal, the focal length in pixels its field of
    view gives at the image's width, makes it 1/m; then the resize, and the clamp. Without a field
    of view it stays canonical: relative, not metric."""
    if fov_deg is not None:
        focal = 0.5 * width / torch.tan(0.5 * torch.deg2rad(fov_deg))
        depth = depth * width / focal
    full = float_resize(depth[None, None], (height, width), resample)[0, 0]
    return full.clamp(*INVERSE_DEPTH_RANGE)


def label_resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """A float NCHW map resized to ``size`` in ``mode``, antialiased where a side shrinks (a map
    shrunk without it keeps every k-th pixel's value and aliases fine structure)."""
    shrinks = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False, antialias=shrinks)


@dataclass(frozen=True, slots=True)
class TeacherPreprocess(ImagePreprocess):
    """The teacher's processor settings and its family (config.model_type): Depth Anything
    follows the official lower-bound rule, the other families their own processors."""

    family: str = "depth_anything"

    @classmethod
    def from_processor(cls, processor, family: str | None = None) -> "TeacherPreprocess":
        family = family or family_of_processor(processor) or "depth_anything"
        spec = ImagePreprocess.from_processor.__func__(cls, processor, family)
        return dataclasses.replace(spec, family=family)

    def restore(
        self, depth: torch.Tensor, height: int, width: int, fov_deg: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """One output map (h x w) back at the image's size, as the family's post-processing does:
        ZoeDepth resizes to the padded image and cuts the padding off; Depth Pro scales by its
        field of view (``fov_deg``, degrees, float32), resizes and clamps; the others just resize.

        ``size``: the label's size (storage.label_format.label_size) instead of the image's. One
        resize straight to it (antialiased where it shrinks the map), the family's mode: Depth
        Pro's metric inverse depth does not depend on the width it is resized to (W / focal is
        2 tan(fov / 2)), so it is made on the model's own grid and resized once. ZoeDepth's padding
        is cut at the image's size, then resized."""
        size = (height, width) if size is None else tuple(size)
        if self.family == "depth_pro":
            if size == (height, width):
                return depth_pro_inverse_depth(depth, height, width, fov_deg, self.resample)
            own = depth_pro_inverse_depth(depth, *depth.shape[-2:], fov_deg, self.resample)   # 1/m, its own grid
            mode = self.resample if self.resample in ("bilinear", "bicubic") else "bilinear"
            return label_resize(own[None, None], size, mode)[0, 0].clamp(*INVERSE_DEPTH_RANGE)
        pad_h, pad_w = self.padding(height, width)
        if pad_h or pad_w or size == (height, width):
            full = F.interpolate(
                depth[None, None], size=(height + 2 * pad_h, width + 2 * pad_w), mode=UPSAMPLE[self.family],
                align_corners=False,
            )[:, :, pad_h : pad_h + height, pad_w : pad_w + width]
            return full[0, 0] if size == (height, width) else label_resize(full, size, UPSAMPLE[self.family])[0, 0]
        return label_resize(depth[None, None], size, UPSAMPLE[self.family])[0, 0]


@dataclass(frozen=True, slots=True, eq=False)
class Teacher(InferenceModel):
    """A depth model ready to label (``preprocess``: its TeacherPreprocess); ``output`` says what
    its raw maps hold: normalize.TEACHER_OUTPUTS (to_disparity)."""

    output: str = DISPARITY

    @classmethod
    def load(
        cls,
        source: str,
        *,
        device: str | torch.device = "cpu",
        dtype: str = "auto",
        revision: str | None = None,
        name: str | None = None,
        output: str = DISPARITY,
    ) -> "Teacher":
        """Load from a save_pretrained folder or a hub id (the HF cache serves it offline)."""
        loaded = load_for_inference("AutoModelForDepthEstimation", source, device=device, dtype=dtype,
                                    revision=revision)
        preprocess = TeacherPreprocess.from_processor(loaded.processor, family=loaded.model.config.model_type)
        return cls(name or str(source), preprocess, loaded.device, loaded.dtype, loaded.model, output=output)

    def predict(self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]] | None = None,
                skies: Sequence[np.ndarray | None] | None = None, levels: int | None = None) -> list[Prediction | NoLabel]:
        """The model's own output (raw float32 HxW, each image's own size, or its ``sizes`` entry:
        the label's; ``output`` says which kind) for uint8 HxWx3 RGB images, with the field of
        view where the model predicts one (Depth Pro with its fov model). Batches as
        InferenceModel.run: ZoeDepth's reflect padding is the image's own, nothing else is padded.

        With ``skies`` (each image's sky mask at its label size, or None without a sky model) the
        label is made on the model's device (labelers.device_label), quantized to ``levels``, and
        only it comes back. An image whose output holds NaN or inf gets a NoLabel with the reason."""
        if skies is not None and not levels:
            raise ValueError("a label made on the device needs the label format's levels")
        return self.run(images, partial(self._restore, levels=levels), sizes, skies)

    def _restore(self, outputs, batch: list, sizes: list, skies: list | None = None, *,
                 levels: int | None = None) -> Iterator[Prediction]:
        depth = outputs.predicted_depth.float()
        fov = getattr(outputs, "field_of_view", None)  # degrees per image, or None
        fov = None if fov is None else fov.float()  # the focal length in float32, not half
        # Checked at the model's resolution, on its device, one sync per batch: a NaN or inf here
        # would be left out of the label like sky, and an all-NaN map stored as an "ok" zero label.
        bad = (~torch.isfinite(depth)).flatten(1).sum(1)
        if fov is not None:
            bad = bad + (~torch.isfinite(fov.reshape(len(batch), -1))).sum(1)
        bad = bad.tolist()
        for row, (image, size) in enumerate(zip(batch, sizes)):
            if bad[row]:
                yield non_finite("teacher", int(bad[row]), depth[row].numel())
                continue
            height, width = image.shape[:2]
            fov_deg = None if fov is None else fov[row]
            full = self.preprocess.restore(depth[row], height, width, fov_deg, size)
            fov_value = None if fov_deg is None else float(fov_deg)
            if skies is not None:
                sky = skies[row]
                sky = None if sky is None else torch.from_numpy(np.asarray(sky, dtype=bool)).to(full.device)
                yield Prediction(None, fov_deg=fov_value, label=quantize_on_device(full, self.output, sky, levels=levels))
                continue
            yield Prediction(
                full.cpu().numpy().astype(np.float32, copy=False),
                fov_deg=None if fov_deg is None else float(fov_deg),
            )
