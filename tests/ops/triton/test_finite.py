"""The multi-tensor finite check (neurokern/ops/triton/finite.py) against torch.isfinite, in
Triton's interpreter on CPU tensors (the GPU test is tests/gpu/test_cuda_finite.py).

Programs read finite.BLOCK_BYTES: 4096 float32 or 8192 bfloat16 / float16 elements, so the sizes
below give tensors of one partial block, exactly full blocks, and full blocks plus a tail.
"""
import math

import pytest
import torch

from neurokern.ops import nonfinite_later
from neurokern.ops.triton import finite

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
SIZES = [1, 7, 4095, 4096, 8192, 8193, 3 * 8192 + 5]
BAD = [math.nan, math.inf, -math.inf]


def want(tensors):
    return [int(not bool(torch.isfinite(t.float()).all())) for t in tensors]


def flags(tensors):
    return finite.nonfinite_flags(tensors).tolist()


def randn(n, dtype, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)


def positions(n):
    """First, last, a block's last and the next block's first, and the tail's first element."""
    block = finite.BLOCK_BYTES // 2
    return sorted({0, n - 1, min(block - 1, n - 1), min(block, n - 1), n - n % block if n % block else n - 1})


@pytest.mark.parametrize("dtype", FLOATS + (torch.float64,))
@pytest.mark.parametrize("bad", BAD, ids=["nan", "+inf", "-inf"])
def test_one_bad_value_anywhere(dtype, bad):
    """Each position of each size on its own: only the tensor holding it is flagged."""
    for n in SIZES:
        for pos in positions(n):
            tensors = [randn(n, dtype, 0), randn(n, dtype, 1), randn(33, dtype, 2)]
            tensors[1][pos] = bad
            assert flags(tensors) == [0, 1, 0], (n, pos)


def test_random_lists_mixed_dtypes():
    """Odd sizes, empty and 0-d tensors, three dtypes interleaved (one launch each), a few bad
    values: the flags land at the tensors' places in the list."""
    g = torch.Generator().manual_seed(7)
    for trial in range(4):
        tensors = []
        for i in range(23):
            n = int(torch.randint(0, 20000, (1,), generator=g)) if i % 5 else (0, 1, 4097, 0, 8192)[i // 5]
            t = torch.randn(n, generator=g).to(FLOATS[i % 3])
            if n and float(torch.rand(1, generator=g)) < 0.3:
                t[int(torch.randint(0, n, (1,), generator=g))] = BAD[i % 3]
            tensors.append(t)
        tensors.append(torch.tensor(float("inf")))
        tensors.append(torch.tensor(2.5, dtype=torch.bfloat16))
        assert flags(tensors) == want(tensors), trial


def test_misaligned_views():
    """Views at storage offset 1 are not 16-byte aligned: they take the unaligned launch, next to
    the aligned one of the same dtype."""
    for dtype in FLOATS:
        storage = randn(3 * 8192 + 9, dtype, 3)
        views = [storage[1:], storage[1:8194], storage[3:5]]
        assert all(v.data_ptr() % 16 for v in views)
        aligned = randn(9000, dtype, 4)
        assert flags(views + [aligned]) == [0, 0, 0, 0]
        for pos in (0, 8191, 8192, 3 * 8192 + 7):
            bad = storage.clone()
            bad[pos + 1] = math.nan
            views = [bad[1:], bad[1:8194], bad[3:5]]
            assert flags(views + [aligned]) == want(views + [aligned]), (dtype, pos)


def test_strided_and_permuted_tensors():
    """A transposed tensor is read in place, a strided slice through a contiguous copy."""
    t = randn(300 * 70, torch.bfloat16, 5).view(300, 70)
    t[299, 3] = math.inf
    tensors = [t.t(), t[::2], t[1::2], t[:, 4:]]
    assert flags(tensors) == [1, 0, 1, 0]


def test_extreme_finite_values_are_finite():
    """Largest magnitudes, subnormals and signed zeros: no flag (their float32 L1 norm overflows)."""
    tensors = []
    for dtype in FLOATS:
        info = torch.finfo(dtype)
        tensors.append(torch.tensor([info.max, -info.max, info.smallest_normal / 4, -0.0, 0.0] * 3000, dtype=dtype))
    assert flags(tensors) == [0, 0, 0]


def test_float8_and_integers():
    tensors = [torch.full((100,), 448.0).to(torch.float8_e4m3fn), torch.full((100,), 57344.0).to(torch.float8_e5m2),
               torch.arange(100), torch.ones(5, dtype=torch.bool)]
    assert flags(tensors) == [0, 0, 0, 0]
    for t, bad in ((tensors[0], math.nan), (tensors[1], math.inf), (tensors[1], math.nan)):
        t[99] = bad
    assert flags(tensors) == [1, 1, 0, 0]


def test_empty_list_and_empty_tensors():
    assert flags([]) == []
    assert flags([torch.empty(0), torch.empty(0, 5, dtype=torch.bfloat16)]) == [0, 0]


def test_nonfinite_on_cpu():
    """The CPU path (float32 L1 norms, non-finite norms confirmed element-wise) agrees."""
    big = torch.full((100,), torch.finfo(torch.float32).max)  # finite, its L1 norm overflows
    bad = randn(50, torch.bfloat16, 6)
    bad[49] = -math.inf
    assert nonfinite_later([big, bad, torch.empty(0), randn(9, torch.float16, 7)])() == [1]
    assert nonfinite_later([])() == []
