"""Triton kernels of neurokern::key_histogram and neurokern::boundary_values (schemas and CPU
kernels: neurokern/ops/key_histogram.py), the |tau| key histograms of the streaming engine's exact
global trims (neurokern/methods/global_trim.py): launches only, no host sync.

The key of an entry is the int32 bit pattern of |float32(finetuned[t]) - float32(base)| (non-
negative, so the bits order it; neurokern.ops.magnitude_bits). Two modes add into an int64 [T, BINS]
histogram on the device:
- high (hi_bin None): every entry of task t counts in bin key >> 16 (BINS = HI_BINS = 1 << 15);
- low (hi_bin int [T] on the device): only entries with key >> 16 == hi_bin[t] count, in bin
  key & 0xFFFF (BINS = LO_BINS = 1 << 16); hi_bin[t] < 0 skips task t (its tensors are not read).
  `counts` (int64 [n, T]) optionally receives how many such entries each (tensor, task) holds.
boundary_values then gathers those entries' low 16 bits per (tensor, task), for the exact-k tie
path.

A launch covers the tensors of one storage dtype and up to MAX_TASKS tasks (more tasks: one launch
per chunk of MAX_TASKS), with the launch table and owner array of prepare (one C++ call per
chunk, neurokern::_launch_table; its row 5 + T holds each tensor's position in the list prepared):
a program reads BLOCK entries of one tensor from base and each fine-tuned tensor (base once), full
blocks without a mask and with the 16-byte alignment hint where every address is aligned, and adds
one per entry into its bin with a relaxed atomic (int64: no count can overflow). The counts and the
gather take one atomic per program and task. boundary_values prepares the sub-list of the tensors
with entries, and uploads their cursors in sub-list order.
"""
import itertools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from neurokern.ops.key_histogram import HI_BINS, LO_BINS
from neurokern.ops.triton import common, registry
from neurokern.ops.triton.common import MAX_TASKS, dtype_name, everywhere, fail, shape_of, upload
from neurokern.ops.triton.lists import prepare, program_tensor, table_inputs, tasks



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
    for t in tl.static_range(T):
        _task_keys((f0, f1, f2, f3, f4, f5, f6, f7)[t], w, offs, mask, hist_ptr, hi_ptr, cnt_ptr, val_ptr, pair,
                   t, BINS, LOW, COUNT, GATHER)


@triton.jit(do_not_specialize=["nt"],
            do_not_specialize_on_alignment=["hist_ptr", "hi_ptr", "cnt_ptr", "val_ptr", "like"])
