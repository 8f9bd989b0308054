"""Triton kernels of the element-wise ops: weighted_sum (+ backward), ties_merge, dare (trim_l1, a
reduction over a list of tensors in one launch, lives in multi.py and follows the rules below).

Every launcher takes the op's arguments in schema order (csrc/ops.cpp) and is registered for the
CUDA dispatch key; under TRITON_INTERPRET=1 the same launchers run on CPU tensors, which is how the
CPU test suite checks them (tests/ops/triton/test_elementwise.py).

Arithmetic follows the C++ CPU kernels (csrc/cpu/*.cpp, csrc/cpu/election.h) operation for
operation: tau_t = float32(finetuned[t]) - float32(base) is formed in registers (never
materialised), the trim rule compares float32 magnitudes and int64 flat positions, weighted sums are
float32, and where the C++ kernel uses double (the TIES / DARE vote, the disjoint sum and its
divisor, the scale, the DARE rescale, every reduction) the kernels use float64 too. Kernels are
launched with enable_fp_fusion=False (no mul+add contraction), float64 divisions are correctly
rounded (reciprocal + Markstein correction, _div_rn), and float32 -> bfloat16 stores round to
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
  kernels, whose float64 vote and sums spill at larger blocks); DARE works on [BLOCK / 4, 4] tiles so that one Philox call serves 4
  elements); per-row coefficients: one program per (row, column block), the row's coefficients
  are scalars. Positions are int64, so tensors and offsets past 2^31 elements work.
- Whole-tensor reductions (weighted_sum_backward per tensor, the TIES "majority" vote, the DARE
  "l1" norms, multi.py's trim_l1) are deterministic two-stage reductions: each program sums a
  CHUNK of 8192 elements in float64 lane accumulators, reduces them once and writes its partial
  to a buffer; torch sums the buffer in float64. No atomics, no host sync (the majority sign and the l1 factors
  stay on the device and are read by the second pass). Per-row gradients: one program per row.

Bytes moved per call (E = element size of the storage dtype, N = numel, T tasks):
- weighted_sum: (T + 1) N E read + N E_out written (+ (T + 1) N 4 read for per-element coeffs).
- weighted_sum_backward: (T + 1) N E + N E_grad read; per element also (T + 1) N 4 written.
- ties_merge: (T + 1) N E read + N E written; zero_sign="majority" reads the inputs twice.
- dare: (T + 1) N E read + N E written; rescale="l1" reads the inputs twice.
- trim_l1: (T + 1) N E read per tensor of the list.

Measured on an H100 (bf16 32000 x 2048, fraction of a device-to-device copy's 2.85 TB/s for the
bytes above, T = 1 / T = 8): weighted_sum 1.00 / 1.05 (every layout); backward per tensor
0.87 / 0.84, per row 0.95 / 0.80; trim_l1 0.77 / 0.68; ties_merge 0.52 / 0.60 ("majority":
0.36 / 0.35 counting one read); dare consensus "none" 0.65 / 0.53, "sum" 0.46 / 0.36, l1 + "sum"
0.26 / 0.18. The election kernels are bound by their float64 arithmetic and Philox, not memory.

Larger T: weighted_sum and weighted_sum_backward fall back to neurokern.ops.reference on the same
device; ties_merge and dare fall back to neurokern.ops.reference on CPU copies (the reference's
weight / mask tensors are built on the CPU, so it does not run on CUDA tensors), the result moved
back to the input's device; trim_l1 (multi.py) processes the tasks in chunks of 8 (no fallback
needed).
"""
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from neurokern.ops._common import to_device
from neurokern.ops.triton import registry
from neurokern.ops.dtypes import STORAGE_DTYPES

MAX_TASKS = 8
_C10_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16", torch.float16: "Half",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
    torch.uint8: "Byte", torch.bool: "Bool",
}
_CONSENSUS = {"none": 0, "sum": 1, "count": 2}
_NORMALIZE = {"none": 0, "weights": 1, "count": 2}



def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Launch configuration. On a GPU: 1024-element programs of 4 warps (8 elements per thread: 16-byte
# loads of bf16 / fp16) for the plain element-wise kernels; the election kernels hold 2 T values
# per element, so they take 512 elements when T > 4. Triton's interpreter pays per operation and
# per program, not per element: there, programs take 4096 elements (the code path is the same).
BLOCK = 4096 if _interpreting() else 1024
NUM_WARPS = 4
# No mul+add contraction: the C++ kernels round products and sums separately.
LAUNCH = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)
# Reductions: programs sum CHUNK elements (per row: a row) in RED_BLOCK-wide steps into float64
# lane accumulators and reduce across lanes once at the end.
RED_BLOCK = 4096 if _interpreting() else 512
CHUNK = 4096 if _interpreting() else 8192
ELECTION_BLOCKS = (4096, 4096) if _interpreting() else (256, 256)  # T <= 4, T > 4 (larger blocks spill on H100)
# Election blocks per program of the TIES merges (ties_merge, ties_merge_multi). H100, 1.1B set,
# T=4 (ties_merge_multi): 4 -> 7.7 ms, 8 -> 7.2 ms; blocks of 512 or 1024 elements were slower.
TIES_ITERS = 1 if _interpreting() else 8


def _election_block(T: int) -> int:
    return ELECTION_BLOCKS[0] if T <= 4 else ELECTION_BLOCKS[1]


