"""What a merge method is (the Method record) and the helpers its run shares with the others."""
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

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
    # run checks NaN / Inf itself when models.finite_checked is False (in a pass that reads every entry)
    checks_finite: bool = False
    # checked params -> new Pass objects, in the order they run (a later one sees the earlier results)
    passes: Callable[[Any], list[Pass]] = no_passes

    def params(self, given: dict[str, Any], num_tasks: int) -> Any:
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise NeurokernError(
                f"method {self.name!r}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"it takes {', '.join(sorted(self.defaults))}"
            )
        return self.resolve({**self.defaults, **given}, num_tasks)


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


def group(models: ModelSet, name: str) -> tuple[Tensor, list[Tensor]]:
    """One tensor's base and its fine-tuned versions, in task order."""
    return models.base[name], [sd[name] for sd in models.finetuned]
