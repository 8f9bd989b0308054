"""Parity with mergekit 0.1.5, measured: the same config run by mergekit (its Python API,
mergekit.merge.run_merge on the CPU) and by `neurokern merge`, on tiny Llama-shaped models saved
as mergekit reads them (tests/integrations/mergekit_models.py), for every method both implement
and the config keys they share.

Tolerances (float32 inputs), per tensor: |neurokern - mergekit| <= TOL * max|mergekit|.
- bitwise (TOL 0): breadcrumbs, breadcrumbs_ties, della, della_linear (given the same random
  mask), passthrough (with and without scale): neurokern runs mergekit's arithmetic step by step.
- TOL = 1e-6 (a few float32 ulps of the tensor's largest entry): linear, slerp, nuslerp,
  model_stock, task_arithmetic, ties, dare_linear, dare_ties. The weighted_sum op computes
  c_0 theta_0 + sum_t c_t (theta_t - theta_0) with float32 coefficients, mergekit
  sum_i w_i theta_i (or t * mean + (1 - t) theta_0); slerp's norms and dot are float64 in
  neurokern, float32 in mergekit; the two roundings differ in the last bits.
Random methods (dare_*, della*): mergekit draws its masks from torch's global generator,
neurokern from generators keyed by (seed, tensor, model). The tests hand mergekit neurokern's
masks (its torch.bernoulli, as its sparsify module calls it, returns them) and check that
mergekit asked for the same keep probabilities; everything else is mergekit's own code.
"""
import hashlib
import math
import json
import shutil
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("mergekit.merge")

from mergekit_models import base_state, make_family, write_model  # noqa: E402
from mergekit_run import run_mergekit, run_neurokern  # noqa: E402

from neurokern import ops  # noqa: E402
from neurokern.checkpoint import load_model  # noqa: E402
from neurokern.methods import della  # noqa: E402

TOL = 1e-6


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return {k: str(v) for k, v in make_family(root / "fp32", count=3).items()}


