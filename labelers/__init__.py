"""The models behind a label: depth teacher, sky segmenter, and the SPEC §5 normalization.

Nothing here knows about shards, stores or executors; the pipelines hand in decoded RGB arrays
and get arrays back. The package imports nothing itself (import its modules): a light command
that reads one constant of a submodule never pays for torch.
"""
