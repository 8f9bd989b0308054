"""Triton kernels of the multi-tensor ops (weighted_sum_multi (+ backward), weighted_sum_rows_multi,
ties_merge_multi, dare_multi, trim_l1): a whole list of tensors in one launch, so that small tensors
(norms, biases) cost no launch of their own and a model's hundreds of tensors cost a few launches.

A launch covers the tensors of one storage dtype (the backward's: and gradient dtype). Its table
(int64, [rows, nt] for nt tensors) holds, per tensor, the first program of the tensor, its numel,
its flat-position offset, and the addresses of base, the output and the T fine-tuned tensors, then
the op's own rows, the tensor's position in the list and its program count; a program reads its
tensor from a per-program owner array, casts the addresses to pointers, and runs the same block
function as the single-tensor kernel (elementwise.py), so the outputs are bitwise those of the
single-tensor ops.
The host side of a call is one C++ call (prepare: neurokern::_launch_table, csrc/launch_table.cpp):
the checks of every tensor, the grouping by storage dtype, every launch's table (one host-to-device
copy from pinned memory) and owner array (built on the device: no host sync), and the outputs.
On the H200 machines a whole call's host time still measured 1.3-2.7 ms against 3.0 ms of GPU time
for weighted_sum_multi's kernel (bench/list_overhead.py); of 1.46 ms measured in one such call,
the Python face's loops over the lists took 0.16 ms, torch.library's autograd layer 0.19 ms, the
dispatch into this Python launcher 0.18 ms, prepare 0.66 ms (0.40 ms of it the 201 outputs) and
the launch 0.04 ms. So weighted_sum_multi's CUDA kernel is C++ (csrc/list_launch.cpp): the list
crosses into C++ once, at the op call, and _ws_multi_launch here only launches its tables; its
face skips the autograd layer where no gradient can flow.
A program whose block lies wholly inside its tensor loads without a mask, and when every address of
the table is 16-byte aligned (ALIGNED) the pointers carry that hint: together they let Triton emit
16-byte vector loads, which a pointer read from memory and a mask `offs < n` would both prevent.

Per-row kernels (weighted_sum_rows_multi here, neuron_stats_multi in neuron_stats.py) append rows
of plain numbers to the table: each matrix's row length C and its first row in the list's
concatenated rows; where every C of the launch is a multiple of 16 (C16) the kernel says so, as the
single-tensor kernel's specialization on C would, so that whole rows keep their vector loads.

trim_l1 is a two-stage float64 reduction over the list: one launch per storage dtype (and chunk of
MAX_TASKS tasks) whose programs each sum one CHUNK of one tensor (the chunks and partials a launch
per tensor would have), then one torch float64 sum of each launch's partials: bitwise a per-tensor
launch's result for a single tensor, within float64 rounding of the per-tensor sums added up for a
list.

ties_merge_multi's zero_sign="majority" pre-pass (each tensor's majority sign) is one more launch
of chunk partials and a segmented sum over them, per storage dtype. dare_multi's rescale="l1"
(per-tensor norms), T > MAX_TASKS and output dtypes the kernels do not store directly run the
single-tensor launcher per tensor.
"""
import itertools
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from neurokern.ops._common import to_device
from neurokern.ops.triton import elementwise as ew
from neurokern.ops.triton import registry

# Rows of the table (each nt long): first program, numel, offset, base, out, then finetuned[0..T-1].
_FT = 5


@triton.jit
def _ptr(table, row, nt, j, like, ALIGNED: tl.constexpr):
    """Address row `row` of tensor j as a pointer to like's element type; ALIGNED: every address
    of the table is 16-byte aligned, which lets unmasked loads vectorize."""
    p = tl.load(table + row * nt + j).to(tl.pointer_type(like.dtype.element_ty))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _inputs(table, nt, j, like, T: tl.constexpr, ALIGNED: tl.constexpr):
    """base, then the fine-tuned pointers f0..f7 of tensor j (unused slots point at base)."""
    b = _ptr(table, 3, nt, j, like, ALIGNED)
    f0 = b
    f1 = b
    f2 = b
    f3 = b
    f4 = b
    f5 = b
    f6 = b
    f7 = b
    if T > 0:
        f0 = _ptr(table, 5, nt, j, like, ALIGNED)
    if T > 1:
        f1 = _ptr(table, 6, nt, j, like, ALIGNED)
    if T > 2:
        f2 = _ptr(table, 7, nt, j, like, ALIGNED)
    if T > 3:
        f3 = _ptr(table, 8, nt, j, like, ALIGNED)
    if T > 4:
        f4 = _ptr(table, 9, nt, j, like, ALIGNED)
    if T > 5:
        f5 = _ptr(table, 10, nt, j, like, ALIGNED)
    if T > 6:
        f6 = _ptr(table, 11, nt, j, like, ALIGNED)
    if T > 7:
        f7 = _ptr(table, 12, nt, j, like, ALIGNED)
    return b, f0, f1, f2, f3, f4, f5, f6, f7


