"""Triton kernels of neurokern.tinted_linear and tinted_linear_weight_grad: segmented (grouped)
GEMMs for batches that mix tasks, in the style of punica's sgmv / vLLM's LoRA shrink-expand.

    tinted_linear:             y[b] = x[b] @ weight[task_ids[b]]^T + bias[task_ids[b]]
    tinted_linear_weight_grad: dW[t] = sum over rows b of task t of grad[b]^T x[b]

Routing (both ops, `route`): a stable counting sort of the rows by task on the device, two
launches of one program per 512 rows (count per chunk; then prefix over tasks and chunks and
scatter): perm [B] lists task t's rows at perm[bounds[t]:bounds[t + 1]] in batch order, and the
first row with an id outside [0, T) is recorded. The kernels are queued first; then the launcher's
one device-to-host read (that row index) raises RuntimeError naming the bad id, as the C++ op
does. T > 16 routes with torch.sort(stable) + searchsorted instead. Measured on an H100: 11 us
for B = 4096 or 65536 (torch.sort alone: 44 / 91 us). The tinted_route op is this routing alone;
given its perm and bounds, both ops skip their own routing and the read (a TintedModel routes a
batch once for all its layers, forward and backward).

tinted_linear: grid = (M tiles, N tiles) with at most cdiv(B, BLOCK_M) + T M tiles (each segment
wastes at most one partial tile). A program finds its task by a scan over the T segment sizes,
gathers its BLOCK_M rows of x through perm, runs tl.dot over K in BLOCK_K steps with a float32
accumulator against the [BLOCK_K, BLOCK_N] tiles of its task's W^T, adds the bias and scatters
its rows of y to their batch positions. Programs past the last tile return at once. W is read
through its three strides, so the backward's dx = grad @ W runs this kernel on the view
W.transpose(1, 2), without a copy (Triton compiles an argument equal to 1 as a constant: the
forward's contiguous W gets its own variant, with contiguous loads along K).

tinted_linear_weight_grad: grid = (T, N tiles, K tiles); each program reduces grad_seg^T @ x_seg
over its task's rows in BLOCK_M steps (float32 accumulator) and writes its [BLOCK_N, BLOCK_K]
tile of dW[t] (zeros for a task without rows).

H100 (bf16, T = 8 mixed, kernel alone; dense x @ W^T by cuBLAS for scale):
    B=4096,  768 x 768:   forward 21 us (227 TFLOP/s; dense 13 us), weight grad 30 us
    B=4096, 2048 x 2048:  forward 100 us (344 TFLOP/s; dense 49 us), weight grad 122 us
    B=65536, 768 x 768:   forward 209 us (370 TFLOP/s; dense 125 us), weight grad 299 us
    B=512,   768 x 768:   forward 13 us, weight grad 11 us
The whole launcher (routing, kernel, the id check's sync) adds ~40-50 us of launch latency.
float32 (ieee) runs on the FMA units: 434 us forward, 138 us weight grad at 4096 x 768 x 768.

Precision: float32 accumulation throughout. float32 inputs use input_precision="ieee" (exact
float32 products, no TF32) unless torch.get_float32_matmul_precision() is not "highest", in
which case "tf32" (what torch.matmul does under the same setting). Outputs are in x's dtype.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from neurokern.ops.dtypes import STORAGE_DTYPES
from neurokern.ops.triton import registry
from neurokern.ops.triton.common import interpreting



@triton.jit
def _tinted_linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, perm_ptr, bounds_ptr,
    N, K, T, stride_x, stride_wt, stride_wn, stride_wk, stride_y,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Which task's segment holds M tile pid_m: scan the T segment sizes (in tiles).
    seg_start = tl.load(bounds_ptr)
    task = pid_m * 0 - 1
    tiles_before = pid_m * 0
    row0 = seg_start * 0
    row_end = seg_start * 0
    for t in range(0, T):
        seg_end = tl.load(bounds_ptr + t + 1)
        n_tiles = ((seg_end - seg_start + BLOCK_M - 1) // BLOCK_M).to(tl.int32)
        hit = (pid_m >= tiles_before) & (pid_m < tiles_before + n_tiles)
        task = tl.where(hit, t, task)
        row0 = tl.where(hit, seg_start + (pid_m - tiles_before) * BLOCK_M, row0)
        row_end = tl.where(hit, seg_end, row_end)
        tiles_before += n_tiles
        seg_start = seg_end
    if task < 0:
        return
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mmask = offs_m < row_end
    rows = tl.load(perm_ptr + offs_m, mask=mmask, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_x
    w_cols = w_ptr + task.to(tl.int64) * stride_wt + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        kmask = k < K
        a = tl.load(x_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_cols + k[:, None].to(tl.int64) * stride_wk, mask=kmask[:, None] & nmask[None, :],
                    other=0.0)  # W[t]^T tile
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(b_ptr + task.to(tl.int64) * N + offs_n, mask=nmask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y = y_ptr + rows[:, None] * stride_y + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _tinted_weight_grad_kernel(
    g_ptr, x_ptr, dw_ptr, perm_ptr, bounds_ptr,
    N, K, stride_g, stride_x,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    task = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    seg_start = tl.load(bounds_ptr + task)
    seg_end = tl.load(bounds_ptr + task + 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask = offs_n < N
    kmask = offs_k < K
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for m0 in range(seg_start, seg_end, BLOCK_M):
        m = m0 + offs_m
        mmask = m < seg_end
        rows = tl.load(perm_ptr + m, mask=mmask, other=0)
        g = tl.load(g_ptr + rows[None, :] * stride_g + offs_n[:, None],
                    mask=nmask[:, None] & mmask[None, :], other=0.0)  # [BLOCK_N, BLOCK_M]
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        if UPCAST:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(g, x, acc, input_precision=PRECISION)
    out = dw_ptr + task.to(tl.int64) * N * K + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=nmask[:, None] & kmask[None, :])


@triton.jit
def _chunk_onehot(ids_ptr, chunk, B, T, TP: tl.constexpr, BLOCK: tl.constexpr):
    """Rows of one chunk: their index, whether they exist and have an id in [0, T), and the
    [BLOCK, TP] int32 one-hot of their task."""
    b = chunk * BLOCK + tl.arange(0, BLOCK)
    m = b < B
    ids = tl.load(ids_ptr + b, mask=m, other=0)  # in the ids' own integer type
    ok = m & (ids >= 0) & (ids < T)
    onehot = ((ids.to(tl.int32)[:, None] == tl.arange(0, TP)[None, :]) & ok[:, None]).to(tl.int32)
    return b, m, ok, onehot


@triton.jit
def _route_count_kernel(ids_ptr, counts_ptr, chunk_bad_ptr, B, T, TP: tl.constexpr, BLOCK: tl.constexpr):
    """Routing, step 1 (one program per chunk of rows): rows of each task in the chunk, and the
    chunk's first row with an id out of range (B if none)."""
    chunk = tl.program_id(0)
    b, m, ok, onehot = _chunk_onehot(ids_ptr, chunk, B, T, TP, BLOCK)
    tl.store(counts_ptr + chunk * TP + tl.arange(0, TP), tl.sum(onehot, axis=0))
    tl.store(chunk_bad_ptr + chunk, tl.min(tl.where(m & ~ok, b, B), axis=0))


