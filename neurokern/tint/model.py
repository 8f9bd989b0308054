"""TintedModel: a merged model with learnable merging coefficients (AdaMerging) and per-task
layers (Model Tinting), served to batches that mix tasks.

    model = TintedModel(net, base, [ft_a, ft_b], tint_layers=["head"], coefficients="layer")
    y = model(x, task=0)                 # one task for the whole batch
    y = model(x, task_ids)               # task_ids [B]: each row runs its own task's tint

The shared weights theta(lambda)_p = theta0_p + sum_t lambda_{p,t} tau_{t,p} are formed by the
`weighted_sum` op (autograd to lambda; lambda clamped to [0, 1], the pre-trained weight keeps
coefficient 1) and the wrapped module runs on them through torch.func.functional_call. Parameters
of the same shape and dtype (the 12 copies of a transformer block's q projection, say) are stored
stacked, so one step costs one weighted_sum per distinct shape with per-row coefficients, not one
per tensor and never a Python sum over tasks.
"""
import math
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from neurokern.errors import NeurokernError
from neurokern.ops import magnitude_threshold, weighted_sum
from neurokern.tint._names import Patterns, match_modules, model_state, task_models
from neurokern.tint.routing import Route, TaskLayer

COEFFICIENTS = ("layer", "task")
TINT_INIT = ("merged", "finetuned")
_MERGEABLE = (torch.float32, torch.bfloat16, torch.float16)


class _Store(nn.Module):
    """Non-persistent buffers (theta0 and the fine-tuned tensors, stacked by shape group): they move
    with .to() / .cuda() but stay out of state_dict (save() writes the merged result instead)."""


