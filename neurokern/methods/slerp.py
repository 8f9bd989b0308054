"""SLERP (mergekit's `slerp`): spherical interpolation from the base (t = 0) to the one fine-tuned
model (t = 1), each tensor taken as one flat vector: with cos = <a, b> / (|a| |b|) and theta =
acos(cos), out = sin((1-t) theta) / sin(theta) a + sin(t theta) / sin(theta) b, and the straight
line (1-t) a + t b where |cos| > 0.9995. A norm of at most 1e-8 counts as 1 (mergekit's guard).
The norms and the dot come from one neuron_stats read (float64), the interpolation is one
weighted_sum call per tensor: out = (c_a + c_b) a + c_b (b - a). `t` may vary over the tensors
(mergekit's gradients and filters: neurokern.params.PerTensor)."""
import math
from dataclasses import dataclass

import torch

from neurokern import params
from neurokern.errors import NeurokernError
from neurokern.methods import vectors
from neurokern.methods.method import Method, group

WHERE = "method 'slerp'"
DOT_THRESHOLD = 0.9995
EPS = 1e-8


@dataclass(frozen=True)
class Params:
    t: float


def resolve(p, num_tasks):
    if num_tasks != 1:
        raise NeurokernError(f"{WHERE}: interpolates the base with exactly one other model; got {num_tasks}")
    return Params(params.number(WHERE, "t", p["t"]))


def coefficients(t: float, square_a: float, square_b: float, dot: float) -> tuple[float, float]:
    """(c_a, c_b) of out = c_a a + c_b b, from |a|^2, |b|^2 and <a, b>."""
    norm_a, norm_b = math.sqrt(square_a), math.sqrt(square_b)
    norm_a = norm_a if norm_a > EPS else 1.0
    norm_b = norm_b if norm_b > EPS else 1.0
    cos = min(1.0, max(-1.0, dot / (norm_a * norm_b)))
    if abs(cos) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def run(models, p: Params, progress: bool, pre=None):
    out = {}
    for name in models.names:
        base, (other,) = group(models, name)
        if base.numel() == 0:
            out[name] = base.clone()
            continue
        square_a, square_b, dot = (float(v) for v in vectors.pair_stats(base, other, "tensor"))
        c_a, c_b = coefficients(p.t, square_a, square_b, dot)
        out[name] = vectors.weighted(base, [other], torch.tensor([[c_a + c_b], [c_b]], dtype=torch.float64), "tensor")
    return out


METHOD = Method("slerp", {"t": 0.5}, resolve, run)
