"""neurokern.dare: counter-based (Philox-4x32-10) random drop, rescale (density / l1 / none), then a
weighted sum or TIES election; dare_keys."""
import itertools
import math

import pytest
import torch

import neurokern.ops as nk
from neurokern.ops import reference as ref

from .conftest import (DTYPE_IDS, DTYPES, SHAPES_ND, TASKS, assert_matches_f64, f64_group,
                      make_group, opcheck, seed_of)

# Dyadic weights (see test_ties_merge.py): exact subset sums, no tiny non-zero divisors. With
# density 0.5 (rescale factor 2) every contribution w * tau / density of bf16 / fp16 inputs is exact
# in float32, so exactly-zero votes (frequent: quantized deltas times dyadic weights) are exactly 0
# in both the kernel and the float64 reference and both take the +1 fallback.
WEIGHTS = [1.0, 0.5, -0.25, 2.0, 0.75, -1.5, 1.25, 0.375]
# Generic weights for densities whose 1/density is inexact: with dyadic weights, a vote that is
# exactly 0 in exact arithmetic becomes rounding residue of either sign (float32 contributions in
# the kernel, float64 in the reference), and the elected signs may differ; e.g. fp16, T=8,
# density 0.35, consensus "sum" (see the report). With these weights no vote cancels exactly, and
# subset sums (divisors of normalize="weights") stay >= 0.24 in magnitude.
GENERIC_WEIGHTS = [0.8371, 1.2193, 0.5561, -0.3117, 0.9437, 0.6889, 1.4041, 0.7723]
OPTIONS = list(itertools.product(["density", "l1", "none"], ["none", "sum", "count"], ["none", "weights", "count"]))
OPTION_IDS = ["-".join(o) for o in OPTIONS]


def _kernel_mask(numel, density, key):
    """DARE's keep mask as the kernel draws it: one task, weight 1, no rescale, no election, base 0
    and non-zero fine-tuned values, float32: out = 0 + tau exactly where kept, 0 where dropped."""
    base = torch.zeros(numel)
    ft = torch.arange(1, numel + 1, dtype=torch.float32)  # exact, all non-zero
    out = nk.dare(base, [ft], [1.0], density, [key], rescale="none", consensus="none", normalize="none")
    kept = out != 0
    assert torch.equal(out[kept], ft[kept])  # kept entries are tau, bit for bit
    return kept


def _run(base, fts, weights, density, keys, **kw):
    out = nk.dare(base, fts, weights, density, keys, **kw)
    b64, f64 = f64_group(base, fts)
    want = ref.dare(b64, f64, weights, density, keys, **kw)
    assert out.dtype == base.dtype and out.shape == base.shape
    # float32 output: rtol 1e-5 / atol 1e-6 against float64; bf16 / fp16: at most 1 ulp.
    assert_matches_f64(out, want)
    return out


# ---------------------------------------------------------------------------------------------
# The mask


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("key", [0, 1, -1, 2**62 + 12345, -(2**63), 2**63 - 1])
def test_mask_equals_reference(density, key):
    numel = 3001  # not a multiple of 4: the last Philox block is partial
    got = _kernel_mask(numel, density, key)
    assert torch.equal(got, ref.dare_keep(numel, density, key))


