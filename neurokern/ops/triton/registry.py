"""Registers the Triton launchers for the CUDA key (one line per op; weighted_sum_multi's CUDA kernel
is C++, csrc/list_launch.cpp, which calls weighted_sum._ws_multi_launch)."""
import torch

_REGISTERED: dict[str, object] = {}


def register(op: str, launcher) -> None:
    """torch.ops.neurokern.<op> on CUDA tensors runs `launcher` (same arguments as the op).

    torch.library.impl, not register_kernel: the latter wraps the launcher in a dynamo-disable
    guard that imports torch._dynamo at the first call (seconds, in the middle of a merge) and costs
    every call a few microseconds. torch.compile does not need it: the compiled graph calls the op
    with dynamo off (tests/gpu/test_cuda_compile.py)."""
    torch.library.impl(f"neurokern::{op}", "CUDA", launcher)
    _REGISTERED[op] = launcher
