"""Per-neuron projection statistics (NeuroMerging's streaming reduction), of one 2-D tensor or of a
list of them at once."""
from typing import Optional, Sequence

import torch
from torch import Tensor

from neurokern.ops._common import contiguous, trim_args


def neuron_stats(
    base: Tensor,
    finetuned: Sequence[Tensor],
    trim: Optional[tuple[Tensor, Tensor]] = None,
    offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """For each row w of a 2-D `base`: Gram [R, T, T] of the trimmed task vectors, their dots with
    w [R, T] and |w|^2 [R], all float64. `offset` is the tensor's flat position in the trim scope."""
    threshold, tie_limit = trim_args(trim)
    return torch.ops.neurokern.neuron_stats.default(
        base.contiguous(), contiguous(finetuned), threshold, tie_limit, offset
    )


@torch.library.register_fake("neurokern::neuron_stats")
def _(base, finetuned, threshold=None, tie_limit=None, offset=0):
    torch._check(base.dim() == 2, lambda: "neuron_stats: base must be 2-D")
    R, T = base.shape[0], len(finetuned)
    f64 = torch.float64
    return base.new_empty((R, T, T), dtype=f64), base.new_empty((R, T), dtype=f64), base.new_empty((R,), dtype=f64)


def neuron_stats_multi(
    base: Sequence[Tensor],
    finetuned: Sequence[Tensor],
    trim: Optional[tuple[Tensor, Tensor]] = None,
    offsets: Optional[Sequence[int]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """neuron_stats of every 2-D tensor of a list in one call (one launch per storage dtype on a GPU),
    the rows of all tensors concatenated in list order: Gram [sum R, T, T], dots [sum R, T] and
    |w|^2 [sum R], float64, equal to torch.cat of the per-tensor results. finetuned is task-major
    (finetuned[t * n + i] belongs to base[i]). trim: [T] pairs (one scope, tensor i's positions
    start at offsets[i]) or [n, T] pairs (row i trims tensor i)."""
    threshold, tie_limit = trim_args(trim)
    return torch.ops.neurokern.neuron_stats_multi.default(
        contiguous(base), contiguous(finetuned), threshold, tie_limit, list(offsets or [])
    )


@torch.library.register_fake("neurokern::neuron_stats_multi")
def _(base, finetuned, threshold=None, tie_limit=None, offsets=()):
    for i, b in enumerate(base):
        torch._check(b.dim() == 2, lambda: f"neuron_stats_multi: base[{i}] must be 2-D")
    R, T = sum(b.shape[0] for b in base), len(finetuned) // len(base)
    f64, like = torch.float64, base[0]
    return like.new_empty((R, T, T), dtype=f64), like.new_empty((R, T), dtype=f64), like.new_empty((R,), dtype=f64)
