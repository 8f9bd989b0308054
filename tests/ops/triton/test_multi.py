"""Triton launchers of the multi-tensor ops (weighted_sum_multi (+ backward) and
weighted_sum_rows_multi in neurokern/ops/triton/weighted_sum.py, ties_merge_multi, dare_multi,
trim_l1 in their ops' modules, on lists.py's launch tables) against the C++ CPU ops.

Without a GPU the launchers run in Triton's interpreter on CPU tensors; on a GPU the test_cuda_*
tests run the compiled kernels through torch.ops.neurokern on CUDA tensors, at the shapes of a
real model. Tolerances: the element-wise outputs are bitwise the C++ op's (each program runs the
single-tensor kernel's block function); gradients are float64 sums in another order, within
rtol 1e-6 (+ 1e-9 absolute) of the C++ op's.
"""
import math
import zlib

import pytest
import torch

import neurokern.ops as nk
from neurokern.ops.triton import common
from neurokern.ops.triton import dare as DR
from neurokern.ops.triton import ties_merge as TM
from neurokern.ops.triton import trim_l1 as TL
from neurokern.ops.triton import weighted_sum as WS

CUDA = torch.cuda.is_available()
OPS = torch.ops.neurokern
WEIGHTS = [0.8371, 1.2193, 0.5561, -0.3117, 0.9437, 0.6889, 1.4041, 0.7723]
# Mixed ranks, odd sizes, an empty tensor, a single element, and more tensors than one program
# block of the interpreter (binary search over 9 entries).
SHAPES = [(33, 65), (0, 4), (17,), (3, 2, 5), (1,), (4, 7), (1, 1), (5000,), (2, 9)]


def make_list(T, dtypes, seed, shapes=SHAPES, device="cpu"):
    g = torch.Generator().manual_seed(zlib.crc32(repr((T, seed)).encode()))
    bases, columns = [], []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        b = torch.randn(shape, generator=g)
        bases.append(b.to(dtype).to(device))
        columns.append([(b + 0.02 * (1 + t) * torch.randn(shape, generator=g)).to(dtype).to(device)
                        for t in range(T)])
    return bases, [columns[i][t] for t in range(T) for i in range(len(bases))]


def cpu(xs):
    return [x.cpu() for x in xs]


def trims(bases, fts, T, scope):
    """Trims from the CPU op (float32 copies: one dtype per call), as [T] + offsets or [n, T]."""
    b32, f32 = [b.float().cpu() for b in bases], [f.float().cpu() for f in fts]
    if scope == "none":
        return None, None, []
    if scope == "global":
        N = sum(b.numel() for b in b32)
        thr, lim = nk.magnitude_threshold(b32, f32, [max(1, int(0.3 * N))] * T, keep_ties=False)
        offsets, acc = [], 0
        for b in b32:
            offsets.append(acc)
            acc += b.numel()
        return thr, lim, offsets
    k = [max(1, int(0.3 * b.numel())) for b in b32 for _ in range(T)]
    thr, lim = nk.magnitude_threshold(b32, f32, k, keep_ties=False, per_tensor=True)
    return thr, lim, []


def assert_lists_bitwise(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        a = a.cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a, b), f"tensor {i}: {(a.double() - b.double()).abs().max()}"


MIXED = (torch.bfloat16, torch.float32, torch.float16)


@pytest.mark.parametrize("T", [1, 2, 5, 8])
@pytest.mark.parametrize("scope", ["none", "global", "tensor"])
def test_weighted_sum_multi(T, scope):
    bases, fts = make_list(T, MIXED, seed=1)
    coeffs = torch.rand(len(bases), T + 1, generator=torch.Generator().manual_seed(T))
    thr, lim, offsets = trims(bases, fts, T, scope)
    got = WS.weighted_sum_multi(bases, fts, coeffs, thr, lim, offsets)
    assert_lists_bitwise(got, OPS.weighted_sum_multi(bases, fts, coeffs, thr, lim, offsets))
    got = WS.weighted_sum_multi(bases, fts, coeffs, thr, lim, offsets, torch.float32)
    assert_lists_bitwise(got, OPS.weighted_sum_multi(bases, fts, coeffs, thr, lim, offsets, torch.float32))


