"""TintedModel: merged weights, lambda gradients, tint initialisation, mixed-task routing, heads of
different shapes, save / load. Models are small random Nets (tests/tint/conftest.py)."""
import json
import os

import pytest
import torch
from torch import nn
from torch.func import functional_call

from neurokern.ops import reference as ref
from neurokern.tint import TintedModel

# Mixed batches run other GEMM shapes than per-task batches: float32 results agree to rounding.
MIXED_TOL = dict(rtol=1e-5, atol=1e-6)


def _reference_params(base, fts, lam, names, coefficients):
    """Pure PyTorch: theta = theta0 + sum_t clamp(lambda)_t tau_t, differentiable w.r.t. lam."""
    b, f = dict(base.named_parameters()), [dict(m.named_parameters()) for m in fts]
    lam = lam.clamp(0, 1)
    out = {}
    for i, n in enumerate(names):
        row = lam[i] if coefficients == "layer" else lam
        out[n] = b[n].detach() + sum(row[t] * (f[t][n].detach() - b[n].detach()) for t in range(len(fts)))
    return out


@pytest.mark.parametrize("coefficients", ["layer", "task"])
def test_shared_weights_are_task_arithmetic_at_the_prior(tint_kit, coefficients):
    base, fts = tint_kit.random_models(tasks=3)
    model = TintedModel(tint_kit.Net(), base, fts, coefficients=coefficients, prior=0.3)
    assert model.lambdas.shape == ((8, 3) if coefficients == "layer" else (3,))
    shared = model.shared_parameters()
    assert list(shared) == [n for n, _ in base.named_parameters()]
    for n, p in base.named_parameters():
        want = p.double() + 0.3 * sum(dict(m.named_parameters())[n].double() - p.double() for m in fts)
        torch.testing.assert_close(shared[n].double(), want, rtol=1e-6, atol=1e-6)
    x = torch.randn(5, tint_kit.D)
    want = functional_call(tint_kit.Net(), {n: v.float() for n, v in shared.items()}, (x,))
    assert torch.equal(model(x), want)


@pytest.mark.parametrize("hidden", [32, 128])  # 128: fc2's 128 x 128 weight is merged as 4 rows
@pytest.mark.parametrize("coefficients", ["layer", "task"])
def test_lambda_gradient_matches_autograd_on_a_pytorch_merge(tint_kit, coefficients, hidden):
    """The weighted_sum op's fused backward (<dL/dtheta, tau_t>, zero outside [0, 1]) against
    autograd through a Python sum over tensors."""
    base, fts = tint_kit.random_models(tasks=3, noise=0.1, hidden=hidden)
    model = TintedModel(tint_kit.Net(hidden=hidden), base, fts, coefficients=coefficients, heads=["head"])
    if coefficients == "layer":
        assert max(model.merged.row_splits) == (1 if hidden == 32 else 4)
    g = torch.Generator().manual_seed(1)
    lam = torch.rand(model.lambdas.shape, generator=g)
    lam.view(-1)[0], lam.view(-1)[-1] = -0.1, 1.2  # outside [0, 1]: clamped, no gradient
    with torch.no_grad():
        model.lambdas.copy_(lam)
    x = torch.randn(16, tint_kit.D, generator=g)
    w = torch.randn(16, tint_kit.C, generator=g)
    (model(x, task=1) * w).sum().backward()

    lam_ref = lam.clone().requires_grad_(True)
    params = _reference_params(base, fts, lam_ref, model.merged_names, coefficients)
    params.update({n: p.detach() for n, p in fts[1].head.named_parameters(prefix="head")})
    (functional_call(tint_kit.Net(hidden=hidden), params, (x,)) * w).sum().backward()
    torch.testing.assert_close(model.lambdas.grad, lam_ref.grad, rtol=1e-4, atol=1e-5)
    outside = (lam < 0) | (lam > 1)
    assert outside.any() and torch.all(model.lambdas.grad[outside] == 0)


