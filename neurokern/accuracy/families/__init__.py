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

FAMILIES = {
    "minilm": "neurokern.accuracy.families.minilm",
    "mobilenetv2": "neurokern.accuracy.families.mobilenetv2",
}


def load(name: str):
    if name not in FAMILIES:
        raise SystemExit(f"unknown model family {name!r}; choose from {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
