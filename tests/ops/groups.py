"""make_group: a random group of one tensor (the ops tests' and the Triton launcher tests': tests/ops
imports it as .groups, tests/ops/triton and tests/gpu as ops.groups); near_max_group: one whose
float32 task vectors overflow."""
from typing import Sequence

import torch


def make_group(
    shape,
    T: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    noise: float = 0.02,
    zero_tasks: Sequence[int] = (),
    zero_rows: Sequence[int] = (),
    base_zero_rows: Sequence[int] = (),
    device="cpu",
    exact_grid: bool = False,
    noise_grid: bool = False,
):
    """base ~ N(0, 1) and finetuned[t] = base + noise * N(0, 1) * (1 + t / T), stored in dtype, drawn
    on `device` from one generator seeded with `seed` (base first, then each task's noise).

    zero_tasks: tasks whose fine-tuned tensor equals base (tau_t = 0).
    zero_rows: rows (of dim 0) where every task vector is 0.
    base_zero_rows: rows where base is 0 (zero-norm neurons); the task vectors there stay non-zero.
    exact_grid: base on a 1/8 grid and the noise on a 1/64 grid (exact in every dtype here: many
        equal magnitudes).
    noise_grid: the noise on a grid of noise/8 (a coarse grid: many equal magnitudes, so tie limits
        matter).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(shape, generator=g, device=device)
    if exact_grid:
        base = torch.round(base * 8) / 8
    for r in base_zero_rows:
        base[r] = 0
    fts = []
    for t in range(T):
        delta = noise * (1 + t / T) * torch.randn(shape, generator=g, device=device)
        if exact_grid:
            delta = torch.round(delta * 64) / 64
        if noise_grid:
            delta = torch.round(delta / noise * 8) * noise / 8
        for r in zero_rows:
            delta[r] = 0
        fts.append(base.to(dtype) if t in zero_tasks else (base + delta).to(dtype))
    return base.to(dtype), fts


NEAR_MAX_STEP = 2.0**120  # values k * 2^120, |k| <= 255: bf16 / float32 exact; |tau| up to 510 * 2^120 > 3.4e38


def near_max_group(shape, T: int, dtype: torch.dtype, seed: int = 0):
    """base and T fine-tuned tensors of multiples k * 2^120 of 4, 64 <= |k| <= 252, a third of each
    fine-tuned one on the other side of 0 (tau past float32's range). Convex combinations with
    weights of multiples of 1/4 stay integers k * 2^120 with |k| <= 252: exact in bfloat16."""
    g = torch.Generator().manual_seed(seed)
    k = lambda: 4 * torch.randint(16, 64, shape, generator=g).double() * torch.where(
        torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    base = k()
    fts = []
    for _ in range(T):
        moved = (base + 4 * torch.randint(-4, 5, shape, generator=g).double()).clamp(-252, 252)
        f = torch.where(torch.rand(shape, generator=g) < 0.33, -base.sign() * k().abs(), moved)
        fts.append((f * NEAR_MAX_STEP).to(dtype))
    return (base * NEAR_MAX_STEP).to(dtype), fts


def overflows(base, fts) -> bool:
    """Whether some float32 task vector float32(f) - float32(base) overflows."""
    return any(not bool(torch.isfinite(f.float() - base.float()).all()) for f in fts)
