"""Triton kernels of ties_merge and ties_merge_multi (common.py states the arithmetic and
the design, lists.py the launch tables).

Bytes moved: (T + 1) N E read + N E written; zero_sign="majority" reads the inputs twice (a vote
pre-pass, two-stage int64 reduction of the elected signs, whose sign the merge reads on the
device; ties_merge_multi: one pre-pass launch and a segmented sum per storage dtype, giving each
tensor its own majority sign). Measured on an H100 (bf16 32000 x 2048, fraction of a
device-to-device copy's 2.85 TB/s, T = 1 / T = 8): 0.52 / 0.60 ("majority": 0.36 / 0.35 counting
one read); bound by the float64 election arithmetic, not memory.

Larger T: ties_merge runs in chunked passes of MAX_TASKS tasks on the device (_ties_chunks: the
votes over every chunk, then the disjoint sums, float64 sums carried between chunks in the C++
kernel's order, bitwise its output); ties_merge_multi runs ties_merge per tensor.

ties_merge_multi's nonfinite flags (T <= MAX_TASKS) come from the values each program stores: a
float32 output is NaN / Inf only where the float32 result is, which the float64 recompute already
looks at; a bfloat16 / float16 output also where a finite float32 result rounds to Inf, one
compare per element on the unrolled path (stores_nonfinite). A program that recomputes elements
in float64 checks its final values in that rare sweep; a program that stored a NaN / Inf sets its
tensor's flag, one store.
"""
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from neurokern.ops._common import to_device
from neurokern.ops.finite import nonfinite_flags
from neurokern.ops.triton import common, registry
from neurokern.ops.triton.common import (
    CONSENSUS_CODES,
    MAX_TASKS,
    NORMALIZE_CODES,
    add_to_base,
    agree_add,
    any_set,
    carried_sums,
    carry_sums,
    check_flags,
    check_group,
    check_storage,
    divide,
    election_block,
    everywhere,
    fail,
    grid_1d,
    is_nonfinite,
    markstein,
    markstein_finite,
    parse_choice,
    scalar_params,
    sign_of,
    stores_nonfinite,
    task_slots,
    task_value,
    task_wide,
    to_out,
    trim_pair,
    widen_f32,
)
from neurokern.ops.triton.lists import (
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


def ties_params(weights, scale: float, normalize: int) -> list[float]:
    """The TIES kernels' par: weights (T), scale, then (normalize "weights" or "count") the divisor
    of each agreement mask m (bit t: task t agrees with the elected sign), 2^T of them, and their
    reciprocals. The divisors are election.h's: the agreeing weights summed in task order (1 if
    that is 0) or their count (at least 1), so the kernels gather them per element instead of
    summing weights; the reciprocals are correctly rounded, as markstein needs."""
    w = [float(x) for x in weights]
    div = []
    if normalize:
        # Mask m's sum is that of m without its top task t, plus weights[t] (count: plus 1).
        div = [0.0]
        for x in w:
            div += [d + (x if normalize == 1 else 1.0) for d in div]
        div = [1.0 if d == 0.0 else d for d in div]
    return w + [float(scale)] + div + [1.0 / d for d in div]


@triton.jit
def _tie_limits(thr_ptr, lim_ptr, first, T: tl.constexpr, TRIM: tl.constexpr, SPAN: tl.constexpr):
    """The trim rule over the SPAN elements from flat position `first` on, per task: (thr, up, L).
    Element i of the span (position first + i) keeps tau iff |tau| >= (i < L ? thr : up): up is
    the next float32 above |thr| (|tau| > thr <=> |tau| >= up; +inf: NaN, nothing is above), or
    thr itself when thr < 0 or NaN; L = clamp(lim - first, 0, SPAN) (no int64 compare per element)."""
    thr = ()
    up = ()
    lim = ()
    if TRIM:
        for t in tl.static_range(T):
            x = tl.load(thr_ptr + t)
            nxt = (tl.abs(x).to(tl.uint32, bitcast=True) + 1).to(tl.float32, bitcast=True)
            thr = thr + (x,)
            up = up + (tl.where(x >= 0, nxt, x),)
            lim = lim + ((tl.minimum(tl.maximum(tl.load(lim_ptr + t), first), first + SPAN) - first).to(tl.int32),)
    return thr, up, lim


@triton.jit
def _tie_cuts(limits, i, T: tl.constexpr, TRIM: tl.constexpr):
    """Per task, the least |tau| kept at span index i (a block of them, or 0 for a span where
    _ties_uniform holds: then scalars)."""
    thr, up, lim = limits
    cut = ()
    if TRIM:
        for t in tl.static_range(T):
            cut = cut + (tl.where(i < lim[t], thr[t], up[t]),)
    return cut


@triton.jit
def _ties_uniform(limits, T: tl.constexpr, TRIM: tl.constexpr, SPAN: tl.constexpr):
    """Whether every task keeps all or none of its ties |tau| == thr over the span (L = SPAN or 0)."""
    thr, up, lim = limits
    uniform = True
    if TRIM:
        for t in tl.static_range(T):
            uniform = uniform & ((lim[t] == 0) | (lim[t] == SPAN))
    return uniform


@triton.jit
def _ties_inputs(base_ptr, fs, offs, mask, T: tl.constexpr):
    """A block's (base, fine-tuned values) as stored: the loads kept apart from the arithmetic, so
    that the merge's unrolled loop issues a block's loads before the block before it is computed
    and stored (a load after the store could read what the store wrote, for all the compiler
    knows, so it stayed there: about 20 bytes a thread in flight, too few to cover the latency)."""
    raw = ()
    for t in tl.static_range(T):
        raw = raw + (tl.load(fs[t] + offs, mask=mask, other=0.0),)
    return tl.load(base_ptr + offs, mask=mask, other=0.0), raw


@triton.jit
def _ties_votes(inputs, cut, wt, par_ptr, T: tl.constexpr, TRIM: tl.constexpr, CONSENSUS: tl.constexpr,
                ELECT_W: tl.constexpr, WIDE: tl.constexpr):
    """(w, d, e, vote) of a block (inputs: _ties_inputs): base, the contributions d_t =
    float(weights[t]) * trim(tau_t), the votes e_t (d_t or trim(tau_t)) and their sum (float64) or
    sum of signs. WIDE: in float64, d_t = weights[t] * trim(tau_t) from the exact tau (float64
    difference), the trim decided on the float32 |tau| as the float32 path decides it
    (csrc/cpu/ties_merge.cpp's wide path)."""
    w = widen_f32(inputs[0])
    ds = ()
    es = ()
    for t in tl.static_range(T):
        f = widen_f32(inputs[1][t])
        tau = f - w  # tau_t = float32(finetuned[t]) - float32(base)
        if WIDE:
            x = f.to(tl.float64) - w.to(tl.float64)
            if TRIM:
                x = tl.where(tl.abs(tau) >= cut[t], x, 0.0)
            d = tl.load(par_ptr + t) * x
            e = d if ELECT_W else x
        else:
            if TRIM:
                tau = tl.where(tl.abs(tau) >= cut[t], tau, 0.0)
            d = wt[t] * tau
            e = d if ELECT_W else tau
        ds = ds + (d,)
        es = es + (e,)
        # The vote: the sum of the values (float64) or of their signs. It starts at e_0, not
        # 0.0 + e_0: that changes only the sign of a zero sum, which elects nothing.
        x = e.to(tl.float64) if CONSENSUS == 1 else (e > 0).to(tl.int32) - (e < 0).to(tl.int32)
        v = x if t == 0 else v + x
    return w, ds, es, v


@triton.jit
def _ties_mix(w, ds, es, v, scale, zero_pos, par_ptr, T: tl.constexpr, NORMALIZE: tl.constexpr,
              ELECT_W: tl.constexpr, WIDE: tl.constexpr):
    """float32 base + scale * elect_and_mix(d, e) (csrc/cpu/election.h); WIDE: the sum with base
    in float64, rounded once."""
    # sign_of(v) with the fallback for 0 (a NaN vote is 0 too); agree_t: e_t has the elected sign.
    sgn = tl.where((v > 0) | (~(v < 0) & zero_pos), 1.0, -1.0)
    m = 0
    for t in tl.static_range(T):
        agree = es[t] * sgn > 0
        m = m | (agree.to(tl.int32) << t)
        x = tl.where(agree, ds[t].to(tl.float64), 0.0)
        # The sum in task order from 0.0: its first term is x itself unless x is -0.0, which
        # an agreeing d_t (= e_t, nonzero) never is when the vote is weighted.
        if t == 0:
            s = x if ELECT_W else 0.0 + x
        else:
            s = s + x
    if NORMALIZE:
        tab = par_ptr + (T + 1) + m
        if WIDE:
            s = markstein(s, tl.load(tab), tl.load(tab + (1 << T)))
        else:  # the elements whose quotient is not finite are computed again (WIDE)
            s = markstein_finite(s, tl.load(tab), tl.load(tab + (1 << T)))
    return add_to_base(w, s, scale, WIDE)


@triton.jit
def _ties_float32(
    inputs, mask, cut, wt, scale, zero_pos, par_ptr,
    T: tl.constexpr, TRIM: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
    ELECT_W: tl.constexpr, PASS: tl.constexpr,
):
    """A block's vote and (PASS 1) merged value on the float32 path (float64 vote and sums), and
    `bad`: the elements whose float64 vote ("sum") or float32 result is NaN / Inf (float32
    overflowed on finite inputs near the maximum, or an input is NaN / Inf), which the float64 path
    computes again (_ties_block_wide). inputs: _ties_inputs; cut: _tie_cuts; wt: float32
    weights; zero_pos: a zero vote elects +; par: ties_params."""
    w, ds, es, v = _ties_votes(inputs, cut, wt, par_ptr, T, TRIM, CONSENSUS, ELECT_W, False)
    bad = tl.zeros(w.shape, dtype=tl.int1)
    if CONSENSUS == 1:
        bad = is_nonfinite(v)
    r = w
    if PASS == 1:
        r = _ties_mix(w, ds, es, v, scale, zero_pos, par_ptr, T, NORMALIZE, ELECT_W, False)
        bad = bad | is_nonfinite(r)
    return v, r, bad & mask


@triton.jit
def _ties_block(
    acc, inputs, out_ptr, offs, mask, cut, wt, scale, zero_pos, par_ptr,
    T: tl.constexpr, TRIM: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
    ELECT_W: tl.constexpr, PASS: tl.constexpr, FLAG: tl.constexpr,
):
    """One block of elements (inputs: _ties_inputs) on the float32 path (_ties_float32). PASS 0 (the "majority" pre-pass)
    adds sign(vote) to acc; PASS 1 stores out = base + float(scale * elect_and_mix(d, e))
    (csrc/cpu/election.h). Returns (acc, bad, over): PASS 0 leaves the bad elements' sign out of
    acc, PASS 1 stores a value _ties_block_wide replaces. FLAG, bfloat16 / float16 output: over
    marks the stored values that are NaN / Inf, a finite float32 result that rounds to Inf
    included (a float32 output is NaN / Inf only where bad is set, and the recompute flags it)."""
    v, r, bad = _ties_float32(inputs, mask, cut, wt, scale, zero_pos, par_ptr, T, TRIM, CONSENSUS, NORMALIZE,
                              ELECT_W, PASS)
    over = tl.zeros(offs.shape, dtype=tl.int1)
    if PASS == 0:
        acc += tl.where(mask & ~bad, sign_of(v), 0)
    else:
        tl.store(out_ptr + offs, to_out(r, out_ptr.dtype.element_ty), mask=mask)
        if FLAG:
            if out_ptr.dtype.element_ty != tl.float32:
                over = stores_nonfinite(r, out_ptr.dtype.element_ty) & mask
    return acc, bad, over


@triton.jit
def _ties_block_wide(
    acc, base_ptr, fs, out_ptr, offs, mask, cut, wt, scale, zero_pos, par_ptr,
    T: tl.constexpr, TRIM: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
    ELECT_W: tl.constexpr, PASS: tl.constexpr, FLAG: tl.constexpr,
):
    """The elements of a block that _ties_float32 marks bad, computed again in float64 (_ties_votes,
    _ties_mix with WIDE, as csrc/cpu/ties_merge.cpp's wide path): PASS 0 adds the sign of their
    float64 vote to acc, PASS 1 stores their result. Returns (acc, over); FLAG: over marks the
    block's stored values (float32 or float64 path) that are NaN / Inf."""
    inputs = _ties_inputs(base_ptr, fs, offs, mask, T)
    _, r, bad = _ties_float32(inputs, mask, cut, wt, scale, zero_pos, par_ptr, T, TRIM, CONSENSUS, NORMALIZE,
                              ELECT_W, PASS)
    if any_set(bad):
        w64, d64, e64, v64 = _ties_votes(inputs, cut, wt, par_ptr, T, TRIM, CONSENSUS, ELECT_W, True)
        if PASS == 0:
            acc += tl.where(bad, sign_of(v64), 0)
        else:
            wide = _ties_mix(w64, d64, e64, v64, scale, zero_pos, par_ptr, T, NORMALIZE, ELECT_W, True)
            tl.store(out_ptr + offs, to_out(wide, out_ptr.dtype.element_ty), mask=bad)
            r = tl.where(bad, wide, r)
    over = tl.zeros(offs.shape, dtype=tl.int1)
    if FLAG:
        over = stores_nonfinite(r, out_ptr.dtype.element_ty) & mask
    return acc, over


@triton.jit
def _ties_chunk(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, par_ptr, fb_ptr, out_ptr, start, n, offset,
    T: tl.constexpr, TRIM: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
    ELECT_W: tl.constexpr, MAJORITY: tl.constexpr, PASS: tl.constexpr, BLOCK: tl.constexpr,
    ITERS: tl.constexpr, AHEAD: tl.constexpr, FLAG: tl.constexpr,
):
    """ITERS blocks of the tensor from element `start` on (n elements, flat positions from
    offset): PASS 0 returns the elected signs summed per lane, PASS 1 merges them (_ties_block).
    The per-program scalars are loaded once; the pointers move to `start` and the blocks index
    them with int32 offsets. A chunk inside the tensor where every task keeps all or none of its
    ties (all but the few that hold a tie limit) goes unmasked, with one cut per task; others
    are masked and cut per element. MAJORITY: a zero vote elects fb[0] (a sign), else +.
    Returns (acc, over); PASS 1 with FLAG: over is set in the lanes that stored a NaN / Inf."""
    SPAN: tl.constexpr = ITERS * BLOCK
    base_ptr += start
    out_ptr += start
    fs = ()
    for t in tl.static_range(T):
        fs = fs + ((f0, f1, f2, f3, f4, f5, f6, f7)[t] + start,)
    wt = ()
    for t in tl.static_range(T):
        wt = wt + (tl.load(par_ptr + t).to(tl.float32),)
    scale = tl.load(par_ptr + T)
    zero_pos = True
    if MAJORITY:
        zero_pos = tl.load(fb_ptr) > 0
    limits = _tie_limits(thr_ptr, lim_ptr, offset + start, T, TRIM, SPAN)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    bad = tl.zeros([BLOCK], dtype=tl.int1)
    over = tl.zeros([BLOCK], dtype=tl.int1)
    if (start + SPAN <= n) & _ties_uniform(limits, T, TRIM, SPAN):
        cut = _tie_cuts(limits, 0, T, TRIM)
        everything = everywhere(BLOCK)
        if PASS == 1:
            # The merge's few blocks unrolled, their loads and stores at immediate offsets from the
            # chunk's pointers, each block's loads issued AHEAD blocks before it is computed.
            blocks = ()
            for it in tl.static_range(ITERS + AHEAD):
                if it < ITERS:
                    blocks = blocks + (_ties_inputs(base_ptr, fs, it * BLOCK + tl.arange(0, BLOCK), everything, T),)
                if it >= AHEAD:
                    acc, b, o = _ties_block(acc, blocks[it - AHEAD], out_ptr, (it - AHEAD) * BLOCK + tl.arange(0, BLOCK),
                                            everything, cut, wt, scale, zero_pos, par_ptr, T, TRIM, CONSENSUS,
                                            NORMALIZE, ELECT_W, PASS, FLAG)
                    bad = bad | b
                    over = over | o
        else:  # the pre-pass's 32 blocks stay a loop
            for it in range(ITERS):
                offs = it * BLOCK + tl.arange(0, BLOCK)
                acc, b, o = _ties_block(acc, _ties_inputs(base_ptr, fs, offs, everything, T), out_ptr, offs,
                                        everything, cut, wt, scale, zero_pos, par_ptr, T, TRIM, CONSENSUS, NORMALIZE,
                                        ELECT_W, PASS, FLAG)
                bad = bad | b
    else:
        rem = tl.minimum(n - start, SPAN).to(tl.int32)
        for it in range(ITERS):
            offs = it * BLOCK + tl.arange(0, BLOCK)
            acc, b, o = _ties_block(acc, _ties_inputs(base_ptr, fs, offs, offs < rem, T), out_ptr, offs, offs < rem,
                                    _tie_cuts(limits, offs, T, TRIM), wt, scale, zero_pos, par_ptr, T, TRIM,
                                    CONSENSUS, NORMALIZE, ELECT_W, PASS, FLAG)
            bad = bad | b
            over = over | o
    # The float64 recompute, rare (inputs near the float32 maximum, or NaN / Inf), once a program
    # after the loop: the unrolled loop holds the float32 path only, which keeps its code and its
    # compile time small. Its sweep flags every block's final values anew (the loop's flags may
    # be those of values it replaces).
    if (PASS == 1) or (CONSENSUS == 1):
        if any_set(bad):
            tl.debug_barrier()  # the float32 values stored above, before their replacement
            rem = tl.minimum(n - start, SPAN).to(tl.int32)
            over = tl.zeros([BLOCK], dtype=tl.int1)
            for it in range(ITERS):
                offs = it * BLOCK + tl.arange(0, BLOCK)
                acc, o = _ties_block_wide(acc, base_ptr, fs, out_ptr, offs, offs < rem,
                                          _tie_cuts(limits, offs, T, TRIM), wt, scale, zero_pos, par_ptr, T, TRIM,
                                          CONSENSUS, NORMALIZE, ELECT_W, PASS, FLAG)
                over = over | o
    return acc, over


@triton.jit(do_not_specialize=["offset"])
def _ties_kernel(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, par_ptr, fb_ptr, part_ptr, out_ptr,
    n, offset,
    T: tl.constexpr, TRIM: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
    ELECT_W: tl.constexpr, MAJORITY: tl.constexpr, PASS: tl.constexpr, BLOCK: tl.constexpr,
    ITERS: tl.constexpr, AHEAD: tl.constexpr,
):
    """ITERS blocks a program (_ties_chunk). PASS 0 (the "majority" pre-pass): part[pid] = the
    sum of their sign(vote). PASS 1: their merge. par: ties_params; fb: the fallback sign (int32
    [1]) that PASS 0's total gives."""
    pid = tl.program_id(0).to(tl.int64)
    acc, _ = _ties_chunk(base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, par_ptr, fb_ptr, out_ptr,
                         pid * (ITERS * BLOCK), n, offset, T, TRIM, CONSENSUS, NORMALIZE, ELECT_W, MAJORITY, PASS,
                         BLOCK, ITERS, AHEAD, False)
    if PASS == 0:
        tl.store(part_ptr + pid, tl.sum(acc, axis=0).to(tl.int64))


def ties_options(op: str, T: int, weights, consensus: str, normalize: str, zero_sign: str) -> tuple[int, int]:
    """Checks ties_merge's options; returns the (consensus, normalize) codes of the kernels."""
    if len(weights) != T:
        fail(op, f"{len(weights)} weights for {T} fine-tuned tensors")
    if zero_sign not in ("positive", "majority"):
        fail(op, f'zero_sign must be "positive" or "majority", got "{zero_sign}"')
    return (parse_choice(op, consensus, CONSENSUS_CODES, "consensus", allow_none=False),
            parse_choice(op, normalize, NORMALIZE_CODES, "normalize"))


@triton.jit
def _ties_chunk_values(fs, offs, mask, w, pos, thr_ptr, lim_ptr, wt_ptr, t: tl.constexpr, TRIM: tl.constexpr,
                       ELECT_W: tl.constexpr, WIDE: tl.constexpr):
    """(d_t, e_t) of one task (csrc/cpu/ties_merge.cpp): d_t = float(weights[t]) * trim(tau_t), e_t =
    d_t or trim(tau_t); WIDE: in float64 from the exact tau, the trim decided on the float32 |tau|."""
    if WIDE:
        x = task_wide(fs[t], offs, mask, w, pos, thr_ptr, lim_ptr, t, TRIM)
        d = tl.load(wt_ptr + t) * x
    else:
        x = task_value(fs[t], offs, mask, w, pos, thr_ptr, lim_ptr, t, TRIM)
        d = tl.load(wt_ptr + t).to(tl.float32) * x
    if ELECT_W:
        e = d
    else:
        e = x
    return d, e


@triton.jit
def _ties_chunk_vote(base_ptr, fs, thr_ptr, lim_ptr, wt_ptr, vote_ptr, offs, mask, offset,
                     T: tl.constexpr, TRIM: tl.constexpr, CONSENSUS: tl.constexpr, ELECT_W: tl.constexpr,
                     FIRST: tl.constexpr, WIDE: tl.constexpr):
    """vote = (FIRST ? 0 : vote) + the chunk's e_t ("sum") or their signs ("count"), float64 (the C++
    kernel's double vote, in its order)."""
    w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pos = offs + offset
    if FIRST:
        v = tl.zeros(offs.shape, dtype=tl.float64)
    else:
        v = tl.load(vote_ptr + offs, mask=mask, other=0.0)
    for t in tl.static_range(T):
        d, e = _ties_chunk_values(fs, offs, mask, w, pos, thr_ptr, lim_ptr, wt_ptr, t, TRIM, ELECT_W, WIDE)
        if CONSENSUS == 1:
            v = v + e.to(tl.float64)
        else:
            v = v + sign_of(e).to(tl.float64)
    tl.store(vote_ptr + offs, v, mask=mask)


@triton.jit
def _ties_chunk_mix(base_ptr, fs, thr_ptr, lim_ptr, wt_ptr, scale_ptr, sign_ptr, sum_ptr, wsum_ptr, cnt_ptr, offs,
                    mask, offset, T: tl.constexpr, TRIM: tl.constexpr, NORMALIZE: tl.constexpr,
                    ELECT_W: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, WIDE: tl.constexpr):
    """The disjoint sum of the chunk's agreeing d_t (sign: the elected sign, its zero fallback
    resolved): sum, wsum (their weights) and cnt carried from the chunk before (FIRST: from 0),
    stored for the next, or (LAST) the merged float32 value returned: base + float(scale * sum /
    divisor), WIDE: float(base + scale * sum / divisor) (election.h's elect_and_mix)."""
    w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pos = offs + offset
    positive = tl.load(sign_ptr + offs, mask=mask, other=1) > 0
    s, ws, cnt = carried_sums(sum_ptr, wsum_ptr, cnt_ptr, offs, mask, FIRST)
    for t in tl.static_range(T):
        d, e = _ties_chunk_values(fs, offs, mask, w, pos, thr_ptr, lim_ptr, wt_ptr, t, TRIM, ELECT_W, WIDE)
        s, ws, cnt = agree_add(s, ws, cnt, d, e, tl.load(wt_ptr + t), positive)
    r = tl.zeros(offs.shape, dtype=tl.float32)
    if LAST:
        r = add_to_base(w, divide(s, ws, cnt, NORMALIZE), tl.load(scale_ptr), WIDE)
    else:
        carry_sums(sum_ptr, wsum_ptr, cnt_ptr, offs, mask, s, ws, cnt)
    return r


@triton.jit(do_not_specialize=["offset"])
def _ties_chunk_kernel(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, wt_ptr, scale_ptr, need_ptr, sign_ptr,
    vote_ptr, sum_ptr, wsum_ptr, cnt_ptr, res_ptr, out_ptr, n, offset,
    T: tl.constexpr, TRIM: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
    ELECT_W: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, WIDE: tl.constexpr, PASS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One chunk of up to MAX_TASKS tasks of a TIES merge over more (thr, lim and wt, the float64
    weights, start at the chunk's first task). PASS 0: the vote (_ties_chunk_vote); PASS 1: the
    disjoint sum (_ties_chunk_mix), LAST storing the float32 result into res. WIDE: in float64,
    only in the blocks holding an element with need[i] set; its PASS 1 LAST stores out for every
    block, res where need is not set, the float64 result where it is."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    fs = (f0, f1, f2, f3, f4, f5, f6, f7)
    need = mask
    work = True
    if WIDE:
        need = mask & (tl.load(need_ptr + offs, mask=mask, other=0) != 0)
        work = any_set(need)
    if PASS == 0:
        if work:
            _ties_chunk_vote(base_ptr, fs, thr_ptr, lim_ptr, wt_ptr, vote_ptr, offs, mask, offset,
                             T, TRIM, CONSENSUS, ELECT_W, FIRST, WIDE)
    else:
        if LAST:
            if WIDE:
                r = tl.load(res_ptr + offs, mask=mask, other=0.0)
                if work:
                    wide = _ties_chunk_mix(base_ptr, fs, thr_ptr, lim_ptr, wt_ptr, scale_ptr, sign_ptr, sum_ptr,
                                           wsum_ptr, cnt_ptr, offs, mask, offset, T, TRIM, NORMALIZE, ELECT_W, FIRST,
                                           LAST, WIDE)
                    r = tl.where(need, wide, r)
                tl.store(out_ptr + offs, to_out(r, out_ptr.dtype.element_ty), mask=mask)
            else:
                r = _ties_chunk_mix(base_ptr, fs, thr_ptr, lim_ptr, wt_ptr, scale_ptr, sign_ptr, sum_ptr, wsum_ptr,
                                    cnt_ptr, offs, mask, offset, T, TRIM, NORMALIZE, ELECT_W, FIRST, LAST, WIDE)
                tl.store(res_ptr + offs, r, mask=mask)
        elif work:
            _ties_chunk_mix(base_ptr, fs, thr_ptr, lim_ptr, wt_ptr, scale_ptr, sign_ptr, sum_ptr, wsum_ptr, cnt_ptr,
                            offs, mask, offset, T, TRIM, NORMALIZE, ELECT_W, FIRST, LAST, WIDE)

def _elected(votes: torch.Tensor) -> torch.Tensor:
    """sign_of(vote) as int32: 0 for a zero or NaN vote."""
    return (votes > 0).to(torch.int32) - (votes < 0).to(torch.int32)


def _ties_chunks(base, finetuned, weights, thr, lim, offset, cons, norm, elect_weighted, majority, scale, out):
    """ties_merge over more than MAX_TASKS tasks into out, in launches over chunks of MAX_TASKS
    tasks whose float64 sums carry from chunk to chunk in the C++ kernel's order
    (csrc/cpu/ties_merge.cpp): the votes over every chunk first, then the elected sign of each
    element (a zero vote: + or the tensor's majority sign, the sign of the summed signs), then the
    disjoint sums over every chunk. The elements the C++ kernel computes again in float64 (a "sum"
    vote or a result that is NaN / Inf) take the same sweeps in float64, in the blocks holding one
    (the others read only the flags). Bitwise the C++ op's output. Reads 2 (T + 1) N E, and as much
    again in the blocks needing float64; float64 [n] buffers carry the sums (about 33 bytes an
    element)."""
    T, n, device = len(finetuned), base.numel(), base.device
    par = to_device(torch.tensor([float(scale)] + [float(x) for x in weights], dtype=torch.float64), device)
    vote = torch.empty(n, dtype=torch.float64, device=device)
    sums = torch.empty(n, dtype=torch.float64, device=device)
    wsums = torch.empty(n, dtype=torch.float64, device=device)
    counts = torch.empty(n, dtype=torch.int32, device=device)
    result = torch.empty(n, dtype=torch.float32, device=device)
    block = election_block(MAX_TASKS)  # float64 sums of 8 tasks: the election kernels' block

    def sweep(pass_, wide, need, sign):
        for t0 in range(0, T, MAX_TASKS):
            t1 = min(T, t0 + MAX_TASKS)
            _ties_chunk_kernel[grid_1d(n, block)](
                base, *task_slots(base, finetuned[t0:t1]), thr[t0:t1] if thr is not None else base,
                lim[t0:t1] if lim is not None else base, par[1 + t0:], par, need, sign, vote, sums, wsums, counts,
                result, out, n, offset,
                T=t1 - t0, TRIM=thr is not None, CONSENSUS=cons, NORMALIZE=norm, ELECT_W=bool(elect_weighted),
                FIRST=t0 == 0, LAST=t1 == T, WIDE=wide, PASS=pass_, BLOCK=block, **common.LAUNCH,
            )

    no_flags = torch.zeros(n, dtype=torch.bool, device=device)
    sweep(0, False, no_flags, counts)
    signs = _elected(vote)
    overflowed = no_flags
    if cons == 1:  # a float64 vote of float32 values that is NaN / Inf: the float64 vote there
        overflowed = ~torch.isfinite(vote)
        sweep(0, True, overflowed, counts)
        signs = torch.where(overflowed, _elected(vote), signs)
    fallback = torch.sign(signs.sum()).to(torch.int32) if majority else torch.ones((), dtype=torch.int32, device=device)
    sweep(1, False, no_flags, torch.where(signs == 0, fallback, signs))
    need = ~torch.isfinite(result) | overflowed
    sweep(0, True, need, counts)
    wide_signs = _elected(vote)
    sweep(1, True, need, torch.where(wide_signs == 0, fallback, wide_signs))


def ties_merge(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    threshold: Optional[torch.Tensor] = None,
    tie_limit: Optional[torch.Tensor] = None,
    offset: int = 0,
    consensus: str = "sum",
    normalize: str = "weights",
    elect_weighted: bool = True,
    zero_sign: str = "positive",
    scale: float = 1.0,
) -> torch.Tensor:
    """torch.ops.neurokern.ties_merge. zero_sign="majority" runs a vote pre-pass (two-stage
    int64 reduction of the elected signs) whose sign the second pass reads on the device.
    T > MAX_TASKS: in chunks of MAX_TASKS tasks (_ties_chunks), bitwise the same."""
    op = "ties_merge"
    check_group(op, base, finetuned)
    T = len(finetuned)
    cons, norm = ties_options(op, T, weights, consensus, normalize, zero_sign)
    thr, lim = trim_pair(op, threshold, tie_limit, T, base.device)
    check_storage(op, base.dtype)
    out = torch.empty_like(base)
    n = base.numel()
    if n == 0:
        return out
    if T > MAX_TASKS:
        _ties_chunks(base, finetuned, weights, thr, lim, offset, cons, norm, elect_weighted, zero_sign == "majority",
                     scale, out)
        return out
    block = election_block(T)
    par = scalar_params(base.device, ties_params(weights, scale, norm))
    majority = zero_sign == "majority"
    args = [base, *task_slots(base, finetuned), thr if thr is not None else base,
            lim if lim is not None else base, par]
    meta = dict(T=T, TRIM=thr is not None, CONSENSUS=cons, NORMALIZE=norm, ELECT_W=bool(elect_weighted),
                MAJORITY=majority, BLOCK=block, **common.LAUNCH)
    fb = par
    if majority:
        iters = max(1, common.CHUNK // block)
        pgrid = grid_1d(n, block * iters)
        part = torch.empty(pgrid[0], dtype=torch.int64, device=base.device)
        _ties_kernel[pgrid](*args, par, part, out, n, offset, PASS=0, ITERS=iters, AHEAD=0, **meta)
        fb = torch.sign(part.sum()).to(torch.int32).reshape(1)
    _ties_kernel[grid_1d(n, block * common.TIES_ITERS)](*args, fb, par, out, n, offset, PASS=1, ITERS=common.TIES_ITERS,
                                                        AHEAD=min(common.TIES_AHEAD, common.TIES_ITERS), **meta)
    return out


@triton.jit(do_not_specialize=["nt"],
            do_not_specialize_on_alignment=["thr_ptr", "lim_ptr", "par_ptr", "part_ptr", "like_in"])
def _ties_vote_multi_kernel(
    table, owner, thr_ptr, lim_ptr, par_ptr, part_ptr, like_in, nt,
    T: tl.constexpr, TRIM: tl.constexpr, TRIM_ROWS: tl.constexpr, CONSENSUS: tl.constexpr,
    ELECT_W: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, ALIGNED: tl.constexpr,
):
    """The zero_sign="majority" pre-pass: part[pid] = the sum of the elected signs sign(vote) over
    chunk `local` (ITERS blocks) of tensor j, as the single-tensor kernel's PASS 0 (int64, exact)."""
    pid, j, local, n, offset = program_tensor(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = table_inputs(table, nt, j, like_in, T, ALIGNED)
    thr_ptr, lim_ptr = trim_row(thr_ptr, lim_ptr, j, T, TRIM_ROWS)
    acc, _ = _ties_chunk(b, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, par_ptr, par_ptr, b,
                         local * (ITERS * BLOCK), n, offset, T, TRIM, CONSENSUS, 0, ELECT_W, False, 0, BLOCK, ITERS, 0,
                         False)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0).to(tl.int64))


@triton.jit(do_not_specialize=["nt"],
            do_not_specialize_on_alignment=["thr_ptr", "lim_ptr", "par_ptr", "fb_ptr", "flag_ptr", "like_in"])
def _ties_multi_kernel(
    table, owner, thr_ptr, lim_ptr, par_ptr, fb_ptr, flag_ptr, like_in, nt,
    T: tl.constexpr, TRIM: tl.constexpr, TRIM_ROWS: tl.constexpr, CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr, ELECT_W: tl.constexpr, MAJORITY: tl.constexpr, BLOCK: tl.constexpr,
    ITERS: tl.constexpr, AHEAD: tl.constexpr, ALIGNED: tl.constexpr, FLAG: tl.constexpr,
):
    """The merge of chunk `local` (ITERS blocks) of tensor j; MAJORITY: a zero vote elects fb[j],
    the tensor's majority sign (int32 [n]). Several blocks a program spread the table lookups and
    the per-program scalars over more bytes: with one small election block a program, they
    bounded the bandwidth. FLAG: flag_ptr[i] = 1 for the list position i (table row 5 + T) of a
    tensor whose stored output holds a NaN or Inf, one store by each program that stored one."""
    pid, j, local, n, offset = program_tensor(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = table_inputs(table, nt, j, like_in, T, ALIGNED)
    out_ptr = table_ptr(table, 4, nt, j, like_in, ALIGNED)
    thr_ptr, lim_ptr = trim_row(thr_ptr, lim_ptr, j, T, TRIM_ROWS)
    _, over = _ties_chunk(b, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, par_ptr, fb_ptr + j, out_ptr,
                          local * (ITERS * BLOCK), n, offset, T, TRIM, CONSENSUS, NORMALIZE, ELECT_W, MAJORITY, 1,
                          BLOCK, ITERS, AHEAD, FLAG)
    if FLAG:
        if any_set(over):
            tl.store(flag_ptr + tl.load(table + (5 + T) * nt + j), 1)


def ties_merge_multi(base, finetuned, weights, threshold=None, tie_limit=None, offsets=(),
                     consensus="sum", normalize="weights", elect_weighted=True, zero_sign="positive",
                     scale=1.0, nonfinite=None):
    """torch.ops.neurokern.ties_merge_multi and _ties_merge_multi_flagged: one launch per storage
    dtype of the list; zero_sign="majority" adds two (_majority). nonfinite: int32 [n] flags, zeroed,
    then set in the merge launches where an output holds NaN / Inf (T > MAX_TASKS: nonfinite_flags
    of the outputs)."""
    op = "ties_merge_multi"
    n, T = len(base), tasks(base, finetuned)
    block = election_block(T)
    fused = T <= MAX_TASKS
    outs, _, launches, _ = prepare(op, base, finetuned, block * common.TIES_ITERS if fused else 0, outputs=fused,
                                   offsets=offsets)
    cons, norm = ties_options(op, T, weights, consensus, normalize, zero_sign)
    device = base[0].device
    thr, lim, rows = list_trims(op, threshold, tie_limit, n, T, device)
    check_flags(op, nonfinite, n, device)
    if not fused:
        outs = [ties_merge(base[i], column, weights, *trim_of(thr, lim, rows, i), offset_of(offsets, i),
                           consensus, normalize, elect_weighted, zero_sign, scale)
                for i, column in enumerate(columns(finetuned, n))]
        if nonfinite is not None:
            nonfinite.copy_(nonfinite_flags(outs))
        return outs
    if nonfinite is not None:
        nonfinite.zero_()
    par = scalar_params(device, ties_params(weights, scale, norm))
    meta = dict(T=T, TRIM=thr is not None, TRIM_ROWS=rows, CONSENSUS=cons, ELECT_W=bool(elect_weighted),
                BLOCK=block, **common.LAUNCH)
    votes = _majority(op, base, finetuned, offsets, thr, lim, par, meta) if zero_sign == "majority" else {}
    for g in launches:
        first = base[g.first]
        sub_thr, sub_lim = g.trims(thr, lim, rows, n)
        _ties_multi_kernel[(g.programs,)](
            g.table, g.owner, sub_thr if thr is not None else first, sub_lim if lim is not None else first, par,
            votes.get(g.first, par), par if nonfinite is None else nonfinite, first, g.nt,
            NORMALIZE=norm, MAJORITY=zero_sign == "majority", ITERS=common.TIES_ITERS,
            AHEAD=min(common.TIES_AHEAD, common.TIES_ITERS), ALIGNED=g.aligned, FLAG=nonfinite is not None, **meta,
        )
    return outs


def _majority(op, base, finetuned, offsets, thr, lim, par, meta) -> dict[int, torch.Tensor]:
    """Per launch (keyed by its first tensor), int32 [nt]: each tensor's majority sign, the sign of
    the sum of its elected signs (a zero vote's fallback), from one pre-pass launch per storage dtype
    (CHUNK elements per program, int64 partials) and one segmented sum over each tensor's partials;
    no host sync."""
    n = len(base)
    per_program = meta["BLOCK"] * max(1, common.CHUNK // meta["BLOCK"])
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
        segment_sum_kernel[(g.nt,)](part, g.table, sums, g.nt, g.programs, W=1, BW=1, ROWS=64, num_warps=4)
        signs[g.first] = torch.sign(sums).to(torch.int32)
    return signs


registry.register("ties_merge", ties_merge)
registry.register("ties_merge_multi", ties_merge_multi)
registry.register("_ties_merge_multi_flagged", ties_merge_multi)
