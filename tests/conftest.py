import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; it must be chosen
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """On a GPU machine Triton compiles for the GPU, so the interpreter tests (CPU tensors) of
    tests/ops/triton skip; their CUDA tests cover the kernels there."""
    if not torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="Triton interpreter test; the cuda tests cover the GPU")
    for item in items:
        if "ops/triton" in str(item.path) and "cuda" not in item.name:
            item.add_marker(skip)