def _red_block(accumulators: int) -> int:
    """RED_BLOCK, halved for kernels holding more than 9 float64 accumulators per lane."""
    return RED_BLOCK if accumulators <= 9 else max(RED_BLOCK // 2, 64)


# ---------------------------------------------------------------------------------------------
# Argument checks (the C++ kernels' messages)


def _name(dtype: torch.dtype) -> str:
    return _C10_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _fail(op: str, msg: str):
    raise RuntimeError(f"neurokern.{op}: {msg}")


def _check_group(op: str, base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> None:
    """check_group of csrc/cpu/common.h, then the storage-dtype check of dispatch_storage."""
    if not base.is_contiguous():
        _fail(op, "base must be contiguous")
    for t, f in enumerate(finetuned):
        if f.shape != base.shape:
            _fail(op, f"finetuned[{t}] has shape {_shape(f)}, base has {_shape(base)}")
        if f.dtype != base.dtype:
            _fail(op, f"finetuned[{t}] is {_name(f.dtype)}, base is {_name(base.dtype)}")
        if f.device != base.device:
            _fail(op, f"finetuned[{t}] is on {f.device}, base on {base.device}")
        if not f.is_contiguous():
            _fail(op, f"finetuned[{t}] must be contiguous")


def _check_storage(op: str, dtype: torch.dtype) -> None:
    if dtype not in STORAGE_DTYPES:
        _fail(op, f"expected float32, bfloat16 or float16 tensors, got {_name(dtype)}")


def _trim(op: str, threshold, tie_limit, T: int, device):
    """(threshold float32 [T], tie_limit int64 [T]) on `device`, or (None, None) for no trim."""
    if (threshold is None) != (tie_limit is None):
        _fail(op, "threshold and tie_limit must be given together")
    if threshold is None:
        return None, None
    if threshold.numel() != T or tie_limit.numel() != T:
        _fail(op, f"threshold and tie_limit need one entry per task ({T}), got "
                  f"{threshold.numel()} and {tie_limit.numel()}")
    thr = threshold.reshape(-1).to(device=device, dtype=torch.float32).contiguous()
    lim = tie_limit.reshape(-1).to(device=device, dtype=torch.int64).contiguous()
    return thr, lim


def _slots(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The MAX_TASKS pointer arguments f0..f7 (unused ones point at base)."""
    return list(tensors) + [base] * (MAX_TASKS - len(tensors))


def upload(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A small host table (nested lists) on `device`, without a host sync (ops._common.to_device)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def _sum_in_order(values) -> float:
    """float64 sum in list order, as the C++ loops (Python 3.12's sum() compensates)."""
    total = 0.0
    for v in values:
        total += float(v)
    return total


def _params(device, values) -> torch.Tensor:
    """Per-call float64 scalars (weights, scale, divisors, keys, factors): one small copy."""
    return upload([float(v) for v in values] or [0.0], torch.float64, device)


# ---------------------------------------------------------------------------------------------
# Shared device functions


@triton.jit
def _to_out(x, DT: tl.constexpr):
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
def _everywhere(BLOCK: tl.constexpr):
    """An all-true mask: loads under it need no per-element predicate, so a block whose pointers
    are known 16-byte aligned compiles to 16-byte vector loads (a mask `offs < n` with n unknown
    keeps them scalar)."""
    return tl.full([BLOCK], True, tl.int1)


@triton.jit
def _load_f32(ptr, offs, mask):
    """float32(x[offs]). bfloat16 widens by a 16-bit shift (exact, as the cast): written out, two
    elements packed in a 32-bit load widen in one integer op each, where the cast's conversion
    takes two for the upper one (the TIES merge's loads; the other kernels keep the cast, which
    needs fewer registers there)."""
    x = tl.load(ptr + offs, mask=mask, other=0.0)
    if x.dtype == tl.bfloat16:
        y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _tau(f_ptr, offs, mask, w):
    """float32 task vector entries: float32(finetuned) - float32(base)."""
    return tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32) - w


@triton.jit
def _trimmed(tau, pos, thr_ptr, lim_ptr, t: tl.constexpr, TRIM: tl.constexpr):
    """The trim rule: keep |tau| > thr[t], or |tau| == thr[t] at flat position pos < lim[t]."""
    return _trimmed_value(tau, tau, pos, thr_ptr, lim_ptr, t, TRIM)


@triton.jit
def _trimmed_value(tau, value, pos, thr_ptr, lim_ptr, t: tl.constexpr, TRIM: tl.constexpr):
    """`value` (tau, or the float64 task vector that tau rounds) where the trim keeps tau, else 0."""
    if TRIM:
        thr = tl.load(thr_ptr + t)
        lim = tl.load(lim_ptr + t)
        mag = tl.abs(tau)
        keep = (mag > thr) | ((mag == thr) & (pos < lim))
        value = tl.where(keep, value, 0.0)
    return value


@triton.jit
def _nonfinite(x):
    """NaN or Inf (x - x is NaN exactly there)."""
    return (x - x) != 0


@triton.jit
def _any(mask):
    return tl.max(mask.to(tl.int32)) != 0


@triton.jit
def _tau_wide(f_ptr, offs, mask, w):
    """(float32 tau, float64 tau): the float64 difference is exact for all finite inputs, where
    the float32 one overflows past 3.4e38 (inputs near the float32 / bfloat16 maximum)."""
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return f - w, f.to(tl.float64) - w.to(tl.float64)


@triton.jit
def _task_wide(f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t: tl.constexpr, TRIM: tl.constexpr):
    """float64 trim(tau): the trim decided on the float32 |tau| (+inf where it overflows), as the
    float32 path decides it."""
    tau, wide = _tau_wide(f_ptr, offs, mask, w)
    return _trimmed_value(tau, wide, pos, thr_ptr, lim_ptr, t, TRIM)


@triton.jit
def _reduce_tau(f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t: tl.constexpr, TRIM: tl.constexpr):
    """(|tau|, |trim(tau)|) in float64 for the reductions: the float32 tau, or where it overflowed,
    the float64 difference (trim_l1, DARE's l1 norms)."""
    tau, wide = _tau_wide(f_ptr, offs, mask, w)
    x = tl.where(_nonfinite(tau), wide, tau.to(tl.float64))
    return tl.abs(x), tl.abs(_trimmed_value(tau, x, pos, thr_ptr, lim_ptr, t, TRIM))


@triton.jit
def _task(f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t: tl.constexpr, TRIM: tl.constexpr):
    return _trimmed(_tau(f_ptr, offs, mask, w), pos, thr_ptr, lim_ptr, t, TRIM)


@triton.jit
def _vote_add(v, e, CONSENSUS: tl.constexpr):
    """Adds one task's vote: its value in float64 ("sum") or its sign ("count")."""
    if CONSENSUS == 1:
        v = v + e.to(tl.float64)
    else:
        v = v + ((e > 0).to(tl.int32) - (e < 0).to(tl.int32))
    return v


@triton.jit
def _agree_add(s, ws, cnt, d, e, w64, positive):
    """Adds one task to the disjoint sum where its vote agrees with the elected sign."""
    agree = tl.where(positive, e > 0, e < 0)
    s = s + tl.where(agree, d.to(tl.float64), 0.0)
    ws = ws + tl.where(agree, w64, 0.0)
    cnt = cnt + agree.to(tl.int32)
    return s, ws, cnt


@triton.jit
def _sign(v):
    return (v > 0).to(tl.int32) - (v < 0).to(tl.int32)


@triton.jit
def _markstein(a, b, y):
    """a / b correctly rounded (float64), as the C++ kernel's division, from y = 1 / b correctly
    rounded: q = a * y, then Markstein's correction with the exact FMA residual r = a - q * b,
    which yields the correctly rounded quotient (no overflow / underflow here: b is a sum of
    weights, a count or a divisor). r == 0 needs no case of its own: fma(r, y, q) is q then,
    signed zeros included, as long as a is not -0.0 (the kernels' sums start from +0.0)."""
    q = a * y
    return tl.fma(tl.fma(-q, b, a), y, q)


@triton.jit
def _div_rn(a, b):
    """a / b correctly rounded (_markstein). A plain float64 division compiles to a slow
    subroutine on the GPU (2.5x slower kernels, measured on an H100)."""
    return _markstein(a, b, 1.0 / b)


@triton.jit
def _divide(s, ws, cnt, NORMALIZE: tl.constexpr):
    """Elected sum / divisor per normalize (election.h): weights (1 if their sum is 0), count."""
    if NORMALIZE == 1:
        s = _div_rn(s, tl.where(ws == 0.0, 1.0, ws))
    elif NORMALIZE == 2:
        s = _div_rn(s, tl.maximum(cnt, 1).to(tl.float64))
    return s


# ---------------------------------------------------------------------------------------------
# weighted_sum


@triton.jit
def _coeff(coef_ptr, t: tl.constexpr, count, cidx, mask, LAYOUT: tl.constexpr):
    """Coefficient of input t (0 = base): scalar per tensor / row, a vector per element."""
    if LAYOUT == 2:
        a = tl.load(coef_ptr + (count * t + cidx), mask=mask, other=0.0)
    else:
        a = tl.load(coef_ptr + (count * t + cidx))
    return a


@triton.jit
def _ws_add(acc, f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx,
            t: tl.constexpr, TRIM: tl.constexpr, LAYOUT: tl.constexpr):
    a = _coeff(coef_ptr, t + 1, count, cidx, mask, LAYOUT)
    return acc + a * _task(f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t, TRIM)


@triton.jit
def _ws_block(base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, coef_ptr, thr_ptr, lim_ptr, out_ptr,
              offs, mask, cidx, count, offset, T: tl.constexpr, TRIM: tl.constexpr, LAYOUT: tl.constexpr):
    """out[offs] = a_0 * base + sum_t a_{t+1} * trim(tau_t) for one block of elements; returns the
    values stored (masked-off lanes: 0)."""
    w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pos = offs + offset
    acc = _coeff(coef_ptr, 0, count, cidx, mask, LAYOUT) * w
    if T > 0:
        acc = _ws_add(acc, f0, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 0, TRIM, LAYOUT)
    if T > 1:
        acc = _ws_add(acc, f1, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 1, TRIM, LAYOUT)
    if T > 2:
        acc = _ws_add(acc, f2, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 2, TRIM, LAYOUT)
    if T > 3:
        acc = _ws_add(acc, f3, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 3, TRIM, LAYOUT)
    if T > 4:
        acc = _ws_add(acc, f4, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 4, TRIM, LAYOUT)
    if T > 5:
        acc = _ws_add(acc, f5, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 5, TRIM, LAYOUT)
    if T > 6:
        acc = _ws_add(acc, f6, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 6, TRIM, LAYOUT)
    if T > 7:
        acc = _ws_add(acc, f7, offs, mask, w, pos, thr_ptr, lim_ptr, coef_ptr, count, cidx, 7, TRIM, LAYOUT)
    bad = _nonfinite(acc)
    if _any(bad):  # float32 overflowed (or an input is NaN / Inf): those elements in float64
        wide = _coeff(coef_ptr, 0, count, cidx, mask, LAYOUT).to(tl.float64) * w.to(tl.float64)
        for t in tl.static_range(T):
            a = _coeff(coef_ptr, t + 1, count, cidx, mask, LAYOUT).to(tl.float64)
            wide = wide + a * _task_wide((f0, f1, f2, f3, f4, f5, f6, f7)[t], offs, mask, w, pos, thr_ptr, lim_ptr,
                                         t, TRIM)
        acc = tl.where(bad, wide.to(tl.float32), acc)
    out = _to_out(acc, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, out, mask=mask)
    return out


@triton.jit(do_not_specialize=["count", "offset"])
def _weighted_sum_kernel(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, coef_ptr, thr_ptr, lim_ptr, out_ptr,
    n, C, NCB, count, offset,
    T: tl.constexpr, TRIM: tl.constexpr, LAYOUT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    count = count.to(tl.int64)
    if LAYOUT == 1:  # per row: program = (row, column block), the row's coefficients are scalars
        row = pid // NCB
        cols = (pid - row * NCB) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < C
        offs = row * C + cols
        cidx = row
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if LAYOUT == 2:
            cidx = offs
        else:
            cidx = 0
    _ws_block(base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, coef_ptr, thr_ptr, lim_ptr, out_ptr,
              offs, mask, cidx, count, offset, T, TRIM, LAYOUT)


def _coeff_layout(op: str, coeffs: torch.Tensor, base: torch.Tensor, T: int) -> tuple[int, int]:
    """CoeffLayout of csrc/cpu/weighted_sum.cpp: (layout, count); 0 per tensor, 1 per row, 2 per
    element; count = coefficients per input."""
    if coeffs.dtype != torch.float32:
        _fail(op, f"coeffs must be float32, got {_name(coeffs.dtype)}")
    if coeffs.dim() < 1 or coeffs.shape[0] != T + 1:
        _fail(op, f"coeffs need a leading dimension of T+1 = {T + 1} (base, then each task), got "
                  f"{_shape(coeffs)}")
    if coeffs.dim() == 1:
        return 0, 1
    if coeffs.dim() == 2 and base.dim() >= 1 and coeffs.shape[1] == base.shape[0]:
        return 1, base.shape[0]
    if coeffs.shape[1:] != base.shape:
        _fail(op, f"coeffs must be [T+1], [T+1, rows] or [T+1, *base.shape]; got {_shape(coeffs)} "
                  f"for base {_shape(base)}")
    return 2, base.numel()


def _grid_1d(n: int, block: int) -> tuple[int]:
    return (triton.cdiv(n, block),)


def weighted_sum(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    threshold: Optional[torch.Tensor] = None,
    tie_limit: Optional[torch.Tensor] = None,
    offset: int = 0,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """torch.ops.neurokern.weighted_sum: out = a[0] * base + sum_t a[t+1] * trim(tau_t).

    T > MAX_TASKS falls back to neurokern.ops.reference on the same device."""
    op = "weighted_sum"
    _check_group(op, base, finetuned)
    T = len(finetuned)
    layout, count = _coeff_layout(op, coeffs, base, T)
    thr, lim = _trim(op, threshold, tie_limit, T, base.device)
    _check_storage(op, base.dtype)
    coeffs = coeffs.to(base.device).contiguous()
    dtype = out_dtype or base.dtype
    if T > MAX_TASKS:
        from neurokern.ops import reference as ref

        trim = (thr, lim) if thr is not None else None
        return ref.weighted_sum(base, list(finetuned), coeffs, trim, offset, dtype)
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    n = base.numel()
    if n == 0:
        return out
    direct = dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    acc = out if direct else torch.empty(base.shape, dtype=torch.float32, device=base.device)
    C, NCB = 1, 1
    if layout == 1 and n == base.shape[0]:  # rows of one element: per-element indexing
        layout = 2
    if layout == 1:
        C = n // base.shape[0]
        NCB = triton.cdiv(C, BLOCK)
        grid = (base.shape[0] * NCB,)
    else:
        grid = _grid_1d(n, BLOCK)
    _weighted_sum_kernel[grid](
        base, *_slots(base, finetuned), coeffs,
        thr if thr is not None else base, lim if lim is not None else base, acc,
        n, C, NCB, count, offset,
        T=T, TRIM=thr is not None, LAYOUT=layout, BLOCK=BLOCK,
        **LAUNCH,
    )
    if not direct:
        out.copy_(acc)
    return out


# ---------------------------------------------------------------------------------------------
# weighted_sum_backward


@triton.jit
def _dot_acc(acc, g, f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t: tl.constexpr, TRIM: tl.constexpr):
    x = _task(f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t, TRIM)
    return acc + g * x.to(tl.float64)


@triton.jit
def _ws_dots(grad_ptr, base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, out_ptr,
             row, R, C, n, offset, T: tl.constexpr, TRIM: tl.constexpr, BLOCK: tl.constexpr,
             FULL: tl.constexpr = False):
    """out[i * R + row] = sum over "row" row (elements [row C, (row + 1) C) of the flat tensor, the
    last one cut at n) of grad * x_i: float64 lane accumulators over its BLOCK-wide chunks, one
    reduction per input at the end. FULL: the caller knows the row is whole (C a multiple of
    BLOCK, inside n), so the loads go unmasked (and vectorize)."""
    cols = tl.arange(0, BLOCK)
    a0 = tl.zeros([BLOCK], dtype=tl.float64)
    a1 = tl.zeros([BLOCK], dtype=tl.float64)
    a2 = tl.zeros([BLOCK], dtype=tl.float64)
    a3 = tl.zeros([BLOCK], dtype=tl.float64)
    a4 = tl.zeros([BLOCK], dtype=tl.float64)
    a5 = tl.zeros([BLOCK], dtype=tl.float64)
    a6 = tl.zeros([BLOCK], dtype=tl.float64)
    a7 = tl.zeros([BLOCK], dtype=tl.float64)
    a8 = tl.zeros([BLOCK], dtype=tl.float64)
    for c0 in range(0, C, BLOCK):
        c = c0 + cols
        offs = row * C + c
        if FULL:
            mask = _everywhere(BLOCK)
        else:
            mask = (c < C) & (offs < n)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32).to(tl.float64)
        w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        pos = offs + offset
        a0 += g * w.to(tl.float64)
        if T > 0:
            a1 = _dot_acc(a1, g, f0, offs, mask, w, pos, thr_ptr, lim_ptr, 0, TRIM)
        if T > 1:
            a2 = _dot_acc(a2, g, f1, offs, mask, w, pos, thr_ptr, lim_ptr, 1, TRIM)
        if T > 2:
            a3 = _dot_acc(a3, g, f2, offs, mask, w, pos, thr_ptr, lim_ptr, 2, TRIM)
        if T > 3:
            a4 = _dot_acc(a4, g, f3, offs, mask, w, pos, thr_ptr, lim_ptr, 3, TRIM)
        if T > 4:
            a5 = _dot_acc(a5, g, f4, offs, mask, w, pos, thr_ptr, lim_ptr, 4, TRIM)
        if T > 5:
            a6 = _dot_acc(a6, g, f5, offs, mask, w, pos, thr_ptr, lim_ptr, 5, TRIM)
        if T > 6:
            a7 = _dot_acc(a7, g, f6, offs, mask, w, pos, thr_ptr, lim_ptr, 6, TRIM)
        if T > 7:
            a8 = _dot_acc(a8, g, f7, offs, mask, w, pos, thr_ptr, lim_ptr, 7, TRIM)
    tl.store(out_ptr + row, tl.sum(a0, axis=0).to(out_ptr.dtype.element_ty))
    if T > 0:
        tl.store(out_ptr + R + row, tl.sum(a1, axis=0).to(out_ptr.dtype.element_ty))
    if T > 1:
        tl.store(out_ptr + 2 * R + row, tl.sum(a2, axis=0).to(out_ptr.dtype.element_ty))
    if T > 2:
        tl.store(out_ptr + 3 * R + row, tl.sum(a3, axis=0).to(out_ptr.dtype.element_ty))
    if T > 3:
        tl.store(out_ptr + 4 * R + row, tl.sum(a4, axis=0).to(out_ptr.dtype.element_ty))
    if T > 4:
        tl.store(out_ptr + 5 * R + row, tl.sum(a5, axis=0).to(out_ptr.dtype.element_ty))
    if T > 5:
        tl.store(out_ptr + 6 * R + row, tl.sum(a6, axis=0).to(out_ptr.dtype.element_ty))
    if T > 6:
        tl.store(out_ptr + 7 * R + row, tl.sum(a7, axis=0).to(out_ptr.dtype.element_ty))
    if T > 7:
        tl.store(out_ptr + 8 * R + row, tl.sum(a8, axis=0).to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["offset"])
def _ws_backward_rows_kernel(
    grad_ptr, base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, out_ptr,
    R, C, n, offset,
    T: tl.constexpr, TRIM: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr,
):
    """One program per row (_ws_dots). Per-row coefficients: the rows of base, float32 out. Per
    tensor: chunks of CHUNK elements, float64 out (stage 1 of the two-stage sum). FULL: every row
    is a whole number of BLOCKs inside n (unmasked loads)."""
    _ws_dots(grad_ptr, base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, out_ptr,
             tl.program_id(0).to(tl.int64), R, C, n, offset, T, TRIM, BLOCK, FULL)


@triton.jit
def _prod_store(out_ptr, g, f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t: tl.constexpr,
                TRIM: tl.constexpr):
    x = _task(f_ptr, offs, mask, w, pos, thr_ptr, lim_ptr, t, TRIM)
    tl.store(out_ptr + offs, g * x, mask=mask)


@triton.jit(do_not_specialize=["n64", "offset"])
def _ws_backward_element_kernel(
    grad_ptr, base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, out_ptr,
    n, n64, offset,
    T: tl.constexpr, TRIM: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per-element gradient out[i, j] = grad[j] * x_i[j]: the product of two float32 values
    rounded once to float32, which is what the C++ kernel's float64 product rounds to."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    stride = n64.to(tl.int64)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pos = offs + offset
    tl.store(out_ptr + offs, g * w, mask=mask)
    if T > 0:
        _prod_store(out_ptr + stride, g, f0, offs, mask, w, pos, thr_ptr, lim_ptr, 0, TRIM)
    if T > 1:
        _prod_store(out_ptr + 2 * stride, g, f1, offs, mask, w, pos, thr_ptr, lim_ptr, 1, TRIM)
    if T > 2:
        _prod_store(out_ptr + 3 * stride, g, f2, offs, mask, w, pos, thr_ptr, lim_ptr, 2, TRIM)
    if T > 3:
        _prod_store(out_ptr + 4 * stride, g, f3, offs, mask, w, pos, thr_ptr, lim_ptr, 3, TRIM)
    if T > 4:
        _prod_store(out_ptr + 5 * stride, g, f4, offs, mask, w, pos, thr_ptr, lim_ptr, 4, TRIM)
    if T > 5:
        _prod_store(out_ptr + 6 * stride, g, f5, offs, mask, w, pos, thr_ptr, lim_ptr, 5, TRIM)
    if T > 6:
        _prod_store(out_ptr + 7 * stride, g, f6, offs, mask, w, pos, thr_ptr, lim_ptr, 6, TRIM)
    if T > 7:
        _prod_store(out_ptr + 8 * stride, g, f7, offs, mask, w, pos, thr_ptr, lim_ptr, 7, TRIM)


def weighted_sum_backward(
    grad: torch.Tensor,
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    threshold: Optional[torch.Tensor] = None,
    tie_limit: Optional[torch.Tensor] = None,
    offset: int = 0,
) -> torch.Tensor:
    """torch.ops.neurokern.weighted_sum_backward: <grad, x_i> reduced to coeffs' shape (float32).

    Per tensor: two stages (float64 partial per program, then a float64 torch sum); per row: one
    program per row; per element: element-wise products. T > MAX_TASKS falls back to
    neurokern.ops.reference on the same device."""
    op = "weighted_sum_backward"
    _check_group(op, base, finetuned)
    if grad.shape != base.shape:
        _fail(op, f"grad has shape {_shape(grad)}, base has {_shape(base)}")
    T = len(finetuned)
    layout, count = _coeff_layout(op, coeffs, base, T)
    thr, lim = _trim(op, threshold, tie_limit, T, base.device)
    _check_storage(op, base.dtype)
    if grad.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        grad = grad.to(torch.float32)
    grad = grad.to(base.device).contiguous()
    if T > MAX_TASKS:
        from neurokern.ops import reference as ref

        trim = (thr, lim) if thr is not None else None
        return ref.weighted_sum_backward(grad, base, list(finetuned), coeffs, trim, offset).to(base.device)
    n = base.numel()
    dev = base.device
    trim_args = dict(T=T, TRIM=thr is not None)
    thr_p = thr if thr is not None else base
    lim_p = lim if lim is not None else base
    fs = _slots(base, finetuned)
    if layout == 0:
        if n == 0:
            return torch.zeros(coeffs.shape, dtype=torch.float32, device=dev)
        P = triton.cdiv(n, CHUNK)
        block = min(RED_BLOCK, CHUNK)
        part = torch.empty((T + 1, P), dtype=torch.float64, device=dev)
        _ws_backward_rows_kernel[(P,)](grad, base, *fs, thr_p, lim_p, part, P, CHUNK, n, offset,
                                       BLOCK=block, FULL=n % CHUNK == 0 and CHUNK % block == 0,
                                       **LAUNCH, **trim_args)
        return part.sum(1).to(torch.float32)
    if layout == 1 and n and n == base.shape[0]:  # rows of one element: the per-element products
        layout = 2
    if layout == 1:
        R = base.shape[0]
        C = n // R if R else 0
        if R == 0 or C == 0:
            return torch.zeros(coeffs.shape, dtype=torch.float32, device=dev)
        out = torch.empty((T + 1, R), dtype=torch.float32, device=dev)
        block = min(RED_BLOCK, triton.next_power_of_2(C))
        _ws_backward_rows_kernel[(R,)](grad, base, *fs, thr_p, lim_p, out, R, C, n, offset,
                                       BLOCK=block, FULL=C % block == 0, **LAUNCH, **trim_args)
        return out.view(coeffs.shape)
    out = torch.empty(coeffs.shape, dtype=torch.float32, device=dev)
    if n == 0:
        return out
    _ws_backward_element_kernel[_grid_1d(n, BLOCK)](grad, base, *fs, thr_p, lim_p, out, n, n, offset,
                                                    BLOCK=BLOCK, **LAUNCH, **trim_args)
    return out


# ---------------------------------------------------------------------------------------------
# ties_merge


def ties_params(weights, scale: float, normalize: int) -> list[float]:
    """The TIES kernels' par: weights (T), scale, then (normalize "weights" or "count") the divisor
    of each agreement mask m (bit t: task t agrees with the elected sign), 2^T of them, and their
    reciprocals. The divisors are election.h's: the agreeing weights summed in task order (1 if
    that is 0) or their count (at least 1), so the kernels gather them per element instead of
    summing weights; the reciprocals are correctly rounded, as _markstein needs."""
    w = [float(x) for x in weights]
    div = []
    if normalize:
        # Mask m's sum is that of m without its top task t, plus weights[t] (count: plus 1).
        div = [0.0]
        for x in w:
            div += [d + (x if normalize == 1 else 1.0) for d in div]
        div = [1.0 if d == 0.0 else d for d in div]
    return w + [float(scale)] + div + [1.0 / d for d in div]


@triton.jit
def _tie_limits(thr_ptr, lim_ptr, first, T: tl.constexpr, TRIM: tl.constexpr, SPAN: tl.constexpr):
    """The trim rule over the SPAN elements from flat position `first` on, per task: (thr, up, L).
    Element i of the span (position first + i) keeps tau iff |tau| >= (i < L ? thr : up): up is
    the next float32 above |thr| (|tau| > thr <=> |tau| >= up; +inf: NaN, nothing is above), or
    thr itself when thr < 0 or NaN; L = clamp(lim - first, 0, SPAN) (no int64 compare per element)."""
    thr = ()
    up = ()
    lim = ()
    if TRIM:
        for t in tl.static_range(T):
            x = tl.load(thr_ptr + t)
            nxt = (tl.abs(x).to(tl.uint32, bitcast=True) + 1).to(tl.float32, bitcast=True)
            thr = thr + (x,)
            up = up + (tl.where(x >= 0, nxt, x),)
            lim = lim + ((tl.minimum(tl.maximum(tl.load(lim_ptr + t), first), first + SPAN) - first).to(tl.int32),)
    return thr, up, lim


@triton.jit
def _tie_cuts(limits, i, T: tl.constexpr, TRIM: tl.constexpr):
    """Per task, the least |tau| kept at span index i (a block of them, or 0 for a span where
    _ties_uniform holds: then scalars)."""
    thr, up, lim = limits
    cut = ()
    if TRIM:
        for t in tl.static_range(T):
            cut = cut + (tl.where(i < lim[t], thr[t], up[t]),)
    return cut


@triton.jit
def _ties_uniform(limits, T: tl.constexpr, TRIM: tl.constexpr, SPAN: tl.constexpr):
    """Whether every task keeps all or none of its ties |tau| == thr over the span (L = SPAN or 0)."""
    thr, up, lim = limits
    uniform = True
    if TRIM:
        for t in tl.static_range(T):
            uniform = uniform & ((lim[t] == 0) | (lim[t] == SPAN))
    return uniform


@triton.jit
def _ties_votes(base_ptr, fs, offs, mask, cut, wt, par_ptr, T: tl.constexpr, TRIM: tl.constexpr,
                CONSENSUS: tl.constexpr, ELECT_W: tl.constexpr, WIDE: tl.constexpr):
    """(w, d, e, vote) of a block: base, the contributions d_t = float(weights[t]) * trim(tau_t),
    the votes e_t (d_t or trim(tau_t)) and their sum (float64) or sum of signs. WIDE: in float64,
    d_t = weights[t] * trim(tau_t) from the exact tau (float64 difference), the trim decided on the
    float32 |tau| as the float32 path decides it (csrc/cpu/ties_merge.cpp's wide path)."""
    w = _load_f32(base_ptr, offs, mask)
    ds = ()
    es = ()
    for t in tl.static_range(T):
        f = _load_f32(fs[t], offs, mask)
        tau = f - w  # tau_t = float32(finetuned[t]) - float32(base)
        if WIDE:
            x = f.to(tl.float64) - w.to(tl.float64)
            if TRIM:
                x = tl.where(tl.abs(tau) >= cut[t], x, 0.0)
            d = tl.load(par_ptr + t) * x
            e = d if ELECT_W else x
        else:
            if TRIM:
                tau = tl.where(tl.abs(tau) >= cut[t], tau, 0.0)
            d = wt[t] * tau
            e = d if ELECT_W else tau
        ds = ds + (d,)
        es = es + (e,)
        # The vote: the sum of the values (float64) or of their signs. It starts at e_0, not
        # 0.0 + e_0: that changes only the sign of a zero sum, which elects nothing.
        x = e.to(tl.float64) if CONSENSUS == 1 else (e > 0).to(tl.int32) - (e < 0).to(tl.int32)
        v = x if t == 0 else v + x
    return w, ds, es, v


@triton.jit
def _ties_mix(w, ds, es, v, scale, zero_pos, par_ptr, T: tl.constexpr, NORMALIZE: tl.constexpr,
              ELECT_W: tl.constexpr, WIDE: tl.constexpr):
    """float32 base + scale * elect_and_mix(d, e) (csrc/cpu/election.h); WIDE: the sum with base
    in float64, rounded once."""
    # sign_of(v) with the fallback for 0 (a NaN vote is 0 too); agree_t: e_t has the elected sign.
    sgn = tl.where((v > 0) | (~(v < 0) & zero_pos), 1.0, -1.0)
    m = 0
    for t in tl.static_range(T):
        agree = es[t] * sgn > 0
        m = m | (agree.to(tl.int32) << t)
        x = tl.where(agree, ds[t].to(tl.float64), 0.0)
        # The sum in task order from 0.0: its first term is x itself unless x is -0.0, which
        # an agreeing d_t (= e_t, nonzero) never is when the vote is weighted.
        if t == 0:
            s = x if ELECT_W else 0.0 + x
        else:
            s = s + x
    if NORMALIZE:
        tab = par_ptr + (T + 1) + m
        s = _markstein(s, tl.load(tab), tl.load(tab + (1 << T)))
    if WIDE:
        r = (w.to(tl.float64) + scale * s).to(tl.float32)
    else:
        r = w + (scale * s).to(tl.float32)
    return r


@triton.jit
def _ties_block(
    acc, base_ptr, fs, out_ptr, offs, mask, cut, wt, scale, zero_pos, par_ptr,
    T: tl.constexpr, TRIM: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
    ELECT_W: tl.constexpr, PASS: tl.constexpr,
):
    """One block of elements. PASS 0 (the "majority" pre-pass) returns acc + sign(vote); PASS 1
    stores out = base + float(scale * elect_and_mix(d, e)) (csrc/cpu/election.h) and returns acc.
    fs: the T fine-tuned pointers; cut: _tie_cuts; wt: float32 weights; zero_pos: a zero vote
    elects +; par: ties_params. Elements whose float32 result or float64 vote ("sum") is NaN / Inf
    (float32 overflowed on finite inputs near the maximum, or an input is NaN / Inf) are computed
    again in float64 (_ties_votes, _ties_mix)."""
    w, ds, es, v = _ties_votes(base_ptr, fs, offs, mask, cut, wt, par_ptr, T, TRIM, CONSENSUS, ELECT_W, False)
    if PASS == 0:
        if CONSENSUS == 1:
            bad = _nonfinite(v)
            if _any(bad):
                w64, d64, e64, wide = _ties_votes(base_ptr, fs, offs, mask, cut, wt, par_ptr, T, TRIM, CONSENSUS,
                                            ELECT_W, True)
                v = tl.where(bad, wide, v)
        acc += tl.where(mask, _sign(v), 0)
    else:
        r = _ties_mix(w, ds, es, v, scale, zero_pos, par_ptr, T, NORMALIZE, ELECT_W, False)
        bad = _nonfinite(r)
        if CONSENSUS == 1:
            bad = bad | _nonfinite(v)
        if _any(bad):
            w64, d64, e64, v64 = _ties_votes(base_ptr, fs, offs, mask, cut, wt, par_ptr, T, TRIM, CONSENSUS,
                                             ELECT_W, True)
            r = tl.where(bad, _ties_mix(w64, d64, e64, v64, scale, zero_pos, par_ptr, T, NORMALIZE, ELECT_W, True), r)
        tl.store(out_ptr + offs, _to_out(r, out_ptr.dtype.element_ty), mask=mask)
    return acc


@triton.jit
def _ties_chunk(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, par_ptr, fb_ptr, out_ptr, start, n, offset,
    T: tl.constexpr, TRIM: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
    ELECT_W: tl.constexpr, MAJORITY: tl.constexpr, PASS: tl.constexpr, BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """ITERS blocks of the tensor from element `start` on (n elements, flat positions from
    offset): PASS 0 returns the elected signs summed per lane, PASS 1 merges them (_ties_block).
    The per-program scalars are loaded once; the pointers move to `start` and the blocks index
    them with int32 offsets. A chunk inside the tensor where every task keeps all or none of its
    ties (all but the few that hold a tie limit) goes unmasked, with one cut per task; others
    are masked and cut per element. MAJORITY: a zero vote elects fb[0] (a sign), else +."""
    SPAN: tl.constexpr = ITERS * BLOCK
    base_ptr += start
    out_ptr += start
    fs = ()
    for t in tl.static_range(T):
        fs = fs + ((f0, f1, f2, f3, f4, f5, f6, f7)[t] + start,)
    wt = ()
    for t in tl.static_range(T):
        wt = wt + (tl.load(par_ptr + t).to(tl.float32),)
    scale = tl.load(par_ptr + T)
    zero_pos = True
    if MAJORITY:
        zero_pos = tl.load(fb_ptr) > 0
    limits = _tie_limits(thr_ptr, lim_ptr, offset + start, T, TRIM, SPAN)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    if (start + SPAN <= n) & _ties_uniform(limits, T, TRIM, SPAN):
        cut = _tie_cuts(limits, 0, T, TRIM)
        # The merge's few blocks unrolled: their loads and stores take immediate offsets from the
        # chunk's pointers (no address arithmetic); the pre-pass's 32 stay a loop.
        for it in tl.range(ITERS, loop_unroll_factor=ITERS if PASS == 1 else 1):
            offs = it * BLOCK + tl.arange(0, BLOCK)
            acc = _ties_block(acc, base_ptr, fs, out_ptr, offs, _everywhere(BLOCK), cut, wt, scale, zero_pos,
                              par_ptr, T, TRIM, CONSENSUS, NORMALIZE, ELECT_W, PASS)
    else:
        rem = tl.minimum(n - start, SPAN).to(tl.int32)
        for it in range(ITERS):
            offs = it * BLOCK + tl.arange(0, BLOCK)
            acc = _ties_block(acc, base_ptr, fs, out_ptr, offs, offs < rem, _tie_cuts(limits, offs, T, TRIM), wt,
                              scale, zero_pos, par_ptr, T, TRIM, CONSENSUS, NORMALIZE, ELECT_W, PASS)
    return acc


@triton.jit(do_not_specialize=["offset"])
def _ties_kernel(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, par_ptr, fb_ptr, part_ptr, out_ptr,
    n, offset,
    T: tl.constexpr, TRIM: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
    ELECT_W: tl.constexpr, MAJORITY: tl.constexpr, PASS: tl.constexpr, BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """ITERS blocks a program (_ties_chunk). PASS 0 (the "majority" pre-pass): part[pid] = the
    sum of their sign(vote). PASS 1: their merge. par: ties_params; fb: the fallback sign (int32
    [1]) that PASS 0's total gives."""
    pid = tl.program_id(0).to(tl.int64)
    acc = _ties_chunk(base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, thr_ptr, lim_ptr, par_ptr, fb_ptr, out_ptr,
                      pid * (ITERS * BLOCK), n, offset, T, TRIM, CONSENSUS, NORMALIZE, ELECT_W, MAJORITY, PASS,
                      BLOCK, ITERS)
    if PASS == 0:
        tl.store(part_ptr + pid, tl.sum(acc, axis=0).to(tl.int64))


def _parse(op: str, name: str, table: dict, what: str, allow_none: bool = True):
    if name == "none" and not allow_none or name not in table:
        if what == "consensus":
            choices = '"none", "sum" or "count"' if allow_none else '"sum" or "count"'
        else:
            choices = '"weights", "count" or "none"'
        _fail(op, f'{what} must be {choices}, got "{name}"')
    return table[name]


def ties_options(op: str, T: int, weights, consensus: str, normalize: str, zero_sign: str) -> tuple[int, int]:
    """Checks ties_merge's options; returns the (consensus, normalize) codes of the kernels."""
    if len(weights) != T:
        _fail(op, f"{len(weights)} weights for {T} fine-tuned tensors")
    if zero_sign not in ("positive", "majority"):
        _fail(op, f'zero_sign must be "positive" or "majority", got "{zero_sign}"')
    return (_parse(op, consensus, _CONSENSUS, "consensus", allow_none=False),
            _parse(op, normalize, _NORMALIZE, "normalize"))


def ties_merge(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    threshold: Optional[torch.Tensor] = None,
    tie_limit: Optional[torch.Tensor] = None,
    offset: int = 0,
    consensus: str = "sum",
    normalize: str = "weights",
    elect_weighted: bool = True,
    zero_sign: str = "positive",
    scale: float = 1.0,
) -> torch.Tensor:
    """torch.ops.neurokern.ties_merge. zero_sign="majority" runs a vote pre-pass (two-stage
    int64 reduction of the elected signs) whose sign the second pass reads on the device.
    T > MAX_TASKS falls back to neurokern.ops.reference on CPU copies."""
    op = "ties_merge"
    _check_group(op, base, finetuned)
    T = len(finetuned)
    cons, norm = ties_options(op, T, weights, consensus, normalize, zero_sign)
    thr, lim = _trim(op, threshold, tie_limit, T, base.device)
    _check_storage(op, base.dtype)
    if T > MAX_TASKS:
        from neurokern.ops import reference as ref

        trim = (thr.cpu(), lim.cpu()) if thr is not None else None
        out = ref.ties_merge(base.cpu(), [f.cpu() for f in finetuned], list(weights), trim, offset,
                             consensus, normalize, elect_weighted, zero_sign, scale)
        return out.to(base.device)
    out = torch.empty_like(base)
    n = base.numel()
    if n == 0:
        return out
    block = _election_block(T)
    par = _params(base.device, ties_params(weights, scale, norm))
    majority = zero_sign == "majority"
    args = [base, *_slots(base, finetuned), thr if thr is not None else base,
            lim if lim is not None else base, par]
    meta = dict(T=T, TRIM=thr is not None, CONSENSUS=cons, NORMALIZE=norm, ELECT_W=bool(elect_weighted),
                MAJORITY=majority, BLOCK=block, **LAUNCH)
    fb = par
    if majority:
        iters = max(1, CHUNK // block)
        pgrid = _grid_1d(n, block * iters)
        part = torch.empty(pgrid[0], dtype=torch.int64, device=base.device)
        _ties_kernel[pgrid](*args, par, part, out, n, offset, PASS=0, ITERS=iters, **meta)
        fb = torch.sign(part.sum()).to(torch.int32).reshape(1)
    _ties_kernel[_grid_1d(n, block * TIES_ITERS)](*args, fb, par, out, n, offset, PASS=1, ITERS=TIES_ITERS,
                                                  **meta)
    return out


# ---------------------------------------------------------------------------------------------
# dare


@triton.jit
def _philox(c0, c1, k0, k1):
    """Philox-4x32-10 (csrc/philox.h) on counters (c0, c1, 0, 0) and key (k0, k1), uint32."""
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        hi_a = tl.umulhi(c0, 0xD2511F53)
        lo_a = c0 * 0xD2511F53
        hi_b = tl.umulhi(c2, 0xCD9E8D57)
        lo_b = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _dare_keep(grp, lane, k0, k1, keep_below):
    """Keep mask of a [G, 4] tile: element 4 * grp + lane draws lane `lane` of Philox on counter
    grp (one Philox call per 4 elements); kept iff the 32-bit draw < keep_below (dare_threshold)."""
    r0, r1, r2, r3 = _philox(grp.to(tl.uint32), (grp >> 32).to(tl.uint32), k0, k1)
    draw = tl.where(lane == 0, r0[:, None],
                    tl.where(lane == 1, r1[:, None], tl.where(lane == 2, r2[:, None], r3[:, None])))
    return draw.to(tl.int64) < keep_below


@triton.jit
def _dare_task_keep(grp, lane, keep_below, par_ptr, t: tl.constexpr, T: tl.constexpr):
    """Task t's keep mask of a [G, 4] tile; par: weights (T), scale, divisor, then the keys (k0,
    k1) of each task."""
    k0 = tl.load(par_ptr + (T + 2 + 2 * t)).to(tl.uint32)
    k1 = tl.load(par_ptr + (T + 3 + 2 * t)).to(tl.uint32)
    return _dare_keep(grp, lane, k0, k1, keep_below)


@triton.jit
def _dare_votes(base_ptr, fs, offs, mask, grp, lane, keep_below, par_ptr, fac_ptr, T: tl.constexpr,
                CONSENSUS: tl.constexpr, WIDE: tl.constexpr):
    """(w, d, vote, sum) of a tile: d_t = float(weights[t]) * (kept ? float(tau_t * factor_t) : 0)
    (csrc/cpu/dare.cpp), their vote (consensus "sum" / "count") or float64 sum ("none"). WIDE: in
    float64 from the exact tau, d_t = weights[t] * (kept ? tau_t * factor_t : 0)."""
    w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CONSENSUS == 1:
        v = tl.zeros(w.shape, dtype=tl.float64)
    else:
        v = tl.zeros(w.shape, dtype=tl.int32)
    s = tl.zeros(w.shape, dtype=tl.float64)
    ds = ()
    for t in tl.static_range(T):
        keep = _dare_task_keep(grp, lane, keep_below, par_ptr, t, T)
        tau, wide = _tau_wide(fs[t], offs, mask, w)
        if WIDE:
            d = tl.load(par_ptr + t) * tl.where(keep, wide * tl.load(fac_ptr + t), 0.0)
        else:
            rescaled = tl.where(keep, (tau.to(tl.float64) * tl.load(fac_ptr + t)).to(tl.float32), 0.0)
            d = tl.load(par_ptr + t).to(tl.float32) * rescaled
        ds = ds + (d,)
        if CONSENSUS == 0:
            s = s + d.to(tl.float64)
        else:
            v = _vote_add(v, d, CONSENSUS)
    return w, ds, v, s


@triton.jit
def _dare_mix(w, ds, v, s, par_ptr, T: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
              WIDE: tl.constexpr):
    """float32 base + scale * merged: sum_t d_t / divisor (consensus "none") or elect_and_mix(d, d)
    with a zero vote electing + (election.h); WIDE: the sum with base in float64, rounded once."""
    if CONSENSUS == 0:
        merged = _div_rn(s, tl.load(par_ptr + (T + 1)))
    else:
        positive = _sign(v) >= 0  # a zero vote elects + (mergekit)
        ws = tl.zeros(w.shape, dtype=tl.float64)
        cnt = tl.zeros(w.shape, dtype=tl.int32)
        for t in tl.static_range(T):
            s, ws, cnt = _agree_add(s, ws, cnt, ds[t], ds[t], tl.load(par_ptr + t), positive)
        merged = _divide(s, ws, cnt, NORMALIZE)
    if WIDE:
        r = (w.to(tl.float64) + tl.load(par_ptr + T) * merged).to(tl.float32)
    else:
        r = w + (tl.load(par_ptr + T) * merged).to(tl.float32)
    return r


@triton.jit
def _dare_block(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, par_ptr, fac_ptr, out_ptr, grp, n, keep_below,
    T: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, G: tl.constexpr,
    FULL: tl.constexpr = False,
):
    """A tile of [G, 4] consecutive elements (G Philox counters grp, one Philox call per 4
    elements): out = base + float(scale * merged) (_dare_mix). Elements whose float32 result or
    float64 vote ("sum") is NaN / Inf are computed again in float64. FULL: the whole tile lies
    inside n (unmasked loads, which vectorize)."""
    lane = tl.arange(0, 4)[None, :]
    offs = grp[:, None] * 4 + lane
    if FULL:
        mask = tl.full([G, 4], True, tl.int1)
    else:
        mask = offs < n
    fs = (f0, f1, f2, f3, f4, f5, f6, f7)
    w, ds, v, s = _dare_votes(base_ptr, fs, offs, mask, grp, lane, keep_below, par_ptr, fac_ptr, T, CONSENSUS,
                              False)
    r = _dare_mix(w, ds, v, s, par_ptr, T, CONSENSUS, NORMALIZE, False)
    bad = _nonfinite(r)
    if CONSENSUS == 1:
        bad = bad | _nonfinite(v)
    if _any(bad):
        w64, d64, v64, s64 = _dare_votes(base_ptr, fs, offs, mask, grp, lane, keep_below, par_ptr, fac_ptr, T,
                                         CONSENSUS, True)
        r = tl.where(bad, _dare_mix(w64, d64, v64, s64, par_ptr, T, CONSENSUS, NORMALIZE, True), r)
    tl.store(out_ptr + offs, _to_out(r, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dare_kernel(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, par_ptr, fac_ptr, out_ptr,
    n, keep_below,
    T: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, G: tl.constexpr,
):
    grp = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    _dare_block(base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, par_ptr, fac_ptr, out_ptr, grp, n, keep_below,
                T, CONSENSUS, NORMALIZE, G)


@triton.jit
def _dare_l1_add(sb, sk, f_ptr, offs, mask, w, grp, lane, keep_below, par_ptr, t: tl.constexpr, T: tl.constexpr):
    keep = _dare_task_keep(grp, lane, keep_below, par_ptr, t, T)
    mag, _ = _reduce_tau(f_ptr, offs, mask, w, offs, par_ptr, par_ptr, t, False)
    return sb + mag, sk + tl.where(keep, mag, 0.0)


@triton.jit
def _dare_l1_store(part_ptr, sb, sk, t: tl.constexpr):
    tl.store(part_ptr + 2 * t, tl.sum(tl.sum(sb, axis=1), axis=0))
    tl.store(part_ptr + 2 * t + 1, tl.sum(tl.sum(sk, axis=1), axis=0))


@triton.jit
def _dare_l1_kernel(
    base_ptr, f0, f1, f2, f3, f4, f5, f6, f7, par_ptr, part_ptr,
    n, keep_below,
    T: tl.constexpr, G: tl.constexpr, ITERS: tl.constexpr,
):
    """The "l1" pre-pass: part[pid, t] = (sum |tau_t|, sum |tau_t| over kept entries) over ITERS
    tiles of [G, 4] elements, float64 lane accumulators reduced once at the end."""
    pid = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, 4)[None, :]
    b0 = tl.zeros([G, 4], dtype=tl.float64)
    b1 = tl.zeros([G, 4], dtype=tl.float64)
    b2 = tl.zeros([G, 4], dtype=tl.float64)
    b3 = tl.zeros([G, 4], dtype=tl.float64)
    b4 = tl.zeros([G, 4], dtype=tl.float64)
    b5 = tl.zeros([G, 4], dtype=tl.float64)
    b6 = tl.zeros([G, 4], dtype=tl.float64)
    b7 = tl.zeros([G, 4], dtype=tl.float64)
    k0 = tl.zeros([G, 4], dtype=tl.float64)
    k1 = tl.zeros([G, 4], dtype=tl.float64)
    k2 = tl.zeros([G, 4], dtype=tl.float64)
    k3 = tl.zeros([G, 4], dtype=tl.float64)
    k4 = tl.zeros([G, 4], dtype=tl.float64)
    k5 = tl.zeros([G, 4], dtype=tl.float64)
    k6 = tl.zeros([G, 4], dtype=tl.float64)
    k7 = tl.zeros([G, 4], dtype=tl.float64)
    for it in range(ITERS):
        grp = (pid * ITERS + it) * G + tl.arange(0, G)
        offs = grp[:, None] * 4 + lane
        mask = offs < n
        w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if T > 0:
            b0, k0 = _dare_l1_add(b0, k0, f0, offs, mask, w, grp, lane, keep_below, par_ptr, 0, T)
        if T > 1:
            b1, k1 = _dare_l1_add(b1, k1, f1, offs, mask, w, grp, lane, keep_below, par_ptr, 1, T)
        if T > 2:
            b2, k2 = _dare_l1_add(b2, k2, f2, offs, mask, w, grp, lane, keep_below, par_ptr, 2, T)
        if T > 3:
            b3, k3 = _dare_l1_add(b3, k3, f3, offs, mask, w, grp, lane, keep_below, par_ptr, 3, T)
        if T > 4:
            b4, k4 = _dare_l1_add(b4, k4, f4, offs, mask, w, grp, lane, keep_below, par_ptr, 4, T)
        if T > 5:
            b5, k5 = _dare_l1_add(b5, k5, f5, offs, mask, w, grp, lane, keep_below, par_ptr, 5, T)
        if T > 6:
            b6, k6 = _dare_l1_add(b6, k6, f6, offs, mask, w, grp, lane, keep_below, par_ptr, 6, T)
        if T > 7:
            b7, k7 = _dare_l1_add(b7, k7, f7, offs, mask, w, grp, lane, keep_below, par_ptr, 7, T)
    part = part_ptr + pid * (2 * T)
    if T > 0:
        _dare_l1_store(part, b0, k0, 0)
    if T > 1:
        _dare_l1_store(part, b1, k1, 1)
    if T > 2:
        _dare_l1_store(part, b2, k2, 2)
    if T > 3:
        _dare_l1_store(part, b3, k3, 3)
    if T > 4:
        _dare_l1_store(part, b4, k4, 4)
    if T > 5:
        _dare_l1_store(part, b5, k5, 5)
    if T > 6:
        _dare_l1_store(part, b6, k6, 6)
    if T > 7:
        _dare_l1_store(part, b7, k7, 7)


def dare_threshold(density: float) -> int:
    """csrc/philox.h dare_threshold: floor(density * 2^32 + 0.5), at most 2^32."""
    t = density * 4294967296.0 + 0.5
    return 4294967296 if t >= 4294967296.0 else int(t)


def dare_factor(density: float) -> float:
    """csrc/philox.h dare_factor: 2^32 / dare_threshold(density), the reciprocal of the keep
    probability actually used (0 where nothing is kept)."""
    t = dare_threshold(density)
    return 4294967296.0 / t if t else 0.0


def dare_params(weights, density: float, keys, rescale: str, norm: int, scale: float) -> list[float]:
    """_dare_kernel's par: weights (T), scale, the divisor of consensus "none", the keys as (low,
    high) 32-bit words, then the rescale factor of each task."""
    T = len(weights)
    # consensus "none" divides the plain sum by one number (election.h).
    wsum = _sum_in_order(weights)
    divisor = 1.0
    if norm == 1:
        divisor = 1.0 if abs(wsum) < 1e-8 else wsum
    elif norm == 2:
        divisor = float(max(T, 1))
    factor = dare_factor(density) if rescale == "density" else 1.0
    key_words = []
    for k in keys:
        k = int(k) & ((1 << 64) - 1)
        key_words += [k & 0xFFFFFFFF, k >> 32]
    return [float(w) for w in weights] + [scale, divisor] + key_words + [factor] * T


def dare_options(op: str, T: int, weights, density: float, rescale: str, consensus: str,
                 normalize: str) -> tuple[int, int]:
    """Checks dare's options; returns the (consensus, normalize) codes of the kernels."""
    if len(weights) != T:
        _fail(op, f"{len(weights)} weights for {T} fine-tuned tensors")
    if not (density > 0.0 and density <= 1.0):
        _fail(op, f"density must be in (0, 1], got {density}")
    if rescale not in ("density", "l1", "none"):
        _fail(op, f'rescale must be "density", "l1" or "none", got "{rescale}"')
    return (_parse(op, consensus, _CONSENSUS, "consensus", allow_none=True),
            _parse(op, normalize, _NORMALIZE, "normalize"))


def dare(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    keys: Sequence[int],
    rescale: str = "density",
    consensus: str = "none",
    normalize: str = "none",
    scale: float = 1.0,
) -> torch.Tensor:
    """torch.ops.neurokern.dare. The keep mask is csrc/philox.h's, bit for bit. rescale="l1" runs a
    pre-pass (two-stage float64 reduction of sum |tau_t| and sum |kept tau_t|); the factors stay on
    the device. T > MAX_TASKS falls back to neurokern.ops.reference on CPU copies."""
    op = "dare"
    _check_group(op, base, finetuned)
    T = len(finetuned)
    if len(keys) != T:
        _fail(op, f"{len(keys)} keys for {T} fine-tuned tensors")
    cons, norm = dare_options(op, T, weights, density, rescale, consensus, normalize)
    _check_storage(op, base.dtype)
    if T > MAX_TASKS:
        from neurokern.ops import reference as ref

        out = ref.dare(base.cpu(), [f.cpu() for f in finetuned], list(weights), density, list(keys),
                       rescale, consensus, normalize, scale)
        return out.to(base.device)
    out = torch.empty_like(base)
    n = base.numel()
    if n == 0:
        return out
    par = _params(base.device, dare_params(weights, density, keys, rescale, norm, scale))
    fac = par[T + 2 + 2 * T:]
    block = _election_block(T)
    keep_below = dare_threshold(density)
    fs = _slots(base, finetuned)
    if rescale == "l1":  # mergekit: match the L1 norm of the task vector, unless either is ~0
        lblock = _red_block(2 * T)
        iters = max(1, CHUNK // lblock)
        lgrid = _grid_1d(n, lblock * iters)
        part = torch.empty((lgrid[0], T, 2), dtype=torch.float64, device=base.device)
        _dare_l1_kernel[lgrid](base, *fs, par, part, n, keep_below, T=T, G=lblock // 4, ITERS=iters,
                               **LAUNCH)
        norms = part.sum(0)
        ok = (norms[:, 0] >= 1e-7) & (norms[:, 1] >= 1e-7)
        fac = torch.where(ok, norms[:, 0] / torch.where(ok, norms[:, 1], 1.0), 1.0).contiguous()
    _dare_kernel[_grid_1d(n, block)](base, *fs, par, fac, out, n, keep_below, T=T, CONSENSUS=cons,
                                     NORMALIZE=norm, G=block // 4, **LAUNCH)
    return out


registry.register("weighted_sum", weighted_sum)
registry.register("weighted_sum_backward", weighted_sum_backward)
registry.register("ties_merge", ties_merge)
registry.register("dare", dare)
