"""The compiled multi-tensor finite check (neurokern/ops/triton/finite.py) against torch.isfinite
on the GPU, at a real model's shapes, and nk.merge's input check through it. Skipped without a GPU."""
import math

import pytest
import torch

import neurokern as nk
from neurokern.ops import nonfinite_later
from neurokern.ops.triton import finite

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# A TinyLlama layer, odd sizes, an empty tensor and a 0-d one.
SHAPES = [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632), (2048,), (1001, 3), (4097,), (0, 7), ()]
DTYPES = (torch.bfloat16, torch.float32, torch.float16)


def want(tensors):
    return [int(not bool(torch.isfinite(t).all())) for t in tensors]


@pytest.mark.parametrize("seed", range(4))
def test_cuda_flags_match_isfinite(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    tensors = [torch.randn(s, generator=g, device="cuda").to(DTYPES[(i + seed) % 3]) for i, s in enumerate(SHAPES * 3)]
    assert finite.nonfinite_flags(tensors).tolist() == [0] * len(tensors)
    for i, t in enumerate(tensors):
        if t.numel() and (i + seed) % 3 == 0:
            flat = t.view(-1)
            pos = int(torch.randint(0, flat.numel(), (1,), generator=g, device="cuda"))
            flat[(pos, 0, flat.numel() - 1)[i % 3]] = (math.nan, math.inf, -math.inf)[i % 3]
    got = finite.nonfinite_flags(tensors)
    assert got.is_cuda and got.tolist() == want(tensors)
    assert nonfinite_later(tensors)() == [i for i, bad in enumerate(want(tensors)) if bad]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_misaligned_views(dtype):
    storage = torch.randn(5 * 8192 + 3, device="cuda").to(dtype)
    views = [storage[1:], storage[1:9000], storage[3:20]]
    assert all(v.data_ptr() % 16 for v in views)
    assert finite.nonfinite_flags(views + [storage]).tolist() == [0, 0, 0, 0]
    storage[8192] = math.inf
    assert finite.nonfinite_flags(views + [storage]).tolist() == [1, 1, 0, 1]


@pytest.mark.parametrize("method,params", [("ties", {}), ("ties", {"trim_scope": "global"}), ("neuromerging", {}),
                                           ("neuromerging", {"trim_scope": "tensor"}), ("task_arithmetic", {}),
                                           ("linear", {}), ("magnitude_prune", {}), ("dare_ties", {}),
                                           ("breadcrumbs", {}), ("model_stock", {})])
def test_cuda_merge_names_the_tensor(method, params):
    """The check nk.merge owns (neurokern.models.FiniteCheck), its flags read without a host sync:
    ties / neuromerging / magnitude_prune find NaN / Inf in their select's candidate pass,
    task_arithmetic and linear in their weighted sum's flags of non-finite outputs, the others in a
    pass of its own: the same message every way."""
    g = torch.Generator(device="cuda").manual_seed(0)
    base = {"w": torch.randn(512, 300, generator=g, device="cuda").bfloat16(), "b": torch.zeros(300, device="cuda"),
            "v": torch.randn(70000, generator=g, device="cuda").half()}
    fts = [{k: v + 0.01 for k, v in base.items()} for _ in range(3)]
    fts[1]["w"][511, 299] = math.nan
    fts[2]["v"][40000] = -math.inf
    with pytest.raises(nk.NeurokernError, match=r"tensor 'w' of finetuned\[1\] has non-finite values"):
        nk.merge(base, fts, method=method, **params)
    fts[1]["w"][511, 299] = 0.0
    with pytest.raises(nk.NeurokernError, match=r"tensor 'v' of finetuned\[2\] has non-finite values"):
        nk.merge(base, fts, method=method, **params)
    fts[2]["v"][40000] = 0.0
    base["b"][3] = math.inf
    with pytest.raises(nk.NeurokernError, match=r"tensor 'b' of base has non-finite values"):
        nk.merge(base, fts, method=method, **params)


@pytest.mark.parametrize("method,params", [("task_arithmetic", {"weights": [4.0]}), ("linear", {"weights": [4.0], "normalize": False}),
                                           ("ties", {"density": 1.0, "scale": 4.0}),
                                           ("magnitude_prune", {"density": 1.0, "scale": 4.0}),
                                           ("neuromerging", {"density": 1.0, "scale": 4.0}), ("slerp", {"t": 4.0})])
def test_cuda_unrepresentable_result_names_the_tensor(method, params):
    """Finite bf16 inputs whose merge exceeds bf16's maximum: the merged values' check (fused
    into the weighted sum's or the TIES merge's pass, or a pass over the outputs) names the tensor."""
    big = 3e38
    base = {"ok.weight": torch.ones(3, 4, device="cuda").bfloat16(), "x.weight": torch.full((3, 4), big, device="cuda").bfloat16()}
    ft = {"ok.weight": torch.full((3, 4), 1.5, device="cuda").bfloat16(),
          "x.weight": (big * torch.tensor([1.1, 0.9, 1.1, 0.9], device="cuda")).expand(3, 4).bfloat16()}
    with pytest.raises(nk.NeurokernError, match=r"tensor 'x.weight': merged value exceeds bfloat16's maximum"):
        nk.merge(base, [ft], method=method, **params)


def test_nonfinite_later_across_devices():
    """Tensors on the CPU and the GPU in one list: each device checked on its own, the positions
    given in the list's order (TintedModel's and nk.merge's first-bad-input search rely on it)."""
    on = ["cpu", "cuda", "cpu", "cuda", "cuda", "cpu"]
    tensors = [torch.randn(257, device=d) for d in on]
    assert nonfinite_later(tensors)() == []
    tensors[4][256] = math.nan
    tensors[2][0] = -math.inf
    tensors[1][7] = math.inf
    assert nonfinite_later(tensors)() == [1, 2, 4]
    host = torch.zeros(len(tensors), dtype=torch.int32).pin_memory()  # one device's buffer: unused here
    assert nonfinite_later(tensors, host)() == [1, 2, 4]
