"""Bad input: NeurokernError (a ValueError) naming the offending thing and what was expected."""
import pytest
import torch
from torch import nn

from neurokern import NeurokernError
from neurokern.tint import TintedModel, fit


@pytest.fixture
def setup(tint_kit):
    base, fts = tint_kit.random_models(tasks=3)
    model = TintedModel(tint_kit.Net(), base, fts, tint_layers=["fc2"])
    return tint_kit, base, fts, model


def test_task_id_out_of_range(setup):
    kit, _, _, model = setup
    x = torch.randn(4, kit.D)
    with pytest.raises(NeurokernError, match=r"task_ids\[2\] = 3 is out of range for 3 tasks"):
        model(x, torch.tensor([0, 1, 3, 2]))
    with pytest.raises(NeurokernError, match=r"task_ids\[0\] = -1 is out of range"):
        model(x, torch.tensor([-1, 1, 0, 2]))
    with pytest.raises(NeurokernError, match="task 5 is out of range for 3 tasks"):
        model(x, task=5)
    with pytest.raises(NeurokernError, match="unknown task 'nope'"):
        model(x, task="nope")


def test_bad_task_ids(setup):
    kit, _, _, model = setup
    x = torch.randn(4, kit.D)
    with pytest.raises(NeurokernError, match="3 entries for an input of shape"):
        model(x, torch.tensor([0, 1, 2]))
    with pytest.raises(NeurokernError, match="1-D integer tensor"):
        model(x, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(NeurokernError, match="pass task="):
        model(x)
    with pytest.raises(NeurokernError, match="either task="):
        model(x, torch.tensor([0, 1, 2, 0]), task=1)


def test_layer_pattern_matching_nothing(tint_kit):
    base, fts = tint_kit.random_models(tasks=2)
    with pytest.raises(NeurokernError, match=r"tint_layers: 'fc3' matches no module of Net; expected .*'fc1'"):
        TintedModel(tint_kit.Net(), base, fts, tint_layers=["fc3"])
    with pytest.raises(NeurokernError, match=r"heads: 'classifier\*' matches no module"):
        TintedModel(tint_kit.Net(), base, fts, heads=["classifier*"])
    seq = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))
    with pytest.raises(NeurokernError, match="has no parameters"):
        TintedModel(seq, None, [seq], tint_layers=["1.0"])
    with pytest.raises(NeurokernError, match="lies inside"):
        TintedModel(seq, None, [seq], tint_layers=["1", "1.1"])


def test_models_that_do_not_fit(tint_kit):
    base, fts = tint_kit.random_models(tasks=2)
    with pytest.raises(NeurokernError, match="finetuned is empty"):
        TintedModel(tint_kit.Net(), base, [])
    partial = {k: v for k, v in fts[1].state_dict().items() if k != "fc2.bias"}
    with pytest.raises(NeurokernError, match=r"finetuned\['task1'\] has no tensor 'fc2.bias'"):
        TintedModel(tint_kit.Net(), base, [fts[0], partial])
    other = tint_kit.Net(classes=7)
    with pytest.raises(NeurokernError, match=r"finetuned\['task1'\]\['head.weight'\] has shape .* heads="):
        TintedModel(tint_kit.Net(), base, [fts[0], other])
    with pytest.raises(NeurokernError, match="coefficients must be 'layer' or 'task'"):
        TintedModel(tint_kit.Net(), base, fts, coefficients="model")
    with pytest.raises(NeurokernError, match=r"prior must be a number in \[0, 1\]"):
        TintedModel(tint_kit.Net(), base, fts, prior=1.5)


def test_tint_layer_that_never_runs():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    net = Attn()
    model = TintedModel(Attn(), net, [Attn(), Attn()], tint_layers=["mha.out_proj"])
    with pytest.raises(NeurokernError, match=r"\['mha.out_proj'\] never ran as modules"):
        model(torch.randn(2, 3, 4), task=0)

    class Skips(nn.Module):  # calls only its first layer
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.a(x)

    model = TintedModel(Skips(), Skips(), [Skips()], tint_layers=["b"])
    with pytest.raises(NeurokernError, match=r"\['b'\] never ran"):
        model(torch.randn(1, 2), task=0)


