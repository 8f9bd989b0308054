"""Histograms of |tau| keys over a list of tensors, for the streaming engine's exact global trims
(neurokern/engine/thresholds.py): launches only, no host sync.

The key of an entry is the int32 bit pattern of |float32(finetuned[t]) - float32(base)| (non-
negative, so the bits order it; thresholds.magnitude_bits). Two modes add into an int64 [T, BINS]
histogram on the device:
- high (hi_bin None): every entry of task t counts in bin key >> 16 (BINS = HI_BINS = 1 << 15);
- low (hi_bin int [T] on the device): only entries with key >> 16 == hi_bin[t] count, in bin
  key & 0xFFFF (BINS = LO_BINS = 1 << 16); hi_bin[t] < 0 skips task t (its tensors are not read).
  `counts` (int64 [n, T]) optionally receives how many such entries each (tensor, task) holds.
boundary_values then gathers those entries' low 16 bits per (tensor, task), for the exact-k tie
path.

A launch covers the tensors of one storage dtype and up to MAX_TASKS tasks (more tasks: one launch
per chunk of MAX_TASKS), with the launch table of multi.py (multi._table, plus each tensor's
position in the list): a program reads BLOCK entries of one tensor from base and each fine-tuned
tensor (base once), full blocks without a mask and with the 16-byte alignment hint where every
address is aligned, and adds one per entry into its bin with a relaxed atomic (int64: no count can
overflow). The counts and the gather take one atomic per program and task.
"""
import itertools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from neurokern.ops.triton import elementwise as ew
from neurokern.ops.triton import multi

HI_BINS = 1 << 15
LO_BINS = 1 << 16


@triton.jit
def _load(p, offs, mask):
    return tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _task_keys(f_ptr, w, offs, mask, hist_ptr, hi_ptr, cnt_ptr, val_ptr, pair,
               t: tl.constexpr, BINS: tl.constexpr, LOW: tl.constexpr, COUNT: tl.constexpr,
               GATHER: tl.constexpr):
    """Adds task t's entries of one block: into hist row t, or (LOW) those of bin hi[t] by their
    low bits; COUNT: their number into cnt[pair + t]; GATHER: their low bits into val at
    cnt[pair + t] (a cursor, advanced by their number) instead of the histogram."""
    if LOW:
        hi = tl.load(hi_ptr + t)
        if hi >= 0:
            key = tl.abs(_load(f_ptr, offs, mask) - w).to(tl.int32, bitcast=True)
            sel = mask & ((key >> 16) == hi)
            if GATHER:
                c = tl.sum(sel.to(tl.int32), axis=0)
                if c > 0:
                    at = tl.atomic_add(cnt_ptr + pair + t, c.to(tl.int64), sem="relaxed")
                    rank = tl.cumsum(sel.to(tl.int32), axis=0) - 1
                    tl.store(val_ptr + at + rank, key & 0xFFFF, mask=sel)
            else:
                ones = tl.full(key.shape, 1, tl.int64)
                tl.atomic_add(hist_ptr + t * BINS + (key & 0xFFFF), ones, mask=sel, sem="relaxed")
                if COUNT:
                    c = tl.sum(sel.to(tl.int32), axis=0)
                    if c > 0:
                        tl.atomic_add(cnt_ptr + pair + t, c.to(tl.int64), sem="relaxed")
    else:
        key = tl.abs(_load(f_ptr, offs, mask) - w).to(tl.int32, bitcast=True)
        ones = tl.full(key.shape, 1, tl.int64)
        tl.atomic_add(hist_ptr + t * BINS + (key >> 16), ones, mask=mask, sem="relaxed")


@triton.jit
def _block(b, f0, f1, f2, f3, f4, f5, f6, f7, offs, mask, hist_ptr, hi_ptr, cnt_ptr, val_ptr, pair,
           T: tl.constexpr, BINS: tl.constexpr, LOW: tl.constexpr, COUNT: tl.constexpr, GATHER: tl.constexpr):
    w = _load(b, offs, mask)
    if T > 0:
        _task_keys(f0, w, offs, mask, hist_ptr, hi_ptr, cnt_ptr, val_ptr, pair, 0, BINS, LOW, COUNT, GATHER)
    if T > 1:
        _task_keys(f1, w, offs, mask, hist_ptr, hi_ptr, cnt_ptr, val_ptr, pair, 1, BINS, LOW, COUNT, GATHER)
    if T > 2:
        _task_keys(f2, w, offs, mask, hist_ptr, hi_ptr, cnt_ptr, val_ptr, pair, 2, BINS, LOW, COUNT, GATHER)
    if T > 3:
        _task_keys(f3, w, offs, mask, hist_ptr, hi_ptr, cnt_ptr, val_ptr, pair, 3, BINS, LOW, COUNT, GATHER)
    if T > 4:
        _task_keys(f4, w, offs, mask, hist_ptr, hi_ptr, cnt_ptr, val_ptr, pair, 4, BINS, LOW, COUNT, GATHER)
    if T > 5:
        _task_keys(f5, w, offs, mask, hist_ptr, hi_ptr, cnt_ptr, val_ptr, pair, 5, BINS, LOW, COUNT, GATHER)
    if T > 6:
        _task_keys(f6, w, offs, mask, hist_ptr, hi_ptr, cnt_ptr, val_ptr, pair, 6, BINS, LOW, COUNT, GATHER)
    if T > 7:
        _task_keys(f7, w, offs, mask, hist_ptr, hi_ptr, cnt_ptr, val_ptr, pair, 7, BINS, LOW, COUNT, GATHER)


