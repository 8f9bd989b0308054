"""Triton kernels, registered for the CUDA dispatch key of the torch.ops.neurokern ops.

Each module holds the kernels of one op (or a family of ops) and launch functions that take the
op's arguments. The launchers run wherever Triton runs: on CUDA tensors, and on CPU tensors
under TRITON_INTERPRET=1, which is how the CPU test suite checks them against the reference.
Importing this package registers them for CUDA tensors; without triton nothing is registered.
"""
import importlib.util

AVAILABLE = importlib.util.find_spec("triton") is not None

if AVAILABLE:
    from neurokern.ops.triton import (elementwise, finite, key_histogram, multi, neuron_stats,  # noqa: F401
                                      subspace_split, tinted_linear)
