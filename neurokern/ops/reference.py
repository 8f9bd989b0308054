"""What every neurokern op means, in plain PyTorch.

These functions are the specification the C++, CUDA and Triton kernels are tested against: they
favour the obvious formulation (sorting, stacking, per-neuron SVD) over speed. Arguments mirror the
op faces in neurokern.ops. Task vectors are formed in float32 (tau = float(theta_t) - float(theta_0)),
as the kernels do; pass float64 tensors to get float64 arithmetic throughout.

Finite inputs near the float32 / bfloat16 maximum can have task vectors beyond float32's range
(|tau| > 3.4e38): the float32 tau is then +-inf. Trims still decide on that float32 |tau| (+inf
ranks above every finite magnitude), but every value computed from a kept tau uses the float64
difference (task_vector_wide): the reductions always, weighted_sum where its float32 result is not
finite (the kernels recompute those elements in float64).
"""
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

INT64_MAX = torch.iinfo(torch.int64).max


def task_vector(base: Tensor, finetuned: Tensor) -> Tensor:
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    return finetuned.to(dtype) - base.to(dtype)


def task_vector_wide(base: Tensor, finetuned: Tensor) -> Tensor:
    """float64 task vector: the float32 tau (task_vector), or where that is not finite, the float64
    difference (exact for finite inputs)."""
    tau = task_vector(base, finetuned).double()
    return torch.where(torch.isfinite(tau), tau, finetuned.double() - base.double())


def keep_mask(tau: Tensor, threshold: Tensor, tie_limit: Tensor, offset: int = 0) -> Tensor:
    """The trim rule: keep |tau| > threshold, and entries equal to it at flat position < tie_limit."""
    mag = tau.abs()
    pos = offset + torch.arange(tau.numel(), device=tau.device).view(tau.shape)
    thr = threshold.to(mag.dtype)
    return (mag > thr) | ((mag == thr) & (pos < tie_limit))


def trimmed(tau: Tensor, trim: Optional[tuple[Tensor, Tensor]], t: int, offset: int = 0) -> Tensor:
    if trim is None:
        return tau
    threshold, tie_limit = trim
    return tau * keep_mask(tau, threshold[t], tie_limit[t], offset)


def trimmed_wide(base: Tensor, finetuned: Tensor, trim: Optional[tuple[Tensor, Tensor]], t: int,
                 offset: int = 0) -> Tensor:
    """trim(task_vector_wide): kept where the trim keeps the float32 tau."""
    wide = task_vector_wide(base, finetuned)
    if trim is None:
        return wide
    threshold, tie_limit = trim
    return torch.where(keep_mask(task_vector(base, finetuned), threshold[t], tie_limit[t], offset), wide, 0.0)


def _tasks(finetuned: Sequence[Tensor], n: int) -> int:
    if n == 0 or len(finetuned) % n:
        raise ValueError(f"{len(finetuned)} fine-tuned tensors for {n} base tensors")
    return len(finetuned) // n


# ---------------------------------------------------------------------------------------------
# magnitude_threshold, trim_l1


def _select(mags: Tensor, k: int, keep_ties: bool) -> tuple[float, int]:
    k = min(k, mags.numel())
    if k <= 0:
        return math.inf, 0
    thr = torch.sort(mags, descending=True).values[k - 1]
    need = k - int((mags > thr).sum())
    tied = torch.nonzero(mags == thr).flatten()
    if keep_ties or need == tied.numel():
        return float(thr), INT64_MAX
    return float(thr), int(tied[need - 1]) + 1


def magnitude_threshold(base, finetuned, k, keep_ties=True, per_tensor=False, nonfinite=None):
    n = len(base)
    T = _tasks(finetuned, n)
    mags = [[task_vector(base[i], finetuned[t * n + i]).float().abs().flatten() for i in range(n)] for t in range(T)]
    if nonfinite is not None:
        nonfinite.copy_(torch.tensor([any(not bool(torch.isfinite(mags[t][i]).all()) for t in range(T))
                                      for i in range(n)], dtype=torch.int32))
    if per_tensor:
        pairs = [[_select(mags[t][i], k[i * T + t], keep_ties) for t in range(T)] for i in range(n)]
    else:
        pairs = [_select(torch.cat(mags[t]), k[t], keep_ties) for t in range(T)]
    thr = torch.tensor([[p[0] for p in row] for row in pairs] if per_tensor else [p[0] for p in pairs])
    lim = torch.tensor([[p[1] for p in row] for row in pairs] if per_tensor else [p[1] for p in pairs])
    return thr.float(), lim.long()