@triton.jit
def _route_place_kernel(ids_ptr, counts_ptr, chunk_bad_ptr, perm_ptr, bounds_ptr, bad_ptr, B, T, NCH,
                        TP: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr):
    """Routing, step 2 (one program per chunk): a stable counting sort. Task t's rows go to
    perm[bounds[t]:bounds[t + 1]] in batch order; each chunk places its rows after those of the
    tasks before t and of the earlier chunks."""
    chunk = tl.program_id(0)
    tix = tl.arange(0, TP)
    totals = tl.zeros([TP], dtype=tl.int32)
    before = tl.zeros([TP], dtype=tl.int32)
    first_bad = tl.zeros([CB], dtype=tl.int32) + B
    for c0 in range(0, NCH, CB):
        c = c0 + tl.arange(0, CB)
        cnt = tl.load(counts_ptr + c[:, None] * TP + tix[None, :], mask=(c < NCH)[:, None], other=0)
        totals += tl.sum(cnt, axis=0)
        before += tl.sum(tl.where((c < chunk)[:, None], cnt, 0), axis=0)
        first_bad = tl.minimum(first_bad, tl.load(chunk_bad_ptr + c, mask=c < NCH, other=B))
    starts = tl.cumsum(totals, axis=0) - totals
    if chunk == 0:
        tl.store(bounds_ptr + tix, starts.to(tl.int64), mask=tix < T)
        tl.store(bounds_ptr + T, tl.sum(totals, axis=0).to(tl.int64))
        tl.store(bad_ptr, tl.min(first_bad, axis=0).to(tl.int64))
    b, m, ok, onehot = _chunk_onehot(ids_ptr, chunk, B, T, TP, BLOCK)
    rank = tl.cumsum(onehot, axis=0)  # 1-based rank among the chunk's rows of each task
    pos = tl.sum(onehot * ((starts + before)[None, :] + rank - 1), axis=1)
    tl.store(perm_ptr + pos, b.to(tl.int64), mask=ok)


