"""Triton kernel of neurokern.subspace_split: per row, c_t = <tau_t, w> / |w|^2 (0 where w = 0)
as float32 [R, T], and the orthogonal residuals tau_t - c_t w as T float32 tensors [R, C].

tau_t = float32(theta_t) - float32(w), trimmed per csrc/ops.cpp, as in the C++ op; the dots and
|w|^2 are accumulated in float64 and the residual is formed in float64 (tau - c w with c the
float64 coefficient) and rounded once to float32, as the C++ op does.

Design (same layout as neuron_stats.py: one program per row, NT threads each reading VPT
consecutive columns of every row per step, tasks as separate pointer arguments, code written
out per task):
- grid = (R,) per group of at most 8 tasks (T > 8: one launch per group; each re-reads the
  base row). Two passes over the row:
  1. accumulate <trim(tau_t), w> and |w|^2 in float64 per thread, reduce, c_t = dot_t / q
     (0 where q = 0), store c (float32);
  2. read the row again (from L2: the same program read it moments ago) and store
     float32(trim(tau_t) - c_t w) into each output.
- Bytes moved from DRAM: (T + 1) * R * C * element_size read once, 4 * T * R * C written.

H100, bf16, bytes counted as above (device-to-device copy: 3.02 TB/s): 32000 x 2048:
T = 1: 2.83 TB/s (0.19 ms), T = 2: 2.87, T = 4: 2.68, T = 8: 2.29 (1.43 ms); 5632 x 2048 T = 8:
2.27 TB/s.
"""
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from neurokern.ops.triton import registry
from neurokern.ops.triton.common import (MAX_TASKS, check_matrix_group, interpreter_config, padded, task_trim,
                                        trim_pair, trimmed_tau)


@triton.jit
def coefficient(d, q):
    """c = <tau, w> / |w|^2 in float64; 0 where w = 0 (all of tau is orthogonal)."""
    dot = tl.sum(d, axis=1)
    return tl.where(q > 0.0, dot / tl.where(q > 0.0, q, 1.0), 0.0)


