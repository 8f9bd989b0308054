"""Finite-difference gradient checks through a TintedModel: lambda (the weighted_sum op's backward)
and, in a batch mixing tasks, the tint's weight and bias and the input (the tinted_linear op's
backward). The model is linear (two nn.Linear layers, no activation), so the output is bilinear in
(lambda, tint) and central differences are exact up to float32 rounding: eps 1e-2 with tolerances
1e-3 is a real check (the ops store float32, not float64)."""
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from neurokern.tint import TintedModel


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(self.a(x))


def _gradcheck(fn, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not a double precision floating point" inputs
        return torch.autograd.gradcheck(fn, inputs, eps=1e-2, atol=1e-3, rtol=1e-3, fast_mode=False)


@pytest.mark.parametrize("coefficients", ["layer", "task"])
def test_gradcheck_lambda_tint_and_input_in_a_mixed_batch(coefficients):
    torch.manual_seed(0)
    base, fts = TwoLinear(), [TwoLinear() for _ in range(3)]
    model = TintedModel(TwoLinear(), base, fts, tint_layers=["b"], coefficients=coefficients, tint_init="finetuned")
    assert model.layers["b"].linear  # the mixed batch runs the tinted_linear op
    g = torch.Generator().manual_seed(1)
    lam = (0.2 + 0.6 * torch.rand(model.lambdas.shape, generator=g)).requires_grad_()  # inside [0, 1]
    tints = dict(model.layers["b"].named_parameters(prefix="layers.b"))  # every task's weight and bias
    assert len(tints) == 6
    x = torch.randn(7, 5, generator=g).requires_grad_()
    ids = torch.tensor([2, 0, 1, 1, 2, 0, 2])

    def f(lam, x, *values):
        return functional_call(model, {"lambdas": lam, **dict(zip(tints, values))}, (x, ids))

    assert _gradcheck(f, (lam, x, *(p.detach().clone().requires_grad_() for p in tints.values())))


def test_gradcheck_lambda_of_the_merged_weights():
    """d theta(lambda) / d lambda alone (no forward through the module), with groups whose
    tensors the merge splits into more rows (a 128 x 128 weight: 4 rows per tensor)."""
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(128, 128), nn.Linear(128, 128)

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    model = TintedModel(Wide(), Wide(), [Wide(), Wide()], coefficients="layer")
    assert max(model.merged.row_splits) == 4
    lam = (0.2 + 0.6 * torch.rand(model.lambdas.shape)).requires_grad_()
    with torch.no_grad():
        probes = {n: torch.randn_like(v) for n, v in model.shared_parameters().items()}

    class Merged(nn.Module):  # functional_call runs forward: here the merge alone
        def __init__(self, tinted):
            super().__init__()
            self.tinted = tinted

        def forward(self):
            shared = self.tinted.shared_parameters()
            # One linear functional of each merged tensor (keeps the Jacobian small).
            return torch.stack([(shared[n] * probes[n]).sum() for n in self.tinted.merged_names])

    wrapper = Merged(model)
    assert _gradcheck(lambda lam: functional_call(wrapper, {"tinted.lambdas": lam}, ()), (lam,))
