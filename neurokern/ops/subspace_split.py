"""Split each neuron's task vectors into the parallel coefficient and the orthogonal residual."""
from typing import Optional, Sequence

import torch
from torch import Tensor

from neurokern.ops._common import contiguous, trim_args


def subspace_split(
    base: Tensor,
    finetuned: Sequence[Tensor],
    trim: Optional[tuple[Tensor, Tensor]] = None,
    offset: int = 0,
) -> tuple[Tensor, list[Tensor]]:
    """c [R, T] (float32) with c[k, t] = <tau_t, w_k> / |w_k|^2 (0 where w_k = 0), and the T
    orthogonal residuals tau_t - c_t w (float32, base's shape)."""
    threshold, tie_limit = trim_args(trim)
    return torch.ops.neurokern.subspace_split.default(
        base.contiguous(), contiguous(finetuned), threshold, tie_limit, offset
    )


@torch.library.register_fake("neurokern::subspace_split")
def _(base, finetuned, threshold=None, tie_limit=None, offset=0):
    torch._check(base.dim() == 2, lambda: "subspace_split: base must be 2-D")
    T = len(finetuned)
    coeff = base.new_empty((base.shape[0], T), dtype=torch.float32)
    return coeff, [base.new_empty(base.shape, dtype=torch.float32) for _ in range(T)]