@triton.jit(do_not_specialize=["offset"])
def _subspace_split_kernel(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7,
    o0, o1, o2, o3, o4, o5, o6, o7,
    thr_ptr, lim_ptr, coeff_ptr, coeff_stride, R, C, offset,
    T: tl.constexpr, HAS_TRIM: tl.constexpr, ROWS: tl.constexpr, NT: tl.constexpr, VPT: tl.constexpr,
):
    # Task k (k < T <= 8): reads f<k>, writes o<k>, trim (thr<k>, lim<k>), float64 lanes t<k>,
    # dot accumulator d<k> ([ROWS, NT] float64) and coefficient c<k> (float64).
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    rmask = row < R
    row_off = (row * C)[:, None, None]
    cols = (tl.arange(0, NT)[:, None] * VPT + tl.arange(0, VPT)[None, :])[None, :, :]  # VPT per thread
    zero = tl.zeros([ROWS, NT], dtype=tl.float64)
    q = zero
    thr0, lim0 = task_trim(thr_ptr, lim_ptr, 0, T, HAS_TRIM)
    thr1, lim1 = task_trim(thr_ptr, lim_ptr, 1, T, HAS_TRIM)
    thr2, lim2 = task_trim(thr_ptr, lim_ptr, 2, T, HAS_TRIM)
    thr3, lim3 = task_trim(thr_ptr, lim_ptr, 3, T, HAS_TRIM)
    thr4, lim4 = task_trim(thr_ptr, lim_ptr, 4, T, HAS_TRIM)
    thr5, lim5 = task_trim(thr_ptr, lim_ptr, 5, T, HAS_TRIM)
    thr6, lim6 = task_trim(thr_ptr, lim_ptr, 6, T, HAS_TRIM)
    thr7, lim7 = task_trim(thr_ptr, lim_ptr, 7, T, HAS_TRIM)
    d0, d1, d2, d3, d4, d5, d6, d7 = zero, zero, zero, zero, zero, zero, zero, zero
    # Pass 1: <trim(tau_t), w> and |w|^2.
    for col0 in range(0, C, NT * VPT):
        idx = row_off + col0 + cols
        cmask = (col0 + cols < C) & rmask[:, None, None]
        w32 = tl.load(base_ptr + idx, mask=cmask, other=0.0).to(tl.float32)
        w = w32.to(tl.float64)
        q += tl.sum(w * w, axis=2)
        if T > 0:
            t0 = trimmed_tau(f0, idx, cmask, w32, thr0, lim0, offset, HAS_TRIM)
            d0 += tl.sum(t0 * w, axis=2)
        if T > 1:
            t1 = trimmed_tau(f1, idx, cmask, w32, thr1, lim1, offset, HAS_TRIM)
            d1 += tl.sum(t1 * w, axis=2)
        if T > 2:
            t2 = trimmed_tau(f2, idx, cmask, w32, thr2, lim2, offset, HAS_TRIM)
            d2 += tl.sum(t2 * w, axis=2)
        if T > 3:
            t3 = trimmed_tau(f3, idx, cmask, w32, thr3, lim3, offset, HAS_TRIM)
            d3 += tl.sum(t3 * w, axis=2)
        if T > 4:
            t4 = trimmed_tau(f4, idx, cmask, w32, thr4, lim4, offset, HAS_TRIM)
            d4 += tl.sum(t4 * w, axis=2)
        if T > 5:
            t5 = trimmed_tau(f5, idx, cmask, w32, thr5, lim5, offset, HAS_TRIM)
            d5 += tl.sum(t5 * w, axis=2)
        if T > 6:
            t6 = trimmed_tau(f6, idx, cmask, w32, thr6, lim6, offset, HAS_TRIM)
            d6 += tl.sum(t6 * w, axis=2)
        if T > 7:
            t7 = trimmed_tau(f7, idx, cmask, w32, thr7, lim7, offset, HAS_TRIM)
            d7 += tl.sum(t7 * w, axis=2)
    qs = tl.sum(q, axis=1)
    coeff = coeff_ptr + row * coeff_stride
    c0 = coefficient(d0, qs)
    if T > 0:
        tl.store(coeff + 0, c0.to(tl.float32), mask=rmask)
    c0 = c0[:, None, None]
    c1 = coefficient(d1, qs)
    if T > 1:
        tl.store(coeff + 1, c1.to(tl.float32), mask=rmask)
    c1 = c1[:, None, None]
    c2 = coefficient(d2, qs)
    if T > 2:
        tl.store(coeff + 2, c2.to(tl.float32), mask=rmask)
    c2 = c2[:, None, None]
    c3 = coefficient(d3, qs)
    if T > 3:
        tl.store(coeff + 3, c3.to(tl.float32), mask=rmask)
    c3 = c3[:, None, None]
    c4 = coefficient(d4, qs)
    if T > 4:
        tl.store(coeff + 4, c4.to(tl.float32), mask=rmask)
    c4 = c4[:, None, None]
    c5 = coefficient(d5, qs)
    if T > 5:
        tl.store(coeff + 5, c5.to(tl.float32), mask=rmask)
    c5 = c5[:, None, None]
    c6 = coefficient(d6, qs)
    if T > 6:
        tl.store(coeff + 6, c6.to(tl.float32), mask=rmask)
    c6 = c6[:, None, None]
    c7 = coefficient(d7, qs)
    if T > 7:
        tl.store(coeff + 7, c7.to(tl.float32), mask=rmask)
    c7 = c7[:, None, None]
    # Pass 2 (the row is in L2 now): trim(tau_t) - c_t w in float64, rounded once to float32.
    for col0 in range(0, C, NT * VPT):
        idx = row_off + col0 + cols
        cmask = (col0 + cols < C) & rmask[:, None, None]
        w32 = tl.load(base_ptr + idx, mask=cmask, other=0.0).to(tl.float32)
        w = w32.to(tl.float64)
        if T > 0:
            t0 = trimmed_tau(f0, idx, cmask, w32, thr0, lim0, offset, HAS_TRIM)
            tl.store(o0 + idx, (t0 - c0 * w).to(tl.float32), mask=cmask)
        if T > 1:
            t1 = trimmed_tau(f1, idx, cmask, w32, thr1, lim1, offset, HAS_TRIM)
            tl.store(o1 + idx, (t1 - c1 * w).to(tl.float32), mask=cmask)
        if T > 2:
            t2 = trimmed_tau(f2, idx, cmask, w32, thr2, lim2, offset, HAS_TRIM)
            tl.store(o2 + idx, (t2 - c2 * w).to(tl.float32), mask=cmask)
        if T > 3:
            t3 = trimmed_tau(f3, idx, cmask, w32, thr3, lim3, offset, HAS_TRIM)
            tl.store(o3 + idx, (t3 - c3 * w).to(tl.float32), mask=cmask)
        if T > 4:
            t4 = trimmed_tau(f4, idx, cmask, w32, thr4, lim4, offset, HAS_TRIM)
            tl.store(o4 + idx, (t4 - c4 * w).to(tl.float32), mask=cmask)
        if T > 5:
            t5 = trimmed_tau(f5, idx, cmask, w32, thr5, lim5, offset, HAS_TRIM)
            tl.store(o5 + idx, (t5 - c5 * w).to(tl.float32), mask=cmask)
        if T > 6:
            t6 = trimmed_tau(f6, idx, cmask, w32, thr6, lim6, offset, HAS_TRIM)
            tl.store(o6 + idx, (t6 - c6 * w).to(tl.float32), mask=cmask)
        if T > 7:
            t7 = trimmed_tau(f7, idx, cmask, w32, thr7, lim7, offset, HAS_TRIM)
            tl.store(o7 + idx, (t7 - c7 * w).to(tl.float32), mask=cmask)



