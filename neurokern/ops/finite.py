"""Which tensors of a list hold a NaN or Inf (the finite checks of nk.merge, the streaming engine
and Tinting), read without a host sync where it can (nonfinite_later, flagged_later).

The schema is in csrc/ops.cpp. The CPU kernel below serves every device without a kernel of its
own: the float32 L1 norms (torch's multi-tensor norm: one read, no temporaries), a non-finite norm
confirmed element-wise (a sum of large finite values can overflow). On CUDA the Triton launcher of
neurokern/ops/triton/finite.py takes its place: one read of every tensor at copy bandwidth, flags
set in the pass, no host sync.
"""
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


def nonfinite_flags(tensors: Sequence[Tensor]) -> Tensor:
    """int32 [len(tensors)] on the tensors' device (one device): 1 where the tensor holds a NaN or
    Inf, 0 elsewhere."""
    if not tensors:
        return torch.zeros(0, dtype=torch.int32)
    return torch.ops.neurokern.nonfinite_flags.default(list(tensors))


def nonfinite_later(tensors: Sequence[Tensor], host: Optional[Tensor] = None) -> Callable[[], list[int]]:
    """Positions of the tensors that hold a NaN or Inf, in order, given by the returned function,
    without the host sync where it can: nonfinite_flags per device (on a GPU one pass that reads
    every tensor once, launches only). A GPU's flags are copied to pinned host memory on the current
    stream (`host`: int32 [len(tensors)], pinned, used when the tensors share one GPU; else one is
    allocated), and the returned function waits for that copy (by then the stream has usually
    passed it); it holds no tensor but the host copies. On the CPU the check runs now."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    pending = []
    for device, indices in by_device.items():
        group = [tensors[i] for i in indices]
        if device.type != "cuda":
            pending.append((indices, flagged_later(nonfinite_flags(group))))
            continue
        with torch.cuda.device(device):
            pending.append((indices, flagged_later(nonfinite_flags(group), host if len(by_device) == 1 else None)))

    def positions() -> list[int]:
        return sorted(indices[j] for indices, flagged in pending for j in flagged())
    return positions


def flagged_later(flags: Tensor, host: Optional[Tensor] = None) -> Callable[[], list[int]]:
    """The positions where int32 `flags` are nonzero, read without a host sync where it can: on a
    GPU the flags are copied to pinned host memory (`host`, else one is allocated) on the current
    stream, and the returned function waits for that copy. Elsewhere they are read now."""
    if not flags.is_cuda:
        bad = [i for i, flag in enumerate(flags.tolist()) if flag]
        return lambda: bad
    if host is None:
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
    with torch.cuda.device(flags.device):
        host.copy_(flags, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

    def positions() -> list[int]:
        done.synchronize()
        return [i for i, flag in enumerate(host.tolist()) if flag]
    return positions


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
