"""Model Stock (Jang et al. 2024; mergekit's `model_stock`): with T >= 2 fine-tuned models and cos
the mean over pairs of the cosine between their task vectors (each clamped to [-1, 1], the
product of the norms clamped to at least 1e-6), t = T cos / (1 + (T-1) cos) and
theta = t * mean_t theta_t + (1 - t) theta_0 = theta_0 + (t / T) sum_t tau_t; t = 0 where
|1 + (T-1) cos| < 1e-6. The cosines are of whole tensors, or of each row (vectors along the last
dimension) with filter_wise. One neuron_stats read gives the Gram of the task vectors (float64),
one weighted_sum call the result."""
from dataclasses import dataclass

import torch

from neurokern.errors import NeurokernError
from neurokern.methods import vectors
from neurokern.methods.method import Method, group

WHERE = "method 'model_stock'"


@dataclass(frozen=True)
class Params:
    layout: str


def resolve(p, num_tasks):
    if num_tasks < 2:
        raise NeurokernError(f"{WHERE}: needs at least 2 fine-tuned models besides the base; got {num_tasks}")
    if p["filter_wise"] not in (True, False):
        raise NeurokernError(f"{WHERE}: filter_wise must be True or False; got {p['filter_wise']!r}")
    return Params("last" if p["filter_wise"] else "tensor")


def interpolation(gram: torch.Tensor) -> torch.Tensor:
    """t per vector from the Gram [V, T, T] of the task vectors."""
    count = gram.shape[1]
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            cosines.append((gram[:, i, j] / (norms[:, i] * norms[:, j]).clamp_min(1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), count * cos / torch.where(singular, torch.ones_like(cos), denominator))


def run(models, p: Params, progress: bool, pre=None):
    out = {}
    for name in models.names:
        base, finetuned = group(models, name)
        if base.numel() == 0:
            out[name] = base.clone()
            continue
        gram, _, _ = vectors.stats(base, finetuned, p.layout)
        t = interpolation(gram)
        count = len(finetuned)
        coeffs = torch.stack([torch.ones_like(t)] + [t / count] * count)
        out[name] = vectors.weighted(base, finetuned, coeffs.cpu(), p.layout)
    return out


# filter_wise on tensors of more than 2 dimensions: coefficients expanded per element
METHOD = Method("model_stock", {"filter_wise": False}, resolve, run, work_bytes=lambda num_tasks: 4 * (num_tasks + 1) + 16)
