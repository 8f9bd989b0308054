"""neurokern::_launch_table and neurokern::_finite_table (csrc/launch_table.cpp): the host side of
the Triton launches over lists of tensors, against a plain Python statement of the same tables
(the layout of neurokern/ops/triton/lists.py's module docstring and of finite.py's), and the
argument errors against the messages of the Python checks they replaced (common.check_group
and check_storage, the C++ kernels' messages).

The ops run on any device; the tables and owner arrays land on the tensors' device (on a GPU
through pinned memory, without a host sync: test_cuda_tables)."""
import itertools

import pytest
import torch

from neurokern.ops.triton import common
from neurokern.ops.triton import finite
from neurokern.ops.triton import lists
from neurokern.ops.triton import ties_merge as TM
from neurokern.ops.triton import trim_l1 as TL
from neurokern.ops.triton import weighted_sum as WS

from .conftest import make_list

OPS = torch.ops.neurokern
MIXED = (torch.bfloat16, torch.float32, torch.float16)
# Mixed ranks, zero-element tensors (first, inside, and a whole dtype group of them: no launch).
SHAPES = [(0, 3), (33, 65), (17,), (3, 2, 5), (1,), (0,), (4, 7), (5000,)]
MATRICES = [(0, 3), (33, 65), (17, 1), (4, 16), (1, 1), (3, 0), (2, 4100)]


def address(t):
    return t.data_ptr()


