"""neurokern.neuron_stats: per-row Gram of the trimmed task vectors, their dots with the row w,
and |w|^2, all float64."""
import pytest
import torch

import neurokern.ops as nk
from neurokern.ops import reference as ref

from .conftest import (DTYPE_IDS, DTYPES, SHAPES_2D, TASKS, list_trims, make_group, make_list, opcheck,
                       seed_of)

# Products of float32 values are exact in float64; only the summation order differs between the
# kernel and the reference (einsum): relative 1e-12, absolute 1e-12 for entries that cancel.
TOL = dict(rtol=1e-12, atol=1e-12)


def _check(base, fts, trim=None, offset=0):
    gram, dots, sq = nk.neuron_stats(base, fts, trim, offset)
    rg, rd, rq = ref.neuron_stats(base, fts, trim, offset)
    R, T = base.shape[0], len(fts)
    assert gram.dtype == dots.dtype == sq.dtype == torch.float64
    assert gram.shape == (R, T, T) and dots.shape == (R, T) and sq.shape == (R,)
    torch.testing.assert_close(gram, rg, **TOL)
    torch.testing.assert_close(dots, rd, **TOL)
    torch.testing.assert_close(sq, rq, **TOL)
    assert torch.equal(gram, gram.transpose(1, 2))
    return gram, dots, sq


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("shape", SHAPES_2D, ids=str)
def test_vs_reference(shape, T, dtype):
    base, fts = make_group(shape, T, dtype, seed_of("ns", shape, T, dtype))
    _check(base, fts)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", [1, 2, 5, 8])
