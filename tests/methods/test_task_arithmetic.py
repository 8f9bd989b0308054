import pytest
import torch

import neurokern as nk
from neurokern.methods import reference as R

from .conftest import make_models


@pytest.mark.parametrize("T", range(1, 9))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_reference(T, dtype, normalize):
    base, fts = make_models(T, dtype=dtype, seed=T)
    weights = [0.3 + 0.05 * t for t in range(T)]
    out = nk.merge(base, fts, method="task_arithmetic", weights=weights, scale=0.7, normalize=normalize)
    ref = R.task_arithmetic(base, fts, weights, 0.7, normalize)
    tol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    for name in base:
        assert out[name].dtype == dtype
        torch.testing.assert_close(out[name].float(), ref[name].float(), rtol=tol, atol=1e-6)


def test_hand_computed():
    base = {"w": torch.tensor([1.0, 2.0])}
    fts = [{"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([1.0, 0.0])}]
    out = nk.merge(base, fts, method="task_arithmetic", weights=[0.5, 0.25], scale=2.0)
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 1.0]))
