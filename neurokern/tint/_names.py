"""Choosing layers by module name or glob pattern, turning models into state dicts, and running a
module on tensors given by name (Slots)."""
import fnmatch
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Iterator, Sequence, Union

from torch import Tensor, nn

from neurokern.errors import NeurokernError
from neurokern.state_dicts import as_state_dict

Patterns = Union[str, Sequence[str], None]


def _as_list(patterns: Patterns, what: str) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    out = list(patterns)
    for p in out:
        if not isinstance(p, str):
            raise NeurokernError(f"{what}: expected module names or glob patterns (str); got {p!r}")
    return out


def _shown(names: Sequence[str], limit: int = 8) -> str:
    names = [n for n in names if n]
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def match_modules(module: nn.Module, patterns: Patterns, what: str) -> list[str]:
    """Names of the submodules of `module` that the patterns choose: an exact module name, or an
    fnmatch glob ("encoder.layers.*.fc1"). Every pattern must choose at least one module holding
    parameters; chosen modules may not contain one another. In module order."""
    pats = _as_list(patterns, what)
    if not pats:
        return []
    modules = dict(module.named_modules())
    chosen: dict[str, None] = {}
    for pat in pats:
        hits = [n for n in modules if n and (n == pat or fnmatch.fnmatchcase(n, pat))]
        if not hits:
            with_params = [n for n, m in modules.items() if n and any(True for _ in m.parameters(recurse=False))]
            raise NeurokernError(
                f"{what}: {pat!r} matches no module of {type(module).__name__}; expected a module name "
                f"or glob pattern such as {_shown(with_params)}"
            )
        for n in hits:
            if not any(True for _ in modules[n].parameters()):
                raise NeurokernError(f"{what}: {pat!r} chose module {n!r}, which has no parameters")
            chosen[n] = None
    names = [n for n in modules if n in chosen]
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise NeurokernError(f"{what}: module {b!r} lies inside {a!r}; choose one of them")
    return names


def model_state(model: Any, what: str) -> dict[str, Tensor]:
    """A state dict (name -> tensor), detached, from a state dict or an nn.Module."""
    if isinstance(model, nn.Module):
        return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
    return as_state_dict(model, what)


def task_models(finetuned: Any, task_names: Any) -> tuple[list[str], list[Any]]:
    """(task names, models) from a list of models or a dict task name -> model."""
    if isinstance(finetuned, (nn.Module, Tensor)) or finetuned is None:
        raise NeurokernError(
            "finetuned must be a list of fine-tuned models (state dicts or nn.Modules), one per task, "
            "or a dict task name -> model"
        )
    if isinstance(finetuned, Mapping):
        names, models = [str(k) for k in finetuned], list(finetuned.values())
    else:
        models = list(finetuned)
        names = [f"task{i}" for i in range(len(models))]
    if task_names is not None:
        task_names = [str(n) for n in task_names]
        if len(task_names) != len(models):
            raise NeurokernError(f"task_names has {len(task_names)} names for {len(models)} fine-tuned models")
        names = task_names
    if not models:
        raise NeurokernError("finetuned is empty: give at least one fine-tuned model")
    if len(set(names)) != len(names):
        raise NeurokernError(f"task names must be distinct; got {names}")
    return names, models


class Slots:
    """Where the named parameters (or buffers) of a module live: for each name, every
    (owning module's _parameters / _buffers dict, key) that holds it, tied aliases included.

    holding(tensors) puts the tensors there for the duration of a block and the module's own back
    after it: what torch.func.functional_call does, except that the names are resolved once here,
    not on every call (functional_call walks the whole module tree each time: most of the host time
    of a test-time step on a transformer's few hundred tensors)."""

    def __init__(self, module: nn.Module, names: Sequence[str], buffers: bool = False):
        position = {n: i for i, n in enumerate(names)}
        named = module.named_buffers if buffers else module.named_parameters
        first_name: dict[int, str] = {}
        self.slots: list[tuple[dict, str, int]] = []
        for name, tensor in named(remove_duplicate=False):
            canonical = first_name.setdefault(id(tensor), name)
            if canonical in position:
                owner, _, key = name.rpartition(".")
                sub = module.get_submodule(owner)
                self.slots.append((sub._buffers if buffers else sub._parameters, key, position[canonical]))
        found = {i for _, _, i in self.slots}
        missing = [n for i, n in enumerate(names) if i not in found]
        if missing:
            raise NeurokernError(f"{type(module).__name__} has no {'buffer' if buffers else 'parameter'} {missing[0]!r}")

    def put(self, tensors: Sequence[Tensor]) -> None:
        """Replace the module's own tensors for good (tensors in the order of `names`)."""
        for owner, key, i in self.slots:
            owner[key] = tensors[i]

    @contextmanager
    def holding(self, tensors: Sequence[Tensor]) -> Iterator[None]:
        """The module holds `tensors` (in the order of `names`) inside the block."""
        own = [owner[key] for owner, key, _ in self.slots]
        self.put(tensors)
        try:
            yield
        finally:
            for (owner, key, _), tensor in zip(self.slots, own):
                owner[key] = tensor
