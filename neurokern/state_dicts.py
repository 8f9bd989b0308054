"""User models (state dicts or nn.Modules) as name -> tensor: the input of nk.merge and nk.tint."""
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from neurokern.errors import NeurokernError


def as_state_dict(model: Any, what: str) -> dict[str, Tensor]:
    """model's tensors by name, none of them tracking gradients (a merge is no training step)."""
    if isinstance(model, torch.nn.Module):
        return model.state_dict()  # detached already (keep_vars=False)
    if isinstance(model, Mapping):
        out = dict(model)
        for key, value in out.items():
            if not isinstance(value, Tensor):
                raise NeurokernError(f"{what}[{key!r}] is a {type(value).__name__}, expected a torch.Tensor")
            # detach only where it changes something: a new tensor object costs about a
            # microsecond, a millisecond or more over a model of several copies
            if value.requires_grad:
                out[key] = value.detach()
        return out
    raise NeurokernError(f"{what} must be a state dict (name -> tensor) or an nn.Module; got {type(model).__name__}")
