"""Small helpers shared by the op faces."""
from typing import Optional, Sequence

from torch import Tensor


def contiguous(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.contiguous() for t in tensors]


def trim_args(trim: Optional[tuple[Tensor, Tensor]]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(threshold, tie_limit) from magnitude_threshold, or (None, None) for no trim."""
    if trim is None:
        return None, None
    threshold, tie_limit = trim
    return threshold, tie_limit
