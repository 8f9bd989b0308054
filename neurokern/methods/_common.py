"""Pieces the merge methods share: the method record, parameter resolution, trim thresholds."""
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from neurokern import ops
from neurokern.errors import NeurokernError
from neurokern.models import ModelSet, raise_if_nonfinite


@dataclass(frozen=True)
class Method:
    """A merge method: its parameters with defaults, their checks, and the merge itself."""

    name: str
    defaults: dict[str, Any]
    resolve: Callable[[dict[str, Any], int], Any]  # (params with defaults filled, T) -> checked params
    # (models, params, progress, precomputed or None) -> merged
    run: Callable[..., dict[str, Tensor]]
    # run checks NaN / Inf itself when models.finite_checked is False (in a pass that reads every entry)
    checks_finite: bool = False

    def params(self, given: dict[str, Any], num_tasks: int) -> Any:
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise NeurokernError(
                f"method {self.name!r}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"it takes {', '.join(sorted(self.defaults))}"
            )
        return self.resolve({**self.defaults, **given}, num_tasks)


def each(names: list[str], progress: bool, desc: str) -> Iterable[str]:
    return tqdm(names, desc=desc, unit="tensor", disable=not progress, leave=False)


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


@dataclass
class Trims:
    """Exact magnitude trims of a set of tensors: (threshold, tie_limit) of shape [T] for one scope
    over all of them, or [n, T] for each tensor alone, and where each tensor sits in them."""

    threshold: Tensor
    tie_limit: Tensor
    row: dict[str, int]  # per-tensor scope: the tensor's row
    offset: dict[str, int]  # global scope: the tensor's first flat position
    nonfinite: Optional[Tensor] = None  # int32 flags per tensor (in row / offset order), if looked for

    def check_finite(self, models: ModelSet) -> None:
        """Raises for the first tensor whose inputs hold NaN / Inf, where the select looked for
        them (one host sync; call it after the merge's launches)."""
        if self.nonfinite is not None:
            raise_if_nonfinite(models, list(self.row or self.offset), self.nonfinite)

    @property
    def pair(self) -> tuple[Tensor, Tensor]:
        return self.threshold, self.tie_limit

    def of(self, name: str) -> tuple[tuple[Tensor, Tensor], int]:
        """(trim pair, offset) for one tensor, as the ops take them."""
        if self.row:
            i = self.row[name]
            return (self.threshold[i], self.tie_limit[i]), 0
        return self.pair, self.offset[name]

    def of_batch(self, names: list[str]) -> tuple[tuple[Tensor, Tensor], list[int]]:
        """(trim pair, offsets) for a list of tensors, as the multi-tensor ops take them: [n, T]
        rows (a view when the rows are consecutive) or the [T] pair with each tensor's offset."""
        if self.row:
            rows = [self.row[n] for n in names]
            if rows == list(range(rows[0], rows[0] + len(rows))):
                pick = slice(rows[0], rows[0] + len(rows))
            else:
                pick = torch.tensor(rows, device=self.threshold.device)
            return (self.threshold[pick], self.tie_limit[pick]), []
        return self.pair, [self.offset[n] for n in names]


@dataclass
class Precomputed:
    """What a method needs from the whole model when it runs on a part of it (the streaming
    engine, neurokern.engine): global-scope trims (offsets of the part's tensors) and
    NeuroMerging's default lambda_2. None fields are computed from the models given."""

    trims: Optional[Trims] = None
    scale: Optional[float] = None


def keep_count(numel: int, density: float, rule: str) -> int:
    """How many entries a trim keeps (the k of magnitude_threshold).

    "exact_k": mergekit's max(1, floor(density * N)), ties broken by position.
    "keep":    the TIES / NeuroMerging reference: m = floor(N * (1 - density)); the m-th smallest
               |tau| is the threshold and every entry >= it is kept (all of them when m = 0), i.e.
               the (N - m + 1)-th largest with ties kept."""
    if numel == 0:
        return 0
    if rule == "exact_k":
        return max(1, int(density * numel))
    dropped = int(numel * (1 - density))
    return numel if dropped == 0 else numel - dropped + 1


def thresholds(models: ModelSet, names: list[str], densities: list[float], rule: str, scope: str) -> Trims:
    """Exact trims for `names`, over each tensor alone (scope "tensor") or all of them ("global");
    densities holds one density per task. Where models.finite_checked is False the select also
    flags NaN / Inf (Trims.check_finite raises for them)."""
    T = models.num_tasks
    base = [models.base[n] for n in names]
    finetuned = [models.finetuned[t][n] for t in range(T) for n in names]
    keep_ties = rule == "keep"
    flags = None if models.finite_checked else torch.empty(len(names), dtype=torch.int32, device=base[0].device)
    if scope == "global":
        total = sum(b.numel() for b in base)
        threshold, tie_limit = ops.magnitude_threshold(
            base, finetuned, [keep_count(total, d, rule) for d in densities], keep_ties, nonfinite=flags)
        offsets, offset = {}, 0
        for n, b in zip(names, base):
            offsets[n] = offset
            offset += b.numel()
        return Trims(threshold, tie_limit, {}, offsets, flags)
    # a model's tensors come in a few shapes: one row of counts per distinct size
    numels = [b.numel() for b in base]
    rows = {m: [keep_count(m, d, rule) for d in densities] for m in set(numels)}
    k = [count for m in numels for count in rows[m]]
    threshold, tie_limit = ops.magnitude_threshold(base, finetuned, k, keep_ties, per_tensor=True, nonfinite=flags)
    return Trims(threshold, tie_limit, {n: i for i, n in enumerate(names)}, {}, flags)


def group(models: ModelSet, name: str) -> tuple[Tensor, list[Tensor]]:
    return models.base[name], [sd[name] for sd in models.finetuned]