# Matrices for the per-row ops: odd sizes, zero rows / columns, a single element, and rows longer
# than one interpreter block (whole and ragged column blocks).
MATRICES = [(33, 65), (0, 4), (17, 1), (4, 7), (1, 1), (2, 4100), (3, 0)]


@pytest.mark.parametrize("T", [1, 2, 5, 8])
@pytest.mark.parametrize("scope", ["none", "global", "tensor"])
def test_weighted_sum_rows_multi(T, scope):
    bases, fts = make_list(T, MIXED, seed=7, shapes=MATRICES)
    coeffs = torch.rand(T + 1, sum(b.shape[0] for b in bases), generator=torch.Generator().manual_seed(T))
    thr, lim, offsets = trims(bases, fts, T, scope)
    got = WS.weighted_sum_rows_multi(bases, fts, coeffs, thr, lim, offsets)
    assert_lists_bitwise(got, OPS.weighted_sum_rows_multi(bases, fts, coeffs, thr, lim, offsets))
    got = WS.weighted_sum_rows_multi(bases, fts, coeffs, thr, lim, offsets, torch.float32)
    assert_lists_bitwise(got, OPS.weighted_sum_rows_multi(bases, fts, coeffs, thr, lim, offsets, torch.float32))


@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("scope", ["none", "global", "tensor"])
def test_weighted_sum_multi_backward(T, scope):
    bases, fts = make_list(T, MIXED, seed=2)
    g = torch.Generator().manual_seed(T)
    coeffs = torch.rand(len(bases), T + 1, generator=g)
    grads = [torch.randn(b.shape, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
             for i, b in enumerate(bases)]
    thr, lim, offsets = trims(bases, fts, T, scope)
    got = WS.weighted_sum_multi_backward(grads, bases, fts, coeffs, thr, lim, offsets)
    want = OPS.weighted_sum_multi_backward(grads, bases, fts, coeffs, thr, lim, offsets)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("T", [1, 2, 5, 8])
@pytest.mark.parametrize("scope", ["none", "global", "tensor"])
@pytest.mark.parametrize("options", [
    ("sum", "weights", True, "positive", 1.0),
    ("count", "count", False, "positive", 0.5),
    ("sum", "none", True, "majority", 1.0),
], ids=["mergekit", "count", "majority"])
def test_ties_merge_multi(T, scope, options):
    bases, fts = make_list(T, MIXED, seed=3)
    thr, lim, offsets = trims(bases, fts, T, scope)
    got = TM.ties_merge_multi(bases, fts, WEIGHTS[:T], thr, lim, offsets, *options)
    assert_lists_bitwise(got, OPS.ties_merge_multi(bases, fts, WEIGHTS[:T], thr, lim, offsets, *options))


@pytest.mark.parametrize("T", [1, 2, 5, 8])
@pytest.mark.parametrize("options", [
    ("density", "none", "none", 1.0),
    ("none", "sum", "weights", 1.0),
    ("l1", "count", "count", 0.7),
], ids=["dare_linear", "dare_ties", "l1"])
def test_dare_multi(T, options):
    bases, fts = make_list(T, MIXED, seed=4)
    keys = [k for i in range(len(bases)) for k in nk.dare_keys(3, f"t{i}", T)]
    got = DR.dare_multi(bases, fts, WEIGHTS[:T], 0.35, keys, *options)
    assert_lists_bitwise(got, OPS.dare_multi(bases, fts, WEIGHTS[:T], 0.35, keys, *options))


def test_more_tasks_than_kernel_slots():
    """T > 8 runs the single-tensor launchers (their chunked forms)."""
    T = 9
    bases, fts = make_list(T, (torch.float32,), seed=5, shapes=[(3, 4), (5,)])
    coeffs = torch.rand(2, T + 1)
    assert_lists_bitwise(WS.weighted_sum_multi(bases, fts, coeffs), OPS.weighted_sum_multi(bases, fts, coeffs))
    got = TM.ties_merge_multi(bases, fts, [1.0] * T)
    for a, b in zip(got, OPS.ties_merge_multi(bases, fts, [1.0] * T)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    bases, fts = make_list(T, (torch.float32,), seed=5, shapes=[(3, 4), (0, 2), (5, 1)])
    coeffs = torch.rand(T + 1, 8)
    assert_lists_bitwise(WS.weighted_sum_rows_multi(bases, fts, coeffs), OPS.weighted_sum_rows_multi(bases, fts, coeffs))


@pytest.mark.parametrize("T", [1, 3, 8, 10])
@pytest.mark.parametrize("scope", ["none", "global", "tensor"])
def test_trim_l1_one_launch_per_dtype(T, scope, count_launches):
    """One launch per storage dtype and chunk of 8 tasks; the C++ op's sums up to float64 order."""
    kernel = count_launches(TL, "_trim_l1_kernel")
    bases, fts = make_list(T, MIXED, seed=8)
    thr, lim, offsets = trims(bases, fts, T, scope)
    got = TL.trim_l1(bases, fts, thr, lim)
    assert got.dtype == torch.float64 and got.shape == (T, 2)
    torch.testing.assert_close(got, OPS.trim_l1(bases, fts, thr, lim), rtol=1e-12, atol=0)
    assert kernel.launches == len(MIXED) * (1 if T <= 8 else 2)


def test_trim_l1_gpu_chunks(monkeypatch):
    """The GPU's chunk size: many programs per tensor, whole chunks unmasked, a ragged last one."""
    monkeypatch.setattr(common, "RED_BLOCK", 512)
    monkeypatch.setattr(common, "CHUNK", 2048)
    T = 3
    bases, fts = make_list(T, (torch.bfloat16, torch.float32), seed=9, shapes=[(3, 1100), (4096,), (7, 5)])
    thr, lim, _ = trims(bases, fts, T, "global")
    got = TL.trim_l1(bases, fts, thr, lim)
    torch.testing.assert_close(got, OPS.trim_l1(bases, fts, thr, lim), rtol=1e-12, atol=0)


def test_new_ops_launch_once_per_dtype(count_launches):
    from neurokern.ops.triton import neuron_stats as tns

    T = 2
    bases, fts = make_list(T, MIXED, seed=10, shapes=MATRICES)
    kernels = {"ns": count_launches(tns, "_neuron_stats_multi_kernel"), "ws": count_launches(WS, "_ws_rows_multi_kernel")}
    tns.neuron_stats_multi(bases, fts)
    WS.weighted_sum_rows_multi(bases, fts, torch.rand(T + 1, sum(b.shape[0] for b in bases)))
    assert kernels["ns"].launches == kernels["ws"].launches == len(MIXED)


def test_weighted_sum_multi_host_in_cpp(count_launches):
    """weighted_sum_multi's C++ host side (csrc/list_launch.cpp, the CUDA kernel): one launch per
    storage dtype; non-contiguous inputs are read as their contiguous copies; a tensor that
    requires grad is refused (it would silently get no gradient)."""
    T = 3
    kernel = count_launches(WS, "_ws_multi_kernel")
    bases, fts = make_list(T, MIXED, seed=11)
    coeffs = torch.rand(len(bases), T + 1)
    want = OPS.weighted_sum_multi(bases, fts, coeffs)
    assert_lists_bitwise(WS.weighted_sum_multi(bases, fts, coeffs), want)
    assert kernel.launches == len(MIXED)
    strided = [b.t().contiguous().t() if b.dim() == 2 else b for b in bases]
    assert not all(b.is_contiguous() for b in strided)
    assert_lists_bitwise(WS.weighted_sum_multi(strided, fts, coeffs), want)
    needs_grad = [bases[0].clone().requires_grad_()] + bases[1:]
    with pytest.raises(ValueError, match="detach base and finetuned"):
        WS.weighted_sum_multi(needs_grad, fts, coeffs)
    with pytest.raises(RuntimeError, match=r"coeffs must be float32 \[n, T\+1\] = \[9, 4\]"):
        WS.weighted_sum_multi(bases, fts, coeffs.double())


def plant_nonfinite(bases, fts, T):
    """NaN in base 0, +Inf in the last task of tensor 7 (5000 elements: a later block), -Inf in
    task 0 of tensor 3, and a float16 output that overflows from finite inputs (tensor 5 is
    float16 in MIXED: 60000 + 2 * 30000 > 65504); tensors 1 (empty), 2, 4, 6 and 8 stay finite."""
    n = len(bases)
    bases[0].view(-1)[40] = math.nan
    fts[(T - 1) * n + 7].view(-1)[4999] = math.inf
    fts[3].view(-1)[7] = -math.inf
    assert bases[5].dtype == torch.float16
    bases[5].view(-1)[2] = 60000.0
    for t in range(T):
        fts[t * n + 5].view(-1)[2] = 65000.0


def isfinite_flags(outs):
    return [int(not bool(torch.isfinite(o).all())) for o in outs]


def assert_lists_equal_nan(got, want):
    """Bitwise equal but for NaN payloads (NaN matches NaN)."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("T", [1, 3, 8, 9])
@pytest.mark.parametrize("scope", ["none", "tensor", "global"])
def test_weighted_sum_multi_nonfinite_flags(T, scope, count_launches):
    """_weighted_sum_multi_triton's flags (the merged values' check of task arithmetic, linear and
    magnitude_prune, whose global trim passes offsets): 1 exactly where an output
    holds NaN / Inf, set in the merge's own launch (one per dtype; T > 8: the per-tensor fallback
    and torch's isfinite); outputs bitwise the C++ op's; flags left over from before are cleared."""
    kernel = count_launches(WS, "_ws_multi_kernel")
    bases, fts = make_list(T, MIXED, seed=12)
    plant_nonfinite(bases, fts, T)
    coeffs = torch.rand(len(bases), T + 1, generator=torch.Generator().manual_seed(T)) + 0.5
    coeffs[5] = torch.tensor([1.0] + [2.0 / T] * T)  # 60000 + 2 * (65000 - 60000) overflows float16
    thr, lim, offsets = trims(bases, fts, T, scope) if scope != "none" else (None, None, [])
    flags = torch.full((len(bases),), 7, dtype=torch.int32)
    got = WS.weighted_sum_multi(bases, fts, coeffs, thr, lim, offsets, nonfinite=flags)
    want = OPS.weighted_sum_multi(bases, fts, coeffs, thr, lim, offsets)
    assert_lists_equal_nan(got, want)
    assert flags.tolist() == isfinite_flags(want)
    assert flags[[1, 2, 4, 6, 8]].tolist() == [0] * 5 and flags[5] == 1
    assert kernel.launches == (0 if T > 8 else len(MIXED))
    with pytest.raises(RuntimeError, match=r"nonfinite must be a contiguous int32 tensor \[9\]"):
        WS.weighted_sum_multi(bases, fts, coeffs, nonfinite=torch.zeros(9, dtype=torch.int64))


BF16_MAX = torch.finfo(torch.bfloat16).max  # (2 - 2^-7) 2^127, its step 2^120
TIES_FLAG_DTYPES = (torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float32,
                    torch.bfloat16, torch.float16, torch.bfloat16, torch.bfloat16)
TIES_FLAG_SHAPES = [(5,), (0, 3), (7,), (3, 3), (6,), (2, 5), (9,), (4,), (5000,), (5000,)]
ROUNDS_TO_BF16_INF = (BF16_MAX - 3 * 2.0**120, BF16_MAX)  # base + 1.25 tau = 3.3995e38: finite in float32
TAU_OVERFLOWS = (-1e38, 2.5e38)  # tau past float32's range, base + 1.25 tau = 3.375e38 within it
# (tensor, element): (base, fine-tuned), the same in every task: merged at scale 1.25 as the (weighted)
# mean of the agreeing tasks, the element is base + 1.25 tau up to float64 rounding.
TIES_PLANTED = {
    (0, 1): (math.nan, 0.5),  # NaN
    (2, 1): ROUNDS_TO_BF16_INF,  # Inf in bfloat16
    (3, 1): (0.0, 60000.0),  # 75000: Inf in float16
    (4, 1): (3e38, 3.4e38),  # 3.5e38: Inf in float32, computed again in float64
    (5, 1): TAU_OVERFLOWS,  # float32 path NaN / Inf, float64 result finite
    (6, 1): TAU_OVERFLOWS,  # the same in bfloat16: 3.37e38 fits
    (7, 1): (0.0, 52000.0),  # 65000 rounds to 64992
    (9, 10): TAU_OVERFLOWS,  # a float64 recompute in the program (block) of
    (9, 1030): ROUNDS_TO_BF16_INF,  # a value that rounds to Inf on the float32 path
}
TIES_PLANTED_FLAGS = [1, 0, 1, 1, 1, 0, 0, 0]  # tensor 8: +Inf in the last task (a later block); 9: 1


def plant_ties_nonfinite(bases, fts, T):
    n = len(bases)
    for (i, k), (b, f) in TIES_PLANTED.items():
        bases[i].view(-1)[k] = b
        for t in range(T):
            fts[t * n + i].view(-1)[k] = f
    fts[(T - 1) * n + 8].view(-1)[4999] = math.inf


@pytest.mark.parametrize("T,gpu_chunks", [(1, False), (3, True), (5, False), (8, True), (9, False)])
@pytest.mark.parametrize("options,scope", [
    (("sum", "weights", True, "positive", 1.25), "tensor"),
    (("count", "count", False, "positive", 1.25), "global"),
    (("sum", "count", False, "majority", 1.25), "none"),
    (("sum", "count", False, "majority", 1.25), "global"),
], ids=["mergekit-tensor", "count-global", "majority-none", "majority-global"])
def test_ties_merge_multi_nonfinite_flags(T, gpu_chunks, options, scope, count_launches, monkeypatch):
    """ties_merge_multi's flags (the merged values' check of TIES and NeuroMerging's vectors), set in
    the merge launches (one per dtype) from the values stored: 1 exactly where an output holds NaN /
    Inf in its dtype, as the C++ op flags it (a NaN or Inf input, a float32 result that overflows
    from finite inputs, a finite float32 result beyond bfloat16's or float16's range, also in a
    program that recomputes another element in float64); 0 for an empty tensor and where only the
    float32 path overflowed. No pass over the outputs (T > 8: the per-tensor launches, then
    nonfinite_flags of the outputs). With the GPU's block sizes too (programs of several blocks)."""
    if gpu_chunks:
        monkeypatch.setattr(common, "CHUNK", 2048)
        monkeypatch.setattr(common, "ELECTION_BLOCKS", (1024, 512))
        monkeypatch.setattr(common, "TIES_ITERS", 3)
    kernel = count_launches(TM, "_ties_multi_kernel")
    outputs_read = []
    real_flags = TM.nonfinite_flags

    def read_flags(tensors):
        outputs_read.append(list(tensors))
        return real_flags(tensors)
    monkeypatch.setattr(TM, "nonfinite_flags", read_flags)
    bases, fts = make_list(T, TIES_FLAG_DTYPES, seed=13, shapes=TIES_FLAG_SHAPES)
    plant_ties_nonfinite(bases, fts, T)
    n = len(bases)
    thr, lim, offsets = trims(bases, fts, T, scope)
    # normalize "count" divides the weighted sum by the count: weights of 1 keep base + 1.25 tau
    weights = (WEIGHTS * 2)[:T] if options[1] == "weights" else [1.0] * T
    flags, want_flags = torch.full((n,), 7, dtype=torch.int32), torch.full((n,), 7, dtype=torch.int32)
    got = TM.ties_merge_multi(bases, fts, weights, thr, lim, offsets, *options, nonfinite=flags)
    want = OPS._ties_merge_multi_flagged(bases, fts, weights, thr, lim, offsets, *options, nonfinite=want_flags)
    if T <= 8:
        assert_lists_equal_nan(got, want)
    else:  # the chunked single-tensor kernels: within 1e-6 of the C++ op
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert flags.tolist() == want_flags.tolist() == isfinite_flags(got)
    assert flags[:8].tolist() == TIES_PLANTED_FLAGS and flags[9] == 1
    assert kernel.launches == (0 if T > 8 else len(set(TIES_FLAG_DTYPES)))
    assert len(outputs_read) == (1 if T > 8 else 0)
    with pytest.raises(RuntimeError, match=r"nonfinite must be a contiguous int32 tensor \[10\] on cpu, got Long"):
        TM.ties_merge_multi(bases, fts, weights, nonfinite=torch.zeros(10, dtype=torch.int64))


def biased_list(T, dtypes, seed, shapes):
    """Tensors whose task vectors lean negative (even i) or positive (odd i): the majority signs
    differ between tensors, and trimmed-away entries leave zero votes that take them."""
    bases, fts = make_list(T, dtypes, seed, shapes)
    n = len(bases)
    for k, f in enumerate(fts):
        lean = 0.03 if k % n % 2 else -0.03
        fts[k] = (f.float() + lean).to(f.dtype)
    return bases, fts


@pytest.mark.parametrize("T", [1, 2, 5])
@pytest.mark.parametrize("gpu_chunks", [False, True])
def test_ties_merge_multi_majority(T, gpu_chunks, count_launches, monkeypatch):
    """Per-tensor majority signs from one pre-pass launch per dtype (with the GPU's block and chunk
    sizes too: several partials per tensor, several election blocks per merge program, a tensor
    ending inside a program's chunk), bitwise the C++ op; one merge launch per dtype."""
    if gpu_chunks:
        monkeypatch.setattr(common, "CHUNK", 2048)
        monkeypatch.setattr(common, "ELECTION_BLOCKS", (1024, 512))
        monkeypatch.setattr(common, "TIES_ITERS", 3)
    kernels = {"vote": count_launches(TM, "_ties_vote_multi_kernel"), "merge": count_launches(TM, "_ties_multi_kernel")}
    bases, fts = biased_list(T, (torch.bfloat16, torch.float32), seed=11,
                             shapes=[(3, 1100), (5000,), (0, 3), (7,), (64, 33), (1,)])
    for scope in ("global", "tensor"):
        thr, lim, offsets = trims(bases, fts, T, scope)
        options = ("sum", "count", False, "majority", 0.7)
        got = TM.ties_merge_multi(bases, fts, [1.0] * T, thr, lim, offsets, *options)
        assert_lists_bitwise(got, OPS.ties_merge_multi(bases, fts, [1.0] * T, thr, lim, offsets, *options))
        positive = OPS.ties_merge_multi(bases, fts, [1.0] * T, thr, lim, offsets, "sum", "count", False, "positive", 0.7)
        if T > 1:  # votes that cancel exactly follow tensor 0's negative majority (T = 1: nothing to elect)
            assert not torch.equal(got[0].cpu(), positive[0])
    assert kernels["vote"].launches == kernels["merge"].launches == 2 * 2


@pytest.mark.parametrize("ahead", [0, 1, 2, 3])
def test_ties_merge_loads_blocks_ahead(ahead, monkeypatch):
    """The merge's unrolled blocks with their loads issued `ahead` blocks early (the GPU's several
    blocks a program; tensors ending inside a program's chunk), bitwise the C++ op, in the list
    kernel and the single-tensor one."""
    monkeypatch.setattr(common, "ELECTION_BLOCKS", (512, 512))
    monkeypatch.setattr(common, "TIES_ITERS", 3)
    monkeypatch.setattr(common, "TIES_AHEAD", ahead)
    T = 3
    bases, fts = make_list(T, (torch.bfloat16, torch.float32), seed=12, shapes=[(3, 1100), (5000,), (7,), (1537,)])
    for scope in ("none", "tensor"):
        thr, lim, offsets = trims(bases, fts, T, scope)
        got = TM.ties_merge_multi(bases, fts, WEIGHTS[:T], thr, lim, offsets)
        assert_lists_bitwise(got, OPS.ties_merge_multi(bases, fts, WEIGHTS[:T], thr, lim, offsets))
    column = [fts[t * len(bases) + 1] for t in range(T)]
    assert_lists_bitwise([TM.ties_merge(bases[1], column, WEIGHTS[:T])],
                         [OPS.ties_merge(bases[1], column, WEIGHTS[:T])])


# ---------------------------------------------------------------------------------------------
# On a GPU: torch.ops dispatch to these launchers, at a real model's shapes (a TinyLlama layer).

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
LAYER = [(2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (5632, 2048), (5632, 2048), (2048, 5632),
         (2048,), (2048,), (1001, 3)]


@cuda_only
@pytest.mark.parametrize("T", [1, 4, 8])
def test_cuda_multi_real_shapes(T):
    bases, fts = make_list(T, (torch.bfloat16,) * 9 + (torch.float32,), seed=6, shapes=LAYER, device="cuda")
    cb, cf = cpu(bases), cpu(fts)
    n = len(bases)
    coeffs = torch.rand(n, T + 1)
    for scope in ("global", "tensor"):
        thr, lim, offsets = trims(bases, fts, T, scope)
        got = OPS.weighted_sum_multi(bases, fts, coeffs.cuda(), thr.cuda(), lim.cuda(), offsets)
        assert all(g.is_cuda for g in got)
        assert_lists_bitwise(got, OPS.weighted_sum_multi(cb, cf, coeffs, thr, lim, offsets))
        got = OPS.ties_merge_multi(bases, fts, WEIGHTS[:T], thr.cuda(), lim.cuda(), offsets)
        assert_lists_bitwise(got, OPS.ties_merge_multi(cb, cf, WEIGHTS[:T], thr, lim, offsets))
    grads = [torch.randn(b.shape, device="cuda") for b in bases]
    got = OPS.weighted_sum_multi_backward(grads, bases, fts, coeffs.cuda())
    want = OPS.weighted_sum_multi_backward(cpu(grads), cb, cf, coeffs)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-9)
    keys = [k for i in range(n) for k in nk.dare_keys(0, f"layer.{i}", T)]
    got = OPS.dare_multi(bases, fts, WEIGHTS[:T], 0.3, keys, "density", "sum", "weights", 1.0)
    assert_lists_bitwise(got, OPS.dare_multi(cb, cf, WEIGHTS[:T], 0.3, keys, "density", "sum", "weights", 1.0))
    # last: NaN / Inf planted into the inputs (cb, cf above are copies from before)
    flags = torch.full((n,), 7, dtype=torch.int32, device="cuda")
    bases[4].view(-1)[-1] = math.nan  # the last element of a 5632 x 2048 matrix, in its last block
    fts[(T - 1) * n + 8].view(-1)[5] = math.inf  # a norm vector
    got = OPS._weighted_sum_multi_triton(bases, fts, coeffs.cuda(), nonfinite=flags)
    want = OPS.weighted_sum_multi(cpu(bases), cpu(fts), coeffs)
    assert_lists_equal_nan(got, want)
    assert flags.tolist() == isfinite_flags(want) == [0, 0, 0, 0, 1, 0, 0, 0, 1, 0]
    flags.fill_(7)
    got = OPS._ties_merge_multi_flagged(bases, fts, WEIGHTS[:T], nonfinite=flags)
    want = OPS.ties_merge_multi(cpu(bases), cpu(fts), WEIGHTS[:T])
    assert_lists_equal_nan(got, want)
    assert flags.tolist() == isfinite_flags(want) and flags[4] == 1


@cuda_only
@pytest.mark.parametrize("T", [1, 4, 8, 9])
def test_cuda_ties_merge_multi_nonfinite_flags(T):
    """The compiled merge kernel's flags (BLOCK 256, 8 blocks a program) on the planted list of
    test_ties_merge_multi_nonfinite_flags, bitwise the C++ op's outputs and flags."""
    bases, fts = make_list(T, TIES_FLAG_DTYPES, seed=13, shapes=TIES_FLAG_SHAPES)
    plant_ties_nonfinite(bases, fts, T)
    n = len(bases)
    flags, want_flags = torch.full((n,), 7, dtype=torch.int32, device="cuda"), torch.zeros(n, dtype=torch.int32)
    for options in (("sum", "weights", True, "positive", 1.25), ("sum", "count", False, "majority", 1.25)):
        weights = (WEIGHTS * 2)[:T] if options[1] == "weights" else [1.0] * T
        got = OPS._ties_merge_multi_flagged([b.cuda() for b in bases], [f.cuda() for f in fts], weights, None, None,
                                            [], *options, nonfinite=flags)
        want = OPS._ties_merge_multi_flagged(bases, fts, weights, None, None, [], *options, nonfinite=want_flags)
        if T <= 8:
            assert_lists_equal_nan(got, want)
        assert flags.tolist() == want_flags.tolist() == isfinite_flags(got)
        assert flags[:8].tolist() == TIES_PLANTED_FLAGS and flags[9] == 1
