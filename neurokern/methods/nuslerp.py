"""NuSLERP (mergekit's `nuslerp`): spherical interpolation between two models at t = w_2 / (w_1 + w_2)
(0.5 when the weights sum to less than 1e-6 in magnitude), of their task vectors when there is a
base (theta = theta_0 + slerp(t, tau_1, tau_2)) or of the two models themselves when there is none
(use_base=False: the first model plays the base, the second the one fine-tuned model).
nuslerp_flatten (default): each tensor is one vector; otherwise each row (vectors along the last
dimension) or, with nuslerp_row_wise, each column (along the first dimension) is interpolated on
its own. With u = v / max(|v|, 1e-7) and cos = <u_1, u_2> clamped to [-1, 1]: the straight line
where 1 - cos^2 <= 1e-16, else sin((1-t) theta) / sin(theta) v_1 + sin(t theta) / sin(theta) v_2.
Norms and dots from one neuron_stats read (float64), the result from one weighted_sum call."""
from dataclasses import dataclass

import torch

from neurokern import params
from neurokern.errors import NeurokernError
from neurokern.methods import vectors
from neurokern.methods.method import Method, group

WHERE = "method 'nuslerp'"
EPS = 1e-8
NORM_FLOOR = 1e-7


@dataclass(frozen=True)
class Params:
    t: float
    use_base: bool
    layout: str


def _flag(name, value):
    if value not in (True, False):
        raise NeurokernError(f"{WHERE}: {name} must be True or False; got {value!r}")
    return value


def resolve(p, num_tasks):
    use_base = _flag("use_base", p["use_base"])
    want = 2 if use_base else 1
    if num_tasks != want:
        raise NeurokernError(f"{WHERE}: interpolates exactly two models ("
                             + ("besides the base" if use_base else "the first as the base") + f"); got {num_tasks + (not use_base)}")
    weights = params.weights(WHERE, p["weights"], 2)
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    flatten, row_wise = _flag("nuslerp_flatten", p["nuslerp_flatten"]), _flag("nuslerp_row_wise", p["nuslerp_row_wise"])
    return Params(t, use_base, "tensor" if flatten else ("first" if row_wise else "last"))


def _coefficients(t: float, square_1: torch.Tensor, square_2: torch.Tensor, dot: torch.Tensor):
    """(c_1, c_2) per vector, float64."""
    norm_1 = square_1.sqrt().clamp_min(NORM_FLOOR)
    norm_2 = square_2.sqrt().clamp_min(NORM_FLOOR)
    cos = (dot / (norm_1 * norm_2)).clamp(-1, 1)
    straight = (1 - cos * cos) <= EPS ** 2
    theta = torch.acos(torch.where(straight, torch.zeros_like(cos), cos))
    sin = torch.where(straight, torch.ones_like(theta), torch.sin(theta))
    c_1 = torch.where(straight, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin)
    c_2 = torch.where(straight, torch.full_like(cos, t), torch.sin(t * theta) / sin)
    return c_1, c_2


def run(models, p: Params, progress: bool, pre=None):
    out = {}
    for name in models.names:
        base, finetuned = group(models, name)
        if base.numel() == 0:
            out[name] = base.clone()
            continue
        if p.use_base:  # theta_0 + c_1 tau_1 + c_2 tau_2
            gram, _, _ = vectors.stats(base, finetuned, p.layout)
            c_1, c_2 = _coefficients(p.t, gram[:, 0, 0], gram[:, 1, 1], gram[:, 0, 1])
            coeffs = torch.stack([torch.ones_like(c_1), c_1, c_2])
        else:  # c_1 theta_1 + c_2 theta_2 = (c_1 + c_2) theta_1 + c_2 (theta_2 - theta_1)
            square_1, square_2, dot = vectors.pair_stats(base, finetuned[0], p.layout)
            c_1, c_2 = _coefficients(p.t, square_1, square_2, dot)
            coeffs = torch.stack([c_1 + c_2, c_2])
        out[name] = vectors.weighted(base, finetuned, coeffs.cpu(), p.layout)
    return out


# per-column statistics read transposed copies of the models; per-vector coefficients are expanded per element
METHOD = Method("nuslerp", {"weights": None, "use_base": True, "nuslerp_flatten": True, "nuslerp_row_wise": False},
                resolve, run, work_bytes=lambda num_tasks: 8 * (num_tasks + 1) + 16)