def trim_l1(base, finetuned, trim=None):
    n = len(base)
    T = _tasks(finetuned, n)
    out = torch.zeros(T, 2, dtype=torch.float64, device=base[0].device)
    offset = 0
    for i in range(n):
        for t in range(T):
            tau = task_vector_wide(base[i], finetuned[t * n + i])
            if trim is not None and trim[0].dim() == 2:
                kept = trimmed_wide(base[i], finetuned[t * n + i], (trim[0][i], trim[1][i]), t, 0)
            else:
                kept = trimmed_wide(base[i], finetuned[t * n + i], trim, t, offset)
            out[t, 0] += tau.abs().sum()
            out[t, 1] += kept.abs().sum()
        offset += base[i].numel()
    return out


# ---------------------------------------------------------------------------------------------
# NeuroMerging's per-neuron ops


def neuron_stats(base, finetuned, trim=None, offset=0):
    w = base.double()
    taus = torch.stack([trimmed_wide(base, f, trim, t, offset) for t, f in enumerate(finetuned)], 1)
    gram = torch.einsum("rsc,rtc->rst", taus, taus)
    dots = torch.einsum("rtc,rc->rt", taus, w)
    return gram, dots, (w * w).sum(1)


def subspace_split(base, finetuned, trim=None, offset=0):
    w = base.double()
    q = (w * w).sum(1, keepdim=True)
    coeffs, orth = [], []
    for t, f in enumerate(finetuned):
        tau = trimmed_wide(base, f, trim, t, offset)
        c = torch.where(q > 0, (tau * w).sum(1, keepdim=True) / q.clamp_min(1e-300), torch.zeros_like(q))
        coeffs.append(c.squeeze(1))
        orth.append((tau - c * w).float())
    return torch.stack(coeffs, 1).float(), orth


def ties_vector(x: Tensor, fallback: int) -> Tensor:
    """TIES over dim 0 of x [T, B]: elected sign per column (fallback where the sum is 0; a fallback
    of 0 elects the negative side, as where(sign > 0, x > 0, x < 0) does), disjoint mean."""
    sign = torch.sign(x.sum(0))
    sign[sign == 0] = fallback
    keep = torch.where(sign > 0, x > 0, x < 0)
    return (x * keep).sum(0) / keep.sum(0).clamp_min(1)


def majority(x: Tensor) -> int:
    """Majority sign over columns of the per-column elected signs of x [T, B]."""
    return int(torch.sign(torch.sign(x.sum(0)).sum()))


def neuromerge_coeffs(gram, dots, sqnorm, lambda_parallel, lambda_orthogonal, parallel_basis="unit", gamma=1.0):
    """Per row: eigen-decompose the residual Gram G = g - c c^T q (its U, Sigma are the SVD's of the
    stacked residuals), TIES on A = U Sigma, beta_t = sum_j a*_j U_tj / sigma_j."""
    gram, dots, q = gram.double(), dots.double(), sqnorm.double()
    R, T = dots.shape
    c = torch.where(q[:, None] > 0, dots / q[:, None].clamp_min(1e-300), torch.zeros_like(dots))
    out = torch.zeros(T + 1, R, dtype=torch.float64)
    row_major = majority(c.T) if lambda_parallel != 0 else 0
    for r in range(R):
        G = gram[r] - torch.outer(c[r], c[r]) * q[r]
        evals, U = torch.linalg.eigh(G)
        order = torch.argsort(evals, descending=True)
        evals, U = evals[order], U[:, order]
        sigma = evals.clamp_min(0).sqrt()
        # Rank deficiency: components under the Gram's noise, relative to the task vectors' scale.
        active = sigma > 1e-6 * gram[r].diagonal().max().clamp_min(0).sqrt()
        total = (sigma**2).sum()
        rank = T
        if total > 0:
            rank = min(int((torch.cumsum(sigma**2, 0) / total < gamma).sum()) + 1, T)
        A = U * torch.where(active, sigma, torch.zeros_like(sigma))
        star = ties_vector(A, majority(A))
        use = active & (torch.arange(T) < rank)
        beta = (U[:, use] * (star[use] / sigma[use])).sum(1)
        base_coeff = 1.0 - lambda_orthogonal * float((beta * c[r]).sum())
        if lambda_parallel != 0 and q[r] > 0:
            c_star = float(ties_vector(c[r][:, None], row_major)[0])
            base_coeff += lambda_parallel * c_star * (1 / math.sqrt(q[r]) if parallel_basis == "unit" else 1.0)
        out[0, r] = base_coeff
        out[1:, r] = lambda_orthogonal * beta
    return out.float()


