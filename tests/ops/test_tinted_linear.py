"""neurokern.tinted_linear: y[b] = x[b] @ weight[task_ids[b]]^T + bias[task_ids[b]] (segmented GEMM
through ATen), its weight-gradient op, and autograd for x, weight and bias.

Unlike the merge ops (float32 / bf16 / fp16 storage only), tinted_linear runs ATen mm / addmm on
whatever dtype it gets, float64 included, so torch.autograd.gradcheck runs in float64."""
import sys

import pytest
import torch

import neurokern.ops as nk
from neurokern.ops import reference as ref

from .conftest import assert_ulp_close, opcheck, seed_of

# (B, in, out, T): single row / column / feature, odd sizes, zero rows.
SIZES = [(1, 1, 1, 1), (7, 17, 3, 3), (33, 65, 9, 5), (5, 1, 4, 2), (4, 6, 1, 8), (0, 5, 3, 2)]


def _inputs(B, i, o, T, dtype, seed, bias=True, ids=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, i, generator=g).to(dtype)
    w = torch.randn(T, o, i, generator=g).to(dtype)
    b = torch.randn(T, o, generator=g).to(dtype) if bias else None
    if ids is None:
        ids = torch.randint(0, T, (B,), generator=g)
    return x, w, b, ids


def _ref64(x, w, b, ids):
    return ref.tinted_linear(x.double(), w.double(), None if b is None else b.double(), ids)


def _assert_f32_close(y, want64, x, w, b, ids):
    """float32 GEMM against float64: per entry, |error| <= 1e-5 * (|x| @ |W|^T + |b|), the size of
    the terms being summed (cancelling outputs are not held to a relative bound)."""
    mag = torch.einsum("bi,boi->bo", x.double().abs(), w[ids].double().abs())
    if b is not None:
        mag = mag + b[ids].double().abs()
    err = (y.double() - want64).abs()
    assert torch.all(err <= 1e-5 * mag + 1e-30), float((err / (mag + 1e-30)).max())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["f32", "bf16", "f16", "f64"])
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_forward_vs_reference(size, dtype, bias):
    x, w, b, ids = _inputs(*size, dtype, seed_of("tl", size, dtype), bias)
    y = nk.tinted_linear(x, w, b, ids)
    assert y.dtype == dtype and y.shape == (size[0], size[2])
    want = _ref64(x, w, b, ids)
    if dtype == torch.float64:
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    elif dtype == torch.float32:
        _assert_f32_close(y, want, x, w, b, ids)
    else:
        # bf16 / fp16: ATen accumulates in float32 and rounds once: at most 1 ulp of the dtype.
        assert_ulp_close(y, want, ulps=1)


def test_hand_2x3():
    # Task 0: W = [[1, 0, 0], [0, 1, 1]], bias [1, -1]; task 1: W = [[0, 0, 2], [1, 1, 1]], no shift.
    w = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[0.0, 0.0, 2.0], [1.0, 1.0, 1.0]]])
    b = torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [-1.0, 0.0, 1.0]])
    ids = torch.tensor([1, 0, 1])
    # row 0 (task 1): [2 * 3, 1 + 2 + 3] = [6, 6]; row 1 (task 0): [4 + 1, 5 + 6 - 1] = [5, 10];
    # row 2 (task 1): [2, 0].
    assert nk.tinted_linear(x, w, b, ids).tolist() == [[6.0, 6.0], [5.0, 10.0], [2.0, 0.0]]
    assert nk.tinted_linear(x, w, None, ids).tolist() == [[6.0, 6.0], [4.0, 11.0], [2.0, 0.0]]


def test_task_ids_dtype_and_tasks_without_rows():
    x, w, b, _ = _inputs(9, 6, 4, 5, torch.float32, seed_of("ids"))
    ids = torch.tensor([3, 0, 3, 3, 0, 0, 3, 0, 3])  # tasks 1, 2, 4 get no rows
    y = nk.tinted_linear(x, w, b, ids)
    _assert_f32_close(y, _ref64(x, w, b, ids), x, w, b, ids)
    assert torch.equal(nk.tinted_linear(x, w, b, ids.int()), y)
    # Changing the weights of an unused task changes nothing; a used one changes its rows only.
    w2 = w.clone()
    w2[2] += 1
    assert torch.equal(nk.tinted_linear(x, w2, b, ids), y)
    w2[3] += 1
    y2 = nk.tinted_linear(x, w2, b, ids)
    assert torch.equal(y2[ids == 0], y[ids == 0]) and not torch.equal(y2[ids == 3], y[ids == 3])
    # Every row of one task: a plain linear layer.
    all0 = torch.zeros(9, dtype=torch.long)
    torch.testing.assert_close(nk.tinted_linear(x, w, b, all0), torch.nn.functional.linear(x, w[0], b[0]))


