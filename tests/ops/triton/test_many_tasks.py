"""More than MAX_TASKS (8) fine-tuned models on the Triton path: the launchers run in chunks of at
most 8 task slots, carrying their sums between chunks in the C++ kernel's order, and the results
equal the C++ CPU op's bit for bit (as the single launches of T <= 8 do).

Without a GPU the launchers run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1).
"""
import itertools
import zlib

import pytest
import torch

import neurokern.ops as nk
from neurokern.ops.triton import dare as DR
from neurokern.ops.triton import ties_merge as TM
from neurokern.ops.triton import weighted_sum as WS

OPS = torch.ops.neurokern
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]
MANY = [9, 12, 16]
# Odd sizes around the interpreter's block of 4096 elements, one element, an empty tensor.
SHAPES = [(33, 65), (4097,), (1,), (0, 3)]


def group(shape, T, dtype, seed, scale=1.0):
    """base ~ N(0, 1) * scale and T fine-tuned versions (noise growing with t), stored in dtype."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, T, dtype, seed)).encode()))
    base = torch.randn(shape, generator=g) * scale
    fts = [(base + 0.02 * scale * (1 + t / T) * torch.randn(shape, generator=g)).to(dtype) for t in range(T)]
    return base.to(dtype), fts


def coeffs_for(layout, base, T, seed):
    g = torch.Generator().manual_seed(seed)
    shape = {"tensor": (T + 1,), "row": (T + 1, base.shape[0] if base.dim() else 1),
             "element": (T + 1, *base.shape)}[layout]
    return torch.randn(shape, generator=g) * 0.5


def trim_of(base, fts, density=0.3):
    T = len(fts)
    k = [max(1, int(density * base.numel()))] * T
    return nk.magnitude_threshold([base.float()], [f.float() for f in fts], k, keep_ties=False)


def assert_bitwise(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.view(-1).view(torch.uint8) if got.numel() else got, want.view(-1).view(torch.uint8)
                       if want.numel() else want)


@pytest.mark.parametrize("T", MANY)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["tensor", "row", "element"])
@pytest.mark.parametrize("trimmed", [False, True])
def test_weighted_sum_bitwise_cpu_op(T, dtype, layout, trimmed):
    for i, shape in enumerate(SHAPES):
        base, fts = group(shape, T, dtype, seed=i)
        coeffs = coeffs_for(layout, base, T, seed=i)
        thr, lim = trim_of(base, fts) if trimmed and base.numel() else (None, None)
        offset = 7 if trimmed else 0
        got = WS.weighted_sum(base, fts, coeffs, thr, lim, offset)
        assert_bitwise(got, OPS.weighted_sum(base, fts, coeffs, thr, lim, offset))


@pytest.mark.parametrize("T", [9, 16])
@pytest.mark.parametrize("out_dtype", [None, torch.float64, torch.int32])
def test_weighted_sum_out_dtypes(T, out_dtype):
    base, fts = group((5, 300), T, torch.bfloat16, seed=3)
    coeffs = coeffs_for("row", base, T, seed=3)
    got = WS.weighted_sum(base, fts, coeffs, out_dtype=out_dtype)
    assert_bitwise(got, OPS.weighted_sum(base, fts, coeffs, out_dtype=out_dtype))


@pytest.mark.parametrize("T", [9, 12])
def test_weighted_sum_overflow_takes_the_float64_sums(T, count_launches):
    """Inputs near the float32 maximum: tau overflows float32 in some elements of some blocks (and
    NaN / Inf in others), which the C++ kernel recomputes in float64 from the exact task vectors;
    the chunked float64 pass carries those sums across the chunks. Blocks of 4096 elements: the
    middle block holds no such element."""
    big = torch.finfo(torch.float32).max
    base, fts = group((3 * 4096,), T, torch.float32, seed=5)
    base[:10] = big * 0.9
    for f in fts:
        f[:10] = base[:10]
    fts[0][:10] = -big * 0.9  # tau = -1.8 * max: Inf in float32, finite in float64
    fts[T - 1][3:6] = -big * 0.9
    fts[T - 1][2 * 4096 + 1] = float("nan")
    fts[3][2 * 4096 + 2] = float("inf")
    coeffs = torch.full((T + 1,), 0.25)
    coeffs[0] = 1.0
    kernel = count_launches(WS, "_weighted_sum_chunk_kernel")
    got = WS.weighted_sum(base, fts, coeffs)
    want = OPS.weighted_sum(base, fts, coeffs)
    assert torch.isfinite(want[:10]).all() and torch.isnan(want[2 * 4096 + 1])
    assert_bitwise(got, want)
    assert kernel.launches == 2 * ((T + 7) // 8)


@pytest.mark.parametrize("T", MANY)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["tensor", "row", "element"])
def test_weighted_sum_backward_against_cpu_op(T, dtype, layout):
    """Each task's reduction is its own: per element the products equal the C++ op's (as values:
    the sign of a zero product may differ, as for T <= 8); per tensor / per row float64 sums in
    another order (as for T <= 8), within float32 rounding."""
    for i, shape in enumerate(SHAPES):
        base, fts = group(shape, T, dtype, seed=10 + i)
        coeffs = coeffs_for(layout, base, T, seed=i)
        thr, lim = trim_of(base, fts) if base.numel() else (None, None)
        g = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        got = WS.weighted_sum_backward(g, base, fts, coeffs, thr, lim, 3)
        want = OPS.weighted_sum_backward(g, base, fts, coeffs, thr, lim, 3)
        assert got.dtype == torch.float32 and got.shape == coeffs.shape
        if layout == "element":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


TIES_OPTIONS = list(itertools.product(["sum", "count"], ["weights", "count", "none"], [True, False],
                                      ["positive", "majority"]))
# Generic weights (some negative, one zero) for the bitwise comparisons with the C++ op.
GENERIC = [0.8371, 1.2193, 0.5561, -0.3117, 0.9437, 0.6889, 1.4041, 0.7723, 0.0, -1.1, 0.61, 0.93, 1.7, -0.2,
           0.45, 1.05]


def quantized_group(shape, T, dtype, seed):
    """Task vectors on a 2^-6 grid with some tasks' entries equal to base: many exact ties of |tau|
    and votes that cancel exactly (zero votes take the fallback sign)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(("q", shape, T, seed)).encode()))
    base = torch.round(torch.randn(shape, generator=g) * 8) / 8
    fts = []
    for t in range(T):
        delta = torch.round(0.05 * torch.randn(shape, generator=g) * 64) / 64
        delta[torch.rand(shape, generator=g) < 0.3] = 0
        fts.append((base + delta).to(dtype))
    return base.to(dtype), fts


