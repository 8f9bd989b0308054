"""Rows of a LoRA-adapted weight: the base weight's rows plus ΔW = scale·B·A's, formed in one pass."""
import torch
from torch import Tensor


def lora_add_rows(rows: Tensor, A: Tensor, B: Tensor, scale: float, transposed: bool = False,
                  embedding: bool = False, first: int = 0) -> Tensor:
    """rows += ΔW[first:first + len(rows)] in place; returns rows.

    rows: rows [first, first + n) of a weight (contiguous, float32, bfloat16 or float16). A [r, in]
    and B [out, r] (both float32, or both of one half-precision dtype) as PEFT stores them:
    ΔW = scale·B·A, or (B·A)ᵀ·scale when transposed (embeddings, fan_in_fan_out layers such as
    GPT-2's Conv1D). The arithmetic is PEFT's get_delta_weight and merge on a CPU, bitwise: the
    product in float32, times scale, rounded to the factors' dtype, added to the rows in float32
    and rounded once to their dtype (embedding: ΔW rounded to the weight's dtype first, as PEFT's
    Embedding.merge does). ΔW is formed over blocks of a multiple of 16 of B's rows (or A's
    columns, transposed) or over all of them, as a CPU BLAS forms the whole product's bits
    (tests/engine/test_adapter_math.py), a cache-sized tile at a time, each scaled, rounded and
    added while it is there: one pass over the rows, in one call that does not hold the GIL (the
    engine's reader threads call it side by side).

    A NaN in the rows stays NaN, its bits those of a scalar rounding (torch's vectorized rounding to
    bfloat16 gives another NaN). CPU tensors only: it forms adapted weights on the host, in the
    engine's readers; there is no GPU kernel. The factors' finiteness is the caller's to check."""
    for name, t in (("rows", rows), ("A", A), ("B", B)):
        if t.device.type != "cpu":
            raise ValueError(f"neurokern.lora_add_rows runs on the CPU only (no GPU kernel); {name} is on {t.device}")
    torch.ops.neurokern.lora_add_rows.default(rows, A, B, scale, transposed, embedding, first)
    return rows


@torch.library.register_fake("neurokern::lora_add_rows")
def _(rows, A, B, scale, transposed=False, embedding=False, first=0):
    return None
