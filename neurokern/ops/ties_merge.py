"""TIES merging, fused: trim, weight, sign election, disjoint mean."""
from typing import Optional, Sequence

import torch
from torch import Tensor

from neurokern.ops._common import contiguous, trim_args


def ties_merge(
    base: Tensor,
    finetuned: Sequence[Tensor],
    weights: Sequence[float],
    trim: Optional[tuple[Tensor, Tensor]] = None,
    offset: int = 0,
    consensus: str = "sum",
    normalize: str = "weights",
    elect_weighted: bool = True,
    zero_sign: str = "positive",
    scale: float = 1.0,
) -> Tensor:
    """base + scale * disjoint merge of d_t = weights[t] * trim(tau_t), in base's dtype.

    consensus "sum" elects sign(sum of votes), "count" sign(sum of their signs); votes are d_t
    (elect_weighted) or trim(tau_t). A zero vote elects + ("positive", mergekit) or the tensor's
    majority sign ("majority", the TIES / NeuroMerging reference). The agreeing d_t are summed and
    divided by their summed weights ("weights"), their count ("count") or 1 ("none")."""
    threshold, tie_limit = trim_args(trim)
    return torch.ops.neurokern.ties_merge.default(
        base.contiguous(), contiguous(finetuned), [float(w) for w in weights], threshold, tie_limit,
        offset, consensus, normalize, elect_weighted, zero_sign, float(scale),
    )


@torch.library.register_fake("neurokern::ties_merge")
def _(base, finetuned, weights, threshold=None, tie_limit=None, offset=0, consensus="sum",
      normalize="weights", elect_weighted=True, zero_sign="positive", scale=1.0):
    return torch.empty_like(base)


def ties_merge_multi(
    base: Sequence[Tensor],
    finetuned: Sequence[Tensor],
    weights: Sequence[float],
    trim: Optional[tuple[Tensor, Tensor]] = None,
    offsets: Optional[Sequence[int]] = None,
    consensus: str = "sum",
    normalize: str = "weights",
    elect_weighted: bool = True,
    zero_sign: str = "positive",
    scale: float = 1.0,
    nonfinite: Optional[Tensor] = None,
) -> list[Tensor]:
    """ties_merge of every tensor of a list in one call (one launch per storage dtype on a GPU, and
    for zero_sign="majority" a pre-pass launch and a segmented sum giving each tensor its own
    majority sign); finetuned is task-major (finetuned[t * n + i] belongs to base[i]). trim: [T]
    pairs (one scope, tensor i's positions start at offsets[i]) or [n, T] pairs (row i trims
    tensor i). nonfinite (contiguous int32 [n] on the inputs' device), when given, is set to 1
    where out[i], as stored in base[i]'s dtype, holds a NaN or Inf and 0 elsewhere, in the merge's
    own pass: no read of the outputs (on a GPU for T > 8, where each tensor merges alone, one).
    Such a call does not trace under torch.compile (its op mutates the flags and returns a list)."""
    threshold, tie_limit = trim_args(trim)
    args = (contiguous(base), contiguous(finetuned), [float(w) for w in weights], threshold, tie_limit,
            list(offsets or []), consensus, normalize, elect_weighted, zero_sign, float(scale))
    if nonfinite is None:
        return torch.ops.neurokern.ties_merge_multi.default(*args)
    return torch.ops.neurokern._ties_merge_multi_flagged.default(*args, nonfinite)


@torch.library.register_fake("neurokern::ties_merge_multi")
def _(base, finetuned, weights, threshold=None, tie_limit=None, offsets=(), consensus="sum",
      normalize="weights", elect_weighted=True, zero_sign="positive", scale=1.0):
    return [torch.empty_like(b) for b in base]


@torch.library.register_fake("neurokern::_ties_merge_multi_flagged")
def _(base, finetuned, weights, threshold=None, tie_limit=None, offsets=(), consensus="sum",
      normalize="weights", elect_weighted=True, zero_sign="positive", scale=1.0, nonfinite=None):
    return [torch.empty_like(b) for b in base]
