"""Triton kernels of dare and dare_multi (common.py states the arithmetic and the design,
lists.py the launch tables). The keep mask is csrc/philox.h's, bit for bit: Philox-4x32-10 on
[BLOCK / 4, 4] tiles, one call per 4 elements.

Bytes moved: (T + 1) N E read + N E written; rescale="l1" reads the inputs twice. Measured on an
H100 (bf16 32000 x 2048, fraction of a device-to-device copy's 2.85 TB/s, T = 1 / T = 8): consensus
"none" 0.65 / 0.53, "sum" 0.46 / 0.36, l1 + "sum" 0.26 / 0.18 (bound by float64 arithmetic and
Philox, not memory).

Larger T: dare runs in chunked passes of MAX_TASKS tasks on the device (_dare_chunks: float64 sums
carried between chunks in the C++ kernel's order, bitwise its output); dare_multi's rescale="l1"
(per-tensor norms) and T > MAX_TASKS run dare per tensor.
"""
from typing import Sequence

import torch
import triton
import triton.language as tl

from neurokern.ops._common import to_device
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
    check_group,
    check_storage,
    div_rn,
    divide,
    election_block,
    fail,
    grid_1d,
    is_nonfinite,
    parse_choice,
    red_block,
    reduce_tau,
    scalar_params,
    sign_of,
    sum_in_order,
    task_slots,
    tau_wide,
    to_out,
    vote_add,
)
from neurokern.ops.triton.lists import (
    columns,
    prepare,
    program_tensor,
    table_inputs,
    table_ptr,
    tasks,
)


@triton.jit
def _philox(c0, c1, k0, k1):
    """Philox-4x32-10 (csrc/philox.h) on counters (c0, c1, 0, 0) and key (k0, k1), uint32."""
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        hi_a = tl.umulhi(c0, 0xD2511F53)
        lo_a = c0 * 0xD2511F53
        hi_b = tl.umulhi(c2, 0xCD9E8D57)
        lo_b = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _dare_keep(grp, lane, k0, k1, keep_below):
    """Keep mask of a [G, 4] tile: element 4 * grp + lane draws lane `lane` of Philox on counter
    grp (one Philox call per 4 elements); kept iff the 32-bit draw < keep_below (dare_threshold)."""
    r0, r1, r2, r3 = _philox(grp.to(tl.uint32), (grp >> 32).to(tl.uint32), k0, k1)
    draw = tl.where(lane == 0, r0[:, None],
                    tl.where(lane == 1, r1[:, None], tl.where(lane == 2, r2[:, None], r3[:, None])))
    return draw.to(tl.int64) < keep_below


@triton.jit
def _dare_task_keep(grp, lane, keep_below, par_ptr, t: tl.constexpr, T: tl.constexpr):
    """Task t's keep mask of a [G, 4] tile; par: weights (T), scale, divisor, then the keys (k0,
    k1) of each task."""
    k0 = tl.load(par_ptr + (T + 2 + 2 * t)).to(tl.uint32)
    k1 = tl.load(par_ptr + (T + 3 + 2 * t)).to(tl.uint32)
    return _dare_keep(grp, lane, k0, k1, keep_below)


@triton.jit
def _dare_votes(base_ptr, fs, offs, mask, grp, lane, keep_below, par_ptr, fac_ptr, T: tl.constexpr,
                CONSENSUS: tl.constexpr, WIDE: tl.constexpr):
    """(w, d, vote, sum) of a tile: d_t = float(weights[t]) * (kept ? float(tau_t * factor_t) : 0)
    (csrc/cpu/dare.cpp), their vote (consensus "sum" / "count") or float64 sum ("none"). WIDE: in
    float64 from the exact tau, d_t = weights[t] * (kept ? tau_t * factor_t : 0)."""
    w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CONSENSUS == 1:
        v = tl.zeros(w.shape, dtype=tl.float64)
    else:
        v = tl.zeros(w.shape, dtype=tl.int32)
    s = tl.zeros(w.shape, dtype=tl.float64)
    ds = ()
    for t in tl.static_range(T):
        keep = _dare_task_keep(grp, lane, keep_below, par_ptr, t, T)
        tau, wide = tau_wide(fs[t], offs, mask, w)
        if WIDE:
            d = tl.load(par_ptr + t) * tl.where(keep, wide * tl.load(fac_ptr + t), 0.0)
        else:
            rescaled = tl.where(keep, (tau.to(tl.float64) * tl.load(fac_ptr + t)).to(tl.float32), 0.0)
            d = tl.load(par_ptr + t).to(tl.float32) * rescaled
        ds = ds + (d,)
        if CONSENSUS == 0:
            s = s + d.to(tl.float64)
        else:
            v = vote_add(v, d, CONSENSUS)
    return w, ds, v, s