class TintedModel(nn.Module):
    """A merged model with learnable coefficients and per-task layers.

    module: the architecture (any nn.Module); it supplies the code and its buffers. Its own
        parameters are not used; base=None takes them as the pre-trained weights (no copy).
    base, finetuned: the pre-trained model and one fine-tuned model per task (state dicts or
        nn.Modules with module's parameter names); finetuned may be a dict task name -> model.
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
        self._inputs: Optional[tuple] = None  # _merge_inputs()
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
        self.tasks, models = task_models(finetuned, task_names)
        T = len(models)
        self.coefficients = coefficients
        self.prior = float(prior)
        self.pad_value = float(pad_value)
        self.module = module
        tints = match_modules(module, tint_layers, "tint_layers")
        head_names = match_modules(module, heads, "heads")
        self.tint_layers = tints  # trainable per-task layers
        self.heads = [h for h in head_names if h not in tints]  # frozen per-task layers
        layer_names = [n for n, _ in module.named_modules() if n in tints or n in head_names]
        for a in layer_names:
            for b in layer_names:
                if b.startswith(a + "."):
                    raise NeurokernError(f"tint_layers / heads: module {b!r} lies inside {a!r}; choose one of them")

        names = [n for n, _ in module.named_parameters()]
        if device is None:
            first = next(iter(module.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        device = torch.device(device)
        base_sd = {n: p.detach() for n, p in module.named_parameters()} if base is None else model_state(base, "base")
        ft_sds = [model_state(m, f"finetuned[{self.tasks[t]!r}]") for t, m in enumerate(models)]

        def owner(name: str) -> Optional[str]:
            for layer in layer_names:
                if name.startswith(layer + "."):
                    return layer
            return None

        merged = [n for n in names if owner(n) is None]
        self._check_tensors(merged, base_sd, ft_sds)
        self._merged_names = merged

        # Shape groups: tensors of one shape and dtype stacked, merged by one weighted_sum call.
        groups: dict[tuple, list[int]] = {}
        for i, n in enumerate(merged):
            groups.setdefault((tuple(base_sd[n].shape), base_sd[n].dtype), []).append(i)
        self._groups = list(groups.values())
        # Layer-wise lambda is per row of a group's stack; a group of few, long tensors is merged as
        # G * k rows (each tensor's coefficients repeated k times), since weighted_sum's per-row
        # backward runs one program per row.
        self._splits = [
            _row_split(len(idx), base_sd[merged[idx[0]]].numel()) if coefficients == "layer" else 1
            for idx in self._groups
        ]
        self._store = _Store()
        for g, idx in enumerate(self._groups):
            dtype = base_sd[merged[idx[0]]].dtype
            self._store.register_buffer(f"base{g}", _stack([base_sd[merged[i]] for i in idx], device, dtype), persistent=False)
            for t in range(T):
                self._store.register_buffer(
                    f"ft{g}_{t}", _stack([ft_sds[t][merged[i]] for i in idx], device, dtype), persistent=False
                )
            # lambda's row of each of the G * k rows of the group.
            rows = torch.tensor(idx, dtype=torch.long).repeat_interleave(self._splits[g])
            self._store.register_buffer(f"rows{g}", rows.to(device), persistent=False)
        self._trim_density = None if trim is None else float(trim)
        self._offsets = [0] * len(self._groups)
        if trim is not None and self._groups:
            self._set_trim(float(trim))

        shape = (len(merged), T) if coefficients == "layer" else (T,)
        self.lambdas = nn.Parameter(torch.full(shape, self.prior, dtype=torch.float32, device=device))

        # Per-task layers, and their fine-tuned weights (the teachers' layers).
        self.layers = nn.ModuleDict()
        self._ft_layers = _Store()
        self._loaded = False
        self._buffer_names: list[str] = []
        for layer in layer_names:
            inner = module.get_submodule(layer)
            local = [n for n, _ in inner.named_parameters()]
            per_task = []
            for t in range(T):
                per_task.append({})
                for n in local:
                    full = f"{layer}.{n}"
                    if full not in ft_sds[t]:
                        raise NeurokernError(
                            f"finetuned[{self.tasks[t]!r}] has no tensor {full!r} (of tint layer / head {layer!r})"
                        )
            shapes_equal = all(ft_sds[t][f"{layer}.{n}"].shape == ft_sds[0][f"{layer}.{n}"].shape
                               for t in range(T) for n in local)
            is_head = layer in head_names
            from_merged = tint_init == "merged" and not is_head and shapes_equal and all(
                f"{layer}.{n}" in base_sd and base_sd[f"{layer}.{n}"].shape == ft_sds[0][f"{layer}.{n}"].shape
                for n in local
            )
            for n in local:
                full = f"{layer}.{n}"
                if from_merged:
                    b = base_sd[full].to(device)
                    fts = [ft_sds[t][full].to(device=device, dtype=b.dtype) for t in range(T)]
                    init = weighted_sum(b, fts, torch.tensor([1.0] + [self.prior] * T, device=device))
                    for t in range(T):
                        per_task[t][n] = init
                else:
                    dtype = base_sd[full].dtype if full in base_sd else ft_sds[0][full].dtype
                    for t in range(T):
                        per_task[t][n] = ft_sds[t][full].to(device=device, dtype=dtype)
                for t in range(T):
                    self._ft_layers.register_buffer(
                        f"{_layer_key(layer)}__{_layer_key(n)}__task{t}",
                        ft_sds[t][full].detach().to(device), persistent=False,
                    )
            trainable = layer in tints
            self.layers[_layer_key(layer)] = TaskLayer(layer, inner, per_task, trainable)
        self._cache: Optional[tuple[Any, dict[str, Tensor]]] = None

    # -- construction helpers ------------------------------------------------------------------

    def _check_tensors(self, merged: list[str], base: dict, finetuned: list[dict]) -> None:
        for n in merged:
            if n not in base:
                raise NeurokernError(f"base has no tensor {n!r} (a parameter of the module)")
            b = base[n]
            if b.dtype not in _MERGEABLE:
                raise NeurokernError(f"base[{n!r}] is {b.dtype}; merged parameters must be float32, bfloat16 or float16")
            for t, sd in enumerate(finetuned):
                if n not in sd:
                    raise NeurokernError(f"finetuned[{self.tasks[t]!r}] has no tensor {n!r}")
                if sd[n].shape != b.shape:
                    raise NeurokernError(
                        f"finetuned[{self.tasks[t]!r}][{n!r}] has shape {tuple(sd[n].shape)}, base has "
                        f"{tuple(b.shape)}; list per-task layers of different shapes under heads= or tint_layers="
                    )

    def _set_trim(self, density: float) -> None:
        self._inputs = None
        T = self.num_tasks
        bases = [self._store.get_buffer(f"base{g}") for g in range(len(self._groups))]
        fts = [self._store.get_buffer(f"ft{g}_{t}") for t in range(T) for g in range(len(self._groups))]
        total = sum(b.numel() for b in bases)
        k = [max(1, math.ceil(density * total))] * T
        thr, lim = magnitude_threshold(bases, fts, k)
        self._store.register_buffer("threshold", thr, persistent=False)
        self._store.register_buffer("tie_limit", lim, persistent=False)
        offsets, off = [], 0
        for b in bases:
            offsets.append(off)
            off += b.numel()
        self._offsets = offsets

    # -- properties ------------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def layer_names(self) -> list[str]:
        """Every per-task layer (tints, then heads), in module order."""
        return [layer.name for layer in self.layers.values()]

    @property
    def merged_names(self) -> list[str]:
        """Names of the parameters merged with lambda (all but the per-task layers), lambda's rows."""
        return list(self._merged_names)

    def coefficients_now(self) -> Tensor:
        """lambda as used in the forward: clamped to [0, 1]; [P, T] (layer) or [T] (task)."""
        return self.lambdas.detach().clamp(0, 1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What test-time training updates: lambda (unless loaded) and every tint."""
        params = [] if self._loaded else [self.lambdas]
        for layer in self.layers.values():
            if layer.trainable:
                params += list(layer.params.values())
        return params

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

    # -- the merged weights ----------------------------------------------------------------------

    def shared_parameters(self) -> dict[str, Tensor]:
        """name -> theta(lambda) for every merged parameter (differentiable w.r.t. lambda when grad
        is enabled). Without grad the result is cached until lambda changes."""
        if self._loaded:
            return {n: self._store.get_buffer("shared__" + _layer_key(n)) for n in self._merged_names}
        grad = torch.is_grad_enabled() and self.lambdas.requires_grad
        key = (self.lambdas._version, self.lambdas.device, self.lambdas.data_ptr())
        if not grad and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        out = self._merge()
        if grad:
            self._cache = None
        else:
            self._cache = (key, out)
        return out

    def clear_cache(self) -> None:
        """Drop the merged weights kept for inference (they are rebuilt on the next forward)."""
        self._cache = None

    def _merge(self) -> dict[str, Tensor]:
        lam = self.lambdas.float().clamp(0, 1)  # a lambda outside [0, 1] gets no gradient
        groups, trim = self._merge_inputs()
        if self.coefficients == "layer":
            full = torch.cat([torch.ones_like(lam[:, :1]), lam], 1).t()  # [T + 1, P]
            coeffs = [full.index_select(1, rows) for *_, rows in groups]  # [T + 1, G * k]
        else:
            coeffs = [torch.cat([torch.ones_like(lam[:1]), lam])] * len(groups)  # [T + 1]: per tensor
        merged = _MergeGroups.apply(groups, trim, *coeffs) if groups else ()
        out: dict[str, Tensor] = {}
        for idx, tensor in zip(self._groups, merged):
            for i, t in zip(idx, tensor.unbind(0)):
                out[self._merged_names[i]] = t
        # The module's parameter order.
        return {n: out[n] for n in self._merged_names}

    def _merge_inputs(self) -> tuple[list[tuple], Optional[tuple[Tensor, Tensor]]]:
        """Per shape group (base, fine-tuned tensors, offset, stacked shape, lambda row of each row),
        the base and fine-tuned stacks viewed as G * k rows; and the trim. Kept until the buffers
        move (_apply)."""
        if self._inputs is None:
            store, T = self._store, self.num_tasks
            groups = []
            for g, idx in enumerate(self._groups):
                base = store.get_buffer(f"base{g}")
                fts = [store.get_buffer(f"ft{g}_{t}") for t in range(T)]
                shape, k = base.shape, self._splits[g]
                if k > 1:  # rows of G * k: enough programs for the per-row kernels (a view, no copy)
                    base, fts = base.view(len(idx) * k, -1), [f.view(len(idx) * k, -1) for f in fts]
                groups.append((base, fts, self._offsets[g], shape, store.get_buffer(f"rows{g}")))
            trim = None
            if self._trim_density is not None:
                trim = (store.get_buffer("threshold"), store.get_buffer("tie_limit"))
            self._inputs = (groups, trim)
        return self._inputs

    def _apply(self, fn, *args, **kwargs):
        self._inputs = None  # .to() / .cuda() replace the buffers
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

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
        if isinstance(x, Tensor):
            if x.dim() == 0 or x.shape[0] != ids.shape[0]:
                raise NeurokernError(
                    f"task_ids has {ids.shape[0]} entries for an input of shape {tuple(x.shape)}; give one task per row"
                )
            ids = ids.to(x.device)
        ids = ids.long()
        if ids.numel():
            bad = (ids < 0) | (ids >= self.num_tasks)
            if bool(bad.any()):
                b = int(torch.nonzero(bad)[0])
                raise NeurokernError(
                    f"task_ids[{b}] = {int(ids[b])} is out of range for {self.num_tasks} tasks "
                    f"(0..{self.num_tasks - 1})"
                )
        return Route(task_ids=ids, pad_value=self.pad_value)

    @contextmanager
    def _routing(self, route: Route) -> Iterator[None]:
        """Put the TaskLayers in the wrapped module in place of their submodules, for one call."""
        swapped = []
        try:
            for layer in self.layers.values():
                parent_name, _, child = layer.name.rpartition(".")
                parent = self.module.get_submodule(parent_name) if parent_name else self.module
                swapped.append((parent, child, parent._modules[child]))
                parent._modules[child] = layer
                layer.route, layer.called = route, False
            yield
        finally:
            for parent, child, original in reversed(swapped):
                parent._modules[child] = original
            for layer in self.layers.values():
                layer.route = None

    def forward(self, x: Any, task_ids: Any = None, *args: Any, task: Any = None, **kwargs: Any) -> Any:
        """Run the merged model on x. task: one task (index or name) for the whole batch;
        task_ids: an integer tensor [B], one task per row (a batch that mixes tasks). Further
        positional and keyword arguments go to the wrapped module."""
        route = self._route(x, task_ids, task)
        params = self.shared_parameters()
        if self._loaded:  # the module buffers saved with the model
            params = {**params, **{n: self._store.get_buffer("buffer__" + _layer_key(n)) for n in self._buffer_names}}
        with self._routing(route):
            try:
                out = functional_call(self.module, params, (x, *args), kwargs)
            except AttributeError as e:
                if "'TaskLayer' object has no attribute" not in str(e):
                    raise
                missed = [layer.name for layer in self.layers.values() if not layer.called]
                raise _never_ran(missed) from e
            missed = [layer.name for layer in self.layers.values() if not layer.called]
        if missed:
            raise _never_ran(missed)
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
        """Task `task`'s fine-tuned model as a callable x -> output (the wrapped module run on the
        stored fine-tuned weights, under no_grad): fit()'s default teacher."""
        if self._loaded:
            raise NeurokernError("a loaded TintedModel holds no fine-tuned weights; pass teachers= to fit()")
        t = self.task_index(task)
        store = self._store
        params: dict[str, Tensor] = {}
        for g, idx in enumerate(self._groups):
            for i, tensor in zip(idx, store.get_buffer(f"ft{g}_{t}").unbind(0)):
                params[self._merged_names[i]] = tensor
        for layer in self.layers.values():
            for n in layer.param_names:
                params[f"{layer.name}.{n}"] = self._ft_layers.get_buffer(f"{_layer_key(layer.name)}__{_layer_key(n)}__task{t}")

        def run(x: Any, *args: Any, **kwargs: Any) -> Any:
            with torch.no_grad():
                return functional_call(self.module, params, (x, *args), kwargs)

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


