"""Optimizer steps on a TintedModel as fit() takes them: every task's tint is its own parameter with
its own Adam state, and lambda can be frozen while the tints train."""
import torch
import torch.nn.functional as F

from neurokern.tint import TintedModel
from neurokern.tint import merged as merged_module


def _setup(kit, **kw):
    base, fts = kit.random_models(tasks=3, noise=0.1)
    model = TintedModel(kit.Net(), base, fts, tint_layers=["fc2"], heads=["head"], **kw)  # fc2: inside the net
    x = torch.randn(16, kit.D, generator=torch.Generator().manual_seed(0))
    return model, fts, x


def _tint(model, t):
    return {k: v.clone() for k, v in model.task_state_dict(t).items() if k.startswith("fc2.")}


def test_a_step_on_one_task_leaves_the_other_tasks_tints_unchanged(tint_kit):
    """Adam on lambda and the tints, one task per step (fit's schedule): the step on task 1 must not
    move task 0's tint. With the tints of all tasks stacked in one parameter, Adam's running moments
    of task 0's rows (from its own steps) kept moving them on task 1's step."""
    model, fts, x = _setup(tint_kit)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)

    def step(t):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, task=t), fts[t](x).argmax(-1)).backward()
        optimizer.step()

    for _ in range(3):
        step(0)
    before = [_tint(model, t) for t in range(3)]
    step(1)
    after = [_tint(model, t) for t in range(3)]
    for t in (0, 2):
        for k in before[t]:
            assert torch.equal(after[t][k], before[t][k]), (t, k)
    for k in before[1]:
        assert not torch.equal(after[1][k], before[1][k]), k


def test_lambda_frozen_in_its_own_parameter_group(tint_kit, monkeypatch):
    """Two Adam groups (lambda, the tints) with lambda frozen: the shared weights are merged once
    and reused (no graph to lambda, no weighted_sum backward), lambda gets no gradient, the tints
    train; unfrozen, lambda trains again."""
    model, fts, x = _setup(tint_kit)
    tints = model.tint_parameters()
    assert len(tints) == 3 * 2 and all(p.requires_grad for p in tints)  # weight and bias per task
    assert {id(p) for p in model.trainable_parameters()} == {id(model.lambdas)} | {id(p) for p in tints}
    optimizer = torch.optim.Adam([{"params": [model.lambdas], "lr": 1e-2}, {"params": tints, "lr": 1e-2}])
    merges = []
    apply = merged_module._MergeGroups.apply
    monkeypatch.setattr(merged_module._MergeGroups, "apply", lambda *a: merges.append(1) or apply(*a))

    def step(t):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, task=t), fts[t](x).argmax(-1)).backward()
        optimizer.step()

    model.lambdas.requires_grad_(False)
    lam = model.lambdas.detach().clone()
    before = [_tint(model, t) for t in range(3)]
    for t in range(3):
        step(t)
    assert len(merges) == 1  # merged once, then reused
    shared = model.shared_parameters()
    assert shared is model.shared_parameters() and not any(v.requires_grad for v in shared.values())
    assert model.lambdas.grad is None and torch.equal(model.lambdas.detach(), lam)
    assert model.trainable_parameters() == tints
    after = [_tint(model, t) for t in range(3)]
    assert all(not torch.equal(after[t][k], before[t][k]) for t in range(3) for k in before[t])

    model.lambdas.requires_grad_(True)
    step(0)
    assert len(merges) == 2 and model.lambdas.grad is not None and not torch.equal(model.lambdas.detach(), lam)
