"""What a merge method is (the Method record) and the helpers its run shares with the others."""
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from neurokern import ops
from neurokern import params as checks
from neurokern.errors import NeurokernError
from neurokern.models import ModelSet
from neurokern.methods.passes import Pass


def no_passes(params: Any) -> list[Pass]:
    return []


@dataclass(frozen=True)
class Method:
    """A merge method: its parameters with defaults, their checks, the merge itself, and the
    whole-model passes it needs before merging a part of a model (neurokern.methods.passes)."""

    name: str
    defaults: dict[str, Any]
    resolve: Callable[[dict[str, Any], int], Any]  # (params with defaults filled, T) -> checked params
    # (models, params, progress, pre) -> merged; pre: the passes' results by key, or None (nk.merge:
    # the method computes them from the models it is given)
    run: Callable[..., dict[str, Tensor]]
    # checked params -> new Pass objects, in the order they run (a later one sees the earlier results)
    passes: Callable[[Any], list[Pass]] = no_passes
    # T -> bytes of temporaries per element of the tensor being merged (the engine's memory plan)
    work_bytes: Callable[[int], int] = lambda num_tasks: 16
    # False: plain PyTorch, no GPU kernel of neurokern's (`neurokern warmup` skips the method)
    kernels: bool = True
    # config parameters (mergekit's keys) under which a merge launches the method's kernels where
    # the defaults launch none or a config needs more (`neurokern warmup`)
    warm_config: dict[str, Any] = field(default_factory=dict)
    # a method that is a fixed weighted sum, theta = c_0 theta_0 + sum_t c_t tau_t: checked params ->
    # [c_0, c_1, ..., c_T] (low-rank task vectors then merge as factors: integrations/peft.py)
    coefficients: Optional[Callable[[Any], list[float]]] = None

    def __post_init__(self):
        # run and passes also take PerTensor params (parameters that vary over the tensors): run
        # merges each group of tensors that share their values with those values checked once.
        object.__setattr__(self, "run", _per_tensor_run(self.run))
        object.__setattr__(self, "passes", _per_tensor_passes(self.name, self.passes))

    def params(self, given: dict[str, Any], num_tasks: int) -> Any:
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise NeurokernError(
                f"method {self.name!r}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"it takes {', '.join(sorted(self.defaults))}"
            )
        full = {**self.defaults, **given}
        if any(checks.varies(v) for v in full.values()):
            return PerTensorParams(self, full, num_tasks)
        return self.resolve(full, num_tasks)


class PerTensorParams:
    """A method's parameters where some vary over the tensors (neurokern.params.PerTensor: mergekit's
    per-layer gradients and filters). Every value a varying parameter names is checked up front
    (the method's resolve, each such value with the others at their first one), so that a bad
    value is an error before any tensor is merged; each tensor's own values are resolved when the
    tensor is merged, once per distinct combination."""

    def __init__(self, method: Method, full: dict[str, Any], num_tasks: int):
        self.method, self.full, self.num_tasks = method, full, num_tasks
        self._resolved: dict[str, Any] = {}
        self.samples = [self._resolve(values) for values in self._leaf_combinations()]

    def _leaf_combinations(self) -> list[dict[str, Any]]:
        """Value sets in which each varying value takes each of its leaves in turn."""
        slots = []  # (key, index in a per-model list or None, leaves)
        for key, value in self.full.items():
            if isinstance(value, checks.PerTensor):
                slots.append((key, None, value.leaves() or [None]))
            elif checks.varies(value):
                slots += [(key, i, v.leaves() or [None]) for i, v in enumerate(value) if isinstance(v, checks.PerTensor)]
        first = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.full.items()}
        for key, index, leaves in slots:
            if index is None:
                first[key] = leaves[0]
            else:
                first[key][index] = leaves[0]
        combos = [first]
        for key, index, leaves in slots:
            for leaf in leaves[1:]:
                values = {k: (list(v) if isinstance(v, list) else v) for k, v in first.items()}
                if index is None:
                    values[key] = leaf
                else:
                    values[key][index] = leaf
                combos.append(values)
        return combos

    def _resolve(self, values: dict[str, Any]) -> Any:
        values = {k: (self.method.defaults[k] if v is None else v) for k, v in values.items()}
        key = repr(sorted(values.items()))
        if key not in self._resolved:
            self._resolved[key] = self.method.resolve(values, self.num_tasks)
        return self._resolved[key]

    def for_tensor(self, name: str) -> Any:
        """The checked parameters of one tensor."""
        return self._resolve({k: checks.at(v, name) for k, v in self.full.items()})

    def __repr__(self) -> str:
        return f"PerTensorParams({self.method.name!r}, {self.full!r})"


