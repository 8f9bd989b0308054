"""Per-task layers (tints and heads) and how a batch is routed through them.

A TintedModel runs its own copy of the wrapped module in which, once at construction, the forward
of every per-task layer is replaced by its TaskLayer's `routed_forward` (the layer object, its
hooks and its parameter names stay). During a TintedModel forward that reads the forward's `Route`:

- one task for the whole batch (`task=t`): the layer runs with task t's parameters
  (nn.Linear: F.linear with task t's weight and bias);
- a batch mixing tasks (`task_ids[B]`): an nn.Linear whose per-task copies share one shape runs
  `neurokern.ops.tinted_linear` once over all rows (a segmented GEMM, with autograd for the input,
  the weights and the bias), on the sort of the rows by task that the Route computes once for all
  layers of the forward and their backward; any other module, or copies of different shapes, runs
  once per task present on that task's rows and the rows are put back in batch order.

Outside a TintedModel forward (the teacher's run on the fine-tuned weights) the layer runs its own
forward on the parameters it holds.

Rows are counted along dim 0 of the layer's input, which must be the batch dimension of the model
input (an nn.Linear on [B, ..., in] routes all B * ... rows of sample b with task_ids[b]). When
the per-task outputs differ in shape (heads with different numbers of classes), a mixed batch
pads every output to the largest shape with `pad_value` (-inf by default: softmax gives the
padded classes probability 0 and argmax never picks them).
"""
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurokern.errors import NeurokernError
from neurokern.ops import tinted_linear, tinted_route
from neurokern.tint._names import Slots


class Route:
    """The routing of one forward: `task` (an int) for a single-task batch, or `task_ids` [B]
    (int64 on the model's device, already checked to lie in [0, num_tasks)). The sort of the rows
    by task is computed at its first use and shared by every per-task layer of the forward."""

    def __init__(self, task: Optional[int] = None, task_ids: Optional[Tensor] = None, num_tasks: int = 0,
                 pad_value: float = float("-inf")):
        self.task, self.task_ids, self.num_tasks, self.pad_value = task, task_ids, num_tasks, pad_value
        self.ran: set[str] = set()  # the per-task layers that ran
        self._rows: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._present: Optional[tuple[list[tuple[int, Tensor]], Tensor]] = None

    @property
    def batch(self) -> int:
        return 0 if self.task_ids is None else self.task_ids.shape[0]

    def rows(self, per_sample: int) -> tuple[Tensor, Tensor, Tensor]:
        """(task id [R], perm [R], bounds [T + 1]) of the R = B * per_sample rows of a layer input
        (a sequence [B, S, in] has S rows per sample, sample b's rows all of task_ids[b]): the rows
        of task t are perm[bounds[t]:bounds[t + 1]], as tinted_linear takes them."""
        if per_sample not in self._rows:
            if per_sample == 1:
                self._rows[1] = (self.task_ids, *tinted_route(self.task_ids, self.num_tasks))
            else:
                ids, perm, bounds = self.rows(1)
                positions = torch.arange(per_sample, device=perm.device)
                self._rows[per_sample] = (ids[:, None].expand(-1, per_sample).flatten(),
                                          (perm[:, None] * per_sample + positions).flatten(), bounds * per_sample)
        return self._rows[per_sample]

    def tasks_present(self) -> tuple[list[tuple[int, Tensor]], Tensor]:
        """([(task, the indices of its samples)] for the tasks in the batch, in task order; the
        permutation that puts the samples of those lists, concatenated, back in batch order).
        Reads the task bounds on the host: one sync per forward."""
        if self._present is None:
            _, perm, bounds = self.rows(1)
            edges = bounds.tolist()
            present = [(t, perm[edges[t]:edges[t + 1]]) for t in range(self.num_tasks) if edges[t + 1] > edges[t]]
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel(), device=perm.device)
            self._present = (present, inverse)
        return self._present


class Routing:
    """The Route of the TintedModel forward in progress (None outside one), shared by its
    TaskLayers."""

    def __init__(self):
        self.current: Optional[Route] = None


def _key(name: str) -> str:
    return name.replace(".", "__")


