"""Finite inputs near the float32 / bfloat16 maximum whose float32 task vectors overflow (issue 23):
the Triton kernels recompute those elements in float64 exactly as the C++ ops do (bitwise equal
outputs), the reductions read the float64 task vectors (within float64 rounding of the C++ sums),
and the results equal the float64 reference (exact answers: the data are small multiples of a
power of two, so every sum and dyadic product is exact)."""
import pytest
import torch

import neurokern.ops as nk
from neurokern.ops import reference as ref
from neurokern.ops.triton import dare as DR
from neurokern.ops.triton import ties_merge as TM
from neurokern.ops.triton import trim_l1 as TL
from neurokern.ops.triton import neuron_stats as NS
from neurokern.ops.triton import weighted_sum as WS
from ops.groups import near_max_group, overflows

OPS = torch.ops.neurokern
DTYPES = [torch.bfloat16, torch.float32]
IDS = ["bf16", "f32"]


def _list(base, fts):
    """[base, its first row] and their fine-tuned versions, task-major (the multi ops' layout)."""
    return [base, base[0].contiguous()], [x for f in fts for x in (f, f[0].contiguous())]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("layout", ["tensor", "row", "element"])
def test_weighted_sum(dtype, layout):
    base, fts = near_max_group((9, 33), 3, dtype, seed=1)
    assert overflows(base, fts)
    shape = {"tensor": (4,), "row": (4, 9), "element": (4, 9, 33)}[layout]
    a = torch.tensor([1.0, 0.25, 0.25, 0.25]).reshape((4,) + (1,) * (len(shape) - 1)).expand(shape).contiguous()
    thr, lim = nk.magnitude_threshold([base], fts, [150] * 3, keep_ties=False)
    for trim in [(None, None), (thr, lim)]:
        got = WS.weighted_sum(base, fts, a, *trim)
        assert torch.equal(got, OPS.weighted_sum.default(base, fts, a, *trim))
        want = ref.weighted_sum(base, fts, a, None if trim[0] is None else trim)
        assert torch.isfinite(got).all() and torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("consensus,elect_weighted,zero_sign",
                         [("sum", True, "positive"), ("sum", False, "majority"), ("count", True, "majority")])
def test_ties_merge(dtype, consensus, elect_weighted, zero_sign):
    base, fts = near_max_group((9, 33), 2, dtype, seed=2)
    assert overflows(base, fts)
    thr, lim = nk.magnitude_threshold([base], fts, [150] * 2, keep_ties=False)
    kw = dict(consensus=consensus, normalize="weights", elect_weighted=elect_weighted, zero_sign=zero_sign)
    for trim in [(None, None), (thr, lim)]:
        got = TM.ties_merge(base, fts, [1.0, 1.0], *trim, 0, **kw)
        assert torch.equal(got, OPS.ties_merge.default(base, fts, [1.0, 1.0], *trim, 0, consensus, "weights",
                                                       elect_weighted, zero_sign, 1.0))
        want = ref.ties_merge(base, fts, [1.0, 1.0], None if trim[0] is None else trim, 0, **kw)
        assert torch.isfinite(got).all() and torch.equal(got, want)
    multi = TM.ties_merge_multi(*_list(base, fts), [1.0, 1.0], **kw)
    assert torch.equal(multi[0], TM.ties_merge(base, fts, [1.0, 1.0], **kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("consensus,zero_sign", [("sum", "majority"), ("count", "positive")])
def test_ties_merge_whole_spans(dtype, consensus, zero_sign):
    """A tensor of several whole program spans (the kernels' unrolled path) and a partial one, the
    first span free of overflow and the others not: each program recomputes in float64 exactly the
    elements that need it, bitwise the C++ op, with and without trimming (tie limits included)."""
    base, fts = near_max_group((13, 1000), 3, dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    plain = lambda: (torch.randint(-64, 64, (4096,), generator=g).double() / 16).to(dtype)
    base.view(-1)[:4096] = plain()
    for f in fts:
        f.view(-1)[:4096] = plain()
    assert overflows(base, fts)
    assert all(bool(torch.isfinite(f.float() - base.float()).view(-1)[:4096].all()) for f in fts)
    thr, lim = nk.magnitude_threshold([base], fts, [5000] * 3, keep_ties=False)
    kw = dict(consensus=consensus, normalize="weights", elect_weighted=True, zero_sign=zero_sign)
    for trim in [(None, None), (thr, lim)]:
        got = TM.ties_merge(base, fts, [1.0, 0.5, 0.25], *trim, 0, **kw)
        assert torch.equal(got, OPS.ties_merge.default(base, fts, [1.0, 0.5, 0.25], *trim, 0, consensus, "weights",
                                                       True, zero_sign, 1.0))
    multi = TM.ties_merge_multi(*_list(base, fts), [1.0, 0.5, 0.25], **kw)
    assert torch.equal(multi[0], OPS.ties_merge.default(base, fts, [1.0, 0.5, 0.25], None, None, 0, consensus,
                                                        "weights", True, zero_sign, 1.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rescale,consensus,normalize",
                         [("density", "none", "none"), ("none", "sum", "weights"), ("l1", "count", "weights")])
def test_dare(dtype, rescale, consensus, normalize):
    base, fts = near_max_group((9, 33), 2, dtype, seed=3)
    assert overflows(base, fts)
    keys = nk.dare_keys(0, "x", 2)
    weights = [0.25, 0.25] if rescale == "density" else [0.5, 0.5]
    args = (weights, 0.5, keys, rescale, consensus, normalize, 1.0)
    got = DR.dare(base, fts, *args)
    want = OPS.dare.default(base, fts, *args)
    if rescale == "l1":  # the l1 factors are float64 sums in another order
        torch.testing.assert_close(got.double(), want.double(), rtol=2 * torch.finfo(dtype).eps, atol=0)
    else:
        assert torch.equal(got, want)
        assert torch.isfinite(got).all()
        assert torch.equal(got, ref.dare(base, fts, weights, 0.5, keys, rescale=rescale, consensus=consensus,
                                         normalize=normalize))
    multi = DR.dare_multi(*_list(base, fts), weights, 0.5, keys + keys, *args[3:])
    assert torch.equal(multi[0], got)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_reductions(dtype):
    """neuron_stats, subspace_split (float64 statistics) and trim_l1 read the float64 task vectors."""
    base, fts = near_max_group((9, 33), 3, dtype, seed=4)
    assert overflows(base, fts)
    thr, lim = nk.magnitude_threshold([base], fts, [150] * 3, keep_ties=False)
    got = NS.neuron_stats(base, fts, thr, lim)
    for x, y, z in zip(got, OPS.neuron_stats.default(base, fts, thr, lim), ref.neuron_stats(base, fts, (thr, lim))):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=1e-14, atol=0)
        torch.testing.assert_close(x, z, rtol=1e-14, atol=0)
    l1 = TL.trim_l1([base], fts, thr, lim)
    assert torch.isfinite(l1).all()
    torch.testing.assert_close(l1, OPS.trim_l1.default([base], fts, thr, lim), rtol=1e-14, atol=0)
    torch.testing.assert_close(l1, ref.trim_l1([base], fts, (thr, lim)), rtol=1e-14, atol=0)
