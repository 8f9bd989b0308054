"""DARE, fused: counter-based random drop, rescale, weighted sum or TIES election."""
import hashlib
from typing import Sequence

import torch
from torch import Tensor

from neurokern.ops._common import contiguous

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def dare_keys(seed: int, name: str, num_tasks: int) -> list[int]:
    """Generator keys of one tensor, one per task, from (seed, tensor name, model index): the same
    mask on every device, shard split and world size. Returned as signed int64 for the op schema."""
    name_hash = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    keys = []
    for t in range(num_tasks):
        key = _splitmix64(_splitmix64(seed & _MASK64) ^ name_hash ^ _splitmix64(t + 1))
        keys.append(key - (1 << 64) if key >= 1 << 63 else key)
    return keys


def dare(
    base: Tensor,
    finetuned: Sequence[Tensor],
    weights: Sequence[float],
    density: float,
    keys: Sequence[int],
    rescale: str = "density",
    consensus: str = "none",
    normalize: str = "none",
    scale: float = 1.0,
) -> Tensor:
    """base + scale * merge of the DARE-dropped task vectors, in base's dtype.

    Entry i of task t survives iff philox(keys[t], i) (32 bits) < t = floor(density * 2^32 + 0.5),
    with probability p = t / 2^32 (density itself where density * 2^24 is an integer, within 2^-33
    of it elsewhere; nothing below density 2^-33); survivors are rescaled by 1/p ("density", so
    that the expectation is tau_t exactly), by |tau_t|_1 / |kept|_1 ("l1", mergekit) or not
    ("none").
    consensus "none" sums weights[t] * kept_t (dare_linear); "sum" / "count" elect signs first
    (dare_ties, mergekit rules). normalize as in ties_merge."""
    return torch.ops.neurokern.dare.default(
        base.contiguous(), contiguous(finetuned), [float(w) for w in weights], float(density),
        list(keys), rescale, consensus, normalize, float(scale),
    )


@torch.library.register_fake("neurokern::dare")
def _(base, finetuned, weights, density, keys, rescale="density", consensus="none", normalize="none", scale=1.0):
    return torch.empty_like(base)


def dare_multi(
    base: Sequence[Tensor],
    finetuned: Sequence[Tensor],
    weights: Sequence[float],
    density: float,
    keys: Sequence[int],
    rescale: str = "density",
    consensus: str = "none",
    normalize: str = "none",
    scale: float = 1.0,
) -> list[Tensor]:
    """dare of every tensor of a list in one call (one launch per storage dtype on a GPU);
    finetuned is task-major (finetuned[t * n + i] belongs to base[i]); keys[i * T + t] is the
    generator key of tensor i, task t (dare_keys per tensor, concatenated)."""
    return torch.ops.neurokern.dare_multi.default(
        contiguous(base), contiguous(finetuned), [float(w) for w in weights], float(density),
        [int(k) for k in keys], rescale, consensus, normalize, float(scale),
    )


@torch.library.register_fake("neurokern::dare_multi")
def _(base, finetuned, weights, density, keys, rescale="density", consensus="none", normalize="none", scale=1.0):
    return [torch.empty_like(b) for b in base]
