"""make_group: a random group of one tensor (the ops tests' and the Triton launcher tests': tests/ops
imports it as .groups, tests/ops/triton as ops.groups)."""
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
