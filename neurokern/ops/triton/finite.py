"""Triton kernel of neurokern::nonfinite_flags (schema and CPU kernel: neurokern/ops/finite.py):
which tensors of a list hold a NaN or Inf, one read of every tensor at copy bandwidth, for the
finite checks of nk.merge and the streaming engine (neurokern.ops.nonfinite_later).

A launch covers the tensors of one storage dtype whose addresses are all 16-byte aligned, or all
not (tensors that are not dense are read from contiguous copies). Its table (int64) holds, per
tensor, its first program, numel, address, position in the list and program count; one C++ call
(neurokern::_finite_table, csrc/launch_table.cpp) groups the tensors and builds every launch's
table (one host-to-device copy) and per-program owner array (on the device). A program reads its
tensor from the owner array, reads BLOCK_BYTES of it as integers and, if one has all of its dtype's NaN/Inf bits set (every
exponent bit), stores 1 into the tensor's flag: nothing is written while all values are finite.
Full blocks load without a mask, from a pointer declared 16-byte aligned where it is (16-byte
vector loads); only a tensor's last block is masked.
"""
from typing import Sequence

import torch
import triton
import triton.language as tl

from neurokern.ops.triton import registry


# Per program 16 KiB: with 4 warps, eight 16-byte loads per thread in flight.
BLOCK_BYTES = 16384
NUM_WARPS = 4
# The bits all set in a NaN or Inf of each storage dtype, and only there: the exponent, or for
# float8_e4m3fn (no Inf, one NaN per sign) exponent and mantissa. The kernel reads each as the
# integer dtype of its size (csrc/launch_table.cpp's finite_int_type, which lists the same dtypes).
_NONFINITE_BITS = {
    torch.float64: 0x7FF0000000000000,
    torch.float32: 0x7F800000,
    torch.bfloat16: 0x7F80,
    torch.float16: 0x7C00,
    torch.float8_e5m2: 0x7C,
    torch.float8_e4m3fn: 0x7F,
}
_FINITE_TABLE = torch.ops.neurokern._finite_table.default


@triton.jit(do_not_specialize=["nt"], do_not_specialize_on_alignment=["flags", "like"])
def _nonfinite_kernel(table, owner, flags, like, nt, BITS: tl.constexpr, BLOCK: tl.constexpr,
                      ALIGNED: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    j = tl.load(owner + pid).to(tl.int64)
    local = pid - tl.load(table + j)
    n = tl.load(table + nt + j)
    p = tl.load(table + 2 * nt + j).to(tl.pointer_type(like.dtype.element_ty))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    offs = local * BLOCK + tl.arange(0, BLOCK)
    if (local + 1) * BLOCK <= n:
        x = tl.load(p + offs)
    else:
        x = tl.load(p + offs, mask=offs < n, other=0)
    if tl.max(x & BITS, axis=0) == BITS:
        tl.store(flags + tl.load(table + 3 * nt + j), 1)


def nonfinite_flags(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """int32 [len(tensors)] on the tensors' device (one device): 1 where the tensor holds a NaN or
    Inf. Launches only, no host sync. Other dtypes take torch.isfinite (integers are finite)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.int32)
    flags = torch.zeros(len(tensors), dtype=torch.int32, device=tensors[0].device)
    tables, copies, info, others = _FINITE_TABLE(tensors, BLOCK_BYTES)  # copies: alive until the launches
    for i in others:
        flags[i] = ~torch.isfinite(tensors[i]).all()
    for k in range(len(info) // 4):
        first, nt, programs, aligned = info[4 * k:4 * k + 4]
        dtype = tensors[first].dtype
        table, owner, like = tables[3 * k:3 * k + 3]
        _nonfinite_kernel[(programs,)](
            table, owner, flags, like, nt, BITS=_NONFINITE_BITS[dtype], BLOCK=BLOCK_BYTES // dtype.itemsize,
            ALIGNED=bool(aligned), num_warps=NUM_WARPS,
        )
    return flags


registry.register("nonfinite_flags", nonfinite_flags)
