"""mergekit's generalized task arithmetic with a sparsifier no op computes (breadcrumbs'
outlier-and-small trim, DELLA's rank-weighted random drop): each task vector trimmed on its own,
optionally rescaled to its L1 norm before the trim, weighted, a TIES sign election or none,
divided by the (agreeing) weights when normalize, times `scale` (mergekit's lambda).

Plain PyTorch, no op: the sparsifiers need a sort of every task vector (breadcrumbs) or of every
row (DELLA), which the op set has no kernel for; the combination follows mergekit's arithmetic
step by step in float32 (float64 inputs in float64), so float32 inputs give mergekit's bits."""
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from neurokern import params
from neurokern.errors import NeurokernError


@dataclass(frozen=True)
class Params:
    weights: list[float]
    density: list[float]
    extra: list[float]  # breadcrumbs' gamma or DELLA's epsilon, per model
    rescale: bool
    normalize: bool
    scale: float
    consensus: str  # "sum" (TIES election) or "none"
    seed: int


def flag(where: str, name: str, value) -> bool:
    if value in ("l1", True):
        return True
    if value in (None, False, "none"):
        return False
    raise NeurokernError(f"{where}: {name} must be True or False; got {value!r}")


def per_model(where: str, name: str, value, num_tasks: int, check: Callable) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_tasks
    if len(values) != num_tasks:
        raise NeurokernError(f"{where}: {name} has {len(values)} entries for {num_tasks} fine-tuned models; give one per model")
    return [check(v, f"{name}[{i}]" if isinstance(value, (list, tuple)) else name) for i, v in enumerate(values)]


def work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rescaled(delta: Tensor, mask: Tensor, rescale: bool, eps: float = 1e-7) -> Tensor:
    """delta * mask, times |delta|_1 / |delta * mask|_1 when rescale (unless either is below eps)."""
    kept = delta * mask
    if not rescale:
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def merged(base: Tensor, finetuned: list[Tensor], p: Params, trim: Callable[[int, Tensor], Tensor]) -> Tensor:
    """combine of the task vectors of finetuned, each trimmed by trim(model index, delta), in
    float32 (float64 models in float64). Where float32 overflows (a task vector or a sum of inputs
    near the dtype's maximum) the tensor is merged again in float64, so a result that fits its dtype
    comes out finite, as from the kernels; the masks of that run rank float64 magnitudes."""
    def run(dtype: torch.dtype) -> Tensor:
        return combine(base, [trim(i, f.to(dtype) - base.to(dtype)) for i, f in enumerate(finetuned)], p)

    out = run(work_dtype(base))
    return out if out.dtype == torch.float64 or bool(torch.isfinite(out).all()) else run(torch.float64)


def combine(base: Tensor, deltas: list[Tensor], p: Params) -> Tensor:
    """The weighted, elected, normalised, scaled sum of the trimmed task vectors, added to base."""
    stacked = torch.stack(deltas)
    weights = torch.tensor(p.weights, dtype=stacked.dtype, device=stacked.device)
    weights = weights.reshape(-1, *([1] * base.dim()))
    stacked.mul_(weights)
    if p.consensus == "sum":
        majority = (stacked.sum(0) >= 0).to(stacked.dtype) * 2 - 1
        agree = stacked.sign() == majority
        mixed = (stacked * agree).sum(0)
        divisor = (weights * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(0)
        divisor = weights.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if p.normalize:
        mixed /= divisor
    if p.scale != 1:
        mixed *= p.scale
    return (base.to(mixed.dtype) + mixed).to(base.dtype)


def resolve_common(where: str, p: dict, num_tasks: int, extra_name: str, consensus: str) -> Params:
    return Params(
        weights=params.weights(where, p["weights"], num_tasks),
        density=per_model(where, "density", p["density"], num_tasks, lambda v, n: params.density(where, v, n)),
        extra=per_model(where, extra_name, p[extra_name], num_tasks, lambda v, n: params.number(where, n, v)),
        rescale=flag(where, "rescale", p["rescale"]),
        normalize=flag(where, "normalize", p["normalize"]),
        scale=params.number(where, "scale", p["scale"]),
        consensus=consensus,
        seed=params.integer(where, "seed", p.get("seed", 0)),
    )
