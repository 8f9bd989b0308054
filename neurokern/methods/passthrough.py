"""Passthrough (mergekit's `passthrough`): the one input model's tensors as they are, each times
`scale` where one is given (mergekit's per-input scale; None: copied). With a merge config's
`slices:` the input is a stack of layers taken from several models (neurokern.config makes that
one model of renamed tensors), which is how frankenmerges are made. A scaled tensor is one
weighted_sum call (scale * theta, computed in float32, rounded once to the tensor's dtype)."""
from dataclasses import dataclass
from typing import Optional

import torch

from neurokern import ops, params
from neurokern.errors import NeurokernError
from neurokern.methods.method import Method

WHERE = "method 'passthrough'"


@dataclass(frozen=True)
class Params:
    scale: Optional[float]


def resolve(p, num_tasks):
    if num_tasks != 0:
        raise NeurokernError(f"{WHERE}: copies one model (the base); got {num_tasks} more")
    return Params(None if p["scale"] is None else params.number(WHERE, "scale", p["scale"]))


def run(models, p: Params, progress: bool, pre=None):
    if p.scale is None or p.scale == 1:
        return {name: models.base[name].clone() for name in models.names}
    coeffs = torch.tensor([p.scale], dtype=torch.float32)
    return {name: ops.weighted_sum(models.base[name], [], coeffs.to(models.base[name].device)) for name in models.names}


METHOD = Method("passthrough", {"scale": None}, resolve, run, warm_config={"scale": 0.5})  # unscaled: a copy
