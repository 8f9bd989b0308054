"""neurokern's FusionBench algorithms against fusion-bench 0.2.33 itself, on a pool of tiny
nn.Modules built here: a pre-trained model and 3 fine-tuned ones with distinct random deltas.

Tolerances: on grid-valued weights (every sum exact in float32) TIES and its variants agree
bitwise; on random weights TIES and task arithmetic agree within 2 float32 ulps of the largest term
of the merged value's sums (the pre-trained value, Σ_t |τ_t|, the result): neurokern sums in
float64, FusionBench in float32. AdaMerging: λ after 3 steps within 1e-5.
"""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

fusion_bench = pytest.importorskip("fusion_bench")

from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm  # noqa: E402
from fusion_bench.method.dare import DareTaskArithmetic as FBDareTaskArithmetic  # noqa: E402
from fusion_bench.method.dare import DareTiesMerging as FBDareTiesMerging  # noqa: E402
from fusion_bench.method.ties_merging import ties_merging_utils as fb_ties  # noqa: E402
from fusion_bench.modelpool import BaseModelPool  # noqa: E402

import neurokern as nk  # noqa: E402
from neurokern.integrations import fusion_bench as nkfb  # noqa: E402
from neurokern.methods.trim import keep_count  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "fusion_bench"


class TinyNet(nn.Module):
    """Odd shapes, a LayerNorm, a one-row head bias: a small classifier."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(7, 11)
        self.norm = nn.LayerNorm(11)
        self.fc2 = nn.Linear(11, 5)
        self.head = nn.Linear(5, classes)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(self.norm(torch.relu(self.fc1(x))))))


def make_pool_models(seed: int = 0, grid: bool = False, scale: float = 0.05, tasks: int = 3):
    """A pre-trained TinyNet and `tasks` fine-tuned copies with distinct random deltas. grid: weights
    on multiples of 1/64 and deltas on multiples of 1/8 (exact in float32: many tied magnitudes,
    exact zero votes)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = TinyNet()
    with torch.no_grad():
        for p in base.parameters():
            if grid:
                p.copy_(torch.randint(-64, 65, p.shape, generator=g).float() / 64)
    finetuned = []
    for _ in range(tasks):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for p in model.parameters():
                if grid:
                    p.add_(torch.randint(-3, 4, p.shape, generator=g).float() / 8)
                else:
                    p.add_(scale * torch.randn(p.shape, generator=g))
        finetuned.append(model)
    return base, finetuned


def pool_of(base, finetuned, test_datasets=None) -> BaseModelPool:
    """A fresh pool of copies (FusionBench's algorithms write into the pool's pre-trained model)."""
    models = {"_pretrained_": copy.deepcopy(base), **{f"task{i}": copy.deepcopy(m) for i, m in enumerate(finetuned)}}
    return BaseModelPool(models, test_datasets=test_datasets)


def flat(model_or_state, remove_keys=()):
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return fb_ties.state_dict_to_vector(state, list(remove_keys))


def ulps(x: torch.Tensor) -> torch.Tensor:
    """The float32 spacing at each value."""
    return torch.finfo(torch.float32).eps * x.abs().clamp_min(torch.finfo(torch.float32).tiny)


def assert_within_ulps(got: torch.Tensor, want: torch.Tensor, n: int, *operands: torch.Tensor):
    """|got - want| within n float32 ulps of the largest of the merged value and the operands (the
    pre-trained value, the summed task-vector magnitudes): a float32 sum rounds at the scale of its
    largest term, whatever the size of the result."""
    diff = (got - want).abs()
    scale = want.abs()
    for operand in operands:
        scale = torch.maximum(scale, operand.abs())
    bound = n * ulps(scale)
    worst = int(torch.argmax(diff - bound))
    assert bool((diff <= bound).all()), f"entry {worst}: {got[worst].item()} vs {want[worst].item()}"


def magnitudes(base, finetuned) -> tuple[torch.Tensor, torch.Tensor]:
    """The flattened pre-trained model and Σ_t |τ_t|: the terms of a merged value's sums."""
    flat_base = flat(base)
    return flat_base, sum((flat(m) - flat_base).abs() for m in finetuned)


def fusion_bench_ties(base_state, finetuned_states, threshold, merge_func, scaling_factor, remove_keys=()):
    """FusionBench's own TIES functions on the flattened model, as its TiesMergingAlgorithm calls them."""
    flat_ptm = fb_ties.state_dict_to_vector(base_state, list(remove_keys))
    tv = torch.vstack([fb_ties.state_dict_to_vector(s, list(remove_keys)) for s in finetuned_states]) - flat_ptm
    merged_tv = fb_ties.ties_merging(tv, reset_thresh=threshold, merge_func=merge_func)
    return flat_ptm + scaling_factor * merged_tv


