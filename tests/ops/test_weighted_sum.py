"""neurokern.weighted_sum: out = a[0] * base + sum_t a[t+1] * trim(tau_t), per-tensor / per-row /
per-element coefficients, out_dtype, and its autograd with respect to the coefficients; and
weighted_sum_rows_multi (per-row coefficients over a list of matrices, bitwise the single op)."""
import warnings

import pytest
import torch

import neurokern.ops as nk
from neurokern.ops import reference as ref

from .conftest import (DTYPE_IDS, DTYPES, INT64_MAX, SHAPES_ND, TASKS, assert_matches_f64,
                      f64_group, list_trims, make_group, make_list, opcheck, seed_of)

LAYOUTS = ["tensor", "row", "element"]


def _coeffs(layout, shape, T, seed):
    """float32 coefficients: a[0] ~ U(0.5, 1.5), a[t] ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    tail = {"tensor": (), "row": (shape[0],), "element": tuple(shape)}[layout]
    a = torch.randn((T + 1,) + tail, generator=g)
    a[0] = 0.5 + torch.rand(tail, generator=g)
    return a


def _ref64(base, fts, coeffs, trim=None, offset=0):
    b64, f64 = f64_group(base, fts)
    return ref.weighted_sum(b64, f64, coeffs.double(), trim, offset, out_dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Forward against the reference


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("shape", SHAPES_ND, ids=str)
def test_vs_reference(shape, T, dtype, layout):
    base, fts = make_group(shape, T, dtype, seed_of("ws", shape, T, dtype))
    a = _coeffs(layout, shape, T, seed_of("wsa", shape, T, layout))
    out = nk.weighted_sum(base, fts, a)
    assert out.dtype == dtype and out.shape == base.shape
    # float32 output: rtol 1e-5 / atol 1e-6 against float64; bf16 / fp16: at most 1 ulp.
    assert_matches_f64(out, _ref64(base, fts, a))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("keep_ties", [True, False])
def test_trim_offset_out_dtype_vs_reference(keep_ties, layout, dtype, out_dtype):
    T, shape = 3, (17, 33)
    prefix, pf = make_group((3, 3), T, dtype, seed_of("wsp", dtype))
    base, fts = make_group(shape, T, dtype, seed_of("wst", dtype))
    trim = nk.magnitude_threshold([prefix, base], [x for t in range(T) for x in (pf[t], fts[t])],
                                  [150, 300, 40], keep_ties=keep_ties)
    a = _coeffs(layout, shape, T, seed_of("wsta", layout))
    out = nk.weighted_sum(base, fts, a, trim, offset=9, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    want = _ref64(base, fts, a, trim, 9)
    assert_matches_f64(out, want)
    # The trim matters: without it the result is different.
    assert not torch.equal(out, nk.weighted_sum(base, fts, a, out_dtype=out_dtype))
    # The reference at the storage dtype (float32 arithmetic) agrees too.
    assert_matches_f64(out, ref.weighted_sum(base, fts, a, trim, 9, out_dtype).double())


def test_large_parallel():
    base, fts = make_group((400, 200), 3, torch.bfloat16, seed_of("wsl"))
    for layout in LAYOUTS:
        a = _coeffs(layout, (400, 200), 3, seed_of("wsla", layout))
        assert_matches_f64(nk.weighted_sum(base, fts, a, out_dtype=torch.float32), _ref64(base, fts, a))


# ---------------------------------------------------------------------------------------------
# Hand-computed cases


def _hand():
    base = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    tau = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0]])
    return base, [base + tau]


def test_hand_per_tensor():
    base, fts = _hand()
    out = nk.weighted_sum(base, fts, torch.tensor([0.5, 2.0]))
    assert out.tolist() == [[2.5, 1.0, -0.5], [6.0, 2.5, -1.0]]


def test_hand_per_row():
    base, fts = _hand()
    # row 0: 0.5 * base + 1 * tau; row 1: 2 * base + 0 * tau.
    out = nk.weighted_sum(base, fts, torch.tensor([[0.5, 2.0], [1.0, 0.0]]))
    assert out.tolist() == [[1.5, 1.0, 0.5], [8.0, 10.0, 12.0]]


def test_hand_per_element():
    base, fts = _hand()
    a = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], [[1.0, 1.0, 1.0], [-1.0, 3.0, 0.5]]])
    out = nk.weighted_sum(base, fts, a)
    assert out.tolist() == [[2.0, 0.0, 2.0], [-2.0, 5.0, -1.0]]


def test_hand_trim_and_out_dtype():
    base, fts = _hand()
    # Threshold 1.5 keeps only the 2's of tau; with tie_limit 4 and threshold 2, the tied 2 at
    # flat position 3 is kept and the -2 at position 5 is dropped.
    trim = (torch.tensor([1.5]), torch.tensor([INT64_MAX]))
    assert nk.weighted_sum(base, fts, torch.tensor([1.0, 1.0]), trim).tolist() == [[1.0, 2.0, 3.0], [6.0, 5.0, 4.0]]
    trim = (torch.tensor([2.0]), torch.tensor([4]))
    out = nk.weighted_sum(base, fts, torch.tensor([1.0, 1.0]), trim, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.tolist() == [[1.0, 2.0, 3.0], [6.0, 5.0, 6.0]]
    # Same trim at offset 1: the 2 now sits at position 4 >= 4 and is dropped too.
    out = nk.weighted_sum(base, fts, torch.tensor([1.0, 1.0]), trim, offset=1)
    assert out.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]


# ---------------------------------------------------------------------------------------------
# Degenerate inputs


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0,)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty(shape, layout):
    base, fts = make_group(shape, 2, torch.float32, 0)
    a = _coeffs(layout, shape, 2, 0).requires_grad_()
    out = nk.weighted_sum(base, fts, a)
    assert out.shape == shape
    out.sum().backward()
    assert a.grad.shape == a.shape and not a.grad.any()


def test_zero_task_vectors():
    base, fts = make_group((4, 6), 3, torch.bfloat16, 1, zero_tasks=(0, 1, 2))
    out = nk.weighted_sum(base, fts, torch.tensor([1.0, 5.0, -3.0, 7.0]))
    assert torch.equal(out, base)


# ---------------------------------------------------------------------------------------------
# Autograd


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("trimmed", [False, True])
def test_coeff_gradient(layout, dtype, T, trimmed):
    shape = (9, 13)
    base, fts = make_group(shape, T, dtype, seed_of("wsg", dtype, T))
    trim = nk.magnitude_threshold([base], fts, [40] * T, keep_ties=False) if trimmed else None
    a = _coeffs(layout, shape, T, seed_of("wsga", layout, T))
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed_of("g", T)))
    # Kernel: through torch autograd (register_autograd -> weighted_sum_backward).
    a_k = a.clone().requires_grad_()
    nk.weighted_sum(base, fts, a_k, trim, out_dtype=torch.float32).backward(grad)
    # Reference 1: the closed form weighted_sum_backward (float64 inside).
    want = ref.weighted_sum_backward(grad, base, fts, a, trim)
    torch.testing.assert_close(a_k.grad, want, rtol=1e-5, atol=1e-6)
    # Reference 2: torch.autograd through the reference implementation in float64.
    b64, f64 = f64_group(base, fts)
    a64 = a.double().requires_grad_()
    ref.weighted_sum(b64, f64, a64, trim, out_dtype=torch.float64).backward(grad.double())
    torch.testing.assert_close(a_k.grad.double(), a64.grad, rtol=1e-5, atol=1e-6)
    # The direct op agrees with what autograd produced.
    direct = torch.ops.neurokern.weighted_sum_backward(grad, base, fts, a, *(trim or (None, None)), 0)
    torch.testing.assert_close(direct, a_k.grad, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_finite_differences(layout):
    """torch.autograd.gradcheck on the float32 op (float64 is not an accepted storage dtype). The
    op is linear in the coefficients, so central differences are exact up to float32 rounding of
    the outputs (~1e-7 / eps): eps 0.1 with atol / rtol 1e-3 is a real check."""
    shape, T = (4, 5), 2
    base, fts = make_group(shape, T, torch.float32, seed_of("gc", layout))
    trim = nk.magnitude_threshold([base], fts, [8, 12], keep_ties=False)
    a = _coeffs(layout, shape, T, seed_of("gca", layout)).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not a double precision floating point" input
        assert torch.autograd.gradcheck(lambda c: nk.weighted_sum(base, fts, c, trim), (a,),
                                        eps=0.1, atol=1e-3, rtol=1e-3, fast_mode=False)


def test_bf16_output_gradient():
    """Gradients flowing from a bf16 output are upcast to float32 by the backward."""
    base, fts = make_group((6, 7), 2, torch.bfloat16, seed_of("bfg"))
    a = torch.tensor([1.0, 0.5, -0.5], requires_grad=True)
    out = nk.weighted_sum(base, fts, a)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    grad = 2 * out.float()
    torch.testing.assert_close(a.grad, ref.weighted_sum_backward(grad, base, fts, a.detach()), rtol=1e-5, atol=1e-5)


def test_base_or_finetuned_requiring_grad_raises():
    base, fts = make_group((3, 4), 2, torch.float32, 0)
    a = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="detach base and finetuned"):
        nk.weighted_sum(base.clone().requires_grad_(), fts, a)
    with pytest.raises(ValueError, match="detach base and finetuned"):
        nk.weighted_sum(base, [fts[0], fts[1].clone().requires_grad_()], a)


# ---------------------------------------------------------------------------------------------
# Argument checks and opcheck


def test_bad_arguments():
    base, fts = make_group((3, 4), 2, torch.float32, 0)
    op = torch.ops.neurokern.weighted_sum.default
    with pytest.raises(RuntimeError, match="coeffs must be float32"):
        op(base, fts, torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="leading dimension of T\\+1 = 3"):
        nk.weighted_sum(base, fts, torch.ones(2))
    with pytest.raises(RuntimeError, match=r"coeffs must be \[T\+1\], \[T\+1, rows\]"):
        nk.weighted_sum(base, fts, torch.ones(3, 4))
    with pytest.raises(RuntimeError, match=r"coeffs must be \[T\+1\], \[T\+1, rows\]"):
        nk.weighted_sum(base, fts, torch.ones(3, 4, 3))
    with pytest.raises(RuntimeError, match=r"finetuned\[1\] has shape"):
        nk.weighted_sum(base, [fts[0], fts[1][:2]], torch.ones(3))
    with pytest.raises(RuntimeError, match=r"finetuned\[0\] is BFloat16"):
        nk.weighted_sum(base, [fts[0].bfloat16(), fts[1]], torch.ones(3))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        nk.weighted_sum(base.double(), [f.double() for f in fts], torch.ones(3))
    with pytest.raises(RuntimeError, match="given together"):
        op(base, fts, torch.ones(3), torch.zeros(2), None)
    with pytest.raises(RuntimeError, match="grad has shape"):
        torch.ops.neurokern.weighted_sum_backward(torch.ones(4, 3), base, fts, torch.ones(3))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    # Includes test_autograd_registration (coeffs require grad) and aot_dispatch_dynamic, which
    # runs the backward through the registered autograd formula.
    base, fts = make_group((5, 6), 2, torch.float32, 6)
    thr, lim = nk.magnitude_threshold([base], fts, [10, 20], keep_ties=False)
    a = _coeffs(layout, (5, 6), 2, 7).requires_grad_()
    op = torch.ops.neurokern.weighted_sum.default
    opcheck(op, (base, fts, a))
    opcheck(op, (base, fts, a, thr, lim, 3, torch.bfloat16))
    opcheck(torch.ops.neurokern.weighted_sum_backward.default, (torch.randn(5, 6), base, fts, a.detach(), thr, lim, 3))


# ---------------------------------------------------------------------------------------------
# weighted_sum_rows_multi: per-row coefficients [T+1, sum of rows] over a list of matrices

# Odd sizes, zero-row and zero-column matrices, single rows and columns.
MATRICES = [(33, 65), (0, 5), (1, 17), (17, 1), (4, 0), (9, 32), (1, 1)]
DTYPE_LISTS = [(torch.float32,), (torch.bfloat16,), (torch.float16,), tuple(DTYPES)]


def _row_coeffs(bases, T, seed):
    return _coeffs("row", (sum(b.shape[0] for b in bases),), T, seed)


def _per_tensor_rows(bases, fts, coeffs, trim, offsets, out_dtype=None):
    """The single op per matrix, with its columns of coeffs (what the multi op equals bitwise)."""
    out, first = [], 0
    for i, b in enumerate(bases):
        column, trim_i, offset = ref._multi_args(bases, fts, trim, offsets, i)
        rows = coeffs[:, first:first + b.shape[0]]
        out.append(nk.weighted_sum(b, column, rows, trim_i, offset, out_dtype))
        first += b.shape[0]
    return out


@pytest.mark.parametrize("dtypes", DTYPE_LISTS, ids=DTYPE_IDS + ["mixed"])
@pytest.mark.parametrize("T", range(1, 9))
@pytest.mark.parametrize("scope", ["none", "global", "tensor"])
@pytest.mark.parametrize("out_dtype", [None, torch.float32], ids=["storage", "f32"])
def test_rows_multi_equals_per_tensor(out_dtype, scope, T, dtypes):
    bases, fts = make_list(T, dtypes, seed_of("wsrm", T, dtypes), shapes=MATRICES)
    coeffs = _row_coeffs(bases, T, seed_of("wsrm_c", T))
    trim, offsets = list_trims(bases, fts, T, scope)
    got = nk.weighted_sum_rows_multi(bases, fts, coeffs, trim, offsets, out_dtype)
    for expected in (_per_tensor_rows(bases, fts, coeffs, trim, offsets, out_dtype),
                     ref.weighted_sum_rows_multi(bases, fts, coeffs, trim, offsets, out_dtype)):
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_rows_multi_uses_each_tensors_rows():
    """Tensor i reads coeffs[:, s_i + r]: a coefficient set only on tensor 1's first row."""
    T = 2
    bases, fts = make_list(T, (torch.float32,), 7, shapes=[(3, 4), (2, 5)])
    coeffs = torch.zeros(T + 1, 5)
    coeffs[0, 3] = 1.0
    out = nk.weighted_sum_rows_multi(bases, fts, coeffs)
    assert not out[0].any() and torch.equal(out[1][0], bases[1][0]) and not out[1][1].any()