class _MergeGroups(torch.autograd.Function):
    """Every shape group's weighted_sum in one autograd node: forward runs the weighted_sum op per
    group, backward its weighted_sum_backward op per group (dL/dcoeffs = <dL/dtheta, tau_t> per
    row). The same computation as the op's own autograd, called group by group; one node instead
    of one per group keeps the per-step host work small (torch.library's Python autograd wrapper
    costs more per call than the launches it wraps)."""

    @staticmethod
    def forward(ctx, groups, trim, *coeffs):
        threshold, tie_limit = (None, None) if trim is None else trim
        ctx.groups, ctx.threshold, ctx.tie_limit = groups, threshold, tie_limit
        ctx.save_for_backward(*coeffs)
        outs = []
        for (base, fts, offset, shape, _), c in zip(groups, coeffs):
            merged = torch.ops.neurokern.weighted_sum.default(base, fts, c, threshold, tie_limit, offset, None)
            outs.append(merged.view(shape))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        coeffs = ctx.saved_tensors
        out = []
        for (base, fts, offset, _, _), c, grad in zip(ctx.groups, coeffs, grads):
            if grad is None or not ctx.needs_input_grad[2 + len(out)]:
                out.append(None)
                continue
            grad = grad.contiguous().view(base.shape)
            out.append(torch.ops.neurokern.weighted_sum_backward.default(
                grad, base, fts, c, ctx.threshold, ctx.tie_limit, offset))
        return (None, None, *out)


