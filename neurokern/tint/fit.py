"""Test-time training of a TintedModel on unlabelled inputs: AdaMerging and Model Tinting.

The reference schedule (Model Tinting): Adam (betas 0.9, 0.999, no weight decay) on lambda and
every tint together; `steps` epochs, each visiting the tasks in a shuffled order and taking one
optimizer step on one batch of `batch_size` inputs of that task. schedule="joint" instead takes
one step per epoch on the sum of every task's loss (AdaMerging's reference loop).
"""
import math
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
        if self.is_tensor and data.is_floating_point() and not bool(torch.isfinite(data).all()):
            raise NeurokernError(f"inputs_per_task[{task!r}] holds NaN or Inf")

    def batch(self, rows: "_Rows", device: torch.device) -> Tensor:
        if self.is_tensor:
            index = rows.on(self.data.device)
            return self.data.index_select(0, index).to(device, non_blocking=True)
        items = [self.data[i] for i in rows.host.tolist()]
        items = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
        return torch.stack([torch.as_tensor(it) for it in items]).to(device)


class _Rows:
    """The row indices of one batch: on the host (bookkeeping) and, on request, on a device. A
    device copy is cut from a copy of the whole pass's permutation made once per pass, so a step
    never waits for a host-to-device copy (which would drain the GPU queue every step)."""

    def __init__(self, host: Tensor, parts: list[tuple["_Pass", int, int]]):
        self.host, self.parts = host, parts

    def on(self, device: torch.device) -> Tensor:
        if device.type == "cpu":
            return self.host
        return torch.cat([p.on(device)[a:b] for p, a, b in self.parts])


class _Pass:
    """One permutation of a task's N rows, with its device copies made on first use."""

    def __init__(self, perm: Tensor):
        self.perm = perm
        self.copies: dict[torch.device, Tensor] = {}

    def on(self, device: torch.device) -> Tensor:
        if device not in self.copies:
            self.copies[device] = self.perm.pin_memory().to(device, non_blocking=True)
        return self.copies[device]


