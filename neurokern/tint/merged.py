"""The shared weights of a TintedModel: every parameter of the module that is not a per-task layer.

Two variants with one interface (`names`, `weights(lambdas)`, `finetuned_model(t)`):

- TrainableMerge: theta(lambda)_p = theta0_p + sum_t clamp(lambda_{p,t}, 0, 1) tau_{t,p}, computed
  from the pre-trained and fine-tuned tensors it holds, differentiable with respect to lambda;
  without a gradient to take, the result is cached until lambda changes.
- FrozenMerge: fixed tensors theta(lambda*), as TintedModel.save wrote them, and the module buffers
  saved with them; it holds no pre-trained or fine-tuned weights.

Tensors of one shape and dtype (the 12 copies of a transformer block's q projection, say) are
stored stacked, so a step costs one weighted_sum call per shape group with per-row coefficients,
never one per tensor or a Python sum over tasks.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurokern.errors import NeurokernError
from neurokern.ops import magnitude_threshold, weighted_sum



class MergedWeights(nn.Module):
    """The shared weights by name, in the module's parameter order. Their tensors are
    non-persistent buffers: they move with .to() but stay out of state_dict (TintedModel.save
    writes the merged result instead)."""

    trainable: bool
    names: list[str]

    def weights(self, lambdas: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def initial_lambdas(self, prior: float) -> Tensor:
        raise NotImplementedError

    def finetuned_model(self, task: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def module_buffers(self) -> dict[str, Tensor]:
        """Buffers that replace the module's own (a saved model's)."""
        return {}

    def clear_cache(self) -> None:
        pass


class TrainableMerge(MergedWeights):
    """theta0 and the fine-tuned tensors of the shared parameters, stacked by shape group, and the
    fine-tuned tensors of the per-task layers (the teachers' only).

    names: the shared parameters; base / finetuned: state dicts (finetuned one per task, holding
    `names` and `per_task_names`, the parameters of the per-task layers); coefficients: "layer"
    (lambda [P, T]) or "task" (lambda [T]); trim: None or a density (each task vector keeps its top
    entries by magnitude over all shared tensors)."""

    trainable = True

    def __init__(self, names: list[str], base: dict[str, Tensor], finetuned: Sequence[dict[str, Tensor]],
                 per_task_names: list[str], coefficients: str, trim: Optional[float], device: torch.device):
        super().__init__()
        self.names = list(names)
        self.coefficients = coefficients
        self.num_tasks = len(finetuned)
        shape_groups: dict[tuple, list[int]] = {}
        for i, n in enumerate(names):
            shape_groups.setdefault((tuple(base[n].shape), base[n].dtype), []).append(i)
        self.groups = list(shape_groups.values())
        # Each name's (group, position in the group's stack).
        self._places = [None] * len(names)
        for g, idx in enumerate(self.groups):
            for j, i in enumerate(idx):
                self._places[i] = (g, j)
        # Layer-wise lambda is per row of a group's stack; a group of few, long tensors is merged as
        # G * k rows (each tensor's coefficients repeated k times), since weighted_sum's per-row
        # backward runs one program per row.
        self.row_splits = [_row_split(len(idx), base[names[idx[0]]].numel()) if coefficients == "layer" else 1
                           for idx in self.groups]
        for g, idx in enumerate(self.groups):
            dtype = base[names[idx[0]]].dtype
            self.register_buffer(f"base{g}", _stack([base[names[i]] for i in idx], device, dtype), persistent=False)
            for t, state in enumerate(finetuned):
                self.register_buffer(f"finetuned{g}_{t}", _stack([state[names[i]] for i in idx], device, dtype),
                                     persistent=False)
        # Where lambda's row for each merged row of the groups lies in lambda.flatten() padded to
        # [P, T + 1] (column 0: the pre-trained weight's coefficient 1), task-major per group.
        T1 = self.num_tasks + 1
        index, self.coefficient_sizes = [], []
        for idx, k in zip(self.groups, self.row_splits):
            rows = torch.tensor(idx, dtype=torch.long).repeat_interleave(k)
            index.append((rows[None, :] * T1 + torch.arange(T1)[:, None]).flatten())
            self.coefficient_sizes.append(T1 * len(rows))
        self.register_buffer("coefficient_index", torch.cat(index).to(device) if index else
                             torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        self.per_task_names = list(per_task_names)
        for t, state in enumerate(finetuned):
            for n in per_task_names:
                self.register_buffer(f"layer_{_key(n)}__task{t}", state[n].detach().to(device), persistent=False)
        self.trim_density = trim
        self.trim_offsets = [0] * len(self.groups)
        if trim is not None and self.groups:
            self._set_trim(trim)
        self._inputs: Optional[list[tuple]] = None  # _merge_inputs()
        self._cache: Optional[tuple[tuple, dict[str, Tensor]]] = None

    def _set_trim(self, density: float) -> None:
        bases = [self.get_buffer(f"base{g}") for g in range(len(self.groups))]
        fts = [self.get_buffer(f"finetuned{g}_{t}") for t in range(self.num_tasks) for g in range(len(self.groups))]
        total = sum(b.numel() for b in bases)
        threshold, tie_limit = magnitude_threshold(bases, fts, [max(1, math.ceil(density * total))] * self.num_tasks)
        self.register_buffer("threshold", threshold, persistent=False)
        self.register_buffer("tie_limit", tie_limit, persistent=False)
        offsets, offset = [], 0
        for b in bases:
            offsets.append(offset)
            offset += b.numel()
        self.trim_offsets = offsets

    def initial_lambdas(self, prior: float) -> Tensor:
        shape = (len(self.names), self.num_tasks) if self.coefficients == "layer" else (self.num_tasks,)
        return torch.full(shape, prior, dtype=torch.float32, device=self.coefficient_index.device)

    def weights(self, lambdas: Tensor) -> dict[str, Tensor]:
        """name -> theta(lambda), differentiable with respect to lambda when grad is enabled and
        lambda requires it; otherwise computed once and kept until lambda changes."""
        if torch.is_grad_enabled() and lambdas.requires_grad:
            self._cache = None
            return self._merge(lambdas)
        key = (lambdas._version, lambdas.data_ptr(), lambdas.device, lambdas.dtype)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._merge(lambdas))
        return self._cache[1]

    def clear_cache(self) -> None:
        self._cache = None

    def _merge(self, lambdas: Tensor) -> dict[str, Tensor]:
        if not self.groups:
            return {}
        # clamp: a lambda outside [0, 1] gets no gradient; column 0 is theta0's coefficient 1.
        full = F.pad(lambdas.float().clamp(0, 1), (1, 0), value=1.0)  # [P, T + 1] or [T + 1]
        if self.coefficients == "layer":
            flat = full.flatten().index_select(0, self.coefficient_index).split(self.coefficient_sizes)
            coeffs = [c.view(self.num_tasks + 1, -1) for c in flat]  # [T + 1, G * k] per group
        else:
            coeffs = [full] * len(self.groups)
        trim = (self.threshold, self.tie_limit) if self.trim_density is not None else None
        stacks = [stack.unbind(0) for stack in _MergeGroups.apply(self._merge_inputs(), trim, *coeffs)]
        return {n: stacks[g][j] for n, (g, j) in zip(self.names, self._places)}

    def _merge_inputs(self) -> list[tuple]:
        """Per shape group: (base, fine-tuned tensors, trim offset, stacked shape), the stacks viewed
        as G * k rows. Kept until the buffers move (_apply)."""
        if self._inputs is None:
            self._inputs = []
            for g, (idx, k) in enumerate(zip(self.groups, self.row_splits)):
                base = self.get_buffer(f"base{g}")
                fts = [self.get_buffer(f"finetuned{g}_{t}") for t in range(self.num_tasks)]
                shape = base.shape
                if k > 1:  # a view, no copy
                    base, fts = base.view(len(idx) * k, -1), [f.view(len(idx) * k, -1) for f in fts]
                self._inputs.append((base, fts, self.trim_offsets[g], shape))
        return self._inputs

    def finetuned_model(self, task: int) -> dict[str, Tensor]:
        """Every parameter of fine-tuned model `task`: shared ones and per-task layers'."""
        stacks = [self.get_buffer(f"finetuned{g}_{task}").unbind(0) for g in range(len(self.groups))]
        out = {n: stacks[g][j] for n, (g, j) in zip(self.names, self._places)}
        for n in self.per_task_names:
            out[n] = self.get_buffer(f"layer_{_key(n)}__task{task}")
        return out

    def _apply(self, fn, *args, **kwargs):
        self._inputs = None  # .to() / .cuda() replace the buffers
        self._cache = None
        return super()._apply(fn, *args, **kwargs)


class FrozenMerge(MergedWeights):
    """Fixed shared weights theta(lambda*) and the module buffers saved with them (a loaded model);
    lambdas: lambda* as saved (for reference: coefficients_now), or None."""

    trainable = False

    def __init__(self, names: list[str], shared: dict[str, Tensor], buffers: dict[str, Tensor],
                 lambdas: Optional[list], device: torch.device):
        super().__init__()
        missing = [n for n in names if n not in shared]
        if missing:
            raise NeurokernError(f"the saved shared weights lack {missing[:5]} of the module's parameters; wrong module?")
        self.names = list(names)
        self._keys = [f"shared_{_key(n)}" for n in names]
        for n, key in zip(names, self._keys):
            self.register_buffer(key, shared[n].to(device), persistent=False)
        self.saved_buffers = {n: b.to(device) for n, b in buffers.items()}
        self.saved_lambdas = torch.tensor([] if lambdas is None else lambdas, dtype=torch.float32, device=device)

    def weights(self, lambdas: Tensor) -> dict[str, Tensor]:
        return {n: self._buffers[key] for n, key in zip(self.names, self._keys)}

    def initial_lambdas(self, prior: float) -> Tensor:
        return self.saved_lambdas

    def finetuned_model(self, task: int) -> dict[str, Tensor]:
        raise NeurokernError("a loaded TintedModel holds no fine-tuned weights; pass teachers= to fit()")

    def module_buffers(self) -> dict[str, Tensor]:
        return self.saved_buffers


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
        for (base, fts, offset, shape), c in zip(groups, coeffs):
            # grad mode is off in forward: the face skips the op's own autograd layer (a Python wrapper)
            merged = weighted_sum(base, fts, c, trim, offset)
            outs.append(merged.view(shape))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        coeffs = ctx.saved_tensors
        out = []
        for (base, fts, offset, _), c, grad in zip(ctx.groups, coeffs, grads):
            if grad is None or not ctx.needs_input_grad[2 + len(out)]:
                out.append(None)
                continue
            grad = grad.contiguous().view(base.shape)
            out.append(torch.ops.neurokern.weighted_sum_backward.default(
                grad, base, fts, c, ctx.threshold, ctx.tie_limit, offset))
        return (None, None, *out)


def _row_split(tensors: int, numel: int, rows: int = 1024, min_row: int = 4096) -> int:
    """k (a power of two dividing numel) so that tensors * k >= rows, keeping rows of >= min_row
    elements; 1 when the group already has enough rows or its tensors are short."""
    k = 1
    while tensors * k < rows and numel % (2 * k) == 0 and numel // (2 * k) >= min_row:
        k *= 2
    return k


def _key(name: str) -> str:
    return name.replace(".", "__")


def _stack(tensors: list[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.stack([t.detach().to(device=device, dtype=dtype) for t in tensors])
