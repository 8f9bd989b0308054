"""Triton neuron_stats (neurokern/ops/triton/neuron_stats.py) against neurokern.ops.reference.

On a machine without a GPU the launcher runs in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1); the CUDA tests at real-model shapes run on a GPU.

Tolerance: every product of two float32 values is exact in float64, so the kernel and the
reference differ only in the order of their float64 sums. Each entry is held to
    |got - want| <= 1e-12 * sum_c |a_c b_c|
(the sum of the absolute values of its terms, a bound that does not depend on cancellation);
measured in the interpreter up to 64 x 1000: at most 8e-16 of that sum; |w|^2 (no cancellation)
to rtol 1e-13, measured 4.4e-16. The CUDA tests (up to 32000 x 2048) hold the same bounds.
"""
import zlib

import pytest
import torch

import neurokern.ops as nk
from neurokern.ops import reference as ref
from neurokern.ops.triton import common
from neurokern.ops.triton import neuron_stats as tns

from ops.groups import make_group

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]
SHAPES = [(1, 1), (17, 1), (1, 33), (33, 65), (0, 7)]
TASKS = [1, 2, 3, 5, 8]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _trim_split(trim):
    return (None, None) if trim is None else trim


def _abs_terms(base, fts, trim, offset):
    """sum_c |a_c b_c| for every output entry, in float64 (the error scale)."""
    w = base.double().abs()
    taus = torch.stack([ref.trimmed(ref.task_vector(base, f), trim, t, offset).double().abs()
                        for t, f in enumerate(fts)], 1)
    return torch.einsum("rsc,rtc->rst", taus, taus), torch.einsum("rtc,rc->rt", taus, w)


def check(base, fts, trim=None, offset=0, got=None):
    if got is None:
        got = tns.neuron_stats(base, fts, *_trim_split(trim), offset)
    gram, dots, sq = got
    rg, rd, rq = ref.neuron_stats(base, fts, trim, offset)
    R, T = base.shape[0], len(fts)
    assert gram.dtype == dots.dtype == sq.dtype == torch.float64
    assert gram.shape == (R, T, T) and dots.shape == (R, T) and sq.shape == (R,)
    assert gram.device == base.device
    sg, sd = _abs_terms(base, fts, trim, offset)
    assert torch.all((gram - rg).abs() <= 1e-12 * sg), float(((gram - rg).abs() / sg.clamp_min(1e-300)).max())
    assert torch.all((dots - rd).abs() <= 1e-12 * sd), float(((dots - rd).abs() / sd.clamp_min(1e-300)).max())
    torch.testing.assert_close(sq, rq, rtol=1e-13, atol=0)
    assert torch.equal(gram, gram.transpose(1, 2))  # both halves are the same sums, bit for bit
    return gram, dots, sq


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_vs_reference(shape, T, dtype):
    base, fts = make_group(shape, T, dtype, seed=zlib.crc32(repr((shape, T, dtype)).encode()))
    check(base, fts)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("keep_ties", [True, False])
