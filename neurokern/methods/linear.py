"""Linear (model soup; mergekit's `linear`): theta = sum_i w_i theta_i / sum_i w_i over the models,
the base among them with `base_weight` (0: an average of the fine-tuned models alone). normalize
False: the plain weighted sum. One weighted_sum call per batch of tensors:
theta = c_0 theta_0 + sum_t c_t (theta_t - theta_0) with c_t = w_t / W and c_0 = (w_base + sum_t w_t) / W."""
from dataclasses import dataclass

import torch

from neurokern import params
from neurokern.errors import NeurokernError
from neurokern.methods.method import Method, batches, weighted_sums

WHERE = "method 'linear'"


@dataclass(frozen=True)
class Params:
    weights: list[float]
    base_weight: float
    normalize: bool


def resolve(p, num_tasks):
    if p["normalize"] not in (True, False):
        raise NeurokernError(f"{WHERE}: normalize must be True or False; got {p['normalize']!r}")
    checked = Params(params.weights(WHERE, p["weights"], num_tasks), params.number(WHERE, "base_weight", p["base_weight"]),
                     p["normalize"])
    if checked.normalize and sum(checked.weights) + checked.base_weight == 0:
        raise NeurokernError(f"{WHERE}: the weights sum to 0, and normalize divides by their sum")
    return checked


def coefficients(p: Params) -> list[float]:
    """[c_0, c_1, ..., c_T]: theta = c_0 theta_0 + sum_t c_t tau_t."""
    total = p.base_weight + sum(p.weights)
    divisor = total if p.normalize else 1.0
    return [total / divisor] + [w / divisor for w in p.weights]


def run(models, p: Params, progress: bool, pre=None):
    coeffs = coefficients(p)
    out = {}
    for names in batches(models, models.names, progress, "linear"):
        rows = torch.tensor(coeffs, dtype=torch.float32).expand(len(names), -1).contiguous()
        out.update(zip(names, weighted_sums(models, names, rows.to(models.base[names[0]].device))))
    return out


# a config with a base_model gives it a weight
METHOD = Method("linear", {"weights": None, "base_weight": 0.0, "normalize": True}, resolve, run,
                warm_config={"weight": 1.0}, coefficients=coefficients)