def within(got: dict, want: dict, tol: float) -> float:
    """Asserts |got - want| <= tol * max|want| per tensor; returns the largest relative difference."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    worst = 0.0
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        scale = want[name].abs().max().item() or 1.0
        diff = (got[name].double() - want[name].double()).abs().max().item() / scale
        assert diff <= tol, f"{name}: {diff:.3g} > {tol}"
        worst = max(worst, diff)
    return worst


def both(config: dict, tmp_path, name: str):
    mk = run_mergekit(config, tmp_path / f"mk-{name}")
    nk = run_neurokern(config, tmp_path / f"nk-{name}", tmp_path)
    return nk, mk


def models(family, *entries):
    """[{model: path, parameters: {...}}] from (name, parameters) pairs."""
    return [{"model": family[n], **({"parameters": p} if p else {})} for n, p in entries]


# The mergekit slerp example: t per filter, each a gradient over the layers.
SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
           {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
           {"value": 0.5}]

CASES = {
    # name: (config from the family's paths, tolerance)
    "linear": (lambda f: {"merge_method": "linear", "models": models(
        f, ("task_0", {"weight": 0.5}), ("task_1", {"weight": 0.3}), ("task_2", {"weight": 0.2}))}, TOL),
    "linear_base_unnormalized": (lambda f: {"merge_method": "linear", "base_model": f["base"], "models": models(
        f, ("base", {"weight": 0.2}), ("task_0", {"weight": 0.5}), ("task_1", {"weight": [0.1, 0.3]})),
        "parameters": {"normalize": False}}, TOL),
    "slerp_filters": (lambda f: {"merge_method": "slerp", "base_model": f["base"],
                                 "models": models(f, ("base", None), ("task_0", None)),
                                 "parameters": {"t": SLERP_T}}, TOL),
    "slerp_slices": (lambda f: {"merge_method": "slerp", "base_model": f["base"], "slices": [
        {"sources": [{"model": f["base"], "layer_range": [0, 2]}, {"model": f["task_0"], "layer_range": [0, 2]}],
         "parameters": {"t": [0, 1]}},
        {"sources": [{"model": f["base"], "layer_range": [2, 4]}, {"model": f["task_0"], "layer_range": [2, 4]}],
         "parameters": {"t": [{"filter": "mlp", "value": 0.9}, {"value": [0.2, 0.4]}]}}]}, TOL),
    "nuslerp": (lambda f: {"merge_method": "nuslerp", "base_model": f["base"], "models": models(
        f, ("task_0", {"weight": 1.0}), ("task_1", {"weight": 2.0}))}, TOL),
    "nuslerp_rows_no_base": (lambda f: {"merge_method": "nuslerp", "models": models(
        f, ("task_0", {"weight": 0.3}), ("task_1", {"weight": 0.6})), "parameters": {"nuslerp_flatten": False}}, TOL),
    "nuslerp_columns": (lambda f: {"merge_method": "nuslerp", "base_model": f["base"], "models": models(
        f, ("task_0", {"weight": 1.0}), ("task_1", {"weight": 1.0})),
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}, TOL),
    "model_stock": (lambda f: {"merge_method": "model_stock", "base_model": f["base"], "models": models(
        f, ("base", None), ("task_0", None), ("task_1", None), ("task_2", None))}, TOL),
    "model_stock_filter_wise": (lambda f: {"merge_method": "model_stock", "base_model": f["base"], "models": models(
        f, ("task_0", None), ("task_1", None)), "parameters": {"filter_wise": True}}, TOL),
    "task_arithmetic": (lambda f: {"merge_method": "task_arithmetic", "base_model": f["base"], "models": models(
        f, ("task_0", {"weight": [0.1, 0.9]}), ("task_1", {"weight": 0.4})), "parameters": {"lambda": 0.7}}, TOL),
    "ties": (lambda f: {"merge_method": "ties", "base_model": f["base"], "models": models(
        f, ("task_0", {"weight": 1.0, "density": [1, 0.7, 0.1]}),
        ("task_1", {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.6}], "density": 0.4}))}, TOL),
    "breadcrumbs": (lambda f: {"merge_method": "breadcrumbs", "base_model": f["base"], "models": models(
        f, ("task_0", {"weight": 1.0, "density": 0.5}), ("task_1", {"weight": 0.5, "density": [1, 0.7, 0.1]})),
        "parameters": {"gamma": 0.05}}, 0.0),
    "breadcrumbs_ties": (lambda f: {"merge_method": "breadcrumbs_ties", "base_model": f["base"], "models": models(
        f, ("task_0", {"weight": 1.0, "density": 0.5}), ("task_1", {"weight": 0.5, "density": 0.4, "gamma": 0.1}),
        ("task_2", {"weight": 0.7, "density": 0.3})),
        "parameters": {"normalize": True, "lambda": 0.8, "rescale": True}}, 0.0),
    "passthrough_copy": (lambda f: {"merge_method": "passthrough", "models": models(f, ("task_1", None))}, 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_result_as_mergekit(family, tmp_path, case):
    make, tol = CASES[case]
    nk, mk = both(make(family), tmp_path, case)
    within(nk, mk, tol)


def test_frankenmerge_slices(family, tmp_path):
    """passthrough with slices: layers stacked from two models (one repeated), renamed, a scale by
    filter; bitwise, the same tensor names and config.json's layer count."""
    config = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": family["task_0"], "layer_range": [0, 3]}]},
        {"sources": [{"model": family["task_1"], "layer_range": [1, 4],
                      "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]},
        {"sources": [{"model": family["task_0"], "layer_range": [2, 3]}]}]}
    nk, mk = both(config, tmp_path, "franken")
    within(nk, mk, 0.0)
    assert len({n for n in nk if n.startswith("model.layers.")}) == 7 * 9
    assert torch.equal(nk["model.layers.3.self_attn.o_proj.weight"],
                       0.5 * load_model(Path(family["task_1"]))["model.layers.1.self_attn.o_proj.weight"])
    for side in ("mk", "nk"):
        assert json.loads((tmp_path / f"{side}-franken" / "config.json").read_text())["num_hidden_layers"] == 7


# ---------------------------------------------------------------------------------------------
# Random methods: mergekit runs with neurokern's masks


class _Masks:
    """Hands mergekit's sparsify neurokern's mask of the (tensor, model) whose task vector it is
    given, through the torch.bernoulli it calls, and records the probabilities it asked for."""

    def __init__(self, family: dict, method: str, num_tasks: int, densities, epsilons=None, seed: int = 0):
        self.lookup, self.asked, self.current = {}, [], None
        base = load_model(Path(family["base"]))
        tuned = [load_model(Path(family[f"task_{t}"])) for t in range(num_tasks)]
        for name, b in base.items():
            for t, sd in enumerate(tuned):
                delta = sd[name] - b
                if method == "dare":  # ops.dare of zeros and ones: 1 where entry i of task t survives
                    keys = ops.dare_keys(seed, name, num_tasks)
                    mask = ops.dare(torch.zeros_like(b), [torch.ones_like(b)], [1.0], densities[t], [keys[t]], rescale="none")
                    probs = torch.full_like(b, densities[t])
                else:
                    uniform = della.uniforms(seed, name, num_tasks, b.shape)[t]
                    probs = della.keep_probability(delta, densities[t], epsilons[t])
                    mask = (uniform < probs).float()
                self.lookup[self._key(delta)] = (name, mask, probs)

    @staticmethod
    def _key(x: torch.Tensor) -> str:
        return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()

    def install(self, monkeypatch):
        import mergekit.merge_methods.generalized_task_arithmetic as gta
        import mergekit.sparsify as sparsify

        real_sparsify = gta.sparsify

        def sparsify_with_ours(tensor, *args, **kwargs):
            self.current = self.lookup[self._key(tensor)]
            return real_sparsify(tensor, *args, **kwargs)

        def bernoulli(probs, *args, **kwargs):
            name, mask, want = self.current
            self.asked.append((name, (probs.reshape(want.shape).double() - want.double()).abs().max().item()))
            return mask.to(probs.dtype).reshape(probs.shape)

        torch_with_our_bernoulli = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
        torch_with_our_bernoulli.bernoulli = bernoulli
        monkeypatch.setattr(gta, "sparsify", sparsify_with_ours)
        monkeypatch.setattr(sparsify, "torch", torch_with_our_bernoulli)


RANDOM_CASES = {
    # name: (method, per-model parameters, top-level parameters, sparsifier, tolerance)
    "dare_linear": ("dare_linear", [{"weight": 0.6, "density": 0.4}, {"weight": 0.5, "density": 0.4}], {}, "dare", TOL),
    "dare_ties": ("dare_ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.5}],
                  {"lambda": 0.9, "normalize": True}, "dare", TOL),
    "dare_ties_no_rescale": ("dare_ties", [{"weight": 1.0, "density": 0.3}, {"weight": 0.7, "density": 0.3}],
                             {"rescale": False}, "dare", TOL),
    "della": ("della", [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"weight": 0.7, "density": 0.4}], {},
              "della", 0.0),
    "della_linear": ("della_linear", [{"weight": 0.6, "density": 0.6}, {"weight": 0.4, "density": 0.5}],
                     {"epsilon": 0.2, "lambda": 1.1}, "della", 0.0),
}


