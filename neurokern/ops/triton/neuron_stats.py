"""Triton kernel of neurokern.neuron_stats: per-row Gram, dots and |w|^2 in one streaming pass.

For each row k of a 2-D base (a neuron w) and its T fine-tuned rows, with trim(tau_t) the trimmed
task vector (csrc/ops.cpp):

    gram[k, s, t] = <trim(tau_s), trim(tau_t)>,  dots[k, t] = <trim(tau_t), w>,  sqnorm[k] = |w|^2

all float64 and accumulated in float64, as the C++ op does: tau_t = float32(theta_t) -
float32(w) is formed in float32 (the trim compares float32 magnitudes), converted to float64,
and every product of two float32 values is exact in float64, so the kernel differs from the
C++ op and the reference only in the order of the float64 sums. float32 accumulation is not an
option: the residual Gram g - d d^T / q that NeuroMerging eigen-decomposes cancels badly for task
vectors nearly parallel to the neuron.

Design (bandwidth first: each input element is read exactly once):
- grid = (R,): one program per row (ROWS = 1 on a GPU), looping over the C columns in steps of
  NT * VPT: each of the NT threads reads one 16-byte vector (VPT = 8 bf16/f16, 4 f32) of the base
  row and of each fine-tuned row per step.
- The T <= 8 fine-tuned tensors are separate pointer arguments (unused ones repeat base and are
  never read; T is a constexpr). The kernel body is written out per task k (lanes t<k>) and per
  pair s <= k (accumulators g<s><k>): every product is an in-thread float64 multiply-add on
  values already in registers, T (T + 1) / 2 + T + 1 per column, no cross-thread traffic until
  the final per-row reductions. (A [T, T, BLOCK] broadcast formulation measured 2-5x slower: it
  shuffles the tiles between threads every step.)
- Bytes moved: (T + 1) * R * C * element_size read, 8 * R * (T^2 + T + 1) written.

H100, 32000 x 2048 bf16 (device-to-device copy: 3.02 TB/s): T = 1: 2.66 TB/s (0.10 ms),
T = 2: 2.76, T = 4: 2.71, T = 5: 2.67, T = 8: 2.25 TB/s (0.53 ms); float32 T = 8: 2.80 TB/s;
2048 x 5632 bf16 T = 8: 2.03 TB/s. With a trim (one compare-select per element) T = 8: 1.49
TB/s (bf16), 2.41 (f32); T <= 2 unchanged.

T <= MAX_TASKS (8) runs the kernel once; larger T runs it once per pair of groups of 4 tasks
(_task_pairs), each launch filling its blocks of the Gram matrices.

neuron_stats_multi runs the same body over a list of 2-D tensors, one launch per storage dtype: the
launch table of lists.py (plus each tensor's rows, row length and first output row) gives every
program its tensor, and the program works on ROWS rows of it. On a GPU the launch configuration
depends only on the dtype and T, so each tensor's rows are bitwise the single-tensor launch's; the
interpreter's configuration (few, wide programs) follows the largest tensor of the list.
"""
import itertools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from neurokern.ops.triton import registry
from neurokern.ops.triton.common import MAX_TASKS, check_matrix_group, interpreter_config, interpreting, padded, task_trim, \
    trim_pair, trimmed_tau
from neurokern.ops.triton.lists import columns, list_trims, offset_of, prepare, program_tensor, table_inputs, tasks, \
    trim_of, trim_row


