"""Triton subspace_split (neurokern/ops/triton/subspace_split.py) against neurokern.ops.reference.

On a machine without a GPU the launcher runs in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1); the CUDA tests at real-model shapes run on a GPU.

Tolerance: the kernel and the reference both form the float64 coefficient c = <tau, w> / |w|^2
(exact float32 products, float64 sums in different orders) and the float64 residual tau - c w,
then round to float32. Outputs are held to one float32 ulp of the reference plus the float64
summation-order term 1e-12 * (sum_c |tau_c w_c|) / |w|^2 (times |w_c| for the residual).
Measured in the interpreter (up to 64 x 1000, T = 8): every coefficient and residual
bit-identical to the reference; <residual_t, w> vanishes to float32 rounding (checked).
"""
import zlib

import pytest
import torch

import neurokern.ops as nk
from neurokern.ops import reference as ref
from neurokern.ops.triton import common
from neurokern.ops.triton import subspace_split as tss

from ops.groups import make_group

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]
SHAPES = [(1, 1), (17, 1), (1, 33), (33, 65), (0, 7)]
TASKS = [1, 2, 3, 5, 8]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _ulp32(x: torch.Tensor) -> torch.Tensor:
    """One float32 ulp at each |x| (the spacing above the float32 value of x), as float64."""
    x32 = x.float().abs()
    return (torch.nextafter(x32, torch.full_like(x32, float("inf"))) - x32).double()


def check(base, fts, trim=None, offset=0, got=None):
    if got is None:
        got = tss.subspace_split(base, fts, *((None, None) if trim is None else trim), offset)
    coeff, orth = got
    rc, ro = ref.subspace_split(base, fts, trim, offset)
    R, C = base.shape
    T = len(fts)
    assert coeff.dtype == torch.float32 and coeff.shape == (R, T) and coeff.device == base.device
    assert len(orth) == T and all(o.dtype == torch.float32 and o.shape == (R, C) for o in orth)
    w = base.double()
    q = (w * w).sum(1)
    qs = torch.where(q > 0, q, torch.ones_like(q))
    for t in range(T):
        tau = ref.trimmed(ref.task_vector(base, fts[t]), trim, t, offset).double()
        c_err = 1e-12 * (tau * w).abs().sum(1) / qs
        c64 = torch.where(q > 0, (tau * w).sum(1) / qs, torch.zeros_like(q))
        assert torch.all((coeff[:, t].double() - rc[:, t].double()).abs() <= _ulp32(c64) + c_err), t
        o_err = c_err[:, None] * w.abs()
        assert torch.all((orth[t].double() - ro[t].double()).abs() <= _ulp32(ro[t]) + o_err), t
        # w = 0: c = 0 and the residual is tau, exactly.
        zero = q == 0
        assert not coeff[zero, t].any()
        assert torch.equal(orth[t][zero].double(), tau[zero])
    return coeff, orth


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_vs_reference(shape, T, dtype):
    base, fts = make_group(shape, T, dtype, seed=zlib.crc32(repr((shape, T, dtype)).encode()))
    check(base, fts)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("keep_ties", [True, False])
