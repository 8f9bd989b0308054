"""The classifier every family shares: a family's encoder (x -> features) and one linear head per
task."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Classifier(nn.Module):
    """head(encoder(x)): the encoder is shared (and merged), the head belongs to one task."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def new_head(hidden: int, num_labels: int, seed: int) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden, num_labels)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=gen)
        head.bias.zero_()
    return head


def encoder_state(encoder: nn.Module) -> dict[str, Tensor]:
    """The mergeable tensors of an encoder (its floating-point parameters and buffers), as detached
    copies: the evaluation loads merged weights into an encoder in place, which must not change
    these."""
    return {k: v.detach().clone() for k, v in encoder.state_dict().items() if v.is_floating_point()}