def test_trimmed_task_vectors(tint_kit):
    """trim=density keeps the top entries of each task vector over all merged tensors (AdaMerging++)."""
    base, fts = tint_kit.random_models(tasks=2)
    model = TintedModel(tint_kit.Net(), base, fts, prior=0.5, trim=0.2)
    names = model.merged_names
    b = [dict(base.named_parameters())[n].detach() for n in names]
    f = [dict(m.named_parameters())[n].detach() for m in fts for n in names]
    total = sum(t.numel() for t in b)
    k = [int(-(-0.2 * total // 1))] * 2
    thr, lim = ref.magnitude_threshold(b, f, k)
    shared = model.shared_parameters()
    offset = 0
    for i, n in enumerate(names):
        taus = [ref.trimmed(ref.task_vector(b[i], f[t * len(names) + i]), (thr, lim), t, 0) for t in range(2)]
        kept = [tau * ref.keep_mask(ref.task_vector(b[i], f[t * len(names) + i]), thr[t], lim[t], offset) for t, tau in enumerate(taus)]
        offset += b[i].numel()
        torch.testing.assert_close(shared[n], b[i] + 0.5 * (kept[0] + kept[1]), rtol=1e-6, atol=1e-6)


def test_tint_initialisation(tint_kit):
    base, fts = tint_kit.random_models(tasks=3)
    merged = TintedModel(tint_kit.Net(), base, fts, tint_layers=["fc2"], prior=0.3)
    layer = merged.layers["fc2"]
    assert layer.trainable and layer.same_shapes and layer.linear
    want = base.fc2.weight + 0.3 * sum(m.fc2.weight - base.fc2.weight for m in fts)
    for t in range(3):
        torch.testing.assert_close(layer.tensor("weight", t), want.detach(), rtol=1e-6, atol=1e-6)
    own = TintedModel(tint_kit.Net(), base, fts, tint_layers=["fc2"], tint_init="finetuned")
    for t in range(3):
        assert torch.equal(own.layers["fc2"].tensor("bias", t), fts[t].fc2.bias.detach())
    # The tint is not merged with lambda: it is neither a merged name nor a lambda row.
    assert "fc2.weight" not in merged.merged_names and merged.lambdas.shape == (6, 3)
    assert {id(p) for p in merged.trainable_parameters()} == {id(merged.lambdas)} | {id(p) for p in layer.parameters()}
    assert {id(p) for p in merged.tint_parameters()} == {id(p) for p in layer.parameters()} and len(layer.param_names) == 2


def _mixed(model, x, ids):
    want = torch.empty_like(model(x, ids))
    for t in ids.unique().tolist():
        rows = ids == t
        want[rows] = model(x[rows], task=t)
    return want


@pytest.mark.parametrize("layers", [["fc2"], ["norm"], ["fc1", "head"], ["fc*"]], ids=str)
def test_mixed_batch_equals_per_task_runs(tint_kit, layers):
    base, fts = tint_kit.random_models(tasks=4, noise=0.1)
    model = TintedModel(tint_kit.Net(), base, fts, tint_layers=layers, tint_init="finetuned")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, tint_kit.D, generator=g)
    ids = torch.randint(0, 4, (37,), generator=g)
    ids[:3] = torch.tensor([3, 0, 3])
    torch.testing.assert_close(model(x, ids), _mixed(model, x, ids), **MIXED_TOL)
    # Sequence inputs [B, S, D]: every position of sample b runs task_ids[b]'s tint.
    xs = torch.randn(6, 5, tint_kit.D, generator=g)
    ids_s = torch.tensor([1, 1, 0, 3, 2, 1])
    torch.testing.assert_close(model(xs, ids_s), _mixed(model, xs, ids_s), **MIXED_TOL)
    # A batch of one task gives the single-task result.
    torch.testing.assert_close(model(x, torch.full((37,), 2)), model(x, task=2), **MIXED_TOL)


def test_mixed_batch_gradients_equal_the_per_task_loop(tint_kit):
    """tinted_linear's backward (input, stacked weight, bias) and lambda's, for a mixed batch,
    against the sum of per-task runs."""
    base, fts = tint_kit.random_models(tasks=3, noise=0.1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, tint_kit.D, generator=g)
    ids = torch.randint(0, 3, (24,), generator=g)
    w = torch.randn(24, tint_kit.C, generator=g)

    def grads(mixed):
        model = TintedModel(tint_kit.Net(), base, fts, tint_layers=["fc2", "head"], tint_init="finetuned")
        xg = x.clone().requires_grad_(True)
        if mixed:
            (model(xg, ids) * w).sum().backward()
        else:
            for t in range(3):
                rows = ids == t
                (model(xg[rows], task=t) * w[rows]).sum().backward()
        out = {"x": xg.grad, "lambda": model.lambdas.grad}
        for layer in model.layers.values():
            out.update({f"{layer.name}.{k}": p.grad for k, p in layer.named_parameters()})
        return out

    mixed, loop = grads(True), grads(False)
    assert mixed.keys() == loop.keys()
    for k in mixed:
        torch.testing.assert_close(mixed[k], loop[k], rtol=1e-5, atol=1e-5, msg=k)


def test_heads_with_different_numbers_of_classes(tint_kit):
    """Per-task heads of different shapes: grouped by task, padded with -inf in a mixed batch."""
    torch.manual_seed(4)
    base = tint_kit.Net(classes=2)
    fts = []
    for classes in (2, 5, 3):
        m = tint_kit.Net(classes=classes)
        state = {k: v for k, v in base.state_dict().items() if not k.startswith("head")}
        m.load_state_dict(state, strict=False)
        fts.append(m)
    model = TintedModel(tint_kit.Net(), base, fts, heads=["head"], tint_layers=["fc2"])
    assert not model.layers["head"].same_shapes and not model.layers["head"].trainable
    assert model.heads == ["head"] and model.tint_layers == ["fc2"]
    x = torch.randn(9, tint_kit.D)
    ids = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0])
    y = model(x, ids)
    assert y.shape == (9, 5)
    for t, classes in enumerate((2, 5, 3)):
        rows = ids == t
        torch.testing.assert_close(y[rows, :classes], model(x[rows], task=t), **MIXED_TOL)
        assert torch.all(y[rows, classes:] == float("-inf"))
        assert model(x[rows], task=t).shape == (int(rows.sum()), classes)
    # fit's default teacher: the wrapped module on task t's fine-tuned weights.
    torch.testing.assert_close(model.teacher(1)(x), fts[1](x))