# ---------------------------------------------------------------------------------------------
# weighted_sum


def _expand_coeff(a: Tensor, base: Tensor) -> Tensor:
    """One input's coefficient, broadcast to base's shape (per tensor, per row, per element)."""
    if a.dim() == 0:
        return a.expand(base.shape)
    if a.shape == base.shape:
        return a
    return a.reshape(a.shape + (1,) * (base.dim() - 1)).expand(base.shape)


def weighted_sum(base, finetuned, coeffs, trim=None, offset=0, out_dtype=None):
    """Accumulated in float32 (float64 for float64 inputs); elements whose float32 sum is not
    finite are the float64 sum of the wide task vectors, rounded to float32."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    out = _expand_coeff(coeffs[0], base) * base.to(dtype)
    wide = _expand_coeff(coeffs[0], base).double() * base.double()
    for t, f in enumerate(finetuned):
        a = _expand_coeff(coeffs[t + 1], base)
        out = out + a * trimmed(task_vector(base, f), trim, t, offset)
        wide = wide + a.double() * trimmed_wide(base, f, trim, t, offset)
    out = torch.where(torch.isfinite(out), out, wide.to(dtype))
    return out.to(out_dtype or base.dtype)


def weighted_sum_backward(grad, base, finetuned, coeffs, trim=None, offset=0):
    """dL/dcoeffs[i] = <grad, x_i> reduced to coeffs[i]'s shape (x_0 = base, x_t = trim(tau_t))."""
    xs = [base.double()] + [trimmed(task_vector(base, f), trim, t, offset).double() for t, f in enumerate(finetuned)]
    g = grad.double()
    out = []
    for x in xs:
        prod = g * x
        if coeffs.dim() == 1:
            out.append(prod.sum())
        elif coeffs.shape[1:] == base.shape:
            out.append(prod)
        else:
            out.append(prod.reshape(base.shape[0], base[0].numel() if base.shape[0] else 0).sum(1))
    return torch.stack(out).float()


# ---------------------------------------------------------------------------------------------
# ties_merge, dare (mergekit's generalized task arithmetic, with the variants as options)


def _elect_and_mix(d: Tensor, e: Tensor, w: Tensor, consensus: str, fallback, normalize: str) -> Tensor:
    """d, e: [T, ...] contributions and votes; w: [T, 1, ...] weights."""
    if consensus == "none":
        mixed = d.sum(0)
        if normalize == "weights":
            ws = float(w.sum())
            return mixed / (1.0 if abs(ws) < 1e-8 else ws)
        return mixed / (d.shape[0] if normalize == "count" else 1)
    votes = e.sum(0) if consensus == "sum" else torch.sign(e).sum(0)
    sign = torch.sign(votes)
    sign = torch.where(sign == 0, torch.as_tensor(fallback, dtype=sign.dtype), sign)
    agree = torch.where(sign > 0, e > 0, e < 0)
    mixed = (d * agree).sum(0)
    if normalize == "weights":
        div = (w * agree).sum(0)
        return mixed / torch.where(div == 0, torch.ones_like(div), div)
    if normalize == "count":
        return mixed / agree.sum(0).clamp_min(1)
    return mixed


def _weights(weights, like: Tensor) -> Tensor:
    return torch.tensor(weights, dtype=torch.float64, device=like.device).reshape((-1,) + (1,) * like.dim())


