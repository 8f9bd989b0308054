"""The mergekit methods through the streaming engine, with its guarantees: the same bytes in every
run, after a crash and --resume, and on two torchrun ranks; small work units and many output
shards, so that per-layer parameters and the passthrough stack cross unit and shard borders.
(neurokern only: mergekit need not be installed.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("transformers")

from mergekit_models import make_family  # noqa: E402

from neurokern.config import load_config  # noqa: E402

UNIT = 6000  # input bytes of a work unit: a few tensors each
FAULTS = Path(__file__).resolve().parents[1] / "faults.py"
SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
           {"value": 0.5}]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return {k: str(v) for k, v in make_family(tmp_path_factory.mktemp("family"), count=3).items()}


CONFIGS = {
    "slerp": lambda f: {"merge_method": "slerp", "base_model": f["base"], "models": [{"model": f["task_0"]}],
                        "parameters": {"t": SLERP_T}},
    "della": lambda f: {"merge_method": "della", "base_model": f["base"], "models": [
        {"model": f["task_0"], "parameters": {"weight": 1.0, "density": [0.7, 0.3]}},
        {"model": f["task_1"], "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}}]},
    "breadcrumbs_ties": lambda f: {"merge_method": "breadcrumbs_ties", "base_model": f["base"], "models": [
        {"model": f["task_0"], "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": f["task_2"], "parameters": {"weight": 0.5, "density": 0.4}}]},
    "nuslerp": lambda f: {"merge_method": "nuslerp", "models": [
        {"model": f["task_0"], "parameters": {"weight": 0.4}}, {"model": f["task_1"], "parameters": {"weight": 0.6}}],
        "parameters": {"nuslerp_flatten": False}},
    "model_stock": lambda f: {"merge_method": "model_stock", "base_model": f["base"],
                              "models": [{"model": f[f"task_{t}"]} for t in range(3)]},
    "passthrough": lambda f: {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": f["task_0"], "layer_range": [0, 3]}]},
        {"sources": [{"model": f["task_1"], "layer_range": [1, 4],
                      "parameters": {"scale": [{"filter": "down_proj", "value": 0.5}, {"value": 1.0}]}}]}]},
}


def cli(*args, crash=None, nproc=1):
    """`python -m neurokern merge ARGS` (torchrun ranks with nproc > 1); with crash=KIND:N each
    process ends at once at that event (tests/faults.py)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environment.update(NEUROKERN_MAX_UNIT_BYTES=str(UNIT), OMP_NUM_THREADS="1")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    fault = [str(FAULTS), "crash", crash] if crash else []
    return subprocess.run([sys.executable, *launcher, *fault, "-m", "neurokern", "merge", *map(str, args), "--device",
                           "cpu", "--quiet"], env=environment, capture_output=True, text=True, timeout=300)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_bytes_every_run_after_resume_and_on_two_ranks(family, tmp_path, name):
    config = CONFIGS[name](family)
    config["out_shard_size"] = "8KB"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    ref = cli(path, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    assert len(list((tmp_path / "ref").glob("model-*.safetensors"))) > 3
    again = cli(path, tmp_path / "again")
    assert again.returncode == 0 and files(tmp_path / "again") == files(tmp_path / "ref")
    killed = cli(path, tmp_path / "out", crash="shards:2")
    assert killed.returncode == 137, killed.stderr
    resumed = cli(path, tmp_path / "out", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert files(tmp_path / "out") == files(tmp_path / "ref")
    two = cli(path, tmp_path / "two", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert files(tmp_path / "two") == files(tmp_path / "ref")


def test_dry_run_prints_the_resolved_paths(family, tmp_path):
    config = CONFIGS["passthrough"](family)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    dry = cli(path, tmp_path / "out", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"base:   {family['task_0']}" in dry.stdout and "tensors: 57" in dry.stdout  # 6 layers of 9, 3 others
    assert not (tmp_path / "out").exists()
    assert load_config(path).config_updates == {"num_hidden_layers": 6}