def _config(R: int, C: int, element_size: int) -> dict:
    """One row per program, 4 warps, two 16-byte vectors per thread and row per step (H100,
    32000 x 2048 and 5632 x 2048 bf16, T = 1..8: 2.3 to 2.9 TB/s)."""
    return interpreter_config(R, C) or dict(ROWS=1, NT=128, VPT=32 // element_size, num_warps=4)


def subspace_split(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    threshold: Optional[torch.Tensor] = None,
    tie_limit: Optional[torch.Tensor] = None,
    offset: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """torch.ops.neurokern.subspace_split for CUDA tensors (and CPU tensors under TRITON_INTERPRET)."""
    base, fts = check_matrix_group("subspace_split", base, finetuned)
    T = len(fts)
    R, C = base.shape
    thr, lim = trim_pair("subspace_split", threshold, tie_limit, T, base.device)
    coeff = torch.empty((R, T), dtype=torch.float32, device=base.device)
    orth = [torch.empty((R, C), dtype=torch.float32, device=base.device) for _ in range(T)]
    if R == 0 or T == 0:
        return coeff, orth
    return launch_subspace_split(base, fts, thr, lim, offset, coeff, orth)


def launch_subspace_split(base, fts, thr, lim, offset, coeff, orth, config=None):
    R, C = base.shape
    T = len(fts)
    cfg = dict(config or _config(R, C, base.element_size()))
    has_trim = thr is not None
    for t0 in range(0, T, MAX_TASKS):  # groups of at most 8 tasks, each one launch
        t1 = min(T, t0 + MAX_TASKS)
        _subspace_split_kernel[(triton.cdiv(R, cfg["ROWS"]),)](
            base, *padded(fts[t0:t1], base), *padded(orth[t0:t1], orth[t0]),
            thr[t0:] if has_trim else base, lim[t0:] if has_trim else base, coeff[:, t0:], T, R, C, offset,
            T=t1 - t0, HAS_TRIM=has_trim, **cfg,
        )
    return coeff, orth


registry.register("subspace_split", subspace_split)
