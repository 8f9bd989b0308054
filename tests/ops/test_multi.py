"""The multi-tensor ops (weighted_sum_multi (+ backward), ties_merge_multi, dare_multi) on CPU:
each output equals the single-tensor op on that tensor, bitwise (the C++ CPU form runs the
single-tensor kernel per tensor; the reference states the same loop), for lists mixing shapes,
dtypes, empty tensors, T = 1..8, shared [T] and per-tensor [n, T] trims and flat offsets.
weighted_sum and ties_merge also equal the reference bitwise; dare is within torch's default
tolerance of each dtype (the reference divides by the density in float64). Gradients: float32
within rtol 1e-6 (+ 1e-9) of the float64 reference (float64 sums in another order)."""
import math

import pytest
import torch

import neurokern.ops as nk
from neurokern.ops import reference as ref

from .conftest import TASKS, list_trims, make_list, opcheck

OPS = torch.ops.neurokern
WEIGHTS = [0.8371, 1.2193, 0.5561, -0.3117, 0.9437, 0.6889, 1.4041, 0.7723]


def assert_lists_equal(actual, expected):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, i
        assert torch.equal(a, e), f"tensor {i}: max diff {(a.double() - e.double()).abs().max()}"


@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("scope", ["none", "global", "tensor"])
def test_weighted_sum_multi(T, scope):
    bases, fts = make_list(T, (torch.float32, torch.bfloat16, torch.float16), seed=T)
    n = len(bases)
    coeffs = torch.rand(n, T + 1, generator=torch.Generator().manual_seed(T))
    trim, offsets = list_trims(bases, fts, T, scope)
    out = nk.weighted_sum_multi(bases, fts, coeffs, trim, offsets)
    assert_lists_equal(out, ref.weighted_sum_multi(bases, fts, coeffs, trim, offsets))
    for i, b in enumerate(bases):  # the single-tensor op, bitwise
        column, trim_i, offset = ref._multi_args(bases, fts, trim, offsets, i)
        assert torch.equal(out[i], nk.weighted_sum(b, column, coeffs[i], trim_i, offset))
    out64 = nk.weighted_sum_multi(bases, fts, coeffs, trim, offsets, out_dtype=torch.float64)
    assert all(o.dtype == torch.float64 for o in out64)


def test_weighted_sum_multi_checks_in_the_kernel():
    """The face hands the lists over as they are: the kernels make non-contiguous tensors
    contiguous and refuse a base or fine-tuned tensor that requires grad, with or without a
    gradient for coeffs; backward reads the saved non-contiguous inputs too."""
    T = 2
    bases, fts = make_list(T, shapes=[(3, 4), (5,), (2, 6)])
    coeffs = torch.rand(len(bases), T + 1)
    want = nk.weighted_sum_multi(bases, fts, coeffs)
    strided = [b.t().contiguous().t() if b.dim() == 2 else b for b in bases]
    assert_lists_equal(nk.weighted_sum_multi(strided, fts, coeffs), want)
    leaf = coeffs.clone().requires_grad_()
    sum(o.sum() for o in nk.weighted_sum_multi(strided, fts, leaf)).backward()
    torch.testing.assert_close(leaf.grad, OPS.weighted_sum_multi_backward([torch.ones_like(b) for b in bases],
                                                                          bases, fts, coeffs))
    for c in (coeffs, coeffs.clone().requires_grad_()):
        with pytest.raises(ValueError, match="detach base and finetuned"):
            nk.weighted_sum_multi(bases, [fts[0].clone().requires_grad_()] + fts[1:], c)


