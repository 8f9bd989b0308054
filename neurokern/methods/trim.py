"""Magnitude trims of task vectors, as the methods use them: the exact thresholds of a set of
tensors (each alone or all together), and the L1 sums of what a trim keeps."""
from dataclasses import dataclass

import torch
from torch import Tensor

from neurokern import ops
from neurokern.methods.method import columns
from neurokern.models import ModelSet

INT64_MAX = torch.iinfo(torch.int64).max


@dataclass
class Trims:
    """Exact magnitude trims of a set of tensors: (threshold, tie_limit) of shape [T] for one scope
    over all of them, or [n, T] for each tensor alone, and where each tensor sits in them."""

    threshold: Tensor
    tie_limit: Tensor
    row: dict[str, int]  # per-tensor scope: the tensor's row
    offset: dict[str, int]  # global scope: the tensor's first flat position

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


RULES = ("exact_k", "keep", "keep_floor")


def keeps_ties(rule: str) -> bool:
    """Whether a keep_count rule keeps every entry tied with the threshold."""
    return rule != "exact_k"


def keep_count(numel: int, density: float, rule: str) -> int:
    """How many entries a trim keeps (the k of magnitude_threshold).

    "exact_k":    mergekit's max(1, floor(density * N)), ties broken by position.
    "keep":       the NeuroMerging reference: m = floor(N * (1 - density)); the m-th smallest
                  |tau| is the threshold and every entry >= it is kept (all of them when m = 0),
                  i.e. the (N - m + 1)-th largest with ties kept: ceil(density * N) + 1 where
                  density * N is not a whole number.
    "keep_floor": FusionBench's and the TIES paper's code: m = N - floor(N * density), the m-th
                  smallest and every entry >= it, i.e. the (floor(density * N) + 1)-th largest with
                  ties kept (all entries when that exceeds N, where FusionBench's kthvalue fails)."""
    if numel == 0:
        return 0
    if rule == "exact_k":
        return max(1, int(density * numel))
    if rule == "keep_floor":
        return min(numel, int(numel * density) + 1)
    dropped = int(numel * (1 - density))
    return numel if dropped == 0 else numel - dropped + 1


def thresholds(models: ModelSet, names: list[str], densities: list[float], rule: str, scope: str) -> Trims:
    """Exact trims for `names`, over each tensor alone (scope "tensor") or all of them ("global");
    densities holds one density per task. The select, which reads every entry, also flags NaN /
    Inf for the caller's check (models.check), where the inputs are not checked yet."""
    base, finetuned = columns(models, names)
    keep_ties = keeps_ties(rule)
    flags = models.check.input_flags(names, base[0].device) if base else None
    if scope == "global":
        total = sum(b.numel() for b in base)
        threshold, tie_limit = ops.magnitude_threshold(
            base, finetuned, [keep_count(total, d, rule) for d in densities], keep_ties, nonfinite=flags)
        offsets, offset = {}, 0
        for n, b in zip(names, base):
            offsets[n] = offset
            offset += b.numel()
        return Trims(threshold, tie_limit, {}, offsets)
    # a model's tensors come in a few shapes: one row of counts per distinct size
    numels = [b.numel() for b in base]
    rows = {m: [keep_count(m, d, rule) for d in densities] for m in set(numels)}
    k = [count for m in numels for count in rows[m]]
    threshold, tie_limit = ops.magnitude_threshold(base, finetuned, k, keep_ties, per_tensor=True, nonfinite=flags)
    return Trims(threshold, tie_limit, {n: i for i, n in enumerate(names)}, {})


def tensor_l1(base: Tensor, finetuned: list[Tensor], trim: tuple[Tensor, Tensor], offset: int) -> Tensor:
    """float64 [T, 2] trim_l1 of one tensor under a trim whose tie limits count from `offset`.
    Summed over tensors in the model's order this equals one ops.trim_l1 over the whole list (the
    kernel adds per-tensor sums in that order), whatever the split into units or ranks."""
    threshold, tie_limit = trim
    if offset:
        tie_limit = torch.where(tie_limit == INT64_MAX, tie_limit, (tie_limit - offset).clamp_min(0))
    return ops.trim_l1([base], list(finetuned), (threshold, tie_limit))
