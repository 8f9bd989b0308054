"""fit(): the schedule, determinism, input forms, default teachers."""
import pytest
import torch
from torch.utils.data import TensorDataset

from neurokern.errors import NeurokernError
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


def test_lambda_and_tints_have_their_own_learning_rates(tint_kit):
    """Adam's first step moves every parameter with a gradient by exactly its group's learning rate
    (m / sqrt(v) = ±1): lambda by lr_lambda, the tints by lr."""
    model, fts = _model(tint_kit, tint_layers=["fc2"])
    lam0 = model.lambdas.detach().clone()
    tint0 = [p.detach().clone() for p in model.trainable_parameters() if p is not model.lambdas]
    fit(model, _inputs(tint_kit), fts, loss="pseudo", steps=1, lr=1e-2, lr_lambda=1e-4, schedule="joint",
        progress=False)
    steps = [((model.lambdas.detach() - lam0).abs(), 1e-4)]
    steps += [((p.detach() - before).abs(), 1e-2)
              for before, p in zip(tint0, [p for p in model.trainable_parameters() if p is not model.lambdas])]
    for step, lr in steps:
        # |g| / (|g| + eps) < 1 only for gradients near Adam's eps (1e-8)
        moved = step[step > 0]
        assert moved.numel() > step.numel() / 2 and moved.max() <= lr * (1 + 1e-6)
        assert (moved > 0.999 * lr).float().mean() > 0.95


def test_frozen_lambda_trains_only_the_tints(tint_kit):
    model, fts = _model(tint_kit, tint_layers=["fc2"])
    model.lambdas.requires_grad_(False)
    lam0 = model.lambdas.detach().clone()
    tint0 = model.task_state_dict(0)["fc2.weight"].clone()
    fit(model, _inputs(tint_kit), fts, loss="pseudo", steps=2, progress=False)
    assert torch.equal(model.lambdas.detach(), lam0)
    assert not torch.equal(model.task_state_dict(0)["fc2.weight"], tint0)


def test_nothing_to_train_is_a_clear_error(tint_kit):
    model, fts = _model(tint_kit)
    model.lambdas.requires_grad_(False)
    with pytest.raises(NeurokernError, match="nothing to train"):
        fit(model, _inputs(tint_kit), fts, steps=1, progress=False)


def test_teacher_runs_once_per_input_row(tint_kit):
    """The teacher's outputs are kept after the first pass over a task's inputs: 10 rows in batches
    of 4 run the teacher on 4 + 4 + 4 rows (the third batch tops up from the second pass) and never
    again, and the losses equal those of a teacher run every step."""
    model, fts = _model(tint_kit, tint_layers=["head"])
    seen = [0, 0, 0]

    def counting(t):
        def run(x):
            seen[t] += x.shape[0]
            return fts[t](x)
        return run

    inputs = [x[:10] for x in _inputs(tint_kit)]
    history = fit(model, inputs, [counting(t) for t in range(3)], loss="pseudo", steps=6, batch_size=4, progress=False)
    assert seen == [12, 12, 12]
    again, _ = _model(tint_kit, tint_layers=["head"])
    reference = fit(again, inputs, fts, loss="pseudo", steps=6, batch_size=4, progress=False)
    torch.testing.assert_close(history["loss"], reference["loss"], rtol=1e-6, atol=1e-7)


def test_callback_records_a_learning_curve(tint_kit):
    model, fts = _model(tint_kit, tint_layers=["head"])
    calls = []

    def curve(epoch):
        calls.append(epoch)
        return {"lambda_mean": float(model.coefficients_now().mean())} if epoch else None

    history = fit(model, _inputs(tint_kit), fts, steps=7, callback=curve, callback_every=3, progress=False)
    assert calls == [0, 3, 6, 7]
    assert [r["epoch"] for r in history["callback"]] == [0, 3, 6, 7]
    assert "lambda_mean" not in history["callback"][0] and "lambda_mean" in history["callback"][-1]


@pytest.mark.parametrize("tint", ["head", "fc2"])
def test_fit_inside_autocast_trains_the_tints(tint_kit, tint):
    """Autocast keeps its bf16 copy of a leaf parameter for the whole region: a fit run inside one
    must still see its tints move. Its losses follow the float32 run's (to bf16's precision) and
    the curve's forward sees the trained tints, where a stale copy keeps the loss at its start."""
    inputs = _inputs(tint_kit, n=64)
    runs = []
    for enabled in (False, True):
        model, fts = _model(tint_kit, tint_layers=[tint])
        model.lambdas.requires_grad_(False)
        x = inputs[0][:8]
        outputs = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            history = fit(model, inputs, fts, loss="pseudo", steps=40, lr=1e-2, batch_size=16, progress=False,
                          callback=lambda epoch: outputs.append(model(x, task=0).detach().float()),
                          callback_every=20)
        runs.append((history["loss"], outputs))
    (fp32_loss, fp32_out), (bf16_loss, bf16_out) = runs
    first, last = sum(fp32_loss[:6]) / 6, sum(fp32_loss[-6:]) / 6
    assert last < 0.7 * first  # the tints learn
    assert abs(sum(bf16_loss[-6:]) / 6 - last) < 0.05 * first
    for a, b in zip(fp32_out, bf16_out):
        torch.testing.assert_close(b, a, rtol=0.1, atol=0.15)
    assert (bf16_out[-1] - bf16_out[0]).abs().max() > 1.0  # the trained tints, not their first values
