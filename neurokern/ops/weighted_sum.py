"""Coefficient-weighted sum of the pre-trained tensor and trimmed task vectors, differentiable
with respect to the coefficients (the merged forward of AdaMerging and Tinting), and its per-row
form over a list of matrices (NeuroMerging's merged rows, not differentiable)."""
from typing import Optional, Sequence

import torch
from torch import Tensor

from neurokern.ops._common import any_requires_grad, below_autograd, contiguous, trim_args
from neurokern.ops.finite import nonfinite_flags


def weighted_sum(
    base: Tensor,
    finetuned: Sequence[Tensor],
    coeffs: Tensor,
    trim: Optional[tuple[Tensor, Tensor]] = None,
    offset: int = 0,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """out = coeffs[0] * base + sum_t coeffs[t+1] * trim(finetuned[t] - base).

    coeffs (float32) are [T+1] (per tensor), [T+1, rows] (per row) or [T+1, *base.shape] (per
    element). Differentiable with respect to coeffs only: base and finetuned must not need grad."""
    if base.requires_grad or any_requires_grad(finetuned):
        raise ValueError(
            "neurokern.weighted_sum differentiates only with respect to coeffs; "
            "detach base and finetuned (they are the models being merged)"
        )
    threshold, tie_limit = trim_args(trim)
    coeffs = coeffs.to(torch.float32).contiguous()
    with below_autograd(coeffs):
        return torch.ops.neurokern.weighted_sum.default(
            base.contiguous(), contiguous(finetuned), coeffs, threshold, tie_limit, offset, out_dtype,
        )


@torch.library.register_fake("neurokern::weighted_sum")
def _(base, finetuned, coeffs, threshold=None, tie_limit=None, offset=0, out_dtype=None):
    return base.new_empty(base.shape, dtype=out_dtype or base.dtype)


@torch.library.register_fake("neurokern::weighted_sum_backward")
def _(grad, base, finetuned, coeffs, threshold=None, tie_limit=None, offset=0):
    return coeffs.new_empty(coeffs.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    base, finetuned, coeffs, threshold, tie_limit, offset, _ = inputs
    ctx.save_for_backward(base, coeffs, threshold, tie_limit, *finetuned)
    ctx.offset = offset


def _backward(ctx, grad):
    base, coeffs, threshold, tie_limit, *finetuned = ctx.saved_tensors
    grad_coeffs = None
    if ctx.needs_input_grad[2]:
        grad_coeffs = torch.ops.neurokern.weighted_sum_backward.default(
            grad.contiguous(), base, finetuned, coeffs, threshold, tie_limit, ctx.offset
        )
    # One gradient per argument the op received, the Tensor[] one as a list: the dispatcher drops
    # trailing arguments equal to their defaults, and torch.library's autograd for ops with tensor
    # lists checks that backward returns exactly the structure of those inputs.
    grads = [None] * len(ctx.needs_input_grad)
    grads[1] = [None] * len(ctx.needs_input_grad[1])
    grads[2] = grad_coeffs
    return tuple(grads)


torch.library.register_autograd("neurokern::weighted_sum", _backward, setup_context=_setup_context)


def weighted_sum_multi(
    base: Sequence[Tensor],
    finetuned: Sequence[Tensor],
    coeffs: Tensor,
    trim: Optional[tuple[Tensor, Tensor]] = None,
    offsets: Optional[Sequence[int]] = None,
    out_dtype: Optional[torch.dtype] = None,
    nonfinite: Optional[Tensor] = None,
) -> list[Tensor]:
    """weighted_sum of every tensor of a list in one call (one launch per storage dtype on a GPU):
    out[i] = coeffs[i, 0] * base[i] + sum_t coeffs[i, t+1] * trim(finetuned[t * n + i] - base[i]).

    coeffs: float32 [n, T+1]. trim: [T] pairs (one scope, tensor i's positions start at
    offsets[i]) or [n, T] pairs (row i trims tensor i). Differentiable with respect to coeffs.
    nonfinite (int32 [n] on the inputs' device), when given, is set to 1 where out[i] holds a NaN
    or Inf and 0 elsewhere: on a GPU in the kernel's own pass, with no read of its own; no gradient
    flows through such a call.

    The kernels check the lists (a tensor that requires grad is a ValueError) and make each tensor
    contiguous: a loop over the lists here cost 0.3 ms a call over a model's hundreds of tensors."""
    threshold, tie_limit = trim_args(trim)
    coeffs = coeffs.to(torch.float32).contiguous()
    if nonfinite is not None:
        return _weighted_sum_multi_flagged(base, finetuned, coeffs, threshold, tie_limit, list(offsets or []),
                                           out_dtype, nonfinite)
    with below_autograd(coeffs):
        return torch.ops.neurokern.weighted_sum_multi.default(
            base, finetuned, coeffs, threshold, tie_limit, list(offsets or []), out_dtype,
        )


def _weighted_sum_multi_flagged(base, finetuned, coeffs, threshold, tie_limit, offsets, out_dtype, nonfinite):
    """weighted_sum_multi with its nonfinite flags: on a GPU the kernel's internal op, which sets
    them in its pass; elsewhere the op, then nonfinite_flags of the outputs."""
    if coeffs.requires_grad and torch.is_grad_enabled():
        raise ValueError("neurokern.weighted_sum_multi: no gradient flows through a call with nonfinite flags; "
                         "detach coeffs or leave nonfinite out")
    if tuple(nonfinite.shape) != (len(base),) or nonfinite.dtype != torch.int32 or not nonfinite.is_contiguous():
        raise ValueError(f"neurokern.weighted_sum_multi: nonfinite must be a contiguous int32 tensor "
                         f"[{len(base)}], got {nonfinite.dtype} {list(nonfinite.shape)}")
    if base and base[0].is_cuda:
        return torch.ops.neurokern._weighted_sum_multi_triton.default(
            base, finetuned, coeffs, threshold, tie_limit, offsets, out_dtype, nonfinite)
    with below_autograd(coeffs):
        out = torch.ops.neurokern.weighted_sum_multi.default(
            base, finetuned, coeffs, threshold, tie_limit, offsets, out_dtype)
    if out:
        nonfinite.copy_(nonfinite_flags(out))  # one read of each output, no temporaries
    return out


@torch.library.register_fake("neurokern::_weighted_sum_multi_triton")
def _(base, finetuned, coeffs, threshold=None, tie_limit=None, offsets=(), out_dtype=None, nonfinite=None):
    return [b.new_empty(b.shape, dtype=out_dtype or b.dtype) for b in base]


@torch.library.register_fake("neurokern::weighted_sum_multi")
def _(base, finetuned, coeffs, threshold=None, tie_limit=None, offsets=(), out_dtype=None):
    if any_requires_grad(base) or any_requires_grad(finetuned):  # the kernels' check, while tracing
        raise ValueError(
            "neurokern.weighted_sum_multi differentiates only with respect to coeffs; "
            "detach base and finetuned (they are the models being merged)"
        )
    return [b.new_empty(b.shape, dtype=out_dtype or b.dtype) for b in base]


@torch.library.register_fake("neurokern::weighted_sum_multi_backward")
def _(grad, base, finetuned, coeffs, threshold=None, tie_limit=None, offsets=()):
    return coeffs.new_empty(coeffs.shape, dtype=torch.float32)


def _setup_context_multi(ctx, inputs, output):
    base, finetuned, coeffs, threshold, tie_limit, offsets, _ = inputs
    ctx.save_for_backward(coeffs, threshold, tie_limit, *base, *finetuned)
    ctx.num_base = len(base)
    ctx.offsets = list(offsets)


def _backward_multi(ctx, grads):
    coeffs, threshold, tie_limit, *tensors = ctx.saved_tensors
    base, finetuned = contiguous(tensors[:ctx.num_base]), contiguous(tensors[ctx.num_base:])
    grad_coeffs = None
    if ctx.needs_input_grad[2]:
        grads = [torch.zeros_like(b) if g is None else g.contiguous() for g, b in zip(grads, base)]
        grad_coeffs = torch.ops.neurokern.weighted_sum_multi_backward.default(
            grads, base, finetuned, coeffs, threshold, tie_limit, ctx.offsets
        )
    # The structure of the inputs: a list of Nones for each list argument (offsets included).
    out = [[None] * len(need) if isinstance(need, (list, tuple)) else None for need in ctx.needs_input_grad]
    out[2] = grad_coeffs
    return tuple(out)


torch.library.register_autograd(
    "neurokern::weighted_sum_multi", _backward_multi, setup_context=_setup_context_multi
)


def weighted_sum_rows_multi(
    base: Sequence[Tensor],
    finetuned: Sequence[Tensor],
    coeffs: Tensor,
    trim: Optional[tuple[Tensor, Tensor]] = None,
    offsets: Optional[Sequence[int]] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> list[Tensor]:
    """weighted_sum with per-row coefficients of every 2-D tensor of a list in one call (one launch
    per storage dtype on a GPU): with s_i the first row of tensor i in list order,
    out[i][r] = coeffs[0, s_i + r] * base[i][r] + sum_t coeffs[t+1, s_i + r] * trim(tau_t)[r],
    tau_t = finetuned[t * n + i] - base[i] (task-major), bitwise weighted_sum(base[i], its column,
    coeffs[:, s_i : s_i + R_i], ...).

    coeffs: float32 [T+1, sum of rows], e.g. neuromerge_coeffs of neuron_stats_multi's rows. trim:
    [T] pairs (one scope, tensor i's positions start at offsets[i]) or [n, T] pairs (row i trims
    tensor i). Not differentiable (the NeuroMerging coefficients are computed, not learned):
    weighted_sum and weighted_sum_multi carry gradients."""
    if coeffs.requires_grad or any_requires_grad(base) or any_requires_grad(finetuned):
        raise ValueError(
            "neurokern.weighted_sum_rows_multi is not differentiable; use weighted_sum or "
            "weighted_sum_multi for gradients with respect to the coefficients"
        )
    threshold, tie_limit = trim_args(trim)
    return torch.ops.neurokern.weighted_sum_rows_multi.default(
        contiguous(base), contiguous(finetuned), coeffs.to(torch.float32).contiguous(),
        threshold, tie_limit, list(offsets or []), out_dtype,
    )


@torch.library.register_fake("neurokern::weighted_sum_rows_multi")
def _(base, finetuned, coeffs, threshold=None, tie_limit=None, offsets=(), out_dtype=None):
    return [b.new_empty(b.shape, dtype=out_dtype or b.dtype) for b in base]
