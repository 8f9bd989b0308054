"""Task arithmetic: theta = theta_0 + scale * sum_t w_t tau_t (normalize: divided by sum_t w_t)."""
from dataclasses import dataclass

import torch

from neurokern import params
from neurokern.errors import NeurokernError
from neurokern.methods.method import Method, batches, weighted_sums
from neurokern.ops import to_device

WHERE = "method 'task_arithmetic'"


@dataclass(frozen=True)
class Params:
    weights: list[float]
    scale: float
    normalize: bool


def resolve(p, num_tasks):
    if p["normalize"] not in (True, False):
        raise NeurokernError(f"{WHERE}: normalize must be True or False; got {p['normalize']!r}")
    return Params(params.weights(WHERE, p["weights"], num_tasks), params.number(WHERE, "scale", p["scale"]), p["normalize"])


def coefficients(p: Params) -> list[float]:
    """[1, c_1, ..., c_T]: theta = theta_0 + sum_t c_t tau_t."""
    factor = p.scale
    if p.normalize:
        total = sum(p.weights)
        factor = p.scale / (1.0 if abs(total) < 1e-8 else total)
    return [1.0] + [factor * w for w in p.weights]


def run(models, p: Params, progress: bool, pre=None):
    coeffs = coefficients(p)
    out = {}
    for names in batches(models, models.names, progress, "task_arithmetic"):
        rows = torch.tensor(coeffs, dtype=torch.float32).expand(len(names), -1)  # one row per tensor
        out.update(zip(names, weighted_sums(models, names, to_device(rows, models.base[names[0]].device))))
    return out


METHOD = Method("task_arithmetic", {"weights": None, "scale": 1.0, "normalize": False}, resolve, run,
                coefficients=coefficients)
