"""neurokern.trim_l1: per task (sum |tau|, sum |trim(tau)|) over a list of tensors, float64."""
import pytest
import torch

import neurokern.ops as nk
from neurokern.ops import reference as ref

from .conftest import DTYPE_IDS, DTYPES, INT64_MAX, TASKS, make_group, opcheck, seed_of

# Sums of float32 values accumulated in float64 by both sides, in different orders.
RTOL = 1e-12


def _list_group(shapes, T, dtype, tag):
    group = [make_group(s, T, dtype, seed_of(tag, s, T, dtype, i)) for i, s in enumerate(shapes)]
    bases = [b for b, _ in group]
    fts = [group[i][1][t] for t in range(T) for i in range(len(shapes))]  # task-major
    return bases, fts


SHAPE_LISTS = [
    [(1, 1)],
    [(33, 65)],
    [(1, 17), (17, 1), (7,)],
    [(33, 65), (0, 5), (7,), (3, 2, 5)],
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("shapes", SHAPE_LISTS, ids=str)
@pytest.mark.parametrize("scope", ["none", "global", "global_exact", "per_tensor"])
def test_vs_reference(shapes, T, dtype, scope):
    bases, fts = _list_group(shapes, T, dtype, "l1")
    N = sum(b.numel() for b in bases)
    trim = None
    if scope in ("global", "global_exact"):
        k = [max(1, (N * (t + 1)) // (T + 2)) for t in range(T)]
        trim = nk.magnitude_threshold(bases, fts, k, keep_ties=scope == "global")
    elif scope == "per_tensor":
        k = [b.numel() // 3 + t for b in bases for t in range(T)]
        trim = nk.magnitude_threshold(bases, fts, k, keep_ties=False, per_tensor=True)
    got = nk.trim_l1(bases, fts, trim)
    want = ref.trim_l1(bases, fts, trim)
    assert got.dtype == torch.float64 and got.shape == (T, 2)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)
    # The first column never depends on the trim; the second is at most the first.
    assert torch.all(got[:, 1] <= got[:, 0])
    if trim is None:
        assert torch.equal(got[:, 0], got[:, 1])


def test_hand_2x3():
    # tau = [[1, -2, 3], [-4, 5, -6]]: sum |tau| = 21.
    base = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    tau = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    # Threshold 3 keeps 3, 4, 5, 6 -> 18; with tie_limit 2 the 3 (flat position 2) is dropped -> 15.
    thr, lim = torch.tensor([3.0]), torch.tensor([INT64_MAX])
    assert nk.trim_l1([base], [base + tau], (thr, lim)).tolist() == [[21.0, 18.0]]
    assert nk.trim_l1([base], [base + tau], (thr, torch.tensor([2]))).tolist() == [[21.0, 15.0]]
    assert nk.trim_l1([base], [base + tau], (thr, torch.tensor([3]))).tolist() == [[21.0, 18.0]]
    assert nk.trim_l1([base], [base + tau], None).tolist() == [[21.0, 21.0]]
    # Threshold +inf (k = 0) keeps nothing.
    inf = (torch.tensor([float("inf")]), torch.tensor([0]))
    assert nk.trim_l1([base], [base + tau], inf).tolist() == [[21.0, 0.0]]


def test_hand_list_global_vs_per_tensor_positions():
    # Two tensors, one task. A: |tau| = [2, 2], B: |tau| = [2, 1]; global positions A 0,1 / B 2,3.
    bA, bB = torch.zeros(2), torch.zeros(2)
    fA, fB = torch.tensor([2.0, -2.0]), torch.tensor([-2.0, 1.0])
    # Global [T] scope: threshold 2, tie_limit 3 keeps positions 0, 1, 2 -> 6 of 7.
    got = nk.trim_l1([bA, bB], [fA, fB], (torch.tensor([2.0]), torch.tensor([3])))
    assert got.tolist() == [[7.0, 6.0]]
    # Per-tensor [n, T]: positions restart at 0 in B, tie_limit 1 per tensor keeps A[0] and B[0].
    per = (torch.tensor([[2.0], [2.0]]), torch.tensor([[1], [1]]))
    assert nk.trim_l1([bA, bB], [fA, fB], per).tolist() == [[7.0, 4.0]]
    # Per-tensor thresholds differ: A keeps nothing (inf), B keeps |tau| >= 1 -> 3.
    per = (torch.tensor([[float("inf")], [1.0]]), torch.tensor([[0], [INT64_MAX]]))
    assert nk.trim_l1([bA, bB], [fA, fB], per).tolist() == [[7.0, 3.0]]
    assert ref.trim_l1([bA, bB], [fA, fB], per).tolist() == [[7.0, 3.0]]


def test_two_tasks_distinct_thresholds():
    base = torch.zeros(4)
    f0 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    f1 = torch.tensor([-0.5, 0.0, 8.0, -1.0])
    trim = (torch.tensor([2.5, 0.75]), torch.tensor([INT64_MAX, INT64_MAX]))
    assert nk.trim_l1([base], [f0, f1], trim).tolist() == [[10.0, 7.0], [9.5, 9.0]]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_degenerate(dtype):
    # Zero-row / empty tensors only: all zeros.
    b, f = make_group((0, 5), 3, dtype, 0)
    assert nk.trim_l1([b], f).tolist() == [[0.0, 0.0]] * 3
    # All task vectors zero.
    b, f = make_group((4, 6), 2, dtype, 1, zero_tasks=(0, 1))
    trim = nk.magnitude_threshold([b], f, [3, 3], keep_ties=False)
    assert nk.trim_l1([b], f, trim).tolist() == [[0.0, 0.0]] * 2


def test_bad_arguments():
    base, fts = make_group((3, 4), 2, torch.float32, 0)
    with pytest.raises(RuntimeError, match="empty list"):
        nk.trim_l1([], [])
    with pytest.raises(RuntimeError, match="not a multiple"):
        nk.trim_l1([base, base], fts[:1])
    with pytest.raises(RuntimeError, match=r"finetuned\[0\] has shape"):
        nk.trim_l1([base], [fts[0].view(4, 3), fts[1]])
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        nk.trim_l1([base.double()], [f.double() for f in fts])
    with pytest.raises(RuntimeError, match="one entry per task"):
        nk.trim_l1([base], fts, (torch.zeros(3), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(RuntimeError, match="given together"):
        torch.ops.neurokern.trim_l1.default([base], fts, torch.zeros(2), None)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_opcheck(per_tensor):
    b1, f1 = make_group((5, 6), 2, torch.float32, 1)
    b2, f2 = make_group((7,), 2, torch.float32, 2)
    bases, fts = [b1, b2], [f1[0], f2[0], f1[1], f2[1]]
    k = [4, 9, 3, 1] if per_tensor else [4, 9]
    thr, lim = nk.magnitude_threshold(bases, fts, k, keep_ties=False, per_tensor=per_tensor)
    opcheck(torch.ops.neurokern.trim_l1.default, (bases, fts, thr, lim))
    opcheck(torch.ops.neurokern.trim_l1.default, (bases, fts))