def test_save_load_round_trip(tmp_path, tint_kit):
    base, fts = tint_kit.random_models(tasks=3, noise=0.1)
    model = TintedModel(tint_kit.Net(), base, {"a": fts[0], "b": fts[1], "c": fts[2]},
                        tint_layers=["fc2"], heads=["head"], coefficients="layer")
    with torch.no_grad():  # move lambda and the tints off their initial values
        model.lambdas.uniform_(0, 1, generator=torch.Generator().manual_seed(5))
        for t in range(3):
            model.layers["fc2"].tensor("weight", t).add_(0.01 * torch.randn(tint_kit.H, tint_kit.H))
    model.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["shared.safetensors", "task-0.safetensors", "task-1.safetensors",
                                            "task-2.safetensors", "tinted.json"]
    meta = json.loads((tmp_path / "tinted.json").read_text())
    assert meta["tasks"] == ["a", "b", "c"] and meta["tint_layers"] == ["fc2"] and meta["heads"] == ["head"]

    loaded = TintedModel.load(str(tmp_path), tint_kit.Net())
    assert loaded.tasks == ["a", "b", "c"]
    with torch.no_grad():
        for n, v in model.shared_parameters().items():
            assert torch.equal(loaded.shared_parameters()[n], v), n
        for t in range(3):
            for k, v in model.task_state_dict(t).items():
                assert torch.equal(loaded.task_state_dict(t)[k], v), (t, k)
        x = torch.randn(11, tint_kit.D)
        ids = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 2])
        assert torch.equal(loaded(x, ids), model(x, ids))
        assert torch.equal(loaded(x, task="b"), model(x, task="b"))
    # A loaded model keeps training its tints, not lambda, and saves again identically.
    assert {id(p) for p in loaded.trainable_parameters()} == {id(p) for p in loaded.layers["fc2"].parameters()}
    loaded.save(str(tmp_path / "again"))
    again = TintedModel.load(str(tmp_path / "again"), tint_kit.Net())
    with torch.no_grad():
        assert torch.equal(again(x, ids), model(x, ids))


def test_module_buffers_are_used_and_saved(tmp_path, tint_kit):
    class WithBuffer(tint_kit.Net):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.tensor(2.0))

        def forward(self, x):
            return super().forward(x) * self.scale

    base, fts = tint_kit.random_models(tasks=2)
    net = WithBuffer()
    net.scale.fill_(3.0)
    model = TintedModel(net, base, fts, tint_layers=["head"])
    x = torch.randn(4, tint_kit.D)
    model.save(str(tmp_path))
    loaded = TintedModel.load(str(tmp_path), WithBuffer())  # its own buffer says 2.0
    with torch.no_grad():
        assert torch.equal(loaded(x, task=1), model(x, task=1))


