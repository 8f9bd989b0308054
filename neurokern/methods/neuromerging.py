"""NeuroMerging (Fang et al. 2025) in Gram form: trim, per-neuron statistics, a T x T solve per
neuron, then the coefficient-weighted sums of the rows (neuromerging.md, "The fast form"). Each
batch of tensors costs one call per step: the statistics and the weighted sums of all its
matrices, one solve for all their rows, and one TIES merge of its point parameters."""
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from neurokern import ops, params
from neurokern.errors import NeurokernError
from neurokern.methods.global_trim import GlobalTrimPass
from neurokern.methods.method import Method, batches, columns, group, ties_merges
from neurokern.methods.passes import Pass, PassContext
from neurokern.methods.trim import tensor_l1, thresholds
from neurokern.models import ModelSet

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


class DefaultScale(Pass):
    """default_scale over the whole model: the trim_l1 sums of every tensor, under the global trims
    of the pass before it or, without one, each tensor's own trims."""

    key = "scale"
    reads = ("l1",)

    def __init__(self, densities: list[float]):
        self.densities = densities

    def begin(self, ctx: PassContext, pre: Mapping[str, Any]) -> None:
        self.trims = pre.get(GlobalTrimPass.key)
        self.index = {n: i for i, n in enumerate(ctx.names)}
        # each tensor's sums stay on the device (no host sync per tensor) until the read is over
        self.rows = torch.zeros(len(ctx.names), ctx.num_tasks, 2, dtype=torch.float64, device=ctx.device)

    def accumulate(self, read: int, models: ModelSet) -> None:
        trims = self.trims or thresholds(models, models.names, self.densities, "keep", "tensor")
        for name in models.names:
            trim, offset = trims.of(name)
            self.rows[self.index[name]] = tensor_l1(*group(models, name), trim, offset)

    def reduce(self, read: int, ctx: PassContext) -> None:
        rows = ctx.sum_(self.rows).cpu()
        total = torch.zeros(ctx.num_tasks, 2, dtype=torch.float64)
        for row in rows:  # in the model's order, as one trim_l1 over the whole list adds them
            total += row
        self.scale = default_scale(total)

    def result(self) -> float:
        return self.scale

    def dump(self, result: float) -> str:
        return float.hex(result)

    def load(self, data: str, ctx: PassContext) -> float:
        return float.fromhex(data)


def passes(p: Params) -> list[Pass]:
    return ([GlobalTrimPass(p.density, "keep")] if p.trim_scope == "global" else []) + (
        [DefaultScale(p.density)] if p.scale is None else [])


def run(models, p: Params, progress: bool, pre: Optional[Mapping[str, Any]] = None):
    names = models.names
    pre = pre or {}
    trims = pre.get(GlobalTrimPass.key) or thresholds(models, names, p.density, "keep", p.trim_scope)
    lam_orth = p.scale if p.scale is not None else pre.get(DefaultScale.key)
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
            trim, offsets = trims.of_batch(points)
            out.update(zip(points, ties_merges(
                models, points, [1.0] * models.num_tasks, trim, offsets, consensus="sum", normalize="count",
                elect_weighted=False, zero_sign="majority", scale=point_scale,
            )))
    return {name: out[name] for name in names}


DEFAULTS = {
    "density": 0.1,
    "scale": None,
    "scale_parallel": 0.0,
    "trim_scope": "global",
    "parallel_basis": "unit",
    "gamma": 1.0,
}
METHOD = Method("neuromerging", DEFAULTS, resolve, run, passes=passes)
