"""nk.merge's handling of inputs: modules, buffers, and clear errors for bad input."""
import math

import pytest
import torch

import neurokern as nk
from neurokern import NeurokernError
from neurokern.models import load_models
from neurokern.ops import finite

from .conftest import make_models


def test_modules_in_state_dict_out():
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))  # noqa: E731
    base = make()
    fts = []
    for _ in range(3):
        m = make()
        with torch.no_grad():
            for p, q in zip(m.parameters(), base.parameters()):
                p.copy_(q + 0.01 * torch.randn_like(q))
        fts.append(m)
    merged = nk.merge(base, fts, method="ties")
    target = make()
    target.load_state_dict(merged)
    assert list(merged) == list(base.state_dict())


def test_integer_buffers_are_copied_from_base():
    base, fts = make_models(2, shapes={"w": (3, 4)})
    base["position_ids"] = torch.arange(7)
    for f in fts:
        f["position_ids"] = torch.arange(7)
    out = nk.merge(base, fts, method="task_arithmetic")
    assert torch.equal(out["position_ids"], base["position_ids"])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "dare_ties", "neuromerging"])
def test_models_without_float_tensors_are_copied(method):
    """Nothing to merge (integer buffers only): every method returns base's entries (ties and
    neuromerging used to fail in their threshold over an empty list)."""
    base = {"position_ids": torch.arange(7)}
    out = nk.merge(base, [{"position_ids": torch.arange(7)} for _ in range(2)], method=method)
    assert list(out) == ["position_ids"] and torch.equal(out["position_ids"], base["position_ids"])


def expect_error(match, base, fts, **kwargs):
    with pytest.raises(NeurokernError, match=match):
        nk.merge(base, fts, **kwargs)


def test_bad_models():
    base, fts = make_models(2, shapes={"w": (3, 4), "b": (4,)})
    expect_error("finetuned is empty", base, [])
    expect_error("must be a list", base, fts[0])
    expect_error("state dict .* or an nn.Module", [1, 2], fts)
    missing = [fts[0], {"w": fts[1]["w"]}]
    expect_error(r"finetuned\[1\] lacks tensor\(s\) 'b'", base, missing)
    extra = [fts[0], {**fts[1], "x": torch.zeros(1)}]
    expect_error(r"finetuned\[1\] has tensor\(s\) 'x' that base lacks", base, extra)
    shape = [fts[0], {**fts[1], "w": torch.zeros(4, 3)}]
    expect_error(r"tensor 'w': finetuned\[1\] has shape \(4, 3\), base has \(3, 4\)", base, shape)
    dtype = [fts[0], {**fts[1], "b": fts[1]["b"].half()}]
    expect_error(r"tensor 'b': finetuned\[1\] is torch.float16, base is torch.float32", base, dtype)
    wrong_type = [fts[0], {**fts[1], "b": [1.0]}]
    expect_error(r"finetuned\[1\]\['b'\] is a list", base, wrong_type)
    f64 = {k: v.double() for k, v in base.items()}
    expect_error("'w' is torch.float64", f64, [{k: v.double() for k, v in f.items()} for f in fts])


def test_first_mismatch_is_named_in_base_order():
    """Whole models are compared at once; the error still names the first bad tensor in base's
    order (then model order), whatever kind its mismatch is."""
    base, fts = make_models(3, shapes={"a": (2,), "w": (3, 4), "b": (4,)})
    bad = [fts[0], {**fts[1], "b": torch.zeros(5)}, {**fts[2], "w": fts[2]["w"].half()}]
    expect_error(r"tensor 'w': finetuned\[2\] is torch.float16", base, bad)
    on_meta = [fts[0], fts[1], {**fts[2], "b": fts[2]["b"].to("meta")}]
    expect_error(r"tensor 'b': finetuned\[2\] is on meta, base on cpu", base, on_meta)


def test_inputs_requiring_grad_are_merged_detached():
    base, fts = make_models(2, shapes={"w": (3, 4)})
    want = nk.merge(base, fts, method="task_arithmetic")["w"]
    leaves = {k: v.clone().requires_grad_() for k, v in base.items()}
    got = nk.merge(leaves, fts, method="task_arithmetic")["w"]
    assert not got.requires_grad and torch.equal(got, want)