def ties_merge(base, finetuned, weights, trim=None, offset=0, consensus="sum", normalize="weights",
               elect_weighted=True, zero_sign="positive", scale=1.0):
    taus = torch.stack([trimmed_wide(base, f, trim, t, offset) for t, f in enumerate(finetuned)])
    w = _weights(weights, base)
    d = taus * w
    e = d if elect_weighted else taus
    fallback = 1
    if zero_sign == "majority":
        votes = e.sum(0) if consensus == "sum" else torch.sign(e).sum(0)
        fallback = int(torch.sign(torch.sign(votes).sum()))
    mixed = _elect_and_mix(d, e, w, consensus, fallback, normalize)
    return (base.double() + scale * mixed).to(base.dtype)


_M32 = 0xFFFFFFFF


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of a * b for a < 2^32 and int64 b < 2^32, without int64 overflow."""
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    lo = p_lo + ((p_hi & 0xFFFF) << 16)
    return ((p_hi >> 16) + (lo >> 32)) & _M32, lo & _M32


def philox4x32_10(c0: Tensor, c1: Tensor, key: int) -> list[Tensor]:
    """Philox-4x32-10 on counters (c0, c1, 0, 0) (int64 tensors holding uint32 values)."""
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = key & _M32, (key >> 32) & _M32
    for _ in range(10):
        hi_a, lo_a = _mulhilo(0xD2511F53, c0)
        hi_b, lo_b = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return [c0, c1, c2, c3]


def dare_threshold(density: float) -> int:
    """The keep threshold on 32-bit draws: floor(density * 2^32 + 0.5), at most 2^32."""
    return min(int(density * 4294967296.0 + 0.5), 4294967296)


def dare_keep(numel: int, density: float, key: int, shape=None, device=None) -> Tensor:
    """DARE's keep mask: entry i survives iff draw(key, i) < dare_threshold(density), with
    probability p = dare_threshold(density) / 2^32."""
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    block = idx >> 2
    lanes = philox4x32_10(block & _M32, block >> 32, key & ((1 << 64) - 1))
    draw = torch.stack(lanes).gather(0, (idx & 3)[None]).squeeze(0)
    keep = draw < dare_threshold(density)
    return keep.view(shape) if shape is not None else keep


def dare(base, finetuned, weights, density, keys, rescale="density", consensus="none", normalize="none", scale=1.0):
    """rescale "density" divides the kept entries by the keep probability actually used,
    p = dare_threshold(density) / 2^32 (density itself where density * 2^24 is an integer)."""
    taus = []
    threshold = dare_threshold(density)
    for t, f in enumerate(finetuned):
        tau = task_vector_wide(base, f)
        kept = tau * dare_keep(base.numel(), density, keys[t], base.shape, base.device)
        if rescale == "density" and threshold:
            kept = kept * (4294967296.0 / threshold)
        elif rescale == "l1":  # mergekit's rescaled_masked_tensor with the L1 norm
            before, after = tau.abs().sum(), kept.abs().sum()
            if before >= 1e-7 and after >= 1e-7:
                kept = kept * (before / after)
        taus.append(kept)
    w = _weights(weights, base)
    d = torch.stack(taus) * w
    mixed = _elect_and_mix(d, d, w, consensus, 1, normalize)
    return (base.double() + scale * mixed).to(base.dtype)


# ---------------------------------------------------------------------------------------------
# The multi-tensor forms: the single-tensor op on each tensor of the list


def _multi_args(base, finetuned, trim, offsets, i):
    """Tensor i's fine-tuned versions (finetuned is task-major), trim pair and offset."""
    n = len(base)
    column = list(finetuned[i::n])
    if trim is not None and trim[0].dim() == 2:
        trim = (trim[0][i], trim[1][i])
    return column, trim, (offsets[i] if offsets else 0)


