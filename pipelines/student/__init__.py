"""Student training (PAPER.md, step 4): its objectives and the strong perturbations of its input.

Kept apart from the engine: it needs only torch, so a training job imports it without Ray or the
object stores.
"""
from pipelines.student.losses import (
                                      affine_invariant_loss,
                                      cutmix_loss,
                                      feature_alignment_loss,
                                      scale_shift_normalize,
)
from pipelines.student.perturb import CutMix, CutMixResult, StrongAugment

__all__ = ["CutMix", "CutMixResult", "StrongAugment", "affine_invariant_loss", "cutmix_loss",
           "feature_alignment_loss", "scale_shift_normalize"]
