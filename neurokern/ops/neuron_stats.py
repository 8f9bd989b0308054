"""Per-neuron projection statistics (NeuroMerging's streaming reduction)."""
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