def weighted_sum_multi(base, finetuned, coeffs, trim=None, offsets=None, out_dtype=None, nonfinite=None):
    """nonfinite (int32 [n]), when given, is set to 1 where out[i] holds a NaN or Inf."""
    out = []
    for i, b in enumerate(base):
        column, trim_i, offset = _multi_args(base, finetuned, trim, offsets, i)
        out.append(weighted_sum(b, column, coeffs[i], trim_i, offset, out_dtype))
    if nonfinite is not None:
        nonfinite.copy_(torch.tensor([not bool(torch.isfinite(o).all()) for o in out], dtype=torch.int32))
    return out


def weighted_sum_rows_multi(base, finetuned, coeffs, trim=None, offsets=None, out_dtype=None):
    """Per-row weighted_sum of each matrix, its coefficients the columns of coeffs [T+1, sum of rows]
    at its rows in list order."""
    out, first = [], 0
    for i, b in enumerate(base):
        column, trim_i, offset = _multi_args(base, finetuned, trim, offsets, i)
        out.append(weighted_sum(b, column, coeffs[:, first:first + b.shape[0]], trim_i, offset, out_dtype))
        first += b.shape[0]
    return out


def weighted_sum_multi_backward(grad, base, finetuned, coeffs, trim=None, offsets=None):
    rows = []
    for i, b in enumerate(base):
        column, trim_i, offset = _multi_args(base, finetuned, trim, offsets, i)
        rows.append(weighted_sum_backward(grad[i], b, column, coeffs[i], trim_i, offset))
    return torch.stack(rows)


def ties_merge_multi(base, finetuned, weights, trim=None, offsets=None, nonfinite=None, **options):
    """nonfinite (int32 [n]), when given, is set to 1 where out[i] holds a NaN or Inf."""
    out = []
    for i, b in enumerate(base):
        column, trim_i, offset = _multi_args(base, finetuned, trim, offsets, i)
        out.append(ties_merge(b, column, weights, trim_i, offset, **options))
    if nonfinite is not None:
        nonfinite.copy_(torch.tensor([not bool(torch.isfinite(o).all()) for o in out], dtype=torch.int32))
    return out


def neuron_stats_multi(base, finetuned, trim=None, offsets=None):
    """The rows of every tensor's neuron_stats, concatenated in list order."""
    parts = []
    for i, b in enumerate(base):
        column, trim_i, offset = _multi_args(base, finetuned, trim, offsets, i)
        parts.append(neuron_stats(b, column, trim_i, offset))
    return tuple(torch.cat(p) for p in zip(*parts))


def dare_multi(base, finetuned, weights, density, keys, **options):
    T = _tasks(finetuned, len(base))
    return [dare(b, list(finetuned[i::len(base)]), weights, density, keys[i * T:(i + 1) * T], **options)
            for i, b in enumerate(base)]


# ---------------------------------------------------------------------------------------------
# tinted_linear


def tinted_route(task_ids, num_tasks):
    ids = task_ids.long()
    sorted_ids, perm = torch.sort(ids, stable=True)
    bounds = torch.searchsorted(sorted_ids, torch.arange(num_tasks + 1, device=ids.device))
    return perm, bounds


def tinted_linear(x, weight, bias, task_ids):
    y = torch.einsum("bi,boi->bo", x.double(), weight[task_ids].double())
    if bias is not None:
        y = y + bias[task_ids].double()
    return y.to(x.dtype)


def tinted_linear_weight_grad(grad, x, task_ids, num_tasks):
    out = torch.zeros(num_tasks, grad.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    out.index_add_(0, task_ids.long(), torch.einsum("bo,bi->boi", grad.double(), x.double()))
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# lora_add_rows


def lora_add_rows(rows, A, B, scale, transposed=False, embedding=False, first=0):
    """rows + ΔW[first:first + len(rows)], a new tensor: ΔW formed whole as PEFT's get_delta_weight
    forms it on a CPU (half-precision factors multiplied in float32; the product, transposed for
    embeddings and fan_in_fan_out layers, times scale, in the factors' dtype), added as PEFT's merge
    adds it (in place into the weight: the sum in the wider dtype, rounded to the weight's; an
    embedding's ΔW rounded to the weight's dtype first)."""
    product = B.float() @ A.float()
    delta = ((product.T if transposed else product) * scale).to(A.dtype)[first:first + rows.shape[0]]
    out = rows.clone()
    out += delta.to(out.dtype) if embedding else delta
    return out
