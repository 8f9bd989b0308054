"""Test-time training of a TintedModel on unlabelled inputs: AdaMerging and Model Tinting.

The reference schedule (Model Tinting): Adam (betas 0.9, 0.999, no weight decay) on lambda and
every tint together; `steps` epochs, each visiting the tasks in a shuffled order and taking one
optimizer step on one batch of `batch_size` inputs of that task. schedule="joint" instead takes
one step per epoch on the sum of every task's loss (AdaMerging's reference loop).
"""
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from neurokern.errors import NeurokernError
from neurokern.tint.losses import loss_fn, needs_teacher
from neurokern.tint.model import TintedModel

SCHEDULES = ("tasks", "joint")


def _per_task(model: TintedModel, value: Any, what: str, allow_missing: bool = False) -> list[Any]:
    """A list with one entry per task from a list (task order) or a dict keyed by task name/index."""
    T = model.num_tasks
    if isinstance(value, Mapping):
        out = []
        for t, name in enumerate(model.tasks):
            if name in value:
                out.append(value[name])
            elif t in value:
                out.append(value[t])
            elif allow_missing:
                out.append(None)
            else:
                raise NeurokernError(f"{what} has no entry for task {name!r} (index {t}); give one per task")
        unknown = [k for k in value if k not in model.tasks and not (isinstance(k, int) and 0 <= k < T)]
        if unknown:
            raise NeurokernError(f"{what} has entries for unknown tasks {unknown}; the tasks are {model.tasks}")
        return out
    if isinstance(value, (Tensor, nn.Module)) or not isinstance(value, Sequence):
        raise NeurokernError(f"{what} must be a list with one entry per task or a dict task -> entry; got {type(value).__name__}")
    out = list(value)
    if len(out) != T:
        missing = ", ".join(repr(n) for n in model.tasks[len(out):])
        detail = f" (none for {missing})" if len(out) < T else ""
        raise NeurokernError(f"{what} has {len(out)} entries for {T} tasks{detail}; give one per task")
    return out


class _Inputs:
    """One task's unlabelled inputs: a tensor [N, ...] or a Dataset (item or (item, label, ...))."""

    def __init__(self, data: Any, task: str):
        if data is None:
            raise NeurokernError(f"inputs_per_task has no inputs for task {task!r}")
        self.data = data
        self.is_tensor = isinstance(data, Tensor)
        if self.is_tensor and data.dim() == 0:
            raise NeurokernError(f"inputs_per_task[{task!r}] is a 0-d tensor; expected [N, ...] inputs")
        try:
            self.n = len(data)
        except TypeError:
            raise NeurokernError(
                f"inputs_per_task[{task!r}] is a {type(data).__name__}; expected a tensor [N, ...] or a Dataset"
            ) from None
        if self.n == 0:
            raise NeurokernError(f"inputs_per_task[{task!r}] is empty; test-time training needs unlabelled inputs of every task")

    def batch(self, index: Tensor, device: torch.device) -> Tensor:
        if self.is_tensor:
            return self.data.index_select(0, index.to(self.data.device)).to(device)
        items = [self.data[i] for i in index.tolist()]
        items = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
        return torch.stack([torch.as_tensor(it) for it in items]).to(device)


class _Sampler:
    """Batches of one task: a fresh permutation per pass over the data (drawn from the shared
    generator), consumed batch_size at a time; the last, short batch of a pass is topped up from
    the next pass (every batch has min(batch_size, N) rows)."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator):
        self.n, self.size, self.gen = n, min(batch_size, n), gen
        self.perm = torch.randperm(n, generator=gen)
        self.pos = 0

    def next(self) -> Tensor:
        parts, need = [], self.size
        while need:
            if self.pos == self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            need -= take
        return torch.cat(parts)


def _teacher_call(teacher: Any) -> Callable[[Tensor], Tensor]:
    """teacher(x) under no_grad, on the teacher's device when it is an nn.Module."""
    device = None
    if isinstance(teacher, nn.Module):
        first = next(iter(teacher.parameters()), None)
        device = None if first is None else first.device

    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            if device is not None and x.device != device:
                return teacher(x.to(device)).to(x.device)
            return teacher(x)

    return run