@pytest.mark.parametrize("case", list(RANDOM_CASES))
def test_random_methods_with_the_same_masks(family, tmp_path, monkeypatch, case):
    method, per_model, top, kind, tol = RANDOM_CASES[case]
    densities = [p["density"] for p in per_model]
    epsilons = [p.get("epsilon", top.get("epsilon", 0.15)) for p in per_model]
    masks = _Masks(family, kind, len(per_model), densities, epsilons)
    masks.install(monkeypatch)
    config = {"merge_method": method, "base_model": family["base"],
              "models": [{"model": family[f"task_{t}"], "parameters": p} for t, p in enumerate(per_model)],
              "parameters": top}
    nk, mk = both(config, tmp_path, case)
    within(nk, mk, tol)
    assert len(masks.asked) == len(per_model) * len(nk)  # every task vector of every tensor drew its mask here
    assert max(diff for _, diff in masks.asked) <= 1e-7  # mergekit asked for neurokern's keep probabilities


# ---------------------------------------------------------------------------------------------
# Exact ties at TIES's cut-off


def test_ties_at_exact_magnitude_ties(tmp_path):
    """A task vector whose magnitudes tie across the cut-off: k = floor(density N) = 8 of the 24
    entries of magnitude 0.5 (N = 64, the rest smaller) are kept. Both keep exactly k. neurokern
    keeps the lowest positions among the tied entries (a stable descending sort's choice, on any
    device); mergekit keeps the first k of torch.argsort(descending=True), an unstable sort, which
    on this CPU build picks others. Without ties at the cut-off the two agree bitwise."""
    from mergekit.sparsify import magnitude

    state = base_state()
    name = "model.layers.0.self_attn.q_proj.weight"  # [16, 16]: 256 entries; the first 48 planted
    state[name] = torch.round(state[name] * 1024) / 1024  # so that (base + delta) - base is delta exactly
    delta = torch.zeros(state[name].numel())
    tied = torch.arange(0, 48, 2)  # 24 entries of magnitude 0.5, alternating signs
    delta[tied] = 0.5 * (1 - 2 * (torch.arange(24) % 2)).float()
    delta[torch.arange(1, 48, 2)] = torch.arange(1, 25).float() / 1024  # smaller, distinct
    density = 8 / 256
    tuned = dict(state)
    tuned[name] = state[name] + delta.reshape(state[name].shape)
    assert torch.equal(tuned[name] - state[name], delta.reshape(state[name].shape))
    root = tmp_path / "ties"
    write_model(root / "base", state)
    write_model(root / "task", tuned)
    config = {"merge_method": "ties", "base_model": str(root / "base"),
              "models": [{"model": str(root / "task"), "parameters": {"weight": 1.0, "density": density}}]}
    nk, mk = both(config, tmp_path, "ties-at-ties")
    base_q = state[name].reshape(-1)
    kept_nk = torch.nonzero(nk[name].reshape(-1) != base_q).flatten()
    kept_mk = torch.nonzero(mk[name].reshape(-1) != base_q).flatten()
    assert len(kept_nk) == len(kept_mk) == 8
    assert kept_nk.tolist() == tied[:8].tolist()  # neurokern: the lowest positions
    # mergekit: what its own sparsifier keeps on this delta, i.e. argsort's choice among the ties
    own = torch.nonzero(magnitude(delta.reshape(state[name].shape), density).reshape(-1)).flatten()
    assert kept_mk.tolist() == own.tolist() and set(own.tolist()) <= set(tied.tolist())
    assert kept_mk.tolist() != kept_nk.tolist()  # this build's argsort does not keep the first ones
    for other in nk:  # every other tensor is untouched by the planted ties and agrees
        if other != name:
            assert torch.equal(nk[other], mk[other]), other