def test_mask_known_answer_philox():
    """Random123's published known-answer vector: Philox-4x32-10 with key 0, counter 0 gives
    6627e8d5 e169c58d bc57ac4c 9b00dbd8 (densities 0.3990, 0.8806, 0.7357, 0.6055) for elements
    0..3. An entry survives iff its draw is below floor(density * 2^32 + 0.5)."""
    lanes = ref.philox4x32_10(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), 0)
    assert [int(x) for x in lanes] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    cases = {
        0.399: [False, False, False, False],  # floor(0.399 * 2^32 + 0.5) = 1713686127 <= 0x6627e8d5
        0.4: [True, False, False, False],  # 1717986918 > 0x6627e8d5 = 1713891541
        0.5: [True, False, False, False],
        0.61: [True, False, False, True],  # 2619930050 > 0x9b00dbd8 = 2600524760
        0.75: [True, False, True, True],
        0.9: [True, True, True, True],
    }
    for density, expected in cases.items():
        assert _kernel_mask(4, density, 0).tolist() == expected, density
        assert ref.dare_keep(4, density, 0).tolist() == expected
    # The boundary, strict: with floor(density * 2^32 + 0.5) equal to element 0's draw it is
    # dropped; one step higher it is kept. The 24-bit steps of the rule before (d * 2^24 an
    # integer) keep what they kept.
    assert _kernel_mask(4, 0x6627E8D5 / 2**32, 0).tolist() == [False, False, False, False]
    assert _kernel_mask(4, 0x6627E8D6 / 2**32, 0).tolist() == [True, False, False, False]
    assert ref.dare_keep(4, 0x6627E8D5 / 2**32, 0).tolist() == [False, False, False, False]
    assert _kernel_mask(4, 6694888 / 2**24, 0).tolist() == [False, False, False, False]
    assert _kernel_mask(4, 6694889 / 2**24, 0).tolist() == [True, False, False, False]


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_fraction_kept_is_density(density):
    """1e5 entries (spread over threads): kept fraction within 5 binomial sigma of density."""
    n = 100_000
    kept = _kernel_mask(n, density, nk.dare_keys(7, "layer.weight", 1)[0])
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(kept.float().mean().item() - density) <= 5 * sigma


@pytest.mark.parametrize("density", [1e-2, 1e-4, 1e-7])
def test_expectation_is_the_undropped_value(density):
    """The empirical mean of DARE's rescaled entries (rescale "density") over 2^22 entries and 8
    independent keys is the undropped value 1 within 5 binomial sigma, sqrt((1 - p) / (n p)) for
    n = 2^25 draws: 1.2% at d = 1e-2, 12% at 1e-4. At 1e-7 (3.4 kept entries expected) the bound
    is loose (2.7); test_rescale_is_one_over_the_keep_probability pins the bias there exactly."""
    n, T = 1 << 22, 8
    out = nk.dare(torch.zeros(n), [torch.ones(n)] * T, [1.0 / T] * T, density, nk.dare_keys(5, "mean", T))
    sigma = math.sqrt((1 - density) / (n * T * density))
    assert abs(out.double().mean().item() - 1.0) <= 5 * sigma


# (key, element index) pairs whose 32-bit draw is tiny, found by a search over keys with the
# reference Philox: draw(key, index) is given.
TINY_DRAWS = {(1343428, 3): 0, (19781057, 0): 45, (29784019, 3): 424, (20047379, 1): 457}


