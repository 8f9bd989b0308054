"""neurokern's methods inside mergekit (neurokern.integrations.mergekit): mergekit's own
`mergekit-yaml` entry point, run with the methods registered (`python -m
neurokern.integrations.mergekit`), gives the bytes `neurokern merge` gives for the same merge."""
import subprocess
import sys

import pytest
import torch
import yaml

pytest.importorskip("mergekit.merge")

from mergekit_models import make_family  # noqa: E402

from neurokern.checkpoint import load_model  # noqa: E402
from neurokern.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return {k: str(v) for k, v in make_family(tmp_path_factory.mktemp("family"), count=3).items()}


def models(family, per_model):
    return [{"model": family[f"task_{t}"], "parameters": p} for t, p in enumerate(per_model)]


# (plugin method, its parameters) and the `neurokern merge` config that means the same
CASES = {
    "ties": (("neurokern_ties", {"lambda": 0.9}), ("ties", {"lambda": 0.9}),
             [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.5}, {"weight": 0.7, "density": 0.2}]),
    "dare_ties": (("neurokern_dare_ties", {"seed": 3}), ("dare_ties", {"seed": 3}),
                  [{"weight": 1.0, "density": 0.4}, {"weight": 0.6, "density": 0.4}]),
    "dare_linear": (("neurokern_dare_linear", {"rescale": False}), ("dare_linear", {"rescale": False}),
                    [{"weight": 0.5, "density": 0.6}, {"weight": 0.5, "density": 0.6}]),
    "neuromerging": (("neurokern_neuromerging", {"lambda": 1.3}),
                     ("neuromerging", {"scale": 1.3, "trim_scope": "tensor"}),
                     [{"density": 0.3}, {"density": 0.2}, {"density": 0.25}]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mergekit_yaml_with_a_neurokern_method_matches_neurokern_merge(family, tmp_path, case):
    (plugin, plugin_params), (method, params), per_model = CASES[case]
    mk_config = {"merge_method": plugin, "base_model": family["base"], "models": models(family, per_model),
                 "parameters": plugin_params, "dtype": "float32"}
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(mk_config, sort_keys=False))
    run = subprocess.run([sys.executable, "-m", "neurokern.integrations.mergekit", str(tmp_path / "mk.yaml"),
                          str(tmp_path / "mk"), "--device", "cpu", "--no-write-model-card"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    nk_config = {"merge_method": method, "base_model": family["base"], "models": models(family, per_model),
                 "parameters": params}
    (tmp_path / "nk.yaml").write_text(yaml.safe_dump(nk_config, sort_keys=False))
    assert main(["merge", str(tmp_path / "nk.yaml"), str(tmp_path / "nk"), "--device", "cpu", "--quiet"]) == 0
    got, want = load_model(tmp_path / "mk"), load_model(tmp_path / "nk")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_register_is_idempotent_and_mergekit_lists_the_methods():
    from mergekit.merge_methods import registry

    from neurokern.integrations import mergekit as plugin

    names = plugin.register()
    assert plugin.register() == names
    listed = [m.spec.name for m in registry.registered_methods()]
    assert all(listed.count(n) == 1 for n in names)
    assert registry.get("neurokern_ties").spec.pretty_name == "TIES (neurokern)"


def test_unequal_dare_densities_are_one_clear_error(family, tmp_path):
    config = {"merge_method": "neurokern_dare_ties", "base_model": family["base"],
              "models": models(family, [{"weight": 1.0, "density": 0.4}, {"weight": 1.0, "density": 0.5}])}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "neurokern.integrations.mergekit", str(tmp_path / "c.yaml"),
                          str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "neurokern's DARE takes one density for all models; got [0.4, 0.5]" in run.stderr


@pytest.mark.parametrize("plugin", ["neurokern_ties", "neurokern_dare_linear"])
def test_non_finite_input_is_an_error_inside_mergekit(family, tmp_path, plugin):
    """The check nk.merge runs (found by TIES's trim, by a pass of its own for DARE) runs inside
    mergekit too: a NaN is an error naming the tensor, never a merged NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    poisoned = tmp_path / "task_1"
    shutil.copytree(family["task_1"], poisoned)
    file = sorted(poisoned.glob("*.safetensors"))[0]
    state = load_file(file)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)
    state[name] = state[name].clone()
    state[name].view(-1)[3] = float("nan")
    save_file(state, str(file), metadata={"format": "pt"})
    entries = [{"model": family["task_0"], "parameters": {"weight": 1.0, "density": 0.5}},
               {"model": str(poisoned), "parameters": {"weight": 1.0, "density": 0.5}}]
    config = {"merge_method": plugin, "base_model": family["base"], "models": entries, "dtype": "float32"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run = subprocess.run([sys.executable, "-m", "neurokern.integrations.mergekit", str(tmp_path / "c.yaml"),
                          str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and f"tensor {name!r} of finetuned[1] has non-finite values" in run.stderr, \
        run.stderr[-2000:]
