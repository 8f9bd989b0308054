"""The |tau| key histograms of the streaming engine's global trims (neurokern/ops/triton/
key_histogram.py) against torch's bincount of thresholds.magnitude_bits, and GlobalTrim's GPU path
(the kernels) against its CPU path (torch per tensor).

Without a GPU the kernels run in Triton's interpreter on CPU tensors; on a GPU the test_cuda_*
tests run them compiled on CUDA tensors. Histograms and counts are integers: equal, not close.
"""
import zlib

import pytest
import torch

from neurokern.methods import global_trim as th
from neurokern.methods.global_trim import GlobalTrim, magnitude_bits
from neurokern.ops.triton import key_histogram as K

CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Odd sizes, empty tensors, one element, and around the interpreter's block of 4096 entries (one
# partial block, exactly one or two full blocks, full blocks and a tail).
SHAPES = [(33, 65), (0, 4), (17,), (3, 2, 5), (1,), (4096,), (2, 4096), (4097,), (4095,), (0,), (7, 1201)]


def make_list(T, dtypes, seed, shapes=SHAPES, ties=False, device="cpu"):
    """base [n] and finetuned task-major; ties: task vectors rounded to multiples of 1/256 before
    the storage dtype (many equal magnitudes), and some tensors' task vectors all zero."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((T, seed, ties)).encode()))
    bases, columns = [], []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        b = torch.randn(shape, generator=g).to(dtype)
        column = []
        for t in range(T):
            delta = 0.02 * (1 + t) * torch.randn(shape, generator=g)
            if ties:
                delta = torch.round(delta * 256) / 256
            f = b.float() + delta
            column.append(b.clone() if ties and (i + t) % 4 == 0 else f.to(dtype))
        bases.append(b.to(device))
        columns.append([c.to(device) for c in column])
    return bases, [columns[i][t] for t in range(T) for i in range(len(bases))]


def ref_high(bases, fts):
    n, T = len(bases), len(fts) // len(bases)
    hist = torch.zeros(T, K.HI_BINS, dtype=torch.int64)
    for t in range(T):
        for i, b in enumerate(bases):
            hist[t] += torch.bincount((magnitude_bits(b, fts[t * n + i]) >> 16).cpu(), minlength=K.HI_BINS)
    return hist


def ref_low(bases, fts, hi_bin):
    """Low histogram, counts [n, T], and each (tensor, task)'s sorted low bits, flat (i * T + t)."""
    n, T = len(bases), len(fts) // len(bases)
    low = torch.zeros(T, K.LO_BINS, dtype=torch.int64)
    counts = torch.zeros(n, T, dtype=torch.int64)
    values = [torch.zeros(0, dtype=torch.int32)] * (n * T)
    for t in range(T):
        if hi_bin[t] < 0:
            continue
        for i, b in enumerate(bases):
            bits = magnitude_bits(b, fts[t * n + i]).cpu()
            lo = bits[(bits >> 16) == hi_bin[t]] & 0xFFFF
            low[t] += torch.bincount(lo, minlength=K.LO_BINS)
            counts[i, t] = lo.numel()
            values[i * T + t] = lo.sort().values
    return low, counts, values


def boundary_bins(hist, skip=()):
    """Per task the bin of the 30th-percentile largest entry (a well-filled one; bin 0 when there
    are no entries), -1 for `skip`."""
    bins = []
    for t, row in enumerate(hist.tolist()):
        k = int(0.3 * sum(row))
        above, b = 0, len(row) - 1
        while b > 0 and above + row[b] <= k:
            above += row[b]
            b -= 1
        bins.append(-1 if t in skip else b)
    return bins