def fit(
    model: TintedModel,
    inputs_per_task: Union[Sequence[Any], Mapping],
    teachers: Union[Sequence[Any], Mapping, None] = None,
    loss: str = "pseudo",
    steps: int = 500,
    lr: float = 1e-2,
    batch_size: int = 32,
    seed: int = 0,
    *,
    schedule: str = "tasks",
    betas: tuple[float, float] = (0.9, 0.999),
    progress: bool = True,
) -> dict[str, list]:
    """Learn lambda and the tints of `model` at test time on unlabelled inputs.

    inputs_per_task: per task (a list in task order, or a dict keyed by task name or index) a
        tensor [N, ...] of inputs or a Dataset (an item, or a tuple whose first entry is the input).
    teachers: per task a callable x -> logits, the task's fine-tuned model with its head (same
        list / dict forms). None: the fine-tuned models the TintedModel holds. Not used by "entropy".
    loss: "entropy" (AdaMerging; with no tint layers this is AdaMerging task- or layer-wise),
        "pseudo" (Model Tinting, the default: cross-entropy against the teacher's argmax),
        "pseudo_conf" (Tinting++: the same with confidence-based filtering; see
        neurokern.tint.losses).
    steps: epochs; each takes one optimizer step per task (schedule="tasks", the reference) or one
        step on the sum of the tasks' losses (schedule="joint"). lr, betas: Adam's.
    seed: the batches and the task order come from a torch.Generator seeded with it: the same seed
        gives the same run (the module's own randomness, such as dropout, is the caller's).
    Returns {"loss": [float per optimizer step], "task": [task index per step, -1 for joint]}.
    """
    if not isinstance(model, TintedModel):
        raise NeurokernError(f"fit: model must be a TintedModel; got {type(model).__name__}")
    criterion = loss_fn(loss)
    if schedule not in SCHEDULES:
        raise NeurokernError(f"fit: schedule must be 'tasks' or 'joint'; got {schedule!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name != "batch_size" else 1):
            raise NeurokernError(f"fit: {name} must be a {'positive' if name == 'batch_size' else 'non-negative'} integer; got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise NeurokernError(f"fit: lr must be a positive number; got {lr!r}")
    T = model.num_tasks
    inputs = [_Inputs(d, model.tasks[t]) for t, d in enumerate(_per_task(model, inputs_per_task, "inputs_per_task", True))]
    calls: list[Optional[Callable]] = [None] * T
    if needs_teacher(loss):
        if teachers is None:
            calls = [model.teacher(t) for t in range(T)]
        else:
            given = _per_task(model, teachers, "teachers", True)
            for t, teacher in enumerate(given):
                if teacher is None or not callable(teacher):
                    raise NeurokernError(
                        f"teachers: task {model.tasks[t]!r} has no teacher (got {type(teacher).__name__}); "
                        f"loss={loss!r} needs each task's fine-tuned model"
                    )
                calls[t] = _teacher_call(teacher)
    params = model.trainable_parameters()
    if not params:
        raise NeurokernError("fit: the model has nothing to train (a loaded model without tint layers)")
    device = params[0].device
    optimizer = torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    samplers = [_Sampler(x.n, batch_size, gen) for x in inputs]

    def task_loss(t: int) -> Tensor:
        x = inputs[t].batch(samplers[t].next(), device)
        logits = model(x, task=t)
        if calls[t] is None:
            return criterion(logits)
        return criterion(logits, calls[t](x))

    from tqdm.auto import tqdm

    per_epoch = T if schedule == "tasks" else 1
    losses: list[Tensor] = []
    tasks: list[int] = []
    model.clear_cache()
    with tqdm(total=steps * per_epoch, disable=not progress, desc=f"fit ({loss})", leave=False) as bar:
        for epoch in range(steps):
            order = torch.randperm(T, generator=gen).tolist()
            if schedule == "tasks":
                for t in order:
                    optimizer.zero_grad(set_to_none=True)
                    value = task_loss(t)
                    value.backward()
                    optimizer.step()
                    losses.append(value.detach())
                    tasks.append(t)
                    bar.update(1)
            else:
                optimizer.zero_grad(set_to_none=True)
                value = sum(task_loss(t) for t in order)
                value.backward()
                optimizer.step()
                losses.append(value.detach())
                tasks.append(-1)
                bar.update(1)
            if progress and (epoch + 1) % max(1, steps // 20) == 0:
                bar.set_postfix(loss=float(losses[-1]))
    model.clear_cache()
    return {"loss": torch.stack(losses).cpu().tolist() if losses else [], "task": tasks}
