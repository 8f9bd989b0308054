"""Small helpers shared by the op faces."""
import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor


def contiguous(tensors: Sequence[Tensor]) -> list[Tensor]:
    # is_contiguous first: .contiguous() goes through the dispatcher (about a microsecond a
    # tensor, a millisecond over a model's list of tensors) even when it returns the tensor itself
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def any_requires_grad(tensors: Sequence[Tensor]) -> bool:
    return any(t.requires_grad for t in tensors)


def below_autograd(coeffs: Tensor):
    """The context of a differentiable op's call: where no gradient can flow (coeffs needs none,
    or grad mode is off) the call skips the autograd layer, which for a list op costs a pass in
    Python over every tensor (torch.library's autograd wrapper looks for one that needs a
    gradient) and a second dispatch: 0.2 ms a call over a model's hundreds of tensors on the H200
    machines. Traced by torch.compile, the call keeps it (the graph's own autograd decides)."""
    if torch.compiler.is_compiling() or (coeffs.requires_grad and torch.is_grad_enabled()):
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def trim_args(trim: Optional[tuple[Tensor, Tensor]]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(threshold, tie_limit) from magnitude_threshold, or (None, None) for no trim."""
    if trim is None:
        return None, None
    threshold, tie_limit = trim
    return threshold, tie_limit


def to_device(host: Tensor, device) -> Tensor:
    """A small host tensor (tables, coefficients) on `device` without a host sync: a plain copy
    from pageable memory waits for the stream to drain, which would stall the host at every launch
    and leave the GPU idle while the host prepares the next one."""
    if torch.device(device).type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.contiguous().pin_memory().to(device, non_blocking=True)
