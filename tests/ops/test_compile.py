"""The ops trace under torch.compile(fullgraph=True): fake implementations and autograd are
registered, so a graph break is an error."""
import pytest
import torch

from neurokern import ops


def _group(T=3, shape=(6, 5)):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(T)]


def test_merge_ops_compile_without_graph_breaks():
    base, fts = _group()

    def merge(base, f0, f1, f2):
        fts = [f0, f1, f2]
        trim = ops.magnitude_threshold([base], fts, [10, 10, 10])
        gram, dots, sq = ops.neuron_stats(base, fts, trim)
        coeffs = ops.neuromerge_coeffs(gram, dots, sq, 0.0, 1.0)
        merged = ops.weighted_sum(base, fts, coeffs, trim)
        ties = ops.ties_merge(base, fts, [1.0, 1.0, 1.0], trim)
        dare = ops.dare(base, fts, [1.0, 1.0, 1.0], 0.5, [1, 2, 3])
        return merged, ties, dare, ops.trim_l1([base], fts, trim)

    compiled = torch.compile(merge, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(base, *fts), merge(base, *fts)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_neuromerging_list_ops_compile_without_graph_breaks():
    """NeuroMerging's calls over a list of tensors (neurokern/methods/neuromerging.py)."""
    (b0, f0), (b1, f1), (b2, f2) = _group(2, (6, 5)), _group(2, (0, 3)), _group(2, (4,))

    def merge(b0, b1, b2, x0, x1, y0, y1, z0, z1):
        base, fts = [b0, b1], [x0, y0, x1, y1]
        trim = ops.magnitude_threshold(base, fts, [10, 10])
        gram, dots, sq = ops.neuron_stats_multi(base, fts, trim, [0, 30])
        coeffs = ops.neuromerge_coeffs(gram, dots, sq, 0.0, 1.0)
        merged = ops.weighted_sum_rows_multi(base, fts, coeffs, trim, [0, 30])
        points = ops.ties_merge_multi([b2], [z0, z1], [1.0, 1.0], zero_sign="majority")
        return *merged, *points, ops.trim_l1(base, fts, trim)

    args = (b0, b1, b2, *f0, *f1, *f2)
    compiled = torch.compile(merge, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), merge(*args)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_weighted_sum_backward_compiles():
    base, fts = _group()
    coeffs = torch.tensor([1.0, 0.3, 0.3, 0.3], requires_grad=True)

    def loss(coeffs, base, f0, f1, f2):
        return (ops.weighted_sum(base, [f0, f1, f2], coeffs) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    (g_compiled,) = torch.autograd.grad(compiled(coeffs, base, *fts), coeffs)
    (g_eager,) = torch.autograd.grad(loss(coeffs, base, *fts), coeffs)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("routed", [False, True], ids=["own-routing", "tinted_route"])
def test_tinted_linear_compiles(routed):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=g, requires_grad=True)
    w = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    ids = torch.tensor([0, 2, 1, 1, 0, 2, 2])

    def f(x, w, ids):
        routing = ops.tinted_route(ids, 3) if routed else (None, None)
        return ops.tinted_linear(x, w, None, ids, *routing).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w, ids), (x, w))
    want = torch.autograd.grad(f(x, w, ids), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
