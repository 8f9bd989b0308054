"""The adapted weight's arithmetic (engine/adapters.py): add_delta gives what PEFT's in-place merge
gives (the sum formed in the wider dtype, rounded once to the weight's), bitwise, for every pair of
weight and factor dtypes, transposed (fan_in_fan_out, embeddings) or not. The end-to-end parity
with PEFT's merge_and_unload is in tests/integrations/test_peft.py."""
import itertools

import pytest
import torch

from neurokern.engine.adapters import add_delta, delta_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def peft_add(weight_rows, delta, embedding):
    """PEFT's merge: an in-place add on a copy of the weight; an embedding's ΔW cast first."""
    out = weight_rows.clone()
    out += delta.to(out.dtype) if embedding else delta
    return out


@pytest.mark.parametrize("weight_dtype,factor_dtype", list(itertools.product(DTYPES, DTYPES)))
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("embedding", [False, True])
def test_add_delta_is_peft_in_place_add(weight_dtype, factor_dtype, transposed, embedding):
    g = torch.Generator().manual_seed(0)
    rows, cols, r = 37, 53, 5
    A = (torch.randn(r, rows if transposed else cols, generator=g) * 0.3).to(factor_dtype)
    B = (torch.randn(cols if transposed else rows, r, generator=g) * 0.3).to(factor_dtype)
    # weights of every magnitude, so that the rounding of the sum matters in every binade
    weight = (torch.randn(rows, cols, generator=g) * torch.logspace(-3, 2, cols)).to(weight_dtype)
    want = peft_add(weight, delta_rows(A, B, 1.7, transposed), embedding)
    got = add_delta(weight, delta_rows(A, B, 1.7, transposed), embedding)
    assert got.dtype == weight_dtype and got.is_contiguous() and got.shape == weight.shape
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_add_delta_leaves_the_weight_rows_unchanged():
    weight = torch.arange(12, dtype=torch.float32).view(3, 4)
    kept = weight.clone()
    add_delta(weight, torch.ones(3, 4), False)
    assert torch.equal(weight, kept)