@triton.jit
def _dare_mix(w, ds, v, s, par_ptr, T: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
              WIDE: tl.constexpr):
    """float32 base + scale * merged: sum_t d_t / divisor (consensus "none") or elect_and_mix(d, d)
    with a zero vote electing + (election.h); WIDE: the sum with base in float64, rounded once."""
    if CONSENSUS == 0:
        merged = div_rn(s, tl.load(par_ptr + (T + 1)))
    else:
        positive = sign_of(v) >= 0  # a zero vote elects + (mergekit)
        ws = tl.zeros(w.shape, dtype=tl.float64)
        cnt = tl.zeros(w.shape, dtype=tl.int32)
        for t in tl.static_range(T):
            s, ws, cnt = agree_add(s, ws, cnt, ds[t], ds[t], tl.load(par_ptr + t), positive)
        merged = divide(s, ws, cnt, NORMALIZE)
    return add_to_base(w, merged, tl.load(par_ptr + T), WIDE)


@triton.jit
def _dare_block(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, par_ptr, fac_ptr, out_ptr, grp, n, keep_below,
    T: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, G: tl.constexpr,
    FULL: tl.constexpr = False,
):
    """A tile of [G, 4] consecutive elements (G Philox counters grp, one Philox call per 4
    elements): out = base + float(scale * merged) (_dare_mix). Elements whose float32 result or
    float64 vote ("sum") is NaN / Inf are computed again in float64. FULL: the whole tile lies
    inside n (unmasked loads, which vectorize)."""
    lane = tl.arange(0, 4)[None, :]
    offs = grp[:, None] * 4 + lane
    if FULL:
        mask = tl.full([G, 4], True, tl.int1)
    else:
        mask = offs < n
    fs = (f0, f1, f2, f3, f4, f5, f6, f7)
    w, ds, v, s = _dare_votes(base_ptr, fs, offs, mask, grp, lane, keep_below, par_ptr, fac_ptr, T, CONSENSUS,
                              False)
    r = _dare_mix(w, ds, v, s, par_ptr, T, CONSENSUS, NORMALIZE, False)
    bad = is_nonfinite(r)
    if CONSENSUS == 1:
        bad = bad | is_nonfinite(v)
    if any_set(bad):
        w64, d64, v64, s64 = _dare_votes(base_ptr, fs, offs, mask, grp, lane, keep_below, par_ptr, fac_ptr, T,
                                         CONSENSUS, True)
        r = tl.where(bad, _dare_mix(w64, d64, v64, s64, par_ptr, T, CONSENSUS, NORMALIZE, True), r)
    tl.store(out_ptr + offs, to_out(r, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dare_kernel(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, par_ptr, fac_ptr, out_ptr,
    n, keep_below,
    T: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, G: tl.constexpr,
):
    grp = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    _dare_block(base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, par_ptr, fac_ptr, out_ptr, grp, n, keep_below,
                T, CONSENSUS, NORMALIZE, G)


@triton.jit
def _dare_l1_add(sb, sk, f_ptr, offs, mask, w, grp, lane, keep_below, par_ptr, t: tl.constexpr, T: tl.constexpr):
    keep = _dare_task_keep(grp, lane, keep_below, par_ptr, t, T)
    mag, _ = reduce_tau(f_ptr, offs, mask, w, offs, par_ptr, par_ptr, t, False)
    return sb + mag, sk + tl.where(keep, mag, 0.0)


@triton.jit
def _dare_l1_store(part_ptr, sb, sk, t: tl.constexpr):
    tl.store(part_ptr + 2 * t, tl.sum(tl.sum(sb, axis=1), axis=0))
    tl.store(part_ptr + 2 * t + 1, tl.sum(tl.sum(sk, axis=1), axis=0))


@triton.jit
def _dare_l1_kernel(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, par_ptr, part_ptr,
    n, keep_below,
    T: tl.constexpr, G: tl.constexpr, ITERS: tl.constexpr,
):
    """The "l1" pre-pass: part[pid, t] = (sum |tau_t|, sum |tau_t| over kept entries) over ITERS
    tiles of [G, 4] elements, float64 lane accumulators reduced once at the end."""
    pid = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, 4)[None, :]
    b0 = tl.zeros([G, 4], dtype=tl.float64)
    b1 = tl.zeros([G, 4], dtype=tl.float64)
    b2 = tl.zeros([G, 4], dtype=tl.float64)
    b3 = tl.zeros([G, 4], dtype=tl.float64)
    b4 = tl.zeros([G, 4], dtype=tl.float64)
    b5 = tl.zeros([G, 4], dtype=tl.float64)
    b6 = tl.zeros([G, 4], dtype=tl.float64)
    b7 = tl.zeros([G, 4], dtype=tl.float64)
    k0 = tl.zeros([G, 4], dtype=tl.float64)
    k1 = tl.zeros([G, 4], dtype=tl.float64)
    k2 = tl.zeros([G, 4], dtype=tl.float64)
    k3 = tl.zeros([G, 4], dtype=tl.float64)
    k4 = tl.zeros([G, 4], dtype=tl.float64)
    k5 = tl.zeros([G, 4], dtype=tl.float64)
    k6 = tl.zeros([G, 4], dtype=tl.float64)
    k7 = tl.zeros([G, 4], dtype=tl.float64)
    for it in range(ITERS):
        grp = (pid * ITERS + it) * G + tl.arange(0, G)
        offs = grp[:, None] * 4 + lane
        mask = offs < n
        w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if T > 0:
            b0, k0 = _dare_l1_add(b0, k0, f0, offs, mask, w, grp, lane, keep_below, par_ptr, 0, T)
        if T > 1:
            b1, k1 = _dare_l1_add(b1, k1, f1, offs, mask, w, grp, lane, keep_below, par_ptr, 1, T)
        if T > 2:
            b2, k2 = _dare_l1_add(b2, k2, f2, offs, mask, w, grp, lane, keep_below, par_ptr, 2, T)
        if T > 3:
            b3, k3 = _dare_l1_add(b3, k3, f3, offs, mask, w, grp, lane, keep_below, par_ptr, 3, T)
        if T > 4:
            b4, k4 = _dare_l1_add(b4, k4, f4, offs, mask, w, grp, lane, keep_below, par_ptr, 4, T)
        if T > 5:
            b5, k5 = _dare_l1_add(b5, k5, f5, offs, mask, w, grp, lane, keep_below, par_ptr, 5, T)
        if T > 6:
            b6, k6 = _dare_l1_add(b6, k6, f6, offs, mask, w, grp, lane, keep_below, par_ptr, 6, T)
        if T > 7:
            b7, k7 = _dare_l1_add(b7, k7, f7, offs, mask, w, grp, lane, keep_below, par_ptr, 7, T)
    part = part_ptr + pid * (2 * T)
    if T > 0:
        _dare_l1_store(part, b0, k0, 0)
    if T > 1:
        _dare_l1_store(part, b1, k1, 1)
    if T > 2:
        _dare_l1_store(part, b2, k2, 2)
    if T > 3:
        _dare_l1_store(part, b3, k3, 3)
    if T > 4:
        _dare_l1_store(part, b4, k4, 4)
    if T > 5:
        _dare_l1_store(part, b5, k5, 5)
    if T > 6:
        _dare_l1_store(part, b6, k6, 6)
    if T > 7:
        _dare_l1_store(part, b7, k7, 7)


@triton.jit
def _dare_chunk_value(fs, offs, mask, w, grp, lane, keep_below, par_ptr, fac_ptr, t: tl.constexpr, T: tl.constexpr,
                      WIDE: tl.constexpr):
    """d_t of one task (csrc/cpu/dare.cpp): float(weights[t]) * (kept ? float(tau_t * factor_t) : 0);
    WIDE: weights[t] * (kept ? tau_t * factor_t : 0) in float64 from the exact tau."""
    keep = _dare_task_keep(grp, lane, keep_below, par_ptr, t, T)
    tau, wide = tau_wide(fs[t], offs, mask, w)
    if WIDE:
        d = tl.load(par_ptr + t) * tl.where(keep, wide * tl.load(fac_ptr + t), 0.0)
    else:
        d = tl.load(par_ptr + t).to(tl.float32) * tl.where(keep, (tau.to(tl.float64) * tl.load(fac_ptr + t)).to(tl.float32),
                                                           0.0)
    return d


@triton.jit
def _dare_chunk_vote(base_ptr, fs, par_ptr, fac_ptr, vote_ptr, offs, mask, grp, lane, keep_below,
                     T: tl.constexpr, CONSENSUS: tl.constexpr, FIRST: tl.constexpr, WIDE: tl.constexpr):
    """vote = (FIRST ? 0 : vote) + the chunk's d_t ("sum") or their signs ("count"), float64."""
    w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FIRST:
        v = tl.zeros(offs.shape, dtype=tl.float64)
    else:
        v = tl.load(vote_ptr + offs, mask=mask, other=0.0)
    for t in tl.static_range(T):
        d = _dare_chunk_value(fs, offs, mask, w, grp, lane, keep_below, par_ptr, fac_ptr, t, T, WIDE)
        if CONSENSUS == 1:
            v = v + d.to(tl.float64)
        else:
            v = v + sign_of(d).to(tl.float64)
    tl.store(vote_ptr + offs, v, mask=mask)


@triton.jit
def _dare_chunk_mix(base_ptr, fs, par_ptr, fac_ptr, sign_ptr, sum_ptr, wsum_ptr, cnt_ptr, offs, mask, grp, lane,
                    keep_below, T: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
                    FIRST: tl.constexpr, LAST: tl.constexpr, WIDE: tl.constexpr):
    """The sum of the chunk's d_t (consensus "none") or of those agreeing with the elected sign, their
    weights and count, carried from the chunk before (FIRST: from 0) and stored for the next, or
    (LAST) the merged float32 value returned: base + float(scale * sum / divisor), WIDE:
    float(base + scale * sum / divisor) (election.h's elect_and_mix). par: the chunk's dare_params,
    scale at T and the divisor of consensus "none" (over every task's weight) at T + 1."""
    w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s, ws, cnt = carried_sums(sum_ptr, wsum_ptr, cnt_ptr, offs, mask, FIRST)
    positive = tl.load(sign_ptr + offs, mask=mask, other=1) > 0
    for t in tl.static_range(T):
        d = _dare_chunk_value(fs, offs, mask, w, grp, lane, keep_below, par_ptr, fac_ptr, t, T, WIDE)
        if CONSENSUS == 0:
            s = s + d.to(tl.float64)
        else:
            s, ws, cnt = agree_add(s, ws, cnt, d, d, tl.load(par_ptr + t), positive)
    r = tl.zeros(offs.shape, dtype=tl.float32)
    if LAST:
        if CONSENSUS == 0:
            merged = div_rn(s, tl.load(par_ptr + (T + 1)))
        else:
            merged = divide(s, ws, cnt, NORMALIZE)
        r = add_to_base(w, merged, tl.load(par_ptr + T), WIDE)
    else:
        carry_sums(sum_ptr, wsum_ptr, cnt_ptr, offs, mask, s, ws, cnt)
    return r


@triton.jit
def _dare_chunk_kernel(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, par_ptr, fac_ptr, need_ptr, sign_ptr, vote_ptr, sum_ptr, wsum_ptr,
    cnt_ptr, res_ptr, out_ptr, n, keep_below,
    T: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    WIDE: tl.constexpr, PASS: tl.constexpr, G: tl.constexpr,
):
    """One chunk of up to MAX_TASKS tasks of a DARE merge over more, on tiles of [G, 4] elements (one
    Philox call per 4). PASS 0: the vote (_dare_chunk_vote); PASS 1: the sums (_dare_chunk_mix),
    LAST storing the float32 result into res. WIDE: in float64, only in the tiles holding an element
    with need[i] set; its PASS 1 LAST stores out for every tile, res where need is not set, the
    float64 result where it is."""
    grp = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    lane = tl.arange(0, 4)[None, :]
    offs = grp[:, None] * 4 + lane
    mask = offs < n
    fs = (f0, f1, f2, f3, f4, f5, f6, f7)
    need = mask
    work = True
    if WIDE:
        need = mask & (tl.load(need_ptr + offs, mask=mask, other=0) != 0)
        work = any_set(need)
    if PASS == 0:
        if work:
            _dare_chunk_vote(base_ptr, fs, par_ptr, fac_ptr, vote_ptr, offs, mask, grp, lane, keep_below, T, CONSENSUS,
                             FIRST, WIDE)
    else:
        if LAST:
            if WIDE:
                r = tl.load(res_ptr + offs, mask=mask, other=0.0)
                if work:
                    wide = _dare_chunk_mix(base_ptr, fs, par_ptr, fac_ptr, sign_ptr, sum_ptr, wsum_ptr, cnt_ptr, offs,
                                           mask, grp, lane, keep_below, T, CONSENSUS, NORMALIZE, FIRST, LAST, WIDE)
                    r = tl.where(need, wide, r)
                tl.store(out_ptr + offs, to_out(r, out_ptr.dtype.element_ty), mask=mask)
            else:
                r = _dare_chunk_mix(base_ptr, fs, par_ptr, fac_ptr, sign_ptr, sum_ptr, wsum_ptr, cnt_ptr, offs, mask,
                                    grp, lane, keep_below, T, CONSENSUS, NORMALIZE, FIRST, LAST, WIDE)
                tl.store(res_ptr + offs, r, mask=mask)
        elif work:
            _dare_chunk_mix(base_ptr, fs, par_ptr, fac_ptr, sign_ptr, sum_ptr, wsum_ptr, cnt_ptr, offs, mask, grp, lane,
                            keep_below, T, CONSENSUS, NORMALIZE, FIRST, LAST, WIDE)


def dare_threshold(density: float) -> int:
    """csrc/philox.h dare_threshold: floor(density * 2^32 + 0.5), at most 2^32."""
    t = density * 4294967296.0 + 0.5
    return 4294967296 if t >= 4294967296.0 else int(t)


def dare_factor(density: float) -> float:
    """csrc/philox.h dare_factor: 2^32 / dare_threshold(density), the reciprocal of the keep
    probability actually used (0 where nothing is kept)."""
    t = dare_threshold(density)
    return 4294967296.0 / t if t else 0.0


def dare_params(weights, density: float, keys, rescale: str, norm: int, scale: float) -> list[float]:
    """_dare_kernel's par: weights (T), scale, the divisor of consensus "none", the keys as (low,
    high) 32-bit words, then the rescale factor of each task."""
    T = len(weights)
    # consensus "none" divides the plain sum by one number (election.h).
    wsum = sum_in_order(weights)
    divisor = 1.0
    if norm == 1:
        divisor = 1.0 if abs(wsum) < 1e-8 else wsum
    elif norm == 2:
        divisor = float(max(T, 1))
    factor = dare_factor(density) if rescale == "density" else 1.0
    key_words = []
    for k in keys:
        k = int(k) & ((1 << 64) - 1)
        key_words += [k & 0xFFFFFFFF, k >> 32]
    return [float(w) for w in weights] + [scale, divisor] + key_words + [factor] * T


def dare_options(op: str, T: int, weights, density: float, rescale: str, consensus: str,
                 normalize: str) -> tuple[int, int]:
    """Checks dare's options; returns the (consensus, normalize) codes of the kernels."""
    if len(weights) != T:
        fail(op, f"{len(weights)} weights for {T} fine-tuned tensors")
    if not (density > 0.0 and density <= 1.0):
        fail(op, f"density must be in (0, 1], got {density}")
    if rescale not in ("density", "l1", "none"):
        fail(op, f'rescale must be "density", "l1" or "none", got "{rescale}"')
    return (parse_choice(op, consensus, CONSENSUS_CODES, "consensus", allow_none=True),
            parse_choice(op, normalize, NORMALIZE_CODES, "normalize"))


def _elected(votes: torch.Tensor) -> torch.Tensor:
    """sign_of(vote) as int32, a zero (or NaN) vote electing + (mergekit)."""
    return torch.where(votes < 0, -1, 1).to(torch.int32)


def _l1_factors(base, fs, par, keep_below, T: int) -> torch.Tensor:
    """rescale="l1": per task |tau_t|_1 / |kept tau_t|_1 (1 where either is below 1e-7: mergekit),
    float64 [T] on the device, from a two-stage float64 reduction (_dare_l1_kernel); fs: the task
    pointers of par's tasks."""
    n = base.numel()
    lblock = red_block(2 * T)
    iters = max(1, common.CHUNK // lblock)
    lgrid = grid_1d(n, lblock * iters)
    part = torch.empty((lgrid[0], T, 2), dtype=torch.float64, device=base.device)
    _dare_l1_kernel[lgrid](base, *fs, par, part, n, keep_below, T=T, G=lblock // 4, ITERS=iters, **common.LAUNCH)
    norms = part.sum(0)
    ok = (norms[:, 0] >= 1e-7) & (norms[:, 1] >= 1e-7)
    return torch.where(ok, norms[:, 0] / torch.where(ok, norms[:, 1], 1.0), 1.0).contiguous()


def _dare_chunks(base, finetuned, weights, density, keys, rescale, cons, norm, scale, out):
    """dare over more than MAX_TASKS tasks into out, in launches over chunks of MAX_TASKS tasks whose
    float64 sums carry from chunk to chunk in the C++ kernel's order (csrc/cpu/dare.cpp): for an
    election the votes over every chunk first, then each element's elected sign (a zero vote: +),
    then the sums over every chunk. The elements the C++ kernel computes again in float64 (a "sum"
    vote or a result that is NaN / Inf) take the same sweeps in float64, in the tiles holding one
    (the others read only the flags). Each chunk has its own dare_params (its weights, keys and
    factors; rescale="l1": its tasks' pre-pass), with the divisor of consensus "none" over every
    weight. Bitwise the C++ op's output."""
    T, n, device = len(finetuned), base.numel(), base.device
    keep_below = dare_threshold(density)
    divisor = dare_params(weights, density, [0] * T, rescale, norm, scale)[T + 1]
    chunks = []
    for t0 in range(0, T, MAX_TASKS):
        t1 = min(T, t0 + MAX_TASKS)
        row = dare_params(weights[t0:t1], density, keys[t0:t1], rescale, norm, scale)
        row[t1 - t0 + 1] = divisor
        par = scalar_params(device, row)
        fs = task_slots(base, finetuned[t0:t1])
        fac = _l1_factors(base, fs, par, keep_below, t1 - t0) if rescale == "l1" else par[3 * (t1 - t0) + 2:]
        chunks.append((t0, t1, fs, par, fac))
    vote = torch.empty(n, dtype=torch.float64, device=device)
    sums = torch.empty(n, dtype=torch.float64, device=device)
    wsums = torch.empty(n, dtype=torch.float64, device=device)
    counts = torch.empty(n, dtype=torch.int32, device=device)
    result = torch.empty(n, dtype=torch.float32, device=device)
    G = election_block(MAX_TASKS) // 4  # float64 sums of 8 tasks: the election kernels' tiles

    def sweep(pass_, wide, need, sign):
        for t0, t1, fs, par, fac in chunks:
            _dare_chunk_kernel[grid_1d(n, 4 * G)](
                base, *fs, par, fac, need, sign, vote, sums, wsums, counts, result, out, n, keep_below,
                T=t1 - t0, CONSENSUS=cons, NORMALIZE=norm, FIRST=t0 == 0, LAST=t1 == T, WIDE=wide, PASS=pass_, G=G,
                **common.LAUNCH,
            )

    no_flags = torch.zeros(n, dtype=torch.bool, device=device)
    signs = counts  # consensus "none" elects nothing
    overflowed = no_flags
    if cons:
        sweep(0, False, no_flags, counts)
        signs = _elected(vote)
        if cons == 1:  # a float64 vote of float32 values that is NaN / Inf: the float64 vote there
            overflowed = ~torch.isfinite(vote)
            sweep(0, True, overflowed, counts)
            signs = torch.where(overflowed, _elected(vote), signs)
    sweep(1, False, no_flags, signs)
    need = ~torch.isfinite(result) | overflowed
    if cons:
        sweep(0, True, need, counts)
        signs = _elected(vote)
    sweep(1, True, need, signs)


def dare(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    keys: Sequence[int],
    rescale: str = "density",
    consensus: str = "none",
    normalize: str = "none",
    scale: float = 1.0,
) -> torch.Tensor:
    """torch.ops.neurokern.dare. The keep mask is csrc/philox.h's, bit for bit. rescale="l1" runs a
    pre-pass (two-stage float64 reduction of sum |tau_t| and sum |kept tau_t|); the factors stay on
    the device. T > MAX_TASKS: in chunks of MAX_TASKS tasks (_dare_chunks), bitwise the same."""
    op = "dare"
    check_group(op, base, finetuned)
    T = len(finetuned)
    if len(keys) != T:
        fail(op, f"{len(keys)} keys for {T} fine-tuned tensors")
    cons, norm = dare_options(op, T, weights, density, rescale, consensus, normalize)
    check_storage(op, base.dtype)
    out = torch.empty_like(base)
    n = base.numel()
    if n == 0:
        return out
    if T > MAX_TASKS:
        _dare_chunks(base, finetuned, weights, density, keys, rescale, cons, norm, scale, out)
        return out
    par = scalar_params(base.device, dare_params(weights, density, keys, rescale, norm, scale))
    fac = par[T + 2 + 2 * T:]
    block = election_block(T)
    keep_below = dare_threshold(density)
    fs = task_slots(base, finetuned)
    if rescale == "l1":  # mergekit: match the L1 norm of the task vector, unless either is ~0
        fac = _l1_factors(base, fs, par, keep_below, T)
    _dare_kernel[grid_1d(n, block)](base, *fs, par, fac, out, n, keep_below, T=T, CONSENSUS=cons,
                                     NORMALIZE=norm, G=block // 4, **common.LAUNCH)
    return out


@triton.jit(do_not_specialize=["nt"], do_not_specialize_on_alignment=["par_ptr", "like_in"])
def _dare_multi_kernel(
    table, owner, par_ptr, like_in, nt, keep_below, PAR: tl.constexpr,
    T: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, G: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid, j, local, n, offset = program_tensor(table, owner, nt)
    b, f0, f1, f2, f3, f4, f5, f6, f7 = table_inputs(table, nt, j, like_in, T, ALIGNED)
    out_ptr = table_ptr(table, 4, nt, j, like_in, ALIGNED)
    par = par_ptr + j * PAR
    grp = local * G + tl.arange(0, G)
    if (local + 1) * G * 4 <= n:  # a whole tile: unmasked
        _dare_block(b, f0, f1, f2, f3, f4, f5, f6, f7, par, par + (T + 2 + 2 * T), out_ptr,
                       grp, n, keep_below, T, CONSENSUS, NORMALIZE, G, True)
    else:
        _dare_block(b, f0, f1, f2, f3, f4, f5, f6, f7, par, par + (T + 2 + 2 * T), out_ptr,
                       grp, n, keep_below, T, CONSENSUS, NORMALIZE, G, False)


def dare_multi(base, finetuned, weights, density, keys, rescale="density", consensus="none",
               normalize="none", scale=1.0):
    """torch.ops.neurokern.dare_multi: one launch per storage dtype of the list; tensor i's row of
    per-call scalars carries its keys."""
    op = "dare_multi"
    n, T = len(base), tasks(base, finetuned)
    block = election_block(T)
    fused = T <= MAX_TASKS and rescale != "l1"
    outs, _, launches, _ = prepare(op, base, finetuned, block if fused else 0, outputs=fused)
    if len(keys) != n * T:
        fail(op, f"keys must hold n * T = {n * T} entries (keys[i * T + t]), got {len(keys)}")
    cons, norm = dare_options(op, T, weights, density, rescale, consensus, normalize)
    if not fused:
        return [dare(base[i], column, weights, density, keys[i * T:(i + 1) * T], rescale, consensus, normalize,
                        scale) for i, column in enumerate(columns(finetuned, n))]
    # dare_params per tensor: the same numbers but each tensor's keys as (low, high) 32-bit words.
    row = dare_params(weights, density, [0] * T, rescale, norm, scale)
    key = torch.tensor(keys, dtype=torch.int64).view(n, T)
    words = torch.stack([key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF], dim=2).view(n, 2 * T)
    host = torch.tensor(row, dtype=torch.float64).repeat(n, 1)
    host[:, T + 2:3 * T + 2] = words
    par = to_device(host, base[0].device)
    keep_below = dare_threshold(density)
    for g in launches:
        _dare_multi_kernel[(g.programs,)](
            g.table, g.owner, g.rows_of(par, n), base[g.first], g.nt, keep_below, PAR=len(row),
            T=T, CONSENSUS=cons, NORMALIZE=norm, G=block // 4, ALIGNED=g.aligned, **common.LAUNCH,
        )
    return outs


registry.register("dare", dare)
registry.register("dare_multi", dare_multi)