@triton.jit
def _where(table, owner, nt):
    """(program id, tensor j, program index inside tensor j, numel, offset) of this program; owner
    holds each program's tensor (one load, where a binary search over the table would chain
    log2(n) dependent loads before the program's first data load)."""
    pid = tl.program_id(0).to(tl.int64)
    j = tl.load(owner + pid).to(tl.int64)
    local = pid - tl.load(table + j)
    return pid, j, local, tl.load(table + nt + j), tl.load(table + 2 * nt + j)


@triton.jit
def _trim_row(thr_ptr, lim_ptr, j, T: tl.constexpr, TRIM_ROWS: tl.constexpr):
    if TRIM_ROWS:
        thr_ptr += j * T
        lim_ptr += j * T
    return thr_ptr, lim_ptr


@triton.jit
def _ws_multi_kernel(
    table, owner, coef_ptr, thr_ptr, lim_ptr, flag_ptr, like_in, like_out, nt,
    T: tl.constexpr, TRIM: tl.constexpr, TRIM_ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr, CHECK: tl.constexpr,
):
    """CHECK: flag_ptr[i] = 1 for the list position i (table row 5 + T) of a tensor whose output
    holds a NaN or Inf (x * 0 is NaN exactly where x is not finite)."""
    pid, j, local, n, offset = _where(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = _inputs(table, nt, j, like_in, T, ALIGNED)
    out_ptr = _ptr(table, 4, nt, j, like_out, ALIGNED)
    thr_ptr, lim_ptr = _trim_row(thr_ptr, lim_ptr, j, T, TRIM_ROWS)
    coef_ptr += j * (T + 1)
    offs = local * BLOCK + tl.arange(0, BLOCK)
    if (local + 1) * BLOCK <= n:  # a whole block: unmasked
        out = ew._ws_block(b, f0, f1, f2, f3, f4, f5, f6, f7, coef_ptr, thr_ptr, lim_ptr, out_ptr,
                           offs, ew._everywhere(BLOCK), 0, 1, offset, T, TRIM, 0)
    else:
        out = ew._ws_block(b, f0, f1, f2, f3, f4, f5, f6, f7, coef_ptr, thr_ptr, lim_ptr, out_ptr,
                           offs, offs < n, 0, 1, offset, T, TRIM, 0)
    if CHECK:
        x = out.to(tl.float32)
        if tl.max((x * 0.0 != 0.0).to(tl.int32), axis=0) != 0:
            tl.store(flag_ptr + tl.load(table + (5 + T) * nt + j), 1)


@triton.jit
def _ws_rows_multi_kernel(
    table, owner, coef_ptr, thr_ptr, lim_ptr, like_in, like_out, nt, count,
    T: tl.constexpr, TRIM: tl.constexpr, TRIM_ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr, C16: tl.constexpr,
):
    """Per-row coefficients: program (row, block of BLOCK columns) of tensor j, as the single-tensor
    per-row kernel's. Table rows 5 + T, 6 + T: the row length C and the first row s_j of tensor j,
    whose coefficients are coeffs[:, s_j + row] of coeffs [T+1, count]. C16: every C is a multiple
    of 16 (whole rows start 16-element aligned, so unmasked blocks vectorize)."""
    pid, j, local, n, offset = _where(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = _inputs(table, nt, j, like_in, T, ALIGNED)
    out_ptr = _ptr(table, 4, nt, j, like_out, ALIGNED)
    thr_ptr, lim_ptr = _trim_row(thr_ptr, lim_ptr, j, T, TRIM_ROWS)
    C = tl.load(table + (5 + T) * nt + j)
    if C16:
        C = tl.multiple_of(C, 16)
    coef_ptr += tl.load(table + (6 + T) * nt + j)
    blocks = tl.cdiv(C, BLOCK)
    row = local // blocks
    block = local - row * blocks
    cols = block * BLOCK + tl.arange(0, BLOCK)
    offs = row * C + cols
    if (block + 1) * BLOCK <= C:  # a whole block: unmasked
        ew._ws_block(b, f0, f1, f2, f3, f4, f5, f6, f7, coef_ptr, thr_ptr, lim_ptr, out_ptr,
                     offs, ew._everywhere(BLOCK), row, count, offset, T, TRIM, 1)
    else:
        ew._ws_block(b, f0, f1, f2, f3, f4, f5, f6, f7, coef_ptr, thr_ptr, lim_ptr, out_ptr,
                     offs, cols < C, row, count, offset, T, TRIM, 1)


@triton.jit
def _ws_multi_backward_kernel(
    table, owner, grad_table, thr_ptr, lim_ptr, part_ptr, like_in, like_grad, nt, P,
    T: tl.constexpr, TRIM: tl.constexpr, TRIM_ROWS: tl.constexpr, BLOCK: tl.constexpr,
    CHUNK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """part[i, pid] = <grad, x_i> over chunk `local` (CHUNK elements) of tensor j, float64."""
    pid, j, local, n, offset = _where(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = _inputs(table, nt, j, like_in, T, ALIGNED)
    grad_ptr = _ptr(grad_table, 0, nt, j, like_grad, ALIGNED)
    thr_ptr, lim_ptr = _trim_row(thr_ptr, lim_ptr, j, T, TRIM_ROWS)
    part_ptr += pid - local
    if (local + 1) * CHUNK <= n:  # a whole chunk: unmasked
        ew._ws_dots(grad_ptr, b, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, part_ptr,
                    local, P, CHUNK, n, offset, T, TRIM, BLOCK, True)
    else:
        ew._ws_dots(grad_ptr, b, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, part_ptr,
                    local, P, CHUNK, n, offset, T, TRIM, BLOCK, False)


@triton.jit
def _segment_sum_kernel(part_ptr, table, out_ptr, nt, P, W: tl.constexpr, BW: tl.constexpr,
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


@triton.jit
def _ties_vote_multi_kernel(
    table, owner, thr_ptr, lim_ptr, par_ptr, part_ptr, like_in, nt,
    T: tl.constexpr, TRIM: tl.constexpr, TRIM_ROWS: tl.constexpr, CONSENSUS: tl.constexpr,
    ELECT_W: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, ALIGNED: tl.constexpr,
):
    """The zero_sign="majority" pre-pass: part[pid] = the sum of the elected signs sign(vote) over
    chunk `local` (ITERS blocks) of tensor j, as the single-tensor kernel's PASS 0 (int64, exact)."""
    pid, j, local, n, offset = _where(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = _inputs(table, nt, j, like_in, T, ALIGNED)
    thr_ptr, lim_ptr = _trim_row(thr_ptr, lim_ptr, j, T, TRIM_ROWS)
    acc = ew._ties_chunk(b, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, par_ptr, par_ptr, b,
                         local * (ITERS * BLOCK), n, offset, T, TRIM, CONSENSUS, 0, ELECT_W, False, 0, BLOCK, ITERS)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0).to(tl.int64))


@triton.jit
def _ties_multi_kernel(
    table, owner, thr_ptr, lim_ptr, par_ptr, fb_ptr, like_in, nt,
    T: tl.constexpr, TRIM: tl.constexpr, TRIM_ROWS: tl.constexpr, CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr, ELECT_W: tl.constexpr, MAJORITY: tl.constexpr, BLOCK: tl.constexpr,
    ITERS: tl.constexpr, ALIGNED: tl.constexpr,
):
    """The merge of chunk `local` (ITERS blocks) of tensor j; MAJORITY: a zero vote elects fb[j],
    the tensor's majority sign (int32 [n]). Several blocks a program spread the table lookups and
    the per-program scalars over more bytes: with one small election block a program, they
    bounded the bandwidth."""
    pid, j, local, n, offset = _where(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = _inputs(table, nt, j, like_in, T, ALIGNED)
    out_ptr = _ptr(table, 4, nt, j, like_in, ALIGNED)
    thr_ptr, lim_ptr = _trim_row(thr_ptr, lim_ptr, j, T, TRIM_ROWS)
    ew._ties_chunk(b, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, par_ptr, fb_ptr + j, out_ptr,
                   local * (ITERS * BLOCK), n, offset, T, TRIM, CONSENSUS, NORMALIZE, ELECT_W, MAJORITY, 1, BLOCK,
                   ITERS)


@triton.jit
def _dare_multi_kernel(
    table, owner, par_ptr, like_in, nt, keep_below, PAR: tl.constexpr,
    T: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, G: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid, j, local, n, offset = _where(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = _inputs(table, nt, j, like_in, T, ALIGNED)
    out_ptr = _ptr(table, 4, nt, j, like_in, ALIGNED)
    par = par_ptr + j * PAR
    grp = local * G + tl.arange(0, G)
    if (local + 1) * G * 4 <= n:  # a whole tile: unmasked
        ew._dare_block(b, f0, f1, f2, f3, f4, f5, f6, f7, par, par + (T + 2 + 2 * T), out_ptr,
                       grp, n, keep_below, T, CONSENSUS, NORMALIZE, G, True)
    else:
        ew._dare_block(b, f0, f1, f2, f3, f4, f5, f6, f7, par, par + (T + 2 + 2 * T), out_ptr,
                       grp, n, keep_below, T, CONSENSUS, NORMALIZE, G, False)


@triton.jit
def _l1_add(sb, sk, f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t: tl.constexpr, TRIM: tl.constexpr):
    mag, kept = ew._reduce_tau(f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t, TRIM)
    return sb + mag, sk + kept


@triton.jit
def _l1_store(part_ptr, sb, sk, t: tl.constexpr):
    tl.store(part_ptr + 2 * t, tl.sum(sb, axis=0))
    tl.store(part_ptr + 2 * t + 1, tl.sum(sk, axis=0))


@triton.jit
def _l1_chunk(base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, part_ptr, local, n, offset,
              T: tl.constexpr, TRIM: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
              FULL: tl.constexpr):
    """part[t] = (sum |tau_t|, sum |trim(tau_t)|) over chunk `local` (ITERS blocks) of a tensor of n
    elements: float64 lane accumulators reduced once at the end. FULL: the chunk lies inside the
    tensor, so the loads go unmasked."""
    b0 = tl.zeros([BLOCK], dtype=tl.float64)
    b1 = tl.zeros([BLOCK], dtype=tl.float64)
    b2 = tl.zeros([BLOCK], dtype=tl.float64)
    b3 = tl.zeros([BLOCK], dtype=tl.float64)
    b4 = tl.zeros([BLOCK], dtype=tl.float64)
    b5 = tl.zeros([BLOCK], dtype=tl.float64)
    b6 = tl.zeros([BLOCK], dtype=tl.float64)
    b7 = tl.zeros([BLOCK], dtype=tl.float64)
    k0 = tl.zeros([BLOCK], dtype=tl.float64)
    k1 = tl.zeros([BLOCK], dtype=tl.float64)
    k2 = tl.zeros([BLOCK], dtype=tl.float64)
    k3 = tl.zeros([BLOCK], dtype=tl.float64)
    k4 = tl.zeros([BLOCK], dtype=tl.float64)
    k5 = tl.zeros([BLOCK], dtype=tl.float64)
    k6 = tl.zeros([BLOCK], dtype=tl.float64)
    k7 = tl.zeros([BLOCK], dtype=tl.float64)
    for it in range(ITERS):
        offs = (local * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        if FULL:
            mask = ew._everywhere(BLOCK)
        else:
            mask = offs < n
        w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        pos = offs + offset
        if T > 0:
            b0, k0 = _l1_add(b0, k0, f0, offs, mask, w, pos, thr_ptr, lim_ptr, 0, TRIM)
        if T > 1:
            b1, k1 = _l1_add(b1, k1, f1, offs, mask, w, pos, thr_ptr, lim_ptr, 1, TRIM)
        if T > 2:
            b2, k2 = _l1_add(b2, k2, f2, offs, mask, w, pos, thr_ptr, lim_ptr, 2, TRIM)
        if T > 3:
            b3, k3 = _l1_add(b3, k3, f3, offs, mask, w, pos, thr_ptr, lim_ptr, 3, TRIM)
        if T > 4:
            b4, k4 = _l1_add(b4, k4, f4, offs, mask, w, pos, thr_ptr, lim_ptr, 4, TRIM)
        if T > 5:
            b5, k5 = _l1_add(b5, k5, f5, offs, mask, w, pos, thr_ptr, lim_ptr, 5, TRIM)
        if T > 6:
            b6, k6 = _l1_add(b6, k6, f6, offs, mask, w, pos, thr_ptr, lim_ptr, 6, TRIM)
        if T > 7:
            b7, k7 = _l1_add(b7, k7, f7, offs, mask, w, pos, thr_ptr, lim_ptr, 7, TRIM)
    if T > 0:
        _l1_store(part_ptr, b0, k0, 0)
    if T > 1:
        _l1_store(part_ptr, b1, k1, 1)
    if T > 2:
        _l1_store(part_ptr, b2, k2, 2)
    if T > 3:
        _l1_store(part_ptr, b3, k3, 3)
    if T > 4:
        _l1_store(part_ptr, b4, k4, 4)
    if T > 5:
        _l1_store(part_ptr, b5, k5, 5)
    if T > 6:
        _l1_store(part_ptr, b6, k6, 6)
    if T > 7:
        _l1_store(part_ptr, b7, k7, 7)


@triton.jit
def _trim_l1_kernel(
    table, owner, thr_ptr, lim_ptr, part_ptr, like_in, nt,
    T: tl.constexpr, TRIM: tl.constexpr, TRIM_ROWS: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """part[pid, t] = (sum |tau_t|, sum |trim(tau_t)|) over chunk `local` of tensor j, float64."""
    pid, j, local, n, offset = _where(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = _inputs(table, nt, j, like_in, T, ALIGNED)
    thr_ptr, lim_ptr = _trim_row(thr_ptr, lim_ptr, j, T, TRIM_ROWS)
    part_ptr += pid * (2 * T)
    if (local + 1) * ITERS * BLOCK <= n:  # a whole chunk: unmasked
        _l1_chunk(b, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, part_ptr, local, n, offset,
                  T, TRIM, BLOCK, ITERS, True)
    else:
        _l1_chunk(b, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, part_ptr, local, n, offset,
                  T, TRIM, BLOCK, ITERS, False)


# ---------------------------------------------------------------------------------------------
# Launchers


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


def _trims(op: str, threshold, tie_limit, n: int, T: int, device):
    """(threshold, tie_limit, rows): float32 / int64 [T] or [n, T] on device, rows = per tensor."""
    if (threshold is None) != (tie_limit is None):
        ew._fail(op, "threshold and tie_limit must be given together")
    if threshold is None:
        return None, None, False
    for t in (threshold, tie_limit):
        if not (t.dim() == 1 and t.shape[0] == T or t.dim() == 2 and tuple(t.shape) == (n, T)):
            ew._fail(op, f"threshold and tie_limit must be [{T}] or [{n}, {T}], got {ew._shape(t)}")
    rows = threshold.dim() == 2
    return (threshold.to(device=device, dtype=torch.float32).contiguous(),
            tie_limit.to(device=device, dtype=torch.int64).contiguous(), rows)


def _trim_of(thr, lim, rows: bool, i: int):
    if thr is None:
        return None, None
    return (thr[i], lim[i]) if rows else (thr, lim)


def _task_trims(thr, lim, rows: bool, launch: Launch, n: int, t0: int, t1: int):
    """The trims of the launch's tensors for tasks t0 .. t1 - 1: [t1 - t0], or [nt, t1 - t0] rows."""
    if thr is None or not rows:
        return (None, None) if thr is None else (thr[t0:t1], lim[t0:t1])
    thr, lim = launch.trims(thr, lim, rows, n)
    if t1 - t0 < thr.shape[1]:
        thr, lim = thr[:, t0:t1].contiguous(), lim[:, t0:t1].contiguous()
    return thr, lim


# Output dtypes the kernels store directly (others: the single-tensor launcher per tensor).
_DIRECT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def weighted_sum_multi(base, finetuned, coeffs, threshold=None, tie_limit=None, offsets=(), out_dtype=None,
                       nonfinite=None):
    """torch.ops.neurokern.weighted_sum_multi as on CUDA tensors, on any device (CPU tensors under
    TRITON_INTERPRET): its host side runs in C++ (csrc/list_launch.cpp), which calls
    _ws_multi_launch once per storage dtype of the list. nonfinite: int32 [n] flags, set where an
    output holds NaN / Inf."""
    return torch.ops.neurokern._weighted_sum_multi_triton.default(
        base, finetuned, coeffs, threshold, tie_limit, list(offsets), out_dtype, nonfinite)


def _ws_multi_launch(table, owner, coeffs, threshold, tie_limit, like_in, like_out, nt, programs, T, trim_rows,
                     aligned, nonfinite=None):
    """torch.ops.neurokern._ws_multi_launch: one launch of weighted_sum_multi over a table laid out
    by csrc/list_launch.cpp (coeffs, and [n, T] trims, already the rows of the table's tensors;
    nonfinite: the whole list's flags, zeroed)."""
    _ws_multi_kernel[(programs,)](
        table, owner, coeffs, like_in if threshold is None else threshold, like_in if tie_limit is None else tie_limit,
        like_in if nonfinite is None else nonfinite, like_in, like_out, nt,
        T=T, TRIM=threshold is not None, TRIM_ROWS=trim_rows, BLOCK=ew.BLOCK, ALIGNED=aligned,
        CHECK=nonfinite is not None, **ew.LAUNCH,
    )


def weighted_sum_rows_multi(base, finetuned, coeffs, threshold=None, tie_limit=None, offsets=(), out_dtype=None):
    """torch.ops.neurokern.weighted_sum_rows_multi: one launch per storage dtype of the list."""
    op = "weighted_sum_rows_multi"
    n, T = len(base), tasks(base, finetuned)
    fused = T <= ew.MAX_TASKS and (out_dtype or torch.float32) in _DIRECT
    outs, _, launches, total = prepare(op, base, finetuned, ew.BLOCK if fused else 0, "row_blocks", fused,
                                       out_dtype, offsets)
    if coeffs.dtype != torch.float32 or tuple(coeffs.shape) != (T + 1, total):
        ew._fail(op, f"coeffs must be float32 [T+1, sum of rows] = [{T + 1}, {total}] (tensor i's rows at "
                     f"its first row in list order), got {ew._name(coeffs.dtype)} {ew._shape(coeffs)}")
    device = base[0].device
    thr, lim, trim_rows = _trims(op, threshold, tie_limit, n, T, device)
    coeffs = coeffs.to(device).contiguous()
    if not fused:
        firsts = list(itertools.accumulate((b.shape[0] for b in base), initial=0))
        return [ew.weighted_sum(base[i], column, coeffs[:, firsts[i]:firsts[i + 1]], *_trim_of(thr, lim, trim_rows, i),
                                offset_of(offsets, i), out_dtype) for i, column in enumerate(columns(finetuned, n))]
    for g in launches:
        sub_thr, sub_lim = g.trims(thr, lim, trim_rows, n)
        first = base[g.first]
        _ws_rows_multi_kernel[(g.programs,)](
            g.table, g.owner, coeffs, sub_thr if thr is not None else first, sub_lim if lim is not None else first,
            first, outs[g.first], g.nt, total,
            T=T, TRIM=thr is not None, TRIM_ROWS=trim_rows, BLOCK=ew.BLOCK, ALIGNED=g.aligned, C16=g.c16,
            **ew.LAUNCH,
        )
    return outs


def weighted_sum_multi_backward(grad, base, finetuned, coeffs, threshold=None, tie_limit=None, offsets=()):
    """torch.ops.neurokern.weighted_sum_multi_backward: per storage dtype (of base and of grad), one
    launch of float64 partial sums over CHUNK-element chunks and one launch summing each tensor's
    partials."""
    op = "weighted_sum_multi_backward"
    n, T = len(base), tasks(base, finetuned)
    chunk = ew.CHUNK if T <= ew.MAX_TASKS else 0
    _, grad, launches, _ = prepare(op, base, finetuned, chunk, offsets=offsets, grad=grad)
    if tuple(coeffs.shape) != (n, T + 1):
        ew._fail(op, f"coeffs must be [n, T+1] = [{n}, {T + 1}], got {ew._shape(coeffs)}")
    device = base[0].device
    thr, lim, rows = _trims(op, threshold, tie_limit, n, T, device)
    out = torch.zeros((n, T + 1), dtype=torch.float32, device=device)
    if not chunk:
        for i, column in enumerate(columns(finetuned, n)):
            out[i] = ew.weighted_sum_backward(grad[i], base[i], column, coeffs[i], *_trim_of(thr, lim, rows, i),
                                              offset_of(offsets, i))
        return out
    for g in launches:
        part = torch.empty((T + 1, g.programs), dtype=torch.float64, device=device)
        sub_thr, sub_lim = g.trims(thr, lim, rows, n)
        first = base[g.first]
        _ws_multi_backward_kernel[(g.programs,)](
            g.table, g.owner, g.table[(_FT + T):], sub_thr if thr is not None else first,
            sub_lim if lim is not None else first, part, first, grad[g.first], g.nt, g.programs,
            T=T, TRIM=thr is not None, TRIM_ROWS=rows, BLOCK=min(ew.RED_BLOCK, chunk), CHUNK=chunk,
            ALIGNED=g.aligned, **ew.LAUNCH,
        )
        sums = torch.empty((g.nt, T + 1), dtype=torch.float32, device=device)
        _segment_sum_kernel[(g.nt,)](part, g.table, sums, g.nt, g.programs, W=T + 1,
                                     BW=triton.next_power_of_2(T + 1), ROWS=64, num_warps=4)
        out.index_copy_(0, g.table[-2], sums)
    return out


def ties_merge_multi(base, finetuned, weights, threshold=None, tie_limit=None, offsets=(),
                     consensus="sum", normalize="weights", elect_weighted=True, zero_sign="positive",
                     scale=1.0):
    """torch.ops.neurokern.ties_merge_multi: one launch per storage dtype of the list;
    zero_sign="majority" adds two (_majority)."""
    op = "ties_merge_multi"
    n, T = len(base), tasks(base, finetuned)
    block = ew._election_block(T)
    fused = T <= ew.MAX_TASKS
    outs, _, launches, _ = prepare(op, base, finetuned, block * ew.TIES_ITERS if fused else 0, outputs=fused,
                                   offsets=offsets)
    cons, norm = ew.ties_options(op, T, weights, consensus, normalize, zero_sign)
    device = base[0].device
    thr, lim, rows = _trims(op, threshold, tie_limit, n, T, device)
    if not fused:
        return [ew.ties_merge(base[i], column, weights, *_trim_of(thr, lim, rows, i), offset_of(offsets, i),
                              consensus, normalize, elect_weighted, zero_sign, scale)
                for i, column in enumerate(columns(finetuned, n))]
    par = ew._params(device, ew.ties_params(weights, scale, norm))
    meta = dict(T=T, TRIM=thr is not None, TRIM_ROWS=rows, CONSENSUS=cons, ELECT_W=bool(elect_weighted),
                BLOCK=block, **ew.LAUNCH)
    votes = _majority(op, base, finetuned, offsets, thr, lim, par, meta) if zero_sign == "majority" else {}
    for g in launches:
        first = base[g.first]
        sub_thr, sub_lim = g.trims(thr, lim, rows, n)
        _ties_multi_kernel[(g.programs,)](
            g.table, g.owner, sub_thr if thr is not None else first, sub_lim if lim is not None else first, par,
            votes.get(g.first, par), first, g.nt,
            NORMALIZE=norm, MAJORITY=zero_sign == "majority", ITERS=ew.TIES_ITERS, ALIGNED=g.aligned, **meta,
        )
    return outs


def _majority(op, base, finetuned, offsets, thr, lim, par, meta) -> dict[int, torch.Tensor]:
    """Per launch (keyed by its first tensor), int32 [nt]: each tensor's majority sign, the sign of
    the sum of its elected signs (a zero vote's fallback), from one pre-pass launch per storage dtype
    (CHUNK elements per program, int64 partials) and one segmented sum over each tensor's partials;
    no host sync."""
    n = len(base)
    per_program = meta["BLOCK"] * max(1, ew.CHUNK // meta["BLOCK"])
    _, _, launches, _ = prepare(op, base, finetuned, per_program, offsets=offsets)
    signs = {}
    for g in launches:
        first = base[g.first]
        sub_thr, sub_lim = g.trims(thr, lim, meta["TRIM_ROWS"], n)
        part = torch.empty(g.programs, dtype=torch.int64, device=first.device)
        _ties_vote_multi_kernel[(g.programs,)](
            g.table, g.owner, sub_thr if thr is not None else first, sub_lim if lim is not None else first, par,
            part, first, g.nt, ITERS=per_program // meta["BLOCK"], ALIGNED=g.aligned, **meta)
        sums = torch.empty(g.nt, dtype=torch.int64, device=first.device)
        _segment_sum_kernel[(g.nt,)](part, g.table, sums, g.nt, g.programs, W=1, BW=1, ROWS=64, num_warps=4)
        signs[g.first] = torch.sign(sums).to(torch.int32)
    return signs


def dare_multi(base, finetuned, weights, density, keys, rescale="density", consensus="none",
               normalize="none", scale=1.0):
    """torch.ops.neurokern.dare_multi: one launch per storage dtype of the list; tensor i's row of
    per-call scalars carries its keys."""
    op = "dare_multi"
    n, T = len(base), tasks(base, finetuned)
    block = ew._election_block(T)
    fused = T <= ew.MAX_TASKS and rescale != "l1"
    outs, _, launches, _ = prepare(op, base, finetuned, block if fused else 0, outputs=fused)
    if len(keys) != n * T:
        ew._fail(op, f"keys must hold n * T = {n * T} entries (keys[i * T + t]), got {len(keys)}")
    cons, norm = ew.dare_options(op, T, weights, density, rescale, consensus, normalize)
    if not fused:
        return [ew.dare(base[i], column, weights, density, keys[i * T:(i + 1) * T], rescale, consensus, normalize,
                        scale) for i, column in enumerate(columns(finetuned, n))]
    # ew.dare_params per tensor: the same numbers but each tensor's keys as (low, high) 32-bit words.
    row = ew.dare_params(weights, density, [0] * T, rescale, norm, scale)
    key = torch.tensor(keys, dtype=torch.int64).view(n, T)
    words = torch.stack([key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF], dim=2).view(n, 2 * T)
    host = torch.tensor(row, dtype=torch.float64).repeat(n, 1)
    host[:, T + 2:3 * T + 2] = words
    par = to_device(host, base[0].device)
    keep_below = ew.dare_threshold(density)
    for g in launches:
        _dare_multi_kernel[(g.programs,)](
            g.table, g.owner, g.rows_of(par, n), base[g.first], g.nt, keep_below, PAR=len(row),
            T=T, CONSENSUS=cons, NORMALIZE=norm, G=block // 4, ALIGNED=g.aligned, **ew.LAUNCH,
        )
    return outs


def trim_l1(base, finetuned, threshold=None, tie_limit=None):
    """torch.ops.neurokern.trim_l1: float64 [T, 2] of (sum |tau_t|, sum |trim(tau_t)|) over the list.

    One launch per storage dtype and chunk of up to MAX_TASKS tasks (any T): each program sums one
    CHUNK-element chunk of one tensor into float64 partials (the chunks and the partial sums of one
    launch per tensor, bit for bit), torch sums the launch's partials in float64. Thresholds [T]:
    one scope over the list (flat positions continue from tensor to tensor); [n, T]: each tensor on
    its own (positions from 0)."""
    op = "trim_l1"
    n, T = len(base), tasks(base, finetuned)
    if not 0 < T <= ew.MAX_TASKS:  # checked at once: a chunk of tasks would number its tasks from 0
        prepare(op, base, finetuned)
    device = base[0].device
    thr, lim, trim_rows = _trims(op, threshold, tie_limit, n, T, device)
    offsets = () if trim_rows else None  # [T]: the list's flat positions
    out = torch.zeros((T, 2), dtype=torch.float64, device=device)
    for t0 in range(0, T, ew.MAX_TASKS):
        t1 = min(T, t0 + ew.MAX_TASKS)
        block = ew._red_block(2 * (t1 - t0))
        iters = max(1, ew.CHUNK // block)
        chunk = finetuned if T <= ew.MAX_TASKS else finetuned[t0 * n:t1 * n]
        _, _, launches, _ = prepare(op, base, chunk, block * iters, offsets=offsets)
        for g in launches:
            sub_thr, sub_lim = _task_trims(thr, lim, trim_rows, g, n, t0, t1)
            part = torch.empty((g.programs, t1 - t0, 2), dtype=torch.float64, device=device)
            first = base[g.first]
            _trim_l1_kernel[(g.programs,)](
                g.table, g.owner, sub_thr if thr is not None else first, sub_lim if lim is not None else first, part,
                first, g.nt,
                T=t1 - t0, TRIM=thr is not None, TRIM_ROWS=trim_rows, BLOCK=block, ITERS=iters, ALIGNED=g.aligned,
                **ew.LAUNCH,
            )
            out[t0:t1] += part.sum(0)
    return out


# weighted_sum_multi's CUDA kernel is C++ (csrc/list_launch.cpp): it needs the launch and the
# constants its tables are laid out with; the CPU key serves the interpreted test runs.
torch.library.impl("neurokern::_ws_multi_launch", ("CUDA", "CPU"), _ws_multi_launch)
torch.ops.neurokern._triton_list_config(ew.BLOCK, ew.MAX_TASKS)
registry.register("weighted_sum_multi_backward", weighted_sum_multi_backward)
registry.register("weighted_sum_rows_multi", weighted_sum_rows_multi)
registry.register("ties_merge_multi", ties_merge_multi)
registry.register("dare_multi", dare_multi)
registry.register("trim_l1", trim_l1)
