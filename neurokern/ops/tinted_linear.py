"""Task-routed linear layer for batches that mix tasks, with autograd, and the routing it runs on."""
from typing import Optional

import torch
from torch import Tensor


def tinted_route(task_ids: Tensor, num_tasks: int) -> tuple[Tensor, Tensor]:
    """(perm [B], bounds [T + 1]), int64 on task_ids' device: the rows of task t are
    perm[bounds[t]:bounds[t + 1]], in batch order (a stable sort by task id). The ids must lie in
    [0, num_tasks): they are not checked (no host sync)."""
    return torch.ops.neurokern.tinted_route.default(task_ids, num_tasks)


def tinted_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], task_ids: Tensor,
                  perm: Optional[Tensor] = None, bounds: Optional[Tensor] = None) -> Tensor:
    """y[b] = x[b] @ weight[task_ids[b]].T + bias[task_ids[b]]; weight [T, out, in], bias [T, out].

    perm, bounds: tinted_route(task_ids, T), for callers that run many layers on one batch: the op
    and its backward then use them as they are (no routing, no id check, no host sync). Without
    them the op routes the rows and checks every id (one host sync on a GPU); its backward routes
    once more, unchecked."""
    return torch.ops.neurokern.tinted_linear.default(x, weight, bias, task_ids, perm, bounds)


@torch.library.register_fake("neurokern::tinted_route")
def _(task_ids, num_tasks):
    return (task_ids.new_empty(task_ids.shape, dtype=torch.int64),
            task_ids.new_empty((num_tasks + 1,), dtype=torch.int64))


@torch.library.register_fake("neurokern::tinted_linear")
def _(x, weight, bias, task_ids, perm=None, bounds=None):
    return x.new_empty((x.shape[0], weight.shape[1]))


@torch.library.register_fake("neurokern::tinted_linear_weight_grad")
def _(grad, x, task_ids, num_tasks, perm=None, bounds=None):
    return x.new_empty((num_tasks, grad.shape[1], x.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, task_ids, perm, bounds = inputs
    ctx.save_for_backward(x, weight, task_ids, perm, bounds)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight, task_ids, perm, bounds = ctx.saved_tensors
    T = weight.shape[0]
    if perm is None:  # the forward checked the ids
        perm, bounds = tinted_route(task_ids, T)
    grad = grad.contiguous()
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:  # dx[b] = grad[b] @ weight[task_ids[b]]: W^T read in place
        grad_x = torch.ops.neurokern.tinted_linear.default(grad, weight.transpose(1, 2), None, task_ids, perm, bounds)
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.neurokern.tinted_linear_weight_grad.default(grad, x, task_ids, T, perm, bounds)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.new_zeros((T, grad.shape[1])).index_add_(0, task_ids.long(), grad)
    return grad_x, grad_w, grad_b, None, None, None


torch.library.register_autograd("neurokern::tinted_linear", _backward, setup_context=_setup_context)
