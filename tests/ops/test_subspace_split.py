"""neurokern.subspace_split: per row, c_t = <tau_t, w>/|w|^2 (0 where w = 0) and the orthogonal
residuals tau_t - c_t w, float32."""
import pytest
import torch

import neurokern.ops as nk
from neurokern.ops import reference as ref

from .conftest import DTYPE_IDS, DTYPES, SHAPES_2D, TASKS, make_group, opcheck, seed_of

# Both sides compute in float64 and round once to float32; only the order of the dot-product sums
# differs, so outputs agree to about one float32 ulp: rtol 1e-6 (8 ulp), atol 1e-9.
TOL = dict(rtol=1e-6, atol=1e-9)


def _check(base, fts, trim=None, offset=0):
    coeff, orth = nk.subspace_split(base, fts, trim, offset)
    rc, ro = ref.subspace_split(base, fts, trim, offset)
    R, T = base.shape[0], len(fts)
    assert coeff.dtype == torch.float32 and coeff.shape == (R, T)
    assert len(orth) == T and all(o.dtype == torch.float32 and o.shape == base.shape for o in orth)
    torch.testing.assert_close(coeff, rc, **TOL)
    for o, r in zip(orth, ro):
        torch.testing.assert_close(o, r, **TOL)
    # Properties, in float64: the residual is orthogonal to w, and c w + residual = trim(tau).
    w = base.double()
    for t in range(T):
        tau = ref.trimmed(ref.task_vector(base, fts[t]), trim, t, offset).double()
        o = orth[t].double()
        scale = tau.abs().sum(1) * w.abs().sum(1) + 1e-30
        assert torch.all((o * w).sum(1).abs() <= 1e-6 * scale)
        torch.testing.assert_close(coeff[:, t:t + 1].double() * w + o, tau, rtol=1e-6, atol=1e-6)
    return coeff, orth


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("shape", SHAPES_2D, ids=str)
def test_vs_reference(shape, T, dtype):
    base, fts = make_group(shape, T, dtype, seed_of("ss", shape, T, dtype))
    _check(base, fts)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", [1, 3, 8])
def test_trimmed_with_offset_vs_reference(T, dtype):
    prefix, pf = make_group((4, 4), T, dtype, seed_of("ssp", T, dtype))
    base, fts = make_group((17, 33), T, dtype, seed_of("ssb", T, dtype), base_zero_rows=(3,))
    N = prefix.numel() + base.numel()
    trim = nk.magnitude_threshold([prefix, base], [x for t in range(T) for x in (pf[t], fts[t])],
                                  [N // 5 + t for t in range(T)], keep_ties=False)
    coeff, orth = _check(base, fts, trim, offset=prefix.numel())
    assert not torch.equal(coeff, nk.subspace_split(base, fts)[0])


def test_hand_2x3():
    # Row 0: w = [1, 2, 0], tau1 = [1, 0, 1] -> c = 1/5, tau2 = [0, -1, 2] -> c = -2/5.
    # Row 1: w = 0 -> c = 0 and the residual is all of tau.
    base = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    tau1 = torch.tensor([[1.0, 0.0, 1.0], [3.0, 0.0, -1.0]])
    tau2 = torch.tensor([[0.0, -1.0, 2.0], [0.0, 0.5, 0.0]])
    coeff, (o1, o2) = nk.subspace_split(base, [base + tau1, base + tau2])
    torch.testing.assert_close(coeff, torch.tensor([[0.2, -0.4], [0.0, 0.0]]), rtol=0, atol=0)
    torch.testing.assert_close(o1, torch.tensor([[0.8, -0.4, 1.0], [3.0, 0.0, -1.0]]), rtol=0, atol=0)
    torch.testing.assert_close(o2, torch.tensor([[0.4, -0.2, 2.0], [0.0, 0.5, 0.0]]), rtol=0, atol=0)
    # With a trim that drops tau1's first entry (threshold 1, tie_limit 1 keeps only position < 1
    # among the tied, i.e. position 0 stays; use tie_limit 0 to drop it): tau1 row 0 = [0, 0, 1].
    trim = (torch.tensor([1.0, 0.0]), torch.tensor([0, 10]))
    coeff, (o1, o2) = nk.subspace_split(base, [base + tau1, base + tau2], trim)
    # tau1 -> [[0, 0, 0], [3, 0, 0]] (both 1's tie at the threshold and are dropped); tau2 intact.
    torch.testing.assert_close(coeff, torch.tensor([[0.0, -0.4], [0.0, 0.0]]), rtol=0, atol=0)
    torch.testing.assert_close(o1, torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]]), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_zero_norm_rows_and_zero_tasks(dtype):
    base, fts = make_group((8, 11), 4, dtype, seed_of("ssz"), base_zero_rows=(0, 5), zero_tasks=(1,),
                           zero_rows=(2,))
    coeff, orth = _check(base, fts)
    assert torch.isfinite(coeff).all() and all(torch.isfinite(o).all() for o in orth)
    assert not coeff[[0, 5]].any() and not coeff[:, 1].any() and not coeff[2].any()
    taus = [f.float() - base.float() for f in fts]
    for t in range(4):
        # Where w = 0 the whole task vector is orthogonal: the residual is tau, bit for bit.
        assert torch.equal(orth[t][[0, 5]], taus[t][[0, 5]])
    assert not orth[1].any() and not any(o[2].any() for o in orth)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)], ids=str)
def test_empty(shape):
    base, fts = make_group(shape, 2, torch.float32, 0)
    coeff, orth = _check(base, fts)
    assert coeff.shape == (shape[0], 2) and not coeff.any()


def test_bad_arguments():
    base, fts = make_group((3, 4), 2, torch.float32, 0)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        nk.subspace_split(base.view(3, 2, 2), [f.view(3, 2, 2) for f in fts])
    with pytest.raises(RuntimeError, match=r"finetuned\[1\] has shape"):
        nk.subspace_split(base, [fts[0], fts[1][:, :3]])
    with pytest.raises(RuntimeError, match=r"finetuned\[1\] is BFloat16"):
        nk.subspace_split(base, [fts[0], fts[1].bfloat16()])
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        nk.subspace_split(base.double(), [f.double() for f in fts])


def test_opcheck():
    # Tensor[] output: every sub-test, aot_dispatch_dynamic included, passes on this build.
    base, fts = make_group((5, 6), 3, torch.float32, 4)
    thr, lim = nk.magnitude_threshold([base], fts, [10, 10, 10], keep_ties=False)
    opcheck(torch.ops.neurokern.subspace_split.default, (base, fts, thr, lim, 1))
    opcheck(torch.ops.neurokern.subspace_split.default, (base, fts))
