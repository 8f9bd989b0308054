"""mergekit configs run unchanged: its keys, its per-method defaults and precedence, the base model
listed among the models (mergekit skips it), int8_mask, tokenizer_source: base, relative paths."""
import json

import pytest
import torch
import yaml

import neurokern as nk
from neurokern.checkpoint import load_model
from neurokern.cli import main
from neurokern.config import load_config

MERGEKIT_TIES = """\
models:
  - model: base            # mergekit configs often list the base model too
  - model: task_0
    parameters:
      density: 0.5
      weight: 0.5
  - model: task_1
    parameters:
      density: 0.3
      weight: 0.3
  - model: task_2
    parameters:
      density: 0.4
      weight: 0.2
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
tokenizer_source: base
"""

MERGEKIT_DARE = """\
merge_method: dare_ties
base_model: ./base
models:
  - model: ./task_0
    parameters: {weight: 0.4, density: 0.6}
  - model: ./task_1
    parameters: {weight: 0.3, density: 0.6}
  - model: ./task_2
    parameters: {weight: 0.3, density: 0.6}
parameters:
  int8_mask: true
  lambda: 0.9
dtype: float32
out_shard_size: 25KB
"""


@pytest.mark.parametrize("text,method,params", [
    (MERGEKIT_TIES, "ties", {"normalize": True, "weights": [0.5, 0.3, 0.2], "density": [0.5, 0.3, 0.4]}),
    (MERGEKIT_DARE, "dare_ties", {"normalize": False, "rescale": "l1", "weights": [0.4, 0.3, 0.3], "density": 0.6,
                                  "scale": 0.9}),
])
def test_mergekit_config_runs_unchanged(models, tmp_path, text, method, params):
    cfg_path = models / f"mk-{method}.yaml"  # relative paths resolve against the YAML's folder
    cfg_path.write_text(text)
    cfg = load_config(cfg_path)
    assert (cfg.method, cfg.params) == (method, params)
    assert cfg.models == [models / f"task_{t}" for t in range(3)]
    out = tmp_path / "out"
    assert main(["merge", str(cfg_path), str(out), "--device", "cpu", "--quiet"]) == 0
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    expected = nk.merge(load_model(cfg.base_model, dtype), [load_model(p, dtype) for p in cfg.models],
                        method=cfg.method, **cfg.params)
    got = load_model(out)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert (out / "tokenizer_config.json").is_file() and (out / "config.json").is_file()
    assert yaml.safe_load((out / "neurokern_config.yml").read_text()) == yaml.safe_load(text)  # the config, echoed
    manifest = json.loads((out / "neurokern_manifest.json").read_text())
    assert manifest["method"] == method and manifest["tensors"] == len(expected)