def test_rows_multi_is_not_differentiable():
    bases, fts = make_list(1, (torch.float32,), 0, shapes=[(3, 4)])
    with pytest.raises(ValueError, match="not differentiable"):
        nk.weighted_sum_rows_multi(bases, fts, torch.ones(2, 3, requires_grad=True))


def test_rows_multi_bad_arguments():
    bases, fts = make_list(2, (torch.float32,), 0, shapes=[(3, 4), (5, 2)])
    coeffs = torch.ones(3, 8)
    ops = torch.ops.neurokern
    with pytest.raises(RuntimeError, match=r"base\[1\] must be 2-D"):
        ops.weighted_sum_rows_multi([bases[0], bases[1].flatten()],
                                    [fts[0], fts[1].flatten(), fts[2], fts[3].flatten()], coeffs)
    with pytest.raises(RuntimeError, match=r"coeffs must be \[T\+1, sum of rows\] = \[3, 8\]"):
        ops.weighted_sum_rows_multi(bases, fts, torch.ones(3, 7))
    with pytest.raises(RuntimeError, match="coeffs must be float32"):
        ops.weighted_sum_rows_multi(bases, fts, coeffs.double())
    with pytest.raises(RuntimeError, match="offsets must be empty or hold one entry per tensor"):
        ops.weighted_sum_rows_multi(bases, fts, coeffs, None, None, [0, 1, 2])
    with pytest.raises(RuntimeError, match=r"threshold and tie_limit must be \[2\] or \[2, 2\]"):
        ops.weighted_sum_rows_multi(bases, fts, coeffs, torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="not a multiple"):
        ops.weighted_sum_rows_multi(bases, fts[:3], coeffs)


def test_rows_multi_opcheck():
    T = 2
    bases, fts = make_list(T, (torch.float32, torch.bfloat16), 3, shapes=[(5, 3), (0, 2), (4, 6)])
    coeffs = _row_coeffs(bases, T, 1)
    (thr, lim), _ = list_trims(bases, fts, T, "tensor")
    opcheck(torch.ops.neurokern.weighted_sum_rows_multi.default, (bases, fts, coeffs, thr, lim, []))
    (thr, lim), offsets = list_trims(bases, fts, T, "global")
    opcheck(torch.ops.neurokern.weighted_sum_rows_multi.default, (bases, fts, coeffs, thr, lim, offsets, torch.float32))