# ---------------------------------------------------------------------------------------------
# Launchers

_ROUTE_MAX_TASKS = 16  # beyond, torch.sort + searchsorted route the rows


def _check_ids(op: str, task_ids: torch.Tensor, B: int) -> None:
    if task_ids.dim() != 1:
        raise RuntimeError(f"neurokern.{op}: task_ids must be 1-D, got {list(task_ids.shape)}")
    if task_ids.is_floating_point() or task_ids.is_complex() or task_ids.dtype == torch.bool:
        raise RuntimeError(f"neurokern.{op}: task_ids must be an integer tensor, got {task_ids.dtype}")
    if task_ids.shape[0] != B:
        raise RuntimeError(f"neurokern.{op}: {task_ids.shape[0]} task ids for {B} rows")


def route(task_ids: torch.Tensor, num_tasks: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm [B] int64, bounds [T + 1] int64, bad [1] int64) on `device`, without a host sync:
    rows of task t are perm[bounds[t]:bounds[t + 1]] in batch order (a stable sort by task); bad
    holds the first row whose id is out of range (B if none). Two launches of one program per
    512 rows for T <= 16; torch.sort(stable) + searchsorted beyond."""
    ids = task_ids.to(device).contiguous()
    B = ids.shape[0]
    if num_tasks <= _ROUTE_MAX_TASKS and B < 2**31 - 1:
        TP = triton.next_power_of_2(max(num_tasks, 1))
        BLOCK = 512
        nch = triton.cdiv(B, BLOCK)
        counts = torch.empty((nch, TP), dtype=torch.int32, device=device)
        chunk_bad = torch.empty(nch, dtype=torch.int32, device=device)
        perm = torch.empty(B, dtype=torch.int64, device=device)
        bounds = torch.empty(num_tasks + 1, dtype=torch.int64, device=device)
        bad = torch.empty(1, dtype=torch.int64, device=device)
        _route_count_kernel[(nch,)](ids, counts, chunk_bad, B, num_tasks, TP=TP, BLOCK=BLOCK, num_warps=4)
        _route_place_kernel[(nch,)](ids, counts, chunk_bad, perm, bounds, bad, B, num_tasks, nch,
                                    TP=TP, BLOCK=BLOCK, CB=64, num_warps=4)
        return perm, bounds, bad
    ids = ids.long()
    rows = torch.arange(B, device=device)
    bad = torch.where((ids < 0) | (ids >= num_tasks), rows, B).amin().reshape(1)
    sorted_ids, perm = torch.sort(ids, stable=True)
    bounds = torch.searchsorted(sorted_ids, torch.arange(num_tasks + 1, device=device, dtype=torch.int64))
    return perm, bounds, bad


def tinted_route(task_ids: torch.Tensor, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.ops.neurokern.tinted_route for CUDA tensors: route's perm and bounds (ids unchecked)."""
    _check_ids("tinted_route", task_ids, task_ids.numel())
    if num_tasks < 0:
        raise RuntimeError(f"neurokern.tinted_route: num_tasks must be >= 0, got {num_tasks}")
    if task_ids.shape[0] == 0:
        return (torch.empty(0, dtype=torch.int64, device=task_ids.device),
                torch.zeros(num_tasks + 1, dtype=torch.int64, device=task_ids.device))
    perm, bounds, _ = route(task_ids, num_tasks, task_ids.device)
    return perm, bounds


