"""neurokern: fast, exact merging of fine-tuned models on fused GPU/CPU kernels.

    import neurokern as nk
    merged = nk.merge(base, [ft_a, ft_b], method="ties", density=0.2)
    model = nk.tint.TintedModel(net, base, [ft_a, ft_b], tint_layers=["classifier"])
"""
from neurokern import ops, tint
from neurokern.errors import NeurokernError
from neurokern.merge import merge
from neurokern.methods import METHODS


def merge_models(config, out_dir, **options):
    """Whole models on disk, streamed: see neurokern.engine.merge_models."""
    from neurokern.engine import merge_models as run

    return run(config, out_dir, **options)


__version__ = "0.1.0"

__all__ = ["METHODS", "NeurokernError", "merge", "merge_models", "ops", "tint", "__version__"]
