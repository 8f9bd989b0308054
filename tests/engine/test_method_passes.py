"""A method that needs a whole-model pass, defined here and nowhere in neurokern: registered
through neurokern.methods.register, it merges through the streaming engine (one process, two
ranks, a run killed and resumed) to the bytes of a direct computation. The engine's source names
no method: the method layer tells it what to run."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import neurokern as nk
from neurokern import params
from neurokern.engine import merge_models
from neurokern.engine.settings import EngineSettings
from neurokern.errors import NeurokernError
from neurokern.methods import METHODS, Method, Pass, register

from engine_helpers import read_dir, write_config

UNIT = 20_000  # bytes of input per work unit: 14 units in 3 shards
WEIGHTS = [0.5, 1.0, 1.5]
ENGINE = Path(nk.__file__).parent / "engine"


# ---------------------------------------------------------------------------------------------
# The method: theta_0 + sum_t w_t tau_t / M, M the largest |tau_t| entry of the whole model.

def merged_tensor(base, finetuned, weights, peak):
    out = base.float()
    for w, ft in zip(weights, finetuned):
        out = out + (w / peak) * (ft.float() - base.float())
    return out.to(base.dtype)


def max_abs(models) -> torch.Tensor:
    """[1] float32: the largest |tau_t| entry of the models' merged tensors."""
    return torch.stack([(sd[n].float() - models.base[n].float()).abs().amax()
                        for n in models.names for sd in models.finetuned]).amax().reshape(1)


class GlobalMaxAbs(Pass):
    key = "max_abs"
    reads = ("max_abs",)

    def begin(self, ctx, pre):
        self.peak = torch.zeros(1, dtype=torch.float32, device=ctx.device)

    def accumulate(self, read, models):
        self.peak = torch.maximum(self.peak, max_abs(models))

    def reduce(self, read, ctx):
        ctx.max_(self.peak)

    def result(self):
        return float(self.peak)

    def dump(self, result):
        return float.hex(result)

    def load(self, data, ctx):
        return float.fromhex(data)


def resolve(p, num_tasks):
    return params.weights("method 'max_abs_scale'", p["weights"], num_tasks)


def run(models, weights, progress, pre=None):
    peak = (pre or {}).get(GlobalMaxAbs.key)
    if peak is None:  # nk.merge: the models given are the whole model
        peak = float(max_abs(models))
    return {n: merged_tensor(models.base[n], [sd[n] for sd in models.finetuned], weights, peak) for n in models.names}


METHOD = Method("max_abs_scale", {"weights": None}, resolve, run, passes=lambda weights: [GlobalMaxAbs()])


# ---------------------------------------------------------------------------------------------

@pytest.fixture
def registered():
    register(METHOD)
    yield
    del METHODS[METHOD.name]


@pytest.fixture
def unit():
    """Settings of many small work units (the subprocesses get NEUROKERN_MAX_UNIT_BYTES)."""
    return EngineSettings(max_unit_bytes=UNIT)


def load_model(folder: Path) -> dict:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def direct(models: Path) -> dict:
    base = load_model(models / "base")
    fts = [load_model(models / f"task_{t}") for t in range(3)]
    names = [n for n, b in base.items() if b.is_floating_point()]
    peak = max(float((ft[n].float() - base[n].float()).abs().max()) for ft in fts for n in names)
    return {n: merged_tensor(b, [ft[n] for ft in fts], WEIGHTS, peak) if n in names else b for n, b in base.items()}


def config(models: Path, folder: Path) -> Path:
    return write_config(folder / "c.yaml", METHOD.name, models, None, {"weight": WEIGHTS},
                        extra={"out_shard_size": "20KB"})


