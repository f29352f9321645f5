"""The models behind a label: depth teacher, sky segmenter, and the SPEC §5 normalization.

Nothing here knows about shards, stores or executors; the pipelines hand in decoded RGB arrays
and get arrays back.
"""

from labelers.devices import autocast, resolve_device, resolve_dtype
from labelers.geometry import constrain_to_multiple, teacher_input_size
from labelers.loading import NoSafetensorsError
from labelers.normalize import NormalizedDisparity, normalize_disparity
from labelers.preprocess import ImagePreprocess
from labelers.sky import NoSkyClassError, SkySegmenter
from labelers.teacher import Teacher, TeacherPreprocess

__all__ = [
    "ImagePreprocess",
    "NoSafetensorsError",
    "NoSkyClassError",
    "NormalizedDisparity",
    "SkySegmenter",
    "Teacher",
    "TeacherPreprocess",
    "autocast",
    "constrain_to_multiple",
    "normalize_disparity",
    "resolve_device",
    "resolve_dtype",
    "teacher_input_size",
]
