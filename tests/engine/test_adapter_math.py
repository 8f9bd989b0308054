"""The adapted weight's arithmetic (engine/adapters.py): add_delta gives what PEFT's in-place merge
gives (the sum formed in the wider dtype, rounded once to the weight's), bitwise, for every pair of
weight and factor dtypes, transposed (fan_in_fan_out, embeddings) or not; and the property of the
machine's BLAS that the readers' op (lora_add_rows, tests/ops/test_lora_add_rows.py) relies on. The
end-to-end parity with PEFT's merge_and_unload is in tests/integrations/test_peft.py."""
import itertools

import pytest
import torch

from neurokern.engine.adapters import PRODUCT_BLOCK, add_delta, delta_weight, product_rows

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
    want = peft_add(weight, delta_weight(A, B, 1.7, transposed), embedding)
    got = add_delta(weight, delta_weight(A, B, 1.7, transposed), embedding)
    assert got.dtype == weight_dtype and got.is_contiguous() and got.shape == weight.shape
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_add_delta_leaves_the_weight_rows_unchanged():
    weight = torch.arange(12, dtype=torch.float32).view(3, 4)
    kept = weight.clone()
    add_delta(weight, torch.ones(3, 4), False)
    assert torch.equal(weight, kept)


@pytest.mark.parametrize("rank", [4, 16, 64])
@pytest.mark.parametrize("rows,cols", [(40, 4096), (37, 1000), (300, 24), (7, 50)])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_piece_of_rows_is_the_whole_products_rows(rank, rows, cols, transposed):
    """Rows of ΔW formed over a block of rows as the readers form a piece (product_rows: a
    multiple of PRODUCT_BLOCK rows, or all; lora_add_rows's tiles are such blocks) equal those rows
    of the whole product PEFT forms, bitwise, for pieces of 1 to 40 rows anywhere, transposed (ΔW's
    rows are the product's columns) or not. This is a property of the machine's BLAS: the test says
    whether it holds here."""
    g = torch.Generator().manual_seed(rank + rows)
    A = torch.randn(rank, rows if transposed else cols, generator=g)
    B = torch.randn(cols if transposed else rows, rank, generator=g)
    whole = delta_weight(A, B, 1.0, transposed)
    for n in range(1, min(rows, 40) + 1):
        for first in range(0, rows - n + 1, 5):
            lo, hi = product_rows(first, first + n, rows)
            assert 0 <= lo <= first and first + n <= hi <= rows and ((hi - lo) % PRODUCT_BLOCK == 0 or hi - lo == rows)
            piece = (B @ A[:, lo:hi]).T if transposed else B[lo:hi] @ A
            assert torch.equal(piece[first - lo:first - lo + n], whole[first:first + n]), (n, first)
