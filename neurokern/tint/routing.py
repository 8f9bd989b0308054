"""Per-task layers (tints and heads) and how a batch is routed through them.

A `TaskLayer` holds, for one submodule of the wrapped model, one copy of its parameters per task
and stands in for that submodule during a TintedModel forward. It reads the current `Route`:

- one task for the whole batch (`task=t`): the submodule runs with task t's parameters
  (nn.Linear: F.linear with row t of the stacked weight);
- a batch mixing tasks (`task_ids[B]`): an nn.Linear whose per-task copies share one shape runs
  `neurokern.ops.tinted_linear` once over all rows (a segmented GEMM, with autograd for the input,
  the weights and the bias); any other module, or copies of different shapes, runs once per task
  present on that task's rows (functional_call) and the rows are put back in batch order.

Rows are counted along dim 0 of the layer's input, which must be the batch dimension of the model
input (an nn.Linear on [B, ..., in] routes all B * ... rows of sample b with task_ids[b]). When
the per-task outputs differ in shape (heads with different numbers of classes), a mixed batch
pads every output to the largest shape with `pad_value` (-inf by default: softmax gives the
padded classes probability 0 and argmax never picks them).
"""
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from neurokern.errors import NeurokernError
from neurokern.ops import tinted_linear


@dataclass
class Route:
    """The routing of one forward: `task` (int) for a single-task batch, or `task_ids` [B]."""

    task: Optional[int] = None
    task_ids: Optional[Tensor] = None
    pad_value: float = float("-inf")

    @property
    def batch(self) -> int:
        return 0 if self.task_ids is None else self.task_ids.shape[0]


def _key(name: str) -> str:
    return name.replace(".", "__")


class TaskLayer(nn.Module):
    """One copy per task of the parameters of submodule `name`.

    Stored stacked, one tensor [T, *shape] per parameter, when every task's copy has the same
    shape; otherwise one tensor per task and parameter. `trainable` copies are nn.Parameters
    (tints), the others frozen (heads kept at each task's fine-tuned weights)."""

    def __init__(self, name: str, inner: nn.Module, per_task: Sequence[dict[str, Tensor]], trainable: bool):
        super().__init__()
        self.name = name
        self.trainable = trainable
        self.num_tasks = len(per_task)
        self.param_names = list(per_task[0])
        # The wrapped model's own submodule: the code that runs. Kept out of this module's tree
        # (the wrapped model owns it and moves its buffers).
        object.__setattr__(self, "inner", inner)
        self.stacked = all(tuple(p[n].shape) == tuple(per_task[0][n].shape) for p in per_task for n in self.param_names)
        self.params = nn.ParameterDict()
        for n in self.param_names:
            if self.stacked:
                self.params[_key(n)] = nn.Parameter(torch.stack([p[n] for p in per_task]), requires_grad=trainable)
            else:
                for t, p in enumerate(per_task):
                    self.params[f"{_key(n)}__task{t}"] = nn.Parameter(p[n].clone(), requires_grad=trainable)
        self.linear = (
            isinstance(inner, nn.Linear) and self.stacked and set(self.param_names) <= {"weight", "bias"}
            and "weight" in self.param_names
        )
        self.route: Optional[Route] = None
        self.called = False

    def tensor(self, name: str, task: int) -> Tensor:
        """Task `task`'s copy of parameter `name` (a view when stacked)."""
        if self.stacked:
            return self.params[_key(name)][task]
        return self.params[f"{_key(name)}__task{task}"]

    def task_state(self, task: int) -> dict[str, Tensor]:
        return {n: self.tensor(n, task) for n in self.param_names}

    def extra_repr(self) -> str:
        kind = "tint" if self.trainable else "head"
        return f"{self.name!r}, {kind}, tasks={self.num_tasks}, stacked={self.stacked}, linear={self.linear}"

    def _run(self, task: int, args: tuple, kwargs: dict) -> Any:
        if self.linear:
            return F.linear(args[0], self.tensor("weight", task),
                            self.tensor("bias", task) if "bias" in self.param_names else None)
        return functional_call(self.inner, self.task_state(task), args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        route = self.route
        if route is None:
            raise NeurokernError(f"tint layer {self.name!r} ran outside a TintedModel forward")
        self.called = True
        if route.task is not None:
            return self._run(route.task, args, kwargs)
        ids = route.task_ids
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != ids.shape[0]:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise NeurokernError(
                f"tint layer {self.name!r}: a mixed-task batch needs the batch along dim 0 of the layer's "
                f"input ({ids.shape[0]} rows for {ids.shape[0]} task ids); got input {got}"
            )
        if self.linear and not kwargs and len(args) == 1:
            return self._tinted_linear(x, ids)
        return self._grouped(ids, args, kwargs, route.pad_value)

    def _tinted_linear(self, x: Tensor, ids: Tensor) -> Tensor:
        weight = self.params["weight"]
        bias = self.params["bias"] if "bias" in self.param_names else None
        rows = x.reshape(-1, x.shape[-1])
        per = rows.shape[0] // max(ids.shape[0], 1)
        row_ids = ids if per == 1 else ids.repeat_interleave(per)
        y = tinted_linear(rows, weight, bias, row_ids)
        return y.reshape(*x.shape[:-1], weight.shape[1])

    def _grouped(self, ids: Tensor, args: tuple, kwargs: dict, pad_value: float) -> Tensor:
        B = ids.shape[0]
        tasks = torch.unique(ids).tolist()
        index, outs = [], []
        for t in tasks:
            idx = torch.nonzero(ids == t).flatten()
            sub = tuple(a.index_select(0, idx) if isinstance(a, Tensor) and a.dim() and a.shape[0] == B else a for a in args)
            subk = {k: v.index_select(0, idx) if isinstance(v, Tensor) and v.dim() and v.shape[0] == B else v
                    for k, v in kwargs.items()}
            out = self._run(t, sub, subk)
            if not isinstance(out, Tensor):
                raise NeurokernError(
                    f"tint layer {self.name!r} returns {type(out).__name__}; a mixed-task batch through a "
                    "non-Linear tint layer needs it to return one tensor"
                )
            index.append(idx)
            outs.append(out)
        if not outs:
            return self._run(0, args, kwargs)
        shape = [max(o.shape[d] for o in outs) for d in range(1, outs[0].dim())]
        padded = []
        for o in outs:
            pad = []
            for d in reversed(range(1, o.dim())):
                pad += [0, shape[d - 1] - o.shape[d]]
            padded.append(F.pad(o, pad, value=pad_value) if any(pad) else o)
        order = torch.cat(index)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return torch.cat(padded).index_select(0, inverse)
