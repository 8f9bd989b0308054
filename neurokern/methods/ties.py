"""TIES merging (Yadav et al. 2023) with mergekit's semantics by default; every variant of
classic-methods.md is a parameter (docs/method-variants.md: which tool each value follows)."""
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from neurokern import ops, params
from neurokern.methods.global_trim import GlobalTrimPass
from neurokern.methods.method import Method, batches, columns, group, ties_merges
from neurokern.methods.passes import Pass, PassContext
from neurokern.methods.trim import RULES, Trims, thresholds
from neurokern.models import ModelSet

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
        ties=params.choice(WHERE, "ties", p["ties"], list(RULES)),
        elect_on=params.choice(WHERE, "elect_on", p["elect_on"], ["weighted", "unweighted"]),
        zero_sign=params.choice(WHERE, "zero_sign", p["zero_sign"], ["positive", "majority", "model_majority"]),
    )


def passes(p: Params) -> list[Pass]:
    trim = [GlobalTrimPass(p.density, p.ties)] if p.trim_scope == "global" else []
    return trim + ([ModelMajority(p)] if p.zero_sign == "model_majority" else [])


def votes(base: Tensor, finetuned: list[Tensor], p: Params, trim: tuple[Tensor, Tensor], offset: int):
    """One tensor's contributions d [T, ...] (float32 w_t * trim(tau_t)), voting values e and votes
    (float64), formed as ops.ties_merge forms them: the same trim rule, the same float32 products,
    the votes summed over the tasks in task order."""
    threshold, tie_limit = trim
    position = offset + torch.arange(base.numel(), device=base.device).view(base.shape)
    d, e = [], []
    for t, f in enumerate(finetuned):
        tau = f.float() - base.float()
        magnitude = tau.abs()
        keep = (magnitude > threshold[t]) | ((magnitude == threshold[t]) & (position < tie_limit[t]))
        tau = torch.where(keep, tau, torch.zeros_like(tau))
        weighted = tau * torch.tensor(p.weights[t], dtype=torch.float32, device=base.device)
        d.append(weighted)
        e.append(weighted if p.elect_on == "weighted" else tau)
    vote = torch.zeros(base.shape, dtype=torch.float64, device=base.device)
    for value in e:
        vote += value.double() if p.consensus == "sum" else torch.sign(value).double()
    return torch.stack(d), torch.stack(e), vote


def elected_sign_sum(models: ModelSet, trims: Trims, p: Params) -> Tensor:
    """int64 sum over every entry of models.names of its elected sign (+1, -1, 0 on a zero vote)."""
    total = torch.zeros((), dtype=torch.int64, device=models.base[models.names[0]].device)
    for name in models.names:
        base, finetuned = group(models, name)
        total += torch.sign(votes(base, finetuned, p, *trims.of(name))[2]).sum().long()
    return total


def model_majority(models: ModelSet, trims: Trims, p: Params) -> int:
    """FusionBench's fallback sign for a zero vote: the sign of the elected signs summed over the
    whole model (its resolve_zero_signs on the flattened model)."""
    return int(torch.sign(elected_sign_sum(models, trims, p)))


def negative_side(merged: Tensor, base: Tensor, finetuned: list[Tensor], p: Params, trim, offset: int) -> Tensor:
    """merged with every zero-vote entry recomputed as if the negative sign were elected (a fallback
    of -1, or of 0: where(sign > 0, e > 0, e < 0) keeps the negative side), with the op's arithmetic:
    float64 sums in task order, base + float32(scale * mean)."""
    d, e, vote = votes(base, finetuned, p, trim, offset)
    zero = vote == 0
    if not bool(zero.any()):
        return merged
    agree = e < 0
    total = torch.zeros_like(vote)
    weight = torch.zeros_like(vote)
    count = torch.zeros_like(vote)
    for t in range(len(finetuned)):
        total += torch.where(agree[t], d[t].double(), 0.0)
        weight += agree[t].double() * p.weights[t]
        count += agree[t].double()
    if p.normalize == "weights":
        total = total / torch.where(weight == 0, 1.0, weight)
    elif p.normalize == "count":
        total = total / count.clamp_min(1)
    fixed = (base.float() + (p.scale * total).float()).to(base.dtype)
    return torch.where(zero, fixed, merged)


class ModelMajority(Pass):
    """model_majority over a model streamed in units: the elected signs summed over every merged
    tensor (under the global trims of the pass before it, or each tensor's own), across ranks."""

    key = "zero_sign"
    reads = ("votes",)

    def __init__(self, p: Params):
        self.p = p

    def begin(self, ctx: PassContext, pre: Mapping[str, Any]) -> None:
        self.trims = pre.get(GlobalTrimPass.key)
        self.total = torch.zeros((), dtype=torch.int64, device=ctx.device)

    def accumulate(self, read: int, models: ModelSet) -> None:
        trims = self.trims or thresholds(models, models.names, self.p.density, self.p.ties, "tensor")
        self.total += elected_sign_sum(models, trims, self.p)

    def reduce(self, read: int, ctx: PassContext) -> None:
        self.sign = int(torch.sign(ctx.sum_(self.total.view(1))[0]))

    def result(self) -> int:
        return self.sign

    def dump(self, result: int) -> int:
        return result

    def load(self, data: Any, ctx: PassContext) -> int:
        if data not in (-1, 0, 1) or isinstance(data, bool):
            raise ValueError("a sign (-1, 0 or 1) expected")
        return int(data)


def run(models, p: Params, progress: bool, pre: Optional[Mapping[str, Any]] = None):
    pre = pre or {}
    trims = pre.get(GlobalTrimPass.key) or thresholds(models, models.names, p.density, p.ties, p.trim_scope)
    zero_sign, fallback = p.zero_sign, 1
    if p.zero_sign == "model_majority":
        fallback = pre[ModelMajority.key] if ModelMajority.key in pre else model_majority(models, trims, p)
        # the op elects + on a zero vote; a fallback of -1 or 0 takes the negative side, patched below
        zero_sign = "positive"
    options = dict(consensus=p.consensus, normalize=p.normalize, elect_weighted=p.elect_on == "weighted",
                   zero_sign=zero_sign, scale=p.scale)
    out = {}
    for names in batches(models, models.names, progress, "ties"):
        trim, offsets = trims.of_batch(names)
        if fallback > 0:
            merged = ties_merges(models, names, p.weights, trim, offsets, **options)
        else:  # negative_side changes the op's values: no flags for them, the caller's check reads them
            merged = ops.ties_merge_multi(*columns(models, names), p.weights, trim, offsets, **options)
            merged = [negative_side(m, *group(models, n), p, *trims.of(n)) for n, m in zip(names, merged)]
        out.update(zip(names, merged))
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
METHOD = Method("ties", DEFAULTS, resolve, run, passes=passes)