def _routing(op: str, task_ids: torch.Tensor, num_tasks: int, perm: Optional[torch.Tensor],
             bounds: Optional[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(perm, bounds, bad): the caller's routing (checked for shape only; bad None) or route's."""
    if (perm is None) != (bounds is None):
        raise RuntimeError(f"neurokern.{op}: give both perm and bounds (tinted_route's outputs) or neither")
    if perm is None:
        return route(task_ids, num_tasks, device)
    B = task_ids.shape[0]
    if perm.dtype != torch.int64 or tuple(perm.shape) != (B,):
        raise RuntimeError(f"neurokern.{op}: perm must be int64 [{B}], got {perm.dtype} {list(perm.shape)}")
    if bounds.dtype != torch.int64 or tuple(bounds.shape) != (num_tasks + 1,):
        raise RuntimeError(
            f"neurokern.{op}: bounds must be int64 [{num_tasks + 1}], got {bounds.dtype} {list(bounds.shape)}")
    return perm.contiguous(), bounds.contiguous(), None


def _raise_if_bad(op: str, bad: Optional[torch.Tensor], task_ids: torch.Tensor, num_tasks: int) -> None:
    """The launcher's one device-to-host read, after its kernels are queued (none when the caller
    routed the rows)."""
    if bad is None:
        return
    b = int(bad.item())
    if b < task_ids.shape[0]:
        raise RuntimeError(
            f"neurokern.{op}: task_ids[{b}] = {int(task_ids[b])} is out of range for {num_tasks} tasks"
        )


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    """Triton's interpreter multiplies bfloat16 dot operands as their raw uint16 bits; there the
    kernels widen them to float32 first (exact: a bfloat16 product fits a float32 mantissa, as on
    the tensor cores). Never on a GPU."""
    return dtype == torch.bfloat16 and interpreting()


def _fwd_config(B: int, N: int, K: int, T: int, dtype: torch.dtype) -> dict:
    """H100-measured (T = 8; B = 512 .. 65536; in = out = 768 or 2048): 128 x 256 tiles once the
    segments are long enough to fill them, 64 / 32 / 16-row tiles for short segments."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # ieee float32 dot runs on the FMA units: small tiles
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3)
    rows = B // max(T, 1)
    if rows >= 256 and N >= 256:
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)
    block_m = 64 if rows >= 64 else 32 if rows >= 32 else 16
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)


def _grad_config(B: int, N: int, K: int, T: int, dtype: torch.dtype) -> dict:
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    if N * K >= 2048 * 2048:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)


