"""Triton launchers of weighted_sum (+ backward), ties_merge, dare (neurokern/ops/triton/weighted_sum.py,
ties_merge.py, dare.py) and trim_l1 (trim_l1.py: one launch over the list) against the float64
reference and the C++ CPU op.

Without a GPU the launchers run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with one, the same tests run the compiled kernels on CUDA tensors, and the
tests at the end run the ops through torch.ops.neurokern at the shapes of real models.

Tolerances:
- Element-wise outputs are bitwise equal to the C++ op's (same float32 / float64 operations in the
  same order: see the kernel module's docstring); against the float64 reference, float32 outputs
  are within rtol 1e-6 of |ref| plus 1e-6 of the tensor's largest |ref|, bfloat16 / float16 outputs
  within one ulp of the float64 reference rounded to their dtype (rtol 2**-7 / 2**-10).
- Reductions (weighted_sum_backward per tensor / per row, trim_l1) are float64 sums in another
  order: float32 gradients within rtol 1e-6 (+ 1e-9 absolute), trim_l1 within rtol 1e-12.
  Per-element gradients are single float32 products: bitwise.
- The DARE keep mask equals reference.dare_keep bit for bit.
"""
import itertools
import math
import zlib

import pytest
import torch
import triton
import triton.language as tl

import neurokern.ops as nk
from neurokern.ops import reference as ref
from neurokern.ops.triton import common
from neurokern.ops.triton import dare as DR
from neurokern.ops.triton import ties_merge as TM
from neurokern.ops.triton import trim_l1 as TL
from neurokern.ops.triton import weighted_sum as WS

from ops.groups import make_group

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
OPS = torch.ops.neurokern
INT64_MAX = torch.iinfo(torch.int64).max

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]
TASKS = [1, 2, 3, 5, 8]
# Dyadic weights (some negative): exact subset sums, so a vote that is 0 in exact arithmetic is 0
# in the kernel and in the float64 reference alike, and "weights" divisors are 0 or >= 1/8.
WEIGHTS = [1.0, 0.5, -0.25, 2.0, 0.75, -1.5, 1.25, 0.375]
# Generic weights for the bitwise comparisons with the C++ op (any weights work there).
GENERIC = [0.8371, 1.2193, 0.5561, -0.3117, 0.9437, 0.6889, 1.4041, 0.7723]


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def f64_group(base, fts):
    """The same group in float64, with finetuned64 - base64 exactly the float32 task vectors."""
    b64 = base.double()
    out = []
    for f in fts:
        tau = f.float() - base.float()
        f64 = b64 + tau.double()
        assert torch.equal(f64 - b64, tau.double())
        out.append(f64)
    return b64, out


def dev(x):
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [dev(y) for y in x]
    return x.to(DEV)


def _ordinal(x):
    itype = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[x.dtype]
    bits = x.contiguous().view(itype).long()
    sign_bit = 1 << (torch.finfo(x.dtype).bits - 1)
    mag = bits & (sign_bit - 1)
    return torch.where(bits < 0, -mag, mag)


def _ulp(x64, dtype):
    """Spacing of dtype's values at |x64| (float64 in, float64 out)."""
    p, emin = {torch.float32: (23, -126), torch.bfloat16: (7, -126), torch.float16: (10, -14)}[dtype]
    _, e = torch.frexp(x64)
    return torch.ldexp(torch.ones_like(x64), torch.clamp(e.long() - 1, min=emin) - p)


def assert_vs_f64(out, want64, mag=None, terms=0):
    """float32: rtol 1e-6 of |ref| + 1e-6 of max |ref|; bf16 / fp16: at most one ulp of the float64
    reference rounded to the output dtype. With mag (sum of the magnitudes of the `terms` float32
    products summed per element): also within one ulp + terms * 2^-23 * mag, the float32
    accumulation's error bound, which matters where the terms cancel."""
    out = out.cpu()
    assert out.shape == want64.shape
    assert torch.isfinite(out.float()).all()
    if out.numel() == 0:
        return
    err = (out.double() - want64).abs()
    ok = torch.zeros(out.shape, dtype=torch.bool)
    if mag is not None and out.dtype != torch.float64:
        ok = err <= _ulp(want64.abs(), out.dtype) + terms * 2.0**-23 * mag
    if out.dtype == torch.float32:
        tol = 1e-6 * want64.abs() + 1e-6 * want64.abs().max()
        bad = ~((err <= tol) | ok)
        assert not bool(bad.any()), float(err[bad].max())
    elif out.dtype == torch.float64:
        torch.testing.assert_close(out, want64, rtol=1e-6, atol=1e-6 * float(want64.abs().max()))
    else:
        dist = (_ordinal(out) - _ordinal(want64.to(out.dtype))).abs()
        bad = (dist > 1) & ~ok
        assert not bool(bad.any()), f"{int(dist[bad].max())} ulp apart"


def ws_mag(b64, f64, a, trim, offset=0):
    """Per element: |a0 w| + sum_t |a_t trim(tau_t)| (float64)."""
    a = a.to(b64.device).double()
    mag = ref._expand_coeff(a[0], b64).abs() * b64.abs()
    for t, f in enumerate(f64):
        mag = mag + ref._expand_coeff(a[t + 1], b64).abs() * ref.trimmed(f - b64, trim, t, offset).abs()
    return mag


