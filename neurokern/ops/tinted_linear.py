"""Task-routed linear layer for batches that mix tasks, with autograd."""
from typing import Optional

import torch
from torch import Tensor


def tinted_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], task_ids: Tensor) -> Tensor:
    """y[b] = x[b] @ weight[task_ids[b]].T + bias[task_ids[b]]; weight [T, out, in], bias [T, out]."""
    return torch.ops.neurokern.tinted_linear.default(x, weight, bias, task_ids)


@torch.library.register_fake("neurokern::tinted_linear")
def _(x, weight, bias, task_ids):
    return x.new_empty((x.shape[0], weight.shape[1]))


@torch.library.register_fake("neurokern::tinted_linear_weight_grad")
def _(grad, x, task_ids, num_tasks):
    return x.new_empty((num_tasks, grad.shape[1], x.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, task_ids = inputs
    ctx.save_for_backward(x, weight, task_ids)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight, task_ids = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:  # dx[b] = grad[b] @ weight[task_ids[b]]
        grad_x = torch.ops.neurokern.tinted_linear.default(
            grad, weight.transpose(1, 2).contiguous(), None, task_ids
        )
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.neurokern.tinted_linear_weight_grad.default(grad, x, task_ids, weight.shape[0])
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.new_zeros((weight.shape[0], grad.shape[1])).index_add_(0, task_ids.long(), grad)
    return grad_x, grad_w, grad_b, None


torch.library.register_autograd("neurokern::tinted_linear", _backward, setup_context=_setup_context)
