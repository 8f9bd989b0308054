"""NeuroMerging (Fang et al. 2025) in Gram form: trim, per-neuron statistics, a T x T solve per
neuron, then the coefficient-weighted sums of the rows (neuromerging.md, "The fast form"). Each
batch of tensors costs one call per step: the statistics and the weighted sums of all its
matrices, one solve for all their rows, and one TIES merge of its point parameters."""
from dataclasses import dataclass
from typing import Optional

import torch

from neurokern import ops, params
from neurokern.errors import NeurokernError
from neurokern.methods._common import Method, Precomputed, batches, columns, thresholds
from neurokern.models import nonfinite, raise_if_unrepresentable

WHERE = "method 'neuromerging'"


@dataclass(frozen=True)
class Params:
    density: list[float]  # one per model
    scale: Optional[float]  # lambda_2 (orthogonal); None: 1 / (1 - sigma)
    scale_parallel: float  # lambda_1; 0 is lite mode
    trim_scope: str
    parallel_basis: str
    gamma: float


def resolve(p, num_tasks):
    gamma = params.number(WHERE, "gamma", p["gamma"])
    if not 0.0 < gamma <= 1.0:
        raise NeurokernError(f"{WHERE}: gamma must be in (0, 1]; got {gamma}")
    return Params(
        density=params.densities(WHERE, p["density"], num_tasks),
        scale=None if p["scale"] is None else params.number(WHERE, "scale", p["scale"]),
        scale_parallel=params.number(WHERE, "scale_parallel", p["scale_parallel"]),
        trim_scope=params.choice(WHERE, "trim_scope", p["trim_scope"], ["global", "tensor"]),
        parallel_basis=params.choice(WHERE, "parallel_basis", p["parallel_basis"], ["unit", "neuron"]),
        gamma=gamma,
    )


def default_scale(sums) -> float:
    """lambda_2 = 1 / (1 - sigma), sigma = max_t |trimmed-away tau_t|_1 / |tau_t|_1 (from trim_l1)."""
    total, kept = sums[:, 0], sums[:, 1]
    sigma = max(float(1 - k / t) if t > 0 else 0.0 for t, k in zip(total, kept))
    return 1.0 / (1.0 - sigma)


def run(models, p: Params, progress: bool, pre: Precomputed = Precomputed()):
    names = models.names
    trims = pre.trims or thresholds(models, names, p.density, "keep", p.trim_scope)
    lam_orth = p.scale if p.scale is not None else pre.scale
    if lam_orth is None:
        lam_orth = default_scale(ops.trim_l1(*columns(models, names), trims.pair))
    lam_par = p.scale_parallel
    # Point parameters: lambda (lite) or the mean of both (full), as the reference does.
    point_scale = lam_orth if lam_par == 0 else (lam_par + lam_orth) / 2
    out = {}
    for batch in batches(models, names, progress, "neuromerging"):
        matrices = [n for n in batch if models.base[n].dim() == 2]
        points = [n for n in batch if models.base[n].dim() != 2]
        if matrices:  # one solve for the neurons of every matrix of the batch (rows are independent)
            base, finetuned = columns(models, matrices)
            trim, offsets = trims.of_batch(matrices)
            gram, dots, sqnorm = ops.neuron_stats_multi(base, finetuned, trim, offsets)
            coeffs = ops.neuromerge_coeffs(gram, dots, sqnorm, lam_par, lam_orth, p.parallel_basis, p.gamma)
            out.update(zip(matrices, ops.weighted_sum_rows_multi(base, finetuned, coeffs, trim, offsets)))
        if points:
            base, finetuned = columns(models, points)
            trim, offsets = trims.of_batch(points)
            out.update(zip(points, ops.ties_merge_multi(
                base, finetuned, [1.0] * models.num_tasks, trim, offsets, consensus="sum", normalize="count",
                elect_weighted=False, zero_sign="majority", scale=point_scale,
            )))
    trims.check_finite(models)
    merged = [out[name] for name in names]
    raise_if_unrepresentable(models, names, nonfinite(merged))
    return dict(zip(names, merged))


DEFAULTS = {
    "density": 0.1,
    "scale": None,
    "scale_parallel": 0.0,
    "trim_scope": "global",
    "parallel_basis": "unit",
    "gamma": 1.0,
}
METHOD = Method("neuromerging", DEFAULTS, resolve, run, checks_finite=True)
