"""FusionBench algorithms on neurokern's merges (fusion-bench 0.2.33; docs/fusion-bench.md).

Each class is a FusionBench `BaseAlgorithm`: FusionBench's program builds it from a config by its
`_target_` (e.g. `_target_: neurokern.integrations.fusion_bench.TiesMerging`) and calls
`run(modelpool)`. The pool holds the pre-trained model as `_pretrained_` and one fine-tuned model
per task. Where FusionBench has the algorithm, the class takes the parameter names of FusionBench's
own config (`scaling_factor`, `threshold`, `remove_keys`, `merge_func`, `sparsity_ratio`, ...), so
that changing `_target_` is all a config needs.

    TaskArithmetic, TiesMerging, DareTaskArithmetic, DareTiesMerging, NeuroMerging   nk.merge; the pool's
        `_pretrained_` model with the merged weights loaded (in place unless inplace=False)
    AdaMerging, ModelTinting   neurokern.tint.TintedModel + neurokern.tint.fit on unlabelled
        inputs that they take, as FusionBench's AdaMerging does, from the pool's test datasets
        (`modelpool.load_test_dataset(task)` for each task)
"""
import copy
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from fusion_bench.method import BaseAlgorithm
from fusion_bench.mixins import auto_register_config
from fusion_bench.modelpool import BaseModelPool
from torch import Tensor, nn

from neurokern.errors import NeurokernError
from neurokern.merging import merge
from neurokern.tint import TintedModel, fit

__all__ = [
    "AdaMerging",
    "DareTaskArithmetic",
    "DareTiesMerging",
    "ModelTinting",
    "NeuroMerging",
    "TaskArithmetic",
    "TiesMerging",
    "fusion_bench_density",
    "ties_options",
]

PRETRAINED = "_pretrained_"


def as_modelpool(modelpool: Union[BaseModelPool, Mapping[str, nn.Module]]) -> BaseModelPool:
    """FusionBench's algorithms take a BaseModelPool or a dict of models; so do these."""
    if isinstance(modelpool, BaseModelPool):
        return modelpool
    if isinstance(modelpool, Mapping):
        return BaseModelPool(dict(modelpool))
    raise NeurokernError(f"modelpool must be a fusion_bench BaseModelPool or a dict of models; got {type(modelpool).__name__}")


def load_models(pool: BaseModelPool) -> tuple[nn.Module, list[str], list[nn.Module]]:
    """The pool's pre-trained model, its task names and fine-tuned models (in the pool's order)."""
    if not pool.has_pretrained:
        raise NeurokernError(
            f"the modelpool has no {PRETRAINED!r} model (it holds {pool.all_model_names}); neurokern merges "
            "task vectors against the pre-trained model"
        )
    tasks = list(pool.model_names)
    if not tasks:
        raise NeurokernError(f"the modelpool holds no fine-tuned model besides {PRETRAINED!r}")
    return pool.load_pretrained_model(), tasks, [pool.load_model(name) for name in tasks]


