"""TintedModel: a merged model with learnable merging coefficients (AdaMerging) and per-task
layers (Model Tinting), served to batches that mix tasks.

    model = TintedModel(net, base, [ft_a, ft_b], tint_layers=["head"], coefficients="layer")
    y = model(x, task=0)                 # one task for the whole batch
    y = model(x, task_ids)               # task_ids [B]: each row runs its own task's tint

What it holds:
    lambdas  the merging coefficients (an nn.Parameter: [P, T] layer-wise or [T] task-wise);
    merged   the shared weights theta(lambda) of the P parameters outside the per-task layers
             (neurokern.tint.merged: TrainableMerge from the pre-trained and fine-tuned weights, or
             FrozenMerge, fixed, for a model TintedModel.load restored);
    layers   one TaskLayer per tint or head: every task's copy of that layer's parameters;
    module   the TintedModel's own copy of the wrapped module (neurokern.tint.routing says how
             its per-task layers run).

A forward routes the batch (a Route: one task, or the rows sorted by task once for every layer),
puts theta(lambda) into the module's parameter slots for the call (Slots: what
torch.func.functional_call does, with the names resolved once at construction) and runs the module.
"""
import copy
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from neurokern import params as checks
from neurokern.errors import NeurokernError
from neurokern.ops import STORAGE_DTYPES, nonfinite_later, to_device, weighted_sum
from neurokern.tint._names import Patterns, Slots, match_modules, model_state, task_models
from neurokern.tint.merged import MergedWeights, TrainableMerge
from neurokern.tint.routing import Route, Routing, TaskLayer

COEFFICIENTS = ("layer", "task")
TINT_INIT = ("merged", "finetuned")


