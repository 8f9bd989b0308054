"""The streamed merge equals nk.merge of the whole models in memory, byte for byte, for every
method and trim scope, whatever the work-unit size."""
import pytest
import torch
from safetensors.torch import load_file

import neurokern as nk
from neurokern.checkpoint import load_model
from neurokern.config import load_config
from neurokern.engine import merge_models
from neurokern.engine.settings import EngineSettings

from engine_helpers import read_dir, write_config

CASES = {
    "ties": ("ties", {"normalize": True}, {"weight": [1.0, 0.7, 0.5], "density": 0.3}),
    "ties_global": ("ties", {"trim_scope": "global"}, {"weight": 1.0, "density": [0.2, 0.3, 0.25]}),
    "ties_global_keep": ("ties", {"trim_scope": "global", "ties": "keep"}, {"density": 0.3}),
    # FusionBench's TIES: its trim count and whole-model zero sign (a pass of its own when streamed)
    "ties_fusion_bench": ("ties", {"trim_scope": "global", "ties": "keep_floor", "elect_on": "unweighted",
                                   "zero_sign": "model_majority", "normalize": False}, {"density": 0.3}),
    "ties_model_majority_tensor": ("ties", {"zero_sign": "model_majority", "consensus": "count"},
                                   {"weight": [1.0, -0.7, 0.5], "density": 0.4}),
    "dare_ties": ("dare_ties", {"seed": 3}, {"weight": 0.5, "density": 0.4}),
    "dare_linear": ("dare_linear", {}, {"weight": [0.3, 0.3, 0.4], "density": 0.5}),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.8}, {"weight": [0.3, 0.5, 0.2]}),
    "neuromerging": ("neuromerging", {"density": 0.2}, None),
    "neuromerging_tensor": ("neuromerging", {"density": 0.2, "trim_scope": "tensor"}, None),
    "neuromerging_scaled": ("neuromerging", {"density": 0.3, "lambda": 1.5, "scale_parallel": 0.5}, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_equals_in_memory(models, tmp_path, case):
    method, params, per_model = CASES[case]
    cfg_path = write_config(tmp_path / "c.yaml", method, models, params, per_model,
                            extra={"out_shard_size": "40KB"})
    result = merge_models(cfg_path, tmp_path / "out", device="cpu",
                          settings=EngineSettings(max_unit_bytes=30_000))  # many small units
    assert len(result.plan.units) > len(result.plan.shards) > 1
    cfg = load_config(cfg_path)
    expected = nk.merge(load_model(cfg.base_model), [load_model(p) for p in cfg.models], method=cfg.method, **cfg.params)
    got = load_model(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        assert torch.equal(got[name], expected[name]), name
    # one unit per shard gives the same bytes
    merge_models(cfg_path, tmp_path / "out2", device="cpu", settings=EngineSettings(max_unit_bytes=1 << 30))
    assert read_dir(tmp_path / "out") == read_dir(tmp_path / "out2")


def test_output_layout(models, tmp_path):
    cfg_path = write_config(tmp_path / "c.yaml", "ties", models, None, {"density": 0.5},
                            extra={"out_shard_size": "30KB", "dtype": "float32"})
    merge_models(cfg_path, tmp_path / "out", device="cpu")
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer_config.json", "model.safetensors.index.json", "neurokern_config.yml",
            "neurokern_manifest.json"} <= names
    assert not (tmp_path / "out.partial").exists()
    index = __import__("json").loads((out / "model.safetensors.index.json").read_text())
    for file in set(index["weight_map"].values()):
        part = load_file(out / file)  # loads with the safetensors library
        assert all(index["weight_map"][n] == file for n in part)
        for n, t in part.items():
            assert t.dtype == (torch.int64 if n == "model.position_ids" else torch.float32)
