"""Triton kernels of weighted_sum: the single-tensor op, its backward, and the list forms
weighted_sum_multi (+ backward) and weighted_sum_rows_multi (common.py states the arithmetic and
the design they share, lists.py the launch tables).

Bytes moved per call (E = element size of the storage dtype, N = numel, T tasks):
- weighted_sum: (T + 1) N E read + N E_out written (+ (T + 1) N 4 read for per-element coeffs).
- weighted_sum_backward: (T + 1) N E + N E_grad read; per element also (T + 1) N 4 written.
Measured on an H100 (bf16 32000 x 2048, fraction of a device-to-device copy's 2.85 TB/s for the
bytes above, T = 1 / T = 8): weighted_sum 1.00 / 1.05 (every layout); backward per tensor
0.87 / 0.84, per row 0.95 / 0.80.

weighted_sum_multi's CUDA kernel is C++ (csrc/list_launch.cpp): on the H200 machines a Python
launcher's host time measured 1.3-2.7 ms a call against 3.0 ms of GPU time (bench/list_overhead.py),
so the list crosses into C++ once, at the op call, and _ws_multi_launch here only launches its
tables; its face skips the autograd layer where no gradient can flow.

Larger T: weighted_sum runs in chunks of MAX_TASKS tasks on the device (_weighted_sum_chunks: the
float32 sum carried between chunks, and the float64 one where the C++ kernel recomputes, bitwise
its output), weighted_sum_backward one launch per chunk (each task's reduction stands alone); the
list forms run the single-tensor launcher per tensor.
"""
import itertools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from neurokern.ops.triton import common, registry
from neurokern.ops.triton.common import (
    MAX_TASKS,
    any_set,
    check_group,
    check_storage,
    dtype_name,
    everywhere,
    fail,
    grid_1d,
    is_nonfinite,
    shape_of,
    task_slots,
    task_value,
    task_wide,
    to_out,
    trim_pair,
)
from neurokern.ops.triton.lists import (
    DIRECT_OUT_DTYPES,
    FT_ROW,
    columns,
    list_trims,
    offset_of,
    prepare,
    program_tensor,
    segment_sum_kernel,
    table_inputs,
    table_ptr,
    tasks,
    trim_of,
    trim_row,
)


@triton.jit
def _coeff(coef_ptr, t: tl.constexpr, count, cidx, mask, LAYOUT: tl.constexpr):
    """Coefficient of input t (0 = base): scalar per tensor / row, a vector per element."""
    if LAYOUT == 2:
        a = tl.load(coef_ptr + (count * t + cidx), mask=mask, other=0.0)
    else:
        a = tl.load(coef_ptr + (count * t + cidx))
    return a


@triton.jit
def _ws_add(acc, f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx,
            t: tl.constexpr, TRIM: tl.constexpr, LAYOUT: tl.constexpr):
    a = _coeff(coef_ptr, t + 1, count, cidx, mask, LAYOUT)
    return acc + a * task_value(f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t, TRIM)


@triton.jit
def _ws_block(base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, coef_ptr, thr_ptr, lim_ptr, out_ptr,
              offs, mask, cidx, count, offset, T: tl.constexpr, TRIM: tl.constexpr, LAYOUT: tl.constexpr):
    """out[offs] = a_0 * base + sum_t a_{t+1} * trim(tau_t) for one block of elements; returns the
    values stored (masked-off lanes: 0)."""
    w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pos = offs + offset
    acc = _coeff(coef_ptr, 0, count, cidx, mask, LAYOUT) * w
    if T > 0:
        acc = _ws_add(acc, f0, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 0, TRIM, LAYOUT)
    if T > 1:
        acc = _ws_add(acc, f1, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 1, TRIM, LAYOUT)
    if T > 2:
        acc = _ws_add(acc, f2, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 2, TRIM, LAYOUT)
    if T > 3:
        acc = _ws_add(acc, f3, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 3, TRIM, LAYOUT)
    if T > 4:
        acc = _ws_add(acc, f4, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 4, TRIM, LAYOUT)
    if T > 5:
        acc = _ws_add(acc, f5, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 5, TRIM, LAYOUT)
    if T > 6:
        acc = _ws_add(acc, f6, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 6, TRIM, LAYOUT)
    if T > 7:
        acc = _ws_add(acc, f7, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 7, TRIM, LAYOUT)
    bad = is_nonfinite(acc)
    if any_set(bad):  # float32 overflowed (or an input is NaN / Inf): those elements in float64
        wide = _coeff(coef_ptr, 0, count, cidx, mask, LAYOUT).to(tl.float64) * w.to(tl.float64)
        for t in tl.static_range(T):
            a = _coeff(coef_ptr, t + 1, count, cidx, mask, LAYOUT).to(tl.float64)
            wide = wide + a * task_wide((f0, f1, f2, f3, f4, f5, f6, f7)[t], offs, mask, w, pos, thr_ptr, lim_ptr,
                                         t, TRIM)
        acc = tl.where(bad, wide.to(tl.float32), acc)
    out = to_out(acc, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, out, mask=mask)
    return out


