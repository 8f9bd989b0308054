"""A small model pool built from seeds, no download: FusionBench's program instantiates each model from
modelpool/tiny.yaml by `_target_: tiny_pool.model` (run with this folder on PYTHONPATH)."""
import torch
from torch import nn


def model(task: int = -1) -> nn.Module:
    """The pre-trained MLP (task -1), or fine-tuned model `task`: the same weights plus a small random
    delta of its own."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    if task >= 0:
        g = torch.Generator().manual_seed(1 + task)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net