def assert_bitwise(out, want):
    out = out.cpu()
    assert out.dtype == want.dtype and out.shape == want.shape
    assert torch.equal(out, want), float((out.double() - want.double()).abs().max())


def trim_for(base, fts, frac, keep_ties, prefix=None):
    """(threshold, tie_limit) keeping frac of the entries per task (CPU op), optionally over a list
    scope [prefix, base] (then base's offset is prefix.numel())."""
    T = len(fts)
    if T == 0:
        return None, None
    bases, flat = [base], list(fts)
    if prefix is not None:
        pb, pf = prefix
        bases = [pb, base]
        flat = [x for t in range(T) for x in (pf[t], fts[t])]
    N = sum(b.numel() for b in bases)
    k = [max(1, int(frac * N) + t) for t in range(T)]
    return nk.magnitude_threshold(bases, flat, k, keep_ties=keep_ties)


def _coeffs(layout, shape, T, seed):
    g = torch.Generator().manual_seed(seed)
    tail = {"tensor": (), "row": (shape[0],), "element": tuple(shape)}[layout]
    a = torch.randn((T + 1,) + tail, generator=g)
    a[0] = 0.5 + torch.rand(tail, generator=g)
    return a


# ---------------------------------------------------------------------------------------------
# weighted_sum and its backward

# (shape, coefficient layout, trimmed): every layout on odd shapes, each with and without trim.
WS_CASES = [
    ((1, 1), "row", True), ((17, 1), "element", True), ((1, 33), "row", False),
    ((33, 65), "tensor", True), ((33, 65), "element", False), ((5,), "row", True),
    ((0, 7), "element", True), ((0, 7), "row", False), ((3, 2, 5), "row", False),
    ((7, 9), "tensor", False), ((2, 40), "row", True),
    # rows and chunks that are whole blocks: the backward's unmasked loads
    ((4, 16), "row", True), ((2, 4096), "tensor", False),
]


def _check_ws(base, fts, a, thr, lim, offset=0, out_dtype=None):
    trim = (thr, lim) if thr is not None else None
    out = WS.weighted_sum(dev(base), dev(fts), dev(a), dev(thr), dev(lim), offset, out_dtype)
    assert out.device.type == DEV and out.dtype == (out_dtype or base.dtype)
    assert_bitwise(out, OPS.weighted_sum.default(base, fts, a, thr, lim, offset, out_dtype))
    b64, f64 = f64_group(base, fts)
    assert_vs_f64(out, ref.weighted_sum(b64, f64, a.double(), trim, offset, torch.float64),
                  ws_mag(b64, f64, a, trim, offset), len(fts) + 1)
    # backward: per tensor / per row are float64 sums (order differs), per element is exact.
    g = torch.randn(base.shape, generator=torch.Generator().manual_seed(7))
    grad = WS.weighted_sum_backward(dev(g), dev(base), dev(fts), dev(a), dev(thr), dev(lim), offset).cpu()
    assert grad.dtype == torch.float32 and grad.shape == a.shape
    if base.numel():  # (the reference's per-row reshape fails on 0 rows)
        want = ref.weighted_sum_backward(g.double(), b64, f64, a, trim, offset)
        if a.dim() > 1 and a.shape[1:] == base.shape:
            assert torch.equal(grad, want)
        else:
            torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-9)
    cpu = OPS.weighted_sum_backward.default(g, base, fts, a, thr, lim, offset)
    torch.testing.assert_close(grad, cpu, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_weighted_sum(dtype, T):
    for i, (shape, layout, trimmed) in enumerate(WS_CASES):
        if T == 8 and layout == "row" and shape[0] > 8:
            continue  # per-row programs are one per row: slow in the interpreter
        base, fts = make_group(shape, T, dtype, seed_of("ws", shape, T, dtype), exact_grid=i % 2 == 1)
        thr, lim = trim_for(base, fts, 0.3, keep_ties=i % 4 < 2) if trimmed else (None, None)
        _check_ws(base, fts, _coeffs(layout, shape, T, seed_of("wsa", i, T)), thr, lim)


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["same", "f32", "bf16", "f16", "f64"])
@pytest.mark.parametrize("layout", ["tensor", "row", "element"])
def test_weighted_sum_list_scope_offset_out_dtype(layout, out_dtype):
    T, dtype = 2, torch.bfloat16
    prefix = make_group((3, 3), T, dtype, seed_of("wsp"), exact_grid=True)
    base, fts = make_group((33, 65), T, dtype, seed_of("wso"), exact_grid=True)
    thr, lim = trim_for(base, fts, 0.4, keep_ties=False, prefix=prefix)
    assert (lim < INT64_MAX).any()  # some task's tie limit cuts through equal magnitudes
    _check_ws(base, fts, _coeffs(layout, (33, 65), T, seed_of("wsoa", layout)), thr, lim, 9, out_dtype)


def test_weighted_sum_no_tasks_and_int_out_dtype():
    base, _ = make_group((9, 4), 0, torch.float16, 3)
    a = torch.tensor([1.5])
    _check_ws(base, [], a, None, None)
    out = WS.weighted_sum(dev(base), [], dev(a), out_dtype=torch.int32)  # via a float32 buffer
    assert out.dtype == torch.int32 and torch.equal(out.cpu(), OPS.weighted_sum.default(base, [], a, None, None, 0, torch.int32))


