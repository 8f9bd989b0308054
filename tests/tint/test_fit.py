"""fit(): the schedule, determinism, input forms, default teachers."""
import torch
from torch.utils.data import TensorDataset

from neurokern.tint import TintedModel, fit


def _model(kit, **kw):
    base, fts = kit.random_models(tasks=3, noise=0.1)
    return TintedModel(kit.Net(), base, fts, **kw), fts


def _inputs(kit, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, kit.D, generator=g) for _ in range(3)]


def test_schedule_and_determinism(tint_kit):
    runs = []
    for seed in (7, 7, 8):
        model, fts = _model(tint_kit, tint_layers=["fc2"])
        history = fit(model, _inputs(tint_kit), fts, loss="pseudo_conf", steps=4, batch_size=16, seed=seed,
                      progress=False)
        runs.append((history, model.lambdas.detach().clone(), torch.cat([p.detach().flatten() for p in model.tint_parameters()])))
    (h, lam, w), (h2, lam2, w2), (h3, _, _) = runs
    # One step per task per epoch, every task once per epoch, in a shuffled order.
    assert len(h["loss"]) == 12 and len(h["task"]) == 12
    for e in range(4):
        assert sorted(h["task"][3 * e:3 * e + 3]) == [0, 1, 2]
    assert h == h2 and torch.equal(lam, lam2) and torch.equal(w, w2)
    assert h3["task"] != h["task"] or h3["loss"] != h["loss"]
    assert not torch.equal(lam, torch.full_like(lam, 0.3))  # lambda moved


def test_adamerging_task_wise_joint(tint_kit):
    model, _ = _model(tint_kit, coefficients="task", heads=["head"])
    before = [p.detach().clone() for p in model.layers["head"].parameters()]
    history = fit(model, _inputs(tint_kit), loss="entropy", steps=5, lr=1e-2, schedule="joint", progress=False)
    assert len(history["loss"]) == 5 and history["task"] == [-1] * 5
    assert model.lambdas.shape == (3,) and not torch.equal(model.lambdas.detach(), torch.full((3,), 0.3))
    for b, p in zip(before, model.layers["head"].parameters()):  # heads stay frozen
        assert torch.equal(b, p)


def test_default_teachers_and_input_forms(tint_kit):
    """teachers=None uses the fine-tuned models the TintedModel holds; inputs may be a dict keyed by
    task name and Datasets of (input, label) tuples."""
    inputs = _inputs(tint_kit)
    histories = []
    for teachers, data in [
        ("given", inputs),
        (None, {"task0": inputs[0], "task1": TensorDataset(inputs[1], torch.zeros(40)), 2: inputs[2]}),
    ]:
        model, fts = _model(tint_kit, tint_layers=["head"])
        histories.append(fit(model, data, fts if teachers else None, loss="pseudo", steps=3, batch_size=8,
                             progress=False))
    assert histories[0]["task"] == histories[1]["task"]
    torch.testing.assert_close(histories[0]["loss"], histories[1]["loss"], rtol=1e-6, atol=1e-7)


def test_progress_bar_and_short_inputs(tint_kit, capsys):
    model, fts = _model(tint_kit, tint_layers=["head"])
    tiny = [x[:5] for x in _inputs(tint_kit)]  # fewer inputs than batch_size: batches of 5
    history = fit(model, tiny, fts, steps=2, batch_size=32, progress=True)
    assert len(history["loss"]) == 6
