"""neurokern.magnitude_threshold: exact k-th largest |tau| (radix select) against the sorting
reference, tie handling, scopes, degenerate inputs and argument checks."""
import math

import pytest
import torch

import neurokern.ops as nk
from neurokern.ops import reference as ref

from .conftest import (DTYPE_IDS, DTYPES, INT64_MAX, SHAPES_ND, TASKS, kept_count, make_group,
                      opcheck, seed_of)

INF = math.inf


def _both(bases, fts, k, keep_ties=True, per_tensor=False):
    got = nk.magnitude_threshold(bases, fts, k, keep_ties=keep_ties, per_tensor=per_tensor)
    want = ref.magnitude_threshold(bases, fts, k, keep_ties=keep_ties, per_tensor=per_tensor)
    return got, want


def _assert_exact(got, want):
    """Thresholds are float32 bit patterns of |tau| computed in float32 by both: exact equality."""
    (thr, lim), (rthr, rlim) = got, want
    assert thr.dtype == torch.float32 and lim.dtype == torch.int64
    assert thr.shape == rthr.shape and lim.shape == rlim.shape
    assert torch.equal(thr, rthr), (thr, rthr)
    assert torch.equal(lim, rlim), (lim, rlim)


def _ks(N, T, seed):
    """A spread of k per task: 0, 1, middle values, N-1, N and beyond N, cycled over tasks."""
    g = torch.Generator().manual_seed(seed)
    pool = [0, 1, N // 2, max(N - 1, 0), N, N + 3, -2]
    return [pool[t % len(pool)] if t < len(pool) else int(torch.randint(0, N + 1, (1,), generator=g))
            for t in range(T)]


# ---------------------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("shape", SHAPES_ND, ids=str)
@pytest.mark.parametrize("keep_ties", [True, False])
def test_single_tensor_vs_reference(shape, T, dtype, keep_ties):
    base, fts = make_group(shape, T, dtype, seed_of("mt1", shape, T, dtype))
    N = base.numel()
    g = torch.Generator().manual_seed(seed_of("k", shape, T))
    k = [int(torch.randint(0, N + 1, (1,), generator=g)) for _ in range(T)]
    got, want = _both([base], fts, k, keep_ties)
    _assert_exact(got, want)
    if not keep_ties:
        assert kept_count([base], fts, *got) == [min(max(x, 0), N) for x in k]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("keep_ties", [True, False])
def test_global_scope_list_vs_reference(T, dtype, keep_ties):
    shapes = [(33, 65), (7,), (0, 5), (1, 17), (17, 1), (1, 1), (3, 2, 5)]
    group = [make_group(s, T, dtype, seed_of("mtg", s, T, dtype, i)) for i, s in enumerate(shapes)]
    bases = [b for b, _ in group]
    fts = [group[i][1][t] for t in range(T) for i in range(len(shapes))]  # task-major
    N = sum(b.numel() for b in bases)
    k = _ks(N, T, seed_of("kg", T))
    got, want = _both(bases, fts, k, keep_ties)
    _assert_exact(got, want)
    assert got[0].shape == (T,)
    counts = kept_count(bases, fts, *got)
    for t in range(T):
        expect = min(max(k[t], 0), N)
        if keep_ties:
            assert counts[t] >= expect
        else:
            assert counts[t] == expect, (t, counts[t], k[t])


@pytest.mark.parametrize("T", [1, 2, 5])
@pytest.mark.parametrize("keep_ties", [True, False])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_scope_mixing_dtypes(T, keep_ties, per_tensor):
    """A list mixing float32, bfloat16 and float16 tensors (a model keeping its norms in float32)
    selects over the same float32 magnitudes as float32 copies of it: equal outputs."""
    shapes = [(33, 65), (7,), (0, 5), (1, 17), (17, 1), (3, 2, 5)]
    group = [make_group(s, T, DTYPES[i % 3], seed_of("mixed", s, T, i), noise=0.05) for i, s in enumerate(shapes)]
    bases = [b for b, _ in group]
    fts = [group[i][1][t] for t in range(T) for i in range(len(shapes))]
    N = sum(b.numel() for b in bases)
    k = [max(1, b.numel() // 4) for b in bases for _ in range(T)] if per_tensor else _ks(N, T, seed_of("mk", T))
    got = nk.magnitude_threshold(bases, fts, k, keep_ties, per_tensor=per_tensor)
    want = nk.magnitude_threshold([b.float() for b in bases], [f.float() for f in fts], k, keep_ties, per_tensor=per_tensor)
    _assert_exact(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("keep_ties", [True, False])
def test_per_tensor_vs_reference(T, dtype, keep_ties):
    shapes = [(33, 65), (7,), (0, 5), (1, 17), (17, 1)]
    group = [make_group(s, T, dtype, seed_of("mtp", s, T, dtype, i)) for i, s in enumerate(shapes)]
    bases = [b for b, _ in group]
    fts = [group[i][1][t] for t in range(T) for i in range(len(shapes))]
    n = len(shapes)
    g = torch.Generator().manual_seed(seed_of("kp", T))
    k = [int(torch.randint(-1, bases[i].numel() + 2, (1,), generator=g)) for i in range(n) for _ in range(T)]
    got, want = _both(bases, fts, k, keep_ties, per_tensor=True)
    _assert_exact(got, want)
    assert got[0].shape == (n, T)
    counts_expected = [[min(max(k[i * T + t], 0), bases[i].numel()) for t in range(T)] for i in range(n)]
    for i in range(n):
        for t in range(T):
            tau = ref.task_vector(bases[i], fts[t * n + i])
            c = int(ref.keep_mask(tau, got[0][i, t], got[1][i, t], 0).sum())
            if keep_ties:
                assert c >= counts_expected[i][t]
            else:
                assert c == counts_expected[i][t]


def test_large_tensor_crosses_parallel_chunks():
    """> kGrain (32768) entries: the histogram is built in parallel chunks and merged."""
    base, fts = make_group((300, 250), 2, torch.bfloat16, seed_of("big"))
    N = base.numel()
    for keep_ties in (True, False):
        got, want = _both([base], fts, [N // 10, N // 3], keep_ties)
        _assert_exact(got, want)
        if not keep_ties:
            assert kept_count([base], fts, *got) == [N // 10, N // 3]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("keep_ties", [True, False])
def test_kernel_trim_mask_equals_reference_mask(dtype, keep_ties):
    """The mask the kernels apply with the produced pair (read through weighted_sum with coeffs
    [0, 1], float32 output: kept entries are tau, dropped ones 0) equals reference.keep_mask
    exactly, for every tensor of a global scope (offsets) and with many ties (bf16 / fp16)."""
    T = 3
    shapes = [(5, 7), (33, 65), (9,)]
    group = [make_group(s, T, dtype, seed_of("mask", s, dtype)) for s in shapes]
    bases = [b for b, _ in group]
    fts = [group[i][1][t] for t in range(T) for i in range(len(shapes))]
    N = sum(b.numel() for b in bases)
    thr, lim = nk.magnitude_threshold(bases, fts, [N // 7, N // 2, N - 5], keep_ties=keep_ties)
    offset = 0
    for i, base in enumerate(bases):
        for t in range(T):
            f = fts[t * len(shapes) + i]
            coeffs = torch.zeros(T + 1)
            coeffs[t + 1] = 1.0
            out = nk.weighted_sum(base, group[i][1], coeffs, (thr, lim), offset, out_dtype=torch.float32)
            tau = ref.task_vector(base, f)
            mask = ref.keep_mask(tau, thr[t], lim[t], offset)
            assert torch.equal(out, tau * mask)
            assert torch.equal(out != 0, mask & (tau != 0))
        offset += base.numel()


# ---------------------------------------------------------------------------------------------
# Hand-computed cases


def _group_from_taus(taus, base=None):
    """A float32 group whose task vectors are exactly `taus` (base 0 unless given)."""
    taus = [torch.tensor(t, dtype=torch.float32) for t in taus]
    base = torch.zeros_like(taus[0]) if base is None else torch.tensor(base, dtype=torch.float32)
    return base, [base + t for t in taus]


def test_hand_2x3():
    # tau = [[0.5, -3, 2], [-2, 1, 2]]; |tau| sorted desc: 3, 2, 2, 2, 1, 0.5.
    base, fts = _group_from_taus([[[0.5, -3.0, 2.0], [-2.0, 1.0, 2.0]]])
    # k = 1: threshold 3, nothing tied beyond it.
    thr, lim = nk.magnitude_threshold([base], fts, [1])
    assert thr.tolist() == [3.0] and lim.tolist() == [INT64_MAX]
    # k = 2, keep ties: threshold 2, all three 2's kept (4 entries).
    thr, lim = nk.magnitude_threshold([base], fts, [2], keep_ties=True)
    assert thr.tolist() == [2.0] and lim.tolist() == [INT64_MAX]
    assert kept_count([base], fts, thr, lim) == [4]
    # k = 2, exact: one of the 2's at flat positions 2, 3, 5 -> the lowest, position 2, limit 3.
    thr, lim = nk.magnitude_threshold([base], fts, [2], keep_ties=False)
    assert thr.tolist() == [2.0] and lim.tolist() == [3]
    # k = 3: positions 2 and 3 -> limit 4; k = 4: all three tied needed -> no limit.
    thr, lim = nk.magnitude_threshold([base], fts, [3], keep_ties=False)
    assert thr.tolist() == [2.0] and lim.tolist() == [4]
    thr, lim = nk.magnitude_threshold([base], fts, [4], keep_ties=False)
    assert thr.tolist() == [2.0] and lim.tolist() == [INT64_MAX]
    # k = 5: threshold 1; k = 6 = N: threshold 0.5 (smallest), everything kept.
    thr, lim = nk.magnitude_threshold([base], fts, [5], keep_ties=False)
    assert thr.tolist() == [1.0] and lim.tolist() == [INT64_MAX]
    thr, lim = nk.magnitude_threshold([base], fts, [6], keep_ties=False)
    assert thr.tolist() == [0.5] and lim.tolist() == [INT64_MAX]


def test_hand_nonzero_base_and_two_tasks():
    # base 1..6; task 0: tau = [0.25, 0.5, -1, 0, 0, 0]; task 1: tau = [-4, 0, 0, 0, 0, 2].
    base = torch.arange(1.0, 7.0).view(2, 3)
    t0 = torch.tensor([[0.25, 0.5, -1.0], [0.0, 0.0, 0.0]])
    t1 = torch.tensor([[-4.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    thr, lim = nk.magnitude_threshold([base], [base + t0, base + t1], [2, 3], keep_ties=False)
    # task 0, k = 2: 1, 0.5 -> threshold 0.5. task 1, k = 3: 4, 2, then one of four 0's (position 1).
    assert thr.tolist() == [0.5, 0.0]
    assert lim.tolist() == [INT64_MAX, 2]


def test_ties_continue_across_tensors_in_global_scope():
    # A: |tau| = [1, 2, 2] (positions 0..2); B: |tau| = [2, 0, 2] (positions 3..5).
    bA, fA = _group_from_taus([[1.0, -2.0, 2.0]])
    bB, fB = _group_from_taus([[-2.0, 0.0, 2.0]])
    bases, fts = [bA, bB], [fA[0], fB[0]]
    # k = 3 exact: four entries tie at 2 (positions 1, 2, 3, 5); keep the first three -> limit 4.
    thr, lim = nk.magnitude_threshold(bases, fts, [3], keep_ties=False)
    assert thr.tolist() == [2.0] and lim.tolist() == [4]
    mA = ref.keep_mask(fA[0] - bA, thr[0], lim[0], 0)
    mB = ref.keep_mask(fB[0] - bB, thr[0], lim[0], 3)
    assert mA.tolist() == [False, True, True] and mB.tolist() == [True, False, False]
    # k = 1 exact: the first tie, position 1 -> limit 2; keep_ties keeps all four.
    thr, lim = nk.magnitude_threshold(bases, fts, [1], keep_ties=False)
    assert thr.tolist() == [2.0] and lim.tolist() == [2]
    thr, lim = nk.magnitude_threshold(bases, fts, [1], keep_ties=True)
    assert thr.tolist() == [2.0] and lim.tolist() == [INT64_MAX]
    assert kept_count(bases, fts, thr, lim) == [4]
    # Per tensor, positions restart at 0 in every tensor: B with k = 1 keeps position 0 -> limit 1.
    thr, lim = nk.magnitude_threshold(bases, fts, [1, 1], keep_ties=False, per_tensor=True)
    assert thr.tolist() == [[2.0], [2.0]] and lim.tolist() == [[2], [1]]


def test_many_equal_magnitudes():
    """Every |tau| equal (signs mixed): keep_ties keeps all, exact keeps the k lowest positions."""
    g = torch.Generator().manual_seed(seed_of("eq"))
    sign = torch.where(torch.rand(5, 9, generator=g) < 0.5, -1.0, 1.0)
    base = torch.randn(5, 9, generator=g).round()  # integers: base + 0.25 * sign is exact
    ft = base + 0.25 * sign
    for k in [1, 7, 44, 45]:
        thr, lim = nk.magnitude_threshold([base], [ft], [k], keep_ties=True)
        assert thr.tolist() == [0.25] and lim.tolist() == [INT64_MAX]
        thr, lim = nk.magnitude_threshold([base], [ft], [k], keep_ties=False)
        assert thr.tolist() == [0.25]
        assert lim.tolist() == [INT64_MAX if k == 45 else k]
        mask = ref.keep_mask(ft - base, thr[0], lim[0])
        assert mask.flatten().tolist() == [i < k for i in range(45)]


# ---------------------------------------------------------------------------------------------
# Degenerate inputs


@pytest.mark.parametrize("keep_ties", [True, False])
def test_k_zero_and_negative_keep_nothing(keep_ties):
    base, fts = make_group((4, 5), 3, torch.float32, seed_of("k0"))
    thr, lim = nk.magnitude_threshold([base], fts, [0, -1, -100], keep_ties=keep_ties)
    assert thr.tolist() == [INF] * 3 and lim.tolist() == [0] * 3
    assert kept_count([base], fts, thr, lim) == [0, 0, 0]


@pytest.mark.parametrize("keep_ties", [True, False])
def test_k_at_least_n_keeps_everything(keep_ties):
    base, fts = make_group((4, 5), 3, torch.float32, seed_of("kN"))
    thr, lim = nk.magnitude_threshold([base], fts, [20, 21, 10**12], keep_ties=keep_ties)
    mins = [float((f - base).abs().min()) for f in fts]
    assert thr.tolist() == mins and lim.tolist() == [INT64_MAX] * 3
    assert kept_count([base], fts, thr, lim) == [20, 20, 20]


@pytest.mark.parametrize("shape", [(0, 5), (0,), (5, 0)], ids=str)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_empty_tensor_alone(shape, per_tensor):
    base, fts = make_group(shape, 2, torch.float32, 0)
    got, want = _both([base], fts, [3, 0], True, per_tensor)
    _assert_exact(got, want)
    assert got[0].flatten().tolist() == [INF, INF] and got[1].flatten().tolist() == [0, 0]


@pytest.mark.parametrize("keep_ties", [True, False])
def test_all_task_vectors_zero(keep_ties):
    base, fts = make_group((3, 4), 2, torch.bfloat16, seed_of("z"), zero_tasks=(0, 1))
    thr, lim = nk.magnitude_threshold([base], fts, [5, 12], keep_ties=keep_ties)
    assert thr.tolist() == [0.0, 0.0]
    # Every entry ties at 0: keep_ties keeps all 12; exact keeps positions 0..4 for k = 5.
    assert lim.tolist() == ([INT64_MAX, INT64_MAX] if keep_ties else [5, INT64_MAX])
    assert kept_count([base], fts, thr, lim) == ([12, 12] if keep_ties else [5, 12])
    _assert_exact((thr, lim), ref.magnitude_threshold([base], fts, [5, 12], keep_ties=keep_ties))


def test_bf16_exact_threshold_bits():
    """bf16 inputs: |tau| in float32 from bf16 operands; the threshold is one of those float32
    values, bit for bit (not rounded back to bf16)."""
    base, fts = make_group((33, 65), 2, torch.bfloat16, seed_of("bits"))
    thr, _ = nk.magnitude_threshold([base], fts, [100, 1000], keep_ties=True)
    for t in range(2):
        mags = (fts[t].float() - base.float()).abs().flatten()
        assert bool((mags == thr[t]).any())
        assert int((mags > thr[t]).sum()) < [100, 1000][t] <= int((mags >= thr[t]).sum())


# ---------------------------------------------------------------------------------------------
# Argument checks and opcheck


def _with_nonfinite(seed, T, dtypes):
    """A scope of odd shapes (one empty) with NaN / +-Inf planted in the base of one tensor and
    in some task's version of others; returns (bases, fts task-major, expected flags)."""
    shapes = [(33, 65), (7,), (0, 4), (3, 2, 5), (1, 1), (129,)]
    groups = [make_group(s, T, dtypes[i % len(dtypes)], seed_of(seed, i)) for i, s in enumerate(shapes)]
    bases = [b for b, _ in groups]
    fts = [groups[i][1][t] for t in range(T) for i in range(len(groups))]
    g = torch.Generator().manual_seed(seed)
    want = [0] * len(shapes)
    for i, bad in [(0, math.nan), (3, INF), (5, -INF)]:
        slot = int(torch.randint(0, T + 1, (1,), generator=g))  # 0: the base, else task slot - 1
        x = bases[i] if slot == 0 else fts[(slot - 1) * len(shapes) + i]
        x.view(-1)[int(torch.randint(0, x.numel(), (1,), generator=g))] = bad
        want[i] = 1
    return bases, fts, want


@pytest.mark.parametrize("T", [1, 2, 5, 8])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_nonfinite_flags(T, per_tensor, seed):
    """The flags name the tensors with a NaN / Inf task vector entry (base or any task), whatever
    each group's k (0 keeps nothing: the select skips it, the check does not); the thresholds are
    those of the same call without flags."""
    bases, fts, want = _with_nonfinite(seed, T, DTYPES[seed:] + DTYPES[:seed])
    n = len(bases)
    k = [(i * T + t) % 4 for i in range(n) for t in range(T)] if per_tensor else [t % 3 * 50 for t in range(T)]
    flags = torch.full((n,), 7, dtype=torch.int32)
    got = nk.magnitude_threshold(bases, fts, k, False, per_tensor, nonfinite=flags)
    assert flags.tolist() == want
    ref_flags = torch.zeros(n, dtype=torch.int32)
    ref.magnitude_threshold(bases, fts, [0] * len(k), False, per_tensor, nonfinite=ref_flags)  # its sort: no NaN
    assert ref_flags.tolist() == want
    plain = nk.magnitude_threshold(bases, fts, k, False, per_tensor)
    assert torch.equal(got[0].view(torch.int32), plain[0].view(torch.int32))  # bits: a NaN threshold is one
    assert torch.equal(got[1], plain[1])


def test_nonfinite_flags_overflowing_difference():
    """float32 inputs that are finite but whose difference overflows give an Inf task vector entry:
    flagged too (callers confirm on the inputs: neurokern.models.FiniteCheck)."""
    base = torch.tensor([-3e38, 0.0])
    flags = torch.zeros(1, dtype=torch.int32)
    nk.magnitude_threshold([base], [torch.tensor([3e38, 0.0])], [1], nonfinite=flags)
    assert flags.tolist() == [1]
    nk.magnitude_threshold([base], [base + 1], [1], nonfinite=flags)
    assert flags.tolist() == [0]


def test_bad_arguments():
    base, fts = make_group((3, 4), 2, torch.float32, 0)
    with pytest.raises(RuntimeError, match="empty list"):
        nk.magnitude_threshold([], [], [1])
    with pytest.raises(RuntimeError, match="not a multiple"):
        nk.magnitude_threshold([base, base], fts[:1] + fts, [1])
    with pytest.raises(RuntimeError, match="values of k"):
        nk.magnitude_threshold([base], fts, [1])
    with pytest.raises(RuntimeError, match="values of k"):
        nk.magnitude_threshold([base], fts, [1, 1, 1, 1], per_tensor=True)
    with pytest.raises(RuntimeError, match=r"finetuned\[1\] has shape"):
        nk.magnitude_threshold([base], [fts[0], fts[1][:2]], [1, 1])
    with pytest.raises(RuntimeError, match=r"finetuned\[1\] is BFloat16"):
        nk.magnitude_threshold([base], [fts[0], fts[1].bfloat16()], [1, 1])
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        nk.magnitude_threshold([base.double()], [f.double() for f in fts], [1, 1])
    b2 = torch.zeros(2, dtype=torch.float16)  # another dtype in the scope is fine, its own versions must match it
    with pytest.raises(RuntimeError, match=r"finetuned\[0\] is Float, base is Half"):
        nk.magnitude_threshold([base, b2], [fts[0], b2.float(), fts[1], b2], [1, 1])
    for flags in torch.zeros(2, dtype=torch.int64), torch.zeros(3, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32):
        with pytest.raises(RuntimeError, match=r"nonfinite must be a contiguous int32 tensor \[2\]"):
            nk.magnitude_threshold([base, base], fts + fts, [1, 1], nonfinite=flags)


@pytest.mark.parametrize("keep_ties,per_tensor", [(True, False), (False, False), (False, True)])
def test_opcheck(keep_ties, per_tensor):
    b1, f1 = make_group((5, 6), 2, torch.float32, 1)
    b2, f2 = make_group((7,), 2, torch.float32, 2)
    k = [4, 9, 3, 1] if per_tensor else [4, 9]
    opcheck(torch.ops.neurokern.magnitude_threshold.default,
            ([b1, b2], [f1[0], f2[0], f1[1], f2[1]], k, keep_ties, per_tensor))
    opcheck(torch.ops.neurokern.magnitude_threshold.default,
            ([b1, b2], [f1[0], f2[0], f1[1], f2[1]], k, keep_ties, per_tensor, torch.zeros(2, dtype=torch.int32)))