def test_fit_teachers_missing_for_a_task(setup):
    kit, _, fts, model = setup
    inputs = [torch.randn(8, kit.D) for _ in range(3)]
    with pytest.raises(NeurokernError, match=r"teachers has 2 entries for 3 tasks \(none for 'task2'\)"):
        fit(model, inputs, fts[:2], steps=1, progress=False)
    with pytest.raises(NeurokernError, match="teachers: task 'task1' has no teacher"):
        fit(model, inputs, [fts[0], None, fts[2]], steps=1, progress=False)
    with pytest.raises(NeurokernError, match="teachers: task 'task2' has no teacher"):
        fit(model, inputs, {"task0": fts[0], "task1": fts[1]}, steps=1, progress=False)
    with pytest.raises(NeurokernError, match="unknown tasks"):
        fit(model, inputs, {"task0": fts[0], "task1": fts[1], "task2": fts[2], "extra": fts[0]}, steps=1,
            progress=False)


def test_fit_empty_inputs(setup):
    kit, _, fts, model = setup
    with pytest.raises(NeurokernError, match=r"inputs_per_task\['task1'\] is empty"):
        fit(model, [torch.randn(8, kit.D), torch.empty(0, kit.D), torch.randn(8, kit.D)], fts, progress=False)
    with pytest.raises(NeurokernError, match="inputs_per_task has 0 entries for 3 tasks"):
        fit(model, [], fts, progress=False)
    with pytest.raises(NeurokernError, match="inputs_per_task has no inputs for task 'task2'"):
        fit(model, {"task0": torch.randn(8, kit.D), "task1": torch.randn(8, kit.D)}, fts, progress=False)


def test_fit_bad_options(setup):
    kit, _, fts, model = setup
    inputs = [torch.randn(8, kit.D) for _ in range(3)]
    with pytest.raises(NeurokernError, match="loss must be one of 'entropy', 'pseudo', 'pseudo_conf'"):
        fit(model, inputs, fts, loss="kl", progress=False)
    with pytest.raises(NeurokernError, match="batch_size must be a positive integer"):
        fit(model, inputs, fts, batch_size=0, progress=False)
    with pytest.raises(NeurokernError, match="schedule must be"):
        fit(model, inputs, fts, schedule="random", progress=False)
    wrong = [kit.Net(classes=6) for _ in range(3)]
    with pytest.raises(NeurokernError, match="teacher's have"):
        fit(model, inputs, wrong, steps=1, progress=False)


def test_loaded_model_errors(tmp_path, setup):
    kit, _, _, model = setup
    with pytest.raises(NeurokernError, match="holds no tinted.json"):
        TintedModel.load(str(tmp_path), kit.Net())
    model.save(str(tmp_path))
    loaded = TintedModel.load(str(tmp_path), kit.Net())
    with pytest.raises(NeurokernError, match="pass teachers="):
        fit(loaded, [torch.randn(4, kit.D)] * 3, steps=1, progress=False)


@pytest.mark.parametrize("where,name,message", [
    ("base", "fc1.weight", r"base\['fc1.weight'\] has non-finite values"),
    ("task1", "fc1.bias", r"finetuned\['task1'\]\['fc1.bias'\] has non-finite values"),
    ("task2", "fc2.weight", r"finetuned\['task2'\]\['fc2.weight'\] has non-finite values"),  # a tint layer
])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(tint_kit, where, name, message, bad):
    base, fts = tint_kit.random_models(tasks=3)
    base, fts = base.state_dict(), [m.state_dict() for m in fts]
    state = base if where == "base" else fts[int(where[-1])]
    state[name] = state[name].clone()
    state[name].view(-1)[-1] = bad
    with pytest.raises(NeurokernError, match=message):
        TintedModel(tint_kit.Net(), base, fts, tint_layers=["fc2"])


def test_fit_refuses_non_finite_inputs_and_a_diverged_loss(setup):
    kit, _, fts, model = setup
    inputs = [torch.randn(8, kit.D) for _ in range(3)]
    inputs[1][2, 0] = float("nan")
    with pytest.raises(NeurokernError, match=r"inputs_per_task\['task1'\] holds NaN or Inf"):
        fit(model, inputs, fts, steps=1, progress=False)
    huge = [torch.randn(8, kit.D) * 1e30 for _ in range(3)]
    with pytest.raises(NeurokernError, match=r"fit: the loss became non-finite at step \d+ of 6 .*lower lr"):
        fit(model, huge, fts, steps=2, lr=1e30, progress=False)


def test_bad_device_is_named(tint_kit):
    base, fts = tint_kit.random_models(tasks=2)
    with pytest.raises(NeurokernError, match="TintedModel: device 'bogus' is not a device name"):
        TintedModel(tint_kit.Net(), base, fts, tint_layers=["fc2"], device="bogus")

