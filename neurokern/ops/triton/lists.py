"""The launch tables of the list ops (weighted_sum_multi, weighted_sum_rows_multi,
ties_merge_multi, dare_multi, trim_l1, neuron_stats_multi, key_histogram): a whole list of tensors
in one launch, so that small tensors (norms, biases) cost no launch of their own and a model's
hundreds of tensors cost a few launches.

A launch covers the tensors of one storage dtype (the backward's: and gradient dtype). Its table
(int64, [rows, nt] for nt tensors) holds, per tensor, the first program of the tensor, its numel,
its flat-position offset, and the addresses of base, the output and the T fine-tuned tensors, then
the op's own rows, the tensor's position in the list and its program count; a program reads its
tensor from a per-program owner array (program_tensor), casts the addresses to pointers
(table_inputs), and runs the same block function as the op's single-tensor kernel, so the outputs
are bitwise those of the single-tensor ops.
The host side is one C++ call (prepare: neurokern::_launch_table, csrc/launch_table.cpp): the checks
of every tensor, the grouping by storage dtype, every launch's table (one host-to-device copy from
pinned memory) and owner array (built on the device: no host sync), and the outputs.
A program whose block lies wholly inside its tensor loads without a mask, and when every address of
the table is 16-byte aligned (ALIGNED) the pointers carry that hint: together they let Triton emit
16-byte vector loads, which a pointer read from memory and a mask `offs < n` would both prevent.
Per-row kernels (weighted_sum_rows_multi, neuron_stats_multi) append rows of plain numbers to the
table: each matrix's row length C and its first row in the list's concatenated rows; where every C
of the launch is a multiple of 16 (C16) the kernel says so, so that whole rows keep their vector
loads.
"""
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from neurokern.ops.triton.common import (
    fail,
    shape_of,
)


# Rows of the table (each nt long): first program, numel, offset, base, out, then finetuned[0..T-1].
FT_ROW = 5


@triton.jit
def table_ptr(table, row, nt, j, like, ALIGNED: tl.constexpr):
    """Address row `row` of tensor j as a pointer to like's element type; ALIGNED: every address
    of the table is 16-byte aligned, which lets unmasked loads vectorize."""
    p = tl.load(table + row * nt + j).to(tl.pointer_type(like.dtype.element_ty))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def table_inputs(table, nt, j, like, T: tl.constexpr, ALIGNED: tl.constexpr):
    """base, then the fine-tuned pointers f0..f7 of tensor j (unused slots point at base)."""
    b = table_ptr(table, 3, nt, j, like, ALIGNED)
    f0 = b
    f1 = b
    f2 = b
    f3 = b
    f4 = b
    f5 = b
    f6 = b
    f7 = b
    if T > 0:
        f0 = table_ptr(table, 5, nt, j, like, ALIGNED)
    if T > 1:
        f1 = table_ptr(table, 6, nt, j, like, ALIGNED)
    if T > 2:
        f2 = table_ptr(table, 7, nt, j, like, ALIGNED)
    if T > 3:
        f3 = table_ptr(table, 8, nt, j, like, ALIGNED)
    if T > 4:
        f4 = table_ptr(table, 9, nt, j, like, ALIGNED)
    if T > 5:
        f5 = table_ptr(table, 10, nt, j, like, ALIGNED)
    if T > 6:
        f6 = table_ptr(table, 11, nt, j, like, ALIGNED)
    if T > 7:
        f7 = table_ptr(table, 12, nt, j, like, ALIGNED)
    return b, f0, f1, f2, f3, f4, f5, f6, f7


@triton.jit
def program_tensor(table, owner, nt):
    """(program id, tensor j, program index inside tensor j, numel, offset) of this program; owner
    holds each program's tensor (one load, where a binary search over the table would chain
    log2(n) dependent loads before the program's first data load)."""
    pid = tl.program_id(0).to(tl.int64)
    j = tl.load(owner + pid).to(tl.int64)
    local = pid - tl.load(table + j)
    return pid, j, local, tl.load(table + nt + j), tl.load(table + 2 * nt + j)


@triton.jit
def trim_row(thr_ptr, lim_ptr, j, T: tl.constexpr, TRIM_ROWS: tl.constexpr):
    if TRIM_ROWS:
        thr_ptr += j * T
        lim_ptr += j * T
    return thr_ptr, lim_ptr


@triton.jit(do_not_specialize=["nt", "P"], do_not_specialize_on_alignment=["part_ptr", "out_ptr"])
def segment_sum_kernel(part_ptr, table, out_ptr, nt, P, W: tl.constexpr, BW: tl.constexpr,
                        ROWS: tl.constexpr):
    """out[j, i] = sum of part[i, s_j : s_j+1] over tensor j's chunk range, in part's dtype (float64
    or int64) and a fixed order (deterministic), stored in out's dtype."""
    j = tl.program_id(0).to(tl.int64)
    first = tl.load(table + j)
    last = tl.where(j + 1 < nt, tl.load(table + tl.minimum(j + 1, nt - 1)), P)
    inputs = tl.arange(0, BW)
    acc = tl.zeros([ROWS, BW], dtype=part_ptr.dtype.element_ty)
    for r0 in range(first, last, ROWS):
        r = r0 + tl.arange(0, ROWS)
        mask = (r[:, None] < last) & (inputs[None, :] < W)
        acc += tl.load(part_ptr + inputs[None, :] * P + r[:, None], mask=mask, other=0)
    tl.store(out_ptr + j * W + inputs, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=inputs < W)


