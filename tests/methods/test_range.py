"""Inputs near the largest float32 / bfloat16 values (issue 23): finite inputs whose task vectors
overflow float32 merge to the exact answer, and a merged value the output dtype cannot hold is one
clear error naming the tensor."""
import pytest
import torch

import neurokern as nk

# Every method with parameters under which it is positively homogeneous (merge(2^s x) is 2^s
# merge(x) in exact arithmetic: trims rank magnitudes, elections look at signs, NeuroMerging's
# thresholds are relative) and its result stays in range: convex combinations of the models.
METHODS = {
    "task_arithmetic": dict(weights=[0.5, 0.25, 0.25]),
    "ties": dict(density=0.5, weights=[1.0, 0.5, 1.0]),
    "dare": dict(density=0.5, weights=[0.5, 0.25, 0.25], rescale=None, seed=3),
    "dare_ties": dict(density=0.5, rescale=None, normalize=True, seed=3),
    "neuromerging": dict(density=0.5, scale=0.5),  # lambda 0.5 keeps this one in range
}
SHIFT = 100  # near-max values, divided by 2^SHIFT, are ordinary (~1e8) and overflow nothing


def _near_max(dtype, seed=0):
    """base with |base| in [0.8e38, 1.2e38] and 3 fine-tuned models: 20% of the entries of each lie
    near the maximum on the other side of 0 (|tau| of 3.4e38 to 4.5e38: most overflow float32),
    the rest move by ~5%."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w.weight": (24, 16), "b.bias": (24,)}
    base, fts = {}, [{} for _ in range(3)]
    for name, shape in shapes.items():
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
        b = (sign * (0.8 + 0.4 * torch.rand(shape, generator=g)) * 1e38).to(dtype)
        base[name] = b
        for ft in fts:
            flip = torch.rand(shape, generator=g) < 0.2
            moved = b.double() * (1 + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0.8, 1.02)
            far = -sign.double() * (2.6 + 0.7 * torch.rand(shape, generator=g, dtype=torch.float64)) * 1e38
            ft[name] = torch.where(flip, far, moved).to(dtype)
    return base, fts


def _scaled(sd, s):
    return {k: (v.double() * 2.0**s).to(v.dtype) for k, v in sd.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("method", list(METHODS))
def test_near_max_inputs_merge_exactly(method, dtype):
    base, fts = _near_max(dtype)
    taus = [(ft["w.weight"].float() - base["w.weight"].float()) for ft in fts]
    assert not all(bool(torch.isfinite(t).all()) for t in taus)  # the case: float32 task vectors overflow
    got = nk.merge(base, fts, method=method, **METHODS[method])
    # The same merge of the inputs scaled down by 2^SHIFT (exact), scaled back: the exact answer
    # as the ordinary path computes it.
    small = nk.merge(_scaled(base, -SHIFT), [_scaled(ft, -SHIFT) for ft in fts], method=method, **METHODS[method])
    for name, out in got.items():
        want = (small[name].double() * 2.0**SHIFT).to(dtype)
        assert torch.isfinite(out).all(), name
        if method == "neuromerging" or dtype == torch.float32:
            # Arithmetic that rounds (float32 inputs, NeuroMerging's coefficients): the ordinary
            # path rounds float32 intermediates the size of the inputs (~1e38), the near-max path
            # float64 ones, then both round to the dtype: one step of the dtype at the result, and
            # 16 float32 steps at 3.4e38
            step = torch.finfo(dtype).eps * want.double().abs() + 16 * 2.0**-24 * 3.4e38
            assert ((out.double() - want.double()).abs() <= step).all(), name
        else:
            assert torch.equal(out, want), name


def test_task_arithmetic_exact_zero():
    """The issue's case: base +3e38, fine-tuned -3e38 and +3e38, weights [0.5, 0.5]: exactly 0."""
    b = torch.full((5,), 3e38, dtype=torch.bfloat16)
    out = nk.merge({"x": b}, [{"x": -b}, {"x": b}], method="task_arithmetic", weights=[0.5, 0.5])
    assert torch.equal(out["x"], torch.zeros(5, dtype=torch.bfloat16))


UNREPRESENTABLE = {
    "task_arithmetic": dict(weights=[4.0]),
    "ties": dict(density=1.0, scale=4.0),
    "dare": dict(density=1.0, scale=4.0),
    "dare_ties": dict(density=1.0, scale=4.0),
    "neuromerging": dict(density=1.0, scale=4.0),
    "linear": dict(weights=[4.0], normalize=False),
    "magnitude_prune": dict(density=1.0, scale=4.0),
    "breadcrumbs": dict(density=1.0, gamma=0.0, scale=4.0),
    "breadcrumbs_ties": dict(density=1.0, gamma=0.0, scale=4.0),
    "della": dict(density=1.0, epsilon=0.0, scale=4.0),
    "della_linear": dict(density=1.0, epsilon=0.0, scale=4.0),
    "slerp": dict(t=4.0),
}


@pytest.mark.parametrize("dtype,big", [(torch.bfloat16, 3e38), (torch.float32, 3e38), (torch.float16, 5e4)],
                         ids=["bf16", "f32", "f16"])
@pytest.mark.parametrize("method", list(UNREPRESENTABLE))
def test_unrepresentable_result_is_an_error(method, dtype, big):
    """base + 4 tau, tau = +-10% of base (orthogonal to each row: NeuroMerging keeps it), above the
    dtype's maximum: NeurokernError naming the tensor and the dtype."""
    base = {"ok.weight": torch.ones(3, 4, dtype=dtype), "x.weight": torch.full((3, 4), big, dtype=dtype)}
    ft = {"ok.weight": torch.full((3, 4), 1.5, dtype=dtype),
          "x.weight": (big * torch.tensor([1.1, 0.9, 1.1, 0.9])).expand(3, 4).to(dtype)}
    name = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}[dtype]
    with pytest.raises(nk.NeurokernError, match=rf"tensor 'x.weight': merged value exceeds {name}'s maximum"):
        nk.merge(base, [ft], method=method, **UNREPRESENTABLE[method])
