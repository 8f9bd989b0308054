"""neurokern: fast, exact merging of fine-tuned models on fused GPU/CPU kernels.

    import neurokern as nk
    merged = nk.merge(base, [ft_a, ft_b], method="ties", density=0.2)
    model = nk.tint.TintedModel(net, base, [ft_a, ft_b], tint_layers=["classifier"])
"""
import importlib

from neurokern.errors import NeurokernError

__version__ = "0.1.0"

__all__ = ["METHODS", "NeurokernError", "merge", "merge_models", "ops", "tint", "__version__"]

# name -> module holding it; imported when first used, so that `neurokern merge` can start reading
# its inputs before torch and the kernels are imported
_LAZY = {"METHODS": "neurokern.methods", "merge": "neurokern.merging", "merge_models": "neurokern.engine",
         "ops": "neurokern.ops", "tint": "neurokern.tint"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
