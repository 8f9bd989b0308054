"""`neurokern merge`: example models end to end, mergekit configs, clear errors, atomic output."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import neurokern as nk
from neurokern.checkpoint import load_model
from neurokern.cli import main
from neurokern.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    folder = tmp_path_factory.mktemp("example")
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_models.py"), str(folder / "models")], check=True)
    for name in ("ties.yaml", "neuromerging.yaml"):
        shutil.copy(ROOT / "examples" / name, folder / name)
    return folder


@pytest.mark.parametrize("config", ["ties.yaml", "neuromerging.yaml"])
def test_example_configs_match_in_memory_merge(example, tmp_path, config):
    out = tmp_path / "merged"
    assert main(["merge", str(example / config), str(out), "--device", "cpu"]) == 0  # tests/engine/test_engine_cuda.py: GPU
    cfg = load_config(example / config)
    base = load_model(cfg.base_model)
    fts = [load_model(p) for p in cfg.models]
    expected = nk.merge(base, fts, method=cfg.method, **cfg.params)
    got = load_file(out / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert (out / "config.json").read_text() == (cfg.base_model / "config.json").read_text()
    assert "merge_method" in (out / "neurokern_config.yml").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_mergekit_semantics_per_method(example):
    cfg = load_config(example / "ties.yaml")
    assert (cfg.method, cfg.params["normalize"], cfg.params["weights"], cfg.params["density"]) == ("ties", True, [1.0, 1.0, 0.5], 0.2)
    raw = {"merge_method": "dare_linear", "base_model": "b", "models": [{"model": "a"}], "parameters": {"lambda": 0.5}}
    cfg = load_config(raw)
    assert cfg.method == "dare" and cfg.params == {"normalize": False, "rescale": "l1", "scale": 0.5, "weights": [1.0], "density": 1.0}
    # Per-model values win over top-level ones, which are defaults; mergekit's default density is 1.
    raw = {"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"density": 0.3}}, "c"],
           "parameters": {"density": 0.5, "weight": 2.0}}
    assert load_config(raw).params == {"normalize": True, "weights": [2.0, 2.0], "density": [0.3, 0.5]}
    raw = {"merge_method": "neuromerging", "base_model": "b", "models": [{"model": "a", "parameters": {"density": 0.3}}, "c"]}
    with pytest.raises(nk.NeurokernError, match="give a density for every model or for none"):
        load_config(raw)


def test_sharded_output_with_index(example, tmp_path):
    config = (example / "ties.yaml").read_text() + "out_shard_size: 200KB\n"
    (example / "sharded.yaml").write_text(config)
    out = tmp_path / "sharded"
    assert main(["merge", str(example / "sharded.yaml"), str(out)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    merged = load_model(out)
    assert merged.keys() == load_model(example / "models" / "base").keys()


def run_err(capsys, *args):
    assert main(["merge", *map(str, args)]) == 2
    return capsys.readouterr().err


def test_errors_are_one_clear_line(example, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((example / "ties.yaml").read_text() + "merge_mode: x\n")
    assert "unknown key(s) 'merge_mode'" in run_err(capsys, bad, tmp_path / "o1")
    bad.write_text((example / "ties.yaml").read_text().replace("task_b", "task_missing"))
    bad_copy = example / "missing.yaml"
    bad_copy.write_text(bad.read_text())
    assert "task_missing does not exist" in run_err(capsys, bad_copy, tmp_path / "o2")
    assert "cannot read config" in run_err(capsys, tmp_path / "nope.yaml", tmp_path / "o3")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert "exists and is not an empty folder" in run_err(capsys, example / "ties.yaml", tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_truncated_or_mismatched_inputs(example, tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(example / "models", models)
    cfg = (example / "ties.yaml").read_text()
    (tmp_path / "c.yaml").write_text(cfg)
    weights = models / "task_a" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:1000])  # cut inside the header
    err = run_err(capsys, tmp_path / "c.yaml", tmp_path / "o")
    assert f"{weights}: not a safetensors file, or truncated" in err
    weights.write_bytes(original[:-10])  # cut inside the data
    err = run_err(capsys, tmp_path / "c.yaml", tmp_path / "o")
    assert f"{weights}: file is truncated" in err
    state = load_file(models / "base" / "model.safetensors")
    state["model.norm.weight"] = torch.ones(3, dtype=torch.bfloat16)
    save_file(state, str(weights))
    err = run_err(capsys, tmp_path / "c.yaml", tmp_path / "o")
    assert f"tensor 'model.norm.weight': models[0] ({weights}) has shape (3,), base" in err and "has (64,)" in err
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]


def test_dry_run_writes_nothing(example, tmp_path, capsys):
    assert main(["merge", str(example / "ties.yaml"), str(tmp_path / "out"), "--dry-run"]) == 0
    assert "method: ties" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_an_error_is_one_line_whatever_its_text(monkeypatch, tmp_path, capsys):
    """Messages that quote a library's text may hold line breaks: the command prints one line."""
    import neurokern.cli as cli

    def merge_command(args):
        raise nk.NeurokernError("first line\n\n  second line\n")

    monkeypatch.setattr(cli, "merge_command", merge_command)
    assert main(["merge", str(tmp_path / "c.yaml"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "neurokern: error: first line; second line\n"


def _near_max_config(tmp_path, weights, method="task_arithmetic", parameters=""):
    """A base at 3e38 and fine-tuned models at -3e38 and +3e38 (bf16 files): float32 task vectors
    of -6e38 overflow."""
    big = torch.full((4, 8), 3e38, dtype=torch.bfloat16)
    tensors = {"base": big, "a": -big, "b": big}
    for name, t in tensors.items():
        save_file({"x.weight": t, "ok.bias": torch.ones(8, dtype=torch.bfloat16)}, str(tmp_path / f"{name}.safetensors"))
    cfg = tmp_path / f"{method}.yaml"
    models = "".join(f"  - model: {tmp_path / m}.safetensors\n    parameters: {{weight: {w}}}\n"
                     for m, w in zip("ab", weights))
    cfg.write_text(f"merge_method: {method}\nbase_model: {tmp_path / 'base'}.safetensors\nmodels:\n{models}"
                   f"dtype: bfloat16\n{parameters}")
    return cfg


def test_near_max_inputs_merge_exactly(tmp_path):
    """Task vectors beyond float32's range: the streamed merge gives the exact answer (0 here)."""
    assert main(["merge", str(_near_max_config(tmp_path, [0.5, 0.5])), str(tmp_path / "out")]) == 0
    merged = load_model(tmp_path / "out")
    assert torch.equal(merged["x.weight"], torch.zeros(4, 8, dtype=torch.bfloat16))


def _beyond_float16_config(tmp_path, method, parameters, dtype_key):
    """float32 files, the base at 6e4 and one model at 7e4 (beyond float16's 65504), and a config
    of `method` (its parameters lines) that sets `dtype_key` (dtype or out_dtype) to float16."""
    for name, value in (("base", 6e4), ("a", 7e4)):
        save_file({"x.weight": torch.full((4, 8), value), "ok.bias": torch.ones(8)}, str(tmp_path / f"{name}.safetensors"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"merge_method: {method}\nbase_model: {tmp_path / 'base'}.safetensors\nmodels:\n"
                   f"  - model: {tmp_path / 'a'}.safetensors\n{parameters}{dtype_key}: float16\n")
    return cfg


@pytest.mark.parametrize("method,parameters", [("task_arithmetic", "    parameters: {weight: 1.0}\n"),
                                               ("slerp", "parameters: {t: 1.0}\n")])
def test_result_beyond_the_output_dtype_is_one_line(tmp_path, capsys, method, parameters):
    """float32 models whose merge (7e4) fits float32 but not the config's out_dtype float16."""
    err = run_err(capsys, _beyond_float16_config(tmp_path, method, parameters, "out_dtype"), tmp_path / "out")
    assert err.count("\n") == 1 and "tensor 'x.weight': merged value exceeds float16's maximum" in err, err


def test_inputs_beyond_the_configs_dtype_say_so(tmp_path, capsys):
    """float32 files at 7e4 under dtype: float16 (which converts the inputs): the converted values
    are Inf, and the message says the conversion made them so, not that the file holds Inf."""
    cfg = _beyond_float16_config(tmp_path, "task_arithmetic", "    parameters: {weight: 1.0}\n", "dtype")
    err = run_err(capsys, cfg, tmp_path / "out")
    assert err.count("\n") == 1 and "tensor 'x.weight' of models[0]" in err, err
    assert "holds values beyond float16's range, to which the config's dtype converts the inputs" in err, err
    # a file that holds Inf itself is named as before
    save_file({"x.weight": torch.full((4, 8), float("inf")), "ok.bias": torch.ones(8)}, str(tmp_path / "a.safetensors"))
    err = run_err(capsys, cfg, tmp_path / "out")
    assert "tensor 'x.weight' of models[0]" in err and "has non-finite values (NaN or Inf)" in err, err


@pytest.mark.parametrize("method,weights,parameters", [
    ("task_arithmetic", [-0.5, 0.5], ""),
    ("linear", [-1.5, 0.5], "parameters: {normalize: false, weight: 0.0}\n"),  # the engine's check, not the method's
    ("della_linear", [-0.5, 0.5], ""),  # plain PyTorch, merged again in float64 where float32 overflows
])
def test_unrepresentable_result_is_one_line(tmp_path, capsys, method, weights, parameters):
    """A merged value above bfloat16's maximum: exit 2, one line naming the tensor, no output."""
    err = run_err(capsys, _near_max_config(tmp_path, weights, method, parameters), tmp_path / "out")
    assert err.count("\n") == 1 and "tensor 'x.weight': merged value exceeds bfloat16's maximum" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


@pytest.mark.parametrize("device,message", [
    ("bogus", "--device: device 'bogus' is not a device name"),
    pytest.param("cuda", "--device: device 'cuda', but torch sees no CUDA GPU here", marks=NO_GPU),
])
def test_bad_device_is_one_line(example, tmp_path, capsys, device, message):
    """A device torch does not know, or CUDA on a machine without a GPU: one line, not torch's traceback."""
    err = run_err(capsys, example / "ties.yaml", tmp_path / "out", "--device", device)
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
    assert main(["warmup", "--device", "bogus"]) == 2
    assert "--device: device 'bogus' is not a device name" in capsys.readouterr().err