class _Sampler:
    """Batches of one task: a fresh permutation per pass over the data (drawn from the shared
    generator), consumed batch_size at a time; the last, short batch of a pass is topped up from
    the next pass (every batch has min(batch_size, N) rows). `first_pass` is true while a batch
    holds a row not drawn before."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator):
        self.n, self.size, self.gen = n, min(batch_size, n), gen
        self.current = _Pass(torch.randperm(n, generator=gen))
        self.pos = 0
        self.passes = 0

    def next(self) -> tuple[_Rows, bool]:
        parts, need, first = [], self.size, False
        while need:
            if self.pos == self.n:
                self.current, self.pos = _Pass(torch.randperm(self.n, generator=self.gen)), 0
                self.passes += 1
            take = min(need, self.n - self.pos)
            parts.append((self.current, self.pos, self.pos + take))
            first = first or self.passes == 0
            self.pos += take
            need -= take
        host = torch.cat([p.perm[a:b] for p, a, b in parts])
        return _Rows(host, parts), first


class _TeacherCache:
    """A task's teacher outputs, one row per input row, filled during the first pass over the
    inputs and read afterwards: the teacher (the task's fine-tuned model, in eval mode) gives a
    row the same output whenever it sees it, so it runs on each input once instead of once per
    step. Rows are kept on the device of the first output."""

    def __init__(self, teacher: Callable[[Tensor], Tensor], n: int):
        self.teacher, self.n = teacher, n
        self.rows: Optional[Tensor] = None

    def __call__(self, x: Tensor, rows: _Rows, first_pass: bool) -> Tensor:
        if self.rows is not None and not first_pass:
            return self.rows.index_select(0, rows.on(self.rows.device))
        out = self.teacher(x)
        if self.rows is None:
            self.rows = out.new_zeros((self.n, *out.shape[1:]))
        self.rows.index_copy_(0, rows.on(self.rows.device), out)
        return out


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
    lr_lambda: Optional[float] = None,
    schedule: str = "tasks",
    betas: tuple[float, float] = (0.9, 0.999),
    progress: bool = True,
    callback: Optional[Callable[[int], Optional[dict]]] = None,
    callback_every: int = 0,
) -> dict[str, list]:
    """Learn lambda and the tints of `model` at test time on unlabelled inputs.

    inputs_per_task: per task (a list in task order, or a dict keyed by task name or index) a
        tensor [N, ...] of inputs or a Dataset (an item, or a tuple whose first entry is the input).
    teachers: per task a callable x -> logits, the task's fine-tuned model with its head (same
        list / dict forms). None: the fine-tuned models the TintedModel holds. Not used by "entropy".
        A teacher runs once per input row (its outputs are kept for the later passes).
    loss: "entropy" (AdaMerging; with no tint layers this is AdaMerging task- or layer-wise),
        "pseudo" (Model Tinting, the default: cross-entropy against the teacher's argmax),
        "pseudo_conf" (Tinting++: the same with confidence-based filtering; see
        neurokern.tint.losses).
    steps: epochs; each takes one optimizer step per task (schedule="tasks", the reference) or one
        step on the sum of the tasks' losses (schedule="joint").
    lr: Adam's learning rate of the tints; lr_lambda: that of lambda (None: the same). Adam moves
        every parameter by about its learning rate per step whatever the gradient's size, so the
        two are set apart: lambda lives in [0, 1], a tint's weights on its layer's own scale.
        lambda is not trained when model.lambdas.requires_grad is False.
    seed: the batches and the task order come from a torch.Generator seeded with it: the same seed
        gives the same run (the module's own randomness, such as dropout, is the caller's).
    callback, callback_every: callback(epochs_done) is called before the first epoch and after
        every callback_every epochs (and after the last); what it returns (a dict, or None) is
        recorded in the history's "callback" list with the epoch count under "epoch".
    Returns {"loss": [float per optimizer step], "task": [task index per step, -1 for joint],
    "callback": [...]}.
    """
    if not isinstance(model, TintedModel):
        raise NeurokernError(f"fit: model must be a TintedModel; got {type(model).__name__}")
    criterion = loss_fn(loss)
    if schedule not in SCHEDULES:
        raise NeurokernError(f"fit: schedule must be 'tasks' or 'joint'; got {schedule!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seed", seed), ("callback_every", callback_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name != "batch_size" else 1):
            raise NeurokernError(f"fit: {name} must be a {'positive' if name == 'batch_size' else 'non-negative'} integer; got {value!r}")
    for name, value in (("lr", lr), ("lr_lambda", lr if lr_lambda is None else lr_lambda)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
            raise NeurokernError(f"fit: {name} must be a positive number; got {value!r}")
    if callback is not None and not callable(callback):
        raise NeurokernError(f"fit: callback must be callable; got {type(callback).__name__}")
    T = model.num_tasks
    inputs = [_Inputs(d, model.tasks[t]) for t, d in enumerate(_per_task(model, inputs_per_task, "inputs_per_task", True))]
    calls: list[Optional[_TeacherCache]] = [None] * T
    if needs_teacher(loss):
        if teachers is None:
            calls = [_TeacherCache(model.teacher(t), inputs[t].n) for t in range(T)]
        else:
            given = _per_task(model, teachers, "teachers", True)
            for t, teacher in enumerate(given):
                if teacher is None or not callable(teacher):
                    raise NeurokernError(
                        f"teachers: task {model.tasks[t]!r} has no teacher (got {type(teacher).__name__}); "
                        f"loss={loss!r} needs each task's fine-tuned model"
                    )
                calls[t] = _TeacherCache(_teacher_call(teacher), inputs[t].n)
    lam = [model.lambdas] if model.lambdas.requires_grad and model.lambdas.numel() else []
    tints = [p for p in model.trainable_parameters() if p is not model.lambdas]
    groups = [{"params": lam, "lr": lr if lr_lambda is None else lr_lambda}] if lam else []
    groups += [{"params": tints, "lr": lr}] if tints else []
    if not groups:
        raise NeurokernError("fit: the model has nothing to train (lambda frozen or loaded, and no tint layers)")
    device = groups[0]["params"][0].device
    optimizer = torch.optim.Adam(groups, betas=betas, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    samplers = [_Sampler(x.n, batch_size, gen) for x in inputs]

    def task_loss(t: int) -> Tensor:
        rows, first_pass = samplers[t].next()
        x = inputs[t].batch(rows, device)
        logits = model(x, task=t)
        if calls[t] is None:
            return criterion(logits)
        return criterion(logits, calls[t](x, rows, first_pass))

    from tqdm.auto import tqdm

    per_epoch = T if schedule == "tasks" else 1
    losses: list[Tensor] = []  # on the device: read once at the end, no host sync per step
    tasks: list[int] = []
    recorded: list[dict] = []

    def take_step() -> None:
        optimizer.step()
        # Autocast caches its low-precision copy of every leaf parameter that requires grad until
        # the autocast region ends; a fit called inside one (`with torch.autocast(...): fit(...)`)
        # would otherwise run every later forward on the tints' first values while Adam moves
        # their float32 masters.
        torch.clear_autocast_cache()

    def record(epoch: int) -> None:
        if callback is None:
            return
        out = callback(epoch)
        recorded.append({"epoch": epoch, **(out or {})})

    model.clear_cache()
    torch.clear_autocast_cache()
    record(0)
    with tqdm(total=steps * per_epoch, disable=not progress, desc=f"fit ({loss})", leave=False) as bar:
        for epoch in range(steps):
            order = torch.randperm(T, generator=gen).tolist()
            if schedule == "tasks":
                for t in order:
                    optimizer.zero_grad(set_to_none=True)
                    value = task_loss(t)
                    value.backward()
                    take_step()
                    losses.append(value.detach())
                    tasks.append(t)
                    bar.update(1)
            else:
                optimizer.zero_grad(set_to_none=True)
                value = sum(task_loss(t) for t in order)
                value.backward()
                take_step()
                losses.append(value.detach())
                tasks.append(-1)
                bar.update(1)
            if progress and (epoch + 1) % max(1, steps // 20) == 0:
                bar.set_postfix(loss=float(losses[-1]))
            done = epoch + 1
            if callback is not None and (done == steps or (callback_every and done % callback_every == 0)):
                model.clear_cache()
                record(done)
    model.clear_cache()
    history = torch.stack(losses).float().cpu().tolist() if losses else []
    bad = next((i for i, value in enumerate(history) if not math.isfinite(value)), None)
    if bad is not None:
        where = f"task {model.tasks[tasks[bad]]!r}" if tasks[bad] >= 0 else "the joint loss"
        raise NeurokernError(f"fit: the loss became non-finite at step {bad + 1} of {len(history)} ({where}); the "
                             "model's lambda and tints are no longer usable: rebuild it and lower lr / lr_lambda")
    return {"loss": history, "task": tasks, "callback": recorded}