class TaskLayer(nn.Module):
    """Every task's copy of the parameters of per-task layer `name`, and the forward that runs in
    place of that layer's own in the TintedModel's copy of the module.

    Each task's copy is its own set of nn.Parameters (per_task[t]): `trainable` copies are tints,
    each with its own optimizer state (a step on task t's loss leaves the other tasks' tints as
    they are); the others are frozen heads, kept at each task's fine-tuned weights."""

    def __init__(self, name: str, layer: nn.Module, per_task: Sequence[dict[str, Tensor]], trainable: bool,
                 routing: Routing):
        super().__init__()
        self.name = name
        self.trainable = trainable
        self.param_names = list(per_task[0])
        self.per_task = nn.ModuleList(
            nn.ParameterDict([(_key(n), nn.Parameter(state[n], requires_grad=trainable)) for n in self.param_names])
            for state in per_task
        )
        self.same_shapes = all(state[n].shape == per_task[0][n].shape for state in per_task for n in self.param_names)
        self.linear = (isinstance(layer, nn.Linear) and self.same_shapes and "weight" in self.param_names
                       and set(self.param_names) <= {"weight", "bias"})
        self.has_bias = "bias" in self.param_names
        # The layer in the TintedModel's module: its own forward and where its parameters live.
        self._own_forward = layer.forward
        self._slots = Slots(layer, self.param_names)
        self._routing = routing
        layer.forward = self.routed_forward

    @property
    def num_tasks(self) -> int:
        return len(self.per_task)

    def tensor(self, name: str, task: int) -> Tensor:
        """Task `task`'s copy of parameter `name`."""
        return self.per_task[task][_key(name)]

    def task_state(self, task: int) -> dict[str, Tensor]:
        return {n: self.tensor(n, task) for n in self.param_names}

    def extra_repr(self) -> str:
        kind = "tint" if self.trainable else "head"
        return f"{self.name!r}, {kind}, tasks={self.num_tasks}, same_shapes={self.same_shapes}, linear={self.linear}"

    def routed_forward(self, *args: Any, **kwargs: Any) -> Any:
        route = self._routing.current
        if route is None:
            return self._own_forward(*args, **kwargs)
        route.ran.add(self.name)
        if route.task is not None:
            return self._run(route.task, args, kwargs)
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != route.batch:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise NeurokernError(
                f"tint layer {self.name!r}: a mixed-task batch needs the batch along dim 0 of the layer's "
                f"input ({route.batch} rows for {route.batch} task ids); got input {got}"
            )
        if self.linear and not kwargs and len(args) == 1:
            return self._tinted_linear(x, route)
        return self._each_task(route, args, kwargs)

    def _run(self, task: int, args: tuple, kwargs: dict) -> Any:
        copy = self.per_task[task]
        if self.linear:
            return F.linear(args[0], copy["weight"], copy["bias"] if self.has_bias else None)
        with self._slots.holding([copy[_key(n)] for n in self.param_names]):
            return self._own_forward(*args, **kwargs)

    def _tinted_linear(self, x: Tensor, route: Route) -> Tensor:
        weight = torch.stack([copy["weight"] for copy in self.per_task])
        bias = torch.stack([copy["bias"] for copy in self.per_task]) if self.has_bias else None
        rows = x.reshape(-1, x.shape[-1])
        ids, perm, bounds = route.rows(rows.shape[0] // route.batch if route.batch else 1)
        return tinted_linear(rows, weight, bias, ids, perm, bounds).reshape(*x.shape[:-1], weight.shape[1])

    def _each_task(self, route: Route, args: tuple, kwargs: dict) -> Tensor:
        """The layer once per task present, on that task's rows; the outputs padded to one shape
        and put back in batch order."""
        B = route.batch
        present, inverse = route.tasks_present()

        def rows_of(value: Any, index: Tensor) -> Any:
            return value.index_select(0, index) if isinstance(value, Tensor) and value.dim() and value.shape[0] == B else value

        outs = []
        for t, index in present:
            out = self._run(t, tuple(rows_of(a, index) for a in args), {k: rows_of(v, index) for k, v in kwargs.items()})
            if not isinstance(out, Tensor):
                raise NeurokernError(
                    f"tint layer {self.name!r} returns {type(out).__name__}; a mixed-task batch through a "
                    "non-Linear tint layer needs it to return one tensor"
                )
            outs.append(out)
        if not outs:  # an empty batch
            return self._run(0, args, kwargs)
        shape = [max(o.shape[d] for o in outs) for d in range(1, outs[0].dim())]
        padded = []
        for o in outs:
            pad = []
            for d in reversed(range(1, o.dim())):
                pad += [0, shape[d - 1] - o.shape[d]]
            padded.append(F.pad(o, pad, value=route.pad_value) if any(pad) else o)
        return torch.cat(padded).index_select(0, inverse)
