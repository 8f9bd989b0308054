"""What the Triton kernels of the ops share: launch constants, the argument checks with the C++
kernels' messages, and the @triton.jit helpers every op's kernels are built from (the task vector,
the trim rule, the output rounding, the election's votes and sums, the correctly rounded float64
division). Each op's kernels and launchers live in a module of their own (weighted_sum.py,
ties_merge.py, dare.py, trim_l1.py, neuron_stats.py, subspace_split.py, tinted_linear.py,
key_histogram.py, finite.py), list ops over lists.py's launch tables.

Arithmetic follows the C++ CPU kernels (csrc/cpu/*.cpp, csrc/cpu/election.h) operation for
operation: tau_t = float32(finetuned[t]) - float32(base) is formed in registers (never
materialised), the trim rule compares float32 magnitudes and int64 flat positions, weighted sums are
float32, and where the C++ kernel uses double (the TIES / DARE vote, the disjoint sum and its
divisor, the scale, the DARE rescale, every reduction) the kernels use float64 too. Kernels are
launched with enable_fp_fusion=False (no mul+add contraction), float64 divisions are correctly
rounded (reciprocal + Markstein correction, div_rn), and float32 -> bfloat16 stores round to
nearest even. The element-wise outputs are therefore bitwise equal to the C++ op's (sign elections
included, which float32 votes would flip on near-zero sums; checked on CPU and on an H100);
reductions differ only in the order of their float64 sums. Elements whose float32 result (or
float64 "sum" vote) is NaN / Inf, which finite inputs near the float32 / bfloat16 maximum give when
tau overflows float32, are computed again in float64 from the float64 task vectors, as the C++
kernels do (one max over the block decides; the common path pays that reduction only).

Design (each input element read once per pass, each output written once):
- The T <= MAX_TASKS (8) fine-tuned tensors are separate kernel arguments f0..f7 (unused ones are
  the base pointer) with T a tl.constexpr: the task loop is unrolled at compile time and per-task
  values stay in registers. Per-task scalars (weights, scale, divisors, DARE keys and factors) come
  from one small float64 tensor, thresholds / tie limits from their float32 / int64 [T] tensors.
- Element-wise kernels: 1-D grid of BLOCK = 1024-element programs, 4 warps (256 for the election
  kernels, whose float64 vote and sums spill at larger blocks); DARE works on [BLOCK / 4, 4] tiles
  so that one Philox call serves 4 elements; per-row coefficients: one program per (row, column
  block), the row's coefficients are scalars. Positions are int64, so tensors and offsets past 2^31
  elements work.
- Whole-tensor reductions (weighted_sum_backward per tensor, the TIES "majority" vote, the DARE
  "l1" norms, trim_l1) are deterministic two-stage reductions: each program sums a CHUNK of 8192
  elements in float64 lane accumulators, reduces them once and writes its partial to a buffer;
  torch sums the buffer in float64. No atomics, no host sync (the majority sign and the l1 factors
  stay on the device and are read by the second pass). Per-row gradients: one program per row.

Every launcher takes its op's arguments in schema order (csrc/ops.cpp) and is registered for the
CUDA dispatch key (registry.py); under TRITON_INTERPRET=1 the same launchers run on CPU tensors,
which is how the CPU test suite checks them (tests/ops/triton).
"""
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from neurokern.ops._common import to_device
from neurokern.ops.dtypes import STORAGE_DTYPES


