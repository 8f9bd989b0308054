"""The vectors that slerp, nuslerp and model_stock measure angles between, and the statistics they
need of them (norms and dots, from the neuron_stats op, float64), then the coefficients back onto
a tensor for the weighted_sum op.

A layout says which vectors of a tensor are measured: "tensor" (the whole tensor, flattened), "last"
(each vector along the last dimension: a 2-D weight's rows; a 1-D tensor is one vector) or "first"
(each vector along the first dimension: a 2-D weight's columns)."""
import torch
from torch import Tensor

from neurokern import ops

LAYOUTS = ("tensor", "last", "first")


def _rows(x: Tensor, layout: str) -> Tensor:
    """x as a 2-D tensor whose rows sum up to (layout "tensor") or are the vectors."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    if layout == "first" and x.dim() > 1:
        return x.movedim(0, -1).reshape(-1, x.shape[0]).contiguous()
    if layout == "tensor" and x.dim() > 1:
        return x.reshape(x.shape[0], -1)
    return x.reshape(-1, x.shape[-1])


def stats(base: Tensor, finetuned: list[Tensor], layout: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per vector: the Gram [V, T, T] of the task vectors finetuned[t] - base, their dots with base
    [V, T] and |base|^2 [V], float64 (V = 1 for the layout "tensor")."""
    gram, dots, square = ops.neuron_stats(_rows(base, layout), [_rows(f, layout) for f in finetuned])
    if layout == "tensor":
        return gram.sum(0, keepdim=True), dots.sum(0, keepdim=True), square.sum(0, keepdim=True)
    return gram, dots, square


def pair_stats(base: Tensor, other: Tensor, layout: str) -> tuple[Tensor, Tensor, Tensor]:
    """|base|^2, |other|^2 and base . other per vector, float64, from one neuron_stats read:
    |other|^2 = |d|^2 + 2 d . base + |base|^2 and base . other = d . base + |base|^2, d = other - base."""
    gram, dots, square = stats(base, [other], layout)
    d_square, d_dot = gram[:, 0, 0], dots[:, 0]
    return square, d_square + 2 * d_dot + square, d_dot + square


def weighted(base: Tensor, finetuned: list[Tensor], coeffs: Tensor, layout: str) -> Tensor:
    """ops.weighted_sum with coefficients [T+1, V] per vector (V as stats gives them): out =
    coeffs[0] * base + sum_t coeffs[t+1] * (finetuned[t] - base)."""
    coeffs = coeffs.to(torch.float32)
    shape = base.shape
    if layout == "tensor" or base.dim() == 0 or (layout == "last" and base.dim() == 1) \
            or (layout == "first" and base.dim() == 1):
        per = coeffs[:, 0].contiguous()
    elif layout == "last" and base.dim() == 2:
        per = coeffs
    elif layout == "last":
        per = coeffs.reshape(-1, *shape[:-1], 1).expand(-1, *shape)
    else:
        per = coeffs.reshape(-1, *shape[1:]).unsqueeze(1).expand(-1, *shape)
    return ops.weighted_sum(base, finetuned, per.to(base.device))