def _never_ran(names: list[str]) -> NeurokernError:
    return NeurokernError(
        f"tint layer(s) {names} never ran as modules in the forward: their parent reads their parameters "
        "directly (as nn.MultiheadAttention does with out_proj); choose layers that are called as modules"
    )


def _row_split(tensors: int, numel: int, rows: int = 1024, min_row: int = 4096) -> int:
    """k (a power of two dividing numel) so that tensors * k >= rows, keeping rows of >= min_row
    elements; 1 when the group already has enough rows or its tensors are short."""
    k = 1
    while tensors * k < rows and numel % (2 * k) == 0 and numel // (2 * k) >= min_row:
        k *= 2
    return k


def _layer_key(name: str) -> str:
    return name.replace(".", "__")


def _stack(tensors: list[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.stack([t.detach().to(device=device, dtype=dtype) for t in tensors])


def _init_loaded(
    model: TintedModel,
    module: nn.Module,
    meta: dict,
    shared: dict[str, Tensor],
    buffers: dict[str, Tensor],
    per_task: list[dict[str, Tensor]],
    device: torch.device,
) -> None:
    """Fill a bare TintedModel (nn.Module.__init__ only) from saved parts: the shared weights and
    module buffers fixed, the per-task layers as saved, lambda kept for reference (frozen)."""
    model.tasks = list(meta["tasks"])
    model.coefficients = meta["coefficients"]
    model.prior = float(meta["prior"])
    model.pad_value = float(meta.get("pad_value", float("-inf")))
    model.module = module
    model.tint_layers = list(meta["tint_layers"])
    model.heads = list(meta["heads"])
    params = [n for n, _ in module.named_parameters()]
    owned = tuple(f"{n}." for n in model.tint_layers + model.heads)
    model._merged_names = [n for n in params if not n.startswith(owned)]
    missing = [n for n in model._merged_names if n not in shared]
    if missing:
        raise NeurokernError(f"the saved shared weights lack {missing[:5]} of the module's parameters; wrong module?")
    model._groups, model._offsets, model._splits, model._trim_density = [], [], [], None
    model._store = _Store()
    for n in model._merged_names:
        model._store.register_buffer("shared__" + _layer_key(n), shared[n].to(device), persistent=False)
    model._buffer_names = list(buffers)
    for n, b in buffers.items():
        model._store.register_buffer("buffer__" + _layer_key(n), b.to(device), persistent=False)
    lam = torch.tensor(meta["lambdas"], dtype=torch.float32, device=device) if meta.get("lambdas") is not None else torch.zeros(0)
    model.lambdas = nn.Parameter(lam, requires_grad=False)
    model.layers = nn.ModuleDict()
    model._ft_layers = _Store()
    model._loaded = True
    model._cache = None
    model._inputs = None
    names = [n for n, _ in module.named_modules() if n in model.tint_layers or n in model.heads]
    for layer in names:
        inner = module.get_submodule(layer)
        local = [n for n, _ in inner.named_parameters()]
        states = []
        for t, sd in enumerate(per_task):
            missing = [f"{layer}.{n}" for n in local if f"{layer}.{n}" not in sd]
            if missing:
                raise NeurokernError(f"the saved tint of task {model.tasks[t]!r} lacks {missing}")
            states.append({n: sd[f"{layer}.{n}"].to(device) for n in local})
        model.layers[_layer_key(layer)] = TaskLayer(layer, inner, states, layer in model.tint_layers)