MAX_TASKS = 8
C10_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16", torch.float16: "Half",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
    torch.uint8: "Byte", torch.bool: "Bool",
}
CONSENSUS_CODES = {"none": 0, "sum": 1, "count": 2}
NORMALIZE_CODES = {"none": 0, "weights": 1, "count": 2}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Launch configuration. On a GPU: 1024-element programs of 4 warps (8 elements per thread: 16-byte
# loads of bf16 / fp16) for the plain element-wise kernels; the election kernels hold 2 T values
# per element, so they take 512 elements when T > 4. Triton's interpreter pays per operation and
# per program, not per element: there, programs take 4096 elements (the code path is the same).
BLOCK = 4096 if interpreting() else 1024
NUM_WARPS = 4
# No mul+add contraction: the C++ kernels round products and sums separately.
LAUNCH = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)
# Reductions: programs sum CHUNK elements (per row: a row) in RED_BLOCK-wide steps into float64
# lane accumulators and reduce across lanes once at the end.
RED_BLOCK = 4096 if interpreting() else 512
CHUNK = 4096 if interpreting() else 8192
ELECTION_BLOCKS = (4096, 4096) if interpreting() else (256, 256)  # T <= 4, T > 4 (larger blocks spill on H100)
# Election blocks per program of the TIES merges (ties_merge, ties_merge_multi), and how many
# blocks ahead of the one computed their loads are issued (0: each block's loads just before its
# arithmetic, after the store of the block before, which they waited for). H100, 1.1B set, T=4
# (bench/tune_triton.py --sweeps ties_pipeline): (8, 0) 8.13 ms, (8, 1) 7.80, (4, 1) 7.71, (16, 1)
# 11.8, (8, 4) 13.6; 4 blocks take half the compile time of 8 (the first merge compiles them).
TIES_ITERS = 1 if interpreting() else 4
TIES_AHEAD = 1


def election_block(T: int) -> int:
    return ELECTION_BLOCKS[0] if T <= 4 else ELECTION_BLOCKS[1]


