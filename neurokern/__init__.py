"""neurokern: fast, exact merging of fine-tuned models on fused GPU/CPU kernels.

    import neurokern as nk
    merged = nk.merge(base, [ft_a, ft_b], method="ties", density=0.2)
"""
from neurokern import ops
from neurokern.errors import NeurokernError
from neurokern.merge import merge
from neurokern.methods import METHODS

__version__ = "0.1.0"

__all__ = ["METHODS", "NeurokernError", "merge", "ops", "__version__"]
