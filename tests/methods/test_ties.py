"""nk.merge(method="ties") against mergekit's algorithm and every variant of classic-methods.md."""
import pytest
import torch

import neurokern as nk
from neurokern.methods import reference as R
from neurokern.ops import reference as ops_ref

from .conftest import make_models


@pytest.mark.parametrize("T", range(1, 9))
@pytest.mark.parametrize("density", [0.05, 0.2, 0.7, 1.0])
def test_default_is_mergekit(T, density):
    base, fts = make_models(T, seed=T)
    weights = [0.5 + 0.25 * t for t in range(T)]
    out = nk.merge(base, fts, method="ties", density=density, weights=weights)
    ref = R.mergekit_ties(base, fts, density, weights)
    for name in base:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-6, atol=1e-6)


def test_per_model_density_is_mergekits():
    base, fts = make_models(3, seed=8)
    out = nk.merge(base, fts, method="ties", density=[0.1, 0.5, 1.0])
    ref = R.mergekit_ties(base, fts, [0.1, 0.5, 1.0], [1, 1, 1])
    for name in base:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-6, atol=1e-6)


def test_mergekit_selection_with_tied_magnitudes():
    # Deltas on a coarse grid: many equal magnitudes straddle the cut; mergekit keeps exactly k,
    # the lowest flat positions first (stable argsort).
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(13, 11)}
    fts = [{"w": torch.randint(-3, 4, (13, 11), generator=g).float() / 4} for _ in range(3)]
    for consensus in ["sum", "count"]:
        out = nk.merge(base, fts, method="ties", density=0.3, consensus=consensus)
        ref = R.mergekit_ties(base, fts, 0.3, [1, 1, 1], consensus=consensus)
        torch.testing.assert_close(out["w"], ref["w"], rtol=0, atol=1e-7)


def test_bf16_selects_on_exact_deltas():
    # mergekit on bf16 rounds deltas first and breaks the ties that makes arbitrarily; rounding is
    # monotone, so the exact ranking used here is one of its valid choices. On the float32 upcast
    # the two agree up to bf16 output rounding.
    base, fts = make_models(3, dtype=torch.bfloat16, seed=4)
    out = nk.merge(base, fts, method="ties", density=0.2)
    up = lambda sd: {k: v.float() for k, v in sd.items()}  # noqa: E731
    ref = R.mergekit_ties(up(base), [up(f) for f in fts], 0.2, [1, 1, 1])
    for name in base:
        torch.testing.assert_close(out[name].float(), ref[name], rtol=2**-7, atol=1e-6)  # one bf16 ulp


VARIANTS = [
    dict(trim_scope="global"),
    dict(ties="keep"),
    dict(elect_on="unweighted", normalize="count"),
    dict(consensus="count", normalize=None),
    dict(zero_sign="majority"),
    dict(trim_scope="global", ties="keep", elect_on="unweighted", normalize="count", zero_sign="majority"),
]


@pytest.mark.parametrize("params", VARIANTS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("T", [1, 2, 5, 8])
def test_variants_match_reference(params, T):
    base, fts = make_models(T, seed=20 + T)
    weights = [1.0 - 0.1 * t for t in range(T)]
    density, scale = 0.3, 0.8
    out = nk.merge(base, fts, method="ties", density=density, weights=weights, scale=scale, **params)

    names = list(base)
    rule = params.get("ties", "exact_k")

    def k_of(n):
        if n == 0:
            return 0
        if rule == "exact_k":
            return max(1, int(density * n))
        m = int(n * (1 - density))
        return n if m == 0 else n - m + 1

    b = [base[n] for n in names]
    f = [fts[t][n] for t in range(T) for n in names]
    keep_ties = rule == "keep"
    if params.get("trim_scope") == "global":
        pair = ops_ref.magnitude_threshold(b, f, [k_of(sum(x.numel() for x in b))] * T, keep_ties)
        trims, offset = {}, 0
        for n in names:
            trims[n] = (pair, offset)
            offset += base[n].numel()
    else:
        thr, lim = ops_ref.magnitude_threshold(b, f, [k_of(x.numel()) for x in b for _ in range(T)], keep_ties, True)
        trims = {n: ((thr[i], lim[i]), 0) for i, n in enumerate(names)}
    normalize = {True: "weights", None: "none"}.get(params.get("normalize", True), params.get("normalize"))
    for n in names:
        ref = ops_ref.ties_merge(
            base[n], [ft[n] for ft in fts], weights, trims[n][0], trims[n][1],
            consensus=params.get("consensus", "sum"), normalize=normalize,
            elect_weighted=params.get("elect_on", "weighted") == "weighted",
            zero_sign=params.get("zero_sign", "positive"), scale=scale,
        )
        torch.testing.assert_close(out[n], ref, rtol=1e-6, atol=1e-6)


def test_hand_computed():
    base = {"w": torch.tensor([0.0, 0.0, 0.0, 0.0])}
    fts = [{"w": torch.tensor([1.0, -2.0, 0.5, 3.0])}, {"w": torch.tensor([-3.0, 1.0, 0.5, -1.0])}]
    # density 0.5: keep 2 per task -> task0 {-2, 3}, task1 {-3, 1 (pos 1) ... |1|==|-1|: pos 1 first}
    # task1 magnitudes [3, 1, 0.5, 1]: keep 3 and the first 1 (pos 1). Trimmed:
    #   t0 = [0, -2, 0, 3], t1 = [-3, 1, 0, 0]; sum = [-3, -1, 0, 3] -> signs [-, -, +, +]
    #   agreeing: pos0 {-3} -> -3/1; pos1 {-2} -> -2/1; pos2 none -> 0; pos3 {3} -> 3/1.
    out = nk.merge(base, fts, method="ties", density=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([-3.0, -2.0, 0.0, 3.0]))
