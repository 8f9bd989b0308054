"""neurokern.ties_merge: trim, weight, sign election (sum / count, weighted or not, zero vote +1 or
majority), disjoint mean normalized by weights / count / none, scale."""
import itertools

import pytest
import torch

import neurokern.ops as nk
from neurokern.ops import reference as ref

from .conftest import (DTYPE_IDS, DTYPES, SHAPES_ND, TASKS, assert_matches_f64, f64_group,
                      make_group, opcheck, seed_of)

# Unequal weights, some negative. Dyadic, so every subset sum (a "weights" divisor) is exact and
# either 0 (then the op divides by 1) or at least 1/8 in magnitude: the float32 contributions of the
# kernel cannot be amplified past the tolerances below by a tiny divisor.
WEIGHTS = [1.0, 0.5, -0.25, 2.0, 0.75, -1.5, 1.25, 0.375]

OPTIONS = list(itertools.product(["sum", "count"], ["weights", "count", "none"], [True, False],
                                 ["positive", "majority"]))
OPTION_IDS = ["-".join([c, n, "w" if e else "u", z]) for c, n, e, z in OPTIONS]


def _run(base, fts, weights, trim=None, offset=0, **kw):
    out = nk.ties_merge(base, fts, weights, trim, offset, **kw)
    b64, f64 = f64_group(base, fts)
    want = ref.ties_merge(b64, f64, weights, trim, offset, **kw)
    assert out.dtype == base.dtype and out.shape == base.shape
    # float32 output: rtol 1e-5 / atol 1e-6 against float64; bf16 / fp16: at most 1 ulp.
    assert_matches_f64(out, want)
    return out


@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("T", TASKS)
def test_options_vs_reference(T, dtype, opts):
    consensus, normalize, elect_weighted, zero_sign = opts
    base, fts = make_group((33, 65), T, dtype, seed_of("tm", T, dtype))
    trim = nk.magnitude_threshold([base], fts, [700] * T, keep_ties=False)
    _run(base, fts, WEIGHTS[:T], trim, consensus=consensus, normalize=normalize,
         elect_weighted=elect_weighted, zero_sign=zero_sign, scale=0.7)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("shape", SHAPES_ND, ids=str)
@pytest.mark.parametrize("opts", [("sum", "weights", True, "positive"), ("count", "count", False, "majority")],
                         ids=["mergekit", "count-majority"])
