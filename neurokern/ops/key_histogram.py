"""Histograms of |tau| keys over a list of tensors, for the exact global trims of the streaming
engine (neurokern/methods/global_trim.py), and the gather of the boundary bin's entries.

The key of an entry is the int32 bit pattern of |float32(finetuned[t]) - float32(base)|
(magnitude_bits: non-negative, so the bits order it). key_histogram adds into an int64 [T, BINS]
histogram:
- high (hi_bin None): every entry of task t counts in bin key >> 16 (BINS = HI_BINS);
- low (hi_bin int32 [T] on the inputs' device): only entries with key >> 16 == hi_bin[t] count, in
  bin key & 0xFFFF (BINS = LO_BINS); hi_bin[t] < 0 skips task t. `counts` (int64 [n, T]) then
  receives how many such entries each (tensor, task) holds.
boundary_values gathers those entries' low 16 bits, (tensor, task) after (tensor, task) in the
order of the flat counts, in any order inside one.

The schemas are in csrc/ops.cpp; the CPU kernels below (torch per tensor and task) serve every device
without a kernel of its own; on CUDA the Triton launchers of neurokern/ops/triton/key_histogram.py
(launches only, no host sync) take their place.
"""
import itertools
from typing import Optional, Sequence

import torch
from torch import Tensor

HI_BINS = 1 << 15
LO_BINS = 1 << 16


def magnitude_bits(base: Tensor, finetuned: Tensor) -> Tensor:
    """|float32(ft) - float32(base)| as int32 bits, flat (as the ops form task vectors)."""
    return (finetuned.float() - base.float()).abs_().view(torch.int32).reshape(-1)


def key_histogram(base: Sequence[Tensor], finetuned: Sequence[Tensor], hist: Tensor, hi_bin: Optional[Tensor] = None,
                  counts: Optional[Tensor] = None) -> None:
    """Adds the |tau| keys of a list (base [n], finetuned task-major: finetuned[t * n + i]) into
    hist, int64 [T, HI_BINS] (hi_bin None) or [T, LO_BINS] (hi_bin int32 [T]); with hi_bin, also
    each (tensor, task)'s entry count into counts (int64 [n, T]) when given."""
    torch.ops.neurokern.key_histogram.default(list(base), list(finetuned), hist, hi_bin, counts)


def boundary_values(base: Sequence[Tensor], finetuned: Sequence[Tensor], hi_bin: Tensor,
                    counts: Sequence[int]) -> Tensor:
    """int32 [sum(counts)]: the low 16 bits of the entries key_histogram's low mode counts,
    (tensor, task) after (tensor, task) in the order of counts (flat: counts[i * T + t])."""
    return torch.ops.neurokern.boundary_values.default(list(base), list(finetuned), hi_bin, [int(c) for c in counts])


def _check(op: str, base, finetuned, hist: Optional[Tensor], low: bool, counts: Optional[Tensor]) -> int:
    """T of the list; the launchers' checks of hist and counts, with their messages."""
    n = len(base)
    if n == 0 or len(finetuned) % n:
        raise RuntimeError(f"neurokern.{op}: finetuned must hold T versions of each of the {n} base tensors, "
                           f"got {len(finetuned)}")
    T = len(finetuned) // n
    bins = LO_BINS if low else HI_BINS
    if hist is not None and (hist.dtype != torch.int64 or tuple(hist.shape) != (T, bins) or not hist.is_contiguous()):
        raise RuntimeError(f"neurokern.{op}: hist must be contiguous int64 [{T}, {bins}], got {hist.dtype} "
                           f"{list(hist.shape)}")
    if counts is not None and (not low or counts.dtype != torch.int64 or tuple(counts.shape) != (n, T)
                               or not counts.is_contiguous()):
        raise RuntimeError(f"neurokern.{op}: counts (low mode only) must be contiguous int64 [{n}, {T}]")
    return T


def _boundary_low_bits(base: Tensor, finetuned: Tensor, hi: int) -> Tensor:
    bits = magnitude_bits(base, finetuned)
    return bits[(bits >> 16) == hi] & 0xFFFF


@torch.library.impl("neurokern::key_histogram", "CompositeExplicitAutograd")
def _key_histogram_torch(base, finetuned, hist, hi_bin=None, counts=None):
    low = hi_bin is not None
    T = _check("key_histogram", base, finetuned, hist, low, counts)
    n = len(base)
    if not low:
        for t in range(T):
            for i, b in enumerate(base):
                hist[t] += torch.bincount(magnitude_bits(b, finetuned[t * n + i]) >> 16, minlength=HI_BINS)
        return
    hi = hi_bin.tolist()
    for i, b in enumerate(base):
        for t in range(T):
            if hi[t] < 0:
                continue
            lo = _boundary_low_bits(b, finetuned[t * n + i], hi[t])
            if lo.numel() == 0:
                continue
            hist[t] += torch.bincount(lo, minlength=LO_BINS)
            if counts is not None:
                counts[i, t] += lo.numel()


@torch.library.impl("neurokern::boundary_values", "CompositeExplicitAutograd")
def _boundary_values_torch(base, finetuned, hi_bin, counts):
    T = _check("boundary_values", base, finetuned, None, True, None)
    n = len(base)
    hi = hi_bin.tolist()
    starts = list(itertools.accumulate(counts, initial=0))
    values = torch.empty(starts[-1], dtype=torch.int32, device=base[0].device)
    for i, b in enumerate(base):
        for t in range(T):
            if hi[t] >= 0 and counts[i * T + t]:
                values[starts[i * T + t]:starts[i * T + t + 1]] = _boundary_low_bits(b, finetuned[t * n + i], hi[t])
    return values


@torch.library.register_fake("neurokern::boundary_values")
def _(base, finetuned, hi_bin, counts):
    return base[0].new_empty((sum(counts),), dtype=torch.int32)
