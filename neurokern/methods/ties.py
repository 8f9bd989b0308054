"""TIES merging (Yadav et al. 2023) with mergekit's semantics by default; every variant of
classic-methods.md is a parameter."""
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from neurokern import ops, params
from neurokern.methods.global_trim import GlobalTrimPass
from neurokern.methods.method import Method, batches, columns
from neurokern.methods.passes import Pass
from neurokern.methods.trim import thresholds
from neurokern.models import nonfinite, raise_if_unrepresentable

WHERE = "method 'ties'"


@dataclass(frozen=True)
class Params:
    density: list[float]  # one per model
    weights: list[float]
    consensus: str
    normalize: str
    scale: float
    trim_scope: str
    ties: str
    elect_on: str
    zero_sign: str


def resolve(p, num_tasks):
    return Params(
        density=params.densities(WHERE, p["density"], num_tasks),
        weights=params.weights(WHERE, p["weights"], num_tasks),
        consensus=params.choice(WHERE, "consensus", p["consensus"], ["sum", "count"]),
        normalize=params.normalize(WHERE, p["normalize"]),
        scale=params.number(WHERE, "scale", p["scale"]),
        trim_scope=params.choice(WHERE, "trim_scope", p["trim_scope"], ["tensor", "global"]),
        ties=params.choice(WHERE, "ties", p["ties"], ["exact_k", "keep"]),
        elect_on=params.choice(WHERE, "elect_on", p["elect_on"], ["weighted", "unweighted"]),
        zero_sign=params.choice(WHERE, "zero_sign", p["zero_sign"], ["positive", "majority"]),
    )


def passes(p: Params) -> list[Pass]:
    return [GlobalTrimPass(p.density, p.ties)] if p.trim_scope == "global" else []


def run(models, p: Params, progress: bool, pre: Optional[Mapping[str, Any]] = None):
    trims = (pre or {}).get(GlobalTrimPass.key) or thresholds(models, models.names, p.density, p.ties, p.trim_scope)
    out = {}
    for names in batches(models, models.names, progress, "ties"):
        base, finetuned = columns(models, names)
        trim, offsets = trims.of_batch(names)
        merged = ops.ties_merge_multi(
            base, finetuned, p.weights, trim, offsets, consensus=p.consensus,
            normalize=p.normalize, elect_weighted=p.elect_on == "weighted", zero_sign=p.zero_sign,
            scale=p.scale,
        )
        out.update(zip(names, merged))
    trims.check_finite(models)
    raise_if_unrepresentable(models, models.names, nonfinite([out[n] for n in models.names]))
    return out


DEFAULTS = {
    "density": 0.2,
    "weights": None,
    "consensus": "sum",
    "normalize": True,
    "scale": 1.0,
    "trim_scope": "tensor",
    "ties": "exact_k",
    "elect_on": "weighted",
    "zero_sign": "positive",
}
METHOD = Method("ties", DEFAULTS, resolve, run, checks_finite=True, passes=passes)