def test_inference_reuses_the_merged_weights_until_lambda_changes(tint_kit):
    base, fts = tint_kit.random_models(tasks=2)
    model = TintedModel(tint_kit.Net(), base, fts)
    with torch.no_grad():
        first = model.shared_parameters()
        assert model.shared_parameters() is first
        model.lambdas.add_(0.1)
        second = model.shared_parameters()
    assert second is not first
    assert not torch.equal(second["fc1.weight"], first["fc1.weight"])
    assert model.shared_parameters()["fc1.weight"].requires_grad  # with grad: rebuilt, differentiable


def test_moving_the_model_moves_what_the_merge_reads(tint_kit):
    """.to() replaces the stored tensors: the merge must read the new ones, not a stale view."""
    base, fts = tint_kit.random_models(tasks=2)
    model = TintedModel(tint_kit.Net(), base, fts, tint_layers=["fc2"])
    x = torch.randn(3, tint_kit.D)
    with torch.no_grad():
        before = model(x, task=1)
        model.to(torch.bfloat16)
        shared = model.shared_parameters()
        assert all(v.dtype == torch.bfloat16 for v in shared.values())
        assert model.lambdas.dtype == torch.bfloat16
        after = model(x.bfloat16(), task=1)
    assert after.dtype == torch.bfloat16
    torch.testing.assert_close(after.float(), before, rtol=0.05, atol=0.05)


def test_named_tasks_and_patterns():
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

        def forward(self, x):
            for b in self.blocks:
                x = torch.tanh(b(x))
            return x

    torch.manual_seed(0)
    deep = Deep()
    fts = [Deep() for _ in range(2)]
    model = TintedModel(Deep(), deep, {"x": fts[0], "y": fts[1]}, tint_layers="blocks.*", coefficients="task",
                        tint_init="finetuned")
    assert model.tint_layers == ["blocks.0", "blocks.1", "blocks.2"] and model.merged_names == []
    assert model.tasks == ["x", "y"]
    inp = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(model(inp, task="y"), fts[1](inp))  # every layer is a tint: task y's own model
        assert torch.equal(model(inp, "x"), fts[0](inp))


def test_the_wrapped_module_is_left_as_it_was(tint_kit):
    """The TintedModel runs its own copy of the module (parameters and buffers shared): the module
    computes what it did, keeps its state_dict, and two TintedModels on it do not interfere."""
    base, fts = tint_kit.random_models(tasks=3, noise=0.1)
    net = tint_kit.Net()
    x = torch.randn(9, tint_kit.D)
    with torch.no_grad():
        before = net(x)
    keys = list(net.state_dict())
    first = TintedModel(net, base, fts, tint_layers=["fc2"], heads=["head"])
    second = TintedModel(net, base, fts, tint_layers=["fc1", "fc2"], tint_init="finetuned", coefficients="task")
    assert first.module is not net and first.module.fc1.weight is net.fc1.weight
    assert "forward" not in vars(net.fc2) and list(net.state_dict()) == keys
    ids = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])
    with torch.no_grad():
        assert torch.equal(net(x), before)
        alone = [TintedModel(tint_kit.Net(), base, fts, tint_layers=["fc2"], heads=["head"])(x, ids),
                 TintedModel(tint_kit.Net(), base, fts, tint_layers=["fc1", "fc2"], tint_init="finetuned",
                             coefficients="task")(x, ids)]
        for _ in range(2):
            assert torch.equal(first(x, ids), alone[0]) and torch.equal(second(x, ids), alone[1])


def _host_reads(fn) -> int:
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.name == "aten::_local_scalar_dense" for e in prof.events())


def test_a_mixed_batch_is_routed_once_per_forward(tint_kit, monkeypatch):
    """Every tinted_linear call of a forward and of its backward runs on the one routing the forward
    computed (one tinted_route call; a sequence input's rows are derived from it), and the only host
    read is the task-id check; a single-task step reads nothing."""
    import neurokern.tint.routing as routing

    calls = []
    route = routing.tinted_route
    monkeypatch.setattr(routing, "tinted_route", lambda *a: calls.append(1) or route(*a))
    base, fts = tint_kit.random_models(tasks=4, noise=0.1)
    model = TintedModel(tint_kit.Net(), base, fts, tint_layers=["fc1", "fc2", "head"], tint_init="finetuned")
    xs = torch.randn(6, 5, tint_kit.D)
    ids = torch.tensor([1, 3, 0, 3, 2, 1])
    assert _host_reads(lambda: model(xs, ids).sum().backward()) == 1
    assert len(calls) == 1
    assert _host_reads(lambda: model(xs, task=2).sum().backward()) == 0
    assert len(calls) == 1