def check(bases, fts, skip=()):
    """Both modes and the gather on one list, against the references; returns the low counts."""
    T, device = len(fts) // len(bases), bases[0].device
    hist = torch.zeros(T, K.HI_BINS, dtype=torch.int64, device=device)
    K.key_histogram(bases, fts, hist)
    want = ref_high(bases, fts)
    assert torch.equal(hist.cpu(), want)
    hist_again = hist.clone()
    K.key_histogram(bases, fts, hist_again)  # adds into what is there
    assert torch.equal(hist_again.cpu(), 2 * want)
    hi_bin = boundary_bins(want, skip)
    hi = torch.tensor(hi_bin, dtype=torch.int32, device=device)
    low = torch.zeros(T, K.LO_BINS, dtype=torch.int64, device=device)
    K.key_histogram(bases, fts, low, hi)
    want_low, want_counts, want_values = ref_low(bases, fts, hi_bin)
    assert torch.equal(low.cpu(), want_low)
    low.zero_()
    counts = torch.zeros(len(bases), T, dtype=torch.int64, device=device)
    K.key_histogram(bases, fts, low, hi, counts)
    assert torch.equal(low.cpu(), want_low) and torch.equal(counts.cpu(), want_counts)
    flat = counts.view(-1).tolist()
    values = K.boundary_values(bases, fts, hi, flat)
    assert values.dtype == torch.int32 and values.numel() == sum(flat)
    for pair, got in enumerate(values.cpu().split(flat)):
        assert torch.equal(got.sort().values, want_values[pair]), pair
    return want_counts


@pytest.mark.parametrize("T", range(1, 9))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
def test_one_dtype(T, dtype):
    counts = check(*make_list(T, (dtype,), seed=1), skip={1} if T > 2 else ())
    assert counts.sum() > 0


@pytest.mark.parametrize("T", [1, 3, 8, 10])
def test_mixed_dtypes_and_ties(T):
    """Three dtypes in one list (one launch each), many equal magnitudes and zero task vectors;
    T = 10 takes two chunks of tasks."""
    for ties in (False, True):
        check(*make_list(T, DTYPES, seed=2, ties=ties), skip={0} if T > 1 else ())


def test_every_task_skipped():
    bases, fts = make_list(3, DTYPES, seed=3)
    hi = torch.full((3,), -1, dtype=torch.int32)
    low = torch.zeros(3, K.LO_BINS, dtype=torch.int64)
    counts = torch.zeros(len(bases), 3, dtype=torch.int64)
    K.key_histogram(bases, fts, low, hi, counts)
    assert not low.any() and not counts.any()
    assert K.boundary_values(bases, fts, hi, counts.view(-1).tolist()).numel() == 0


def test_only_empty_tensors():
    bases, fts = make_list(2, DTYPES, seed=4, shapes=[(0,), (0, 3)])
    check(bases, fts)


def test_misaligned_views():
    """Views at storage offset 1 are not 16-byte aligned: their launch goes without the hint."""
    T = 2
    g = torch.Generator().manual_seed(5)
    for dtype in DTYPES:
        storage = [torch.randn(2 * 4096 + 9, generator=g).to(dtype) for _ in range(T + 1)]
        views = (slice(1, None), slice(3, 4100))
        bases = [storage[0][v] for v in views]
        assert all(b.data_ptr() % 16 for b in bases)
        check(bases, [s[v] for s in storage[1:] for v in views])


def test_one_launch_per_dtype(count_launches):
    kernel = count_launches(K, "_key_histogram_kernel")
    bases, fts = make_list(3, DTYPES, seed=6)
    K.key_histogram(bases, fts, torch.zeros(3, K.HI_BINS, dtype=torch.int64))
    assert kernel.launches == 3
    bases, fts = make_list(9, DTYPES, seed=6)  # two chunks of tasks
    K.key_histogram(bases, fts, torch.zeros(9, K.HI_BINS, dtype=torch.int64))
    assert kernel.launches == 3 + 6