# ---------------------------------------------------------------------------------------------
# Autograd


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("size", [(6, 5, 3, 3), (1, 1, 1, 1), (4, 2, 3, 5)], ids=str)
def test_gradcheck_float64(size, bias):
    x, w, b, ids = _inputs(*size, torch.float64, seed_of("gc", size), bias)
    inputs = [x.requires_grad_(), w.requires_grad_()] + ([b.requires_grad_()] if bias else [])
    fn = (lambda x, w, b: nk.tinted_linear(x, w, b, ids)) if bias else (lambda x, w: nk.tinted_linear(x, w, None, ids))
    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=False)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_backward_float32_vs_reference_autograd(size, bias):
    x, w, b, ids = _inputs(*size, torch.float32, seed_of("bw", size), bias)
    grad = torch.randn(size[0], size[2], generator=torch.Generator().manual_seed(seed_of("g", size)))
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    nk.tinted_linear(leaves[0], leaves[1], leaves[2] if bias else None, ids).backward(grad)
    refs = [t.double().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    ref.tinted_linear(refs[0], refs[1], refs[2] if bias else None, ids).backward(grad.double())
    for got, want in zip(leaves, refs):
        assert got.grad.dtype == torch.float32 and got.grad.shape == want.shape
        # float32 reductions over at most 65 terms of O(1) values.
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)
    # Tasks without rows get zero weight / bias gradients.
    used = torch.zeros(size[3], dtype=torch.bool)
    used[ids] = True
    assert not leaves[1].grad[~used].any()
    if bias:
        assert not leaves[2].grad[~used].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_weight_grad_op_vs_reference(dtype):
    B, i, o, T = 20, 7, 5, 4
    x, _, _, ids = _inputs(B, i, o, T, dtype, seed_of("wg"), ids=torch.tensor([0, 2] * 10))
    grad = torch.randn(B, o, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.ops.neurokern.tinted_linear_weight_grad(grad, x, ids, T)
    want = torch.zeros(T, o, i, dtype=torch.float64)
    want.index_add_(0, ids, torch.einsum("bo,bi->boi", grad.double(), x.double()))
    assert got.dtype == dtype and got.shape == (T, o, i)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    else:
        assert_ulp_close(got, want, ulps=1)
    torch.testing.assert_close(got, ref.tinted_linear_weight_grad(grad, x, ids, T), rtol=1e-5, atol=1e-5)
    assert not got[[1, 3]].any()


# ---------------------------------------------------------------------------------------------
# Routing given by the caller


@pytest.mark.parametrize("T", [1, 2, 5, 8, 20])
def test_tinted_route_is_a_stable_sort(T):
    g = torch.Generator().manual_seed(T)
    for B in (0, 1, 9, 300):
        for dt in (torch.int64, torch.int32, torch.uint8):
            ids = torch.randint(0, T, (B,), generator=g).to(dt)
            perm, bounds = nk.tinted_route(ids, T)
            want = ref.tinted_route(ids, T)
            assert perm.dtype == bounds.dtype == torch.int64
            assert torch.equal(perm, want[0]) and torch.equal(bounds, want[1])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_given_routing_and_transposed_weight(size, dtype, bias):
    """With perm and bounds from tinted_route the op and its weight gradient give bitwise what they
    give routing the rows themselves; W^T as a view (the backward's dx) is within the forward's
    bounds of the float64 reference (ATen may pick another GEMM kernel for the transposed view, so
    not bitwise the contiguous copy's result)."""
    B, i, o, T = size
    x, w, b, ids = _inputs(*size, dtype, seed_of("routed", size, dtype), bias)
    perm, bounds = nk.tinted_route(ids, T)
    assert torch.equal(nk.tinted_linear(x, w, b, ids, perm, bounds), nk.tinted_linear(x, w, b, ids))
    g = torch.randn(B, o, generator=torch.Generator().manual_seed(B)).to(dtype)
    wg = torch.ops.neurokern.tinted_linear_weight_grad
    assert torch.equal(wg(g, x, ids, T, perm, bounds), wg(g, x, ids, T))
    wt = w.transpose(1, 2)
    dx = nk.tinted_linear(g, wt, None, ids, perm, bounds)
    want = _ref64(g, wt, None, ids)
    if dtype == torch.float64:
        torch.testing.assert_close(dx, want, rtol=1e-12, atol=1e-12)
    elif dtype == torch.float32:
        _assert_f32_close(dx, want, g, wt, None, ids)
    else:
        assert_ulp_close(dx, want, ulps=1)


def test_backward_routes_once_or_not_at_all(monkeypatch):
    """The backward uses the caller's routing as it is; without one it routes once for both of its
    products (the forward checked the ids), with the same gradients."""
    tl = sys.modules["neurokern.ops.tinted_linear"]  # the module; neurokern.ops.tinted_linear is its function
    calls = []
    route = tl.tinted_route
    monkeypatch.setattr(tl, "tinted_route", lambda *a: calls.append(1) or route(*a))
    x, w, b, ids = _inputs(13, 6, 4, 3, torch.float32, seed_of("once"))
    grads = []
    for given in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        routing = route(ids, 3) if given else (None, None)
        nk.tinted_linear(*leaves, ids, *routing).backward(torch.ones(13, 4))
        assert len(calls) == (0 if given else 1)
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# Argument checks and opcheck


def test_bad_arguments():
    x, w, b, ids = _inputs(4, 3, 2, 3, torch.float32, 0)
    with pytest.raises(RuntimeError, match=r"task_ids\[2\] = 5 is out of range for 3 tasks"):
        nk.tinted_linear(x, w, b, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(RuntimeError, match=r"task_ids\[0\] = -1 is out of range for 3 tasks"):
        nk.tinted_linear(x, w, None, torch.tensor([-1, 1, 1, 2]))
    with pytest.raises(RuntimeError, match=r"task_ids\[1\] = 3 is out of range"):
        torch.ops.neurokern.tinted_linear_weight_grad(torch.ones(4, 2), x, torch.tensor([0, 3, 1, 1]), 3)
    with pytest.raises(RuntimeError, match="x must be"):
        nk.tinted_linear(x.flatten(), w, b, ids)
    with pytest.raises(RuntimeError, match="weight must be"):
        nk.tinted_linear(x, w[:, :, :2], b, ids)
    with pytest.raises(RuntimeError, match="3 task ids for 4 rows"):
        nk.tinted_linear(x, w, b, ids[:3])
    with pytest.raises(RuntimeError, match="weight is BFloat16, x is Float"):
        nk.tinted_linear(x, w.bfloat16(), b, ids)
    with pytest.raises(RuntimeError, match="bias must be"):
        nk.tinted_linear(x, w, b[:, :1], ids)
    with pytest.raises(RuntimeError, match="bias is Half"):
        nk.tinted_linear(x, w, b.half(), ids)
    with pytest.raises(RuntimeError, match="task_ids must be an integer tensor"):
        nk.tinted_linear(x, w, b, ids.float())
    perm, bounds = nk.tinted_route(ids, 3)
    with pytest.raises(RuntimeError, match="give both perm and bounds"):
        nk.tinted_linear(x, w, b, ids, perm, None)
    with pytest.raises(RuntimeError, match=r"bounds must be int64 \[4\]"):
        nk.tinted_linear(x, w, b, ids, perm, bounds[:3])
    with pytest.raises(RuntimeError, match=r"perm must be int64 \[4\]"):
        torch.ops.neurokern.tinted_linear_weight_grad(torch.ones(4, 2), x, ids, 3, perm.int(), bounds)
    with pytest.raises(RuntimeError, match="task_ids must be an integer tensor"):
        nk.tinted_route(ids.float(), 3)


def test_opcheck():
    x, w, b, ids = _inputs(7, 5, 3, 4, torch.float32, 3)
    op = torch.ops.neurokern.tinted_linear.default
    # Inputs requiring grad: test_autograd_registration and aot_dispatch_dynamic's backward run.
    opcheck(op, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), ids))
    opcheck(op, (x.detach(), w.detach(), None, ids))
    opcheck(torch.ops.neurokern.tinted_linear_weight_grad.default, (torch.randn(7, 3), x.detach(), ids, 4))
    perm, bounds = nk.tinted_route(ids, 4)
    opcheck(torch.ops.neurokern.tinted_route.default, (ids, 4))
    opcheck(op, (x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_(), ids,
                 perm, bounds))
    opcheck(torch.ops.neurokern.tinted_linear_weight_grad.default,
            (torch.randn(7, 3), x.detach(), ids, 4, perm, bounds))