def test_trimmed_with_offset(T, dtype, keep_ties):
    prefix, pf = make_group((3, 5), T, dtype, seed=T, noise_grid=True)
    base, fts = make_group((9, 37), T, dtype, seed=T + 1, zero_rows=(4,), base_zero_rows=(7,), noise_grid=True)
    N = prefix.numel() + base.numel()
    trim = nk.magnitude_threshold([prefix, base], [x for t in range(T) for x in (pf[t], fts[t])],
                                  [N // 4 + 3 * t for t in range(T)], keep_ties=keep_ties)
    coeff, orth = check(base, fts, trim, offset=prefix.numel())
    full_c, _ = tss.subspace_split(base, fts)
    assert not torch.equal(coeff, full_c)
    assert not coeff[4].any() and not coeff[7].any() and not orth[0][4].any()
    for offset in (prefix.numel() + 100,):
        check(base, fts, trim, offset=offset)


def test_residual_is_orthogonal_and_matches_cpp_op():
    base, fts = make_group((13, 300), 4, torch.bfloat16, seed=5, base_zero_rows=(2,))
    trim = nk.magnitude_threshold([base], fts, [1000, 2000, 3000, 3900], keep_ties=False)
    coeff, orth = check(base, fts, trim)
    w = base.double()
    for o in orth:
        dot = (o.double() * w).sum(1)
        scale = (o.double().abs() * w.abs()).sum(1)
        assert torch.all(dot.abs() <= 1e-6 * scale)
    want_c, want_o = torch.ops.neurokern.subspace_split.default(base, fts, *trim, 0)
    torch.testing.assert_close(coeff, want_c, rtol=2e-7, atol=1e-12)
    for a, b in zip(orth, want_o):
        torch.testing.assert_close(a, b, rtol=2e-7, atol=1e-9)


@pytest.mark.parametrize("T", [1, 4, 8])
def test_gpu_launch_shape(T):
    """The GPU's launch shape (one row per program, several column steps with a ragged tail,
    VPT columns per thread) run in the interpreter, with a trim."""
    base, fts = make_group((5, 37), T, torch.bfloat16, seed=T, base_zero_rows=(2,), noise_grid=True)
    trim = nk.magnitude_threshold([base], fts, [60 + t for t in range(T)], keep_ties=False)
    R, C = base.shape
    coeff = torch.empty(R, T)
    orth = [torch.empty(R, C) for _ in range(T)]
    thr, lim = common.trim_pair("subspace_split", *trim, T, "cpu")
    tss.launch_subspace_split(base, fts, thr, lim, 3, coeff, orth, config=dict(ROWS=1, NT=4, VPT=4, num_warps=1))
    check(base, fts, trim, 3, got=(coeff, orth))


def test_hand():
    base = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    tau1 = torch.tensor([[1.0, 0.0, 1.0], [3.0, 0.0, 0.0]])
    coeff, orth = tss.subspace_split(base, [base + tau1])
    assert coeff.tolist() == [[torch.tensor(0.2).item()], [0.0]]  # <tau, w> / |w|^2 = 1 / 5, in float32
    torch.testing.assert_close(orth[0], torch.tensor([[0.8, -0.4, 1.0], [3.0, 0.0, 0.0]]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("T", [9, 11])
def test_many_tasks_in_groups_of_eight(T):
    base, fts = make_group((5, 21), T, torch.bfloat16, seed=T, base_zero_rows=(1,))
    check(base, fts)
    trim = nk.magnitude_threshold([base], fts, [30 + t for t in range(T)], keep_ties=False)
    check(base, fts, trim, offset=7)


def test_degenerate():
    base, _ = make_group((4, 6), 1, torch.float32, seed=0)
    coeff, orth = tss.subspace_split(base, [])
    assert coeff.shape == (4, 0) and orth == []
    empty = torch.empty(3, 0)
    coeff, orth = tss.subspace_split(empty, [empty.clone()])
    assert coeff.tolist() == [[0.0]] * 3 and orth[0].shape == (3, 0)


def test_views_and_bad_arguments():
    big = torch.randn(5, 40)
    base = big[:, 1:34]
    stacked = torch.stack([base + 0.01 * torch.randn(5, 33) for _ in range(3)])
    check(base.contiguous(), list(stacked), got=tss.subspace_split(base, list(stacked)))
    with pytest.raises(RuntimeError, match="2-D"):
        tss.subspace_split(base.flatten(), [base.flatten()])
    with pytest.raises(RuntimeError, match="together"):
        tss.subspace_split(base, [base], None, torch.zeros(1, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# CUDA, real-model shapes


@cuda
@pytest.mark.parametrize("T", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(2048, 2048), (5632, 2048), (32000, 2048)], ids=str)
def test_cuda_real_shapes(shape, T):
    base, fts = make_group(shape, T, torch.bfloat16, seed=T, noise=0.002, device="cuda", base_zero_rows=(3,))
    check(base, fts)
    got_c, got_o = torch.ops.neurokern.subspace_split.default(base, fts, None, None, 0)
    want_c, want_o = tss.subspace_split(base, fts)
    assert torch.equal(got_c, want_c) and all(torch.equal(a, b) for a, b in zip(got_o, want_o))


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", [3, 10])
def test_cuda_trimmed(dtype, T):
    base, fts = make_group((2048, 5632), T, dtype, seed=T, noise=0.002, device="cuda", noise_grid=True)
    taus = torch.stack([f.float() - base.float() for f in fts]).abs().flatten(1)
    thr = taus.kthvalue(taus.shape[1] * 4 // 5, dim=1).values
    lim = torch.full((T,), base.numel() // 2, dtype=torch.int64, device="cuda")
    check(base, fts, (thr, lim), 999)
