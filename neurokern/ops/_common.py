"""Small helpers shared by the op faces."""
from typing import Optional, Sequence

import torch
from torch import Tensor


def contiguous(tensors: Sequence[Tensor]) -> list[Tensor]:
    # is_contiguous first: .contiguous() goes through the dispatcher (about a microsecond a
    # tensor, a millisecond over a model's list of tensors) even when it returns the tensor itself
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


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