def _key_histogram_kernel(
    table, owner, hist_ptr, hi_ptr, cnt_ptr, val_ptr, like, nt, stride,
    T: tl.constexpr, BINS: tl.constexpr, LOW: tl.constexpr, COUNT: tl.constexpr, GATHER: tl.constexpr,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """One block of tensor j for tasks 0 .. T-1; table row 5 + T: j's position i in the list
    prepared (boundary_values: its sub-list), whose counts / cursors are cnt[i * stride + t]."""
    pid, j, local, n, _ = program_tensor(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = table_inputs(table, nt, j, like, T, ALIGNED)
    pair = tl.load(table + (5 + T) * nt + j) * stride
    offs = local * BLOCK + tl.arange(0, BLOCK)
    if (local + 1) * BLOCK <= n:  # a whole block: unmasked
        _block(b, f0, f1, f2, f3, f4, f5, f6, f7, offs, everywhere(BLOCK), hist_ptr, hi_ptr, cnt_ptr, val_ptr,
               pair, T, BINS, LOW, COUNT, GATHER)
    else:
        _block(b, f0, f1, f2, f3, f4, f5, f6, f7, offs, offs < n, hist_ptr, hi_ptr, cnt_ptr, val_ptr,
               pair, T, BINS, LOW, COUNT, GATHER)


def _launches(op: str, base: Sequence[torch.Tensor], finetuned: Sequence[torch.Tensor], T: int,
              checked: bool = False):
    """[(t0, t1, launch)]: prepare's launches (one per storage dtype with entries) for each
    chunk of MAX_TASKS tasks (t0 .. t1 - 1) of the list base [n], finetuned task-major, checked
    (checked: already)."""
    n = len(base)
    if not checked and not 0 < T <= MAX_TASKS:  # at once: a chunk of tasks would number its tasks from 0
        prepare(op, base, finetuned)
    out = []
    for t0 in range(0, T, MAX_TASKS):
        t1 = min(T, t0 + MAX_TASKS)
        chunk = finetuned if T <= MAX_TASKS else finetuned[t0 * n:t1 * n]
        out += [(t0, t1, g) for g in prepare(op, base, chunk, common.BLOCK)[2]]
    return out


def key_histogram(base: Sequence[torch.Tensor], finetuned: Sequence[torch.Tensor], hist: torch.Tensor,
                  hi_bin: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None) -> None:
    """Adds the |tau| keys of a list (base [n], finetuned task-major: finetuned[t * n + i]) into
    hist, int64 [T, HI_BINS] (hi_bin None: high mode) or [T, LO_BINS] (low mode, hi_bin int [T]
    on the device); low mode also adds each (tensor, task)'s entry count into counts (int64 [n, T])
    when given. Contiguous tensors of one device; no host sync."""
    op = "key_histogram"
    low = hi_bin is not None
    T = tasks(base, finetuned)
    launches = _launches(op, base, finetuned, T)
    bins = LO_BINS if low else HI_BINS
    if hist.dtype != torch.int64 or tuple(hist.shape) != (T, bins) or not hist.is_contiguous():
        fail(op, f"hist must be contiguous int64 [{T}, {bins}], got {dtype_name(hist.dtype)} {shape_of(hist)}")
    if counts is not None and (not low or counts.dtype != torch.int64 or tuple(counts.shape) != (len(base), T)
                               or not counts.is_contiguous()):
        fail(op, f"counts (low mode only) must be contiguous int64 [{len(base)}, {T}]")
    flat = counts.view(-1) if counts is not None else hist
    for t0, t1, g in launches:
        _key_histogram_kernel[(g.programs,)](
            g.table, g.owner, hist[t0:t1], hi_bin[t0:t1] if low else hist, flat[t0:], hist, base[g.first], g.nt, T,
            T=t1 - t0, BINS=bins, LOW=low, COUNT=counts is not None, GATHER=False, BLOCK=common.BLOCK,
            ALIGNED=g.aligned, **common.LAUNCH,
        )


def boundary_values(base: Sequence[torch.Tensor], finetuned: Sequence[torch.Tensor], hi_bin: torch.Tensor,
                    counts: Sequence[int]) -> torch.Tensor:
    """int32 [sum(counts)] on the device: the low 16 bits (key & 0xFFFF) of the entries that low
    mode counts, (tensor, task) after (tensor, task) in the order of counts (key_histogram's counts,
    flat: counts[i * T + t]); in any order inside one (tensor, task). Tensors without entries are
    not read."""
    op = "boundary_values"
    n, T = len(base), tasks(base, finetuned)
    prepare(op, base, finetuned)  # the whole list's checks (only the sub-list is laid out)
    starts = list(itertools.accumulate(counts, initial=0))
    values = torch.empty(starts[-1], dtype=torch.int32, device=base[0].device)
    keep = [i for i in range(n) if any(counts[i * T:(i + 1) * T])]
    if not keep:
        return values
    sub = [base[i] for i in keep]
    launches = _launches(op, sub, [finetuned[t * n + i] for t in range(T) for i in keep], T, checked=True)
    if not launches:
        return values
    # The sub-list's cursors, in its order: cursor[s * T + t] for its s-th tensor.
    cursor = upload([starts[i * T + t] for i in keep for t in range(T)], torch.int64, base[0].device)
    for t0, t1, g in launches:
        _key_histogram_kernel[(g.programs,)](
            g.table, g.owner, values, hi_bin[t0:t1], cursor[t0:], values, sub[g.first], g.nt, T,
            T=t1 - t0, BINS=LO_BINS, LOW=True, COUNT=False, GATHER=True, BLOCK=common.BLOCK,
            ALIGNED=g.aligned, **common.LAUNCH,
        )
    return values


registry.register("key_histogram", key_histogram)
registry.register("boundary_values", boundary_values)
