"""The Triton kernels' float64 path for finite inputs near the float32 / bfloat16 maximum, compiled
for the GPU: weighted_sum, ties_merge (single tensors of several whole program spans, where the
merge's blocks are unrolled, and the list form) and dare on CUDA tensors, bitwise the C++ ops on the
CPU. tests/ops/triton/test_range.py checks the same under the interpreter. Skipped without a GPU."""
import pytest
import torch

import neurokern.ops as nk
from neurokern.ops.triton import dare as DR
from neurokern.ops.triton import ties_merge as TM
from neurokern.ops.triton import weighted_sum as WS
from ops.groups import near_max_group, overflows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPS = torch.ops.neurokern
DTYPES = [torch.bfloat16, torch.float32]
IDS = ["bf16", "f32"]
DEVICE = "cuda"


def _group(shape, T, dtype, seed):
    """A near-maximum group whose first 4096 elements overflow nowhere (a program span without the
    float64 path, beside spans with it)."""
    base, fts = near_max_group(shape, T, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    plain = lambda: (torch.randint(-64, 64, (4096,), generator=g).double() / 16).to(dtype)
    base.view(-1)[:4096] = plain()
    for f in fts:
        f.view(-1)[:4096] = plain()
    assert overflows(base, fts)
    return base, fts


def _on(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else [x.to(device) for x in t] for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_cuda_weighted_sum_near_max(dtype):
    base, fts = _group((13, 1000), 3, dtype, seed=1)
    a = torch.tensor([1.0, 0.25, 0.25, 0.25])
    thr, lim = nk.magnitude_threshold([base], fts, [5000] * 3, keep_ties=False)
    want = OPS.weighted_sum.default(base, fts, a, thr, lim, 0, None)
    b, f, a_, t, l = _on(DEVICE, base, fts, a, thr, lim)
    assert torch.equal(WS.weighted_sum(b, f, a_, t, l).cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("consensus,zero_sign", [("sum", "majority"), ("count", "positive"), ("sum", "positive")])
def test_cuda_ties_merge_near_max(dtype, consensus, zero_sign):
    base, fts = _group((13, 1000), 3, dtype, seed=2)
    w = [1.0, 0.5, 0.25]
    thr, lim = nk.magnitude_threshold([base], fts, [5000] * 3, keep_ties=False)
    b, f = _on(DEVICE, base, fts)
    for trim in [(None, None), (thr, lim)]:
        want = OPS.ties_merge.default(base, fts, w, *trim, 0, consensus, "weights", True, zero_sign, 1.0)
        dev_trim = [None if x is None else x.to(DEVICE) for x in trim]
        got = TM.ties_merge(b, f, w, *dev_trim, 0, consensus=consensus, normalize="weights", elect_weighted=True,
                            zero_sign=zero_sign)
        assert torch.equal(got.cpu(), want)
    multi = TM.ties_merge_multi([b, b[0].contiguous()], [x for t in f for x in (t, t[0].contiguous())], w,
                                consensus=consensus, normalize="weights", elect_weighted=True, zero_sign=zero_sign)
    assert torch.equal(multi[0].cpu(), OPS.ties_merge.default(base, fts, w, None, None, 0, consensus, "weights", True,
                                                              zero_sign, 1.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("consensus,normalize", [("none", "none"), ("sum", "weights")])
def test_cuda_dare_near_max(dtype, consensus, normalize):
    base, fts = _group((13, 1000), 2, dtype, seed=3)
    keys = nk.dare_keys(0, "x", 2)
    args = ([0.5, 0.5], 0.5, keys, "none", consensus, normalize, 1.0)
    want = OPS.dare.default(base, fts, *args)
    b, f = _on(DEVICE, base, fts)
    assert torch.equal(DR.dare(b, f, *args).cpu(), want)
