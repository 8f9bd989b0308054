"""CUDA kernels against the CPU kernels and nk.merge on the GPU against the CPU, at the shapes of
real models. Skipped without a GPU."""
import math

import pytest
import torch

import neurokern as nk
from neurokern import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(700, 300), (256, 2048), (2048,), (1, 1), (17, 1), (1, 33), (0, 7)]
REAL_SHAPES = [(32000, 2048), (5632, 2048), (2048, 2048), (256, 2048), (2048,)]


def group(shape, T, dtype, seed, device="cuda", quantize=False):
    g = torch.Generator(device=device).manual_seed(seed)
    base = (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype)
    fts = []
    for _ in range(T):
        noise = 0.002 * torch.randn(shape, generator=g, device=device)
        if quantize:  # coarse grid: many equal magnitudes
            noise = torch.round(noise * 2000) / 2000
        fts.append((base.float() + noise).to(dtype))
    return base, fts


def check_thresholds(shapes, dtype, T, keep_ties):
    """dtype: one storage dtype, or a list cycled through the tensors (a scope mixing dtypes)."""
    dtypes = dtype if isinstance(dtype, list) else [dtype]
    groups = [group(s, T, dtypes[i % len(dtypes)], seed=i, quantize=i % 2 == 1) for i, s in enumerate(shapes)]
    base = [b for b, _ in groups]
    fts = [groups[i][1][t] for t in range(T) for i in range(len(groups))]
    N = sum(b.numel() for b in base)
    for k in ([0, 1, N // 5, N - 1, N, N + 3] * T)[:T], [N // 5] * T:
        got = ops.magnitude_threshold(base, fts, k, keep_ties)
        want = ops.magnitude_threshold([b.cpu() for b in base], [f.cpu() for f in fts], k, keep_ties)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    k = [max(1, b.numel() // 5) for b in base for _ in range(T)]
    got = ops.magnitude_threshold(base, fts, k, keep_ties, per_tensor=True)
    want = ops.magnitude_threshold([b.cpu() for b in base], [f.cpu() for f in fts], k, keep_ties, per_tensor=True)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("keep_ties", [True, False])
def test_magnitude_threshold_matches_cpu(dtype, T, keep_ties):
    check_thresholds(SHAPES, dtype, T, keep_ties)


@pytest.mark.parametrize("keep_ties", [True, False])
def test_magnitude_threshold_real_shapes(keep_ties):
    check_thresholds(REAL_SHAPES, torch.bfloat16, 4, keep_ties)


@pytest.mark.parametrize("T", [1, 4, 5, 8])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_magnitude_threshold_nonfinite_flags(T, per_tensor):
    """The candidate pass flags the tensors with a NaN / Inf task vector entry (in the base or any
    task, in a vector-loaded body or a tail, in a group that keeps nothing), as the CPU op does,
    and the thresholds stay those of the CPU op."""
    shapes = REAL_SHAPES[1:] + SHAPES
    dtypes = [torch.bfloat16, torch.float32, torch.float16]
    groups = [group(s, T, dtypes[i % 3], seed=i) for i, s in enumerate(shapes)]
    base = [b for b, _ in groups]
    fts = [groups[i][1][t] for t in range(T) for i in range(len(groups))]
    n = len(base)
    plant = {0: (0, -1, math.nan), 2: (T, 5, math.inf), 4: (T // 2, 0, -math.inf), 5: (1 % (T + 1), 699 * 300, math.nan)}
    for i, (slot, pos, bad) in plant.items():  # slot 0: the base, else task slot - 1
        x = base[i] if slot == 0 else fts[(slot - 1) * n + i]
        x.view(-1)[pos] = bad
    k = [0 if (i + t) % 3 == 0 else max(1, base[i].numel() // 5) for i in range(n) for t in range(T)] if per_tensor \
        else [0] + [sum(b.numel() for b in base) // 5] * (T - 1)
    flags = torch.full((n,), 9, dtype=torch.int32, device="cuda")
    got = ops.magnitude_threshold(base, fts, k, False, per_tensor, nonfinite=flags)
    cpu_flags = torch.zeros(n, dtype=torch.int32)
    want = ops.magnitude_threshold([b.cpu() for b in base], [f.cpu() for f in fts], k, False, per_tensor,
                                   nonfinite=cpu_flags)
    assert flags.tolist() == cpu_flags.tolist() == [int(i in plant) for i in range(n)]
    assert torch.equal(got[0].cpu().view(torch.int32), want[0].view(torch.int32))  # bits: a NaN threshold is one
    assert torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("keep_ties", [True, False])
def test_magnitude_threshold_unrepresentative_sample(per_tensor, keep_ties):
    """The sampled chunks (every 32nd block of 16384 elements) hold tiny deltas, the rest large
    ones: the sample's window misses the k-th key and the full digit passes must take over."""
    T, rows = 3, 41 * 8  # 41 chunks of 8 rows x 2048
    base = (torch.randn(rows, 2048, device="cuda") * 0.02).to(torch.bfloat16)
    scale = torch.full((rows, 1), 1e-2, device="cuda")
    scale[0:8] = scale[256:264] = 1e-6  # chunks 0 and 32
    fts = [(base.float() + scale * torch.randn(rows, 2048, device="cuda")).to(torch.bfloat16) for _ in range(T)]
    k = [base.numel() // 5] * T
    got = ops.magnitude_threshold([base], fts, k, keep_ties, per_tensor=per_tensor)
    want = ops.magnitude_threshold([base.cpu()], [f.cpu() for f in fts], k, keep_ties, per_tensor=per_tensor)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("keep_ties", [True, False])
def test_magnitude_threshold_frozen_tensors(per_tensor, keep_ties):
    """Tensors a fine-tuning left untouched: every key of theirs is 0, so the k-th key is tied with
    millions (more candidates than the buffer takes: the full digits and the tie count take over),
    next to tensors with small, coarse deltas (many ties, within the buffer)."""
    T = 3
    frozen = (torch.randn(2048, 2048, device="cuda") * 0.02).to(torch.bfloat16)
    moved, moved_fts = group((1000, 513), T, torch.bfloat16, seed=5, quantize=True)
    base = [frozen, moved]
    fts = [x for t in range(T) for x in (frozen.clone(), moved_fts[t])]
    N = frozen.numel() + moved.numel()
    k = [max(1, b.numel() // 5) for b in base for _ in range(T)] if per_tensor else [N // 5, N // 2, N - 7][:T]
    got = ops.magnitude_threshold(base, fts, k, keep_ties, per_tensor=per_tensor)
    want = ops.magnitude_threshold([b.cpu() for b in base], [f.cpu() for f in fts], k, keep_ties, per_tensor=per_tensor)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize("T", [1, 3, 5])
@pytest.mark.parametrize("keep_ties", [True, False])
def test_magnitude_threshold_mixed_dtypes(T, keep_ties):
    check_thresholds(SHAPES + REAL_SHAPES[2:], [torch.bfloat16, torch.float32, torch.float16], T, keep_ties)


@pytest.mark.parametrize("T", range(1, 10))
@pytest.mark.parametrize("lam_par,basis,gamma", [(0.0, "unit", 1.0), (0.7, "unit", 1.0), (0.7, "neuron", 0.8)])
def test_neuromerge_coeffs_matches_cpu(T, lam_par, basis, gamma):
    base, fts = group((4096, 64), T, torch.float32, seed=T)
    base[5] = 0  # a zero-norm neuron
    thr = ops.magnitude_threshold([base], fts, [base.numel() // 3] * T)
    stats = ops.neuron_stats(base.cpu(), [f.cpu() for f in fts], (thr[0].cpu(), thr[1].cpu()))
    want = ops.neuromerge_coeffs(*stats, lam_par, 1.3, basis, gamma)
    got = ops.neuromerge_coeffs(*(s.cuda() for s in stats), lam_par, 1.3, basis, gamma)
    assert got.is_cuda and torch.isfinite(got).all()
    # Same float64 algorithm; eigenvector signs may differ, the coefficients do not.
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"weights": [0.3, 0.5, 0.2, 0.4]}),
    ("ties", {"density": 0.2}),
    ("ties", {"density": 0.2, "trim_scope": "global", "ties": "keep", "zero_sign": "majority"}),
    ("dare", {"density": 0.3, "seed": 1}),
    ("dare_ties", {"density": 0.3, "seed": 1, "rescale": "l1"}),
    ("neuromerging", {}),
    ("neuromerging", {"trim_scope": "tensor", "scale_parallel": 0.5}),
])
def test_merge_on_gpu_matches_cpu(method, params):
    shapes = {"embed": (3000, 256), "q": (256, 256), "up": (700, 256), "down": (256, 700), "norm": (256,), "head": (1, 256)}
    base, fts = {}, [{} for _ in range(4)]
    for i, (name, s) in enumerate(shapes.items()):
        b, f = group(s, 4, torch.bfloat16, seed=100 + i)
        base[name] = b
        for t in range(4):
            fts[t][name] = f[t]
    got = nk.merge(base, fts, method=method, **params)
    want = nk.merge(base, fts, method=method, device="cpu", **params)
    for name in base:
        assert got[name].is_cuda
        # bf16 outputs: float32 sums in another order may round to the neighbouring bf16 value.
        torch.testing.assert_close(got[name].cpu().float(), want[name].float(), rtol=2**-7, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Multi-tensor NeuroMerging ops at a TinyLlama layer's shapes: one launch per storage dtype, bitwise
# the per-tensor CUDA ops, and the CPU ops' results up to the order of float64 sums.

LAYER = [(2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (5632, 2048), (5632, 2048), (2048, 5632)]
ODD = [(1001, 3), (0, 7), (3, 1), (17, 33)]  # float32 / float16 matrices of odd sizes


def layer_list(T, seed=0):
    """The layer's bf16 matrices and odd float32 / float16 ones, fine-tuned versions task-major."""
    groups = [group(s, T, torch.bfloat16, seed=seed + i) for i, s in enumerate(LAYER)]
    groups += [group(s, T, (torch.float32, torch.float16)[i % 2], seed=seed + 50 + i) for i, s in enumerate(ODD)]
    return [b for b, _ in groups], [groups[i][1][t] for t in range(T) for i in range(len(groups))]


def list_trim(base, fts, T, scope):
    """(trim pair on the GPU, offsets): one [T] scope over the list, or [n, T] per tensor."""
    b32, f32 = [b.float() for b in base], [f.float() for f in fts]
    if scope == "global":
        N = sum(b.numel() for b in base)
        trim = ops.magnitude_threshold(b32, f32, [N // 10] * T, keep_ties=False)
        sizes = [b.numel() for b in base]
        return trim, [sum(sizes[:i]) for i in range(len(base))]
    trim = ops.magnitude_threshold(b32, f32, [max(1, b.numel() // 10) for b in base for _ in range(T)],
                                   keep_ties=False, per_tensor=True)
    return trim, None


def per_tensor(op, base, fts, trim, offsets, *args):
    """op(base[i], its fine-tuned versions, *args_i, trim of i, offset of i) for every tensor i."""
    n = len(base)
    out = []
    for i, b in enumerate(base):
        trim_i = trim if trim is None or trim[0].dim() == 1 else (trim[0][i], trim[1][i])
        out.append(op(b, list(fts[i::n]), *(a[i] for a in args), trim_i, offsets[i] if offsets else 0))
    return out


def cpu_list(xs):
    return [x.cpu() for x in xs]


@pytest.mark.parametrize("T", [1, 4, 8])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_neuron_stats_multi_matches_per_tensor(T, scope):
    base, fts = layer_list(T, seed=T)
    trim, offsets = list_trim(base, fts, T, scope)
    got = ops.neuron_stats_multi(base, fts, trim, offsets)
    assert all(x.is_cuda for x in got)
    single = [torch.cat(p) for p in zip(*per_tensor(ops.neuron_stats, base, fts, trim, offsets))]
    assert all(torch.equal(a, b) for a, b in zip(got, single))
    cpu_trim = tuple(x.cpu() for x in trim)
    want = ops.neuron_stats_multi(cpu_list(base), cpu_list(fts), cpu_trim, offsets)
    for a, b in zip(got, want):  # float64 sums in another order
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12 * float(b.abs().max()))


@pytest.mark.parametrize("T", [1, 4, 8])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_weighted_sum_rows_multi_matches_per_tensor(T, scope):
    base, fts = layer_list(T, seed=10 + T)
    trim, offsets = list_trim(base, fts, T, scope)
    rows = [b.shape[0] for b in base]
    coeffs = torch.rand(T + 1, sum(rows), device="cuda")
    got = ops.weighted_sum_rows_multi(base, fts, coeffs, trim, offsets)
    assert all(x.is_cuda and x.dtype == b.dtype for x, b in zip(got, base))
    single = per_tensor(ops.weighted_sum, base, fts, trim, offsets, coeffs.split(rows, dim=1))
    assert all(torch.equal(a, b) for a, b in zip(got, single))
    # Element-wise float32 arithmetic in the C++ op's order: bitwise the CPU op too.
    want = ops.weighted_sum_rows_multi(cpu_list(base), cpu_list(fts), coeffs.cpu(), tuple(x.cpu() for x in trim),
                                       offsets)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))


@pytest.mark.parametrize("T", [1, 4, 10])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_trim_l1_list_matches_cpu(T, scope):
    """One launch per storage dtype (and chunk of 8 tasks) over the layer's list."""
    base, fts = layer_list(T, seed=20 + T)
    trim, _ = list_trim(base, fts, T, scope)
    got = ops.trim_l1(base, fts, trim)
    assert got.is_cuda and got.shape == (T, 2)
    want = ops.trim_l1(cpu_list(base), cpu_list(fts), tuple(x.cpu() for x in trim))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("T", [1, 4, 8])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ties_merge_multi_majority_matches_per_tensor(T, scope):
    """NeuroMerging's point parameters: 45 bf16 norms of 2048 (TinyLlama) and odd 1-D tensors, the
    per-tensor majority signs from one pre-pass per dtype; bitwise the per-tensor ops and the CPU."""
    groups = [group((2048,), T, torch.bfloat16, seed=30 + i) for i in range(45)]
    groups += [group(s, T, torch.float32, seed=90 + i) for i, s in enumerate([(7,), (0,), (100003,)])]
    base = [b for b, _ in groups]
    fts = [groups[i][1][t] for t in range(T) for i in range(len(groups))]
    trim, offsets = list_trim(base, fts, T, scope)
    options = dict(consensus="sum", normalize="count", elect_weighted=False, zero_sign="majority", scale=1.3)
    got = ops.ties_merge_multi(base, fts, [1.0] * T, trim, offsets, **options)
    single = per_tensor(lambda b, f, tr, off: ops.ties_merge(b, f, [1.0] * T, tr, off, **options),
                        base, fts, trim, offsets)
    assert all(torch.equal(a, b) for a, b in zip(got, single))
    want = ops.ties_merge_multi(cpu_list(base), cpu_list(fts), [1.0] * T, tuple(x.cpu() for x in trim), offsets,
                                **options)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