def _config(R: int, C: int, element_size: int, T: int) -> dict:
    """One row per program; NT threads (num_warps = NT / 32), each reading one 16-byte vector
    (VPT columns) of every row per step. H100, 32000 x 2048 bf16: one warp is fastest from T = 4
    on (fewer threads share the SM's float64 units with more rows in flight), two below."""
    NT = 32 if T >= 4 else 64
    return interpreter_config(R, C) or dict(ROWS=1, NT=NT, VPT=16 // element_size, num_warps=NT // 32)


# ---------------------------------------------------------------------------------------------
# Kernel


@triton.jit
def store_pair(gram, s: tl.constexpr, k: tl.constexpr, T: tl.constexpr, value, rmask):
    tl.store(gram + s * T + k, value, mask=rmask)
    if s != k:
        tl.store(gram + k * T + s, value, mask=rmask)


@triton.jit
def stats_rows(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7,
    thr_ptr, lim_ptr, gram_ptr, dots_ptr, sq_ptr, row, rmask, C, offset,
    T: tl.constexpr, HAS_TRIM: tl.constexpr, ROWS: tl.constexpr, NT: tl.constexpr, VPT: tl.constexpr,
):
    """The statistics of rows `row` (int64 [ROWS], rmask: the rows that exist) of a tensor of C
    columns, stored at gram_ptr / dots_ptr / sq_ptr + their row index (the single- and the
    multi-tensor kernel both run this body, so their results are bitwise the same)."""
    # Task k (k < T <= 8): pointer f<k>, trim (thr<k>, lim<k>), float64 lanes t<k>; the
    # accumulators d<k> (<t_k, w>) and g<s><k> (<t_s, t_k>, s <= k) are [ROWS, NT] float64, one per thread and row.
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
    d0, g00 = zero, zero
    d1, g01, g11 = zero, zero, zero
    d2, g02, g12, g22 = zero, zero, zero, zero
    d3, g03, g13, g23, g33 = zero, zero, zero, zero, zero
    d4, g04, g14, g24, g34, g44 = zero, zero, zero, zero, zero, zero
    d5, g05, g15, g25, g35, g45, g55 = zero, zero, zero, zero, zero, zero, zero
    d6, g06, g16, g26, g36, g46, g56, g66 = zero, zero, zero, zero, zero, zero, zero, zero
    d7, g07, g17, g27, g37, g47, g57, g67, g77 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    for col0 in range(0, C, NT * VPT):
        idx = row_off + col0 + cols
        cmask = (col0 + cols < C) & rmask[:, None, None]
        w32 = tl.load(base_ptr + idx, mask=cmask, other=0.0).to(tl.float32)
        w = w32.to(tl.float64)
        q += tl.sum(w * w, axis=2)
        if T > 0:
            t0 = trimmed_tau(f0, idx, cmask, w32, thr0, lim0, offset, HAS_TRIM)
            d0 += tl.sum(t0 * w, axis=2)
            g00 += tl.sum(t0 * t0, axis=2)
        if T > 1:
            t1 = trimmed_tau(f1, idx, cmask, w32, thr1, lim1, offset, HAS_TRIM)
            d1 += tl.sum(t1 * w, axis=2)
            g01 += tl.sum(t0 * t1, axis=2)
            g11 += tl.sum(t1 * t1, axis=2)
        if T > 2:
            t2 = trimmed_tau(f2, idx, cmask, w32, thr2, lim2, offset, HAS_TRIM)
            d2 += tl.sum(t2 * w, axis=2)
            g02 += tl.sum(t0 * t2, axis=2)
            g12 += tl.sum(t1 * t2, axis=2)
            g22 += tl.sum(t2 * t2, axis=2)
        if T > 3:
            t3 = trimmed_tau(f3, idx, cmask, w32, thr3, lim3, offset, HAS_TRIM)
            d3 += tl.sum(t3 * w, axis=2)
            g03 += tl.sum(t0 * t3, axis=2)
            g13 += tl.sum(t1 * t3, axis=2)
            g23 += tl.sum(t2 * t3, axis=2)
            g33 += tl.sum(t3 * t3, axis=2)
        if T > 4:
            t4 = trimmed_tau(f4, idx, cmask, w32, thr4, lim4, offset, HAS_TRIM)
            d4 += tl.sum(t4 * w, axis=2)
            g04 += tl.sum(t0 * t4, axis=2)
            g14 += tl.sum(t1 * t4, axis=2)
            g24 += tl.sum(t2 * t4, axis=2)
            g34 += tl.sum(t3 * t4, axis=2)
            g44 += tl.sum(t4 * t4, axis=2)
        if T > 5:
            t5 = trimmed_tau(f5, idx, cmask, w32, thr5, lim5, offset, HAS_TRIM)
            d5 += tl.sum(t5 * w, axis=2)
            g05 += tl.sum(t0 * t5, axis=2)
            g15 += tl.sum(t1 * t5, axis=2)
            g25 += tl.sum(t2 * t5, axis=2)
            g35 += tl.sum(t3 * t5, axis=2)
            g45 += tl.sum(t4 * t5, axis=2)
            g55 += tl.sum(t5 * t5, axis=2)
        if T > 6:
            t6 = trimmed_tau(f6, idx, cmask, w32, thr6, lim6, offset, HAS_TRIM)
            d6 += tl.sum(t6 * w, axis=2)
            g06 += tl.sum(t0 * t6, axis=2)
            g16 += tl.sum(t1 * t6, axis=2)
            g26 += tl.sum(t2 * t6, axis=2)
            g36 += tl.sum(t3 * t6, axis=2)
            g46 += tl.sum(t4 * t6, axis=2)
            g56 += tl.sum(t5 * t6, axis=2)
            g66 += tl.sum(t6 * t6, axis=2)
        if T > 7:
            t7 = trimmed_tau(f7, idx, cmask, w32, thr7, lim7, offset, HAS_TRIM)
            d7 += tl.sum(t7 * w, axis=2)
            g07 += tl.sum(t0 * t7, axis=2)
            g17 += tl.sum(t1 * t7, axis=2)
            g27 += tl.sum(t2 * t7, axis=2)
            g37 += tl.sum(t3 * t7, axis=2)
            g47 += tl.sum(t4 * t7, axis=2)
            g57 += tl.sum(t5 * t7, axis=2)
            g67 += tl.sum(t6 * t7, axis=2)
            g77 += tl.sum(t7 * t7, axis=2)
    tl.store(sq_ptr + row, tl.sum(q, axis=1), mask=rmask)
    dots = dots_ptr + row * T
    gram = gram_ptr + row * T * T
    if T > 0:
        tl.store(dots + 0, tl.sum(d0, axis=1), mask=rmask)
        store_pair(gram, 0, 0, T, tl.sum(g00, axis=1), rmask)
    if T > 1:
        tl.store(dots + 1, tl.sum(d1, axis=1), mask=rmask)
        store_pair(gram, 0, 1, T, tl.sum(g01, axis=1), rmask)
        store_pair(gram, 1, 1, T, tl.sum(g11, axis=1), rmask)
    if T > 2:
        tl.store(dots + 2, tl.sum(d2, axis=1), mask=rmask)
        store_pair(gram, 0, 2, T, tl.sum(g02, axis=1), rmask)
        store_pair(gram, 1, 2, T, tl.sum(g12, axis=1), rmask)
        store_pair(gram, 2, 2, T, tl.sum(g22, axis=1), rmask)
    if T > 3:
        tl.store(dots + 3, tl.sum(d3, axis=1), mask=rmask)
        store_pair(gram, 0, 3, T, tl.sum(g03, axis=1), rmask)
        store_pair(gram, 1, 3, T, tl.sum(g13, axis=1), rmask)
        store_pair(gram, 2, 3, T, tl.sum(g23, axis=1), rmask)
        store_pair(gram, 3, 3, T, tl.sum(g33, axis=1), rmask)
    if T > 4:
        tl.store(dots + 4, tl.sum(d4, axis=1), mask=rmask)
        store_pair(gram, 0, 4, T, tl.sum(g04, axis=1), rmask)
        store_pair(gram, 1, 4, T, tl.sum(g14, axis=1), rmask)
        store_pair(gram, 2, 4, T, tl.sum(g24, axis=1), rmask)
        store_pair(gram, 3, 4, T, tl.sum(g34, axis=1), rmask)
        store_pair(gram, 4, 4, T, tl.sum(g44, axis=1), rmask)
    if T > 5:
        tl.store(dots + 5, tl.sum(d5, axis=1), mask=rmask)
        store_pair(gram, 0, 5, T, tl.sum(g05, axis=1), rmask)
        store_pair(gram, 1, 5, T, tl.sum(g15, axis=1), rmask)
        store_pair(gram, 2, 5, T, tl.sum(g25, axis=1), rmask)
        store_pair(gram, 3, 5, T, tl.sum(g35, axis=1), rmask)
        store_pair(gram, 4, 5, T, tl.sum(g45, axis=1), rmask)
        store_pair(gram, 5, 5, T, tl.sum(g55, axis=1), rmask)
    if T > 6:
        tl.store(dots + 6, tl.sum(d6, axis=1), mask=rmask)
        store_pair(gram, 0, 6, T, tl.sum(g06, axis=1), rmask)
        store_pair(gram, 1, 6, T, tl.sum(g16, axis=1), rmask)
        store_pair(gram, 2, 6, T, tl.sum(g26, axis=1), rmask)
        store_pair(gram, 3, 6, T, tl.sum(g36, axis=1), rmask)
        store_pair(gram, 4, 6, T, tl.sum(g46, axis=1), rmask)
        store_pair(gram, 5, 6, T, tl.sum(g56, axis=1), rmask)
        store_pair(gram, 6, 6, T, tl.sum(g66, axis=1), rmask)
    if T > 7:
        tl.store(dots + 7, tl.sum(d7, axis=1), mask=rmask)
        store_pair(gram, 0, 7, T, tl.sum(g07, axis=1), rmask)
        store_pair(gram, 1, 7, T, tl.sum(g17, axis=1), rmask)
        store_pair(gram, 2, 7, T, tl.sum(g27, axis=1), rmask)
        store_pair(gram, 3, 7, T, tl.sum(g37, axis=1), rmask)
        store_pair(gram, 4, 7, T, tl.sum(g47, axis=1), rmask)
        store_pair(gram, 5, 7, T, tl.sum(g57, axis=1), rmask)
        store_pair(gram, 6, 7, T, tl.sum(g67, axis=1), rmask)
        store_pair(gram, 7, 7, T, tl.sum(g77, axis=1), rmask)


@triton.jit(do_not_specialize=["offset"])
def _neuron_stats_kernel(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7,
    thr_ptr, lim_ptr, gram_ptr, dots_ptr, sq_ptr, R, C, offset,
    T: tl.constexpr, HAS_TRIM: tl.constexpr, ROWS: tl.constexpr, NT: tl.constexpr, VPT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    stats_rows(base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, gram_ptr, dots_ptr, sq_ptr,
               row, row < R, C, offset, T, HAS_TRIM, ROWS, NT, VPT)


@triton.jit(do_not_specialize=["nt"],
            do_not_specialize_on_alignment=["thr_ptr", "lim_ptr", "gram_ptr", "dots_ptr", "sq_ptr", "like"])
def _neuron_stats_multi_kernel(
    table, owner, thr_ptr, lim_ptr, gram_ptr, dots_ptr, sq_ptr, like, nt,
    T: tl.constexpr, HAS_TRIM: tl.constexpr, TRIM_ROWS: tl.constexpr, ROWS: tl.constexpr,
    NT: tl.constexpr, VPT: tl.constexpr, ALIGNED: tl.constexpr, C16: tl.constexpr,
):
    """ROWS rows of one tensor of the list (table rows 5 + T .. 7 + T: its rows R, row length C and
    first row in the concatenated outputs). C16: every C is a multiple of 16, as the single-tensor
    kernel's specialization on C would tell the compiler (it lets the loads vectorize)."""
    pid, j, local, numel, offset = program_tensor(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = table_inputs(table, nt, j, like, T, ALIGNED)
    R = tl.load(table + (5 + T) * nt + j)
    C = tl.load(table + (6 + T) * nt + j)
    if C16:
        C = tl.multiple_of(C, 16)
    first = tl.load(table + (7 + T) * nt + j)
    thr_ptr, lim_ptr = trim_row(thr_ptr, lim_ptr, j, T, TRIM_ROWS)
    row = local * ROWS + tl.arange(0, ROWS)
    stats_rows(b, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, gram_ptr + first * (T * T),
               dots_ptr + first * T, sq_ptr + first, row, row < R, C, offset, T, HAS_TRIM, ROWS, NT, VPT)


def launch_neuron_stats(base, fts, thr, lim, offset, gram, dots, sq, config=None):
    """Runs the kernel on T <= MAX_TASKS fine-tuned tensors into the given outputs."""
    R, C = base.shape
    cfg = dict(config or _config(R, C, base.element_size(), len(fts)))
    has_trim = thr is not None
    _neuron_stats_kernel[(triton.cdiv(R, cfg["ROWS"]),)](
        base, *padded(fts, base),
        thr if has_trim else base, lim if has_trim else base, gram, dots, sq, R, C, offset,
        T=len(fts), HAS_TRIM=has_trim, **cfg,
    )


def _task_pairs(base, fts, thr, lim, offset, gram, dots, sq):
    """T > MAX_TASKS: the tasks in groups of MAX_TASKS / 2, one launch per pair of groups (at most
    MAX_TASKS tasks) filling the Gram blocks of the pair (its two diagonal blocks and the block
    between them), the dots of its tasks and |w|^2, on the GPU. Every launch holds more than
    MAX_TASKS / 2 tasks, so all take one launch configuration and an entry is the same float64 sum
    whichever launch computes it; the results differ from the C++ op's only in the order of the
    float64 sums, as for T <= MAX_TASKS. Each task's inputs are read once per other group."""
    T = len(fts)
    half = MAX_TASKS // 2
    groups = [list(range(t0, min(T, t0 + half))) for t0 in range(0, T, half)]
    R = base.shape[0]
    for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
            tasks = groups[a] + groups[b]
            k = len(tasks)
            idx = torch.tensor(tasks, device=base.device)
            g = torch.empty((R, k, k), dtype=torch.float64, device=base.device)
            d = torch.empty((R, k), dtype=torch.float64, device=base.device)
            launch_neuron_stats(base, [fts[t] for t in tasks], thr[idx] if thr is not None else None,
                                lim[idx] if lim is not None else None, offset, g, d, sq)
            gram[:, idx[:, None], idx[None, :]] = g
            dots[:, idx] = d



def neuron_stats(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    threshold: Optional[torch.Tensor] = None,
    tie_limit: Optional[torch.Tensor] = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.ops.neurokern.neuron_stats for CUDA tensors (and CPU tensors under TRITON_INTERPRET)."""
    base, fts = check_matrix_group("neuron_stats", base, finetuned)
    T = len(fts)
    R, C = base.shape
    thr, lim = trim_pair("neuron_stats", threshold, tie_limit, T, base.device)
    gram = torch.empty((R, T, T), dtype=torch.float64, device=base.device)
    dots = torch.empty((R, T), dtype=torch.float64, device=base.device)
    sq = torch.empty((R,), dtype=torch.float64, device=base.device)
    if R == 0:
        return gram, dots, sq
    if T > MAX_TASKS:
        _task_pairs(base, fts, thr, lim, offset, gram, dots, sq)
    else:
        launch_neuron_stats(base, fts, thr, lim, offset, gram, dots, sq)
    return gram, dots, sq


def neuron_stats_multi(
    base: Sequence[torch.Tensor],
    finetuned: Sequence[torch.Tensor],
    threshold: Optional[torch.Tensor] = None,
    tie_limit: Optional[torch.Tensor] = None,
    offsets: Sequence[int] = (),
    config: Optional[dict] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.ops.neurokern.neuron_stats_multi: the rows of every tensor, concatenated in list order,
    in one launch per storage dtype (T > MAX_TASKS: per tensor, as neuron_stats).
    config: the launch configuration (tests); by default the single-tensor launch's on a GPU (it
    depends on the dtype and T only), under the interpreter the list's largest tensor's."""
    op = "neuron_stats_multi"
    n, T = len(base), tasks(base, finetuned)
    if config is None and interpreting():
        shapes = [b.shape for b in base if b.dim() == 2]
        config = interpreter_config(max((s[0] for s in shapes), default=0), max((s[1] for s in shapes), default=0))
    per_program = (config["ROWS"] if config else 1) if T <= MAX_TASKS else 0  # a GPU: one row per program
    _, _, launches, total = prepare(op, base, finetuned, per_program, "rows", offsets=offsets)
    device = base[0].device
    thr, lim, trim_rows = list_trims(op, threshold, tie_limit, n, T, device)
    gram = torch.empty((total, T, T), dtype=torch.float64, device=device)
    dots = torch.empty((total, T), dtype=torch.float64, device=device)
    sq = torch.empty((total,), dtype=torch.float64, device=device)
    if T > MAX_TASKS:
        firsts = list(itertools.accumulate((b.shape[0] for b in base), initial=0))
        for i, column in enumerate(columns(finetuned, n)):
            r0, r1 = firsts[i], firsts[i + 1]
            if r1 > r0:
                b, fts = check_matrix_group(op, base[i], column)
                _task_pairs(b, fts, *trim_of(thr, lim, trim_rows, i), offset_of(offsets, i), gram[r0:r1], dots[r0:r1],
                            sq[r0:r1])
        return gram, dots, sq
    has_trim = thr is not None
    for g in launches:
        first = base[g.first]
        sub_thr, sub_lim = g.trims(thr, lim, trim_rows, n)
        _neuron_stats_multi_kernel[(g.programs,)](
            g.table, g.owner, sub_thr if has_trim else first, sub_lim if has_trim else first, gram, dots, sq, first,
            g.nt, T=T, HAS_TRIM=has_trim, TRIM_ROWS=trim_rows, ALIGNED=g.aligned, C16=g.c16,
            **(config or _config(0, 0, first.element_size(), T)),
        )
    return gram, dots, sq


registry.register("neuron_stats", neuron_stats)
registry.register("neuron_stats_multi", neuron_stats_multi)