@pytest.mark.parametrize("density", [1e-7, 5e-8, 3e-8, 1e-8, 0.3, 2**-10])
def test_rescale_is_one_over_the_keep_probability(density):
    """E[out] = P(kept) * factor * tau = tau exactly: an entry is kept iff its 32-bit draw is below
    t = floor(density * 2^32 + 0.5) (probability t / 2^32) and rescaled by 2^32 / t. Before, the
    24-bit rule kept with probability round(d 2^24) / 2^24 but rescaled by 1 / d: +19% at 1e-7,
    nothing kept below 3e-8."""
    t = min(math.floor(density * 2**32 + 0.5), 2**32)
    assert t > 0  # even 1e-8 keeps something in expectation (t = 43)
    for (key, index), draw in TINY_DRAWS.items():
        lanes = ref.philox4x32_10(torch.tensor([index // 4]), torch.tensor([0]), key)
        assert int(lanes[index % 4]) == draw
        out = nk.dare(torch.zeros(4), [torch.full((4,), 3.0)], [1.0], density, [key])
        kept = out[index] != 0
        assert bool(kept) == (draw < t)
        if kept:  # the factor: 3 * 2^32 / t, in float32
            assert out[index].item() == torch.tensor(3.0 * 2**32 / t, dtype=torch.float32).item()
    # the observed factor times the keep probability is 1
    out = nk.dare(torch.zeros(4096), [torch.ones(4096)], [1.0], density, [1])
    if bool((out != 0).any()):
        assert out[out != 0][0].double().item() * t / 2**32 == pytest.approx(1.0, rel=1e-7)


def test_same_keys_same_output_different_keys_different_mask():
    base, fts = make_group((40, 50), 2, torch.bfloat16, seed_of("dk"))
    keys = nk.dare_keys(0, "model.layers.0.mlp.up_proj.weight", 2)
    a = nk.dare(base, fts, [1.0, 1.0], 0.3, keys)
    assert torch.equal(a, nk.dare(base.clone(), [f.clone() for f in fts], [1.0, 1.0], 0.3, keys))
    other = nk.dare_keys(1, "model.layers.0.mlp.up_proj.weight", 2)
    assert not torch.equal(a, nk.dare(base, fts, [1.0, 1.0], 0.3, other))
    m0 = _kernel_mask(2000, 0.3, keys[0])
    for k in [keys[1], other[0], nk.dare_keys(0, "model.layers.1.mlp.up_proj.weight", 1)[0]]:
        m = _kernel_mask(2000, 0.3, k)
        assert not torch.equal(m0, m)
        # Independent masks overlap in about density^2 of the entries, far from identical.
        assert (m0 & m).float().mean().item() < 0.2


def test_dare_keys():
    keys = nk.dare_keys(1234, "model.embed_tokens.weight", 8)
    assert keys == nk.dare_keys(1234, "model.embed_tokens.weight", 8)  # deterministic
    assert keys[:3] == nk.dare_keys(1234, "model.embed_tokens.weight", 3)  # per task, not per T
    assert len(set(keys)) == 8
    assert all(isinstance(k, int) and -(2**63) <= k < 2**63 for k in keys)
    assert keys != nk.dare_keys(1235, "model.embed_tokens.weight", 8)
    assert keys != nk.dare_keys(1234, "model.embed_tokens.bias", 8)
    assert nk.dare_keys(0, "w", 0) == []
    # Seeds beyond 64 bits wrap; negative keys are accepted by the op as their uint64 bits.
    assert nk.dare_keys(2**64 + 5, "w", 2) == nk.dare_keys(5, "w", 2)
    neg = next(k for k in nk.dare_keys(3, "w", 16) if k < 0)
    assert torch.equal(_kernel_mask(999, 0.5, neg), ref.dare_keep(999, 0.5, neg))


# ---------------------------------------------------------------------------------------------
# Rescale / consensus / normalize against the reference


@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("density,weights", [(0.5, WEIGHTS), (0.35, GENERIC_WEIGHTS)], ids=["d0.5", "d0.35"])
def test_options_vs_reference(density, weights, T, dtype, opts):
    rescale, consensus, normalize = opts
    base, fts = make_group((33, 65), T, dtype, seed_of("do", T, dtype))
    keys = nk.dare_keys(11, "x", T)
    _run(base, fts, weights[:T], density, keys, rescale=rescale, consensus=consensus,
         normalize=normalize, scale=0.8)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("shape", SHAPES_ND, ids=str)
def test_shapes_vs_reference(shape, T, dtype):
    base, fts = make_group(shape, T, dtype, seed_of("ds", shape, T, dtype))
    keys = nk.dare_keys(seed_of("dsk", shape), "t", T)
    _run(base, fts, WEIGHTS[:T], 0.5, keys)  # dare_linear, rescale by 1/density
    _run(base, fts, GENERIC_WEIGHTS[::-1][:T], 0.6, keys, rescale="l1", consensus="sum", normalize="weights")
    _run(base, fts, WEIGHTS[::-1][:T], 0.25, keys, consensus="count", normalize="count")


def test_large_parallel():
    base, fts = make_group((300, 200), 3, torch.bfloat16, seed_of("dl"))
    keys = nk.dare_keys(5, "big", 3)
    for rescale in ("density", "l1"):
        # density 0.25: an exact rescale factor (4), so that merged values that cancel to ~0 are
        # exact in both the kernel and the float64 reference (1 ulp of bf16 there is tiny)
        _run(base, fts, [1.0, -0.5, 0.75], 0.25, keys, rescale=rescale, consensus="count", normalize="count")


# ---------------------------------------------------------------------------------------------
# Hand-computed cases (key 0: elements 0..3 of the known-answer block)


@pytest.mark.parametrize("rescale,expected", [("density", [2.0, 0.0, 0.0, 0.0]),
                                               ("l1", [10.0, 0.0, 0.0, 0.0]),  # |tau|_1 = 10, kept 1
                                               ("none", [1.0, 0.0, 0.0, 0.0])])
def test_hand_rescale(rescale, expected):
    base = torch.zeros(4)
    ft = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # density 0.5 keeps element 0 only (see test_mask_known_answer_philox).
    assert nk.dare(base, [ft], [1.0], 0.5, [0], rescale=rescale).tolist() == expected


def test_hand_two_tasks_election():
    base = torch.ones(4)
    # Both tasks under key 0 at density 0.75 keep elements 0, 2, 3; no rescale.
    f1 = base + torch.tensor([1.0, 5.0, -2.0, 3.0])
    f2 = base + torch.tensor([-3.0, 5.0, -1.0, 1.0])
    kw = dict(rescale="none", normalize="none")
    # dare_linear, weights [1, 0.5]: 1 + [1 - 1.5, 0, -2 - 0.5, 3 + 0.5].
    assert nk.dare(base, [f1, f2], [1.0, 0.5], 0.75, [0, 0], **kw).tolist() == [0.5, 1.0, -1.5, 4.5]
    # TIES "sum" on the weighted deltas [1, -1.5], [-2, -0.5], [3, 0.5]: -, -, +.
    assert nk.dare(base, [f1, f2], [1.0, 0.5], 0.75, [0, 0], consensus="sum", **kw).tolist() == [-0.5, 1.0, -1.5, 4.5]
    # TIES "count": signs [+, -] -> 0 -> + (mergekit): keeps 1 at element 0.
    assert nk.dare(base, [f1, f2], [1.0, 0.5], 0.75, [0, 0], consensus="count", **kw).tolist() == [2.0, 1.0, -1.5, 4.5]
    # normalize weights with "count": element 0 keeps task 1 (weight 1) -> 1; element 2 both -> -2.5 / 1.5.
    out = nk.dare(base, [f1, f2], [1.0, 0.5], 0.75, [0, 0], consensus="count", rescale="none", normalize="weights")
    torch.testing.assert_close(out, torch.tensor([2.0, 1.0, 1 - 2.5 / 1.5, 1 + 3.5 / 1.5]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_opposite_equal_deltas_zero_vote(dtype, consensus):
    """Two tasks with tau_2 = -tau_1 and the same key: the same entries survive and every vote is
    exactly 0, which elects + (mergekit): kept entries become +|tau| / density, the rest stay."""
    g = torch.Generator().manual_seed(seed_of("dopp", dtype))
    base = (torch.randint(-8, 8, (20, 30), generator=g) / 4).to(dtype)  # exact in bf16 / fp16
    tau = torch.randint(-4, 5, (20, 30), generator=g) / 64
    fts = [(base.float() + tau).to(dtype), (base.float() - tau).to(dtype)]
    out = _run(base, fts, [1.0, 1.0], 0.5, [42, 42], consensus=consensus, normalize="none")
    kept = ref.dare_keep(600, 0.5, 42, (20, 30))
    assert torch.equal(out.float(), base.float() + 2 * tau.abs() * kept)


def test_density_one_is_task_arithmetic():
    base, fts = make_group((9, 10), 3, torch.float32, 4)
    out = nk.dare(base, fts, [0.5, 1.0, -0.25], 1.0, nk.dare_keys(0, "a", 3), scale=0.9)
    b64, f64 = f64_group(base, fts)
    want = b64 + 0.9 * sum(w * (f - b64) for w, f in zip([0.5, 1.0, -0.25], f64))
    assert_matches_f64(out, want)


# ---------------------------------------------------------------------------------------------
# Degenerate inputs


@pytest.mark.parametrize("shape", [(0, 5), (0,)], ids=str)
def test_empty(shape):
    base, fts = make_group(shape, 2, torch.float32, 0)
    assert nk.dare(base, fts, [1.0, 1.0], 0.5, [1, 2], rescale="l1", consensus="sum").shape == shape


@pytest.mark.parametrize("rescale", ["density", "l1", "none"])
def test_all_task_vectors_zero(rescale):
    base, fts = make_group((6, 6), 2, torch.bfloat16, 5, zero_tasks=(0, 1))
    for consensus in ("none", "sum", "count"):
        out = nk.dare(base, fts, [1.0, 1.0], 0.5, [3, 4], rescale=rescale, consensus=consensus, normalize="weights")
        assert torch.equal(out, base)


def test_l1_rescale_guards():
    """mergekit's guards: no L1 rescale when |tau|_1 < 1e-7 or |kept|_1 < 1e-7."""
    key = next(k for k in range(100) if ref.dare_keep(2, 0.5, k).tolist() == [False, True])
    base = torch.zeros(2)
    # Kept part 1e-8 (< 1e-7): not rescaled (without the guard it would become ~1.0).
    out = nk.dare(base, [torch.tensor([1.0, 1e-8])], [1.0], 0.5, [key], rescale="l1")
    assert out.tolist() == [0.0, torch.tensor(1e-8).item()]
    # Kept part 0.25 of |tau|_1 = 1.25: rescaled by 5.
    out = nk.dare(base, [torch.tensor([1.0, 0.25])], [1.0], 0.5, [key], rescale="l1")
    assert out.tolist() == [0.0, 1.25]
    # |tau|_1 = 2e-8 (< 1e-7): not rescaled.
    out = nk.dare(base, [torch.tensor([1e-8, 1e-8])], [1.0], 0.5, [key], rescale="l1")
    assert out.tolist() == [0.0, torch.tensor(1e-8).item()]
    # Nothing kept: stays at base.
    key = next(k for k in range(100) if not bool(ref.dare_keep(1, 0.1, k)[0]))
    assert nk.dare(torch.zeros(1), [torch.ones(1)], [1.0], 0.1, [key], rescale="l1").tolist() == [0.0]


# ---------------------------------------------------------------------------------------------
# Argument checks and opcheck


def test_bad_arguments():
    base, fts = make_group((3, 4), 2, torch.float32, 0)
    for density in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(RuntimeError, match=r"density must be in \(0, 1\]"):
            nk.dare(base, fts, [1.0, 1.0], density, [1, 2])
    with pytest.raises(RuntimeError, match="1 keys for 2 fine-tuned"):
        nk.dare(base, fts, [1.0, 1.0], 0.5, [1])
    with pytest.raises(RuntimeError, match="3 weights for 2 fine-tuned"):
        nk.dare(base, fts, [1.0, 1.0, 1.0], 0.5, [1, 2])
    with pytest.raises(RuntimeError, match='rescale must be .* got "mean"'):
        nk.dare(base, fts, [1.0, 1.0], 0.5, [1, 2], rescale="mean")
    with pytest.raises(RuntimeError, match='consensus must be "none", "sum" or "count", got "ties"'):
        nk.dare(base, fts, [1.0, 1.0], 0.5, [1, 2], consensus="ties")
    with pytest.raises(RuntimeError, match="normalize must be"):
        nk.dare(base, fts, [1.0, 1.0], 0.5, [1, 2], normalize="sum")
    with pytest.raises(RuntimeError, match=r"finetuned\[0\] has shape"):
        nk.dare(base, [fts[0][:, :2], fts[1]], [1.0, 1.0], 0.5, [1, 2])
    with pytest.raises(RuntimeError, match=r"finetuned\[1\] is BFloat16"):
        nk.dare(base, [fts[0], fts[1].bfloat16()], [1.0, 1.0], 0.5, [1, 2])
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        nk.dare(base.double(), [f.double() for f in fts], [1.0, 1.0], 0.5, [1, 2])


def test_opcheck():
    base, fts = make_group((5, 6), 3, torch.float32, 9)
    op = torch.ops.neurokern.dare.default
    keys = nk.dare_keys(0, "w", 3)
    opcheck(op, (base, fts, [1.0, 0.5, -1.0], 0.3, keys, "l1", "sum", "weights", 0.5))
    opcheck(op, (base, fts, [1.0, 1.0, 1.0], 0.7, keys))