def test_bfloat16_output_rounds_to_nearest_even():
    """float32 -> bfloat16 output rounding on halfway and boundary cases (the interpreter's own
    cast truncates; the kernels round with integer ops): equal to torch's conversion."""
    vals = [1.0, 1.00390625, 1.01171875, 1.0078125 + 2**-20, -1.00390625, 3.4e38, -3.4e38, 1e-40,
            -0.0, 0.0, 2**-126, 1.9999999, 65504.0, float("inf"), float("-inf"), 255.5, 256.5]
    base = torch.tensor(vals, dtype=torch.float32)
    bits = torch.randint(0, 2**31 - 1, (999,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    rnd = bits.view(torch.float32)
    rnd = torch.where(torch.isfinite(rnd), rnd, 0.0)
    base = torch.cat([base, rnd, -rnd])
    out = WS.weighted_sum(dev(base), [], dev(torch.tensor([1.0])), out_dtype=torch.bfloat16).cpu()
    assert torch.equal(out.view(torch.int16), base.to(torch.bfloat16).view(torch.int16))
    nan = WS.weighted_sum(dev(torch.tensor([float("nan")])), [], dev(torch.tensor([1.0])), out_dtype=torch.bfloat16)
    assert torch.isnan(nan.cpu()).all()


def test_trim_positions_beyond_int32():
    """Flat positions offset + i past 2^31 and 2^32 with a tie limit in between: int64 compares."""
    base = torch.zeros(40)
    tau = torch.tensor([0.5, -0.5, 0.25, 0.5, -1.0] * 8)
    fts = [base + tau, base - tau]
    offset = 2**32 + 5
    thr = torch.tensor([0.5, 0.5])
    lim = torch.tensor([offset + 10, offset + 3])
    for off in (offset, 2**31 - 20):
        _check_ws(base, fts, torch.tensor([1.0, 0.5, 2.0]), thr, lim, off)
        out = TM.ties_merge(dev(base), dev(fts), [1.0, 0.5], dev(thr), dev(lim), off, zero_sign="majority")
        assert_bitwise(out, OPS.ties_merge.default(base, fts, [1.0, 0.5], thr, lim, off, "sum", "weights",
                                                   True, "majority", 1.0))
        want = ref.ties_merge(base.double(), [f.double() for f in fts], [1.0, 0.5], (thr, lim), off,
                              zero_sign="majority")
        assert_vs_f64(out, want)


# ---------------------------------------------------------------------------------------------
# ties_merge

TIES_OPTIONS = list(itertools.product(["sum", "count"], ["weights", "count", "none"], [True, False],
                                      ["positive", "majority"]))


def _check_ties(base, fts, weights, thr, lim, offset=0, dyadic=True, **kw):
    trim = (thr, lim) if thr is not None else None
    out = TM.ties_merge(dev(base), dev(fts), weights, dev(thr), dev(lim), offset, **kw)
    assert out.dtype == base.dtype
    opts = dict(consensus="sum", normalize="weights", elect_weighted=True, zero_sign="positive", scale=1.0)
    opts.update(kw)
    assert_bitwise(out, OPS.ties_merge.default(base, fts, weights, thr, lim, offset, *opts.values()))
    if dyadic:
        b64, f64 = f64_group(base, fts)
        assert_vs_f64(out, ref.ties_merge(b64, f64, weights, trim, offset, **kw))
    return out


@pytest.mark.parametrize("opts", TIES_OPTIONS, ids=["-".join(map(str, o)) for o in TIES_OPTIONS])
def test_ties_options(opts):
    consensus, normalize, elect_weighted, zero_sign = opts
    i = TIES_OPTIONS.index(opts)
    T, dtype = TASKS[i % 5], DTYPES[i % 3]
    base, fts = make_group((33, 65), T, dtype, seed_of("to", i), exact_grid=i % 2 == 0)
    thr, lim = trim_for(base, fts, 0.3, keep_ties=i % 4 < 2)
    kw = dict(consensus=consensus, normalize=normalize, elect_weighted=elect_weighted, zero_sign=zero_sign)
    _check_ties(base, fts, WEIGHTS[:T], thr, lim, 4, scale=0.7, **kw)
    _check_ties(base, fts, GENERIC[:T], None, None, dyadic=False, **kw)


@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ties_shapes(dtype, T):
    shapes = [(1, 1), (17, 1), (1, 33), (33, 65), (5,), (0, 7), (3, 2, 5)]
    for i, shape in enumerate(shapes):
        base, fts = make_group(shape, T, dtype, seed_of("ts", shape, T, dtype), exact_grid=i % 2 == 0)
        thr, lim = trim_for(base, fts, 0.35, keep_ties=False) if i % 2 else (None, None)
        opts = [dict(), dict(consensus="count", normalize="count", elect_weighted=False, zero_sign="majority")]
        _check_ties(base, fts, WEIGHTS[::-1][:T], thr, lim, scale=1.5, **opts[i % 2])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_ties_zero_votes(consensus, dtype):
    """tau_2 = -tau_1 exactly: every vote is 0. "positive" elects +; "majority" finds no majority
    (fallback 0) and elects the negative side."""
    g = torch.Generator().manual_seed(seed_of("zv", dtype))
    base = (torch.randint(-8, 8, (6, 5), generator=g) / 4).to(dtype)
    tau = torch.randint(-4, 5, (6, 5), generator=g) / 64
    fts = [(base.float() + tau).to(dtype), (base.float() - tau).to(dtype)]
    for zero_sign, sign in (("positive", 1.0), ("majority", -1.0)):
        out = _check_ties(base, fts, [1.0, 1.0], None, None, consensus=consensus, zero_sign=zero_sign)
        assert torch.equal(out.cpu().float(), base.float() + sign * tau.abs())
    # A majority: one element where both tasks move up makes the fallback +.
    fts[0][0, 0] = fts[1][0, 0] = (base[0, 0].float() + 0.5).to(dtype)
    out = _check_ties(base, fts, [1.0, 1.0], None, None, consensus=consensus, zero_sign="majority")
    assert torch.equal(out.cpu().float()[1:], (base.float() + tau.abs())[1:])


def test_ties_hand():
    base = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    f1 = base + torch.tensor([[0.5, -0.25, 2.0], [0.0, 1.0, -1.0]])
    f2 = base + torch.tensor([[-1.0, 0.5, 0.0], [0.25, -1.0, 0.5]])
    trim = (torch.tensor([1.0, 0.4]), torch.tensor([5, INT64_MAX]))
    out = _check_ties(base, [f1, f2], [1.0, 1.0], *trim)
    assert out.cpu().tolist() == [[0.0, 1.5, 3.0], [1.0, 2.0, 1.5]]


# ---------------------------------------------------------------------------------------------
# dare

DARE_OPTIONS = list(itertools.product(["density", "l1", "none"], ["none", "sum", "count"],
                                      ["none", "weights", "count"]))


def _check_dare(base, fts, weights, density, keys, vs_ref=True, **kw):
    out = DR.dare(dev(base), dev(fts), weights, density, keys, **kw)
    assert out.dtype == base.dtype
    opts = dict(rescale="density", consensus="none", normalize="none", scale=1.0)
    opts.update(kw)
    assert_bitwise(out, OPS.dare.default(base, fts, weights, density, keys, *opts.values()))
    if vs_ref:
        b64, f64 = f64_group(base, fts)
        assert_vs_f64(out, ref.dare(b64, f64, weights, density, keys, **kw))
    return out


@pytest.mark.parametrize("opts", DARE_OPTIONS, ids=["-".join(o) for o in DARE_OPTIONS])
def test_dare_options(opts):
    rescale, consensus, normalize = opts
    i = DARE_OPTIONS.index(opts)
    T, dtype = TASKS[i % 5], DTYPES[i % 3]
    base, fts = make_group((33, 65), T, dtype, seed_of("do", i))
    keys = nk.dare_keys(i, "x", T)
    kw = dict(rescale=rescale, consensus=consensus, normalize=normalize, scale=0.8)
    # density 0.5 rescales exactly: zero votes stay exactly zero on both sides.
    _check_dare(base, fts, WEIGHTS[:T], 0.5, keys, **kw)
    # Any density and weights: bitwise against the C++ op; against the reference where no vote
    # can cancel exactly (continuous float32 task vectors).
    _check_dare(base, fts, GENERIC[:T], 0.35, keys, vs_ref=dtype == torch.float32 or consensus == "none", **kw)


@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dare_shapes(dtype, T):
    shapes = [(1, 1), (17, 1), (1, 33), (33, 65), (5,), (0, 7), (3, 2, 5)]
    for i, shape in enumerate(shapes):
        base, fts = make_group(shape, T, dtype, seed_of("ds", shape, T, dtype))
        opts = [dict(), dict(rescale="l1", consensus="sum", normalize="weights")][i % 2]
        _check_dare(base, fts, WEIGHTS[:T], 0.5, nk.dare_keys(3, str(shape), T), **opts)


def _kernel_mask(numel, density, key):
    """The keep mask as the kernel draws it: one task, weight 1, no rescale, base 0, float32 values
    1..numel: out = tau exactly where kept, 0 where dropped."""
    base = torch.zeros(numel)
    ft = torch.arange(1, numel + 1, dtype=torch.float32)
    out = DR.dare(dev(base), [dev(ft)], [1.0], density, [key], rescale="none").cpu()
    kept = out != 0
    assert torch.equal(out[kept], ft[kept])
    return kept


@pytest.mark.parametrize("key", [0, 1, -1, 2**62 + 12345, -(2**63), 2**63 - 1, 0xFFFFFFFF, 2**32])
def test_dare_mask_equals_reference(key):
    numel = 3001  # not a multiple of 4: the last Philox block is partial
    for density in (2**-25, 0.05, 0.3, 0.5, 0.999, 1.0):
        assert torch.equal(_kernel_mask(numel, density, key), ref.dare_keep(numel, density, key))
    # Random123's known answer: key 0, counter 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
    assert _kernel_mask(4, 0.61, 0).tolist() == [True, False, False, True]


@triton.jit
def _draws_kernel(out_ptr, keys_ptr, grp_start, KEEP: tl.constexpr, G: tl.constexpr):
    """Test kernel: the keep mask of elements 4 * grp_start + [0, 4 G) for one key, threshold KEEP."""
    grp = grp_start + tl.arange(0, G).to(tl.int64)
    lane = tl.arange(0, 4)[None, :]
    k0 = tl.load(keys_ptr).to(tl.uint32)
    k1 = tl.load(keys_ptr + 1).to(tl.uint32)
    keep = DR._dare_keep(grp, lane, k0, k1, KEEP)
    offs = tl.arange(0, G)[:, None] * 4 + lane
    tl.store(out_ptr + offs, keep.to(tl.int8))


@pytest.mark.parametrize("start", [2**30 - 3, 2**32 - 5, 2**34 + 7, 2**61 - 9])
def test_dare_mask_at_large_indices(start):
    """Counters past 2^32 (element indices past 2^34) use both counter words: the kernel's mask at
    those indices equals csrc/philox.h's (the reference's Philox on int64 counters)."""
    G, key, density = 64, -(2**63) + 987654321, 0.5
    kw = DR.dare_threshold(density)
    u = key & ((1 << 64) - 1)
    keys = dev(torch.tensor([u & 0xFFFFFFFF, u >> 32], dtype=torch.float64))
    out = dev(torch.zeros(4 * G, dtype=torch.int8))
    _draws_kernel[(1,)](out, keys, start, KEEP=kw, G=G)
    grp = torch.arange(start, start + G, dtype=torch.int64)
    lanes = ref.philox4x32_10(grp & 0xFFFFFFFF, grp >> 32, u)
    draws = torch.stack(lanes, 1).flatten()
    assert torch.equal(out.cpu().bool(), draws < kw)


@triton.jit
def _div_kernel(a_ptr, b_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, common.div_rn(tl.load(a_ptr + offs), tl.load(b_ptr + offs)))


def test_division_is_correctly_rounded():
    """The kernels' float64 division (reciprocal + Markstein correction) equals IEEE division on
    sums of float32 values divided by weight sums, counts and arbitrary numbers."""
    g = torch.Generator().manual_seed(5)
    n = 4096 * 4
    a = (torch.randn(n, 8, generator=g) * torch.rand(n, 8, generator=g) ** 8).float().double().sum(1)
    a[:64] = 0.0
    b = torch.cat([torch.randn(n // 4, generator=g).double() * 10.0 ** torch.randint(-6, 6, (n // 4,), generator=g),
                   torch.randint(1, 9, (n // 4,), generator=g).double(),
                   torch.tensor(GENERIC).double()[torch.randint(0, 8, (n // 4, 3), generator=g)].sum(1),
                   torch.rand(n // 4, generator=g).double() + 0.5])
    out = dev(torch.empty(n, dtype=torch.float64))
    _div_kernel[(n // 4096,)](dev(a), dev(b), out, BLOCK=4096)
    assert torch.equal(out.cpu(), a / b)


@triton.jit
def _stored_kernel(x_ptr, out_ptr, flag_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, common.to_out(x, out_ptr.dtype.element_ty))
    tl.store(flag_ptr + offs, common.stores_nonfinite(x, out_ptr.dtype.element_ty).to(tl.int8))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_stores_nonfinite_at_the_rounding_boundary(dtype):
    """stores_nonfinite (ties_merge_multi's flags) marks exactly the float32 values that to_out
    stores as NaN / Inf, as torch rounds them: around each dtype's maximum, the midpoint to the next
    power of two (round-to-nearest-even takes it to Inf) and the float32 values beside it."""
    top = torch.finfo(dtype).max
    edge = torch.tensor([top], dtype=torch.float64) + (2.0**119 if dtype == torch.bfloat16 else 16.0)  # half a step
    near = [top, float(edge)] if dtype != torch.float32 else [top]
    x = torch.tensor(near + [3.4028e38, 1e38, 65504.0, 65519.0, 0.0, -1.5, math.inf, math.nan], dtype=torch.float32)
    x = torch.cat([x, torch.nextafter(x, torch.full_like(x, math.inf)), torch.nextafter(x, torch.zeros_like(x))])
    x = torch.cat([x, -x])
    block = triton.next_power_of_2(x.numel())
    x = torch.cat([x, torch.zeros(block - x.numel())])
    out, flags = dev(torch.empty(block, dtype=dtype)), dev(torch.empty(block, dtype=torch.int8))
    _stored_kernel[(1,)](dev(x), out, flags, BLOCK=block)
    stored = x.to(dtype)
    torch.testing.assert_close(out.cpu(), stored, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(flags.cpu().bool(), ~torch.isfinite(stored))
    assert dtype == torch.float32 or 0 < int((~torch.isfinite(stored) & torch.isfinite(x)).sum())


# ---------------------------------------------------------------------------------------------
# trim_l1


def _list_group(shapes, T, dtype, tag, quantize=False):
    group = [make_group(s, T, dtype, seed_of(tag, s, T, dtype, i), exact_grid=quantize) for i, s in enumerate(shapes)]
    return [b for b, _ in group], [group[i][1][t] for t in range(T) for i in range(len(shapes))]


@pytest.mark.parametrize("T", TASKS + [10])
@pytest.mark.parametrize("scope", ["none", "global", "global_exact", "per_tensor"])
def test_trim_l1(scope, T):
    dtype = DTYPES[T % 3]
    shapes = [(33, 65), (0, 5), (7,), (3, 2, 5), (1, 1)]
    bases, fts = _list_group(shapes, T, dtype, "l1", quantize=T % 2 == 0)
    N = sum(b.numel() for b in bases)
    trim = None
    if scope in ("global", "global_exact"):
        k = [max(1, (N * (t + 1)) // (T + 2)) for t in range(T)]
        trim = nk.magnitude_threshold(bases, fts, k, keep_ties=scope == "global")
    elif scope == "per_tensor":
        k = [b.numel() // 3 + t for b in bases for t in range(T)]
        trim = nk.magnitude_threshold(bases, fts, k, keep_ties=False, per_tensor=True)
    thr, lim = trim if trim is not None else (None, None)
    got = TL.trim_l1(dev(bases), dev(fts), dev(thr), dev(lim))
    assert got.dtype == torch.float64 and got.shape == (T, 2) and got.device.type == DEV
    torch.testing.assert_close(got.cpu(), ref.trim_l1(bases, fts, trim), rtol=1e-12, atol=0)
    torch.testing.assert_close(got.cpu(), OPS.trim_l1.default(bases, fts, thr, lim), rtol=1e-12, atol=0)


def test_trim_l1_hand():
    base = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    tau = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    thr = torch.tensor([3.0])
    assert TL.trim_l1([dev(base)], [dev(base + tau)], dev(thr), dev(torch.tensor([INT64_MAX]))).tolist() == [[21.0, 18.0]]
    assert TL.trim_l1([dev(base)], [dev(base + tau)], dev(thr), dev(torch.tensor([2]))).tolist() == [[21.0, 15.0]]


# ---------------------------------------------------------------------------------------------
# More tasks than the kernels unroll, the GPU launch configuration, argument checks


def test_more_tasks_than_kernel_slots():
    T = 9
    base, fts = make_group((6, 7), T, torch.bfloat16, seed_of("t9"), exact_grid=True)
    thr, lim = trim_for(base, fts, 0.5, keep_ties=False)
    a = _coeffs("row", (6, 7), T, 1)
    out = WS.weighted_sum(dev(base), dev(fts), dev(a), dev(thr), dev(lim))
    b64, f64 = f64_group(base, fts)
    assert_vs_f64(out, ref.weighted_sum(b64, f64, a.double(), (thr, lim), 0, torch.float64),
                  ws_mag(b64, f64, a, (thr, lim)), T + 1)
    grad = WS.weighted_sum_backward(dev(torch.ones(6, 7)), dev(base), dev(fts), dev(a), dev(thr), dev(lim))
    torch.testing.assert_close(grad.cpu(), OPS.weighted_sum_backward.default(torch.ones(6, 7), base, fts, a, thr, lim),
                               rtol=1e-6, atol=1e-9)
    w = (WEIGHTS * 2)[:T]
    out = TM.ties_merge(dev(base), dev(fts), w, dev(thr), dev(lim), zero_sign="majority")
    assert_vs_f64(out, ref.ties_merge(*f64_group(base, fts), w, (thr, lim), zero_sign="majority"))
    out = DR.dare(dev(base), dev(fts), w, 0.5, nk.dare_keys(0, "w", T), consensus="sum")
    assert_vs_f64(out, ref.dare(*f64_group(base, fts), w, 0.5, nk.dare_keys(0, "w", T), consensus="sum"))


@pytest.fixture
def gpu_blocks(monkeypatch):
    """The GPU's launch configuration (many programs per tensor) in the interpreter too."""
    monkeypatch.setattr(common, "BLOCK", 1024)
    monkeypatch.setattr(common, "RED_BLOCK", 512)
    monkeypatch.setattr(common, "CHUNK", 2048)
    monkeypatch.setattr(common, "ELECTION_BLOCKS", (1024, 512))


def test_gpu_launch_configuration(gpu_blocks):
    """Multi-program paths: two-stage reductions over many partials, the majority pre-pass, the l1
    pre-pass, per-row backward over several column chunks."""
    for T in (2, 5):
        base, fts = make_group((3, 1100), T, torch.bfloat16, seed_of("gpu", T), exact_grid=True)
        thr, lim = trim_for(base, fts, 0.3, keep_ties=False)
        for layout in ("tensor", "row"):
            _check_ws(base, fts, _coeffs(layout, (3, 1100), T, T), thr, lim, 3)
        _check_ties(base, fts, WEIGHTS[:T], thr, lim, 3, zero_sign="majority", consensus="count")
        _check_dare(base, fts, WEIGHTS[:T], 0.5, nk.dare_keys(1, "g", T), rescale="l1", consensus="sum")
        got = TL.trim_l1([dev(base)], dev(fts), dev(thr), dev(lim))
        torch.testing.assert_close(got.cpu(), ref.trim_l1([base], fts, (thr, lim)), rtol=1e-12, atol=0)


def test_bad_arguments():
    base, fts = make_group((3, 4), 2, torch.float32, 0)
    base, fts = dev(base), dev(fts)
    a = dev(torch.ones(3))
    cases = [
        (lambda: WS.weighted_sum(base, fts, a.double()), "coeffs must be float32"),
        (lambda: WS.weighted_sum(base, fts, dev(torch.ones(2))), r"leading dimension of T\+1 = 3"),
        (lambda: WS.weighted_sum(base, fts, dev(torch.ones(3, 5))), r"coeffs must be \[T\+1\], \[T\+1, rows\]"),
        (lambda: WS.weighted_sum(base, [fts[0], fts[1].flatten()], a), r"finetuned\[1\] has shape \[12\], base has \[3, 4\]"),
        (lambda: WS.weighted_sum(base, [fts[0].bfloat16(), fts[1]], a), r"finetuned\[0\] is BFloat16, base is Float"),
        (lambda: WS.weighted_sum(base.double(), [f.double() for f in fts], a), "float32, bfloat16 or float16 tensors, got Double"),
        (lambda: WS.weighted_sum(base, fts, a, dev(torch.ones(2))), "given together"),
        (lambda: WS.weighted_sum(base.t(), [f.t() for f in fts], dev(torch.ones(3, 4))), "base must be contiguous"),
        (lambda: WS.weighted_sum(base, [fts[0], fts[1].t().contiguous().t()], a), r"finetuned\[1\] must be contiguous"),
        (lambda: WS.weighted_sum_backward(base[:2], base, fts, a), r"grad has shape \[2, 4\]"),
        (lambda: TM.ties_merge(base, fts, [1.0]), "1 weights for 2 fine-tuned"),
        (lambda: TM.ties_merge(base, fts, [1.0, 1.0], consensus="none"), 'consensus must be "sum" or "count", got "none"'),
        (lambda: TM.ties_merge(base, fts, [1.0, 1.0], normalize="mean"), "normalize must be"),
        (lambda: TM.ties_merge(base, fts, [1.0, 1.0], zero_sign="negative"), "zero_sign must be"),
        (lambda: TM.ties_merge(base, fts, [1.0, 1.0], dev(torch.zeros(1)), dev(torch.zeros(1, dtype=torch.long))),
         "one entry per task"),
        (lambda: DR.dare(base, fts, [1.0, 1.0], 0.5, [1]), "1 keys for 2 fine-tuned"),
        (lambda: DR.dare(base, fts, [1.0, 1.0], 0.0, [1, 2]), r"density must be in \(0, 1\]"),
        (lambda: DR.dare(base, fts, [1.0, 1.0], 0.5, [1, 2], rescale="l2"), "rescale must be"),
        (lambda: DR.dare(base, fts, [1.0, 1.0], 0.5, [1, 2], consensus="median"),
         'consensus must be "none", "sum" or "count", got "median"'),
        (lambda: TL.trim_l1([], fts), "base is an empty list"),
        (lambda: TL.trim_l1([base, base], fts[:1]), "not a multiple of 2 base tensors"),
        (lambda: TL.trim_l1([base], fts, dev(torch.ones(2, 2)), dev(torch.ones(2, 2, dtype=torch.long))),
         r"must be \[2\] or \[1, 2\]"),
    ]
    for fn, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fn()


def test_registered_for_cuda():
    from neurokern.ops.triton import registry

    for op in ("weighted_sum", "weighted_sum_backward", "ties_merge", "dare"):
        assert registry._REGISTERED[op] is getattr({"weighted_sum": WS, "weighted_sum_backward": WS, "ties_merge": TM, "dare": DR}[op], op)
    assert registry._REGISTERED["trim_l1"] is TL.trim_l1


# ---------------------------------------------------------------------------------------------
# On a GPU: the ops through torch.ops.neurokern at the shapes of real models

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
REAL_SHAPES = [(2048, 2048), (5632, 2048), (32000, 2048)]
_TRIMS = {}


def _gpu_group(shape, T, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    base = (torch.randn(shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    fts = [(base.float() + 0.002 * torch.randn(shape, generator=g, device="cuda")).to(torch.bfloat16)
           for _ in range(T)]
    return base, fts


def _cpu(xs):
    return [x.cpu() for x in xs]


def _real_case(shape, T):
    """A bf16 group on the GPU, its CPU copy, and a trim keeping 1/5 of each task with exact ties
    (computed once per (shape, T) with the CPU op)."""
    base, fts = _gpu_group(shape, T, seed_of("real", shape, T))
    bc, fc = base.cpu(), _cpu(fts)
    if (shape, T) not in _TRIMS:
        try:  # the CUDA op where neurokern._C has it, else the CPU op
            thr, lim = nk.magnitude_threshold([base], fts, [base.numel() // 5] * T, keep_ties=False)
        except (NotImplementedError, RuntimeError):
            thr, lim = nk.magnitude_threshold([bc], fc, [base.numel() // 5] * T, keep_ties=False)
        _TRIMS[(shape, T)] = (thr.cpu(), lim.cpu())
    thr, lim = _TRIMS[(shape, T)]
    return base, fts, bc, fc, thr, lim


@cuda_only
@pytest.mark.parametrize("T", range(1, 9))
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=str)
def test_cuda_weighted_sum_real_shapes(shape, T):
    base, fts, bc, fc, thr, lim = _real_case(shape, T)
    for layout in ("tensor", "row", "element") if T in (1, 8) else ("tensor", "row"):
        a = _coeffs(layout, shape, T, T)
        out = OPS.weighted_sum.default(base, fts, a.cuda(), thr.cuda(), lim.cuda(), 0, None)
        assert out.is_cuda and out.dtype == torch.bfloat16
        assert_bitwise(out, OPS.weighted_sum.default(bc, fc, a, thr, lim, 0, None))
        if layout == "tensor":  # the float64 reference, on the GPU
            trim = (thr.cuda(), lim.cuda())
            b64, f64 = base.double(), [f.double() for f in fts]
            want = ref.weighted_sum(b64, f64, a.cuda().double(), trim, 0, torch.float64)
            assert_vs_f64(out, want.cpu(), ws_mag(b64, f64, a, trim).cpu(), T + 1)
            del want, b64, f64
        grad = torch.randn(shape, device="cuda")
        got = OPS.weighted_sum_backward.default(grad, base, fts, a.cuda(), thr.cuda(), lim.cuda(), 0)
        cpu = OPS.weighted_sum_backward.default(grad.cpu(), bc, fc, a, thr, lim, 0)
        if layout == "element":
            assert torch.equal(got.cpu(), cpu)
        else:
            torch.testing.assert_close(got.cpu(), cpu, rtol=1e-6, atol=1e-9)


@cuda_only
def test_cuda_weighted_sum_autograd():
    base, fts = _gpu_group((2048, 2048), 4, 5)
    a = torch.randn(5, 2048, device="cuda", requires_grad=True)
    out = nk.weighted_sum(base, fts, a, out_dtype=torch.float32)
    (out * out).sum().backward()
    ac = a.detach().cpu().requires_grad_()
    out_c = nk.weighted_sum(base.cpu(), _cpu(fts), ac, out_dtype=torch.float32)
    (out_c * out_c).sum().backward()
    assert torch.equal(out.detach().cpu(), out_c.detach())
    torch.testing.assert_close(a.grad.cpu(), ac.grad, rtol=1e-5, atol=1e-6)


@cuda_only
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=str)
def test_cuda_ties_merge_real_shapes(shape, T):
    base, fts, bc, fc, thr, lim = _real_case(shape, T)
    for opts in (("sum", "weights", True, "positive"), ("count", "count", False, "majority")):
        got = OPS.ties_merge.default(base, fts, GENERIC[:T], thr.cuda(), lim.cuda(), 0, *opts, 0.9)
        assert got.is_cuda
        assert_bitwise(got, OPS.ties_merge.default(bc, fc, GENERIC[:T], thr, lim, 0, *opts, 0.9))


@cuda_only
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=str)
def test_cuda_dare_real_shapes(shape, T):
    base, fts, bc, fc, _, _ = _real_case(shape, T)
    keys = nk.dare_keys(0, f"layer.{shape}", T)
    for opts in (("density", "none", "none"), ("l1", "sum", "weights"), ("none", "count", "count")):
        got = OPS.dare.default(base, fts, GENERIC[:T], 0.3, keys, *opts, 1.0)
        want = OPS.dare.default(bc, fc, GENERIC[:T], 0.3, keys, *opts, 1.0)
        assert got.is_cuda
        if opts[0] == "l1":  # the l1 factors are float64 sums in another order: 1 ulp at most
            assert_vs_f64(got, want.double())
        else:
            assert_bitwise(got, want)
    # The mask itself, at the first and the last 2^18 elements (the reference Philox is slow).
    ones = torch.ones(shape, device="cuda")
    mask = OPS.dare.default(torch.zeros_like(ones), [ones], [1.0], 0.3, keys[:1], "none", "none", "none", 1.0)
    mask = mask.flatten().bool().cpu()
    u = keys[0] & ((1 << 64) - 1)
    for start in (0, base.numel() - 2**18):
        grp = torch.arange(start // 4, (start + 2**18) // 4, dtype=torch.int64)
        draws = torch.stack(ref.philox4x32_10(grp & 0xFFFFFFFF, grp >> 32, u), 1).flatten()
        assert torch.equal(mask[start:start + 2**18], draws < DR.dare_threshold(0.3))


@cuda_only
@pytest.mark.parametrize("T", [1, 4, 8, 10])
def test_cuda_trim_l1_real_shapes(T):
    groups = [_gpu_group(s, T, seed_of("cl1", s, T)) for s in REAL_SHAPES + [(2048,)]]
    bases = [b for b, _ in groups]
    fts = [groups[i][1][t] for t in range(T) for i in range(len(groups))]
    bc, fc = _cpu(bases), _cpu(fts)
    N = sum(b.numel() for b in bases)
    for per_tensor in (False, True):
        k = [b.numel() // 4 for b in bases for _ in range(T)] if per_tensor else [N // 4] * T
        thr, lim = nk.magnitude_threshold(bc, fc, k, keep_ties=False, per_tensor=per_tensor)
        got = OPS.trim_l1.default(bases, fts, thr.cuda(), lim.cuda())
        assert got.is_cuda
        torch.testing.assert_close(got.cpu(), OPS.trim_l1.default(bc, fc, thr, lim), rtol=1e-12, atol=0)


@pytest.mark.parametrize("normalize", ["weights", "count", "none"])
@pytest.mark.parametrize("T", [1, 5, 8])
def test_ties_infinite_inputs_as_the_cpu_op(T, normalize):
    """An infinite fine-tuned entry: the divided elected sum is +-inf (or NaN where +inf and -inf
    agree in one sum), as the C++ op's division gives, not NaN from the correction step."""
    base, fts = make_group((4, 9), T, torch.float32, seed_of("tinf", T, normalize))
    fts[0][0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    if T > 1:
        fts[1][0, 0] = float("inf")
        fts[1][1, 1] = float("-inf")
    out = TM.ties_merge(dev(base), dev(fts), [1.0] * T, normalize=normalize)
    want = OPS.ties_merge.default(base, fts, [1.0] * T, None, None, 0, "sum", normalize, True, "positive", 1.0)
    assert torch.isinf(want[0, 0]) and torch.isinf(want[0, 1])
    assert_bitwise(out, want)