class TintedModel(nn.Module):
    """A merged model with learnable coefficients and per-task layers.

    module: the architecture (any nn.Module); it supplies the code and its buffers. Its own
        parameters are not used; base=None takes them as the pre-trained weights (no copy). The
        TintedModel runs a copy of it (its Python objects copied, its parameters and buffers
        shared), in which each per-task layer's forward is replaced by one that routes rows by
        task: `module` itself is left as it was, and several TintedModels may wrap one module.
    base, finetuned: the pre-trained model and one fine-tuned model per task (state dicts or
        nn.Modules with module's parameter names); finetuned may be a dict task name -> model.
        (TintedModel.load passes the saved shared weights, a FrozenMerge, as base and each task's
        saved tints and heads as finetuned.)
    tint_layers: module names or glob patterns ("layers.*.fc1"); each task gets its own trainable
        copy of these layers (its tint), which is not merged with lambda. A tint starts at the
        merged layer theta(prior) (tint_init="merged", the default) or at the task's own
        fine-tuned layer (tint_init="finetuned", and always when the tasks' copies differ in shape).
    heads: module names or patterns of per-task layers kept frozen at each task's fine-tuned
        weights and never merged: the per-task classification heads of the reference code (tasks
        may have different numbers of classes). A layer in both lists is a tint initialised from
        the fine-tuned heads (the reference's default tint).
    coefficients: "layer" (one lambda per parameter tensor per task, AdaMerging layer-wise) or
        "task" (one lambda per task shared by every tensor, task-wise).
    prior: the initial lambda (0.3 in the reference). trim: None, or a density in (0, 1]: task
        vectors keep their top `trim` fraction of entries by magnitude per task, over all merged
        tensors (AdaMerging++).

    Training: lambdas and tint_parameters() (every task's tints, each its own nn.Parameter). With
    lambdas.requires_grad_(False) the shared weights are computed once and reused (no gradient
    to lambda, no weighted_sum backward) while the tints keep training.

    torch.compile(model) traces the forward: it writes the shared weights into the parameter dicts
    of its module copy as functional_call does, and a per-task layer's forward is an attribute of
    that layer object; the task-id check of a mixed batch (a host read) breaks the graph.
    """

    def __init__(
        self,
        module: nn.Module,
        base: Any = None,
        finetuned: Union[Sequence[Any], dict] = (),
        tint_layers: Patterns = (),
        coefficients: str = "layer",
        prior: float = 0.3,
        *,
        heads: Patterns = (),
        tint_init: str = "merged",
        trim: Optional[float] = None,
        task_names: Optional[Sequence[str]] = None,
        device: Optional[Union[str, torch.device]] = None,
        pad_value: float = float("-inf"),
    ):
        super().__init__()
        _check_options(module, coefficients, prior, tint_init, trim)
        self.tasks, models = task_models(finetuned, task_names)
        self.coefficients = coefficients
        self.prior = float(prior)
        self.pad_value = float(pad_value)
        tints = match_modules(module, tint_layers, "tint_layers")
        head_names = match_modules(module, heads, "heads")
        self.tint_layers = tints  # trainable per-task layers
        self.heads = [h for h in head_names if h not in tints]  # frozen per-task layers
        layer_names = per_task_layers(module, tints + head_names)
        names = shared_names(module, layer_names)
        device = module_device(module, device)
        states = [model_state(m, f"finetuned[{name!r}]") for name, m in zip(self.tasks, models)]
        layer_params = {layer: [n for n, _ in module.get_submodule(layer).named_parameters()] for layer in layer_names}
        self._check_layer_tensors(layer_params, states)
        per_task_names = [f"{layer}.{n}" for layer, local in layer_params.items() for n in local]

        if isinstance(base, MergedWeights):
            if base.names != names:
                raise NeurokernError("the merged weights given as base hold other tensors than the module's shared parameters")
            base_state = None
            self.merged = base
        else:
            base_state = {n: p.detach() for n, p in module.named_parameters()} if base is None else model_state(base, "base")
            self._check_tensors(names, base_state, states)
            self._check_finite([(f"base[{n!r}]", base_state[n]) for n in names])
            self.merged = TrainableMerge(names, base_state, states, per_task_names, coefficients, trim, device)
        self._check_finite([(f"finetuned[{task!r}][{n!r}]", sd[n]) for task, sd in zip(self.tasks, states)
                            for n in (names if base_state is not None else []) + per_task_names])
        self.lambdas = nn.Parameter(self.merged.initial_lambdas(self.prior), requires_grad=self.merged.trainable)

        self.module = _copy_sharing_tensors(module)
        saved_buffers = self.merged.module_buffers()
        if saved_buffers:
            Slots(self.module, list(saved_buffers), buffers=True).put(list(saved_buffers.values()))
        self._routing = Routing()
        self.layers = nn.ModuleDict()
        for layer in layer_names:
            from_merged = tint_init == "merged" and layer not in head_names
            per_task = self._task_copies(layer, layer_params[layer], states, base_state, from_merged, device)
            self.layers[_key(layer)] = TaskLayer(layer, self.module.get_submodule(layer), per_task,
                                                 layer in tints, self._routing)
        self._shared_slots = Slots(self.module, names)

    # -- construction helpers ------------------------------------------------------------------

    def _check_tensors(self, names: list[str], base: dict, finetuned: list[dict]) -> None:
        for n in names:
            if n not in base:
                raise NeurokernError(f"base has no tensor {n!r} (a parameter of the module)")
            b = base[n]
            if b.dtype not in STORAGE_DTYPES:
                raise NeurokernError(f"base[{n!r}] is {b.dtype}; merged parameters must be float32, bfloat16 or float16")
            for t, sd in enumerate(finetuned):
                if n not in sd:
                    raise NeurokernError(f"finetuned[{self.tasks[t]!r}] has no tensor {n!r}")
                if sd[n].shape != b.shape:
                    raise NeurokernError(
                        f"finetuned[{self.tasks[t]!r}][{n!r}] has shape {tuple(sd[n].shape)}, base has "
                        f"{tuple(b.shape)}; list per-task layers of different shapes under heads= or tint_layers="
                    )

    @staticmethod
    def _check_finite(tensors: list[tuple[str, Tensor]]) -> None:
        """NaN / Inf in a tensor the model is built from is an error naming it (the first in the
        given order): one read of each floating-point tensor (ops.nonfinite_later)."""
        floating = [(label, t) for label, t in tensors if t.is_floating_point()]
        bad = nonfinite_later([t for _, t in floating])()
        if bad:
            raise NeurokernError(f"{floating[bad[0]][0]} has non-finite values (NaN or Inf)")

    def _check_layer_tensors(self, layer_params: dict[str, list[str]], finetuned: list[dict]) -> None:
        for layer, local in layer_params.items():
            for t, sd in enumerate(finetuned):
                for n in local:
                    if f"{layer}.{n}" not in sd:
                        raise NeurokernError(
                            f"finetuned[{self.tasks[t]!r}] has no tensor {f'{layer}.{n}'!r} (of tint layer / head {layer!r})"
                        )

    def _task_copies(self, layer: str, local: list[str], states: list[dict], base: Optional[dict],
                     from_merged: bool, device: torch.device) -> list[dict[str, Tensor]]:
        """Each task's starting copy of per-task layer `layer` (fresh tensors): theta(prior) of the
        layer when from_merged and every copy has the base's shape, else the task's own."""
        full = [f"{layer}.{n}" for n in local]
        from_merged = from_merged and base is not None and all(
            f in base and all(sd[f].shape == base[f].shape for sd in states) for f in full
        )
        copies: list[dict[str, Tensor]] = [{} for _ in states]
        for n, f in zip(local, full):
            if from_merged:
                b = base[f].to(device)
                fts = [sd[f].to(device=device, dtype=b.dtype) for sd in states]
                merged = weighted_sum(b, fts, torch.tensor([1.0] + [self.prior] * len(states), device=device))
                for c in copies:
                    c[n] = merged.clone()
            else:
                dtype = base[f].dtype if base is not None and f in base else states[0][f].dtype
                for c, sd in zip(copies, states):
                    c[n] = sd[f].detach().to(device=device, dtype=dtype, copy=True)
        return copies

    # -- properties ------------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def layer_names(self) -> list[str]:
        """Every per-task layer (tints and heads), in module order."""
        return [layer.name for layer in self.layers.values()]

    @property
    def merged_names(self) -> list[str]:
        """Names of the parameters merged with lambda (all but the per-task layers), lambda's rows."""
        return list(self.merged.names)

    def coefficients_now(self) -> Tensor:
        """lambda as used in the forward: clamped to [0, 1]; [P, T] (layer) or [T] (task)."""
        return self.lambdas.detach().clamp(0, 1)

    def tint_parameters(self) -> list[nn.Parameter]:
        """Every task's tints: one nn.Parameter per task and tensor of each tint layer."""
        return [p for layer in self.layers.values() if layer.trainable for p in layer.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What test-time training updates: lambda (while it requires grad; never for a loaded
        model) and every tint."""
        return ([self.lambdas] if self.lambdas.requires_grad else []) + self.tint_parameters()

    def task_index(self, task: Union[int, str]) -> int:
        if isinstance(task, str):
            if task not in self.tasks:
                raise NeurokernError(f"unknown task {task!r}; the tasks are {self.tasks}")
            return self.tasks.index(task)
        if isinstance(task, bool) or not isinstance(task, int):
            raise NeurokernError(f"task must be a task index or name; got {task!r}")
        if not 0 <= task < self.num_tasks:
            raise NeurokernError(f"task {task} is out of range for {self.num_tasks} tasks (0..{self.num_tasks - 1})")
        return task

    # -- the shared weights ----------------------------------------------------------------------

    def shared_parameters(self) -> dict[str, Tensor]:
        """name -> theta(lambda) for every merged parameter (differentiable w.r.t. lambda when grad
        is enabled and lambda requires grad). Otherwise the result is cached until lambda changes."""
        return self.merged.weights(self.lambdas)

    def clear_cache(self) -> None:
        """Drop the merged weights kept for inference (they are rebuilt on the next forward)."""
        self.merged.clear_cache()

    # -- forward -------------------------------------------------------------------------------

    def _route(self, x: Any, task_ids: Any, task: Any) -> Route:
        if isinstance(task_ids, (int, str)) and not isinstance(task_ids, bool) and task is None:
            task, task_ids = task_ids, None
        if task is not None and task_ids is not None:
            raise NeurokernError("pass either task= (one task for the batch) or task_ids (one per row), not both")
        if task is not None:
            return Route(task=self.task_index(task), pad_value=self.pad_value)
        if task_ids is None:
            if len(self.layers):
                raise NeurokernError(
                    f"this model has per-task layers ({', '.join(repr(n) for n in self.layer_names)}); pass task=<index "
                    "or name> or task_ids (an integer tensor, one task per row)"
                )
            return Route(pad_value=self.pad_value)
        ids = torch.as_tensor(task_ids)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or ids.dim() != 1:
            raise NeurokernError(f"task_ids must be a 1-D integer tensor; got {ids.dtype} of shape {tuple(ids.shape)}")
        if isinstance(x, Tensor) and (x.dim() == 0 or x.shape[0] != ids.shape[0]):
            raise NeurokernError(
                f"task_ids has {ids.shape[0]} entries for an input of shape {tuple(x.shape)}; give one task per row"
            )
        if ids.numel():
            # Where the ids are: on the host no sync at all; on a GPU one read per forward.
            bad = (ids < 0) | (ids >= self.num_tasks)
            if bool(bad.any()):
                b = int(torch.nonzero(bad)[0])
                raise NeurokernError(
                    f"task_ids[{b}] = {int(ids[b])} is out of range for {self.num_tasks} tasks "
                    f"(0..{self.num_tasks - 1})"
                )
        device = x.device if isinstance(x, Tensor) else self.lambdas.device
        return Route(task_ids=to_device(ids.long(), device), num_tasks=self.num_tasks, pad_value=self.pad_value)

    def forward(self, x: Any, task_ids: Any = None, *args: Any, task: Any = None, **kwargs: Any) -> Any:
        """Run the merged model on x. task: one task (index or name) for the whole batch;
        task_ids: an integer tensor [B], one task per row (a batch that mixes tasks). Further
        positional and keyword arguments go to the wrapped module."""
        route = self._route(x, task_ids, task)
        shared = self.merged.weights(self.lambdas)
        self._routing.current = route
        try:
            with self._shared_slots.holding(list(shared.values())):
                out = self.module(x, *args, **kwargs)
        finally:
            self._routing.current = None
        if len(route.ran) < len(self.layers):
            raise NeurokernError(
                f"tint layer(s) {[n for n in self.layer_names if n not in route.ran]} never ran as modules in the "
                "forward: their parent reads their parameters directly (as nn.MultiheadAttention does with "
                "out_proj); choose layers that are called as modules"
            )
        return out

    # -- per-task models -----------------------------------------------------------------------

    def task_state_dict(self, task: Union[int, str]) -> dict[str, Tensor]:
        """Task `task`'s whole model: the shared merged weights plus its tints and head (detached)."""
        t = self.task_index(task)
        with torch.no_grad():
            out = {n: v.detach() for n, v in self.shared_parameters().items()}
            for layer in self.layers.values():
                for n, v in layer.task_state(t).items():
                    out[f"{layer.name}.{n}"] = v.detach()
        return out

    def teacher(self, task: Union[int, str]):
        """Task `task`'s fine-tuned model as a callable x -> output (the module run on the stored
        fine-tuned weights, under no_grad): fit()'s default teacher."""
        weights = self.merged.finetuned_model(self.task_index(task))
        slots, tensors = Slots(self.module, list(weights)), list(weights.values())

        def run(x: Any, *args: Any, **kwargs: Any) -> Any:
            with torch.no_grad(), slots.holding(tensors):
                return self.module(x, *args, **kwargs)

        return run

    # -- save / load ---------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """Write the merged shared weights, every task's tint and head and a json description."""
        from neurokern.tint.io import save

        save(self, directory)

    @classmethod
    def load(cls, directory: str, module: nn.Module, device: Optional[Union[str, torch.device]] = None) -> "TintedModel":
        """Restore a saved TintedModel onto `module` (the same architecture): shared weights fixed,
        tints trainable, lambda not (the pre-trained and fine-tuned weights are not saved)."""
        from neurokern.tint.io import load

        return load(cls, directory, module, device)


def _check_options(module: Any, coefficients: Any, prior: Any, tint_init: Any, trim: Any) -> None:
    if not isinstance(module, nn.Module):
        raise NeurokernError(f"TintedModel: module must be an nn.Module; got {type(module).__name__}")
    if coefficients not in COEFFICIENTS:
        raise NeurokernError(f"TintedModel: coefficients must be 'layer' or 'task'; got {coefficients!r}")
    if tint_init not in TINT_INIT:
        raise NeurokernError(f"TintedModel: tint_init must be 'merged' or 'finetuned'; got {tint_init!r}")
    if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not 0.0 <= prior <= 1.0:
        raise NeurokernError(f"TintedModel: prior must be a number in [0, 1]; got {prior!r}")
    if trim is not None and (isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0 < trim <= 1):
        raise NeurokernError(f"TintedModel: trim must be None or a density in (0, 1]; got {trim!r}")


def per_task_layers(module: nn.Module, chosen: list[str]) -> list[str]:
    """The chosen tint and head modules, in module order; none may lie inside another."""
    names = [n for n, _ in module.named_modules() if n in chosen]
    for a in names:
        for b in names:
            if b.startswith(a + "."):
                raise NeurokernError(f"tint_layers / heads: module {b!r} lies inside {a!r}; choose one of them")
    return names


def shared_names(module: nn.Module, layer_names: list[str]) -> list[str]:
    """The parameters of `module` outside its per-task layers: the merged ones, lambda's rows."""
    owned = tuple(f"{layer}." for layer in layer_names)
    return [n for n, _ in module.named_parameters() if not n.startswith(owned)]


def module_device(module: nn.Module, device: Optional[Union[str, torch.device]]) -> torch.device:
    if device is None:
        first = next(iter(module.parameters()), None)
        return first.device if first is not None else torch.device("cpu")
    return checks.device("TintedModel", device)


def _copy_sharing_tensors(module: nn.Module) -> nn.Module:
    """A copy of `module`'s Python objects that shares its parameters and buffers (deepcopy with
    every tensor of the module in the memo)."""
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    try:
        return copy.deepcopy(module, shared)
    except Exception as e:  # whatever the module's own attributes raise
        raise NeurokernError(
            f"TintedModel runs its own copy of the module (sharing its parameters and buffers) and could not copy "
            f"{type(module).__name__}: {e}"
        ) from e


def _key(name: str) -> str:
    return name.replace(".", "__")
