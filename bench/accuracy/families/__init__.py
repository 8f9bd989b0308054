"""Model families of the accuracy suite: each a module with a pre-trained model and tasks that
installable packages ship.

A family module defines NAME, DESCRIPTION, RECIPE (the fine-tuning defaults), DEFAULT_CACHE, and:

    prepare(cache_dir)            build the cache from the installed packages (a CPU machine)
    load_tasks(cache_dir, names)  -> [Task]: inputs x[split] as one tensor [N, ...], labels y[split]
    load_encoder(cache_dir)       -> the pre-trained encoder: forward(x [B, ...]) -> [B, hidden_size]
    tint_layers(encoder)          -> {ablation name: module name in head(encoder(x))}: single layers
                                     tinted in the ablation ("head" among them)
"""
import importlib
import json
from pathlib import Path
from typing import Optional, Sequence

FAMILIES = {
    "minilm": "bench.accuracy.families.minilm",
    "mobilenetv2": "bench.accuracy.families.mobilenetv2",
}


def load(name: str):
    if name not in FAMILIES:
        raise SystemExit(f"unknown model family {name!r}; choose from {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def task_sources(cache_dir, names: Optional[Sequence[str]] = None) -> tuple[dict, list[str]]:
    """A family cache's data/sources.json (per task: package, version, licence, sizes, baselines)
    and the task names asked for (all by default), each checked to be in the cache."""
    data_dir = Path(cache_dir) / "data"
    sources = json.loads((data_dir / "sources.json").read_text(encoding="utf-8"))["tasks"]
    names = list(names or sources)
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; the cache at {data_dir} has {list(sources)}")
    return sources, names