@triton.jit
def _ws_program(n, C, NCB, LAYOUT: tl.constexpr, BLOCK: tl.constexpr):
    """(offs, mask, cidx) of this program: per row (LAYOUT 1) the program is (row, column block)
    and the row's coefficients are scalars (cidx = row); per element cidx = offs; per tensor 0."""
    pid = tl.program_id(0).to(tl.int64)
    if LAYOUT == 1:
        row = pid // NCB
        cols = (pid - row * NCB) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < C
        offs = row * C + cols
        cidx = row
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if LAYOUT == 2:
            cidx = offs
        else:
            cidx = 0
    return offs, mask, cidx


@triton.jit(do_not_specialize=["count", "offset"])
def _weighted_sum_kernel(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, coef_ptr, thr_ptr, lim_ptr, out_ptr,
    n, C, NCB, count, offset,
    T: tl.constexpr, TRIM: tl.constexpr, LAYOUT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask, cidx = _ws_program(n, C, NCB, LAYOUT, BLOCK)
    _ws_block(base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, coef_ptr, thr_ptr, lim_ptr, out_ptr,
              offs, mask, cidx, count.to(tl.int64), offset, T, TRIM, LAYOUT)


@triton.jit(do_not_specialize=["count", "offset"])
def _weighted_sum_chunk_kernel(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, coef_ptr, thr_ptr, lim_ptr, acc_ptr, wide_ptr, out_ptr,
    n, C, NCB, count, offset,
    T: tl.constexpr, TRIM: tl.constexpr, LAYOUT: tl.constexpr, BLOCK: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, WIDE: tl.constexpr,
):
    """One chunk of up to MAX_TASKS tasks of a weighted sum over more (coef, thr and lim start at
    the chunk's first task; FIRST: the chunk of task 0, whose coef row 0 is base's). WIDE 0: the
    float32 sum, acc = (FIRST ? a_0 * base : acc) + the chunk's terms in task order, the C++
    kernel's float32 sequence. WIDE 1 (after every chunk's WIDE 0): in blocks where the float32 sum
    is NaN / Inf, the float64 sum carried in `wide` the same way; LAST stores the output, those
    elements from the float64 sum (as the C++ kernel recomputes them)."""
    offs, mask, cidx = _ws_program(n, C, NCB, LAYOUT, BLOCK)
    count = count.to(tl.int64)
    w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pos = offs + offset
    fs = (f0, f1, f2, f3, f4, f5, f6, f7)
    if WIDE == 0:
        if FIRST:
            acc = _coeff(coef_ptr, 0, count, cidx, mask, LAYOUT) * w
        else:
            acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
        for t in tl.static_range(T):
            acc = _ws_add(acc, fs[t], offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, t, TRIM, LAYOUT)
        tl.store(acc_ptr + offs, acc, mask=mask)
    else:
        acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
        bad = is_nonfinite(acc)
        if any_set(bad):
            if FIRST:
                wide = _coeff(coef_ptr, 0, count, cidx, mask, LAYOUT).to(tl.float64) * w.to(tl.float64)
            else:
                wide = tl.load(wide_ptr + offs, mask=mask, other=0.0)
            for t in tl.static_range(T):
                a = _coeff(coef_ptr, t + 1, count, cidx, mask, LAYOUT).to(tl.float64)
                wide = wide + a * task_wide(fs[t], offs, mask, w, pos, thr_ptr, lim_ptr, t, TRIM)
            tl.store(wide_ptr + offs, wide, mask=mask)
            acc = tl.where(bad, wide.to(tl.float32), acc)
        if LAST:
            tl.store(out_ptr + offs, to_out(acc, out_ptr.dtype.element_ty), mask=mask)


def _coeff_layout(op: str, coeffs: torch.Tensor, base: torch.Tensor, T: int) -> tuple[int, int]:
    """CoeffLayout of csrc/cpu/weighted_sum.cpp: (layout, count); 0 per tensor, 1 per row, 2 per
    element; count = coefficients per input."""
    if coeffs.dtype != torch.float32:
        fail(op, f"coeffs must be float32, got {dtype_name(coeffs.dtype)}")
    if coeffs.dim() < 1 or coeffs.shape[0] != T + 1:
        fail(op, f"coeffs need a leading dimension of T+1 = {T + 1} (base, then each task), got "
                  f"{shape_of(coeffs)}")
    if coeffs.dim() == 1:
        return 0, 1
    if coeffs.dim() == 2 and base.dim() >= 1 and coeffs.shape[1] == base.shape[0]:
        return 1, base.shape[0]
    if coeffs.shape[1:] != base.shape:
        fail(op, f"coeffs must be [T+1], [T+1, rows] or [T+1, *base.shape]; got {shape_of(coeffs)} "
                  f"for base {shape_of(base)}")
    return 2, base.numel()


def weighted_sum(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    threshold: Optional[torch.Tensor] = None,
    tie_limit: Optional[torch.Tensor] = None,
    offset: int = 0,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """torch.ops.neurokern.weighted_sum: out = a[0] * base + sum_t a[t+1] * trim(tau_t).

    T > MAX_TASKS: in chunks of MAX_TASKS tasks (_weighted_sum_chunks), bitwise the same."""
    op = "weighted_sum"
    check_group(op, base, finetuned)
    T = len(finetuned)
    layout, count = _coeff_layout(op, coeffs, base, T)
    thr, lim = trim_pair(op, threshold, tie_limit, T, base.device)
    check_storage(op, base.dtype)
    coeffs = coeffs.to(base.device).contiguous()
    dtype = out_dtype or base.dtype
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    n = base.numel()
    if n == 0:
        return out
    direct = dtype in DIRECT_OUT_DTYPES
    acc = out if direct else torch.empty(base.shape, dtype=torch.float32, device=base.device)
    C, NCB = 1, 1
    if layout == 1 and n == base.shape[0]:  # rows of one element: per-element indexing
        layout = 2
    if layout == 1:
        C = n // base.shape[0]
        NCB = triton.cdiv(C, common.BLOCK)
        grid = (base.shape[0] * NCB,)
    else:
        grid = grid_1d(n, common.BLOCK)
    if T > MAX_TASKS:
        _weighted_sum_chunks(grid, base, finetuned, coeffs, thr, lim, acc, n, C, NCB, count, offset, layout)
    else:
        _weighted_sum_kernel[grid](
            base, *task_slots(base, finetuned), coeffs,
            thr if thr is not None else base, lim if lim is not None else base, acc,
            n, C, NCB, count, offset,
            T=T, TRIM=thr is not None, LAYOUT=layout, BLOCK=common.BLOCK,
            **common.LAUNCH,
        )
    if not direct:
        out.copy_(acc)
    return out


def _weighted_sum_chunks(grid, base, finetuned, coeffs, thr, lim, out, n, C, NCB, count, offset, layout):
    """weighted_sum over more than MAX_TASKS tasks, a launch per chunk of MAX_TASKS tasks carrying
    the float32 sum between them (float32 [n]), then a launch per chunk carrying the float64 sum of
    the elements whose float32 sum is NaN / Inf (float64 [n]; blocks without one only read the
    float32 sum): the C++ kernel's sums, term for term and in its order, so the output is bitwise
    the single launch's rule. Reads: (T + 1) N E, plus the float64 pass's inputs where it works."""
    T = len(finetuned)
    acc = torch.empty(n, dtype=torch.float32, device=base.device)
    wide = torch.empty(n, dtype=torch.float64, device=base.device)
    rows = coeffs.view(T + 1, -1)
    for wide_pass in (0, 1):
        for t0 in range(0, T, MAX_TASKS):
            t1 = min(T, t0 + MAX_TASKS)
            _weighted_sum_chunk_kernel[grid](
                base, *task_slots(base, finetuned[t0:t1]), rows[t0:],
                thr[t0:t1] if thr is not None else base, lim[t0:t1] if lim is not None else base, acc, wide, out,
                n, C, NCB, count, offset,
                T=t1 - t0, TRIM=thr is not None, LAYOUT=layout, BLOCK=common.BLOCK, FIRST=t0 == 0, LAST=t1 == T,
                WIDE=wide_pass, **common.LAUNCH,
            )


@triton.jit
def _dot_acc(acc, g, f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t: tl.constexpr, TRIM: tl.constexpr):
    x = task_value(f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t, TRIM)
    return acc + g * x.to(tl.float64)


@triton.jit
def _ws_dots(grad_ptr, base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, out_ptr,
             row, R, C, n, offset, T: tl.constexpr, TRIM: tl.constexpr, BLOCK: tl.constexpr,
             FULL: tl.constexpr = False):
    """out[i * R + row] = sum over "row" row (elements [row C, (row + 1) C) of the flat tensor, the
    last one cut at n) of grad * x_i: float64 lane accumulators over its BLOCK-wide chunks, one
    reduction per input at the end. FULL: the caller knows the row is whole (C a multiple of
    BLOCK, inside n), so the loads go unmasked (and vectorize)."""
    cols = tl.arange(0, BLOCK)
    a0 = tl.zeros([BLOCK], dtype=tl.float64)
    a1 = tl.zeros([BLOCK], dtype=tl.float64)
    a2 = tl.zeros([BLOCK], dtype=tl.float64)
    a3 = tl.zeros([BLOCK], dtype=tl.float64)
    a4 = tl.zeros([BLOCK], dtype=tl.float64)
    a5 = tl.zeros([BLOCK], dtype=tl.float64)
    a6 = tl.zeros([BLOCK], dtype=tl.float64)
    a7 = tl.zeros([BLOCK], dtype=tl.float64)
    a8 = tl.zeros([BLOCK], dtype=tl.float64)
    for c0 in range(0, C, BLOCK):
        c = c0 + cols
        offs = row * C + c
        if FULL:
            mask = everywhere(BLOCK)
        else:
            mask = (c < C) & (offs < n)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32).to(tl.float64)
        w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        pos = offs + offset
        a0 += g * w.to(tl.float64)
        if T > 0:
            a1 = _dot_acc(a1, g, f0, offs, mask, w, pos, thr_ptr, lim_ptr, 0, TRIM)
        if T > 1:
            a2 = _dot_acc(a2, g, f1, offs, mask, w, pos, thr_ptr, lim_ptr, 1, TRIM)
        if T > 2:
            a3 = _dot_acc(a3, g, f2, offs, mask, w, pos, thr_ptr, lim_ptr, 2, TRIM)
        if T > 3:
            a4 = _dot_acc(a4, g, f3, offs, mask, w, pos, thr_ptr, lim_ptr, 3, TRIM)
        if T > 4:
            a5 = _dot_acc(a5, g, f4, offs, mask, w, pos, thr_ptr, lim_ptr, 4, TRIM)
        if T > 5:
            a6 = _dot_acc(a6, g, f5, offs, mask, w, pos, thr_ptr, lim_ptr, 5, TRIM)
        if T > 6:
            a7 = _dot_acc(a7, g, f6, offs, mask, w, pos, thr_ptr, lim_ptr, 6, TRIM)
        if T > 7:
            a8 = _dot_acc(a8, g, f7, offs, mask, w, pos, thr_ptr, lim_ptr, 7, TRIM)
    tl.store(out_ptr + row, tl.sum(a0, axis=0).to(out_ptr.dtype.element_ty))
    if T > 0:
        tl.store(out_ptr + R + row, tl.sum(a1, axis=0).to(out_ptr.dtype.element_ty))
    if T > 1:
        tl.store(out_ptr + 2 * R + row, tl.sum(a2, axis=0).to(out_ptr.dtype.element_ty))
    if T > 2:
        tl.store(out_ptr + 3 * R + row, tl.sum(a3, axis=0).to(out_ptr.dtype.element_ty))
    if T > 3:
        tl.store(out_ptr + 4 * R + row, tl.sum(a4, axis=0).to(out_ptr.dtype.element_ty))
    if T > 4:
        tl.store(out_ptr + 5 * R + row, tl.sum(a5, axis=0).to(out_ptr.dtype.element_ty))
    if T > 5:
        tl.store(out_ptr + 6 * R + row, tl.sum(a6, axis=0).to(out_ptr.dtype.element_ty))
    if T > 6:
        tl.store(out_ptr + 7 * R + row, tl.sum(a7, axis=0).to(out_ptr.dtype.element_ty))
    if T > 7:
        tl.store(out_ptr + 8 * R + row, tl.sum(a8, axis=0).to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["offset"])
def _ws_backward_rows_kernel(
    grad_ptr, base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, out_ptr,
    R, C, n, offset,
    T: tl.constexpr, TRIM: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr,
):
    """One program per row (_ws_dots). Per-row coefficients: the rows of base, float32 out. Per
    tensor: chunks of CHUNK elements, float64 out (stage 1 of the two-stage sum). FULL: every row
    is a whole number of BLOCKs inside n (unmasked loads)."""
    _ws_dots(grad_ptr, base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, out_ptr,
             tl.program_id(0).to(tl.int64), R, C, n, offset, T, TRIM, BLOCK, FULL)


@triton.jit
def _prod_store(out_ptr, g, f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t: tl.constexpr,
                TRIM: tl.constexpr):
    x = task_value(f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t, TRIM)
    tl.store(out_ptr + offs, g * x, mask=mask)


@triton.jit(do_not_specialize=["n64", "offset"])
def _ws_backward_element_kernel(
    grad_ptr, base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, out_ptr,
    n, n64, offset,
    T: tl.constexpr, TRIM: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per-element gradient out[i, j] = grad[j] * x_i[j]: the product of two float32 values
    rounded once to float32, which is what the C++ kernel's float64 product rounds to."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    stride = n64.to(tl.int64)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pos = offs + offset
    tl.store(out_ptr + offs, g * w, mask=mask)
    if T > 0:
        _prod_store(out_ptr + stride, g, f0, offs, mask, w, pos, thr_ptr, lim_ptr, 0, TRIM)
    if T > 1:
        _prod_store(out_ptr + 2 * stride, g, f1, offs, mask, w, pos, thr_ptr, lim_ptr, 1, TRIM)
    if T > 2:
        _prod_store(out_ptr + 3 * stride, g, f2, offs, mask, w, pos, thr_ptr, lim_ptr, 2, TRIM)
    if T > 3:
        _prod_store(out_ptr + 4 * stride, g, f3, offs, mask, w, pos, thr_ptr, lim_ptr, 3, TRIM)
    if T > 4:
        _prod_store(out_ptr + 5 * stride, g, f4, offs, mask, w, pos, thr_ptr, lim_ptr, 4, TRIM)
    if T > 5:
        _prod_store(out_ptr + 6 * stride, g, f5, offs, mask, w, pos, thr_ptr, lim_ptr, 5, TRIM)
    if T > 6:
        _prod_store(out_ptr + 7 * stride, g, f6, offs, mask, w, pos, thr_ptr, lim_ptr, 6, TRIM)
    if T > 7:
        _prod_store(out_ptr + 8 * stride, g, f7, offs, mask, w, pos, thr_ptr, lim_ptr, 7, TRIM)


def weighted_sum_backward(
    grad: torch.Tensor,
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    threshold: Optional[torch.Tensor] = None,
    tie_limit: Optional[torch.Tensor] = None,
    offset: int = 0,
) -> torch.Tensor:
    """torch.ops.neurokern.weighted_sum_backward: <grad, x_i> reduced to coeffs' shape (float32).

    Per tensor: two stages (float64 partial per program, then a float64 torch sum); per row: one
    program per row; per element: element-wise products. T > MAX_TASKS: in chunks of MAX_TASKS
    tasks (_weighted_sum_backward_chunks)."""
    op = "weighted_sum_backward"
    check_group(op, base, finetuned)
    if grad.shape != base.shape:
        fail(op, f"grad has shape {shape_of(grad)}, base has {shape_of(base)}")
    T = len(finetuned)
    layout, count = _coeff_layout(op, coeffs, base, T)
    thr, lim = trim_pair(op, threshold, tie_limit, T, base.device)
    check_storage(op, base.dtype)
    if grad.dtype not in DIRECT_OUT_DTYPES:  # the dtypes the kernels read directly
        grad = grad.to(torch.float32)
    grad = grad.to(base.device).contiguous()
    if T > MAX_TASKS:
        return _weighted_sum_backward_chunks(grad, base, finetuned, coeffs, thr, lim, offset)
    n = base.numel()
    dev = base.device
    trim_args = dict(T=T, TRIM=thr is not None)
    thr_p = thr if thr is not None else base
    lim_p = lim if lim is not None else base
    fs = task_slots(base, finetuned)
    if layout == 0:
        if n == 0:
            return torch.zeros(coeffs.shape, dtype=torch.float32, device=dev)
        P = triton.cdiv(n, common.CHUNK)
        block = min(common.RED_BLOCK, common.CHUNK)
        part = torch.empty((T + 1, P), dtype=torch.float64, device=dev)
        _ws_backward_rows_kernel[(P,)](grad, base, *fs, thr_p, lim_p, part, P, common.CHUNK, n, offset,
                                       BLOCK=block, FULL=n % common.CHUNK == 0 and common.CHUNK % block == 0,
                                       **common.LAUNCH, **trim_args)
        return part.sum(1).to(torch.float32)
    if layout == 1 and n and n == base.shape[0]:  # rows of one element: the per-element products
        layout = 2
    if layout == 1:
        R = base.shape[0]
        C = n // R if R else 0
        if R == 0 or C == 0:
            return torch.zeros(coeffs.shape, dtype=torch.float32, device=dev)
        out = torch.empty((T + 1, R), dtype=torch.float32, device=dev)
        block = min(common.RED_BLOCK, triton.next_power_of_2(C))
        _ws_backward_rows_kernel[(R,)](grad, base, *fs, thr_p, lim_p, out, R, C, n, offset,
                                       BLOCK=block, FULL=C % block == 0, **common.LAUNCH, **trim_args)
        return out.view(coeffs.shape)
    out = torch.empty(coeffs.shape, dtype=torch.float32, device=dev)
    if n == 0:
        return out
    _ws_backward_element_kernel[grid_1d(n, common.BLOCK)](grad, base, *fs, thr_p, lim_p, out, n, n, offset,
                                                    BLOCK=common.BLOCK, **common.LAUNCH, **trim_args)
    return out


def _weighted_sum_backward_chunks(grad, base, finetuned, coeffs, thr, lim, offset):
    """weighted_sum_backward over more than MAX_TASKS tasks: each task's reduction stands on its
    own, so each chunk of MAX_TASKS tasks is one call of the launcher (its row 0, <grad, base>,
    taken from the first chunk) and the rows are those a single launch would give."""
    T = len(finetuned)
    per = coeffs[0].numel()
    rows = coeffs.reshape(T + 1, per)
    out = torch.empty((T + 1, per), dtype=torch.float32, device=base.device)
    for t0 in range(0, T, MAX_TASKS):
        t1 = min(T, t0 + MAX_TASKS)
        chunk_coeffs = torch.cat([rows[:1], rows[t0 + 1:t1 + 1]]).view(t1 - t0 + 1, *coeffs.shape[1:])
        part = weighted_sum_backward(grad, base, finetuned[t0:t1], chunk_coeffs,
                                     thr[t0:t1] if thr is not None else None, lim[t0:t1] if lim is not None else None,
                                     offset).reshape(t1 - t0 + 1, per)
        if t0 == 0:
            out[0] = part[0]
        out[t0 + 1:t1 + 1] = part[1:]
    return out.view(coeffs.shape)


@triton.jit(do_not_specialize=["nt"],
            do_not_specialize_on_alignment=["coef_ptr", "thr_ptr", "lim_ptr", "flag_ptr", "like_in", "like_out"])
def _ws_multi_kernel(
    table, owner, coef_ptr, thr_ptr, lim_ptr, flag_ptr, like_in, like_out, nt,
    T: tl.constexpr, TRIM: tl.constexpr, TRIM_ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr, CHECK: tl.constexpr,
):
    """CHECK: flag_ptr[i] = 1 for the list position i (table row 5 + T) of a tensor whose output
    holds a NaN or Inf (x * 0 is NaN exactly where x is not finite)."""
    pid, j, local, n, offset = program_tensor(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = table_inputs(table, nt, j, like_in, T, ALIGNED)
    out_ptr = table_ptr(table, 4, nt, j, like_out, ALIGNED)
    thr_ptr, lim_ptr = trim_row(thr_ptr, lim_ptr, j, T, TRIM_ROWS)
    coef_ptr += j * (T + 1)
    offs = local * BLOCK + tl.arange(0, BLOCK)
    if (local + 1) * BLOCK <= n:  # a whole block: unmasked
        out = _ws_block(b, f0, f1, f2, f3, f4, f5, f6, f7, coef_ptr, thr_ptr, lim_ptr, out_ptr,
                           offs, everywhere(BLOCK), 0, 1, offset, T, TRIM, 0)
    else:
        out = _ws_block(b, f0, f1, f2, f3, f4, f5, f6, f7, coef_ptr, thr_ptr, lim_ptr, out_ptr,
                           offs, offs < n, 0, 1, offset, T, TRIM, 0)
    if CHECK:
        x = out.to(tl.float32)
        if tl.max((x * 0.0 != 0.0).to(tl.int32), axis=0) != 0:
            tl.store(flag_ptr + tl.load(table + (5 + T) * nt + j), 1)


@triton.jit(do_not_specialize=["nt", "count"],
            do_not_specialize_on_alignment=["coef_ptr", "thr_ptr", "lim_ptr", "like_in", "like_out"])
def _ws_rows_multi_kernel(
    table, owner, coef_ptr, thr_ptr, lim_ptr, like_in, like_out, nt, count,
    T: tl.constexpr, TRIM: tl.constexpr, TRIM_ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr, C16: tl.constexpr,
):
    """Per-row coefficients: program (row, block of BLOCK columns) of tensor j, as the single-tensor
    per-row kernel's. Table rows 5 + T, 6 + T: the row length C and the first row s_j of tensor j,
    whose coefficients are coeffs[:, s_j + row] of coeffs [T+1, count]. C16: every C is a multiple
    of 16 (whole rows start 16-element aligned, so unmasked blocks vectorize)."""
    pid, j, local, n, offset = program_tensor(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = table_inputs(table, nt, j, like_in, T, ALIGNED)
    out_ptr = table_ptr(table, 4, nt, j, like_out, ALIGNED)
    thr_ptr, lim_ptr = trim_row(thr_ptr, lim_ptr, j, T, TRIM_ROWS)
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
        _ws_block(b, f0, f1, f2, f3, f4, f5, f6, f7, coef_ptr, thr_ptr, lim_ptr, out_ptr,
                     offs, everywhere(BLOCK), row, count, offset, T, TRIM, 1)
    else:
        _ws_block(b, f0, f1, f2, f3, f4, f5, f6, f7, coef_ptr, thr_ptr, lim_ptr, out_ptr,
                     offs, cols < C, row, count, offset, T, TRIM, 1)


@triton.jit(do_not_specialize=["nt", "P"],
            do_not_specialize_on_alignment=["thr_ptr", "lim_ptr", "part_ptr", "like_in", "like_grad"])
def _ws_multi_backward_kernel(
    table, owner, grad_table, thr_ptr, lim_ptr, part_ptr, like_in, like_grad, nt, P,
    T: tl.constexpr, TRIM: tl.constexpr, TRIM_ROWS: tl.constexpr, BLOCK: tl.constexpr,
    CHUNK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """part[i, pid] = <grad, x_i> over chunk `local` (CHUNK elements) of tensor j, float64."""
    pid, j, local, n, offset = program_tensor(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = table_inputs(table, nt, j, like_in, T, ALIGNED)
    grad_ptr = table_ptr(grad_table, 0, nt, j, like_grad, ALIGNED)
    thr_ptr, lim_ptr = trim_row(thr_ptr, lim_ptr, j, T, TRIM_ROWS)
    part_ptr += pid - local
    if (local + 1) * CHUNK <= n:  # a whole chunk: unmasked
        _ws_dots(grad_ptr, b, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, part_ptr,
                    local, P, CHUNK, n, offset, T, TRIM, BLOCK, True)
    else:
        _ws_dots(grad_ptr, b, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, part_ptr,
                    local, P, CHUNK, n, offset, T, TRIM, BLOCK, False)


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
        T=T, TRIM=threshold is not None, TRIM_ROWS=trim_rows, BLOCK=common.BLOCK, ALIGNED=aligned,
        CHECK=nonfinite is not None, **common.LAUNCH,
    )


def weighted_sum_rows_multi(base, finetuned, coeffs, threshold=None, tie_limit=None, offsets=(), out_dtype=None):
    """torch.ops.neurokern.weighted_sum_rows_multi: one launch per storage dtype of the list."""
    op = "weighted_sum_rows_multi"
    n, T = len(base), tasks(base, finetuned)
    fused = T <= MAX_TASKS and (out_dtype or torch.float32) in DIRECT_OUT_DTYPES
    outs, _, launches, total = prepare(op, base, finetuned, common.BLOCK if fused else 0, "row_blocks", fused,
                                       out_dtype, offsets)
    if coeffs.dtype != torch.float32 or tuple(coeffs.shape) != (T + 1, total):
        fail(op, f"coeffs must be float32 [T+1, sum of rows] = [{T + 1}, {total}] (tensor i's rows at "
                     f"its first row in list order), got {dtype_name(coeffs.dtype)} {shape_of(coeffs)}")
    device = base[0].device
    thr, lim, trim_rows = list_trims(op, threshold, tie_limit, n, T, device)
    coeffs = coeffs.to(device).contiguous()
    if not fused:
        firsts = list(itertools.accumulate((b.shape[0] for b in base), initial=0))
        return [weighted_sum(base[i], column, coeffs[:, firsts[i]:firsts[i + 1]], *trim_of(thr, lim, trim_rows, i),
                                offset_of(offsets, i), out_dtype) for i, column in enumerate(columns(finetuned, n))]
    for g in launches:
        sub_thr, sub_lim = g.trims(thr, lim, trim_rows, n)
        first = base[g.first]
        _ws_rows_multi_kernel[(g.programs,)](
            g.table, g.owner, coeffs, sub_thr if thr is not None else first, sub_lim if lim is not None else first,
            first, outs[g.first], g.nt, total,
            T=T, TRIM=thr is not None, TRIM_ROWS=trim_rows, BLOCK=common.BLOCK, ALIGNED=g.aligned, C16=g.c16,
            **common.LAUNCH,
        )
    return outs


def weighted_sum_multi_backward(grad, base, finetuned, coeffs, threshold=None, tie_limit=None, offsets=()):
    """torch.ops.neurokern.weighted_sum_multi_backward: per storage dtype (of base and of grad), one
    launch of float64 partial sums over CHUNK-element chunks and one launch summing each tensor's
    partials."""
    op = "weighted_sum_multi_backward"
    n, T = len(base), tasks(base, finetuned)
    chunk = common.CHUNK if T <= MAX_TASKS else 0
    _, grad, launches, _ = prepare(op, base, finetuned, chunk, offsets=offsets, grad=grad)
    if tuple(coeffs.shape) != (n, T + 1):
        fail(op, f"coeffs must be [n, T+1] = [{n}, {T + 1}], got {shape_of(coeffs)}")
    device = base[0].device
    thr, lim, rows = list_trims(op, threshold, tie_limit, n, T, device)
    out = torch.zeros((n, T + 1), dtype=torch.float32, device=device)
    if not chunk:
        for i, column in enumerate(columns(finetuned, n)):
            out[i] = weighted_sum_backward(grad[i], base[i], column, coeffs[i], *trim_of(thr, lim, rows, i),
                                              offset_of(offsets, i))
        return out
    for g in launches:
        part = torch.empty((T + 1, g.programs), dtype=torch.float64, device=device)
        sub_thr, sub_lim = g.trims(thr, lim, rows, n)
        first = base[g.first]
        _ws_multi_backward_kernel[(g.programs,)](
            g.table, g.owner, g.table[(FT_ROW + T):], sub_thr if thr is not None else first,
            sub_lim if lim is not None else first, part, first, grad[g.first], g.nt, g.programs,
            T=T, TRIM=thr is not None, TRIM_ROWS=rows, BLOCK=min(common.RED_BLOCK, chunk), CHUNK=chunk,
            ALIGNED=g.aligned, **common.LAUNCH,
        )
        sums = torch.empty((g.nt, T + 1), dtype=torch.float32, device=device)
        segment_sum_kernel[(g.nt,)](part, g.table, sums, g.nt, g.programs, W=T + 1,
                                     BW=triton.next_power_of_2(T + 1), ROWS=64, num_warps=4)
        out.index_copy_(0, g.table[-2], sums)
    return out


registry.register("weighted_sum", weighted_sum)
registry.register("weighted_sum_backward", weighted_sum_backward)
torch.library.impl("neurokern::_ws_multi_launch", ("CUDA", "CPU"), _ws_multi_launch)
torch.ops.neurokern._triton_list_config(common.BLOCK, MAX_TASKS)
registry.register("weighted_sum_multi_backward", weighted_sum_multi_backward)
registry.register("weighted_sum_rows_multi", weighted_sum_rows_multi)
