"""L1 norms of task vectors before and after trimming."""
from typing import Optional, Sequence

import torch
from torch import Tensor

from neurokern.ops._common import contiguous, trim_args


def trim_l1(
    base: Sequence[Tensor],
    finetuned: Sequence[Tensor],
    trim: Optional[tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """float64 [T, 2]: per task, sum |tau_t| and sum |trim(tau_t)| over all tensors of the list.

    `trim` is (threshold, tie_limit) of shape [T] (one scope over the list) or [n, T] (per tensor).
    """
    threshold, tie_limit = trim_args(trim)
    return torch.ops.neurokern.trim_l1.default(contiguous(base), contiguous(finetuned), threshold, tie_limit)


@torch.library.register_fake("neurokern::trim_l1")
def _(base, finetuned, threshold=None, tie_limit=None):
    return base[0].new_empty((len(finetuned) // len(base), 2), dtype=torch.float64)