@pytest.mark.parametrize("T", [1, 4, 8])
def test_weighted_sum_multi_nonfinite_flags(T):
    """The face's nonfinite flags on CPU tensors (the op, then isfinite per output) match the
    reference: 1 where an output holds NaN / Inf (a NaN / Inf input, or a float16 overflow of finite
    inputs), 0 elsewhere; a call with flags carries no gradient and checks their shape."""
    bases, fts = make_list(T, (torch.float32, torch.bfloat16, torch.float16), seed=T,
                           shapes=[(3, 4), (5,), (7,), (2, 6), (0, 2)])
    n = len(bases)
    bases[0][1, 2] = float("nan")
    fts[(T - 1) * n + 3][1, 5] = float("-inf")
    assert bases[2].dtype == torch.float16
    bases[2][0] = 60000.0  # 60000 + 2 * (65000 - 60000) overflows float16
    for t in range(T):
        fts[t * n + 2][0] = 65000.0
    coeffs = torch.rand(n, T + 1, generator=torch.Generator().manual_seed(T))
    coeffs[2] = torch.tensor([1.0] + [2.0 / T] * T)
    flags, want_flags = torch.full((n,), 7, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)
    out = nk.weighted_sum_multi(bases, fts, coeffs, nonfinite=flags)
    want = ref.weighted_sum_multi(bases, fts, coeffs, nonfinite=want_flags)
    for a, e in zip(out, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)
    assert flags.tolist() == want_flags.tolist() == [1, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="no gradient flows through a call with nonfinite flags"):
        nk.weighted_sum_multi(bases, fts, coeffs.clone().requires_grad_(), nonfinite=flags)
    with pytest.raises(ValueError, match=r"nonfinite must be a contiguous int32 tensor \[5\], got torch.int32 \[4\]"):
        nk.weighted_sum_multi(bases, fts, coeffs, nonfinite=flags[:4])


