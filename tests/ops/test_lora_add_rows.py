"""neurokern.lora_add_rows: rows of a weight += the same rows of ΔW = scale·B·A, in place, bitwise
the reference (ΔW formed whole as PEFT's get_delta_weight forms it on a CPU, added as its merge
adds it) for every pair of weight and factor dtypes, transposed or not, embedding or not, for
pieces of any rows; one call that leaves the GIL to other threads."""
import itertools
import sys
import threading
import time

import pytest
import torch

import neurokern.ops as nk
from neurokern.ops import reference as ref

from .conftest import DTYPE_IDS, DTYPES, gen, opcheck, seed_of

# (ΔW rows, columns, rank): one row, fewer rows than a product block (15), one block (16), one
# more (17), odd sizes, many narrow rows (tiles of many blocks), a wide weight (tiles of 16 rows).
SHAPES = [(1, 7, 3), (15, 33, 4), (16, 50, 5), (17, 64, 8), (37, 53, 5), (300, 24, 4), (40, 1000, 16)]


def pieces(rows: int) -> list[tuple[int, int]]:
    """(first, count): all rows, the first and the last row, 15, 16 and 17 rows at odd offsets,
    a middle cut."""
    out = {(0, rows), (0, 1), (rows - 1, 1), (rows // 3, max(1, rows // 2))}
    for n in (15, 16, 17):
        if n <= rows:
            out |= {(0, n), (rows - n, n), ((rows - n) // 2 + (rows - n) % 2, n)}
    return sorted(out)


def factors(rows, cols, rank, dtype, transposed, seed, scale=0.3):
    g = gen(seed)
    A = (torch.randn(rank, rows if transposed else cols, generator=g) * scale).to(dtype)
    B = (torch.randn(cols if transposed else rows, rank, generator=g) * scale).to(dtype)
    return A, B


def weight(rows, cols, dtype, seed):
    """Entries of every magnitude (1e-3 to 1e2 along a row), so that the sum's rounding matters
    in every binade, and a few signed zeros."""
    w = torch.randn(rows, cols, generator=gen(seed)) * torch.logspace(-3, 2, cols)
    w.view(-1)[::11] = -0.0
    return w.to(dtype)


def bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


def check(W, A, B, scale, transposed, embedding, first, count):
    rows = W[first:first + count].clone()
    want = ref.lora_add_rows(rows, A, B, scale, transposed, embedding, first)
    assert nk.lora_add_rows(rows, A, B, scale, transposed, embedding, first) is rows
    assert torch.equal(bits(rows), bits(want)), (first, count)
    return want


@pytest.mark.parametrize("weight_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("factor_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("transposed", [False, True], ids=["BA", "BAt"])
@pytest.mark.parametrize("embedding", [False, True], ids=["linear", "embedding"])
def test_vs_reference(weight_dtype, factor_dtype, transposed, embedding):
    for rows, cols, rank in SHAPES:
        seed = seed_of("lora", rows, cols, rank, weight_dtype, factor_dtype, transposed)
        A, B = factors(rows, cols, rank, factor_dtype, transposed, seed)
        W = weight(rows, cols, weight_dtype, seed)
        for first, count in pieces(rows):
            want = check(W, A, B, 1.7, transposed, embedding, first, count)
            assert not torch.equal(bits(want), bits(W[first:first + count]))  # ΔW moved the rows


@pytest.mark.parametrize("weight_dtype,factor_dtype",
                         [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
                         ids=["f32-f32", "bf16-f32", "f16-bf16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["BA", "BAt"])
@pytest.mark.parametrize("rows,cols,rank", [(100, 4096, 16), (3000, 24, 8), (50, 11008, 4)])
def test_pieces_of_large_weights(weight_dtype, factor_dtype, transposed, rows, cols, rank):
    """Weights whose pieces span several tiles: tiles of 16 rows of a wide weight, of thousands of
    rows of a narrow one (the last tile moved back to end at the last row), 11008 columns."""
    seed = seed_of("large", rows, cols, rank, weight_dtype, factor_dtype, transposed)
    A, B = factors(rows, cols, rank, factor_dtype, transposed, seed)
    W = weight(rows, cols, weight_dtype, seed)
    for first, count in [(0, rows), (1, rows - 2), (rows - 37, 37), (5, 33)]:
        check(W, A, B, 0.37, transposed, False, first, count)


@pytest.mark.parametrize("scale", [0.0, -2.5, 1 / 3, 1e-30, 3e38], ids=["zero", "negative", "third", "tiny", "huge"])
@pytest.mark.parametrize("weight_dtype", DTYPES, ids=DTYPE_IDS)
def test_scales(scale, weight_dtype):
    """Scale 0 (ΔW is ±0: the rows keep their values, -0 + +0 included, as PEFT's add gives them),
    a negative scale, one that float32 rounds (torch multiplies by float32(scale), not in double),
    and scales whose ΔW underflows or overflows."""
    A, B = factors(40, 37, 5, torch.float32, False, seed_of("scale", scale))
    W = weight(40, 37, weight_dtype, seed_of("scale", weight_dtype))
    for first, count in [(0, 40), (3, 17), (39, 1)]:
        check(W, A, B, scale, False, False, first, count)


@pytest.mark.parametrize("weight_dtype", DTYPES, ids=DTYPE_IDS)
def test_non_finite_weights(weight_dtype):
    """±Inf in the rows: as the reference, bitwise; NaN stays NaN (its bits may differ from torch's
    vectorized rounding); every other entry bitwise."""
    A, B = factors(40, 37, 4, torch.float32, False, 11)
    W = weight(40, 37, weight_dtype, 11)
    W[3, 5], W[7, 36], W[8, 2], W[9, 0] = float("nan"), -float("nan"), float("inf"), -float("inf")
    got = W.clone()
    nk.lora_add_rows(got, A, B, 0.5)
    want = ref.lora_add_rows(W, A, B, 0.5)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan) and int(nan.sum()) == 2
    assert torch.equal(bits(got[~nan]), bits(want[~nan]))


def test_empty():
    """No rows, no columns: nothing to do; rank 0: ΔW = 0, the rows plus zeros."""
    A, B = torch.randn(4, 9), torch.randn(6, 4)
    nk.lora_add_rows(torch.empty(0, 9), A, B, 1.0, first=6)
    nk.lora_add_rows(torch.empty(3, 0), torch.empty(4, 0), B, 1.0, first=2)
    W = weight(5, 9, torch.bfloat16, 0)
    check(W, torch.empty(0, 9), torch.empty(5, 0), 1.0, False, False, 0, 5)
    check(W, torch.empty(0, 5), torch.empty(9, 0), 1.0, True, False, 1, 3)


def test_factor_values_that_differ_in_the_last_bits_give_other_rows():
    """The comparison sees one ulp: A changed in one entry by one ulp changes the rows it reaches."""
    A, B = factors(32, 40, 4, torch.float32, False, 7)
    W = torch.zeros(32, 40)
    a, b = W.clone(), W.clone()
    nk.lora_add_rows(a, A, B, 1.0, False, False, 0)
    A2 = A.clone()
    A2[0, 5] = torch.nextafter(A2[0, 5], torch.tensor(1.0))
    nk.lora_add_rows(b, A2, B, 1.0, False, False, 0)
    assert not torch.equal(a[:, 5], b[:, 5]) and torch.equal(a[:, :5], b[:, :5])


def test_argument_checks():
    A, B, rows = torch.randn(4, 9), torch.randn(6, 4), torch.randn(2, 9)
    with pytest.raises(ValueError, match="CPU only .* rows is on meta"):
        nk.lora_add_rows(rows.to("meta"), A, B, 1.0)
    with pytest.raises(ValueError, match="CPU only .* B is on meta"):
        nk.lora_add_rows(rows, A, B.to("meta"), 1.0)
    with pytest.raises(RuntimeError, match=r"rows \[5, 7\) are not rows of ΔW, which has 6"):
        nk.lora_add_rows(rows, A, B, 1.0, first=5)
    with pytest.raises(RuntimeError, match="rows have 9 columns, ΔW has 6"):
        nk.lora_add_rows(rows, A, B, 1.0, transposed=True)
    with pytest.raises(RuntimeError, match="A is Float, B is BFloat16"):
        nk.lora_add_rows(rows, A, B.bfloat16(), 1.0)
    with pytest.raises(RuntimeError, match=r"A \[r, in\] and B \[out, r\] needed"):
        nk.lora_add_rows(rows, A, B.T.contiguous(), 1.0)
    with pytest.raises(RuntimeError, match="contiguous matrix"):
        nk.lora_add_rows(torch.randn(9, 2).T, A, B, 1.0)
    with pytest.raises(RuntimeError, match="expected float32, bfloat16 or float16"):
        nk.lora_add_rows(rows.double(), A, B, 1.0)


def test_opcheck():
    A, B = factors(20, 9, 3, torch.bfloat16, False, 1)
    opcheck(torch.ops.neurokern.lora_add_rows.default, (weight(17, 9, torch.float32, 1), A, B, 1.5, False, False, 3))


def test_runs_without_the_gil():
    """While one thread runs the op on a large piece, another runs Python code: the longest pause
    the second thread sees is less than half the op's time (here 4 to 7 ms of 46 to 50). An op
    that held the GIL would stall it for the whole call (the switch interval is made short, so
    that the worker's Python before and after the call stalls it little)."""
    A, B = factors(8192, 4096, 16, torch.float32, False, 3)
    W = torch.zeros(8192, 4096, dtype=torch.bfloat16)
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)  # the op on one core, the spinning thread on another
    sys.setswitchinterval(1e-4)
    try:
        start = time.perf_counter()
        nk.lora_add_rows(W, A, B, 1.0)
        alone = time.perf_counter() - start
        done = threading.Event()
        worker = threading.Thread(target=lambda: (nk.lora_add_rows(W, A, B, 1.0), done.set()))
        stamps = [time.perf_counter()]
        worker.start()
        while not done.is_set():
            stamps.append(time.perf_counter())
        worker.join()
    finally:
        torch.set_num_threads(threads)
        sys.setswitchinterval(interval)
    longest = max(b - a for a, b in itertools.pairwise(stamps))
    assert alone > 0.01, alone  # long enough to tell a stall from a thread switch
    assert longest < alone / 2, (longest, alone)