def test_trimmed_with_offset(T, dtype, keep_ties):
    """The tensor is the second of a global trim scope (positions start at prefix.numel()); rows
    with zero task vectors and a zero-norm neuron included; quantized noise makes ties."""
    prefix, pf = make_group((3, 5), T, dtype, seed=T, noise_grid=True)
    base, fts = make_group((9, 37), T, dtype, seed=T + 1, zero_rows=(4,), base_zero_rows=(7,), noise_grid=True)
    N = prefix.numel() + base.numel()
    trim = nk.magnitude_threshold([prefix, base], [x for t in range(T) for x in (pf[t], fts[t])],
                                  [N // 4 + 3 * t for t in range(T)], keep_ties=keep_ties)
    gram, dots, sq = check(base, fts, trim, offset=prefix.numel())
    full = tns.neuron_stats(base, fts)[0]
    assert not torch.equal(gram, full)  # the trim did something
    assert sq[7] == 0 and not gram[4].any() and not dots[4].any() and not dots[7].any()
    for offset in (prefix.numel() + 100,):  # tie cut-offs move with the offset
        check(base, fts, trim, offset=offset)


def test_matches_cpp_op():
    base, fts = make_group((13, 300), 4, torch.bfloat16, seed=5, base_zero_rows=(2,))
    trim = nk.magnitude_threshold([base], fts, [1000, 2000, 3000, 3900], keep_ties=False)
    got = tns.neuron_stats(base, fts, *trim, 0)
    want = torch.ops.neurokern.neuron_stats.default(base, fts, *trim, 0)
    check(base, fts, trim, got=got)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("T", [1, 4, 8])
def test_gpu_launch_shape(T):
    """The GPU's launch shape (one row per program, several column steps with a ragged tail,
    VPT columns per thread) run in the interpreter, with a trim."""
    base, fts = make_group((5, 37), T, torch.bfloat16, seed=T, base_zero_rows=(2,), noise_grid=True)
    trim = nk.magnitude_threshold([base], fts, [60 + t for t in range(T)], keep_ties=False)
    R, C = base.shape
    out = (torch.empty(R, T, T, dtype=torch.float64), torch.empty(R, T, dtype=torch.float64),
           torch.empty(R, dtype=torch.float64))
    thr, lim = common.trim_pair("neuron_stats", *trim, T, "cpu")
    tns.launch_neuron_stats(base, fts, thr, lim, 3, *out, config=dict(ROWS=1, NT=4, VPT=4, num_warps=1))
    check(base, fts, trim, 3, got=out)


def test_hand_2x3():
    base = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    tau1 = torch.tensor([[1.0, 0.0, 1.0], [3.0, 0.0, 0.0]])
    tau2 = torch.tensor([[0.0, -1.0, 2.0], [0.0, 0.0, 0.0]])
    fts = [base + tau1, base + tau2]
    gram, dots, sq = tns.neuron_stats(base, fts)
    assert gram.tolist() == [[[2.0, 2.0], [2.0, 5.0]], [[9.0, 0.0], [0.0, 0.0]]]
    assert dots.tolist() == [[1.0, -2.0], [0.0, 0.0]]
    assert sq.tolist() == [5.0, 0.0]
    thr, lim = torch.tensor([1.0, 1.0]), torch.tensor([2, 2])
    gram, dots, _ = tns.neuron_stats(base, fts, thr, lim, 0)
    assert gram.tolist() == [[[1.0, 0.0], [0.0, 5.0]], [[9.0, 0.0], [0.0, 0.0]]]
    assert dots.tolist() == [[1.0, -2.0], [0.0, 0.0]]
    gram, dots, _ = tns.neuron_stats(base, fts, thr, lim, 1)
    assert gram.tolist() == [[[1.0, 0.0], [0.0, 4.0]], [[9.0, 0.0], [0.0, 0.0]]]
    assert dots.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    inf = (torch.full((2,), float("inf")), torch.zeros(2, dtype=torch.long))
    gram, dots, sq = tns.neuron_stats(base, fts, *inf, 0)
    assert not gram.any() and not dots.any() and sq.tolist() == [5.0, 0.0]


def test_nearly_parallel_residual_gram():
    """Task vectors = 0.5 w + tiny noise: the residual Gram g - d d^T / q is ~1e-8 of g; float64
    accumulation keeps it to the reference's digits (float32 sums would lose it entirely)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 512, generator=g)
    fts = [(w + 0.5 * w + 1e-4 * torch.randn(4, 512, generator=g)) for _ in range(3)]
    gram, dots, sq = check(w, fts)
    rg, rd, rq = ref.neuron_stats(w, fts)
    resid = gram - dots[:, :, None] * dots[:, None, :] / sq[:, None, None]
    rresid = rg - rd[:, :, None] * rd[:, None, :] / rq[:, None, None]
    torch.testing.assert_close(resid, rresid, rtol=1e-6, atol=1e-9 * float(rg.abs().max()))


@pytest.mark.parametrize("T", [9, 11, 16])
def test_many_tasks_in_pairs_of_groups(T, count_launches):
    """T > 8: one launch per pair of groups of 4 tasks, every Gram block filled (against the
    reference, which check compares with, and the C++ op)."""
    kernel = count_launches(tns, "_neuron_stats_kernel")
    base, fts = make_group((5, 21), T, torch.bfloat16, seed=T, base_zero_rows=(1,))
    got = check(base, fts)
    for a, b in zip(got, torch.ops.neurokern.neuron_stats(base, fts)):  # the C++ op: float64 sums, other order
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    trim = nk.magnitude_threshold([base], fts, [30 + t for t in range(T)], keep_ties=False)
    check(base, fts, trim, offset=7)
    groups = (T + 3) // 4
    assert kernel.launches == 2 * groups * (groups - 1) // 2


def test_zero_tasks_and_empty_columns():
    base, _ = make_group((4, 6), 1, torch.float32, seed=0)
    gram, dots, sq = tns.neuron_stats(base, [])
    assert gram.shape == (4, 0, 0) and dots.shape == (4, 0)
    torch.testing.assert_close(sq, (base.double() ** 2).sum(1), rtol=1e-13, atol=0)
    empty = torch.empty(3, 0)
    gram, dots, sq = tns.neuron_stats(empty, [empty.clone(), empty.clone()])
    assert not gram.any() and not dots.any() and not sq.any() and gram.shape == (3, 2, 2)


def test_non_contiguous_and_views():
    """Inputs that are views into larger buffers (unaligned, strided) give the same result."""
    big = torch.randn(5, 40)
    base = big[:, 1:34]  # strided rows, unaligned start
    fts = [(base + 0.01 * torch.randn(5, 33)).to(torch.float32) for _ in range(3)]
    stacked = torch.stack(fts)[:, :, :]  # fine-tuned rows from one allocation, odd distances
    check(base.contiguous(), list(stacked), got=tns.neuron_stats(base, list(stacked)))


def test_bad_arguments():
    base, fts = make_group((3, 4), 2, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="2-D"):
        tns.neuron_stats(base.flatten(), [f.flatten() for f in fts])
    with pytest.raises(RuntimeError, match="shape"):
        tns.neuron_stats(base, [fts[0], fts[1][:2]])
    with pytest.raises(RuntimeError, match="bfloat16"):
        tns.neuron_stats(base, [fts[0], fts[1].bfloat16()])
    with pytest.raises(RuntimeError, match="together"):
        tns.neuron_stats(base, fts, torch.zeros(2), None)
    with pytest.raises(RuntimeError, match="one entry per task"):
        tns.neuron_stats(base, fts, torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        tns.neuron_stats(base.double(), [f.double() for f in fts])


# ---------------------------------------------------------------------------------------------
# neuron_stats_multi: one launch per storage dtype over a list of matrices

MATRICES = [(33, 65), (0, 5), (1, 17), (17, 1), (4, 0), (9, 32), (1, 1)]
# The interpreter's launch shape (few, wide programs; ragged row blocks) and the GPU's (one row per
# program, several column steps with a ragged tail), on fewer rows: the interpreter pays per step.
WIDE = dict(ROWS=8, NT=16, VPT=1, num_warps=1)
GPU_LIKE = dict(ROWS=1, NT=4, VPT=4, num_warps=1)
SMALL = [(5, 37), (0, 5), (1, 17), (3, 1), (2, 0), (2, 32), (1, 1)]


def make_matrices(T, dtype, seed, shapes=MATRICES):
    groups = [make_group(s, T, dtype, seed=seed + i, base_zero_rows=(0,) if s[0] > 1 else (), noise_grid=i % 2 == 1)
              for i, s in enumerate(shapes)]
    return [b for b, _ in groups], [groups[i][1][t] for t in range(T) for i in range(len(shapes))]


def list_trim(bases, fts, T, scope):
    """(threshold, tie_limit, offsets): one [T] scope over the list with offsets, or [n, T]."""
    if scope == "none":
        return None, None, []
    b32, f32 = [b.float() for b in bases], [f.float() for f in fts]
    if scope == "global":
        N = sum(b.numel() for b in bases)
        thr, lim = nk.magnitude_threshold(b32, f32, [N // 3 + t for t in range(T)], keep_ties=False)
        sizes = [b.numel() for b in bases]
        return thr, lim, [sum(sizes[:i]) for i in range(len(bases))]
    k = [max(1, b.numel() // 3) + t for b in bases for t in range(T)]
    thr, lim = nk.magnitude_threshold(b32, f32, k, keep_ties=False, per_tensor=True)
    return thr, lim, []


def single_launches(bases, fts, thr, lim, offsets, config):
    """torch.cat of the single-tensor kernel's results, launched with `config`."""
    n, T = len(bases), len(fts) // len(bases)
    parts = []
    for i, base in enumerate(bases):
        R = base.shape[0]
        out = (torch.empty(R, T, T, dtype=torch.float64), torch.empty(R, T, dtype=torch.float64),
               torch.empty(R, dtype=torch.float64))
        t_i, l_i = (thr[i], lim[i]) if thr is not None and thr.dim() == 2 else (thr, lim)
        if R:
            tns.launch_neuron_stats(base, list(fts[i::n]), t_i, l_i, offsets[i] if offsets else 0, *out, config=config)
        parts.append(out)
    return [torch.cat(p) for p in zip(*parts)]


def check_bitwise_single_kernel(bases, fts, T, scope, config):
    """Each tensor's rows are bitwise the single-tensor kernel's under the same launch configuration
    (on a GPU the configuration depends on dtype and T only: the op's results are bitwise too)."""
    thr, lim, offsets = list_trim(bases, fts, T, scope)
    out = tns.neuron_stats_multi(bases, fts, thr, lim, offsets, config=config)
    for a, b in zip(out, single_launches(bases, fts, thr, lim, offsets, config)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("scope", ["none", "global", "tensor"])
def test_multi_bitwise_single_kernel(scope, T, dtype):
    check_bitwise_single_kernel(*make_matrices(T, dtype, seed=10 * T), T, scope, WIDE)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", [1, 4, 8])
def test_multi_bitwise_single_kernel_gpu_shape(T, dtype):
    check_bitwise_single_kernel(*make_matrices(T, dtype, seed=20 * T, shapes=SMALL), T, "global", GPU_LIKE)


@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("scope", ["none", "global", "tensor"])
def test_multi_vs_cpp(scope, T):
    """A list mixing storage dtypes (one launch each) against the C++ op and the reference."""
    groups = [make_matrices(T, dtype, seed=T + i, shapes=MATRICES[i::3]) for i, dtype in enumerate(DTYPES)]
    bases = [b for g in groups for b in g[0]]
    cols = [list(g[1][i::len(g[0])]) for g in groups for i in range(len(g[0]))]
    fts = [cols[i][t] for t in range(T) for i in range(len(bases))]
    thr, lim, offsets = list_trim(bases, fts, T, scope)
    got = tns.neuron_stats_multi(bases, fts, thr, lim, offsets)
    want = torch.ops.neurokern.neuron_stats_multi.default(bases, fts, thr, lim, offsets)
    for a, b in zip(got, want):
        assert a.dtype == torch.float64 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    r0 = 0
    for i, base in enumerate(bases):  # each block of rows against the reference's error bound
        r1 = r0 + base.shape[0]
        trim = None if thr is None else ((thr[i], lim[i]) if thr.dim() == 2 else (thr, lim))
        check(base, cols[i], trim, offsets[i] if offsets else 0, got=tuple(x[r0:r1] for x in got))
        r0 = r1


def test_multi_many_tasks_and_errors():
    T = 9
    bases, fts = make_matrices(T, torch.bfloat16, seed=3, shapes=[(5, 21), (0, 3), (2, 7)])
    got = tns.neuron_stats_multi(bases, fts)
    want = [torch.cat(p) for p in zip(*(tns.neuron_stats(b, list(fts[i::3])) for i, b in enumerate(bases)))]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(RuntimeError, match=r"base\[1\] must be 2-D"):
        tns.neuron_stats_multi([bases[0], bases[2].flatten()], [fts[0], fts[2].flatten()])
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        tns.neuron_stats_multi([bases[0].double()], [fts[0].double()])


# ---------------------------------------------------------------------------------------------
# CUDA, real-model shapes


@cuda
@pytest.mark.parametrize("T", range(1, 9))
@pytest.mark.parametrize("shape", [(2048, 2048), (5632, 2048), (2048, 5632), (32000, 2048)], ids=str)
def test_cuda_real_shapes(shape, T):
    base, fts = make_group(shape, T, torch.bfloat16, seed=T, noise=0.002, device="cuda", base_zero_rows=(3,))
    check(base, fts)  # the reference runs on the GPU in float64
    # The registered CUDA kernel of the op is this launcher.
    got = torch.ops.neurokern.neuron_stats.default(base, fts, None, None, 0)
    want = tns.neuron_stats(base, fts)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", [1, 3, 8])
def test_cuda_trimmed(dtype, T):
    base, fts = make_group((5632, 2048), T, dtype, seed=T, noise=0.002, device="cuda", noise_grid=True)
    taus = torch.stack([f.float() - base.float() for f in fts]).abs().flatten(1)
    thr = taus.kthvalue(taus.shape[1] * 4 // 5, dim=1).values  # keep ~20%, ties at the threshold
    lim = torch.full((T,), base.numel() // 2, dtype=torch.int64, device="cuda")  # half the ties kept
    offset = 12345
    gram, _, _ = check(base, fts, (thr, lim), offset)
    assert not torch.equal(gram, tns.neuron_stats(base, fts)[0])


@cuda
def test_cuda_many_tasks_and_opcheck():
    base, fts = make_group((300, 256), 10, torch.bfloat16, seed=1, device="cuda")
    check(base, fts)
    small, sf = make_group((7, 33), 3, torch.float32, seed=2, device="cuda")
    torch.library.opcheck(torch.ops.neurokern.neuron_stats.default, (small, sf, None, None, 0),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
