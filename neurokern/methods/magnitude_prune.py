"""Magnitude pruning (PEFT's magnitude_prune): each task vector keeps its largest entries by
magnitude, then a weighted sum, θ0 + scale·Σ_t w_t·trim(τ_t): TIES without the sign election and
the disjoint mean."""
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from neurokern import params
from neurokern.methods.global_trim import GlobalTrimPass
from neurokern.methods.method import Method, batches, weighted_sums
from neurokern.methods.passes import Pass
from neurokern.methods.trim import thresholds

WHERE = "method 'magnitude_prune'"


@dataclass(frozen=True)
class Params:
    density: list[float]  # one per model
    weights: list[float]
    scale: float
    trim_scope: str
    ties: str


def resolve(p, num_tasks):
    return Params(
        density=params.densities(WHERE, p["density"], num_tasks),
        weights=params.weights(WHERE, p["weights"], num_tasks),
        scale=params.number(WHERE, "scale", p["scale"]),
        trim_scope=params.choice(WHERE, "trim_scope", p["trim_scope"], ["tensor", "global"]),
        ties=params.choice(WHERE, "ties", p["ties"], ["exact_k", "keep"]),
    )


def passes(p: Params) -> list[Pass]:
    return [GlobalTrimPass(p.density, p.ties)] if p.trim_scope == "global" else []


def run(models, p: Params, progress: bool, pre: Optional[Mapping[str, Any]] = None):
    trims = (pre or {}).get(GlobalTrimPass.key) or thresholds(models, models.names, p.density, p.ties, p.trim_scope)
    coeffs = [1.0] + [p.scale * w for w in p.weights]
    row = None
    out = {}
    for names in batches(models, models.names, progress, "magnitude_prune"):
        trim, offsets = trims.of_batch(names)
        if row is None:
            row = torch.tensor([coeffs], dtype=torch.float32, device=models.base[names[0]].device)
        out.update(zip(names, weighted_sums(models, names, row.expand(len(names), -1), trim, offsets)))
    return out


DEFAULTS = {"density": 0.2, "weights": None, "scale": 1.0, "trim_scope": "tensor", "ties": "exact_k"}
METHOD = Method("magnitude_prune", DEFAULTS, resolve, run, passes=passes)
