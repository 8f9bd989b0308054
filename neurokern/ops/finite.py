"""Which tensors of a list hold a NaN or Inf (the finite checks of nk.merge and the streaming
engine: neurokern.models.nonfinite_later).

The schema is in csrc/ops.cpp. The CPU kernel below serves every device without a kernel of its
own: the float32 L1 norms (torch's multi-tensor norm: one read, no temporaries), a non-finite norm
confirmed element-wise (a sum of large finite values can overflow). On CUDA the Triton launcher of
neurokern/ops/triton/finite.py takes its place: one read of every tensor at copy bandwidth, flags
set in the pass, no host sync.
"""
from typing import Sequence

import torch
from torch import Tensor


def nonfinite_flags(tensors: Sequence[Tensor]) -> Tensor:
    """int32 [len(tensors)] on the tensors' device (one device): 1 where the tensor holds a NaN or
    Inf, 0 elsewhere."""
    if not tensors:
        return torch.zeros(0, dtype=torch.int32)
    return torch.ops.neurokern.nonfinite_flags.default(list(tensors))


@torch.library.impl("neurokern::nonfinite_flags", "CompositeExplicitAutograd")
def _nonfinite_flags_torch(tensors):
    flags = torch.zeros(len(tensors), dtype=torch.int32, device=tensors[0].device)
    sums = torch.stack(torch._foreach_norm(list(tensors), 1, dtype=torch.float32))
    for i in torch.nonzero(~torch.isfinite(sums)).flatten().tolist():
        flags[i] = int(not bool(torch.isfinite(tensors[i]).all()))
    return flags


@torch.library.register_fake("neurokern::nonfinite_flags")
def _(tensors):
    return tensors[0].new_empty((len(tensors),), dtype=torch.int32)
