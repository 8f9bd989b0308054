"""Triton kernels, registered for the CUDA dispatch key of the torch.ops.neurokern ops.

Each op has one module holding its kernels and launchers: the single-tensor form, the list form
and the backward (weighted_sum.py, ties_merge.py, dare.py, trim_l1.py, neuron_stats.py,
subspace_split.py, tinted_linear.py, key_histogram.py, finite.py); the @triton.jit helpers and
argument checks they share are defined once, in common.py, and the launch tables of the list forms
in lists.py. The launchers run wherever Triton runs: on CUDA tensors, and on CPU tensors
under TRITON_INTERPRET=1, which is how the CPU test suite checks them against the reference.
Importing this package registers them for CUDA tensors; without triton nothing is registered.
"""
import importlib.util

AVAILABLE = importlib.util.find_spec("triton") is not None

if AVAILABLE:
    from neurokern.ops.triton import (dare, finite, key_histogram, neuron_stats, subspace_split,  # noqa: F401
                                      ties_merge, tinted_linear, trim_l1, weighted_sum)