class Launch(NamedTuple):
    """One launch of a list op, from neurokern::_launch_table (csrc/launch_table.cpp): the table and
    owner array (on the device) of the tensors of one storage dtype, the list position of its first
    tensor, its tensor count and program count, ALIGNED, and for the per-row layouts C16 (every row
    length a multiple of 16)."""
    table: torch.Tensor
    owner: torch.Tensor
    first: int
    nt: int
    programs: int
    aligned: bool
    c16: bool

    def rows_of(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The rows of this launch's tensors out of x (one row per tensor of the list, on the
        device), gathered on the device by the table's row of list positions."""
        return x if self.nt == n else x.index_select(0, self.table[-2])

    def trims(self, thr, lim, rows: bool, n: int):
        """thr / lim for this launch's tensors: [T] as they are, [n, T] rows gathered."""
        return (self.rows_of(thr, n), self.rows_of(lim, n)) if rows else (thr, lim)


_LAUNCH_TABLE = torch.ops.neurokern._launch_table.default


def tasks(base: Sequence[torch.Tensor], finetuned: Sequence[torch.Tensor]) -> int:
    """T of a list op (prepare checks that finetuned holds T versions of each base)."""
    return len(finetuned) // len(base) if len(base) else 0


def prepare(op: str, base, finetuned, per_program: int = 0, layout: str = "elements", outputs: bool = False,
            out_dtype=None, offsets: Optional[Sequence[int]] = (), grad=None):
    """Checks a list op's tensors (each base[i] and its fine-tuned versions: shape, dtype, device,
    contiguity, storage dtype; the per-row layouts: 2-D; offsets; grad) with the C++ kernels'
    messages and, for per_program > 0, lays out its launches, in one C++ call. layout: programs of
    per_program elements ("elements"), one per row and per_program-column block ("row_blocks",
    value rows C and first row), of per_program rows ("rows", value rows R, C and first row).
    outputs: one new output per tensor (out_dtype or base's dtype), else the output row holds
    base's addresses. offsets: one per tensor, empty (all 0), or None (the list's flat positions).
    grad (weighted_sum_multi_backward): one per tensor, returned on the device, contiguous, float32
    unless a floating dtype, and grouped by too. Returns (outputs, grad, launches, the total row
    count of a per-row layout)."""
    outs, grad, tables, info = _LAUNCH_TABLE(op, base, finetuned, grad, offsets, per_program, layout, outputs,
                                             out_dtype)
    launches = []
    for k in range(len(tables) // 2):
        first, nt, programs, aligned, c16 = info[2 + 5 * k:7 + 5 * k]
        launches.append(Launch(tables[2 * k], tables[2 * k + 1], first, nt, programs, bool(aligned), bool(c16)))
    return outs, grad, launches, info[1]


def columns(finetuned: Sequence[torch.Tensor], n: int) -> list[list[torch.Tensor]]:
    """Each tensor's fine-tuned versions (finetuned is task-major), for the per-tensor fallbacks."""
    return [list(finetuned[i::n]) for i in range(n)]


def offset_of(offsets: Sequence[int], i: int) -> int:
    return offsets[i] if offsets else 0


def list_trims(op: str, threshold, tie_limit, n: int, T: int, device):
    """(threshold, tie_limit, rows): float32 / int64 [T] or [n, T] on device, rows = per tensor."""
    if (threshold is None) != (tie_limit is None):
        fail(op, "threshold and tie_limit must be given together")
    if threshold is None:
        return None, None, False
    for t in (threshold, tie_limit):
        if not (t.dim() == 1 and t.shape[0] == T or t.dim() == 2 and tuple(t.shape) == (n, T)):
            fail(op, f"threshold and tie_limit must be [{T}] or [{n}, {T}], got {shape_of(t)}")
    rows = threshold.dim() == 2
    return (threshold.to(device=device, dtype=torch.float32).contiguous(),
            tie_limit.to(device=device, dtype=torch.int64).contiguous(), rows)


def trim_of(thr, lim, rows: bool, i: int):
    if thr is None:
        return None, None
    return (thr[i], lim[i]) if rows else (thr, lim)


def task_trims(thr, lim, rows: bool, launch: Launch, n: int, t0: int, t1: int):
    """The trims of the launch's tensors for tasks t0 .. t1 - 1: [t1 - t0], or [nt, t1 - t0] rows."""
    if thr is None or not rows:
        return (None, None) if thr is None else (thr[t0:t1], lim[t0:t1])
    thr, lim = launch.trims(thr, lim, rows, n)
    if t1 - t0 < thr.shape[1]:
        thr, lim = thr[:, t0:t1].contiguous(), lim[:, t0:t1].contiguous()
    return thr, lim


# Output dtypes the kernels store directly (others: the single-tensor launcher per tensor).
DIRECT_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