def red_block(accumulators: int) -> int:
    """RED_BLOCK, halved for kernels holding more than 9 float64 accumulators per lane."""
    return RED_BLOCK if accumulators <= 9 else max(RED_BLOCK // 2, 64)


def dtype_name(dtype: torch.dtype) -> str:
    return C10_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def shape_of(t: torch.Tensor) -> str:
    return str(list(t.shape))


def fail(op: str, msg: str):
    raise RuntimeError(f"neurokern.{op}: {msg}")


def check_group(op: str, base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> None:
    """check_group of csrc/cpu/common.h, then the storage-dtype check of dispatch_storage."""
    if not base.is_contiguous():
        fail(op, "base must be contiguous")
    for t, f in enumerate(finetuned):
        if f.shape != base.shape:
            fail(op, f"finetuned[{t}] has shape {shape_of(f)}, base has {shape_of(base)}")
        if f.dtype != base.dtype:
            fail(op, f"finetuned[{t}] is {dtype_name(f.dtype)}, base is {dtype_name(base.dtype)}")
        if f.device != base.device:
            fail(op, f"finetuned[{t}] is on {f.device}, base on {base.device}")
        if not f.is_contiguous():
            fail(op, f"finetuned[{t}] must be contiguous")


def check_storage(op: str, dtype: torch.dtype) -> None:
    if dtype not in STORAGE_DTYPES:
        fail(op, f"expected float32, bfloat16 or float16 tensors, got {dtype_name(dtype)}")


def check_flags(op: str, flags: Optional[torch.Tensor], n: int, device: torch.device) -> None:
    """check_nonfinite_flags of csrc/list_args.h: optional flags, int32 [n], contiguous, on the
    inputs' device."""
    if flags is None:
        return
    if (flags.dtype != torch.int32 or flags.dim() != 1 or flags.shape[0] != n or not flags.is_contiguous()
            or flags.device != device):
        fail(op, f"nonfinite must be a contiguous int32 tensor [{n}] on {device}, got {dtype_name(flags.dtype)} "
                 f"{shape_of(flags)} on {flags.device}")


def trim_pair(op: str, threshold, tie_limit, T: int, device):
    """(threshold float32 [T], tie_limit int64 [T]) on `device`, or (None, None) for no trim."""
    if (threshold is None) != (tie_limit is None):
        fail(op, "threshold and tie_limit must be given together")
    if threshold is None:
        return None, None
    if threshold.numel() != T or tie_limit.numel() != T:
        fail(op, f"threshold and tie_limit need one entry per task ({T}), got "
                  f"{threshold.numel()} and {tie_limit.numel()}")
    thr = threshold.reshape(-1).to(device=device, dtype=torch.float32).contiguous()
    lim = tie_limit.reshape(-1).to(device=device, dtype=torch.int64).contiguous()
    return thr, lim


def task_slots(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The MAX_TASKS pointer arguments f0..f7 (unused ones point at base)."""
    return list(tensors) + [base] * (MAX_TASKS - len(tensors))


def upload(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A small host table (nested lists) on `device`, without a host sync (ops._common.to_device)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def sum_in_order(values) -> float:
    """float64 sum in list order, as the C++ loops (Python 3.12's sum() compensates)."""
    total = 0.0
    for v in values:
        total += float(v)
    return total


def scalar_params(device, values) -> torch.Tensor:
    """Per-call float64 scalars (weights, scale, divisors, keys, factors): one small copy."""
    return upload([float(v) for v in values] or [0.0], torch.float64, device)


def parse_choice(op: str, name: str, table: dict, what: str, allow_none: bool = True):
    if name == "none" and not allow_none or name not in table:
        if what == "consensus":
            choices = '"none", "sum" or "count"' if allow_none else '"sum" or "count"'
        else:
            choices = '"weights", "count" or "none"'
        fail(op, f'{what} must be {choices}, got "{name}"')
    return table[name]


def grid_1d(n: int, block: int) -> tuple[int]:
    return (triton.cdiv(n, block),)


def check_matrix_group(op: str, base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list]:
    """The checks of the per-row ops (neuron_stats, subspace_split): check_group and the 2-D rule; returns contiguous tensors."""
    if base.dtype not in STORAGE_DTYPES:
        raise RuntimeError(f"neurokern.{op}: expected float32, bfloat16 or float16 tensors, got {base.dtype}")
    if base.dim() != 2:
        raise RuntimeError(f"neurokern.{op}: base must be 2-D (rows are neurons), got {base.dim()}-D")
    for t, f in enumerate(finetuned):
        if f.shape != base.shape:
            raise RuntimeError(f"neurokern.{op}: finetuned[{t}] has shape {list(f.shape)}, base has {list(base.shape)}")
        if f.dtype != base.dtype:
            raise RuntimeError(f"neurokern.{op}: finetuned[{t}] is {f.dtype}, base is {base.dtype}")
        if f.device != base.device:
            raise RuntimeError(f"neurokern.{op}: finetuned[{t}] is on {f.device}, base on {base.device}")
    return base.contiguous(), [f.contiguous() for f in finetuned]


def padded(tensors: Sequence[torch.Tensor], filler: torch.Tensor, n: int = MAX_TASKS) -> list[torch.Tensor]:
    """The per-task pointer arguments: the tensors, then `filler` (never read) up to n."""
    return list(tensors) + [filler] * (n - len(tensors))


def interpreter_config(R: int, C: int) -> Optional[dict]:
    """Under TRITON_INTERPRET: few, wide programs (the interpreter pays per operation, not per
    element); None on a GPU."""
    if not interpreting():
        return None
    return dict(ROWS=min(triton.next_power_of_2(max(R, 1)), 64), NT=min(triton.next_power_of_2(max(C, 1)), 128),
                VPT=1, num_warps=1)


@triton.jit
def to_out(x, DT: tl.constexpr):
    """float32 -> the output dtype, rounding to nearest even. bfloat16 is rounded with integer ops:
    Triton's interpreter truncates float32 -> bfloat16 casts, the GPU's cvt.rn rounds; this
    agrees with both the GPU and torch."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + ((bits >> 16) & 1) + 0x7FFF) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DT)
    return y


@triton.jit
def stores_nonfinite(x, DT: tl.constexpr):
    """Where to_out(x, DT) is NaN / Inf, from the float32 x it rounds: x is NaN / Inf, or in
    bfloat16 / float16 |x| reaches the midpoint between the dtype's maximum and the next power of
    two, from which rounding to nearest even gives Inf: (2 - 2^-8) 2^127 (bfloat16, 0x7F7F8000 in
    float32) and 65520 (float16). One compare per element (NaN fails it)."""
    if DT == tl.bfloat16:
        y = ~(tl.abs(x) < 3.39617752923046e38)
    elif DT == tl.float16:
        y = ~(tl.abs(x) < 65520.0)
    else:
        y = is_nonfinite(x)
    return y


@triton.jit
def everywhere(BLOCK: tl.constexpr):
    """An all-true mask: loads under it need no per-element predicate, so a block whose pointers
    are known 16-byte aligned compiles to 16-byte vector loads (a mask `offs < n` with n unknown
    keeps them scalar)."""
    return tl.full([BLOCK], True, tl.int1)


@triton.jit
def widen_f32(x):
    """float32(x) of loaded values. bfloat16 widens by a 16-bit shift (exact, as the cast): written
    out, two elements packed in a 32-bit load widen in one integer op each, where the cast's
    conversion takes two for the upper one (the TIES merge's loads; the other kernels keep the
    cast, which needs fewer registers there)."""
    if x.dtype == tl.bfloat16:
        y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def task_tau(f_ptr, offs, mask, w):
    """float32 task vector entries: float32(finetuned) - float32(base)."""
    return tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32) - w


@triton.jit
def trimmed(tau, pos, thr_ptr, lim_ptr, t: tl.constexpr, TRIM: tl.constexpr):
    """The trim rule: keep |tau| > thr[t], or |tau| == thr[t] at flat position pos < lim[t]."""
    return trimmed_value(tau, tau, pos, thr_ptr, lim_ptr, t, TRIM)


@triton.jit
def trimmed_value(tau, value, pos, thr_ptr, lim_ptr, t: tl.constexpr, TRIM: tl.constexpr):
    """`value` (tau, or the float64 task vector that tau rounds) where the trim keeps tau, else 0."""
    if TRIM:
        thr = tl.load(thr_ptr + t)
        lim = tl.load(lim_ptr + t)
        mag = tl.abs(tau)
        keep = (mag > thr) | ((mag == thr) & (pos < lim))
        value = tl.where(keep, value, 0.0)
    return value


@triton.jit
def is_nonfinite(x):
    """NaN or Inf (x - x is NaN exactly there)."""
    return (x - x) != 0


@triton.jit
def any_set(mask):
    return tl.max(mask.to(tl.int32)) != 0


@triton.jit
def tau_wide(f_ptr, offs, mask, w):
    """(float32 tau, float64 tau): the float64 difference is exact for all finite inputs, where
    the float32 one overflows past 3.4e38 (inputs near the float32 / bfloat16 maximum)."""
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return f - w, f.to(tl.float64) - w.to(tl.float64)


@triton.jit
def task_wide(f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t: tl.constexpr, TRIM: tl.constexpr):
    """float64 trim(tau): the trim decided on the float32 |tau| (+inf where it overflows), as the
    float32 path decides it."""
    tau, wide = tau_wide(f_ptr, offs, mask, w)
    return trimmed_value(tau, wide, pos, thr_ptr, lim_ptr, t, TRIM)


@triton.jit
def reduce_tau(f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t: tl.constexpr, TRIM: tl.constexpr):
    """(|tau|, |trim(tau)|) in float64 for the reductions: the float32 tau, or where it overflowed,
    the float64 difference (trim_l1, DARE's l1 norms)."""
    tau, wide = tau_wide(f_ptr, offs, mask, w)
    x = tl.where(is_nonfinite(tau), wide, tau.to(tl.float64))
    return tl.abs(x), tl.abs(trimmed_value(tau, x, pos, thr_ptr, lim_ptr, t, TRIM))


@triton.jit
def task_value(f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t: tl.constexpr, TRIM: tl.constexpr):
    return trimmed(task_tau(f_ptr, offs, mask, w), pos, thr_ptr, lim_ptr, t, TRIM)


@triton.jit
def vote_add(v, e, CONSENSUS: tl.constexpr):
    """Adds one task's vote: its value in float64 ("sum") or its sign ("count")."""
    if CONSENSUS == 1:
        v = v + e.to(tl.float64)
    else:
        v = v + ((e > 0).to(tl.int32) - (e < 0).to(tl.int32))
    return v


@triton.jit
def agree_add(s, ws, cnt, d, e, w64, positive):
    """Adds one task to the disjoint sum where its vote agrees with the elected sign."""
    agree = tl.where(positive, e > 0, e < 0)
    s = s + tl.where(agree, d.to(tl.float64), 0.0)
    ws = ws + tl.where(agree, w64, 0.0)
    cnt = cnt + agree.to(tl.int32)
    return s, ws, cnt


@triton.jit
def sign_of(v):
    return (v > 0).to(tl.int32) - (v < 0).to(tl.int32)


@triton.jit
def markstein(a, b, y):
    """a / b correctly rounded (float64), as the C++ kernel's division, from y = 1 / b correctly
    rounded: q = a * y, then Markstein's correction with the exact FMA residual r = a - q * b,
    which yields the correctly rounded quotient (no overflow / underflow here: b is a sum of
    weights, a count or a divisor). r == 0 needs no case of its own: fma(r, y, q) is q then,
    signed zeros included, as long as a is not -0.0 (the kernels' sums start from +0.0). An
    infinite or NaN a (an infinite input) gives q itself, as the division does: the residual of an
    infinite q would be NaN."""
    q = a * y
    return tl.where(q - q == 0.0, tl.fma(tl.fma(-q, b, a), y, q), q)


@triton.jit
def markstein_finite(a, b, y):
    """markstein where a / b is finite, NaN where it is not (an infinite quotient's residual): for
    a caller that computes such elements again in a wider path. Without markstein's check, two
    float64 operations and a select less an element."""
    q = a * y
    return tl.fma(tl.fma(-q, b, a), y, q)


@triton.jit
def div_rn(a, b):
    """a / b correctly rounded (markstein). A plain float64 division compiles to a slow
    subroutine on the GPU (2.5x slower kernels, measured on an H100)."""
    return markstein(a, b, 1.0 / b)


@triton.jit
def carried_sums(sum_ptr, wsum_ptr, cnt_ptr, offs, mask, FIRST: tl.constexpr):
    """The merges past MAX_TASKS tasks, in chunks: (sum, sum of weights, count) of the agreeing
    d_t carried from the chunk before (float64, float64, int32); FIRST: zeros."""
    if FIRST:
        s = tl.zeros(offs.shape, dtype=tl.float64)
        ws = tl.zeros(offs.shape, dtype=tl.float64)
        cnt = tl.zeros(offs.shape, dtype=tl.int32)
    else:
        s = tl.load(sum_ptr + offs, mask=mask, other=0.0)
        ws = tl.load(wsum_ptr + offs, mask=mask, other=0.0)
        cnt = tl.load(cnt_ptr + offs, mask=mask, other=0)
    return s, ws, cnt


@triton.jit
def carry_sums(sum_ptr, wsum_ptr, cnt_ptr, offs, mask, s, ws, cnt):
    """Stores a chunk's sums for the next (carried_sums)."""
    tl.store(sum_ptr + offs, s, mask=mask)
    tl.store(wsum_ptr + offs, ws, mask=mask)
    tl.store(cnt_ptr + offs, cnt, mask=mask)


@triton.jit
def add_to_base(w, merged, scale, WIDE: tl.constexpr):
    """The merged float32 value (election.h's elect_and_mix): base + float(scale * merged); WIDE:
    float(base + scale * merged), the sum in float64 rounded once."""
    if WIDE:
        r = (w.to(tl.float64) + scale * merged).to(tl.float32)
    else:
        r = w + (scale * merged).to(tl.float32)
    return r


@triton.jit
def divide(s, ws, cnt, NORMALIZE: tl.constexpr):
    """Elected sum / divisor per normalize (election.h): weights (1 if their sum is 0), count."""
    if NORMALIZE == 1:
        s = div_rn(s, tl.where(ws == 0.0, 1.0, ws))
    elif NORMALIZE == 2:
        s = div_rn(s, tl.maximum(cnt, 1).to(tl.float64))
    return s


@triton.jit
def task_trim(thr_ptr, lim_ptr, k: tl.constexpr, T: tl.constexpr, HAS_TRIM: tl.constexpr):
    """Task k's (threshold, tie_limit), read once per program (dummies without a trim)."""
    thr = 0.0
    lim = 0
    if HAS_TRIM:
        if T > k:
            thr = tl.load(thr_ptr + k)
            lim = tl.load(lim_ptr + k)
    return thr, lim


@triton.jit
def trimmed_tau(f_ptr, idx, cmask, w32, thr, lim, offset, HAS_TRIM: tl.constexpr):
    """float64 trim(tau) = trim(float32(f) - float32(w)) at flat indices idx (0 where masked); where
    the float32 difference overflows (finite inputs near the maximum), the float64 difference, the
    trim still decided on the float32 |tau| (+inf)."""
    f = tl.load(f_ptr + idx, mask=cmask, other=0.0).to(tl.float32)
    tau = f - w32
    x = tl.where((tau - tau) != 0, f.to(tl.float64) - w32.to(tl.float64), tau.to(tl.float64))
    if HAS_TRIM:
        mag = tl.abs(tau)
        keep = (mag > thr) | ((mag == thr) & (offset + idx < lim))
        x = tl.where(keep, x, 0.0)
    return x
