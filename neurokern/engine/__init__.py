"""Whole-model merges streamed from disk to disk: sources (lazy safetensors reading), plan (shards,
work units, memory estimate), thresholds (exact global trims in streaming passes), executor (the
read -> H2D -> kernels -> D2H -> write pipeline), writer (partial output, resume, atomic publish),
distributed (torchrun ranks)."""
from neurokern.engine.run import Result, merge_models

__all__ = ["Result", "merge_models"]
