"""Task arithmetic: theta = theta_0 + scale * sum_t w_t tau_t (normalize: divided by sum_t w_t)."""
from dataclasses import dataclass

import torch

from neurokern import ops, params
from neurokern.errors import NeurokernError
from neurokern.methods._common import Method, each, group

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


def run(models, p: Params, progress: bool):
    factor = p.scale
    if p.normalize:
        total = sum(p.weights)
        factor = p.scale / (1.0 if abs(total) < 1e-8 else total)
    coeffs = torch.tensor([1.0] + [factor * w for w in p.weights], dtype=torch.float32)
    on_device = {}  # one host-to-device copy of the coefficients per device, not per tensor
    out = {}
    for name in each(models.names, progress, "task_arithmetic"):
        base, finetuned = group(models, name)
        if base.device not in on_device:
            on_device[base.device] = coeffs.to(base.device)
        out[name] = ops.weighted_sum(base, finetuned, on_device[base.device])
    return out


METHOD = Method("task_arithmetic", {"weights": None, "scale": 1.0, "normalize": False}, resolve, run)
