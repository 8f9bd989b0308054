"""mergekit's linear, slerp, nuslerp, model_stock, breadcrumbs, DELLA and passthrough as nk.merge
methods, against the float64 references of neurokern.methods.reference (textbook forms), on the
conftest's odd shapes (one-row, one-column, empty matrices, vectors), with the degenerate inputs
each formula guards against; and parameters that vary over the tensors (params.PerTensor).
Parity with mergekit itself is in tests/integrations/test_mergekit_parity.py."""
import math

import pytest
import torch

import neurokern as nk
from neurokern.methods import breadcrumbs, della
from neurokern.methods import reference as R
from neurokern.params import Condition, Layers, PerTensor

from .conftest import make_models

TOL = {torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def close(out: dict, ref: dict, dtype) -> None:
    for name in ref:
        assert out[name].dtype == dtype and out[name].shape == ref[name].shape, name
        scale = max(1.0, float(ref[name].double().abs().max())) if ref[name].numel() else 1.0
        diff = float((out[name].double() - ref[name].double()).abs().max()) if ref[name].numel() else 0.0
        assert diff <= TOL[dtype] * scale, (name, diff)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize,base_weight", [(True, 0.0), (True, 0.4), (False, 0.2)])
def test_linear(dtype, normalize, base_weight):
    base, fts = make_models(3, dtype=dtype, seed=1)
    weights = [0.5, 0.3, -0.1]
    out = nk.merge(base, fts, method="linear", weights=weights, base_weight=base_weight, normalize=normalize)
    close(out, R.linear(base, fts, weights, base_weight, normalize), dtype)


def test_linear_weights_summing_to_zero_is_an_error():
    base, fts = make_models(2)
    with pytest.raises(nk.NeurokernError, match="the weights sum to 0, and normalize divides by their sum"):
        nk.merge(base, fts, method="linear", weights=[1.0, -1.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 1.5])
def test_slerp(dtype, t):
    base, fts = make_models(1, dtype=dtype, seed=2, noise=0.8)
    close(nk.merge(base, fts, method="slerp", t=t), R.slerp(base, fts[0], t), dtype)


def test_slerp_degenerate_vectors():
    """Collinear (straight line), antipodal (straight line), a zero tensor (norm counted as 1)."""
    a = torch.tensor([1.0, 2.0, 3.0])
    for other in (2 * a, -a, torch.zeros(3)):
        out = nk.merge({"w": a}, [{"w": other}], method="slerp", t=0.25)["w"]
        torch.testing.assert_close(out, R.slerp({"w": a}, {"w": other}, 0.25)["w"].float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(nk.merge({"w": a}, [{"w": 2 * a}], method="slerp", t=0.25)["w"], 0.75 * a + 0.25 * 2 * a)
    base, fts = make_models(2)
    with pytest.raises(nk.NeurokernError, match="exactly one other model; got 2"):
        nk.merge(base, fts, method="slerp")


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp(flatten, row_wise, with_base):
    base, fts = make_models(2, seed=3, noise=0.5)
    weights = [0.2, 0.7]
    if with_base:
        out = nk.merge(base, fts, method="nuslerp", weights=weights, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
        ref = R.nuslerp(base, fts, weights, flatten, row_wise)
    else:  # the first model plays the base
        out = nk.merge(fts[0], [fts[1]], method="nuslerp", use_base=False, weights=weights, nuslerp_flatten=flatten,
                       nuslerp_row_wise=row_wise)
        ref = R.nuslerp(None, fts, weights, flatten, row_wise)
    close(out, ref, torch.float32)


def test_nuslerp_weights_summing_to_zero_take_the_midpoint():
    base, fts = make_models(2, seed=4)
    close(nk.merge(base, fts, method="nuslerp", weights=[1.0, -1.0]),
          nk.merge(base, fts, method="nuslerp", weights=[1.0, 1.0]), torch.float32)


@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(T, filter_wise):
    base, fts = make_models(T, seed=T)
    close(nk.merge(base, fts, method="model_stock", filter_wise=filter_wise), R.model_stock(base, fts, filter_wise),
          torch.float32)


def test_model_stock_degenerate():
    """Opposite task vectors: 1 + (T-1) cos = 0, t = 0 (the base); one model is an error."""
    base = {"w": torch.tensor([1.0, 1.0])}
    out = nk.merge(base, [{"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([0.0, 1.0])}], method="model_stock")
    assert torch.equal(out["w"], base["w"])
    with pytest.raises(nk.NeurokernError, match="needs at least 2 fine-tuned models"):
        nk.merge(base, [{"w": torch.tensor([2.0, 1.0])}], method="model_stock")


def test_breadcrumbs_trim_with_exact_ties():
    """Ranks by |delta| ascending, ties by position: keep [N - k - n_top, N - n_top)."""
    delta = torch.tensor([0.5, -0.1, 0.5, 0.2, -0.5, 0.1, 0.3, 0.0, 0.5, -0.2])
    for density, gamma in [(0.5, 0.1), (0.3, 0.2), (0.9, 0.3), (0.2, 0.0), (1.0, 0.5)]:
        kept = breadcrumbs.trim(delta, density, gamma, rescale=False) != 0
        want = R.breadcrumbs_mask(delta, density, gamma) & (delta != 0) if density < 1 else delta != 0
        assert torch.equal(kept, want), (density, gamma)
    rescaled = breadcrumbs.trim(delta, 0.5, 0.1, rescale=True)
    assert math.isclose(float(rescaled.abs().sum()), float(delta.abs().sum()), rel_tol=1e-6)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_odd_shapes(method):
    base, fts = make_models(3, seed=5)
    out = nk.merge(base, fts, method=method, density=0.6, gamma=0.1, weights=[1.0, 0.5, 0.25])
    for name, b in base.items():
        kept = [R.breadcrumbs_mask(ft[name] - b, 0.6, 0.1) for ft in fts]
        taus = [(ft[name] - b) * k * w for ft, k, w in zip(fts, kept, [1.0, 0.5, 0.25])]
        if method == "breadcrumbs":
            want = b + sum(taus) if taus and b.numel() else b
            torch.testing.assert_close(out[name], want, rtol=1e-6, atol=1e-6)
        else:
            stacked = torch.stack(taus)
            sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
            agree = stacked.sign() == sign
            torch.testing.assert_close(out[name], b + (stacked * agree).sum(0), rtol=1e-6, atol=1e-6)


def test_della_probability_and_masks_are_keyed():
    delta = torch.tensor([[0.3, -0.1, 0.3, 0.0], [1.0, 2.0, -3.0, 0.5]])
    torch.testing.assert_close(della.keep_probability(delta, 0.5, 0.1).double(), R.della_probability(delta, 0.5, 0.1))
    one_column = torch.tensor([[0.4], [0.2]])
    assert torch.equal(della.keep_probability(one_column, 0.5, 0.1), torch.full((2, 1), 0.5))
    base, fts = make_models(2, seed=6)
    first = nk.merge(base, fts, method="della", density=0.5, seed=1)
    assert all(torch.equal(first[n], t) for n, t in nk.merge(base, fts, method="della", density=0.5, seed=1).items())
    other = nk.merge(base, fts, method="della", density=0.5, seed=2)
    assert any(not torch.equal(first[n], other[n]) for n in first if first[n].numel() > 8)
    with pytest.raises(nk.NeurokernError, match=r"density\[0\] \+/- epsilon\[0\] must lie in \(0, 1\)"):
        nk.merge(base, fts, method="della", density=0.9, epsilon=0.15)


def test_della_keeps_about_density():
    base = {"w": torch.zeros(200, 200)}
    fts = [{"w": torch.randn(200, 200, generator=torch.Generator().manual_seed(0))}]
    out = nk.merge(base, fts, method="della_linear", density=0.3, epsilon=0.1, rescale=False)["w"]
    kept = float((out != 0).float().mean())
    assert abs(kept - 0.3) < 0.01  # 40000 draws: 5 standard deviations


def test_passthrough_scale():
    """nk.merge takes at least one fine-tuned model; passthrough's run is called directly."""
    from neurokern.methods import METHODS
    from neurokern.models import ModelSet

    base, _ = make_models(1)

    spec = METHODS["passthrough"]
    merged = spec.run(ModelSet(base, [], list(base)), spec.params({"scale": 0.5}, 0), False)
    for name, b in base.items():
        assert torch.equal(merged[name], (0.5 * b.float()).to(b.dtype))


# ---------------------------------------------------------------------------------------------
# Parameters that vary over the tensors


def test_per_tensor_values_follow_mergekit():
    """Gradients interpolate at t = i / (n - 1) of the slice; conditions take the first filter that
    is a substring of the name; tensors outside the layers have t = 0; scopes fall through."""
    layers = Layers(((0, 5),))
    gradient = PerTensor("t", (((0.0, 1.0, 0.2),),), layers)
    assert [gradient.at(f"model.layers.{i}.mlp.up.weight") for i in range(5)] == [0.0, 0.5, 1.0, 0.6, 0.2]
    assert gradient.at("model.norm.weight") == 0.0
    filtered = PerTensor("t", (((Condition("mlp", (0.0, 1.0)), Condition("self_attn", 0.3)), 0.9),), layers)
    assert filtered.at("model.layers.4.mlp.up.weight") == 1.0
    assert filtered.at("model.layers.4.self_attn.q.weight") == 0.3
    assert filtered.at("model.layers.4.input_layernorm.weight") == 0.9  # no filter matched: the next scope
    assert sorted(filtered.leaves()) == [0.0, 0.3, 0.9, 1.0]
    sliced = PerTensor("t", (((0.0, 1.0),), ((1.0, 0.0),)), Layers(((0, 2), (2, 3))))
    assert [sliced.at(f"layers.{i}.w") for i in range(5)] == [0.0, 1.0, 1.0, 0.5, 0.0]
    assert sliced.at("embed_tokens.weight") == 0.0 and sliced.at("lm_head.weight") == 1.0  # first / last slice


def test_a_method_with_per_tensor_parameters_merges_each_group_with_its_values():
    shapes = {f"model.layers.{i}.{part}.weight": (7, 5) for i in range(3) for part in ("mlp", "attn")}
    base, fts = make_models(2, seed=8, shapes=shapes)
    density = PerTensor("density", (((Condition("mlp", (1.0, 0.2)), Condition(None, 0.5)),),), Layers(((0, 3),)))
    out = nk.merge(base, fts, method="ties", density=density, weights=[1.0, 0.5])
    for name in base:
        single = nk.merge({name: base[name]}, [{name: f[name]} for f in fts], method="ties", density=density.at(name),
                          weights=[1.0, 0.5])
        assert torch.equal(out[name], single[name]), name
    with pytest.raises(nk.NeurokernError, match="density must be in"):  # every value checked up front
        nk.merge(base, fts, method="ties", density=PerTensor("density", (((0.5, 1.5),),), Layers(((0, 3),))))
    with pytest.raises(nk.NeurokernError, match="need a whole-model pass"):
        from neurokern.methods import METHODS
        METHODS["neuromerging"].passes(METHODS["neuromerging"].params({"density": density}, 2))
