import pytest
import torch

# Shapes of a small model: odd sizes, one-row and one-column matrices, vectors, an empty matrix.
SHAPES = {
    "embed.weight": (37, 16),
    "layer.q.weight": (16, 16),
    "layer.up.weight": (33, 16),
    "layer.down.weight": (16, 33),
    "layer.bias": (33,),
    "norm.weight": (16,),
    "head.weight": (1, 16),
    "proj.weight": (9, 1),
    "empty.weight": (0, 5),
}


def make_models(T, dtype=torch.float32, seed=0, shapes=SHAPES, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    fts = [
        {k: (v.float() + noise * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        for _ in range(T)
    ]
    return base, fts


@pytest.fixture
def models():
    return make_models


def delta_error(out, ref, base):
    """|out - ref| relative to the reference's merged delta, with the storage rounding of the output
    (4 float32 ulps of |base|) allowed on top: err <= tol is the pass criterion."""
    out, ref, base = out.double(), ref.double(), base.double()
    eps = torch.finfo(torch.float32).eps
    allowed = (ref - base).norm() + 4 * eps * base.norm() / 1e-4
    return float((out - ref).norm() / allowed.clamp_min(1e-30))