# ---------------------------------------------------------------------------------------------
# TIES: the keep_floor count and the model_majority zero sign against ties_merging_utils


@pytest.mark.parametrize("numel", [1, 7, 10, 33, 100, 101])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.25, 0.37, 0.5, 0.9])
def test_keep_floor_keeps_what_topk_values_mask_keeps(numel, density):
    """Distinct magnitudes: FusionBench keeps floor(N * K) + 1 entries per task; so does
    ties="keep_floor"; ties="keep" keeps one more where N * K is not a whole number."""
    g = torch.Generator().manual_seed(numel)
    tau = torch.randperm(numel, generator=g).float().add_(1) * torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0)
    if int(numel * density) >= numel:
        pytest.skip("FusionBench's kthvalue(0) fails where the count reaches N")
    _, _, mask = fb_ties.topk_values_mask(tau.unsqueeze(0).clone(), K=density, return_mask=True)
    fb_count = int(mask.sum())
    base = {"w": torch.zeros(numel)}
    merged = nk.merge(base, [{"w": tau}], method="ties", density=density, ties="keep_floor", trim_scope="global",
                      elect_on="unweighted", normalize=None, zero_sign="model_majority")
    assert torch.equal(merged["w"] != 0, mask.reshape(-1))
    assert fb_count == int(numel * density) + 1 == keep_count(numel, density, "keep_floor")
    loose = keep_count(numel, density, "keep")  # ceil(N * K) + 1, up to N
    fraction = numel * density - int(numel * density)
    assert loose == min(numel, fb_count + 1) if 0.01 < fraction < 0.99 else loose >= fb_count


@pytest.mark.parametrize("threshold", [20, 0.37, 5])
@pytest.mark.parametrize("merge_func", ["sum", "mean"])
def test_ties_bitwise_on_grid_weights_with_exact_ties(threshold, merge_func):
    """Grid weights: hundreds of tied magnitudes at every threshold and exact zero votes; the merge
    equals FusionBench's ties_merging bit for bit."""
    base, finetuned = make_pool_models(seed=1, grid=True)
    states = [m.state_dict() for m in finetuned]
    tau = torch.vstack([flat(s) for s in states]) - flat(base)
    n, density = tau.shape[1], nkfb.fusion_bench_density(threshold)
    cut = tau.abs().kthvalue(n - int(n * density), 1, keepdim=True).values
    assert bool(((tau.abs() == cut).sum(1) > 1).all())  # several entries tied at each task's threshold
    want = fusion_bench_ties(base.state_dict(), states, threshold, merge_func, 0.5)
    merged = nk.merge(base, finetuned, method="ties", scale=0.5, **nkfb.ties_options(threshold, merge_func))
    got = flat(merged)
    assert torch.equal(got, want)


@pytest.mark.parametrize("merge_func", ["sum", "mean"])
def test_ties_close_on_random_weights(merge_func):
    base, finetuned = make_pool_models(seed=2)
    want = fusion_bench_ties(base.state_dict(), [m.state_dict() for m in finetuned], 20, merge_func, 0.3)
    got = flat(nk.merge(base, finetuned, method="ties", scale=0.3, **nkfb.ties_options(20, merge_func)))
    assert_within_ulps(got, want, 2, *magnitudes(base, finetuned))