def fusion_bench_density(threshold: Any) -> float:
    """FusionBench's TIES `threshold` as a density: a number above 1 is a percentage (its
    topk_values_mask divides it by 100), one in (0, 1] a fraction."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise NeurokernError(f"TiesMerging: threshold must be a number; got {threshold!r}")
    density = threshold / 100 if threshold > 1 else float(threshold)
    if not 0 < density <= 1:
        raise NeurokernError(f"TiesMerging: threshold must be in (0, 100] (a percentage) or (0, 1]; got {threshold!r}")
    return density


MERGE_FUNCS = {"sum": None, "mean": "count"}  # FusionBench's disjoint merge -> nk.merge's normalize


def ties_options(threshold: Any, merge_func: str = "sum") -> dict[str, Any]:
    """nk.merge's TIES parameters that reproduce FusionBench's ties_merging on a model: one trim over
    the whole model keeping every entry at or above the (floor(density * N) + 1)-th largest |tau|
    (ties kept), a sign election on the unweighted trimmed vectors, a zero vote settled by the sign
    of the elected signs summed over the whole model, and the agreeing entries summed ("sum") or
    averaged over their count ("mean")."""
    if merge_func not in MERGE_FUNCS:
        raise NeurokernError(
            f"TiesMerging: merge_func must be one of {', '.join(map(repr, MERGE_FUNCS))}; got {merge_func!r} "
            "(FusionBench's 'max' has no neurokern kernel)"
        )
    return dict(density=fusion_bench_density(threshold), ties="keep_floor", trim_scope="global",
                elect_on="unweighted", zero_sign="model_majority", consensus="sum",
                normalize=MERGE_FUNCS[merge_func])


class _Merge(BaseAlgorithm):
    """What the training-free algorithms share: models from the pool, the result into a model."""

    def _into(self, pretrained: nn.Module, merged: Mapping[str, Tensor]) -> nn.Module:
        """The pre-trained model with the merged tensors (FusionBench's algorithms load them into the
        pool's `_pretrained_` model; inplace=False loads them into a copy)."""
        model = pretrained if self.inplace else copy.deepcopy(pretrained)
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        with torch.no_grad():
            for name, value in merged.items():
                tensors[name].copy_(value)
        return model


def _state(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    state = model.state_dict()
    return {n: state[n] for n in names}


@auto_register_config
class TaskArithmetic(_Merge):
    """θ0 + scaling_factor · Σ_t τ_t (FusionBench's TaskArithmeticAlgorithm) with nk.merge's
    task_arithmetic: one weighted-sum kernel call over the model."""

    def __init__(self, scaling_factor: float, inplace: bool = True, device: Optional[str] = None, **kwargs: Any):
        super().__init__(**kwargs)

    @torch.no_grad()
    def run(self, modelpool: Union[BaseModelPool, Mapping[str, nn.Module]]) -> nn.Module:
        pretrained, _, finetuned = load_models(as_modelpool(modelpool))
        merged = merge(pretrained, finetuned, method="task_arithmetic", scale=self.scaling_factor, device=self.device)
        return self._into(pretrained, merged)


@auto_register_config
class TiesMerging(_Merge):
    """FusionBench's TiesMergingAlgorithm (same parameters, same result) on neurokern's TIES kernels:
    θ0 + scaling_factor · ties(τ) over every tensor but `remove_keys` (those keep the pre-trained
    values), with ties_options(threshold, merge_func)."""

    def __init__(self, scaling_factor: float, threshold: float, remove_keys: Sequence[str] = (),
                 merge_func: str = "sum", inplace: bool = True, device: Optional[str] = None, **kwargs: Any):
        super().__init__(**kwargs)

    @torch.no_grad()
    def run(self, modelpool: Union[BaseModelPool, Mapping[str, nn.Module]]) -> nn.Module:
        options = ties_options(self.threshold, self.merge_func)
        pretrained, _, finetuned = load_models(as_modelpool(modelpool))
        state = pretrained.state_dict()
        removed = set(_unknown_keys(state, self.remove_keys, "TiesMerging"))
        names = [n for n in state if n not in removed]
        merged = merge(_state(pretrained, names), [_state(m, names) for m in finetuned], method="ties",
                       scale=self.scaling_factor, device=self.device, **options)
        return self._into(pretrained, merged)


def _dropped_parameters(model: nn.Module, sparsity_ratio: Any, only_on_linear_weights: bool, where: str) -> list[str]:
    """The parameters DARE drops entries of: all, or the nn.Linear weights only."""
    if isinstance(sparsity_ratio, bool) or not isinstance(sparsity_ratio, (int, float)) or not 0 <= sparsity_ratio < 1:
        raise NeurokernError(f"{where}: sparsity_ratio must be in [0, 1); got {sparsity_ratio!r}")
    params = [n for n, _ in model.named_parameters()]
    if not only_on_linear_weights:
        return params
    linear = {f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return [n for n in params if n in linear]


def _unknown_keys(state: Mapping[str, Tensor], remove_keys: Sequence[str], where: str) -> list[str]:
    """remove_keys, checked: each names a tensor of the model."""
    unknown = [k for k in remove_keys if k not in state]
    if unknown:
        raise NeurokernError(f"{where}: remove_keys names tensors the model does not have: {unknown}")
    return list(remove_keys)


@auto_register_config
class DareTaskArithmetic(_Merge):
    """FusionBench's DareTaskArithmetic: θ0 + scaling_factor · Σ_t drop(τ_t) over the parameters
    (buffers keep the pre-trained values), each entry of τ_t kept with probability
    1 − sparsity_ratio and, with rescale, divided by it; only_on_linear_weights drops entries of
    the nn.Linear weights only. The masks come from neurokern's counter-based generator keyed by
    (seed, tensor name, model index), not from torch's global generator as FusionBench's do."""

    def __init__(self, scaling_factor: float, sparsity_ratio: float, only_on_linear_weights: bool = False,
                 rescale: bool = True, seed: int = 0, inplace: bool = True, device: Optional[str] = None,
                 **kwargs: Any):
        super().__init__(**kwargs)

    @torch.no_grad()
    def run(self, modelpool: Union[BaseModelPool, Mapping[str, nn.Module]]) -> nn.Module:
        pretrained, _, finetuned = load_models(as_modelpool(modelpool))
        dropped = _dropped_parameters(pretrained, self.sparsity_ratio, self.only_on_linear_weights, "DareTaskArithmetic")
        kept = [n for n, _ in pretrained.named_parameters() if n not in dropped]
        merged = {}
        if dropped:
            merged.update(merge(_state(pretrained, dropped), [_state(m, dropped) for m in finetuned], method="dare",
                                density=1 - self.sparsity_ratio, rescale="density" if self.rescale else None,
                                seed=self.seed, scale=self.scaling_factor, device=self.device))
        if kept:
            merged.update(merge(_state(pretrained, kept), [_state(m, kept) for m in finetuned],
                                method="task_arithmetic", scale=self.scaling_factor, device=self.device))
        return self._into(pretrained, merged)


@auto_register_config
class DareTiesMerging(_Merge):
    """FusionBench's DareTiesMerging: each task vector's parameters dropped and rescaled as in
    DareTaskArithmetic, then FusionBench's TIES (TiesMerging's parameters) on the dropped models.
    Each task's drop is nk.merge's "dare" with weight 1 on that task alone, so its mask is the one the
    task gets in a DARE merge of the whole pool."""

    def __init__(self, sparsity_ratio: float, only_on_linear_weights: bool, rescale: bool, scaling_factor: float,
                 threshold: float, remove_keys: Sequence[str] = (), merge_func: str = "sum", seed: int = 0,
                 inplace: bool = True, device: Optional[str] = None, **kwargs: Any):
        super().__init__(**kwargs)

    @torch.no_grad()
    def run(self, modelpool: Union[BaseModelPool, Mapping[str, nn.Module]]) -> nn.Module:
        options = ties_options(self.threshold, self.merge_func)
        pretrained, _, finetuned = load_models(as_modelpool(modelpool))
        dropped = _dropped_parameters(pretrained, self.sparsity_ratio, self.only_on_linear_weights, "DareTiesMerging")
        base_state = pretrained.state_dict()
        removed = set(_unknown_keys(base_state, self.remove_keys, "DareTiesMerging"))
        names = [n for n in base_state if n not in removed]
        finetuned_states = [m.state_dict() for m in finetuned]
        for t, state in enumerate(finetuned_states):
            one_hot = [1.0 if s == t else 0.0 for s in range(len(finetuned))]
            state.update(merge(_state(pretrained, dropped), [_state(m, dropped) for m in finetuned], method="dare",
                               weights=one_hot, density=1 - self.sparsity_ratio, seed=self.seed,
                               rescale="density" if self.rescale else None, device=self.device))
        merged = merge({n: base_state[n] for n in names}, [{n: s[n] for n in names} for s in finetuned_states],
                       method="ties", scale=self.scaling_factor, device=self.device, **options)
        return self._into(pretrained, merged)


@auto_register_config
class NeuroMerging(_Merge):
    """NeuroMerging (Fang et al. 2025) with nk.merge's parameters (README, "Methods")."""

    def __init__(self, density: Union[float, Sequence[float]] = 0.1, scale: Optional[float] = None,
                 scale_parallel: float = 0.0, trim_scope: str = "global", parallel_basis: str = "unit",
                 gamma: float = 1.0, inplace: bool = True, device: Optional[str] = None, **kwargs: Any):
        super().__init__(**kwargs)

    @torch.no_grad()
    def run(self, modelpool: Union[BaseModelPool, Mapping[str, nn.Module]]) -> nn.Module:
        pretrained, _, finetuned = load_models(as_modelpool(modelpool))
        density = list(self.density) if isinstance(self.density, Sequence) else self.density
        merged = merge(pretrained, finetuned, method="neuromerging", density=density, scale=self.scale,
                       scale_parallel=self.scale_parallel, trim_scope=self.trim_scope,
                       parallel_basis=self.parallel_basis, gamma=self.gamma, device=self.device)
        return self._into(pretrained, merged)


def task_inputs(pool: BaseModelPool, tasks: list[str]) -> dict[str, Any]:
    """Each task's unlabelled inputs, where FusionBench's AdaMerging takes them: the pool's test
    dataset of the task's name (`modelpool.load_test_dataset(task)`; an item is an input, or a
    tuple whose first entry is one, and labels are never read)."""
    have = set(pool.test_dataset_names) if pool.has_test_dataset else set()
    missing = [t for t in tasks if t not in have]
    if missing:
        raise NeurokernError(
            f"the modelpool has no test dataset for task(s) {missing}: test-time merging learns from each task's "
            "unlabelled inputs, taken (as FusionBench's AdaMerging takes them) from the modelpool's "
            "`test_datasets`, one entry per fine-tuned model's name"
        )
    return {t: pool.load_test_dataset(t) for t in tasks}


def _tinted(pool: BaseModelPool, tint_layers: Sequence[str], heads: Sequence[str], coefficients: str,
            prior: float, device: Optional[str]) -> tuple[TintedModel, nn.Module, dict[str, Any]]:
    pretrained, tasks, finetuned = load_models(pool)
    inputs = task_inputs(pool, tasks)
    if device is not None:  # the module runs where the merged weights are (FusionBench's fabric.setup moves it too)
        pretrained, finetuned = pretrained.to(device), [m.to(device) for m in finetuned]
    model = TintedModel(pretrained, None, dict(zip(tasks, finetuned)), tint_layers=list(tint_layers),
                        heads=list(heads), coefficients=coefficients, prior=prior, device=device)
    return model, pretrained, inputs


@auto_register_config
class AdaMerging(BaseAlgorithm):
    """AdaMerging (Yang et al. 2024), layer- or task-wise, as FusionBench's LayerWiseAdaMerging runs
    it: λ starts at init_values; each of max_steps Adam steps (lr) minimises the summed entropy of
    the merged model's predictions on one batch (batch_size) of every task's unlabelled test inputs.
    neurokern computes θ(λ) with its weighted-sum kernel and λ's gradient with the fused reduction
    (README, "Model Tinting and AdaMerging"), and keeps λ in [0, 1] (FusionBench's clamp_weights).

    Returns the pool's `_pretrained_` model with θ(λ*) loaded (FusionBench's merge_and_unload). With
    `heads` (per-task layers kept at each task's fine-tuned weights, never merged) there is no single
    model: it returns the neurokern.tint.TintedModel, run as model(x, task=name)."""

    def __init__(self, granularity: str = "layer", init_values: float = 0.3, lr: float = 1e-3,
                 max_steps: int = 1000, batch_size: int = 16, heads: Sequence[str] = (), seed: int = 0,
                 device: Optional[str] = None, progress: bool = False, **kwargs: Any):
        super().__init__(**kwargs)

    def run(self, modelpool: Union[BaseModelPool, Mapping[str, nn.Module]]) -> nn.Module:
        if self.granularity not in ("layer", "task"):
            raise NeurokernError(f"AdaMerging: granularity must be 'layer' or 'task'; got {self.granularity!r}")
        model, pretrained, inputs = _tinted(as_modelpool(modelpool), (), self.heads, self.granularity,
                                            self.init_values, self.device)
        self.history = fit(model, inputs, loss="entropy", steps=self.max_steps, lr=self.lr, batch_size=self.batch_size,
                           seed=self.seed, schedule="joint", progress=self.progress)
        if len(model.layers):
            return model
        with torch.no_grad():
            for name, value in model.shared_parameters().items():
                pretrained.get_parameter(name).copy_(value)
        return pretrained


@auto_register_config
class ModelTinting(BaseAlgorithm):
    """Model Tinting (Jung et al. 2024): AdaMerging's λ plus a trainable copy of `tint_layers` per
    task, fitted with neurokern.tint.fit (loss "pseudo": cross-entropy against each fine-tuned
    model's argmax) on the pool's unlabelled test inputs. Returns the neurokern.tint.TintedModel
    (model(x, task=name), or model(x, task_ids) for a batch that mixes tasks)."""

    def __init__(self, tint_layers: Sequence[str], heads: Sequence[str] = (), coefficients: str = "layer",
                 init_values: float = 0.3, lr: float = 1e-2, lr_lambda: Optional[float] = None, max_steps: int = 500,
                 batch_size: int = 32, loss: str = "pseudo", seed: int = 0, device: Optional[str] = None,
                 progress: bool = False, **kwargs: Any):
        super().__init__(**kwargs)

    def run(self, modelpool: Union[BaseModelPool, Mapping[str, nn.Module]]) -> TintedModel:
        model, _, inputs = _tinted(as_modelpool(modelpool), self.tint_layers, self.heads, self.coefficients,
                                   self.init_values, self.device)
        self.history = fit(model, inputs, loss=self.loss, steps=self.max_steps, lr=self.lr, lr_lambda=self.lr_lambda,
                           batch_size=self.batch_size, seed=self.seed, progress=self.progress)
        return model