# ---------------------------------------------------------------------------------------------
# bfloat16


@pytest.fixture(scope="module")
def family_bf16(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-bf16")
    bf16 = {k: str(v) for k, v in make_family(root / "bf16", count=2, dtype=torch.bfloat16).items()}
    upcast = {}  # the same values, stored as float32 (exact)
    for key, folder in bf16.items():
        upcast[key] = str(write_model(root / "fp32" / key, {n: t.float() for n, t in load_model(Path(folder)).items()}))
    return bf16, upcast


BF16_CASES = {
    "linear": lambda f: {"merge_method": "linear", "models": models(f, ("task_0", {"weight": 0.7}), ("task_1", {"weight": 0.2}))},
    "slerp": lambda f: {"merge_method": "slerp", "base_model": f["base"], "models": models(f, ("task_0", None)),
                        "parameters": {"t": SLERP_T}},
    "task_arithmetic": lambda f: {"merge_method": "task_arithmetic", "base_model": f["base"], "models": models(
        f, ("task_0", {"weight": 0.6}), ("task_1", {"weight": 0.3}))},
    "model_stock": lambda f: {"merge_method": "model_stock", "base_model": f["base"], "models": models(
        f, ("task_0", None), ("task_1", None))},
}
# The largest distance between neurokern's and mergekit's own bfloat16 runs, in bf16 ulps of each
# tensor's largest entry, as measured on these models: linear and slerp compute in float32 in both tools; task_arithmetic and
# model_stock compute in bfloat16 in mergekit (each task vector, each product rounded).
MERGEKIT_BF16_ULPS = {"linear": 1, "slerp": 1, "task_arithmetic": 2, "model_stock": 4}


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between two bfloat16 tensors in units in the last place."""
    def line(x):
        bits = x.contiguous().view(torch.int16).long()
        return torch.where(bits < 0, -(bits + (1 << 15)), bits)
    return int((line(a) - line(b)).abs().max()) if a.numel() else 0


def ulps_of_largest(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in bf16 ulps of the tensor's largest magnitude (entries near 0 have tiny ulps)."""
    largest = b.float().abs().max().item()
    if not largest:
        return 0.0
    return (a.float() - b.float()).abs().max().item() / 2.0 ** (math.floor(math.log2(largest)) - 7)


@pytest.mark.parametrize("case", list(BF16_CASES))
def test_bfloat16(family_bf16, tmp_path, case):
    """What a bfloat16 merge is in each tool. neurokern computes in float32 from the exact inputs
    and rounds once: its output is within 1 bf16 ulp of mergekit's float32 result on the same
    values (stored as float32) rounded to bfloat16 (the float32 results differ in the last bits,
    as above, which can move a rounding). mergekit's own bfloat16 run matches that within 1 ulp
    for linear and slerp, which compute in float32 inside; task_arithmetic and model_stock compute
    in bfloat16 in mergekit, so its result moves further (bounded in MERGEKIT_BF16_ULPS)."""
    bf16, upcast = family_bf16
    config = BF16_CASES[case](bf16)
    nk = run_neurokern(config, tmp_path / "nk", tmp_path)
    mk_bf16 = run_mergekit(config, tmp_path / "mk-bf16")
    mk_fp32 = run_mergekit(BF16_CASES[case](upcast), tmp_path / "mk-fp32")
    assert all(t.dtype == torch.bfloat16 for t in nk.values())
    assert max(bf16_ulps(nk[n], mk_fp32[n].to(torch.bfloat16)) for n in nk) <= 1
    worst = max(ulps_of_largest(nk[n], mk_bf16[n]) for n in nk)
    assert worst <= MERGEKIT_BF16_ULPS[case], worst


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_bfloat16_trims_differ_only_among_tied_magnitudes(family_bf16, method):
    """Task vectors of bfloat16 models are differences of bf16 values: their magnitudes tie often,
    also at a trim's cut-off. Per tensor, neurokern's trim and mergekit's (magnitude, for TIES;
    magnitude_outliers, for breadcrumbs) keep the same number of entries and the same multiset of
    magnitudes; which of the tied entries they keep differs (neurokern: by position; mergekit:
    torch's unstable sort)."""
    from mergekit.sparsify import magnitude, magnitude_outliers

    from neurokern.methods import breadcrumbs

    bf16, _ = family_bf16
    base = load_model(Path(bf16["base"]))
    tuned = load_model(Path(bf16["task_0"]))
    density, gamma, differ = 0.3, 0.05, 0
    for name, b in base.items():
        delta = tuned[name].float() - b.float()  # exact
        if method == "ties":
            ours = import_merge()(base={name: b.float()}, finetuned=[{name: tuned[name].float()}], method="ties",
                                  density=density)[name] - b.float()
            theirs = magnitude(delta, density)
        else:
            ours = breadcrumbs.trim(delta, density, gamma, rescale=False)
            theirs = magnitude_outliers(delta, density, gamma=gamma)
        kept_ours, kept_theirs = ours != 0, theirs != 0
        assert int(kept_ours.sum()) == int(kept_theirs.sum()), name
        assert torch.equal(delta[kept_ours].abs().sort().values, delta[kept_theirs].abs().sort().values), name
        differ += int(not torch.equal(kept_ours, kept_theirs))
    assert differ > 0  # the ties are real: some tensors keep other entries


def import_merge():
    import neurokern as nk

    return nk.merge


# ---------------------------------------------------------------------------------------------
# Config keys both tools read


def test_config_keys_tokenizer_relative_paths_and_rescale(family, tmp_path, monkeypatch):
    """tokenizer_source: base copies the base's tokenizer files (mergekit rebuilds the tokenizer,
    here the same vocabulary); `tokenizer: {source: ...}`; model paths relative to the working
    directory (mergekit's rule); rescale as a boolean; out_dtype."""
    root = tmp_path / "work"
    root.mkdir()
    for key in ("base", "task_0", "task_1"):
        shutil.copytree(family[key], root / key)
    monkeypatch.chdir(root)
    config = {"merge_method": "dare_linear", "base_model": "base",
              "models": [{"model": "task_0", "parameters": {"weight": 0.5, "density": 1.0}},
                         {"model": "task_1", "parameters": {"weight": 0.5, "density": 1.0}}],
              "parameters": {"rescale": False}, "tokenizer_source": "base", "out_dtype": "bfloat16"}
    (tmp_path / "elsewhere").mkdir()
    nk = run_neurokern(config, tmp_path / "nk", tmp_path / "elsewhere")  # the YAML's folder holds no models
    mk = run_mergekit(config, tmp_path / "mk")
    assert all(t.dtype == torch.bfloat16 for t in nk.values())
    within({n: t.float() for n, t in nk.items()}, {n: t.float() for n, t in mk.items()}, 2 ** -8)
    for side in ("nk", "mk"):
        vocab = json.loads((tmp_path / side / "tokenizer.json").read_text())["model"]["vocab"]
        assert vocab == json.loads((root / "base" / "tokenizer.json").read_text())["model"]["vocab"]
    config = {**config, "tokenizer": {"source": "task_1"}}
    del config["tokenizer_source"]
    run_neurokern(config, tmp_path / "nk-tok", tmp_path / "elsewhere")
    assert (tmp_path / "nk-tok" / "tokenizer.json").read_bytes() == (root / "task_1" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("template", ["literal", "chatml", "auto"])
def test_chat_template(family, tmp_path, template):
    """chat_template: the template's text, one of mergekit's named templates, or auto (the template
    most inputs have): the output's tokenizer loads with the same chat template in both tools."""
    from transformers import AutoTokenizer

    root = tmp_path / "models"
    for key in ("base", "task_0", "task_1"):
        shutil.copytree(family[key], root / key)
    (root / "base" / "chat_template.jinja").write_text("{% for m in messages %}B{{ m['content'] }}{% endfor %}")
    for key in ("task_0", "task_1"):
        (root / key / "chat_template.jinja").write_text("{% for m in messages %}T{{ m['content'] }}{% endfor %}")
    value = {"literal": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}",
             "chatml": "chatml", "auto": "auto"}[template]
    config = {"merge_method": "task_arithmetic", "base_model": str(root / "base"),
              "models": [{"model": str(root / k), "parameters": {"weight": 0.5}} for k in ("task_0", "task_1")],
              "chat_template": value}
    nk, mk = both(config, tmp_path, f"chat-{template}")
    within(nk, mk, TOL)
    loaded = [AutoTokenizer.from_pretrained(tmp_path / f"{side}-chat-{template}").chat_template for side in ("nk", "mk")]
    assert loaded[0] == loaded[1] and loaded[0]
    if template == "auto":
        assert loaded[0].startswith("{% for m in messages %}T")
