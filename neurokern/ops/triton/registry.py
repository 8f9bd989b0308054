"""Registers every Triton launcher for the CUDA key (one line per op)."""
import torch

_REGISTERED: dict[str, object] = {}


def register(op: str, launcher) -> None:
    """torch.ops.neurokern.<op> on CUDA tensors runs `launcher` (same arguments as the op)."""
    torch.library.register_kernel(f"neurokern::{op}", "cuda", launcher)
    _REGISTERED[op] = launcher
