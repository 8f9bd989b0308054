"""nk.merge(method="neuromerging") (Gram form, C++ ops) against the exact per-neuron SVD path."""
import pytest
import torch

import neurokern as nk
from neurokern import ops
from neurokern.methods import neuromerging as NM
from neurokern.methods import reference as R
from neurokern.methods.method import columns, group
from neurokern.methods.trim import thresholds
from neurokern.models import ModelSet

from .conftest import delta_error, make_models

VARIANTS = [
    {},
    {"trim_scope": "tensor"},
    {"scale_parallel": 0.7},
    {"scale_parallel": 0.7, "parallel_basis": "neuron"},
    {"gamma": 0.8},
    {"density": 1.0},
    {"density": 0.5, "scale": 2.0},
]


@pytest.mark.parametrize("T", range(1, 9))
@pytest.mark.parametrize("params", VARIANTS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "default")
def test_fast_form_matches_svd_reference(T, params):
    base, fts = make_models(T, seed=T)
    out = nk.merge(base, fts, method="neuromerging", **params)
    ref = R.neuromerging(base, fts, **params)
    for name in base:
        assert out[name].dtype == base[name].dtype
        # Tolerance: 1e-4 of the reference's merged delta (plus output rounding, see delta_error).
        assert delta_error(out[name], ref[name], base[name]) <= 1e-4, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_storage_matches_svd_reference(dtype):
    base, fts = make_models(4, dtype=dtype, seed=11)
    out = nk.merge(base, fts, method="neuromerging", density=0.3)
    ref = R.neuromerging(base, fts, density=0.3)
    for name in base:
        o, r = out[name].double(), ref[name]
        # Output rounds to the storage dtype: at most one ulp of |ref| (2^-7 relative for bf16, 2^-10 for fp16).
        ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        spread = float((r - base[name].double()).abs().max()) if r.numel() else 0.0
        assert torch.all((o - r).abs() <= ulp * r.abs() + 1e-4 * spread), name


def test_default_lambda_is_one_over_one_minus_sigma():
    base, fts = make_models(3, seed=5)
    density = 0.2
    # sigma_t by hand: trim each task over the whole model, compare L1 norms.
    names = [n for n in base if base[n].numel()]
    sigmas = []
    for ft in fts:
        flat = torch.cat([(ft[n] - base[n]).flatten() for n in names])
        m = int(flat.numel() * (1 - density))
        kth = flat.abs().kthvalue(m).values
        sigmas.append(1 - float(flat[flat.abs() >= kth].abs().sum() / flat.abs().sum()))
    lam = 1 / (1 - max(sigmas))
    explicit = nk.merge(base, fts, method="neuromerging", density=density, scale=lam)
    default = nk.merge(base, fts, method="neuromerging", density=density)
    for name in base:
        torch.testing.assert_close(default[name], explicit[name], rtol=1e-5, atol=1e-6)
    no_trim = nk.merge(base, fts, method="neuromerging", density=1.0)
    with_one = nk.merge(base, fts, method="neuromerging", density=1.0, scale=1.0)
    for name in base:
        torch.testing.assert_close(no_trim[name], with_one[name], rtol=0, atol=0)


def test_zero_norm_neuron_is_all_orthogonal():
    base, fts = make_models(3, seed=2, shapes={"w": (6, 8)})
    base["w"][2] = 0
    out = nk.merge(base, fts, method="neuromerging", density=1.0, scale_parallel=0.5)
    ref = R.neuromerging(base, fts, density=1.0, scale_parallel=0.5)
    assert torch.isfinite(out["w"]).all()
    assert delta_error(out["w"], ref["w"], base["w"]) <= 1e-4


def test_single_task_density_one_returns_finetuned():
    # One task, nothing trimmed: the orthogonal part is tau_perp itself, lite mode drops the
    # parallel part, so the merged row is w + tau - c w.
    base, fts = make_models(1, seed=3, shapes={"w": (4, 5)})
    out = nk.merge(base, fts, method="neuromerging", density=1.0)["w"].double()
    w, tau = base["w"].double(), (fts[0]["w"] - base["w"]).double()
    c = (tau * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True)
    torch.testing.assert_close(out, w + tau - c * w, rtol=0, atol=1e-6)


def per_tensor_merge(models, p):
    """NeuroMerging with one single-tensor op call per tensor (neuron_stats, weighted_sum,
    ties_merge), the statistics of all matrices solved at once: what run()'s multi-tensor calls
    must reproduce bit for bit."""
    trims = thresholds(models, models.names, p.density, "keep", p.trim_scope)
    base, finetuned = columns(models, models.names)
    lam_orth = p.scale if p.scale is not None else NM.default_scale(ops.trim_l1(base, finetuned, trims.pair))
    point_scale = lam_orth if p.scale_parallel == 0 else (p.scale_parallel + lam_orth) / 2
    inputs = {n: (*group(models, n), *trims.of(n)) for n in models.names}
    matrices = [n for n in models.names if inputs[n][0].dim() == 2]
    stats = [ops.neuron_stats(*inputs[n]) for n in matrices]
    gram, dots, sqnorm = (torch.cat(parts) for parts in zip(*stats))
    coeffs = ops.neuromerge_coeffs(gram, dots, sqnorm, p.scale_parallel, lam_orth, p.parallel_basis, p.gamma)
    out = {}
    for name, part in zip(matrices, coeffs.split([inputs[n][0].shape[0] for n in matrices], dim=1)):
        out[name] = ops.weighted_sum(inputs[name][0], inputs[name][1], part.contiguous(), *inputs[name][2:])
    for name in models.names:
        b, fts, trim, offset = inputs[name]
        if b.dim() != 2:
            out[name] = ops.ties_merge(b, fts, [1.0] * len(fts), trim, offset, consensus="sum", normalize="count",
                                       elect_weighted=False, zero_sign="majority", scale=point_scale)
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("params", VARIANTS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "default")
def test_multi_tensor_calls_equal_per_tensor_calls(params, dtype, T, device):
    """On a GPU the multi-tensor Triton kernels against the single-tensor ones."""
    base, fts = make_models(T, dtype=dtype, seed=20 + T)
    base = {k: v.to(device) for k, v in base.items()}
    fts = [{k: v.to(device) for k, v in ft.items()} for ft in fts]
    models = ModelSet(base, fts, list(base))
    p = NM.METHOD.params(params, T)
    got = NM.run(models, p, progress=False)
    want = per_tensor_merge(models, p)
    for name in base:
        assert got[name].dtype == dtype and torch.equal(got[name], want[name]), name
