"""Whole-method references in plain PyTorch, written the way the original code computes them:
mergekit's TIES (argsort top-k, stacked deltas), and NeuroMerging's exact per-neuron SVD path
(the authors' merging_methods.py, restated). Tests hold nk.merge to these."""
from typing import Optional

import torch
from torch import Tensor


def _tau(base: Tensor, ft: Tensor) -> Tensor:
    return ft.double() - base.double()


def _f32_tau(base: Tensor, ft: Tensor) -> Tensor:
    """Task vector as the kernels form it (float32), widened for exact further arithmetic."""
    return (ft.float() - base.float()).double()


def task_arithmetic(base, finetuned, weights, scale=1.0, normalize=False):
    out = {}
    for name, b in base.items():
        delta = sum(w * _tau(b, ft[name]) for w, ft in zip(weights, finetuned))
        if normalize:
            delta = delta / sum(weights)
        out[name] = (b.double() + scale * delta).to(b.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# mergekit 0.1.5 TIES (generalized_task_arithmetic + sparsify.magnitude + get_mask)


def mergekit_magnitude(delta: Tensor, density: float) -> Tensor:
    """sparsify.magnitude: keep exactly k = max(1, int(density * N)) largest |delta| (stable order
    for equal magnitudes: lowest index first)."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros_like(delta)
    top = torch.argsort(delta.abs().view(-1), descending=True, stable=True)[:k]
    mask.view(-1)[top] = 1
    return delta * mask


def mergekit_ties(base, finetuned, density, weights, consensus="sum", normalize=True, scale=1.0):
    """density: one for all models or a list with one per model."""
    densities = density if isinstance(density, (list, tuple)) else [density] * len(finetuned)
    out = {}
    for name, b in base.items():
        deltas = torch.stack([mergekit_magnitude(_f32_tau(b, ft[name]), d) for ft, d in zip(finetuned, densities)])
        w = torch.tensor(weights, dtype=deltas.dtype).view((-1,) + (1,) * b.dim())
        weighted = deltas * w
        sign = weighted.sign()
        if consensus == "sum":
            majority = (weighted.sum(0) >= 0).to(sign.dtype) * 2 - 1
        else:
            majority = (sign.sum(0) >= 0).to(sign.dtype) * 2 - 1
        mask = sign == majority
        mixed = (weighted * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
        if normalize:
            mixed = mixed / divisor
        out[name] = (b.double() + scale * mixed).to(b.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# NeuroMerging, exact SVD path


def _reference_trim(taus: list[Tensor], density: float) -> list[Tensor]:
    """The reference's mask_smallest_magnitude_param_values over the tensors given (flattened
    together): kthvalue of the m = int(N * (1 - density)) smallest, keep |tau| >= it."""
    flat = torch.cat([t.flatten() for t in taus])
    m = int(flat.numel() * (1 - density))
    if m == 0:
        return taus
    kth = flat.abs().float().kthvalue(m).values.double()
    return [t * (t.abs() >= kth) for t in taus]


def _inner_ties(x: Tensor) -> Tensor:
    """inner_ties_kernel: x [t, b]; sign of the sum per column, majority over columns on 0."""
    sign = torch.sign(x.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, x > 0, x < 0)
    x = x * keep
    return x.sum(0) / torch.clamp((x != 0).sum(0).double(), min=1)


def _neuron_kernel(w: Tensor, taus: Tensor, lam_par: float, lam_orth: float, basis: str, gamma: float) -> Tensor:
    """One 2-D tensor: w [m, n] pre-trained, taus [k, m, n] trimmed task vectors -> merged delta."""
    den = (w * w).sum(1)  # [m]
    safe = torch.where(den > 0, den, torch.ones_like(den))
    c = torch.where(den > 0, (taus * w).sum(2) / safe, torch.zeros_like(den))  # [k, m]
    perp = (taus - c.unsqueeze(2) * w).permute(1, 0, 2)  # [m, k, n]
    _, S, VT = torch.linalg.svd(perp, full_matrices=False)
    S2 = S**2
    cum = torch.cumsum(S2, 1) / S2.sum(1, keepdim=True)
    rank = torch.minimum((cum < gamma).sum(1) + 1, torch.tensor(VT.shape[-2]))
    V = VT.transpose(1, 2)  # [m, n, r]
    coords = perp @ V  # [m, k, r]
    merged = torch.zeros_like(w)
    for row in range(w.shape[0]):
        star = _inner_ties(coords[row])
        r = int(rank[row])
        merged[row] = (star[:r] * V[row, :, :r]).sum(1)
    delta = lam_orth * merged
    if lam_par != 0:
        c_star = _inner_ties(c)  # [m]
        norm = den.sqrt()
        direction = torch.where(norm[:, None] > 0, w / torch.where(norm > 0, norm, 1)[:, None], 0) if basis == "unit" else w
        delta = delta + lam_par * c_star[:, None] * direction
    return delta


def _point_kernel(taus: Tensor) -> Tensor:
    """ties_kernel: elementwise TIES, majority sign over the whole tensor where a sum is 0."""
    flat = taus.reshape(taus.shape[0], -1)
    return _inner_ties(flat).view(taus.shape[1:])


def neuromerging(
    base, finetuned, density=0.1, scale: Optional[float] = None, scale_parallel=0.0,
    trim_scope="global", parallel_basis="unit", gamma=1.0,
):
    """Merged state dict in float64 (not rounded to the storage dtype), for comparisons."""
    names = [n for n, b in base.items() if b.is_floating_point()]
    T = len(finetuned)
    taus = {n: [_f32_tau(base[n], ft[n]) for ft in finetuned] for n in names}
    if trim_scope == "global":
        kept_by_task = [_reference_trim([taus[n][t] for n in names], density) for t in range(T)]
        kept = {n: [kept_by_task[t][i] for t in range(T)] for i, n in enumerate(names)}
    else:
        kept = {n: [_reference_trim([taus[n][t]], density)[0] for t in range(T)] for n in names}
    if scale is None:  # lambda_2 = 1 / (1 - sigma), sigma_t = |trimmed away|_1 / |tau_t|_1
        sigmas = []
        for t in range(T):
            total = sum(float(taus[n][t].abs().sum()) for n in names)
            left = sum(float(kept[n][t].abs().sum()) for n in names)
            sigmas.append(1 - left / total if total > 0 else 0.0)
        scale = 1.0 / (1.0 - max(sigmas))
    point_scale = scale if scale_parallel == 0 else (scale_parallel + scale) / 2
    out = {}
    for name, b in base.items():
        if name not in kept:
            out[name] = b
            continue
        stacked = torch.stack(kept[name])
        if b.dim() == 2:
            delta = _neuron_kernel(b.double(), stacked, scale_parallel, scale, parallel_basis, gamma)
        else:
            delta = point_scale * _point_kernel(stacked)
        out[name] = b.double() + delta
    return out


# ---------------------------------------------------------------------------------------------
# mergekit's linear, slerp, nuslerp, model_stock and the breadcrumbs / DELLA trims, in float64,
# in their textbook form (the angle from acos of the normalised dot; one whole-tensor or per-row
# formula each)


def linear(base, finetuned, weights, base_weight=0.0, normalize=True):
    out = {}
    for name, b in base.items():
        total = base_weight * b.double() + sum(w * ft[name].double() for w, ft in zip(weights, finetuned))
        out[name] = (total / (base_weight + sum(weights)) if normalize else total).to(b.dtype)
    return out


def _slerp_pair(t: float, a: Tensor, b: Tensor, straight_cos: Optional[float], floor: float, guard_one: bool):
    """c_a a + c_b b along the last dimension of 2-D a, b (float64), one pair of coefficients per row."""
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    if guard_one:  # slerp: a norm <= floor counts as 1
        na, nb = torch.where(na > floor, na, torch.ones_like(na)), torch.where(nb > floor, nb, torch.ones_like(nb))
    else:  # nuslerp: norms clamped to at least floor
        na, nb = na.clamp_min(floor), nb.clamp_min(floor)
    cos = ((a / na) * (b / nb)).sum(1, keepdim=True).clamp(-1, 1)
    straight = cos.abs() > straight_cos if straight_cos is not None else (1 - cos**2) <= 1e-16
    theta = torch.acos(cos)
    ca = torch.where(straight, 1 - t, torch.sin((1 - t) * theta) / torch.sin(theta))
    cb = torch.where(straight, torch.full_like(cos, t), torch.sin(t * theta) / torch.sin(theta))
    return ca * a + cb * b


def slerp(base, other, t):
    return {name: _slerp_pair(t, b.double().reshape(1, -1), other[name].double().reshape(1, -1), 0.9995, 1e-8, True)
            .reshape(b.shape).to(b.dtype) for name, b in base.items()}


def nuslerp(base, finetuned, weights, flatten=True, row_wise=False):
    """With a base (finetuned: two models): base + slerp of the task vectors; base None: slerp of the two."""
    t = 0.5 if abs(sum(weights)) < 1e-6 else weights[1] / sum(weights)
    first, second = finetuned
    out = {}
    for name, f in first.items():
        like = f if base is None else base[name]
        if like.numel() == 0:
            out[name] = like.clone()
            continue
        a, b = first[name].double(), second[name].double()
        if base is not None:
            a, b = a - like.double(), b - like.double()
        if flatten:
            rows = lambda x: x.reshape(1, -1)  # noqa: E731
        elif row_wise and a.dim() > 1:
            rows = lambda x: x.movedim(0, -1).reshape(-1, x.shape[0])  # noqa: E731
        else:
            rows = lambda x: x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)  # noqa: E731
        mixed = _slerp_pair(t, rows(a), rows(b), None, 1e-7, False)
        if not flatten and row_wise and a.dim() > 1:
            mixed = mixed.reshape(*a.shape[1:], a.shape[0]).movedim(-1, 0)
        mixed = mixed.reshape(a.shape)
        out[name] = (mixed if base is None else like.double() + mixed).to(like.dtype)
    return out


def model_stock(base, finetuned, filter_wise=False):
    out = {}
    count = len(finetuned)
    for name, b in base.items():
        rows = (lambda x: x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)) if filter_wise else \
            (lambda x: x.reshape(1, -1))
        taus = [rows(ft[name].double() - b.double()) for ft in finetuned]
        cosines = []
        for i in range(count):
            for j in range(i + 1, count):
                norms = (taus[i].norm(dim=1) * taus[j].norm(dim=1)).clamp_min(1e-6)
                cosines.append(((taus[i] * taus[j]).sum(1) / norms).clamp(-1, 1))
        cos = torch.stack(cosines).mean(0, keepdim=True).T
        denominator = 1 + (count - 1) * cos
        t = torch.where(denominator.abs() < 1e-6, torch.zeros_like(cos), count * cos / denominator)
        mean = sum(taus) / count
        out[name] = (b.double() + (t * mean).reshape(b.shape)).to(b.dtype)
    return out


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Keep the entries ranked (by |delta| ascending, ties by position) in [N - k - n_top, N - n_top)."""
    count = delta.numel()
    keep, top = int(density * count), int(gamma * count)
    low = max(0, count - keep - top)
    flat = delta.abs().reshape(-1).double()
    rank = torch.empty(count, dtype=torch.long)
    order = sorted(range(count), key=lambda i: (float(flat[i]), i))
    rank[order] = torch.arange(count)
    return ((rank >= low) & (rank < low + keep)).reshape(delta.shape)


def della_probability(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """density - epsilon + 2 epsilon (r - 1) / (n - 1), r the ascending |delta| rank (ties by position) in its row."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    n = rows.shape[1]
    out = torch.empty(rows.shape, dtype=torch.float64)
    for r in range(rows.shape[0]):
        order = sorted(range(n), key=lambda i: (float(rows[r, i].abs()), i))
        for rank, i in enumerate(order):
            out[r, i] = density - epsilon + 2 * epsilon * rank / (n - 1) if n > 1 else density
    return out.reshape(delta.shape)
