"""Shared helpers for the op tests: random tensor groups, float64 references, ulp comparisons.

A *group* is a pre-trained tensor `base` and T fine-tuned versions `base + small noise`, stored in
one dtype. Every op forms tau_t = float32(finetuned[t]) - float32(base) and the reference does the
same, so comparisons at the storage dtype are meaningful; `f64_group` rebuilds the same group in
float64 (with the very same float32 task vectors) for references computed in float64.
"""
import zlib
from typing import Sequence

import torch

import neurokern.ops as nk  # noqa: F401  (registers torch.ops.neurokern.*)
from neurokern.ops import reference as ref

from .groups import make_group  # noqa: F401  (the op tests import it from here)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]
# 2-D shapes: 1x1, single row, single column, odd sizes, and a plain one.
SHAPES_2D = [(1, 1), (1, 17), (17, 1), (33, 65), (4, 7)]
# Any-rank shapes for the element-wise ops.
SHAPES_ND = SHAPES_2D + [(7,), (3, 2, 5)]
TASKS = [1, 2, 3, 5, 8]

INT64_MAX = torch.iinfo(torch.int64).max


def seed_of(*parts) -> int:
    """A fixed seed per test case, stable across runs and processes (no hash randomization)."""
    return zlib.crc32(repr(parts).encode())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# A list of tensors for the multi-tensor ops: mixed ranks, odd sizes, an empty tensor, a single element.
LIST_SHAPES = [(33, 65), (0, 4), (17,), (3, 2, 5), (1,), (4, 7)]


def make_list(T, dtypes=(torch.float32,), seed=0, shapes=LIST_SHAPES):
    """n tensors (dtype cycling through dtypes) and their T fine-tuned versions, task-major."""
    bases, columns = [], []
    for i, shape in enumerate(shapes):
        b, fts = make_group(shape, T, dtypes[i % len(dtypes)], seed=seed_of(seed, i))
        bases.append(b)
        columns.append(fts)
    return bases, [columns[i][t] for t in range(T) for i in range(len(bases))]


def list_trims(bases, fts, T, scope, density=0.3):
    """(trim pair, offsets) for a list: scope "global" (one [T] scope over the list, each tensor's
    flat offset), "tensor" ([n, T], offsets None) or "none" (None, None). The threshold op takes one
    dtype: float32 copies give the same float32 task vectors."""
    if scope == "none":
        return None, None
    bases, fts = [b.float() for b in bases], [f.float() for f in fts]
    if scope == "global":
        N = sum(b.numel() for b in bases)
        thr, lim = nk.magnitude_threshold(bases, fts, [max(1, int(density * N))] * T, keep_ties=False)
        offsets, acc = [], 0
        for b in bases:
            offsets.append(acc)
            acc += b.numel()
        return (thr, lim), offsets
    k = [max(1, int(density * b.numel())) for b in bases for _ in range(T)]
    thr, lim = nk.magnitude_threshold(bases, fts, k, keep_ties=False, per_tensor=True)
    return (thr, lim), None


def taus32(base: torch.Tensor, fts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The float32 task vectors every op forms."""
    return [f.float() - base.float() for f in fts]


def f64_group(base: torch.Tensor, fts: Sequence[torch.Tensor]):
    """The same group in float64: base64 = base exactly, and finetuned64 chosen so that
    finetuned64 - base64 is exactly the float32 task vector the kernels form (asserted)."""
    b64 = base.double()
    out = []
    for tau in taus32(base, fts):
        f64 = b64 + tau.double()
        assert torch.equal(f64 - b64, tau.double()), "float64 group does not reproduce tau exactly"
        out.append(f64)
    return b64, out


def trim_for(bases, fts, densities, keep_ties=True):
    """(threshold, tie_limit) from the kernel, global scope over the list, k = density * N per task."""
    N = sum(b.numel() for b in bases)
    k = [int(round(d * N)) for d in densities]
    return nk.magnitude_threshold(bases, fts, k, keep_ties=keep_ties)


def _ordinal(x: torch.Tensor) -> torch.Tensor:
    """Integer ordinal of floats: consecutive representable values have consecutive ordinals
    (+0 and -0 share 0). Works for float32 / bfloat16 / float16."""
    itype = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[x.dtype]
    bits = x.contiguous().view(itype).long()
    sign_bit = 1 << (torch.finfo(x.dtype).bits - 1)
    mag = bits & (sign_bit - 1)
    return torch.where(bits < 0, -mag, mag)


def assert_ulp_close(actual: torch.Tensor, expected64: torch.Tensor, ulps: int = 1):
    """actual (stored in float32 / bf16 / fp16) is within `ulps` units in the last place of the
    float64 expectation correctly rounded to actual's dtype."""
    assert actual.shape == expected64.shape, (actual.shape, expected64.shape)
    assert torch.isfinite(actual.float()).all()
    rounded = expected64.to(actual.dtype)
    dist = (_ordinal(actual) - _ordinal(rounded)).abs()
    if dist.numel():
        worst = int(dist.argmax())
        assert int(dist.max()) <= ulps, (
            f"{int(dist.max())} ulp apart at flat index {worst}: got {actual.flatten()[worst].item()}, "
            f"expected {expected64.flatten()[worst].item()} ({actual.dtype})"
        )


def assert_matches_f64(actual: torch.Tensor, expected64: torch.Tensor, rtol=1e-5, atol=1e-6):
    """Outputs accumulated in float32 (or stored as float32) against a float64 reference:
    rtol 1e-5 with atol 1e-6 for O(1) data; outputs stored in bf16 / fp16 are held to at most one
    ulp of that dtype (the float32 accumulation can move the final rounding by one step, no more)."""
    if actual.dtype in (torch.bfloat16, torch.float16):
        assert_ulp_close(actual, expected64, ulps=1)
    else:
        torch.testing.assert_close(actual.double(), expected64.double(), rtol=rtol, atol=atol)


def flat_positions(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Global flat positions (offset + index) of each tensor in a list scope."""
    out, offset = [], 0
    for t in tensors:
        out.append(offset + torch.arange(t.numel()).view(t.shape))
        offset += t.numel()
    return out


def kept_count(bases, fts, threshold, tie_limit, per_tensor=False) -> list[int]:
    """Entries kept per task by a (threshold, tie_limit) pair, counted with the reference rule."""
    n = len(bases)
    T = len(fts) // n
    counts = []
    for t in range(T):
        c, offset = 0, 0
        for i in range(n):
            tau = ref.task_vector(bases[i], fts[t * n + i])
            if per_tensor:
                c += int(ref.keep_mask(tau, threshold[i, t], tie_limit[i, t], 0).sum())
            else:
                c += int(ref.keep_mask(tau, threshold[t], tie_limit[t], offset).sum())
            offset += bases[i].numel()
        counts.append(c)
    return counts


def opcheck(op, args, kwargs=None, test_utils=None):
    """torch.library.opcheck with every default sub-test unless a test narrows it (with a reason)."""
    if test_utils is None:
        test_utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, kwargs or {}, test_utils=test_utils)