@pytest.mark.parametrize("keep_ties", [True, False])
def test_trimmed_with_offset_vs_reference(T, dtype, keep_ties):
    """The tensor is the second of a global trim scope: positions start at prefix.numel()."""
    prefix, pf = make_group((5, 3), T, dtype, seed_of("nsp", T, dtype))
    base, fts = make_group((33, 65), T, dtype, seed_of("nsb", T, dtype), zero_rows=(4,),
                           base_zero_rows=(7,))
    N = prefix.numel() + base.numel()
    trim = nk.magnitude_threshold([prefix, base], [x for t in range(T) for x in (pf[t], fts[t])],
                                  [N // 4 + 3 * t for t in range(T)], keep_ties=keep_ties)
    gram, dots, sq = _check(base, fts, trim, offset=prefix.numel())
    # Trimming changed something (the test is not vacuous) ...
    g_full, _, _ = nk.neuron_stats(base, fts)
    assert not torch.equal(gram, g_full)
    # ... and other offsets follow the reference too (tie cut-offs move with the offset).
    _check(base, fts, trim, offset=0)
    _check(base, fts, trim, offset=prefix.numel() + 100)


def test_hand_2x3():
    # Row 0: w = [1, 2, 0], tau1 = [1, 0, 1], tau2 = [0, -1, 2]. Row 1: w = 0, tau1 = [3, 0, 0], tau2 = 0.
    base = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    tau1 = torch.tensor([[1.0, 0.0, 1.0], [3.0, 0.0, 0.0]])
    tau2 = torch.tensor([[0.0, -1.0, 2.0], [0.0, 0.0, 0.0]])
    gram, dots, sq = nk.neuron_stats(base, [base + tau1, base + tau2])
    assert gram.tolist() == [[[2.0, 2.0], [2.0, 5.0]], [[9.0, 0.0], [0.0, 0.0]]]
    assert dots.tolist() == [[1.0, -2.0], [0.0, 0.0]]
    assert sq.tolist() == [5.0, 0.0]
    # Trim: threshold 1, tie_limit 2 for both tasks. tau1's tied 1's sit at flat positions 0 and 2:
    # only position 0 survives; tau2's tied -1 sits at position 1 and survives; 2 and 3 exceed 1.
    trim = (torch.tensor([1.0, 1.0]), torch.tensor([2, 2]))
    gram, dots, sq = nk.neuron_stats(base, [base + tau1, base + tau2], trim)
    assert gram.tolist() == [[[1.0, 0.0], [0.0, 5.0]], [[9.0, 0.0], [0.0, 0.0]]]
    assert dots.tolist() == [[1.0, -2.0], [0.0, 0.0]]
    # The same trim at offset 1: position 0 becomes 1 (kept), 2 becomes 3 (dropped), tau2's -1 at
    # position 1 becomes 2 (dropped).
    gram, dots, sq = nk.neuron_stats(base, [base + tau1, base + tau2], trim, offset=1)
    assert gram.tolist() == [[[1.0, 0.0], [0.0, 4.0]], [[9.0, 0.0], [0.0, 0.0]]]
    assert dots.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    # Threshold +inf keeps nothing; |w|^2 does not depend on the trim.
    inf = (torch.full((2,), float("inf")), torch.zeros(2, dtype=torch.long))
    gram, dots, sq = nk.neuron_stats(base, [base + tau1, base + tau2], inf)
    assert not gram.any() and not dots.any() and sq.tolist() == [5.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_degenerate(dtype):
    # Zero rows and zero-length rows.
    for shape in [(0, 5), (5, 0)]:
        base, fts = make_group(shape, 3, dtype, 0)
        gram, dots, sq = _check(base, fts)
        assert not gram.any() and not dots.any() and not sq.any()
    # Zero-norm neurons and all-zero task vectors.
    base, fts = make_group((6, 9), 3, dtype, seed_of("nsd"), base_zero_rows=(1, 4), zero_tasks=(2,))
    gram, dots, sq = _check(base, fts)
    assert sq[1] == 0 and sq[4] == 0 and not dots[[1, 4]].any() and gram[1, 0, 0] > 0
    assert not gram[:, 2].any() and not gram[:, :, 2].any() and not dots[:, 2].any()
    assert torch.isfinite(gram).all() and torch.isfinite(dots).all()


def test_large_parallel_rows():
    """Enough rows that at::parallel_for splits them over threads."""
    base, fts = make_group((1500, 40), 3, torch.float16, seed_of("nsl"))
    _check(base, fts)


def test_bad_arguments():
    base, fts = make_group((3, 4), 2, torch.float32, 0)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        nk.neuron_stats(base.flatten(), [f.flatten() for f in fts])
    with pytest.raises(RuntimeError, match=r"finetuned\[1\] has shape"):
        nk.neuron_stats(base, [fts[0], fts[1].t()])
    with pytest.raises(RuntimeError, match=r"finetuned\[0\] is Half"):
        nk.neuron_stats(base, [fts[0].half(), fts[1]])
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        nk.neuron_stats(base.double(), [f.double() for f in fts])
    with pytest.raises(RuntimeError, match="one entry per task"):
        nk.neuron_stats(base, fts, (torch.zeros(1), torch.zeros(1, dtype=torch.long)))


def test_opcheck():
    base, fts = make_group((5, 6), 3, torch.float32, 3)
    thr, lim = nk.magnitude_threshold([base], fts, [10, 10, 10], keep_ties=False)
    opcheck(torch.ops.neurokern.neuron_stats.default, (base, fts, thr, lim, 2))
    opcheck(torch.ops.neurokern.neuron_stats.default, (base, fts))


# ---------------------------------------------------------------------------------------------
# neuron_stats_multi: a list of matrices in one call, rows concatenated in list order

# Odd sizes, zero-row and zero-column matrices, single rows and columns.
MATRICES = [(33, 65), (0, 5), (1, 17), (17, 1), (4, 0), (9, 32), (1, 1)]
DTYPE_LISTS = [(torch.float32,), (torch.bfloat16,), (torch.float16,), tuple(DTYPES)]
DTYPE_LIST_IDS = DTYPE_IDS + ["mixed"]


def per_tensor_stats(bases, fts, trim, offsets):
    """torch.cat of the single-tensor op over the list (what the multi op must equal bitwise)."""
    parts = []
    for i, b in enumerate(bases):
        column, trim_i, offset = ref._multi_args(bases, fts, trim, offsets, i)
        parts.append(nk.neuron_stats(b, column, trim_i, offset))
    return [torch.cat(p) for p in zip(*parts)]


@pytest.mark.parametrize("dtypes", DTYPE_LISTS, ids=DTYPE_LIST_IDS)
@pytest.mark.parametrize("T", range(1, 9))
@pytest.mark.parametrize("scope", ["none", "global", "tensor"])
def test_multi_equals_per_tensor(scope, T, dtypes):
    bases, fts = make_list(T, dtypes, seed_of("nsm", T, dtypes), shapes=MATRICES)
    trim, offsets = list_trims(bases, fts, T, scope)
    got = nk.neuron_stats_multi(bases, fts, trim, offsets)
    R = sum(b.shape[0] for b in bases)
    assert [x.shape for x in got] == [(R, T, T), (R, T), (R,)]
    for a, b in zip(got, per_tensor_stats(bases, fts, trim, offsets)):
        assert a.dtype == torch.float64 and torch.equal(a, b)
    for a, b in zip(got, ref.neuron_stats_multi(bases, fts, trim, offsets)):
        torch.testing.assert_close(a, b, **TOL)


def test_multi_trim_did_something():
    """The trims reach each tensor: [T] with offsets, [n, T] per row (different results)."""
    T = 3
    bases, fts = make_list(T, (torch.float32,), seed_of("nsm_trim"), shapes=[(6, 40), (5, 33)])
    plain = nk.neuron_stats_multi(bases, fts)[0]
    for scope in ("global", "tensor"):
        trim, offsets = list_trims(bases, fts, T, scope)
        gram = nk.neuron_stats_multi(bases, fts, trim, offsets)[0]
        assert not torch.equal(gram[:6], plain[:6]) and not torch.equal(gram[6:], plain[6:])


def test_multi_bad_arguments():
    bases, fts = make_list(2, (torch.float32,), 0, shapes=[(3, 4), (5, 2)])
    ops = torch.ops.neurokern
    with pytest.raises(RuntimeError, match=r"base\[1\] must be 2-D"):
        ops.neuron_stats_multi([bases[0], bases[1].flatten()], [fts[0], fts[1].flatten(), fts[2], fts[3].flatten()])
    with pytest.raises(RuntimeError, match="empty list"):
        ops.neuron_stats_multi([], [])
    with pytest.raises(RuntimeError, match="not a multiple"):
        ops.neuron_stats_multi(bases, fts[:3])
    with pytest.raises(RuntimeError, match="offsets must be empty or hold one entry per tensor"):
        ops.neuron_stats_multi(bases, fts, None, None, [0])
    with pytest.raises(RuntimeError, match=r"threshold and tie_limit must be \[2\] or \[2, 2\]"):
        ops.neuron_stats_multi(bases, fts, torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="given together"):
        ops.neuron_stats_multi(bases, fts, torch.zeros(2), None)


def test_multi_opcheck():
    T = 2
    bases, fts = make_list(T, (torch.float32, torch.bfloat16), 3, shapes=[(5, 3), (0, 2), (4, 6)])
    (thr, lim), _ = list_trims(bases, fts, T, "tensor")
    opcheck(torch.ops.neurokern.neuron_stats_multi.default, (bases, fts, thr, lim, []))
    (thr, lim), offsets = list_trims(bases, fts, T, "global")
    opcheck(torch.ops.neurokern.neuron_stats_multi.default, (bases, fts, thr, lim, offsets))
    opcheck(torch.ops.neurokern.neuron_stats_multi.default, (bases, fts))