def tinted_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], task_ids: torch.Tensor,
                  perm: Optional[torch.Tensor] = None, bounds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch.ops.neurokern.tinted_linear for CUDA tensors (and CPU tensors under TRITON_INTERPRET)."""
    return launch_tinted_linear(x, weight, bias, task_ids, perm, bounds)


def launch_tinted_linear(x, weight, bias, task_ids, perm=None, bounds=None, config: Optional[dict] = None) -> torch.Tensor:
    """tinted_linear with an optional launch configuration (BLOCK_M/N/K, num_warps, num_stages).
    weight may have any strides (the backward passes W^T as a transposed view)."""
    op = "tinted_linear"
    if x.dim() != 2:
        raise RuntimeError(f"neurokern.{op}: x must be [B, in], got {list(x.shape)}")
    if weight.dim() != 3 or weight.shape[2] != x.shape[1]:
        raise RuntimeError(
            f"neurokern.{op}: weight must be [T, out, in] with in = {x.shape[1]}, got {list(weight.shape)}"
        )
    _check_ids(op, task_ids, x.shape[0])
    if weight.dtype != x.dtype:
        raise RuntimeError(f"neurokern.{op}: weight is {weight.dtype}, x is {x.dtype}")
    if x.dtype not in STORAGE_DTYPES:
        raise RuntimeError(f"neurokern.{op}: expected float32, bfloat16 or float16 tensors, got {x.dtype}")
    T, N = weight.shape[0], weight.shape[1]
    if bias is not None:
        if tuple(bias.shape) != (T, N):
            raise RuntimeError(f"neurokern.{op}: bias must be [{T}, {N}], got {list(bias.shape)}")
        if bias.dtype != x.dtype:
            raise RuntimeError(f"neurokern.{op}: bias is {bias.dtype}, x is {x.dtype}")
    B, K = x.shape
    y = torch.empty((B, N), dtype=x.dtype, device=x.device)
    if B == 0:
        return y
    perm, bounds, bad = _routing(op, task_ids, T, perm, bounds, x.device)
    if N > 0 and T > 0:
        x = x.contiguous()
        bias = bias.contiguous() if bias is not None else None
        cfg = dict(config or _fwd_config(B, N, K, T, x.dtype))
        grid = (min(B, triton.cdiv(B, cfg["BLOCK_M"]) + T), triton.cdiv(N, cfg["BLOCK_N"]))
        _tinted_linear_kernel[grid](
            x, weight, bias if bias is not None else x, y, perm, bounds,
            N, K, T, x.stride(0), weight.stride(0), weight.stride(1), weight.stride(2), y.stride(0),
            HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype), **cfg,
        )
    _raise_if_bad(op, bad, task_ids, T)
    return y


def tinted_linear_weight_grad(grad: torch.Tensor, x: torch.Tensor, task_ids: torch.Tensor, num_tasks: int,
                              perm: Optional[torch.Tensor] = None, bounds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch.ops.neurokern.tinted_linear_weight_grad for CUDA tensors (and CPU tensors under
    TRITON_INTERPRET): [T, out, in] in x's dtype."""
    return launch_weight_grad(grad, x, task_ids, num_tasks, perm, bounds)


def launch_weight_grad(grad, x, task_ids, num_tasks: int, perm=None, bounds=None,
                       config: Optional[dict] = None) -> torch.Tensor:
    """tinted_linear_weight_grad with an optional launch configuration."""
    op = "tinted_linear_weight_grad"
    if grad.dim() != 2 or x.dim() != 2 or grad.shape[0] != x.shape[0]:
        raise RuntimeError(
            f"neurokern.{op}: grad [B, out] and x [B, in] needed, got {list(grad.shape)} and {list(x.shape)}"
        )
    if grad.dtype != x.dtype:
        raise RuntimeError(f"neurokern.{op}: grad is {grad.dtype}, x is {x.dtype}")
    if x.dtype not in STORAGE_DTYPES:
        raise RuntimeError(f"neurokern.{op}: expected float32, bfloat16 or float16 tensors, got {x.dtype}")
    if num_tasks < 0:
        raise RuntimeError(f"neurokern.{op}: num_tasks must be >= 0, got {num_tasks}")
    _check_ids(op, task_ids, x.shape[0])
    B, N, K = x.shape[0], grad.shape[1], x.shape[1]
    dw = torch.empty((num_tasks, N, K), dtype=x.dtype, device=x.device)
    if B == 0:
        return dw.zero_()
    perm, bounds, bad = _routing(op, task_ids, num_tasks, perm, bounds, x.device)
    if num_tasks > 0 and N > 0 and K > 0:
        grad = grad.contiguous()
        x = x.contiguous()
        cfg = dict(config or _grad_config(B, N, K, num_tasks, x.dtype))
        grid = (num_tasks, triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"]))
        _tinted_weight_grad_kernel[grid](
            grad, x, dw, perm, bounds, N, K, grad.stride(0), x.stride(0),
            PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype), **cfg,
        )
    _raise_if_bad(op, bad, task_ids, num_tasks)
    return dw


registry.register("tinted_route", tinted_route)
registry.register("tinted_linear", tinted_linear)
registry.register("tinted_linear_weight_grad", tinted_linear_weight_grad)
