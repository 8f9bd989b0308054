"""Which tensors of a list hold a NaN or Inf: one read of every tensor at copy bandwidth, for the
finite checks of nk.merge and the streaming engine (neurokern.models.nonfinite).

A launch covers the tensors of one storage dtype whose addresses are all 16-byte aligned, or all
not. Its table (int64, one host-to-device copy) holds, per tensor, its first program, numel,
address and position in the list; a program reads its tensor from an owner array (multi.owners),
reads BLOCK_BYTES of it as integers and, if one has all of its dtype's NaN/Inf bits set (every
exponent bit), stores 1 into the tensor's flag: nothing is written while all values are finite.
Full blocks load without a mask, from a pointer declared 16-byte aligned where it is (16-byte
vector loads); only a tensor's last block is masked.
"""
from typing import Sequence

import torch
import triton
import triton.language as tl

from neurokern.ops.triton.elementwise import upload
from neurokern.ops.triton.multi import owners, program_layout

# Per program 16 KiB: with 4 warps, eight 16-byte loads per thread in flight.
BLOCK_BYTES = 16384
NUM_WARPS = 4
# The integer type each storage dtype is read as, and the bits all set in a NaN or Inf and only
# there: the exponent, or for float8_e4m3fn (no Inf, one NaN per sign) exponent and mantissa.
_NONFINITE_BITS = {
    torch.float64: (torch.int64, 0x7FF0000000000000),
    torch.float32: (torch.int32, 0x7F800000),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float8_e5m2: (torch.int8, 0x7C),
    torch.float8_e4m3fn: (torch.int8, 0x7F),
}


@triton.jit
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


def _dense(t: torch.Tensor) -> bool:
    """t's elements fill numel slots from data_ptr() on (contiguous, up to a permutation of its
    dims): read in place, in any order. is_contiguous first: the permuted check costs microseconds
    per tensor, milliseconds over a model."""
    return t.is_contiguous() or t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d))).is_contiguous()


def nonfinite_flags(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """int32 [len(tensors)] on the tensors' device (one device): 1 where the tensor holds a NaN or
    Inf. Launches only, no host sync. Other dtypes take torch.isfinite (integers are finite)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.int32)
    device = tensors[0].device
    flags = torch.zeros(len(tensors), dtype=torch.int32, device=device)
    dense = [t if _dense(t) else t.contiguous() for t in tensors]
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(dense):
        if t.dtype not in _NONFINITE_BITS:
            flags[i] = ~torch.isfinite(t).all()
        elif t.numel():
            groups.setdefault((t.dtype, t.data_ptr() % 16 == 0), []).append(i)
    for (dtype, aligned), idx in groups.items():
        as_int, bits = _NONFINITE_BITS[dtype]
        block = BLOCK_BYTES // dtype.itemsize
        numels = [dense[i].numel() for i in idx]
        counts, starts, programs = program_layout(numels, block)
        table = upload([starts, numels, [dense[i].data_ptr() for i in idx], idx, counts], torch.int64, device)
        _nonfinite_kernel[(programs,)](
            table, owners(table[4], programs), flags, dense[idx[0]].view(as_int), len(idx), BITS=bits,
            BLOCK=block, ALIGNED=aligned, num_warps=NUM_WARPS,
        )
    return flags
