"""The CUDA kernels (Triton launchers registered with torch.library.impl, CUDA ops) under
torch.compile(fullgraph=True) with the default inductor backend: one graph, no break, results
bitwise those of eager calls. Skipped without a GPU."""
import pytest
import torch

from neurokern import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _group(T=3, shape=(64, 96)):
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(shape, generator=g, device="cuda").to(torch.bfloat16)
    return base, [(base.float() + 0.1 * torch.randn(shape, generator=g, device="cuda")).to(torch.bfloat16)
                  for _ in range(T)]


def _one_graph(fn, *args):
    """fn compiled, run; the compiled outputs and how many graphs dynamo made."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    out = torch.compile(fn, fullgraph=True)(*args)
    return out, counters["stats"]["unique_graphs"]


def test_merge_ops_compile_on_cuda():
    base, fts = _group()
    vec, vfts = _group(shape=(96,))

    def merge(base, f0, f1, f2, vec, v0, v1, v2):
        fts = [f0, f1, f2]
        trim = ops.magnitude_threshold([base], fts, [500, 500, 500])
        gram, dots, sq = ops.neuron_stats(base, fts, trim)
        coeffs = ops.neuromerge_coeffs(gram, dots, sq, 0.0, 1.0)
        merged = ops.weighted_sum(base, fts, coeffs, trim)
        ties = ops.ties_merge_multi([base, vec], [f0, v0, f1, v1, f2, v2], [1.0, 1.0, 1.0])
        dare = ops.dare(base, fts, [1.0, 1.0, 1.0], 0.5, [1, 2, 3])
        multi = ops.weighted_sum_multi([base, vec], [f0, v0, f1, v1, f2, v2], torch.full((2, 4), 0.25, device="cuda"))
        return merged, *ties, dare, *multi, ops.trim_l1([base], fts, trim)

    args = (base, *fts, vec, *vfts)
    got, graphs = _one_graph(merge, *args)
    assert graphs == 1  # the launchers were not traced as frames of their own
    for g, w in zip(got, merge(*args)):
        assert torch.equal(g, w)


def test_weighted_sum_multi_backward_compiles_on_cuda():
    base, fts = _group()
    coeffs = torch.tensor([[1.0, 0.3, 0.3, 0.3]], device="cuda", requires_grad=True)

    def loss(coeffs, base, f0, f1, f2):
        (out,) = ops.weighted_sum_multi([base], [f0, f1, f2], coeffs, out_dtype=torch.float32)
        return (out ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True)
    (got,) = torch.autograd.grad(compiled(coeffs, base, *fts), coeffs)
    (want,) = torch.autograd.grad(loss(coeffs, base, *fts), coeffs)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
