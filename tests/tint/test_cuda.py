"""TintedModel on a GPU (the Triton weighted_sum and tinted_linear kernels) against the same model
on the CPU (the C++ ops). Skipped without a GPU."""
import pytest
import torch
import torch.nn.functional as F

from neurokern.tint import TintedModel, fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 GEMMs without TF32 on both devices (tinted_linear follows the same setting)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _pair(kit, hidden=128, **kw):
    base, fts = kit.random_models(tasks=4, noise=0.1, hidden=hidden)
    cpu = TintedModel(kit.Net(hidden=hidden), base, fts, **kw)
    gpu = TintedModel(kit.Net(hidden=hidden).to(DEV), base, fts, device=DEV, **kw)
    return cpu, gpu, fts


@pytest.mark.parametrize("coefficients", ["layer", "task"])
def test_mixed_batch_and_gradients_match_the_cpu(tint_kit, coefficients):
    cpu, gpu, _ = _pair(tint_kit, tint_layers=["fc2", "head"], coefficients=coefficients, tint_init="finetuned")
    g = torch.Generator().manual_seed(0)
    lam = torch.rand(cpu.lambdas.shape, generator=g)
    with torch.no_grad():
        cpu.lambdas.copy_(lam)
        gpu.lambdas.copy_(lam)
    x = torch.randn(300, tint_kit.D, generator=g)
    ids = torch.randint(0, 4, (300,), generator=g)
    w = torch.randn(300, tint_kit.C, generator=g)
    (cpu(x, ids) * w).sum().backward()
    y = gpu(x.to(DEV), ids.to(DEV))
    (y * w.to(DEV)).sum().backward()
    torch.testing.assert_close(y.cpu(), cpu(x, ids).detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.lambdas.grad.cpu(), cpu.lambdas.grad, rtol=1e-3, atol=1e-4)
    for name in ("fc2", "head"):
        for (k, p), (_, q) in zip(cpu.layers[name].named_parameters(), gpu.layers[name].named_parameters()):
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-4, msg=k)
    with torch.no_grad():  # a mixed batch equals per-task runs on the GPU too
        xs, ids_s = x.to(DEV), ids.to(DEV)
        for t in range(4):
            rows = ids_s == t
            torch.testing.assert_close(gpu(xs, ids_s)[rows], gpu(xs[rows], task=t), rtol=1e-5, atol=1e-6)


def test_bfloat16_model(tint_kit):
    base, fts = tint_kit.random_models(tasks=3, noise=0.1, hidden=128)
    to_bf16 = [{k: v.to(torch.bfloat16) for k, v in m.state_dict().items()} for m in [base] + fts]
    net = tint_kit.Net(hidden=128).to(DEV, torch.bfloat16)
    model = TintedModel(net, to_bf16[0], to_bf16[1:], tint_layers=["fc2"], heads=["head"], device=DEV)
    x = torch.randn(64, tint_kit.D, device=DEV, dtype=torch.bfloat16)
    ids = torch.arange(64, device=DEV) % 3
    y = model(x, ids)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    F.cross_entropy(y.float(), torch.zeros(64, dtype=torch.long, device=DEV)).backward()
    assert torch.isfinite(model.lambdas.grad).all() and model.lambdas.grad.abs().sum() > 0
    with torch.no_grad():
        ref = torch.cat([model(x[ids == t], task=t) for t in range(3)]).float()
        order = torch.cat([torch.nonzero(ids == t).flatten() for t in range(3)])
        mixed = model(x, ids).float()[order]  # tinted_linear against F.linear, each rounded to bfloat16
        assert (mixed - ref).norm() <= 2e-2 * ref.norm()


def test_fit_and_save_load_across_devices(tmp_path, tint_kit):
    cpu, gpu, fts = _pair(tint_kit, tint_layers=["fc2"], heads=["head"])
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(50, tint_kit.D, generator=g) for _ in range(4)]
    h_cpu = fit(cpu, inputs, loss="pseudo_conf", steps=3, batch_size=16, progress=False)
    h_gpu = fit(gpu, [x.to(DEV) for x in inputs], loss="pseudo_conf", steps=3, batch_size=16, progress=False)
    assert h_gpu["task"] == h_cpu["task"]  # the same seed: the same task order and batches
    torch.testing.assert_close(h_gpu["loss"], h_cpu["loss"], rtol=1e-2, atol=1e-3)
    # Adam's first steps move each lambda by about lr whatever its gradient's size: a gradient near
    # zero whose sign differs between the devices may end up 2 lr apart after 12 steps.
    torch.testing.assert_close(gpu.lambdas.detach().cpu(), cpu.lambdas.detach(), rtol=0, atol=0.05)
    gpu.save(str(tmp_path))
    loaded = TintedModel.load(str(tmp_path), tint_kit.Net(hidden=128))  # onto the CPU
    x = torch.randn(20, tint_kit.D, generator=g)
    ids = torch.arange(20) % 4
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, ids), gpu(x.to(DEV), ids.to(DEV)).cpu(), rtol=1e-4, atol=1e-5)
