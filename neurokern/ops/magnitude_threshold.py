"""Exact magnitude threshold of task vectors (radix select, no sort)."""
from typing import Optional, Sequence

import torch
from torch import Tensor

from neurokern.ops._common import contiguous


def magnitude_threshold(
    base: Sequence[Tensor],
    finetuned: Sequence[Tensor],
    k: Sequence[int],
    keep_ties: bool = True,
    per_tensor: bool = False,
    nonfinite: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Threshold and tie limit that keep the k[t] largest |finetuned - base| entries of each task.

    `finetuned` is task-major (finetuned[t * n + i] belongs to base[i]). Over the whole list
    (global scope) the outputs are [T]; with per_tensor=True, k has n*T entries (k[i*T + t]) and
    the outputs are [n, T]. keep_ties=True keeps every entry equal to the threshold; False keeps
    exactly k, ties broken by lowest flat position. Feed the pair to the other ops as their trim.
    nonfinite (int32 [n] on the inputs' device), when given, is set to 1 where some task vector
    entry of tensor i is NaN or Inf, 0 elsewhere: on a GPU the select's pass over all entries
    checks them, with no read of its own.
    """
    return torch.ops.neurokern.magnitude_threshold.default(
        contiguous(base), contiguous(finetuned), list(k), keep_ties, per_tensor, nonfinite
    )


@torch.library.register_fake("neurokern::magnitude_threshold")
def _(base, finetuned, k, keep_ties=True, per_tensor=False, nonfinite=None):
    n = len(base)
    T = len(finetuned) // n
    shape = (n, T) if per_tensor else (T,)
    return base[0].new_empty(shape, dtype=torch.float32), base[0].new_empty(shape, dtype=torch.int64)
