"""Triton tinted_linear and tinted_linear_weight_grad (neurokern/ops/triton/tinted_linear.py)
against neurokern.ops.reference (float64).

On a machine without a GPU the launchers run in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1); the CUDA tests at a real size run on a GPU.

Tolerance: with scale = |x| @ |W_t|^T (+ |b|), the error bound of a float32-accumulated dot,
    float32 inputs:         |got - want| <= 1e-5 * scale          (ieee float32 products)
    bfloat16 / float16:     |got - want| <= eps * |want| + 1e-5 * scale
where eps is the output dtype's machine epsilon (one rounding of the float32 result to the
storage dtype, within one ulp of the correctly rounded value). Measured in the interpreter
(in = 300): float32 within 5e-8 * scale; bf16 within 0.0077 * |want| (one ulp), f16 within
0.0033 * |want|. The CUDA tests (tensor-core bf16/f16, ieee f32) hold the same bounds.
"""
import pytest
import torch

from neurokern.ops import reference as ref
from neurokern.ops.triton import tinted_linear as ttl

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _eps(dtype):
    return 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps


def assert_gemm_close(got, want64, scale, dtype):
    assert got.dtype == dtype and got.shape == want64.shape
    err = (got.double() - want64).abs()
    bound = _eps(dtype) * want64.abs() + 1e-5 * scale
    assert torch.all(err <= bound), float((err - bound).max())


def _ref_fwd(x, w, b, ids):
    """float64 reference by task (no [B, out, in] gather: fine at any size), and its error scale."""
    x64, w64 = x.double(), w.double()
    y = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64, device=x.device)
    scale = torch.zeros_like(y)
    ids = ids.long()
    for t in range(w.shape[0]):
        rows = (ids == t).nonzero().flatten()
        if rows.numel():
            y[rows] = x64[rows] @ w64[t].T
            scale[rows] = x64[rows].abs() @ w64[t].abs().T
            if b is not None:
                y[rows] += b[t].double()
                scale[rows] += b[t].double().abs()
    return y, scale


def _ref_grad(g, x, ids, T):
    out = torch.zeros(T, g.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    scale = torch.zeros_like(out)
    for t in range(T):
        rows = (ids.long() == t).nonzero().flatten()
        out[t] = g[rows].double().T @ x[rows].double()
        scale[t] = g[rows].double().abs().T @ x[rows].double().abs()
    return out, scale


def make(B, K, N, T, dtype, seed, device="cpu", empty_tasks=(), id_dtype=torch.int64):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, K, generator=g, device=device).to(dtype)
    w = (torch.randn(T, N, K, generator=g, device=device) / max(K, 1) ** 0.5).to(dtype)
    b = torch.randn(T, N, generator=g, device=device).to(dtype)
    allowed = torch.tensor([t for t in range(T) if t not in empty_tasks] or [0], device=device)
    ids = allowed[torch.randint(0, allowed.numel(), (B,), generator=g, device=device)].to(id_dtype)
    return x, w, b, ids