METHOD_CASES = [("task_arithmetic", {}), ("dare", {}), ("dare_ties", {}), ("ties", {}),
                ("ties", {"trim_scope": "global"}), ("neuromerging", {}), ("neuromerging", {"trim_scope": "tensor"}),
                ("magnitude_prune", {}), ("linear", {}), ("breadcrumbs", {}), ("breadcrumbs_ties", {}), ("della", {}),
                ("della_linear", {}), ("model_stock", {})]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method,params", METHOD_CASES)
def test_non_finite_values_are_named(bad, method, params):
    """Every method names the first tensor in the base's order and the model holding NaN / Inf
    (the trims' select flags them for ties, neuromerging and magnitude_prune, the weighted sum's
    flags of non-finite outputs for task_arithmetic and linear, a pass of its own for the others)."""
    base, fts = make_models(3, shapes={"w": (3, 4), "b": (4,)})
    fts[2]["b"][1] = bad
    expect_error(r"tensor 'b' of finetuned\[2\] has non-finite values", base, fts, method=method, **params)
    base["w"][0, 0] = bad
    expect_error(r"tensor 'w' of base has non-finite values", base, fts, method=method, **params)


@pytest.mark.parametrize("method,params", [("ties", {}), ("ties", {"trim_scope": "global", "consensus": "count"}),
                                           ("neuromerging", {}), ("neuromerging", {"trim_scope": "tensor"})])
def test_ties_merges_are_checked_by_their_flags(method, params, monkeypatch):
    """The values ties_merge_multi merges (TIES: every tensor; NeuroMerging: the vectors) are
    checked for NaN / Inf by the flags the merge sets as it stores them, not by nonfinite_flags in
    a pass over the merged tensors: with clean inputs, with a NaN input (named through the trim's
    select), and with a merged value that is finite in float32 but Inf in bfloat16 (named). The
    spy wraps the real nonfinite_flags, which FiniteCheck's passes call; the control shows that a
    merged tensor without flags goes through it."""
    seen = []
    real_flags = finite.nonfinite_flags

    def spy(tensors):
        seen.extend(tensors)
        return real_flags(tensors)
    monkeypatch.setattr(finite, "nonfinite_flags", spy)
    # NeuroMerging's matrices (weighted_sum_rows_multi, no flags) are read in the check's pass
    by_ties_merge = (lambda t: True) if method == "ties" else (lambda t: t.dim() != 2)

    def merged_values_read(base, fts):
        """The tensors nonfinite_flags read since the last call that are none of the inputs."""
        inputs = {t.data_ptr() for sd in [base] + fts for t in sd.values()}
        read = [t for t in seen if t.numel() and t.data_ptr() not in inputs]
        seen.clear()
        return read

    base, fts = make_models(3, dtype=torch.bfloat16)
    models = load_models(base, fts)
    unflagged = {name: models.base[name].clone() for name in models.names}
    models.check.later(models.names, unflagged)()
    assert len(merged_values_read(base, fts)) == sum(1 for t in unflagged.values() if t.numel())

    merged = nk.merge(base, fts, method=method, **params)
    assert merged and not [t for t in merged_values_read(base, fts) if by_ties_merge(t)]
    bad = [{**ft, "layer.bias": ft["layer.bias"].clone()} for ft in fts]
    bad[2]["layer.bias"][3] = math.nan
    expect_error(r"tensor 'layer.bias' of finetuned\[2\] has non-finite values", base, bad, method=method, **params)
    assert not [t for t in merged_values_read(base, bad) if by_ties_merge(t)]
    top = torch.finfo(torch.bfloat16).max
    near_top = {**base, "norm.weight": base["norm.weight"].clone()}
    near_top["norm.weight"][1] = top - 3 * 2.0**120
    at_top = [{**ft, "norm.weight": ft["norm.weight"].clone()} for ft in fts]
    for ft in at_top:
        ft["norm.weight"][1] = top  # merged at scale 1.25: 3.3995e38, past bfloat16's rounding edge 3.3962e38
    expect_error(r"tensor 'norm.weight': merged value exceeds bfloat16's maximum", near_top, at_top, method=method,
                 scale=1.25, **params)
    assert not [t for t in merged_values_read(near_top, at_top) if by_ties_merge(t)]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("method,tasks", [("slerp", 1), ("nuslerp", 2)])
