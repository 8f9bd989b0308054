"""nk.merge(method="dare"/"dare_ties") against the reference and mergekit's L1 rescale."""
import pytest
import torch

import neurokern as nk
from neurokern import ops
from neurokern.ops import reference as ops_ref

from .conftest import make_models


@pytest.mark.parametrize("method,consensus", [("dare", "none"), ("dare_ties", "sum"), ("dare_ties", "count")])
@pytest.mark.parametrize("rescale", ["density", "l1", None])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_matches_reference(method, consensus, rescale, T):
    base, fts = make_models(T, seed=T)
    weights = [1.0 + 0.1 * t for t in range(T)]
    params = dict(density=0.4, weights=weights, seed=7, rescale=rescale, scale=0.9)
    if method == "dare_ties":
        params["consensus"] = consensus
    out = nk.merge(base, fts, method=method, **params)
    for name in base:
        ref = ops_ref.dare(
            base[name], [ft[name] for ft in fts], weights, 0.4, ops.dare_keys(7, name, T),
            rescale=rescale or "none", consensus=consensus, normalize="none", scale=0.9,
        )
        torch.testing.assert_close(out[name], ref, rtol=1e-5, atol=1e-6)


def test_l1_rescale_is_mergekits():
    base, fts = make_models(1, seed=3, shapes={"w": (40, 30)})
    out = nk.merge(base, fts, method="dare", density=0.5, seed=1, rescale="l1")["w"]
    tau = fts[0]["w"] - base["w"]
    keep = ops_ref.dare_keep(tau.numel(), 0.5, ops.dare_keys(1, "w", 1)[0], tau.shape)
    masked = tau * keep
    expected = base["w"] + masked * (tau.abs().sum() / masked.abs().sum())  # rescaled_masked_tensor
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_seeded_and_name_keyed():
    base, fts = make_models(2, seed=9, shapes={"a": (64, 64), "b": (64, 64)})
    fts = [{"a": f["a"], "b": f["a"] - base["a"] + base["b"]} for f in fts]  # same task vectors
    one = nk.merge(base, fts, method="dare", density=0.5, seed=3)
    two = nk.merge(base, fts, method="dare", density=0.5, seed=3)
    other = nk.merge(base, fts, method="dare", density=0.5, seed=4)
    assert torch.equal(one["a"], two["a"])
    assert not torch.equal(one["a"], other["a"])
    # Tensors with equal task vectors but other names get other masks.
    assert not torch.equal(one["a"] - base["a"], one["b"] - base["b"])