def test_shapes_vs_reference(shape, T, dtype, opts):
    consensus, normalize, elect_weighted, zero_sign = opts
    base, fts = make_group(shape, T, dtype, seed_of("tms", shape, T, dtype))
    _run(base, fts, WEIGHTS[:T], consensus=consensus, normalize=normalize,
         elect_weighted=elect_weighted, zero_sign=zero_sign)
    trim = nk.magnitude_threshold([base], fts, [max(1, base.numel() // 3)] * T, keep_ties=True)
    _run(base, fts, WEIGHTS[::-1][:T], trim, consensus=consensus, normalize=normalize,
         elect_weighted=elect_weighted, zero_sign=zero_sign, scale=1.5)


def test_trim_offset_and_large_parallel():
    T = 3
    prefix, pf = make_group((10,), T, torch.float16, 1)
    base, fts = make_group((300, 130), T, torch.float16, seed_of("tml"))
    trim = nk.magnitude_threshold([prefix, base], [x for t in range(T) for x in (pf[t], fts[t])],
                                  [5000, 12000, 30000], keep_ties=False)
    for zero_sign in ("positive", "majority"):
        _run(base, fts, [1.0, -0.5, 0.75], trim, 10, zero_sign=zero_sign)


# ---------------------------------------------------------------------------------------------
# Hand-computed cases


def _from_taus(*taus):
    base = torch.zeros(len(taus[0]))
    return base, [torch.tensor(t) for t in taus]


def test_hand_basic():
    # votes (sum of equal-weight deltas): [3, 0, 2, 0].
    base, fts = _from_taus([1.0, -2.0, 3.0, 1.0], [2.0, 2.0, -1.0, -1.0])
    out = nk.ties_merge(base, fts, [1.0, 1.0])
    # el 0: both agree: (1 + 2) / 2. el 1: vote 0 -> +: 2 / 1. el 2: +: 3 / 1. el 3: vote 0 -> +: 1.
    assert out.tolist() == [1.5, 2.0, 3.0, 1.0]
    assert nk.ties_merge(base, fts, [1.0, 1.0], normalize="none").tolist() == [3.0, 2.0, 3.0, 1.0]
    assert nk.ties_merge(base, fts, [1.0, 1.0], scale=0.5).tolist() == [0.75, 1.0, 1.5, 0.5]


@pytest.mark.parametrize("zero_sign,expected", [("positive", [-1.0, 2.0, -2.0, 1.0, -2.0]),
                                                 ("majority", [-1.0, -2.0, -2.0, -1.0, -2.0])])
def test_hand_zero_vote(zero_sign, expected):
    # votes: [-2, 0, -4, 0, -1]: the tensor's majority elected sign is -1.
    base, fts = _from_taus([-1.0, -2.0, -3.0, 1.0, 1.0], [-1.0, 2.0, -1.0, -1.0, -2.0])
    # el 0: (-1 - 1) / 2; el 2: -4 / 2; el 4: -2 / 1. Zero votes (el 1, 3): + keeps 2 and 1,
    # majority (-) keeps -2 and -1.
    assert nk.ties_merge(base, fts, [1.0, 1.0], zero_sign=zero_sign).tolist() == expected
    assert ref.ties_merge(base, fts, [1.0, 1.0], zero_sign=zero_sign).tolist() == expected


def test_hand_consensus_count_vs_sum():
    base, fts = _from_taus([3.0], [-1.0], [-1.0])
    # sum: 3 - 1 - 1 = 1 > 0 -> keep 3; count: 1 - 1 - 1 < 0 -> keep (-1 - 1) / 2.
    assert nk.ties_merge(base, fts, [1.0] * 3, consensus="sum").tolist() == [3.0]
    assert nk.ties_merge(base, fts, [1.0] * 3, consensus="count").tolist() == [-1.0]


def test_hand_weighted_election_and_normalize():
    base, fts = _from_taus([1.0], [-2.0])
    w = [3.0, 1.0]
    # Weighted votes 3 - 2 = 1 -> +: d = 3; /weights 3 -> 1; /count 1 -> 3; none -> 3.
    assert nk.ties_merge(base, fts, w, elect_weighted=True, normalize="weights").tolist() == [1.0]
    assert nk.ties_merge(base, fts, w, elect_weighted=True, normalize="count").tolist() == [3.0]
    assert nk.ties_merge(base, fts, w, elect_weighted=True, normalize="none").tolist() == [3.0]
    # Unweighted votes 1 - 2 = -1 -> -: d = 1 * -2; /weights 1 -> -2.
    assert nk.ties_merge(base, fts, w, elect_weighted=False, normalize="weights").tolist() == [-2.0]
    # Negative weight: d = [-1 * 1, 1 * -2] = [-1, -2], both negative -> (-3) / (-1 + 1 = 0 -> 1).
    assert nk.ties_merge(base, fts, [-1.0, 1.0], normalize="weights").tolist() == [-3.0]
    # Unweighted, negative weight: votes 1 - 2 < 0 -> task 1 only: d = -2, weight 1 -> -2.
    assert nk.ties_merge(base, fts, [-1.0, 1.0], elect_weighted=False).tolist() == [-2.0]


def test_hand_trim():
    base = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    f1 = base + torch.tensor([[0.5, -0.25, 2.0], [0.0, 1.0, -1.0]])
    f2 = base + torch.tensor([[-1.0, 0.5, 0.0], [0.25, -1.0, 0.5]])
    # Task 1 keeps |tau| >= 1 with tie_limit 5 (the -1 at position 5 is dropped); task 2 keeps > 0.4.
    trim = (torch.tensor([1.0, 0.4]), torch.tensor([5, torch.iinfo(torch.int64).max]))
    out = nk.ties_merge(base, [f1, f2], [1.0, 1.0], trim)
    # trimmed task 1: [[0, 0, 2], [0, 1, 0]]; task 2: [[-1, 0.5, 0], [0, -1, 0.5]].
    # votes: [[-1, 0.5, 2], [0, 0, 0.5]] -> el (1,0): nothing; (1,1): vote 0 -> + keeps 1.
    assert out.tolist() == [[0.0, 1.5, 3.0], [1.0, 2.0, 1.5]]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("zero_sign", ["positive", "majority"])
@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_opposite_equal_deltas_zero_vote(dtype, zero_sign, consensus):
    """Two tasks with tau_2 = -tau_1 exactly: every vote is 0. positive elects +, so the merge is
    +|tau|; majority finds no majority (all votes 0 -> fallback 0) and elects the negative side."""
    g = torch.Generator().manual_seed(seed_of("opp", dtype))
    base = (torch.randint(-8, 8, (6, 5), generator=g) / 4).to(dtype)  # exact in bf16 / fp16
    tau = torch.randint(-4, 5, (6, 5), generator=g) / 64
    fts = [(base.float() + tau).to(dtype), (base.float() - tau).to(dtype)]
    assert torch.equal(fts[0].float() - base.float(), tau) and torch.equal(fts[1].float() - base.float(), -tau)
    out = _run(base, fts, [1.0, 1.0], consensus=consensus, zero_sign=zero_sign)
    sign = 1.0 if zero_sign == "positive" else -1.0
    assert torch.equal(out.float(), base.float() + sign * tau.abs())


# ---------------------------------------------------------------------------------------------
# Degenerate inputs


@pytest.mark.parametrize("shape", [(0, 5), (0,)], ids=str)
def test_empty(shape):
    base, fts = make_group(shape, 3, torch.float32, 0)
    out = nk.ties_merge(base, fts, [1.0, 1.0, 1.0], zero_sign="majority")
    assert out.shape == shape


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_all_task_vectors_zero(dtype):
    base, fts = make_group((5, 7), 3, dtype, 2, zero_tasks=(0, 1, 2))
    for zs in ("positive", "majority"):
        assert torch.equal(nk.ties_merge(base, fts, [1.0, -2.0, 0.5], zero_sign=zs), base)


def test_k_zero_trim_is_identity():
    base, fts = make_group((5, 7), 2, torch.float32, 3)
    trim = nk.magnitude_threshold([base], fts, [0, 0])
    assert torch.equal(nk.ties_merge(base, fts, [1.0, 1.0], trim), base)


# ---------------------------------------------------------------------------------------------
# Argument checks and opcheck


def test_bad_arguments():
    base, fts = make_group((3, 4), 2, torch.float32, 0)
    with pytest.raises(RuntimeError, match="1 weights for 2 fine-tuned"):
        nk.ties_merge(base, fts, [1.0])
    with pytest.raises(RuntimeError, match='consensus must be "sum" or "count", got "none"'):
        nk.ties_merge(base, fts, [1.0, 1.0], consensus="none")
    with pytest.raises(RuntimeError, match='consensus must be .* got "median"'):
        nk.ties_merge(base, fts, [1.0, 1.0], consensus="median")
    with pytest.raises(RuntimeError, match="normalize must be"):
        nk.ties_merge(base, fts, [1.0, 1.0], normalize="mean")
    with pytest.raises(RuntimeError, match="zero_sign must be"):
        nk.ties_merge(base, fts, [1.0, 1.0], zero_sign="negative")
    with pytest.raises(RuntimeError, match=r"finetuned\[1\] has shape"):
        nk.ties_merge(base, [fts[0], fts[1].flatten()], [1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"finetuned\[1\] is Half"):
        nk.ties_merge(base, [fts[0], fts[1].half()], [1.0, 1.0])
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        nk.ties_merge(base.double(), [f.double() for f in fts], [1.0, 1.0])
    with pytest.raises(RuntimeError, match="one entry per task"):
        nk.ties_merge(base, fts, [1.0, 1.0], (torch.zeros(1), torch.zeros(1, dtype=torch.long)))


def test_opcheck():
    base, fts = make_group((5, 6), 3, torch.float32, 8)
    thr, lim = nk.magnitude_threshold([base], fts, [10, 10, 10], keep_ties=False)
    op = torch.ops.neurokern.ties_merge.default
    opcheck(op, (base, fts, [1.0, 0.5, -1.0], thr, lim, 0, "count", "count", False, "majority", 0.5))
    opcheck(op, (base, fts, [1.0, 1.0, 1.0]))