DRIVER = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_method_passes import METHOD
from neurokern.engine import merge_models
from neurokern.methods import register
register(METHOD)
merge_models(sys.argv[1], sys.argv[2], device="cpu")
"""


def driver(folder: Path, *args, crash=None, nproc=1):
    """The method registered in a fresh process (torchrun ranks with nproc > 1), merging; with
    crash=KIND:N the process ends at once at that event (tests/faults.py runs the driver)."""
    script = folder / "driver.py"
    script.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(NEUROKERN_MAX_UNIT_BYTES=str(UNIT), OMP_NUM_THREADS="1")
    fault = [str(Path(__file__).resolve().parents[1] / "faults.py"), "crash", crash] if crash else []
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, *fault, str(script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_registered_method_runs_its_pass_through_the_engine(models, tmp_path, registered, unit):
    result = merge_models(config(models, tmp_path), tmp_path / "out", device="cpu", settings=unit)
    assert result.passes == ["max_abs", "merge"] and len(result.plan.units) == 14
    merged = load_model(tmp_path / "out")
    expected = direct(models)
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name
    in_memory = nk.merge(load_model(models / "base"), [load_model(models / f"task_{t}") for t in range(3)],
                         method=METHOD.name, weights=WEIGHTS)
    assert all(torch.equal(in_memory[n], t) for n, t in expected.items())
    dry = merge_models(config(models, tmp_path), tmp_path / "dry", device="cpu", dry_run=True, settings=unit)
    assert "passes:  max_abs -> merge" in dry.stats["description"]


@pytest.mark.parametrize("point", ["batches:5", "saved", "batches:17"])  # in its pass, after it, in the merge
def test_a_registered_method_resumes_byte_identically(models, tmp_path, registered, unit, point):
    cfg = config(models, tmp_path)
    merge_models(cfg, tmp_path / "ref", device="cpu", settings=unit)
    killed = driver(tmp_path, cfg, tmp_path / "out", crash=point)
    assert killed.returncode == 137, killed.stderr
    saved = tmp_path / "out.partial" / ".neurokern" / "global.json"
    if point != "batches:5":
        peak = float.fromhex(json.loads(saved.read_text())["values"]["max_abs"])
        assert peak == max(float((load_model(models / f"task_{t}")[n].float() - b.float()).abs().max())
                           for t in range(3) for n, b in load_model(models / "base").items() if b.is_floating_point())
    result = merge_models(cfg, tmp_path / "out", device="cpu", resume=True, settings=unit)
    assert result.passes == (["max_abs", "merge"] if point == "batches:5" else ["merge"])
    assert read_dir(tmp_path / "out") == read_dir(tmp_path / "ref")


def test_a_registered_method_on_two_ranks_matches_one(models, tmp_path, registered, unit):
    cfg = config(models, tmp_path)
    result = merge_models(cfg, tmp_path / "one", device="cpu", settings=unit)
    assert all(result.plan.rank_shards(2))  # both ranks hold shards, so the maximum crosses ranks
    two = driver(tmp_path, cfg, tmp_path / "two", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert read_dir(tmp_path / "two") == read_dir(tmp_path / "one")


def test_register_refuses_a_taken_name_and_configs_list_registered_methods(models, tmp_path, registered):
    with pytest.raises(NeurokernError, match="a method named 'ties' is registered already"):
        register(Method("ties", {}, resolve, run))
    cfg = write_config(tmp_path / "c.yaml", "slurp", models)
    with pytest.raises(NeurokernError, match="'slurp' is not one of task_arithmetic, ties, dare_ties, dare_linear, "
                                             "breadcrumbs, breadcrumbs_ties, della, della_linear, linear, slerp, "
                                             "nuslerp, model_stock, passthrough, neuromerging, magnitude_prune, "
                                             "max_abs_scale$"):
        merge_models(cfg, tmp_path / "out", device="cpu")


# ---------------------------------------------------------------------------------------------

def test_the_engine_names_no_method():
    """No method name as an identifier or a string, no method module, no private name of
    another layer: the engine runs what the methods declare."""
    from neurokern.methods import BUILT_IN, dare, neuromerging, task_arithmetic, ties

    method_words = set(BUILT_IN) | {"dare_linear"}
    modules = {m.__name__ for m in (dare, neuromerging, task_arithmetic, ties)}
    found = []
    for path in sorted(ENGINE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Constant) and node.value in method_words:
                found.append(f"{where}: string {node.value!r}")
            elif isinstance(node, ast.Name) and node.id in method_words:
                found.append(f"{where}: name {node.id}")
            elif isinstance(node, ast.Attribute) and node.attr in method_words:
                found.append(f"{where}: attribute .{node.attr}")
            elif isinstance(node, ast.Import):
                found += [f"{where}: imports {a.name}" for a in node.names if a.name.startswith("neurokern.methods.")]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("neurokern.engine"):
                if node.module in modules or node.module.startswith("neurokern.methods."):
                    found.append(f"{where}: imports {node.module}")
                found += [f"{where}: imports {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.endswith("__")]
    assert not found, "\n".join(found)