@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("scope", ["none", "global", "tensor"])
def test_weighted_sum_multi_backward_and_autograd(T, scope):
    bases, fts = make_list(T, (torch.float32, torch.bfloat16), seed=10 + T)
    n = len(bases)
    g = torch.Generator().manual_seed(T)
    coeffs = torch.rand(n, T + 1, generator=g)
    grads = [torch.randn(b.shape, generator=g) for b in bases]
    trim, offsets = list_trims(bases, fts, T, scope)
    expected = ref.weighted_sum_multi_backward(grads, bases, fts, coeffs, trim, offsets)
    thr, lim = trim if trim else (None, None)
    got = OPS.weighted_sum_multi_backward(grads, bases, fts, coeffs, thr, lim, offsets or [])
    assert got.dtype == torch.float32 and got.shape == (n, T + 1)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    leaf = coeffs.clone().requires_grad_()
    out = nk.weighted_sum_multi(bases, fts, leaf, trim, offsets, out_dtype=torch.float32)
    # Outputs left out of the loss get zero gradients.
    sum((o * gr).sum() for o, gr in list(zip(out, grads))[1:]).backward()
    grads[0] = torch.zeros_like(grads[0])
    torch.testing.assert_close(leaf.grad, ref.weighted_sum_multi_backward(grads, bases, fts, coeffs, trim, offsets),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("scope", ["none", "global", "tensor"])
@pytest.mark.parametrize("options", [
    dict(),
    dict(consensus="count", normalize="count", elect_weighted=False),
    dict(zero_sign="majority", normalize="none", scale=0.5),
], ids=["mergekit", "count", "majority"])
def test_ties_merge_multi(T, scope, options):
    bases, fts = make_list(T, (torch.bfloat16, torch.float32, torch.float16), seed=20 + T)
    trim, offsets = list_trims(bases, fts, T, scope)
    weights = WEIGHTS[:T]
    out = nk.ties_merge_multi(bases, fts, weights, trim, offsets, **options)
    assert_lists_equal(out, ref.ties_merge_multi(bases, fts, weights, trim, offsets, **options))
    for i, b in enumerate(bases):
        column, trim_i, offset = ref._multi_args(bases, fts, trim, offsets, i)
        assert torch.equal(out[i], nk.ties_merge(b, column, weights, trim_i, offset, **options))


BF16_MAX = torch.finfo(torch.bfloat16).max  # (2 - 2^-7) 2^127, its step 2^120
FLAG_DTYPES = (torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float32,
               torch.bfloat16, torch.float16, torch.bfloat16)
FLAG_SHAPES = [(5,), (0, 3), (7,), (3, 3), (6,), (2, 5), (9,), (4,), (33, 65)]
# (base, fine-tuned) at element 1 of tensor i, the same in every task: merged at scale 1.25 as the
# (weighted) mean of the agreeing tasks, that element is base + 1.25 tau up to float64 rounding.
PLANTED = {
    0: (math.nan, 0.5),  # NaN
    2: (BF16_MAX - 3 * 2.0**120, BF16_MAX),  # 3.3995e38: finite in float32, Inf in bfloat16
    3: (0.0, 60000.0),  # 75000: Inf in float16
    4: (3e38, 3.4e38),  # 3.5e38: Inf in float32 (and in its float64 recompute)
    5: (-1e38, 2.5e38),  # tau overflows float32, the merged 3.375e38 does not
    6: (-1e38, 2.5e38),  # the same in bfloat16: 3.37e38 fits
    7: (0.0, 52000.0),  # 65000 rounds to 64992
}
PLANTED_FLAGS = [1, 0, 1, 1, 1, 0, 0, 0]  # tensor 8 holds +Inf in the last task: its flag follows the output


def plant_ties_nonfinite(bases, fts, T):
    n = len(bases)
    for i, (b, f) in PLANTED.items():
        bases[i].view(-1)[1] = b
        for t in range(T):
            fts[t * n + i].view(-1)[1] = f
    fts[(T - 1) * n + 8].view(-1)[100] = math.inf


@pytest.mark.parametrize("T", TASKS + [9])
@pytest.mark.parametrize("scope", ["none", "global", "tensor"])
@pytest.mark.parametrize("options", [
    dict(),
    dict(consensus="count", normalize="count", elect_weighted=False),
    dict(zero_sign="majority", normalize="count", elect_weighted=False),
], ids=["mergekit", "count", "majority"])
def test_ties_merge_multi_nonfinite_flags(T, scope, options):
    """ties_merge_multi's nonfinite flags on the CPU (set from the values the merge stores, in its
    loop): 1 exactly where an output holds NaN / Inf as stored in its dtype: a NaN input, an Inf
    input, finite inputs whose float32 result overflows, a finite float32 result beyond bfloat16's
    or float16's range; 0 for an empty tensor, a task vector that overflows float32 into a merged
    value that fits, and ordinary values. Flags left over from before are cleared; the outputs are
    those of the call without flags and match the reference."""
    bases, fts = make_list(T, FLAG_DTYPES, seed=40 + T, shapes=FLAG_SHAPES)
    plant_ties_nonfinite(bases, fts, T)
    n = len(bases)
    trim, offsets = list_trims(bases, fts, T, scope)
    # normalize "count" divides the weighted sum by the count: weights of 1 keep base + 1.25 tau
    weights = (WEIGHTS * 2)[:T] if "normalize" not in options else [1.0] * T
    flags, want_flags = torch.full((n,), 7, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)
    out = nk.ties_merge_multi(bases, fts, weights, trim, offsets, scale=1.25, nonfinite=flags, **options)
    want = ref.ties_merge_multi(bases, fts, weights, trim, offsets, nonfinite=want_flags, scale=1.25, **options)
    for a, e in zip(out, want):
        torch.testing.assert_close(a, e, equal_nan=True)
    unflagged = nk.ties_merge_multi(bases, fts, weights, trim, offsets, scale=1.25, **options)
    for a, e in zip(out, unflagged):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)
    assert flags.tolist() == want_flags.tolist() == [int(not bool(torch.isfinite(o).all())) for o in out]
    assert flags[:8].tolist() == PLANTED_FLAGS


