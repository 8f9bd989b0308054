"""Task arithmetic: theta = theta_0 + scale * sum_t w_t tau_t (normalize: divided by sum_t w_t)."""
from dataclasses import dataclass

import torch

from neurokern import ops, params
from neurokern.errors import NeurokernError
from neurokern.methods.method import Method, batches, columns
from neurokern.models import raise_if_unrepresentable
from neurokern.ops._common import to_device

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


def run(models, p: Params, progress: bool, pre=None):
    factor = p.scale
    if p.normalize:
        total = sum(p.weights)
        factor = p.scale / (1.0 if abs(total) < 1e-8 else total)
    coeffs = [1.0] + [factor * w for w in p.weights]
    # NaN / Inf in the inputs: an untrimmed weighted sum holds one wherever an input does (a
    # non-finite tau_t or base stays non-finite times any coefficient, 0 included), so the merge's
    # own flags of non-finite outputs find them, with no read of their own, and a merged value
    # beyond the output dtype's range too; raise_if_unrepresentable tells the two apart.
    flags = None
    if models.names:
        flags = torch.empty(len(models.names), dtype=torch.int32, device=models.base[models.names[0]].device)
    out, done = {}, 0
    for names in batches(models, models.names, progress, "task_arithmetic"):
        base, finetuned = columns(models, names)
        rows = torch.tensor(coeffs, dtype=torch.float32).expand(len(names), -1)  # one row per tensor
        batch_flags = None if flags is None else flags[done:done + len(names)]
        out.update(zip(names, ops.weighted_sum_multi(base, finetuned, to_device(rows, base[0].device),
                                                     nonfinite=batch_flags)))
        done += len(names)
    if flags is not None:
        raise_if_unrepresentable(models, models.names, torch.nonzero(flags).flatten().tolist())
    return out


METHOD = Method("task_arithmetic", {"weights": None, "scale": 1.0, "normalize": False}, resolve, run,
                checks_finite=True)