def want_launches(base, fts, per_program, layout="elements", outs=None, offsets=(), grad=None):
    """[(table, owner, first, nt, programs, aligned, c16)] as the module docstring lays them out."""
    n = len(base)
    T = len(fts) // n
    groups = {}
    for i, b in enumerate(base):
        groups.setdefault((b.dtype, grad[i].dtype if grad else None), []).append(i)
    flat = list(itertools.accumulate((b.numel() for b in base), initial=0))
    firsts = list(itertools.accumulate((b.shape[0] if b.dim() == 2 else 0 for b in base), initial=0))
    launches = []
    for idx in groups.values():
        if layout == "elements":
            counts = [-(-base[i].numel() // per_program) for i in idx]
        elif layout == "row_blocks":
            counts = [base[i].shape[0] * -(-base[i].shape[1] // per_program) for i in idx]
        else:
            counts = [-(-base[i].shape[0] // per_program) for i in idx]
        if sum(counts) == 0:
            continue
        offset = [flat[i] for i in idx] if offsets is None else [offsets[i] if offsets else 0 for i in idx]
        addresses = [[address(base[i]) for i in idx], [address((outs or base)[i]) for i in idx]]
        addresses += [[address(fts[t * n + i]) for i in idx] for t in range(T)]
        addresses += [[address(grad[i]) for i in idx]] if grad else []
        values = []
        if layout == "row_blocks":
            values = [[base[i].shape[1] for i in idx], [firsts[i] for i in idx]]
        elif layout == "rows":
            values = [[base[i].shape[0] for i in idx], [base[i].shape[1] for i in idx], [firsts[i] for i in idx]]
        starts = list(itertools.accumulate(counts, initial=0))[:-1]
        table = torch.tensor([starts, [base[i].numel() for i in idx], offset] + addresses + values + [idx, counts])
        owner = torch.repeat_interleave(torch.arange(len(idx), dtype=torch.int32), torch.tensor(counts))
        aligned = all(a % 16 == 0 for row in addresses for a in row)
        c16 = layout != "elements" and all(base[i].shape[1] % 16 == 0 for i in idx)
        launches.append((table, owner, idx[0], len(idx), sum(counts), aligned, c16))
    return launches


def check_launches(got, want):
    assert len(got) == len(want)
    for g, (table, owner, *info) in zip(got, want):
        assert torch.equal(g.table.cpu(), table), (g.table, table)
        assert g.owner.dtype == torch.int32 and torch.equal(g.owner.cpu(), owner)
        assert [g.first, g.nt, g.programs, g.aligned, g.c16] == info


@pytest.mark.parametrize("T", range(1, 9))
@pytest.mark.parametrize("offsets", ["none", "given", "flat"])
def test_elements(T, offsets):
    base, fts = make_list(T, MIXED, seed=T, shapes=SHAPES)
    offsets = {"none": (), "given": [7 * i + 3 for i in range(len(base))], "flat": None}[offsets]
    for per_program, outputs in [(1024, True), (4096, False), (3, True)]:
        outs, grad, launches, rows = lists.prepare("op", base, fts, per_program, outputs=outputs, offsets=offsets)
        assert grad == [] and rows == 0
        if outputs:
            assert [(o.shape, o.dtype, o.device) for o in outs] == [(b.shape, b.dtype, b.device) for b in base]
            assert len({address(o) for o in outs if o.numel()}) == sum(1 for o in outs if o.numel())
        else:
            assert outs == []
        check_launches(launches, want_launches(base, fts, per_program, outs=outs, offsets=offsets))
    outs, *_ = lists.prepare("op", base, fts, 1024, outputs=True, out_dtype=torch.float64)
    assert all(o.dtype == torch.float64 and o.shape == b.shape for o, b in zip(outs, base))


@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("layout, per_program", [("row_blocks", 32), ("row_blocks", 4096), ("rows", 1), ("rows", 5)])
def test_per_row_layouts(T, layout, per_program):
    base, fts = make_list(T, MIXED, seed=T, shapes=MATRICES)
    outs, _, launches, rows = lists.prepare("op", base, fts, per_program, layout, outputs=True, offsets=None)
    assert rows == sum(b.shape[0] for b in base)
    check_launches(launches, want_launches(base, fts, per_program, layout, outs, offsets=None))


@pytest.mark.parametrize("T", [1, 4])
def test_grad_rows_and_groups(T):
    """weighted_sum_multi_backward's gradients: an address row after the fine-tuned ones, a launch
    per (base dtype, grad dtype), integer gradients as float32 copies, float64 kept."""
    base, fts = make_list(T, (torch.float32, torch.bfloat16), seed=T, shapes=SHAPES)
    grad = [torch.ones(b.shape, dtype=(torch.float32, torch.float64, torch.int32)[i % 3]) for i, b in enumerate(base)]
    grad[1] = grad[1][None].expand(2, *grad[1].shape)[1]  # a view: still contiguous, kept as it is
    _, got, launches, _ = lists.prepare("op", base, fts, 64, grad=grad)
    assert [g.dtype for g in got] == [torch.float32 if g.dtype == torch.int32 else g.dtype for g in grad]
    assert all(torch.equal(a, b.float()) and a.is_contiguous() for a, b in zip(got, grad))
    assert all(a is b for a, b in zip(got, grad) if b.dtype != torch.int32)
    check_launches(launches, want_launches(base, fts, 64, grad=got))


def test_check_only():
    """per_program 0: the checks (all of them) and T / rows, no launch, no outputs."""
    base, fts = make_list(10, (torch.float32,), shapes=[(3, 4), (5, 2)])
    outs, grad, launches, rows = lists.prepare("op", base, fts, 0, "rows", outputs=True)
    assert (outs, grad, launches, rows) == ([], [], [], 8)
    assert OPS._launch_table.default("op", base, fts, None, [], 0, "elements", False, None)[3] == [10, 0]
    with pytest.raises(RuntimeError, match=r"neurokern.op: finetuned\[9\] has shape \[2\], base has \[3, 4\]"):
        lists.prepare("op", base, fts[:-2] + [torch.zeros(2), fts[-1]])


def test_only_empty_tensors():
    base, fts = make_list(2, MIXED, shapes=[(0, 3), (0,)])
    outs, _, launches, _ = lists.prepare("op", base, fts, 1024, outputs=True)
    assert launches == [] and [o.shape for o in outs] == [(0, 3), (0,)]


def python_message(op, base, column):
    """The message of the Python checks the C++ op replaced."""
    try:
        common.check_group(op, base, column)
        common.check_storage(op, base.dtype)
    except RuntimeError as e:
        return str(e)
    return None


def bad_lists():
    """(name, base, finetuned) with one bad tensor each, T = 2 over three tensors."""
    base, fts = make_list(2, (torch.float32, torch.bfloat16), shapes=[(3, 4), (5,), (2, 3)])
    n = len(base)

    def with_ft(k, t):
        f = list(fts)
        f[k] = t
        return f

    strided = torch.zeros(4, 3).t()
    yield "shape", base, with_ft(n + 1, torch.zeros(6, dtype=torch.bfloat16))
    yield "dtype", base, with_ft(2, fts[2].half())
    yield "device", base, with_ft(n, torch.empty(3, 4, device="meta"))
    yield "finetuned contiguous", base, with_ft(0, torch.zeros(4, 3).t())
    yield "base contiguous", [base[0], base[1], strided.t().t()], with_ft(2, torch.zeros(2, 3).contiguous())
    yield "storage dtype", [b.double() for b in base], [f.double() for f in fts]
    yield "storage dtype int", [torch.zeros(3, dtype=torch.int32)], [torch.zeros(3, dtype=torch.int32)]


@pytest.mark.parametrize("case", [c[0] for c in bad_lists()])
def test_tensor_errors_match_python_checks(case):
    _, base, fts = next(c for c in bad_lists() if c[0] == case)
    n = len(base)
    want = next(m for i in range(n) if (m := python_message("some_op", base[i], list(fts[i::n]))))
    with pytest.raises(RuntimeError) as error:
        lists.prepare("some_op", base, fts, 1024, outputs=True)
    assert str(error.value).splitlines()[0] == want


@pytest.mark.parametrize("kwargs, message", [
    (dict(base=[]), "neurokern.op: base is an empty list"),
    (dict(fts=3), "neurokern.op: 3 fine-tuned tensors is not a multiple of 2 base tensors"),
    (dict(offsets=[0]), r"neurokern.op: offsets must be empty or hold one entry per tensor \(2\), got 1"),
    (dict(grad=1), "neurokern.op: 1 gradients for 2 tensors"),
    (dict(grad="shape"), r"neurokern.op: grad\[1\] has shape \[4\], base\[1\] has \[5\]"),
    (dict(layout="rows"), r"neurokern.op: base\[1\] must be 2-D \(rows are neurons\), got 1-D"),
    (dict(base_device=True), r"neurokern.op: base\[1\] is on meta, base\[0\] on cpu"),
])
def test_list_errors(kwargs, message):
    base, fts = make_list(2, (torch.float32,), shapes=[(3, 4), (5,)])
    grad = None
    if "grad" in kwargs:
        grad = [torch.zeros(3, 4), torch.zeros(4)] if kwargs["grad"] == "shape" else [torch.zeros(3, 4)]
    if kwargs.get("base_device"):
        base, fts = [base[0], torch.empty(5, device="meta")], [fts[0], torch.empty(5, device="meta")] * 2
    with pytest.raises(RuntimeError, match=message):
        lists.prepare("op", kwargs.get("base", base), fts[:kwargs.get("fts", len(fts))], 1024,
                  kwargs.get("layout", "elements"), offsets=kwargs.get("offsets", ()), grad=grad)


def test_ops_keep_their_messages():
    """Through a launcher: the op's name in the message, the C++ CPU op's words."""
    base, fts = make_list(2, (torch.float32,), shapes=[(3, 4), (5,)])
    bad = [fts[0], fts[1], fts[2].bfloat16(), fts[3]]
    for call in (lambda: WS.weighted_sum_multi(base, bad, torch.rand(2, 3)),
                 lambda: TM.ties_merge_multi(base, bad, [1.0, 1.0]),
                 lambda: TL.trim_l1(base, bad)):
        with pytest.raises(RuntimeError) as error:
            call()
        assert "finetuned[1] is BFloat16, base is Float" in str(error.value)
        with pytest.raises(RuntimeError) as cpu_error:
            OPS.ties_merge_multi(base, bad, [1.0, 1.0])
        assert str(cpu_error.value).split(": ", 1)[1] == str(error.value).split(": ", 1)[1]


def finite_want(tensors, block_bytes, copies):
    """The launches of the finite check, non-dense tensors read from `copies` (in list order)."""
    groups, others, dense, copies = {}, [], {}, list(copies)
    for i, t in enumerate(tensors):
        if t.dtype not in finite._NONFINITE_BITS:
            others.append(i)
        elif t.numel():
            dense[i] = t if finite_dense(t) else copies.pop(0)
            groups.setdefault((t.dtype, address(dense[i]) % 16 == 0), []).append(i)
    launches = []
    for (dtype, aligned), idx in groups.items():
        counts = [-(-dense[i].numel() // (block_bytes // dtype.itemsize)) for i in idx]
        starts = list(itertools.accumulate(counts, initial=0))[:-1]
        table = torch.tensor([starts, [dense[i].numel() for i in idx], [address(dense[i]) for i in idx], idx, counts])
        launches.append((table, idx[0], len(idx), sum(counts), aligned))
    return launches, others


def finite_dense(t):
    return t.is_contiguous() or t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d))).is_contiguous()


def test_finite_tables():
    """Groups by dtype and 16-byte alignment, empty tensors skipped, other dtypes listed, tensors
    that are not dense read from copies, permuted dense ones in place."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(4100, generator=g)
    tensors = [big[1:], torch.randn(7, 5, generator=g).t(), torch.zeros(0), torch.ones(3, dtype=torch.int64),
               torch.randn(6, 9, generator=g)[:, ::2], big[4:].bfloat16(), torch.randn(3, generator=g).double(),
               big[:8].to(torch.float8_e4m3fn), torch.randn(5, generator=g), torch.zeros(0, 2).bfloat16()]
    tables, copies, info, others = OPS._finite_table.default(tensors, 16384)
    want, want_others = finite_want(tensors, 16384, copies)
    assert others == want_others == [3]
    assert len(copies) == 1 and copies[0].is_contiguous() and torch.equal(copies[0], tensors[4])
    assert len(tables) == 3 * len(want) and len(info) == 4 * len(want)
    for k, (table, first, nt, programs, aligned) in enumerate(want):
        got, owner, like = tables[3 * k:3 * k + 3]
        assert torch.equal(got, table)
        assert torch.equal(owner, torch.repeat_interleave(torch.arange(nt, dtype=torch.int32), table[4]))
        assert info[4 * k:4 * k + 4] == [first, nt, programs, aligned]
        assert like.dtype.itemsize == tensors[first].dtype.itemsize and not like.dtype.is_floating_point
    assert OPS._finite_table.default([], 16384) == ([], [], [], [])
    with pytest.raises(RuntimeError, match=r"nonfinite_flags: tensors\[1\] is on meta, tensors\[0\] on cpu"):
        OPS._finite_table.default([big, torch.empty(3, device="meta")], 16384)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 4, 8])
def test_cuda_tables(T):
    """On a GPU: tables and owners on the device (one pinned non-blocking copy), the same numbers
    as on the host; outputs on the device."""
    base, fts = make_list(T, MIXED, seed=T, shapes=SHAPES)
    base, fts = [b.cuda() for b in base], [f.cuda() for f in fts]
    outs, _, launches, _ = lists.prepare("op", base, fts, 1024, outputs=True)
    assert all(o.is_cuda for o in outs)
    for g in launches:
        assert g.table.is_cuda and g.owner.is_cuda
    check_launches(launches, want_launches(base, fts, 1024, outs=outs))
    tensors = base + [torch.ones(3, device="cuda", dtype=torch.int64)]
    tables, _, info, others = OPS._finite_table.default(tensors, 16384)
    assert others == [len(base)] and all(t.is_cuda for t in tables)