def test_ties_merge_multi_nonfinite_argument():
    """The flags go to the internal op _ties_merge_multi_flagged, which checks them (int32 [n],
    contiguous, on the inputs' device) and declares them mutated (opcheck; not its AOT test: torch
    cannot functionalize an op that mutates an argument and returns a list)."""
    bases, fts = make_list(2, (torch.float32, torch.bfloat16), shapes=[(5, 3), (4,), (0, 2)])
    flags = torch.zeros(6, dtype=torch.int32)
    for bad in (flags[:2], flags.long()[:3], flags[::2], torch.zeros(3, 1, dtype=torch.int32)):
        with pytest.raises(RuntimeError, match=r"ties_merge_multi: nonfinite must be a contiguous int32 tensor \[3\] "
                                               r"on cpu, got"):
            nk.ties_merge_multi(bases, fts, [1.0, 0.5], nonfinite=bad)
    opcheck(OPS._ties_merge_multi_flagged.default, (bases, fts, [1.0, 0.5]), dict(scale=1e38, nonfinite=flags[:3]),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("options", [
    dict(),
    dict(consensus="sum", normalize="weights", rescale="none"),
    dict(consensus="count", rescale="l1", scale=0.7),
], ids=["dare_linear", "dare_ties", "l1"])
def test_dare_multi(T, options):
    bases, fts = make_list(T, (torch.float16, torch.float32), seed=30 + T)
    keys = [k for i in range(len(bases)) for k in nk.dare_keys(7, f"layer.{i}", T)]
    weights = WEIGHTS[:T]
    out = nk.dare_multi(bases, fts, weights, 0.4, keys, **options)
    # The reference divides by the density in float64 where the kernel multiplies by its inverse:
    # torch's default tolerances of each dtype (rtol 1.3e-6 float32, 1e-3 float16).
    for a, e in zip(out, ref.dare_multi(bases, fts, weights, 0.4, keys, **options)):
        torch.testing.assert_close(a, e)
    for i, b in enumerate(bases):
        column = list(fts[i::len(bases)])
        assert torch.equal(out[i], nk.dare(b, column, weights, 0.4, keys[i * T:(i + 1) * T], **options))


def test_opcheck():
    T = 2
    bases, fts = make_list(T, (torch.float32, torch.bfloat16), shapes=[(5, 3), (4,), (0, 2)])
    n = len(bases)
    coeffs = torch.rand(n, T + 1)
    (thr, lim), _ = list_trims(bases, fts, T, "tensor")
    opcheck(OPS.weighted_sum_multi.default, (bases, fts, coeffs.requires_grad_(), thr, lim, [0, 2, 5]))
    opcheck(OPS.ties_merge_multi.default, (bases, fts, [1.0, 0.5], thr, lim, []))
    keys = [k for i in range(n) for k in nk.dare_keys(0, str(i), T)]
    opcheck(OPS.dare_multi.default, (bases, fts, [1.0, 0.5], 0.5, keys))


@pytest.mark.parametrize("case, message", [
    ("no_base", "base is an empty list"),
    ("ragged", "is not a multiple of"),
    ("coeffs", "coeffs must be"),
    ("offsets", "offsets must be empty or hold one entry per tensor"),
    ("trim_shape", "threshold and tie_limit must be"),
    ("keys", "keys must hold n \\* T"),
    ("shape", "has shape"),
])
def test_argument_errors(case, message):
    bases, fts = make_list(2, shapes=[(3, 4), (5,)])
    coeffs = torch.rand(2, 3)
    keys = [1, 2, 3, 4]
    thr, lim = torch.zeros(2), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=message):
        if case == "no_base":
            OPS.weighted_sum_multi([], [], coeffs)
        elif case == "ragged":
            OPS.ties_merge_multi(bases, fts[:3], [1.0])
        elif case == "coeffs":
            OPS.weighted_sum_multi(bases, fts, torch.rand(2, 2))
        elif case == "offsets":
            OPS.weighted_sum_multi(bases, fts, coeffs, thr, lim, [0])
        elif case == "trim_shape":
            OPS.ties_merge_multi(bases, fts, [1.0, 1.0], torch.zeros(3), torch.zeros(3, dtype=torch.int64))
        elif case == "keys":
            OPS.dare_multi(bases, fts, [1.0, 1.0], 0.5, keys[:3])
        elif case == "shape":
            fts[1] = torch.zeros(6)
            OPS.ties_merge_multi(bases, fts, [1.0, 1.0])