def test_wrong_histogram_shape():
    bases, fts = make_list(2, (torch.float32,), seed=7, shapes=[(5,)])
    with pytest.raises(RuntimeError, match="hist must be contiguous int64 \\[2, 32768\\]"):
        K.key_histogram(bases, fts, torch.zeros(2, K.LO_BINS, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# GlobalTrim: the kernels' path against torch's


def run_trim(units, bases, fts, T, keep_ties):
    """Both passes of GlobalTrim over units (lists of positions), k = 30% of the entries per task;
    returns it, finish_low's pending (task, rank) pairs, and the per-tensor tie counts."""
    total = sum(b.numel() for b in bases)
    gt = GlobalTrim([int(0.3 * total)] * T, keep_ties, bases[0].device)
    n = len(bases)

    def unit(u):
        return [bases[i] for i in u], [fts[t * n + i] for t in range(T) for i in u]
    for u in units:
        gt.add_hist(*unit(u))
    gt.finish_hist(gt.hist)
    for u in units:
        gt.add_low([f"w{i}" for i in u], *unit(u))
    pending = gt.finish_low(gt.low)
    return gt, pending, gt.tie_counts([f"w{i}" for i in range(n)])


UNITS = [[0, 1, 2], [3], [4, 5, 6, 7], [8, 9, 10]]


def assert_same_trim(a, b):
    (cpu, cpu_pending, cpu_ties), (gpu, gpu_pending, gpu_ties) = a, b
    assert torch.equal(cpu.hist, gpu.hist.cpu()) and torch.equal(cpu.low, gpu.low.cpu())
    assert cpu.threshold == gpu.threshold and cpu.tie_limit == gpu.tie_limit and cpu_pending == gpu_pending
    assert torch.equal(cpu_ties, gpu_ties)
    assert cpu.sparse.keys() == gpu.sparse.keys()
    for key, (values, counts) in cpu.sparse.items():
        assert torch.equal(values, gpu.sparse[key][0]) and torch.equal(counts, gpu.sparse[key][1]), key


@pytest.mark.parametrize("keep_ties", [True, False])
@pytest.mark.parametrize("T", [2, 9])
def test_global_trim_kernels_equal_torch(keep_ties, T, monkeypatch):
    bases, fts = make_list(T, DTYPES, seed=8, ties=True)
    cpu = run_trim(UNITS, bases, fts, T, keep_ties)
    monkeypatch.setattr(th, "key_histogram", K.key_histogram)  # the Triton launchers on CPU tensors
    monkeypatch.setattr(th, "boundary_values", K.boundary_values)
    kernels = run_trim(UNITS, bases, fts, T, keep_ties)
    assert_same_trim(cpu, kernels)
    if not keep_ties:  # ties are broken by position somewhere, and the tie counts find them
        assert cpu[0].sparse and cpu[1] and cpu[2].sum() > 0


# ---------------------------------------------------------------------------------------------
# CUDA

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# A TinyLlama layer's shapes, odd sizes and an empty tensor.
LAYER = [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632), (2048,), (1001, 3), (4097,), (0, 7), (1,)]


@cuda_only
@pytest.mark.parametrize("T", [1, 4, 8, 10])
def test_cuda_real_shapes(T):
    skip = {1} if T > 2 else ()
    check(*make_list(T, (torch.bfloat16,) * 4 + (torch.float32, torch.float16), seed=9, shapes=LAYER,
                     device="cuda"), skip=skip)
    check(*make_list(T, DTYPES, seed=10, shapes=LAYER[4:], ties=True, device="cuda"), skip=skip)


@cuda_only
@pytest.mark.parametrize("keep_ties", [True, False])
def test_cuda_global_trim_equals_cpu(keep_ties):
    T = 3
    bases, fts = make_list(T, DTYPES, seed=11, ties=True)
    cpu = run_trim(UNITS, bases, fts, T, keep_ties)
    gpu = run_trim(UNITS, [b.cuda() for b in bases], [f.cuda() for f in fts], T, keep_ties)
    assert gpu[0].hist.is_cuda
    assert_same_trim(cpu, gpu)