def planted_votes(model_sign_sum: int):
    """Two tensors, 3 tasks, all magnitudes 1 or 2 (nothing trimmed at threshold 0.9 but ties):
    "a" has 2 zero votes (+1, -1, 0) and 4 positive ones; "b" has `4 - model_sign_sum` negative
    votes, so the elected signs sum to model_sign_sum over the model while "a"'s own sum is +4."""
    negatives = 4 - model_sign_sum
    a = torch.tensor([[1.0, 1, 1, 1, 1, 1], [-1, -1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    b = torch.full((3, negatives), -2.0)
    base = {"a": torch.zeros(6), "b": torch.zeros(negatives)}
    finetuned = [{"a": a[t], "b": b[t]} for t in range(3)]
    return base, finetuned


@pytest.mark.parametrize("model_sign_sum", [-2, 0, 2])
@pytest.mark.parametrize("merge_func", ["sum", "mean"])
def test_zero_vote_takes_the_whole_models_majority_sign(model_sign_sum, merge_func):
    """A zero vote elects the sign of the elected signs summed over the whole model; a sum of 0 keeps
    the negative entries (FusionBench's where(sign > 0, v > 0, v < 0)). The tensor's own majority
    (zero_sign="majority") is + here, so it differs from FusionBench unless the model's is + too."""
    base, finetuned = planted_votes(model_sign_sum)
    want = fusion_bench_ties(base, finetuned, 0.9, merge_func, 1.0)
    options = nkfb.ties_options(0.9, merge_func)
    got = flat(nk.merge(base, finetuned, method="ties", **options))
    assert torch.equal(got, want)
    zero_votes = got[:2]
    assert torch.equal(zero_votes, torch.full((2,), 1.0 if model_sign_sum > 0 else -1.0))
    tensor_majority = flat(nk.merge(base, finetuned, method="ties", **{**options, "zero_sign": "majority"}))
    assert torch.equal(tensor_majority[:2], torch.ones(2))
    assert torch.equal(tensor_majority, want) == (model_sign_sum > 0)


def test_model_majority_is_computed_over_the_merged_tensors_only():
    """remove_keys leaves a tensor out of the trim and the vote, as FusionBench's flattening does."""
    base, finetuned = planted_votes(-2)
    base["c"] = torch.zeros(9)
    for t, ft in enumerate(finetuned):
        ft["c"] = torch.full((9,), 3.0)  # nine positive votes would turn the majority positive
    want = fusion_bench_ties(base, finetuned, 0.9, "sum", 1.0, remove_keys=["c"])
    algorithm = nkfb.TiesMerging(scaling_factor=1.0, threshold=0.9, remove_keys=["c"])
    pretrained = ParamHolder(base)
    merged = algorithm.run({"_pretrained_": pretrained, **{f"t{i}": ParamHolder(s) for i, s in enumerate(finetuned)}})
    state = merged.state_dict()
    assert torch.equal(state["c"], torch.zeros(9))
    assert torch.equal(flat(state, ["c"]), want)


class ParamHolder(nn.Module):
    """An nn.Module whose parameters are a given state dict's tensors."""

    def __init__(self, state):
        super().__init__()
        for name, value in state.items():
            self.register_parameter(name, nn.Parameter(value.clone()))


# ---------------------------------------------------------------------------------------------
# The algorithm classes against FusionBench's algorithms on the same pool


@pytest.mark.parametrize("grid", [True, False])
@pytest.mark.parametrize("merge_func", ["sum", "mean"])
def test_ties_merging_algorithm_matches_fusion_benchs(grid, merge_func):
    base, finetuned = make_pool_models(seed=3, grid=grid)
    config = dict(scaling_factor=0.5 if grid else 0.3, threshold=20, remove_keys=[], merge_func=merge_func)
    want = flat(TiesMergingAlgorithm(**config).run(pool_of(base, finetuned)))
    got = flat(nkfb.TiesMerging(**config).run(pool_of(base, finetuned)))
    if grid:
        assert torch.equal(got, want)
    else:
        assert_within_ulps(got, want, 2, *magnitudes(base, finetuned))


def test_task_arithmetic_matches_fusion_benchs():
    base, finetuned = make_pool_models(seed=4)
    want = flat(TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool_of(base, finetuned)))
    got = flat(nkfb.TaskArithmetic(scaling_factor=0.3).run(pool_of(base, finetuned)))
    assert_within_ulps(got, want, 2, *magnitudes(base, finetuned))


def test_inplace_false_leaves_the_pool_as_it_was():
    base, finetuned = make_pool_models(seed=4)
    pool = pool_of(base, finetuned)
    before = flat(pool.load_pretrained_model()).clone()
    merged = nkfb.TaskArithmetic(scaling_factor=0.3, inplace=False).run(pool)
    assert torch.equal(flat(pool.load_pretrained_model()), before)
    assert merged is not pool.load_pretrained_model()
    assert not torch.equal(flat(merged), before)


def test_dare_without_drop_is_fusion_benchs_task_arithmetic():
    """sparsity_ratio 0 drops nothing in both (FusionBench: rand > 0), so both are task arithmetic."""
    base, finetuned = make_pool_models(seed=5)
    config = dict(scaling_factor=0.3, sparsity_ratio=0.0, only_on_linear_weights=False, rescale=True)
    want = flat(FBDareTaskArithmetic(**config).run(pool_of(base, finetuned)))
    got = flat(nkfb.DareTaskArithmetic(**config).run(pool_of(base, finetuned)))
    assert_within_ulps(got, want, 2, *magnitudes(base, finetuned))


@pytest.mark.parametrize("only_on_linear_weights", [False, True])
def test_dare_drops_and_rescales(only_on_linear_weights):
    """One fine-tuned model, sparsity 0.75: about a quarter of each dropped tensor's task vector
    survives, multiplied by 4; LayerNorm parameters are left whole with only_on_linear_weights."""
    base, finetuned = make_pool_models(seed=6, tasks=1)
    algorithm = nkfb.DareTaskArithmetic(scaling_factor=1.0, sparsity_ratio=0.75,
                                        only_on_linear_weights=only_on_linear_weights, seed=3)
    merged = algorithm.run(pool_of(base, finetuned)).state_dict()
    tau = {k: finetuned[0].state_dict()[k] - v for k, v in base.state_dict().items()}
    kept = total = 0
    for name, value in merged.items():
        delta = value - base.state_dict()[name]
        survives = delta != 0
        linear_weight = name.endswith(".weight") and not name.startswith("norm")
        if only_on_linear_weights and not linear_weight:
            torch.testing.assert_close(delta, tau[name], rtol=0, atol=1e-7)
            continue
        torch.testing.assert_close(delta[survives], 4 * tau[name][survives], rtol=1e-6, atol=1e-7)
        kept, total = kept + int(survives.sum()), total + delta.numel()
    assert abs(kept / total - 0.25) < 0.08


def test_dare_sparsity_one_is_refused():
    base, finetuned = make_pool_models(seed=6)
    with pytest.raises(nk.NeurokernError, match="sparsity_ratio"):
        nkfb.DareTaskArithmetic(scaling_factor=0.3, sparsity_ratio=1.0).run(pool_of(base, finetuned))


def test_neuromerging_is_nk_merge():
    base, finetuned = make_pool_models(seed=7)
    got = nkfb.NeuroMerging(density=0.2).run(pool_of(base, finetuned)).state_dict()
    want = nk.merge(base, finetuned, method="neuromerging", density=0.2)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("bad, message", [
    (dict(threshold=0), "threshold"),
    (dict(threshold=101), "threshold"),
    (dict(merge_func="max"), "merge_func"),
    (dict(remove_keys=["nope.weight"]), "nope.weight"),
])
def test_ties_bad_parameters_name_what_is_wrong(bad, message):
    base, finetuned = make_pool_models(seed=8)
    config = {**dict(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum"), **bad}
    with pytest.raises(nk.NeurokernError, match=message):
        nkfb.TiesMerging(**config).run(pool_of(base, finetuned))


def test_a_pool_without_pretrained_model_is_refused():
    base, finetuned = make_pool_models(seed=8)
    with pytest.raises(nk.NeurokernError, match="_pretrained_"):
        nkfb.TaskArithmetic(scaling_factor=0.3).run({"a": finetuned[0], "b": finetuned[1]})


# ---------------------------------------------------------------------------------------------
# AdaMerging and Tinting: unlabelled inputs from the pool's test datasets


def task_datasets(tasks: int = 3, rows: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {f"task{t}": {"_target_": "torch.utils.data.TensorDataset",
                         "_args_": [torch.randn(rows, 7, generator=g), torch.zeros(rows, dtype=torch.long)]}
            for t in range(tasks)}


def fusion_bench_layer_wise_adamerging(base, finetuned, inputs, steps, lr, init):
    """FusionBench's LayerWiseMergedModel driven as its LayerWiseAdaMergingAlgorithm does: per step,
    the entropy of every task's batch, backward, one Adam step, merge_weights."""
    from fusion_bench.method.adamerging.entropy_loss import entropy_loss
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights

    names = [n for n, p in base.named_parameters()]
    module = LayerWiseMergedModel(get_layer_wise_weights(len(finetuned), len(names), init), copy.deepcopy(base),
                                  [copy.deepcopy(m) for m in finetuned], clamp_weights=True, tie_weights=True, strict=False)
    optimizer = torch.optim.Adam([module.merge_weight], lr=lr)
    module.merge_weights()
    for _ in range(steps):
        for x in inputs:
            entropy_loss(module(x)).backward(retain_graph=True)
        optimizer.step()
        optimizer.zero_grad()
        module.merge_weights()
    return names, module.merge_weight.detach()


def test_adamerging_layer_wise_matches_fusion_benchs_wrapper():
    """Batches hold every input (batch_size >= rows), so both see the same data each step; λ after
    3 steps agrees to 1e-5 and the merged model to 1e-5."""
    base, finetuned = make_pool_models(seed=9, scale=0.3)
    datasets = task_datasets()
    pool = pool_of(base, finetuned, datasets)
    algorithm = nkfb.AdaMerging(init_values=0.3, lr=1e-2, max_steps=3, batch_size=64, seed=0)
    merged = algorithm.run(pool)
    names, fb_lambda = fusion_bench_layer_wise_adamerging(base, finetuned, [d["_args_"][0] for d in datasets.values()],
                                                          3, 1e-2, 0.3)
    assert not torch.allclose(fb_lambda, torch.full_like(fb_lambda, 0.3))  # λ moved
    merged_state = merged.state_dict()
    fb_state = {n: base.state_dict()[n] + sum(fb_lambda[t, i] * (finetuned[t].state_dict()[n] - base.state_dict()[n])
                                              for t in range(3))
                for i, n in enumerate(names)}
    for n in names:
        torch.testing.assert_close(merged_state[n], fb_state[n], rtol=0, atol=1e-5)


def test_adamerging_with_heads_returns_a_tinted_model():
    base, finetuned = make_pool_models(seed=10, scale=0.3)
    pool = pool_of(base, finetuned, task_datasets())
    model = nkfb.AdaMerging(max_steps=2, heads=["head"], granularity="task").run(pool)
    assert isinstance(model, nk.tint.TintedModel)
    x = torch.randn(4, 7)
    with torch.no_grad():
        for t in range(3):
            state = model.task_state_dict(t)
            assert torch.equal(state["head.weight"], finetuned[t].head.weight)
            assert not torch.equal(state["fc1.weight"], base.fc1.weight)
            want = torch.func.functional_call(TinyNet(), state, (x,))
            torch.testing.assert_close(model(x, task=f"task{t}"), want, rtol=1e-6, atol=1e-6)


def test_model_tinting_equals_neurokern_tint_fit():
    """The algorithm is TintedModel + fit on the pool's test inputs: the same seed gives the same λ
    and tints as calling them directly."""
    base, finetuned = make_pool_models(seed=11, scale=0.3)
    datasets = task_datasets()
    config = dict(tint_layers=["fc2"], heads=["head"], max_steps=3, batch_size=8, seed=5)
    got = nkfb.ModelTinting(**config).run(pool_of(base, finetuned, datasets))
    want = nk.tint.TintedModel(copy.deepcopy(base), None, {f"task{t}": m for t, m in enumerate(finetuned)},
                               tint_layers=["fc2"], heads=["head"])
    nk.tint.fit(want, {k: torch.utils.data.TensorDataset(*d["_args_"]) for k, d in datasets.items()},
                steps=3, batch_size=8, seed=5, progress=False)
    assert torch.equal(got.lambdas, want.lambdas)
    for a, b in zip(got.tint_parameters(), want.tint_parameters()):
        assert torch.equal(a, b)


def test_test_time_methods_need_test_datasets():
    base, finetuned = make_pool_models(seed=12)
    with pytest.raises(nk.NeurokernError, match="test dataset for task"):
        nkfb.AdaMerging(max_steps=1).run(pool_of(base, finetuned))


# ---------------------------------------------------------------------------------------------
# `_target_` configs


def load_example(name: str):
    from omegaconf import OmegaConf

    return OmegaConf.load(EXAMPLES / "method" / "neurokern" / name)


@pytest.mark.parametrize("instantiate", ["hydra", "fusion_bench"])
def test_the_example_ties_config_instantiates_and_runs(instantiate):
    if instantiate == "hydra":
        from hydra.utils import instantiate as make
    else:
        from fusion_bench.utils import instantiate as make
    config = load_example("ties_merging.yaml")
    algorithm = make(config)
    assert isinstance(algorithm, nkfb.TiesMerging)
    base, finetuned = make_pool_models(seed=13, grid=True)
    want = TiesMergingAlgorithm(scaling_factor=config.scaling_factor, threshold=config.threshold,
                                remove_keys=[], merge_func=config.merge_func).run(pool_of(base, finetuned))
    assert_within_ulps(flat(algorithm.run(pool_of(base, finetuned))), flat(want), 2, *magnitudes(base, finetuned))


@pytest.mark.parametrize("name, cls", [("task_arithmetic.yaml", "TaskArithmetic"), ("dare_task_arithmetic.yaml", "DareTaskArithmetic"),
                                       ("dare_ties_merging.yaml", "DareTiesMerging"),
                                       ("neuromerging.yaml", "NeuroMerging"), ("adamerging.yaml", "AdaMerging"),
                                       ("model_tinting.yaml", "ModelTinting")])
def test_every_example_config_instantiates(name, cls):
    from hydra.utils import instantiate

    assert type(instantiate(load_example(name))) is getattr(nkfb, cls)


def test_fusion_benchs_program_runs_the_example_config(tmp_path):
    """docs/fusion-bench.md's command: `fusion_bench` (its Hydra program) with examples/fusion_bench on
    the search path, method and modelpool by name; the saved model equals FusionBench's own TIES on
    the same pool."""
    out = tmp_path / "merged.pt"
    command = [sys.executable, "-m", "fusion_bench.scripts.cli", f"hydra.searchpath=[file://{EXAMPLES}]",
               "method=neurokern/ties_merging", "modelpool=tiny", "taskpool=dummy", "fabric.accelerator=cpu",
               "fabric/loggers=csv_logger", f"merged_model_save_path={out}", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {"PYTHONPATH": f"{EXAMPLES}:{ROOT}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sys.path.insert(0, str(EXAMPLES))
    try:
        from tiny_pool import model
    finally:
        sys.path.remove(str(EXAMPLES))
    base, finetuned = model(-1), [model(t) for t in range(3)]
    config = load_example("ties_merging.yaml")
    want = TiesMergingAlgorithm(scaling_factor=config.scaling_factor, threshold=config.threshold, remove_keys=[],
                                merge_func=config.merge_func).run(pool_of(base, finetuned))
    state = torch.load(out, weights_only=True)
    assert_within_ulps(flat(state), flat(want), 2, *magnitudes(base, finetuned))
    assert not torch.equal(flat(state), flat(base))


# ---------------------------------------------------------------------------------------------
# bench/fusionbench_adamerging.py on a tiny configuration


def test_the_adamerging_benchmark_runs_and_both_sides_agree(tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("fusionbench_adamerging", ROOT / "bench" / "fusionbench_adamerging.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "fusionbench-adamerging-cpu-smoke.json").read_text())
    assert written["device"] == report["device"] and written["device"]
    assert written["step_ms"]["fusion_bench"] > 0 and written["step_ms"]["neurokern"] > 0
    assert written["agreement"]["max_lambda_move_from_init"] > 1e-3  # λ moved: the comparison means something
    assert written["agreement"]["max_abs_lambda_difference"] < 1e-4


def test_dare_ties_without_drop_is_fusion_benchs_on_grid_weights():
    """sparsity_ratio 0: both are FusionBench's TIES on the undropped models; bitwise on grid weights."""
    base, finetuned = make_pool_models(seed=15, grid=True)
    config = dict(sparsity_ratio=0.0, only_on_linear_weights=False, rescale=True, scaling_factor=0.5, threshold=20,
                  remove_keys=[], merge_func="sum")
    want = flat(FBDareTiesMerging(**config).run(pool_of(base, finetuned)))
    got = flat(nkfb.DareTiesMerging(**config).run(pool_of(base, finetuned)))
    assert torch.equal(got, want)


def test_dare_ties_drops_with_the_masks_of_a_dare_merge():
    """Each task's drop is its mask in nk.merge's "dare" on the whole pool: the TIES step then sees
    exactly those dropped task vectors."""
    base, finetuned = make_pool_models(seed=16, grid=True)
    config = dict(sparsity_ratio=0.5, only_on_linear_weights=True, rescale=True, scaling_factor=1.0, threshold=0.9,
                  merge_func="sum", seed=4)
    got = nkfb.DareTiesMerging(**config).run(pool_of(base, finetuned)).state_dict()
    linear = [n for n in base.state_dict() if n.endswith(".weight") and not n.startswith("norm")]
    dropped = []
    for t, model in enumerate(finetuned):
        weights = [1.0 if s == t else 0.0 for s in range(3)]
        one = nk.merge({n: base.state_dict()[n] for n in linear}, [{n: m.state_dict()[n] for n in linear} for m in finetuned],
                       method="dare", weights=weights, density=0.5, seed=4)
        dropped.append({**model.state_dict(), **one})
    want = nk.merge(base, dropped, method="ties", **nkfb.ties_options(0.9, "sum"))
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert any(bool((d[n] == base.state_dict()[n]).float().mean() > 0.3) for d in dropped for n in linear)