@triton.jit
def _key_histogram_kernel(
    table, owner, hist_ptr, hi_ptr, cnt_ptr, val_ptr, like, nt, stride,
    T: tl.constexpr, BINS: tl.constexpr, LOW: tl.constexpr, COUNT: tl.constexpr, GATHER: tl.constexpr,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """One block of tensor j for tasks 0 .. T-1; table row 5 + T: j's position i in the list, whose
    counts / cursors are cnt[i * stride + t]."""
    pid, j, local, n, _ = multi._where(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = multi._inputs(table, nt, j, like, T, ALIGNED)
    pair = tl.load(table + (5 + T) * nt + j) * stride
    offs = local * BLOCK + tl.arange(0, BLOCK)
    if (local + 1) * BLOCK <= n:  # a whole block: unmasked
        _block(b, f0, f1, f2, f3, f4, f5, f6, f7, offs, ew._everywhere(BLOCK), hist_ptr, hi_ptr, cnt_ptr, val_ptr,
               pair, T, BINS, LOW, COUNT, GATHER)
    else:
        _block(b, f0, f1, f2, f3, f4, f5, f6, f7, offs, offs < n, hist_ptr, hi_ptr, cnt_ptr, val_ptr,
               pair, T, BINS, LOW, COUNT, GATHER)


def _launches(base, columns, keep=None):
    """[(t0, t1, idx, table, owner, programs, aligned)]: one launch per storage dtype and chunk of
    MAX_TASKS tasks (t0 .. t1 - 1), over the tensors idx that `keep` allows (all by default)."""
    n, T = len(base), len(columns[0])
    out = []
    for t0 in range(0, T, ew.MAX_TASKS):
        t1 = min(T, t0 + ew.MAX_TASKS)
        chunk = [column[t0:t1] for column in columns]
        for idx in multi._by_dtype(base):
            idx = [i for i in idx if keep is None or keep(i)]
            if not idx:
                continue
            table, owner, programs, aligned = multi._table(idx, base, chunk, base, [0] * n,
                                                           multi.blocks(idx, base, ew.BLOCK), base[0].device,
                                                           values=[idx])
            if programs:
                out.append((t0, t1, idx, table, owner, programs, aligned))
    return out


def key_histogram(base: Sequence[torch.Tensor], finetuned: Sequence[torch.Tensor], hist: torch.Tensor,
                  hi_bin: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None) -> None:
    """Adds the |tau| keys of a list (base [n], finetuned task-major: finetuned[t * n + i]) into
    hist, int64 [T, HI_BINS] (hi_bin None: high mode) or [T, LO_BINS] (low mode, hi_bin int [T]
    on the device); low mode also adds each (tensor, task)'s entry count into counts (int64 [n, T])
    when given. Contiguous tensors of one device; no host sync."""
    op = "key_histogram"
    low = hi_bin is not None
    T, columns = multi._columns(op, base, finetuned)
    bins = LO_BINS if low else HI_BINS
    if hist.dtype != torch.int64 or tuple(hist.shape) != (T, bins) or not hist.is_contiguous():
        ew._fail(op, f"hist must be contiguous int64 [{T}, {bins}], got {ew._name(hist.dtype)} {ew._shape(hist)}")
    if counts is not None and (not low or counts.dtype != torch.int64 or tuple(counts.shape) != (len(base), T)
                               or not counts.is_contiguous()):
        ew._fail(op, f"counts (low mode only) must be contiguous int64 [{len(base)}, {T}]")
    flat = counts.view(-1) if counts is not None else hist
    for t0, t1, idx, table, owner, programs, aligned in _launches(base, columns):
        _key_histogram_kernel[(programs,)](
            table, owner, hist[t0:t1], hi_bin[t0:t1] if low else hist, flat[t0:], hist, base[idx[0]], len(idx), T,
            T=t1 - t0, BINS=bins, LOW=low, COUNT=counts is not None, GATHER=False, BLOCK=ew.BLOCK,
            ALIGNED=aligned, **ew.LAUNCH,
        )


def boundary_values(base: Sequence[torch.Tensor], finetuned: Sequence[torch.Tensor], hi_bin: torch.Tensor,
                    counts: Sequence[int]) -> torch.Tensor:
    """int32 [sum(counts)] on the device: the low 16 bits (key & 0xFFFF) of the entries that low
    mode counts, (tensor, task) after (tensor, task) in the order of counts (key_histogram's counts,
    flat: counts[i * T + t]); in any order inside one (tensor, task). Tensors without entries are
    not read."""
    T, columns = multi._columns("boundary_values", base, finetuned)
    starts = list(itertools.accumulate(counts, initial=0))
    values = torch.empty(starts[-1], dtype=torch.int32, device=base[0].device)
    launches = _launches(base, columns, keep=lambda i: any(counts[i * T:(i + 1) * T]))
    if not launches:
        return values
    cursor = ew.upload(starts[:-1], torch.int64, base[0].device)
    for t0, t1, idx, table, owner, programs, aligned in launches:
        _key_histogram_kernel[(programs,)](
            table, owner, values, hi_bin[t0:t1], cursor[t0:], values, base[idx[0]], len(idx), T,
            T=t1 - t0, BINS=LO_BINS, LOW=True, COUNT=False, GATHER=True, BLOCK=ew.BLOCK,
            ALIGNED=aligned, **ew.LAUNCH,
        )
    return values