@pytest.mark.parametrize("T", MANY)
@pytest.mark.parametrize("opts", TIES_OPTIONS, ids=["-".join(map(str, o)) for o in TIES_OPTIONS])
def test_ties_merge_bitwise_cpu_op(T, opts):
    consensus, normalize, elect_weighted, zero_sign = opts
    weights = GENERIC[:T]
    for i, shape in enumerate(SHAPES):
        dtype = DTYPES[i % len(DTYPES)]
        for make in (group, quantized_group):
            base, fts = make(shape, T, dtype, seed=20 + i)
            thr, lim = trim_of(base, fts, 0.5) if i % 2 == 0 and base.numel() else (None, None)
            args = (base, fts, weights, thr, lim, 5, consensus, normalize, elect_weighted, zero_sign, 0.7)
            assert_bitwise(TM.ties_merge(*args), OPS.ties_merge(*args))


@pytest.mark.parametrize("T", [9, 16])
@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_ties_merge_overflow_takes_the_float64_sums(T, consensus):
    """Finite inputs near the float32 maximum whose task vectors or votes overflow float32, NaN and
    Inf inputs, in some blocks of 4096 elements: the float64 sweeps there, bitwise the C++ op."""
    big = torch.finfo(torch.float32).max
    base, fts = group((3 * 4096,), T, torch.float32, seed=6)
    base[:8] = big * 0.9
    for f in fts:
        f[:8] = -big * 0.9  # tau = -1.8 * max: Inf in float32 (votes overflow), finite in float64
    fts[1][4] = big * 0.9  # tau = 0 there
    fts[T - 1][2 * 4096 + 1] = float("nan")
    fts[2][2 * 4096 + 2] = float("inf")
    weights = [0.5] * T
    for zero_sign in ("positive", "majority"):
        args = (base, fts, weights, None, None, 0, consensus, "weights", True, zero_sign, 0.3)
        got, want = TM.ties_merge(*args), OPS.ties_merge(*args)
        assert torch.isfinite(want[:8]).all()
        assert_bitwise(got, want)


DARE_OPTIONS = list(itertools.product(["density", "l1", "none"], ["none", "sum", "count"], ["none", "weights", "count"]))
KEYS = [0x1234_5678_9ABC_DEF0, 7, -(1 << 63), -1, 42, 99, 123456789, 5, 6, 8, 10, 11, 12, 13, 14, 15]


@pytest.mark.parametrize("T", [9, 16])
@pytest.mark.parametrize("opts", DARE_OPTIONS, ids=["-".join(o) for o in DARE_OPTIONS])
def test_dare_bitwise_cpu_op(T, opts):
    """Small tensors (the interpreter's Philox is slow; the overflow test below spans several tiles),
    each with its own density (1.0 keeps everything). rescale="l1" on tensors of at most one
    interpreter chunk (4096 elements): its norms are float64 sums whose order differs from the C++
    op's past one chunk, as for T <= 8."""
    rescale, consensus, normalize = opts
    weights = GENERIC[:T]
    for i, (shape, density) in enumerate([((33, 65), 0.3), ((1,), 1.0), ((0, 3), 0.3), ((2, 3), 1.0)]):
        base, fts = group(shape, T, DTYPES[i % len(DTYPES)], seed=30 + i)
        args = (base, fts, weights, density, KEYS[:T], rescale, consensus, normalize, 0.9)
        assert_bitwise(DR.dare(*args), OPS.dare(*args))


@pytest.mark.parametrize("T", [9, 16])
@pytest.mark.parametrize("consensus", ["none", "sum", "count"])
def test_dare_overflow_takes_the_float64_sums(T, consensus):
    """Task vectors overflowing float32, NaN and Inf inputs in some tiles: the float64 sweeps there."""
    big = torch.finfo(torch.float32).max
    base, fts = group((3 * 4096,), T, torch.float32, seed=7)
    base[:8] = big * 0.9
    for f in fts:
        f[:8] = -big * 0.9
    fts[T - 1][2 * 4096 + 1] = float("nan")
    fts[2][2 * 4096 + 2] = float("inf")
    args = (base, fts, [0.5] * T, 1.0, KEYS[:T], "none", consensus, "weights", 0.3)
    got, want = DR.dare(*args), OPS.dare(*args)
    assert torch.isfinite(want[:8]).all()
    assert_bitwise(got, want)