def _per_tensor_run(run: Callable[..., dict[str, Tensor]]) -> Callable[..., dict[str, Tensor]]:
    def run_per_tensor(models: ModelSet, params: Any, progress: bool, pre=None) -> dict[str, Tensor]:
        if not isinstance(params, PerTensorParams):
            return run(models, params, progress, pre)
        groups: dict[int, tuple[Any, list[str]]] = {}
        for name in models.names:
            checked = params.for_tensor(name)
            groups.setdefault(id(checked), (checked, []))[1].append(name)
        out: dict[str, Tensor] = {}
        for checked, names in groups.values():
            out.update(run(models.subset(names), checked, progress, pre))
        return out
    return run_per_tensor


def _per_tensor_passes(name: str, passes: Callable[[Any], list[Pass]]) -> Callable[[Any], list[Pass]]:
    def passes_per_tensor(params: Any) -> list[Pass]:
        if not isinstance(params, PerTensorParams):
            return passes(params)
        if any(passes(sample) for sample in params.samples):
            varying = [k for k, v in params.full.items() if checks.varies(v)]
            raise NeurokernError(
                f"method {name!r}: per-layer values (gradients, filters) of {', '.join(varying)} need a whole-model "
                "pass the method runs once for the whole model (a global trim or scale); give single values, or "
                "trim_scope='tensor'"
            )
        return []
    return passes_per_tensor


def check_device(device: torch.device) -> None:
    """Raises unless the ops have kernels for tensors on `device`."""
    if device.type == "cpu":
        return
    if not torch._C._dispatch_has_kernel_for_dispatch_key("neurokern::weighted_sum", device.type.upper()):
        raise NeurokernError(
            f"neurokern has no kernels for {device.type} tensors in this build; pass device='cpu' "
            "(or build neurokern with CUDA: a CUDA build of torch plus nvcc)"
        )


# Tensors per call of a multi-tensor op: a GPU merges each batch in one launch; the bound keeps the
# progress bar moving on large models.
BATCH_ELEMENTS = 1 << 28


def batches(models: ModelSet, names: list[str], progress: bool, desc: str) -> Iterable[list[str]]:
    """Consecutive runs of names of at most BATCH_ELEMENTS elements (at least one tensor each)."""
    bar = tqdm(total=len(names), desc=desc, unit="tensor", disable=not progress, leave=False)
    batch, size = [], 0
    for name in names:
        numel = models.base[name].numel()
        if batch and size + numel > BATCH_ELEMENTS:
            yield batch
            bar.update(len(batch))
            batch, size = [], 0
        batch.append(name)
        size += numel
    if batch:
        yield batch
        bar.update(len(batch))
    bar.close()


def columns(models: ModelSet, names: list[str]) -> tuple[list[Tensor], list[Tensor]]:
    """The base tensors of names and their fine-tuned versions, task-major (the multi ops' layout)."""
    return ([models.base[n] for n in names],
            [sd[n] for sd in models.finetuned for n in names])


def weighted_sums(models: ModelSet, names: list[str], coeffs: Tensor, trim: Optional[tuple[Tensor, Tensor]] = None,
                  offsets: Optional[list[int]] = None) -> list[Tensor]:
    """ops.weighted_sum_multi of `names` (coeffs: float32 [n, T+1] on their device), whose kernel
    also flags the merged values that hold NaN / Inf, for the caller's check (models.check), in its
    own pass. An untrimmed sum carries a NaN / Inf of any input into its result (0 * Inf is NaN),
    so there its flags stand for the inputs' check as well."""
    base, finetuned = columns(models, names)
    flags = models.check.output_flags(names, base[0].device, covers_inputs=trim is None)
    return ops.weighted_sum_multi(base, finetuned, coeffs, trim=trim, offsets=offsets, nonfinite=flags)


def ties_merges(models: ModelSet, names: list[str], weights: list[float], trim: tuple[Tensor, Tensor],
                offsets: list[int], **options: Any) -> list[Tensor]:
    """ops.ties_merge_multi of `names` under a trim, whose kernel also flags the merged values that
    hold NaN / Inf, for the caller's check (models.check), in its own pass. The flags stand for the
    outputs only: a NaN / Inf input need not reach its merged value (the trim drops a NaN task
    vector entry, a "count" vote ignores one), and the inputs are checked by the trim's select
    (trim.thresholds) or, where no kernel read them, by the check's own pass."""
    base, finetuned = columns(models, names)
    flags = models.check.output_flags(names, base[0].device, covers_inputs=False)
    return ops.ties_merge_multi(base, finetuned, weights, trim, offsets, nonfinite=flags, **options)


def group(models: ModelSet, name: str) -> tuple[Tensor, list[Tensor]]:
    """One tensor's base and its fine-tuned versions, in task order."""
    return models.base[name], [sd[name] for sd in models.finetuned]