CASES = [  # B, in, out, T, tasks without rows
    (1, 1, 1, 1, ()),
    (17, 33, 9, 3, (1,)),
    (40, 65, 33, 5, (0, 4)),
    (70, 16, 20, 8, (3,)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_vs_reference(case, with_bias, dtype):
    B, K, N, T, empty = case
    x, w, b, ids = make(B, K, N, T, dtype, seed=B * 100 + T, empty_tasks=empty)
    b = b if with_bias else None
    y = ttl.tinted_linear(x, w, b, ids)
    want, scale = _ref_fwd(x, w, b, ids)
    assert_gemm_close(y, want, scale, dtype)
    # The plain reference agrees too (it states the op).
    assert_gemm_close(y, ref.tinted_linear(x, w, b, ids).double(), scale + want.abs(), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_weight_grad_vs_reference(case, dtype):
    B, K, N, T, empty = case
    x, w, _, ids = make(B, K, N, T, dtype, seed=B * 10 + T, empty_tasks=empty)
    g = torch.randn(B, N, generator=torch.Generator().manual_seed(B)).to(dtype)
    dw = ttl.tinted_linear_weight_grad(g, x, ids, T)
    want, scale = _ref_grad(g, x, ids, T)
    assert_gemm_close(dw, want, scale, dtype)
    for t in empty:
        assert not dw[t].any()
    # The input gradient as the op's autograd forms it: tinted_linear on the view W^T.
    dx = ttl.tinted_linear(g, w.transpose(1, 2), None, ids)
    assert torch.equal(dx, ttl.tinted_linear(g, w.transpose(1, 2).contiguous(), None, ids))
    want_dx = torch.stack([g[i].double() @ w[ids[i]].double() for i in range(B)])
    scale_dx = torch.stack([g[i].double().abs() @ w[ids[i]].double().abs() for i in range(B)])
    assert_gemm_close(dx, want_dx, scale_dx, dtype)


def test_matches_cpp_op_and_id_dtypes():
    x, w, b, ids = make(33, 40, 24, 4, torch.float32, seed=1, empty_tasks=(2,))
    want = torch.ops.neurokern.tinted_linear.default(x, w, b, ids)
    for id_dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        got = ttl.tinted_linear(x, w, b, ids.to(id_dtype))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(33, 24)
    torch.testing.assert_close(ttl.tinted_linear_weight_grad(g, x, ids.int(), 4),
                               torch.ops.neurokern.tinted_linear_weight_grad.default(g, x, ids, 4),
                               rtol=1e-5, atol=1e-5)


def test_single_task_is_a_linear_layer_and_sorted_ids():
    x, w, b, _ = make(37, 24, 18, 3, torch.float32, seed=2)
    ids = torch.full((37,), 2)
    torch.testing.assert_close(ttl.tinted_linear(x, w, b, ids), torch.nn.functional.linear(x, w[2], b[2]),
                               rtol=1e-5, atol=1e-5)
    ids = torch.sort(torch.randint(0, 3, (37,))).values  # already grouped
    want, scale = _ref_fwd(x, w, b, ids)
    assert_gemm_close(ttl.tinted_linear(x, w, b, ids), want, scale, torch.float32)


def test_empty_and_degenerate():
    x, w, b, ids = make(0, 7, 5, 3, torch.float32, seed=0)
    y = ttl.tinted_linear(x, w, b, ids)
    assert y.shape == (0, 5) and y.dtype == torch.float32
    dw = ttl.tinted_linear_weight_grad(torch.empty(0, 5), x, ids, 3)
    assert dw.shape == (3, 5, 7) and not dw.any()
    # in = 0: y is the bias alone; out = 0: an empty [B, 0].
    x0 = torch.empty(4, 0)
    w0 = torch.empty(2, 3, 0)
    b0 = torch.randn(2, 3)
    ids = torch.tensor([1, 0, 1, 1])
    assert torch.equal(ttl.tinted_linear(x0, w0, b0, ids), b0[ids])
    assert ttl.tinted_linear(torch.randn(4, 5), torch.empty(2, 0, 5), None, ids).shape == (4, 0)
    assert not ttl.tinted_linear_weight_grad(torch.randn(4, 3), x0, ids, 2).numel()
    # num_tasks larger than any id: the extra tasks get zero gradients.
    g = torch.randn(4, 3)
    xx = torch.randn(4, 5)
    dw = ttl.tinted_linear_weight_grad(g, xx, ids, 5)
    assert dw.shape == (5, 3, 5) and not dw[2:].any()


def test_non_contiguous_inputs():
    x, w, b, ids = make(20, 30, 12, 3, torch.float32, seed=4)
    xs = torch.randn(20, 60)[:, ::2]
    wt = torch.randn(3, 30, 12).transpose(1, 2)  # [3, 12, 30], strided
    want, scale = _ref_fwd(xs, wt, b, ids)
    assert_gemm_close(ttl.tinted_linear(xs, wt, b, ids), want, scale, torch.float32)


# (B, in, out): odd sizes, a single row, more rows than one tile.
ROUTED_SIZES = [(1, 3, 5), (37, 33, 17), (70, 20, 48)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 12, 20])
@pytest.mark.parametrize("size", ROUTED_SIZES, ids=str)
def test_given_routing_and_transposed_weight(size, T, dtype):
    """perm and bounds from tinted_route: both kernels give bitwise what they give routing the rows
    themselves, with no host read; the input gradient's W^T view (W read through its strides)
    gives bitwise what a contiguous copy of W^T gives, within the reference's bound."""
    B, K, N = size
    x, w, b, ids = make(B, K, N, T, dtype, seed=B * 1000 + T * 10 + K, empty_tasks=(1,) if T > 2 else ())
    perm, bounds = ttl.tinted_route(ids, T)
    with torch.profiler.profile() as prof:
        y = ttl.tinted_linear(x, w, b, ids, perm, bounds)
        g = torch.randn(B, N, generator=torch.Generator().manual_seed(T)).to(dtype)
        dw = ttl.tinted_linear_weight_grad(g, x, ids, T, perm, bounds)
        dx = ttl.tinted_linear(g, w.transpose(1, 2), None, ids, perm, bounds)
    assert not [e for e in prof.events() if e.name in ("aten::_local_scalar_dense", "aten::item")]
    assert torch.equal(y, ttl.tinted_linear(x, w, b, ids))
    assert torch.equal(dw, ttl.tinted_linear_weight_grad(g, x, ids, T))
    assert torch.equal(dx, ttl.tinted_linear(g, w.transpose(1, 2).contiguous(), None, ids, perm, bounds))
    want, scale = _ref_fwd(x, w, b, ids)
    assert_gemm_close(y, want, scale, dtype)
    want, scale = _ref_fwd(g, w.transpose(1, 2), None, ids)
    assert_gemm_close(dx, want, scale, dtype)
    want, scale = _ref_grad(g, x, ids, T)
    assert_gemm_close(dw, want, scale, dtype)


@pytest.mark.parametrize("T", [1, 3, 16, 17, 40])
def test_tinted_route_launcher(T):
    """The tinted_route op's CUDA launcher (route without its bad-row read) against the C++ op and
    the reference, for T on both sides of the routing kernels' limit and an empty batch."""
    g = torch.Generator().manual_seed(T)
    for B in (0, 1, 600):
        ids = torch.randint(0, T, (B,), generator=g)
        perm, bounds = ttl.tinted_route(ids, T)
        for other in (torch.ops.neurokern.tinted_route(ids, T), ref.tinted_route(ids, T)):
            assert torch.equal(perm, other[0]) and torch.equal(bounds, other[1])
    with pytest.raises(RuntimeError, match="integer"):
        ttl.tinted_route(ids.float(), T)


def test_empty_batch_with_routing():
    x, w, b, ids = make(0, 5, 3, 4, torch.float32, seed=0)
    perm, bounds = ttl.tinted_route(ids, 4)
    assert ttl.tinted_linear(x, w, b, ids, perm, bounds).shape == (0, 3)
    dw = ttl.tinted_linear_weight_grad(torch.randn(0, 3), x, ids, 4, perm, bounds)
    assert dw.shape == (4, 3, 5) and not dw.any()


def test_bad_ids_and_arguments():
    x, w, b, ids = make(6, 4, 3, 2, torch.float32, seed=0)
    bad = ids.clone()
    bad[3] = 7
    with pytest.raises(RuntimeError, match=r"task_ids\[3\] = 7 is out of range for 2 tasks"):
        ttl.tinted_linear(x, w, b, bad)
    bad[3] = -1
    with pytest.raises(RuntimeError, match=r"task_ids\[3\] = -1"):
        ttl.tinted_linear(x, w, None, bad)
    with pytest.raises(RuntimeError, match=r"task_ids\[3\] = -1"):
        ttl.tinted_linear_weight_grad(torch.randn(6, 3), x, bad, 2)
    with pytest.raises(RuntimeError, match="integer"):
        ttl.tinted_linear(x, w, b, ids.float())
    with pytest.raises(RuntimeError, match="task ids for"):
        ttl.tinted_linear(x, w, b, ids[:5])
    with pytest.raises(RuntimeError, match="weight must be"):
        ttl.tinted_linear(x, w[:, :, :3], b, ids)
    with pytest.raises(RuntimeError, match="bias must be"):
        ttl.tinted_linear(x, w, b[:, :2], ids)
    with pytest.raises(RuntimeError, match="weight is"):
        ttl.tinted_linear(x, w.half(), b, ids)
    with pytest.raises(RuntimeError, match="grad"):
        ttl.tinted_linear_weight_grad(torch.randn(5, 3), x, ids, 2)
    perm, bounds = ttl.tinted_route(ids, 2)
    with pytest.raises(RuntimeError, match="give both perm and bounds"):
        ttl.tinted_linear(x, w, b, ids, perm, None)
    with pytest.raises(RuntimeError, match=r"bounds must be int64 \[3\]"):
        ttl.tinted_linear(x, w, b, ids, perm, bounds[:2])
    with pytest.raises(RuntimeError, match=r"perm must be int64 \[6\]"):
        ttl.tinted_linear_weight_grad(torch.randn(6, 3), x, ids, 2, perm.int(), bounds)


@pytest.mark.parametrize("B,T", [(1, 1), (5, 3), (513, 8), (1500, 5), (700, 16), (300, 40)])
def test_route_is_a_stable_sort(B, T):
    """The routing kernels (T <= 16; torch.sort beyond) against torch's stable sort, with ids of
    several integer types, and the first out-of-range row reported."""
    g = torch.Generator().manual_seed(B)
    for dt in (torch.int64, torch.int32, torch.uint8):
        ids = torch.randint(0, T, (B,), generator=g).to(dt)
        perm, bounds, bad = ttl.route(ids, T, "cpu")
        srt = torch.sort(ids.long(), stable=True)
        assert torch.equal(perm, srt.indices)
        assert torch.equal(bounds, torch.searchsorted(srt.values, torch.arange(T + 1)))
        assert int(bad) == B
    ids = torch.randint(0, T, (B,), generator=g)
    ids[B // 2] = -3 if B % 2 else T + 5
    ids[-1] = 2**40  # outside int32 too
    _, bounds, bad = ttl.route(ids, T, "cpu")
    assert int(bad) == B // 2 and int(bounds[-1] - bounds[0]) == B - (2 if B > 1 else 1)


def test_many_tasks():
    """T > 16: rows routed by torch.sort, the same kernels after."""
    x, w, b, ids = make(6, 5, 3, 40, torch.float32, seed=3)
    want, scale = _ref_fwd(x, w, b, ids)
    assert_gemm_close(ttl.tinted_linear(x, w, b, ids), want, scale, torch.float32)
    g = torch.randn(6, 3)
    want, scale = _ref_grad(g, x, ids, 40)
    assert_gemm_close(ttl.tinted_linear_weight_grad(g, x, ids, 40), want, scale, torch.float32)


# ---------------------------------------------------------------------------------------------
# CUDA


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,K,N,T", [(4096, 768, 768, 8), (4096, 2048, 2048, 8), (300, 768, 768, 8), (5, 64, 32, 3)])
def test_cuda_real_size(B, K, N, T, dtype):
    x, w, b, ids = make(B, K, N, T, dtype, seed=B + T, device="cuda", empty_tasks=(5,) if T > 5 else ())
    want, scale = _ref_fwd(x, w, b, ids)
    assert_gemm_close(ttl.tinted_linear(x, w, b, ids), want, scale, dtype)
    want, scale = _ref_fwd(x, w, None, ids)
    y = torch.ops.neurokern.tinted_linear.default(x, w, None, ids)  # the registered CUDA kernel
    assert_gemm_close(y, want, scale, dtype)
    g = torch.randn(B, N, device="cuda").to(dtype)
    want, scale = _ref_grad(g, x, ids, T)
    assert_gemm_close(ttl.tinted_linear_weight_grad(g, x, ids, T), want, scale, dtype)


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_autograd(dtype):
    x, w, b, ids = make(1000, 256, 128, 8, dtype, seed=0, device="cuda", empty_tasks=(2,))
    x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)
    y = torch.ops.neurokern.tinted_linear.default(x, w, b, ids)
    g = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), g)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    y64 = torch.einsum("bi,boi->bo", x64, w64[ids]) + b64[ids]
    ex, ew, eb = torch.autograd.grad(y64, (x64, w64, b64), g.double())
    sx = g.double().abs().unsqueeze(1).mul(w64.detach()[ids].abs().transpose(1, 2)).sum(2)
    assert_gemm_close(dx, ex, sx, dtype)
    sw = _ref_grad(g.abs(), x.detach().abs(), ids, 8)[0]
    assert_gemm_close(dw, ew, sw, dtype)
    assert not dw[2].any()
    if dtype == torch.float32:  # db is index_add_ in the storage dtype (the op's autograd, no kernel)
        torch.testing.assert_close(db.double(), eb, rtol=1e-5, atol=1e-4)


@cuda
@pytest.mark.parametrize("B,T", [(65536, 8), (4097, 16), (3000, 40)])
def test_cuda_route(B, T):
    ids = torch.randint(0, T, (B,), device="cuda")
    perm, bounds, bad = ttl.route(ids, T, ids.device)
    srt = torch.sort(ids, stable=True)
    assert torch.equal(perm, srt.indices) and int(bad) == B
    assert torch.equal(bounds, torch.searchsorted(srt.values, torch.arange(T + 1, device="cuda")))


@cuda
def test_cuda_opcheck_and_bad_id():
    x, w, b, ids = make(33, 64, 48, 4, torch.float32, seed=0, device="cuda", empty_tasks=(1,))
    torch.library.opcheck(torch.ops.neurokern.tinted_linear.default, (x, w, b, ids),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    ids[7] = 4
    with pytest.raises(RuntimeError, match=r"task_ids\[7\] = 4"):
        ttl.tinted_linear(x, w, b, ids)