def test_non_finite_values_are_named_by_the_interpolations(bad, method, tasks):
    base, fts = make_models(tasks, shapes={"w": (3, 4), "b": (4,)})
    fts[-1]["b"][1] = bad
    expect_error(rf"tensor 'b' of finetuned\[{tasks - 1}\] has non-finite values", base, fts, method=method)


@pytest.mark.parametrize("method,params", METHOD_CASES)
def test_overflowing_task_vector_is_no_input_error(method, params):
    """float32 inputs that are all finite merge, even where a float32 task vector entry overflows
    (the trim's check flags it; the inputs are confirmed finite; the entry is merged in float64)."""
    base, fts = make_models(2, shapes={"w": (3, 4)})
    base["w"][0, 0] = fts[1]["w"][0, 0] = -3e38
    fts[0]["w"][0, 0] = 3e38
    assert torch.isfinite(nk.merge(base, fts, method=method, **params)["w"]).all()


@pytest.mark.parametrize("method", ["ties", "dare", "dare_ties", "neuromerging"])
@pytest.mark.parametrize("density", [0, -0.1, 1.5, math.nan, "0.5", True])
def test_density_outside_unit_interval(method, density):
    base, fts = make_models(2, shapes={"w": (3, 4)})
    expect_error("density must be", base, fts, method=method, density=density)


def test_bad_method_and_parameters():
    base, fts = make_models(2, shapes={"w": (3, 4)})
    expect_error("unknown method 'tie'; choose one of", base, fts, method="tie")
    expect_error("unknown parameter.*'lamda'", base, fts, method="ties", lamda=0.5)
    expect_error("weights has 3 entries for 2 fine-tuned models", base, fts, method="ties", weights=[1, 1, 1])
    expect_error(r"weights\[1\] must be a finite number", base, fts, method="task_arithmetic", weights=[1, math.nan])
    expect_error("consensus must be one of", base, fts, method="ties", consensus="median")
    expect_error("trim_scope must be one of", base, fts, method="neuromerging", trim_scope="layer")
    expect_error("rescale must be one of", base, fts, method="dare", rescale="l2")
    expect_error("seed must be an integer", base, fts, method="dare", seed=1.5)
    expect_error("gamma must be in", base, fts, method="neuromerging", gamma=0)
    expect_error("density has 3 entries for 2 fine-tuned models", base, fts, method="ties", density=[0.1, 0.2, 0.3])
    expect_error(r"density\[1\] must be in \(0, 1\]", base, fts, method="neuromerging", density=[0.1, 1.5])
    expect_error(r"density takes one value for all models; got \[0.1, 0.2\]", base, fts, method="dare", density=[0.1, 0.2])
    expect_error("density must be a finite number", base, fts, method="dare", density="dense")
    expect_error("normalize must be True or False", base, fts, method="task_arithmetic", normalize="yes")


def test_device_argument_moves_inputs():
    base, fts = make_models(2, shapes={"w": (3, 4)})
    out = nk.merge(base, fts, method="task_arithmetic", device="cpu")
    assert out["w"].device.type == "cpu"


def test_large_finite_values_are_not_mistaken_for_non_finite():
    # Their float32 sum overflows; the exact check must clear them.
    base = {"w": torch.full((10,), 3e38)}
    fts = [{"w": torch.full((10,), 3e38)}, {"w": torch.full((10,), 2e38)}]
    out = nk.merge(base, fts, method="task_arithmetic", weights=[0.5, 0.5])
    assert torch.isfinite(out["w"]).all()


@pytest.mark.parametrize("device,message", [
    ("bogus", "nk.merge: device 'bogus' is not a device name"),
    ("cuda:99", "nk.merge: device 'cuda:99', but "),
])
def test_bad_device_is_named(device, message):
    base, fts = make_models(2, shapes={"w": (3, 4)})
    expect_error(message, base, fts, method="ties", device=device)

