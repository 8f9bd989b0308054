"""`neurokern warmup`: the cases it runs (a config's method, dtype, task count and distinct tensor
shapes; or every method, dtype and task count), run through the engine and the in-memory path on
the CPU (the plumbing; on a GPU the same runs compile the Triton kernels), and the command line
without a GPU: one line, exit 0; bad arguments: one error, exit 2."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neurokern.engine import kernel_warmup
from neurokern.errors import NeurokernError

from engine_helpers import write_config

ROOT = Path(__file__).resolve().parents[2]


def test_a_config_gives_one_case_of_its_distinct_shapes(models, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", "ties", models, {}, {"weight": 1.0, "density": 0.3}, extra={"dtype": "float32"})
    (case,) = kernel_warmup.warmup_cases(cfg)
    assert (case["method"], case["tasks"], case["dtype"], case["out_dtype"]) == ("ties", 3, "float32", "float32")
    shapes = {(shape, dtype) for _, shape, dtype in case["shapes"]}
    assert len(shapes) == len(case["shapes"])  # one tensor per distinct shape and dtype
    from neurokern.engine.sources import Model
    base = Model(models / "base", "base")
    assert shapes == {(i.shape, i.dtype) for i in base.tensors.values()}
    assert len(shapes) < len(base.tensors)
    report = kernel_warmup.compile_kernels([case], "cpu", report=lambda line: None)  # no file of the models opened
    assert [c["method"] for c in report["cases"]] == ["ties"] and report["compiled"] == 0


def test_without_a_config_every_method_dtype_and_task_count():
    cases = kernel_warmup.warmup_cases()
    from neurokern.methods import METHODS
    counts = {"slerp": [1], "nuslerp": [2], "model_stock": list(range(2, 9)), "passthrough": [0]}
    expected = {(m, d, t) for m in METHODS if METHODS[m].kernels
                for d in ("float32", "bfloat16", "float16") for t in counts.get(m, range(1, 9))}
    assert {(c["method"], c["dtype"], c["tasks"]) for c in cases} == expected and len(cases) == len(expected)
    assert {m for m in METHODS if not METHODS[m].kernels} == {"breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
    ties = next(c for c in cases if c["method"] == "ties")
    assert ties["config"]["parameters"] == {"density": 0.2}  # trimmed, as nk.merge's default
    dare = next(c for c in cases if c["method"] == "dare")
    assert dare["config"]["merge_method"] == "dare_linear"  # the name a config gives it
    copy = next(c for c in cases if c["method"] == "passthrough")
    assert copy["config"] == {"merge_method": "passthrough", "models": [copy["paths"][0]], "parameters": {"scale": 0.5}}
    linear = next(c for c in cases if c["method"] == "linear")
    assert linear["config"]["parameters"] == {"weight": 1.0}  # the base_model's weight a config must give
    narrow = kernel_warmup.warmup_cases(methods=["dare_ties", "neuromerging"], dtypes=["float16"], tasks=[1, 2])
    assert [(c["method"], c["dtype"], c["tasks"]) for c in narrow] == [
        ("dare_ties", "float16", 1), ("dare_ties", "float16", 2), ("neuromerging", "float16", 1),
        ("neuromerging", "float16", 2)]
    lines = []
    report = kernel_warmup.compile_kernels(narrow, "cpu", report=lines.append)
    assert len(report["cases"]) == 4 and len(lines) == 4 and "neuromerging   float16 T=2" in lines[-1]
    with pytest.raises(NeurokernError, match="unknown method 'nope'"):
        kernel_warmup.warmup_cases(methods=["nope"])


def test_mergekit_methods_run_or_are_skipped_with_a_line():
    """The mergekit methods: those with kernels run through the engine and nk.merge's path (here on
    the CPU) at the task counts they take; the others are left out, one line each saying why."""
    asked = ["linear", "slerp", "nuslerp", "model_stock", "passthrough", "breadcrumbs", "della_linear"]
    cases = kernel_warmup.warmup_cases(methods=asked, dtypes=["bfloat16"], tasks=[1, 2])
    assert [(c["method"], c["tasks"]) for c in cases] == [("linear", 1), ("linear", 2), ("slerp", 1), ("nuslerp", 2),
                                                          ("model_stock", 2), ("passthrough", 0)]
    assert kernel_warmup.skipped(methods=asked, tasks=[1, 2]) == [
        "slerp: task count(s) 2 skipped (method 'slerp': interpolates the base with exactly one other model; got 2)",
        "nuslerp: task count(s) 1 skipped (method 'nuslerp': interpolates exactly two models (besides the base); got 1)",
        "model_stock: task count(s) 1 skipped (method 'model_stock': needs at least 2 fine-tuned models besides the "
        "base; got 1)",
        "breadcrumbs: skipped, plain PyTorch: no Triton kernel to compile",
        "della_linear: skipped, plain PyTorch: no Triton kernel to compile"]
    report = kernel_warmup.compile_kernels(cases, "cpu", report=lambda line: None)
    assert [(c["method"], c["tasks"]) for c in report["cases"]] == [(c["method"], c["tasks"]) for c in cases]


def test_a_slices_config_warms_a_copy_of_its_base(models, tmp_path):
    """A passthrough's slices: the kernels of a scaled copy of one model of the base's shapes."""
    import yaml
    config = {"merge_method": "passthrough", "dtype": "float32", "parameters": {"scale": 0.5},
              "slices": [{"sources": [{"model": str(models / "base"), "layer_range": [0, 1]}]},
                         {"sources": [{"model": str(models / "task_0"), "layer_range": [1, 2]}]}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(config))
    (case,) = kernel_warmup.warmup_cases(tmp_path / "s.yaml")
    assert case["config"] == {"merge_method": "passthrough", "models": [str(models / "base")],
                              "parameters": {"scale": 0.5}, "dtype": "float32"}
    assert (case["method"], case["tasks"], case["paths"]) == ("passthrough", 0, [models / "base"])
    report = kernel_warmup.compile_kernels([case], "cpu", report=lambda line: None)
    assert [c["method"] for c in report["cases"]] == ["passthrough"]


def neurokern(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-m", "neurokern", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the line of a machine without a GPU")
def test_without_a_gpu_one_line_and_exit_0(models, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", "neuromerging", models)
    for args in ([], [str(cfg)], ["--tasks", "2,3", "--dtype", "bfloat16"]):
        run = neurokern("warmup", *args)
        assert run.returncode == 0 and run.stderr == ""
        assert run.stdout == ("neurokern warmup: no CUDA GPU here; Triton compiles kernels for a GPU only, so there "
                              "is nothing to do\n")


def test_bad_arguments_are_one_error(models, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", "ties", models)
    cases = [(["--tasks", "9"], "argument --tasks: task counts go from 1 to 8 (the kernels' range); got '9'"),
             (["--tasks", "two"], "argument --tasks: expected task counts such as 1-8, 3 or 2,4; got 'two'"),
             (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
             ([str(cfg), "--tasks", "2"], "--method, --dtype and --tasks are for a warm-up without a config"),
             (["--method", "nope"], "neurokern: error: unknown method 'nope'; choose from task_arithmetic, ties"),
             ([str(tmp_path / "missing.yaml")], f"neurokern: error: cannot read config {tmp_path / 'missing.yaml'}"),
             (["--device", "cpu"], "neurokern: error: --device cpu: the warm-up compiles GPU kernels; give a CUDA device")]
    (tmp_path / "bad-model.yaml").write_text(f"merge_method: ties\nbase_model: {tmp_path / 'nothing'}\nmodels: [x]\n")
    cases.append(([str(tmp_path / "bad-model.yaml")], f"neurokern: error: model path {tmp_path / 'nothing'} does not exist"))
    for args, message in cases:
        run = neurokern("warmup", *args)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)
        assert run.stdout == ""
        assert len([x for x in run.stderr.splitlines() if "error" in x]) == 1, run.stderr


def test_cached_kernels_reads_triton_cache_entries(tmp_path, monkeypatch):
    """Triton's cache: a folder per compiled kernel holding <name>.cubin (CUDA) or .hsaco (ROCm) next
    to its metadata; other folders (a half-written entry, the group files) are no kernel."""
    for entry, files in {"a1": ["_ties_kernel.cubin", "_ties_kernel.json", "__grp___ties_kernel.json"],
                         "b2": ["_nonfinite_kernel.hsaco", "_nonfinite_kernel.json"], "c3": ["x.json"]}.items():
        (tmp_path / entry).mkdir()
        for f in files:
            (tmp_path / entry / f).write_text("")
    (tmp_path / "stray.txt").write_text("")
    assert kernel_warmup.cached_kernels(str(tmp_path)) == {"a1": "_ties_kernel", "b2": "_nonfinite_kernel"}
    assert kernel_warmup.cached_kernels(str(tmp_path / "missing")) == {}
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    pytest.importorskip("triton")
    assert kernel_warmup.cache_dir() == str(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_warmup_compiles_once_into_the_cache(models, tmp_path, monkeypatch):
    """On a GPU: the first warm-up of a config compiles kernels into an empty TRITON_CACHE_DIR, a
    second finds them all there; a merge afterwards compiles nothing either."""
    cfg = write_config(tmp_path / "c.yaml", "ties", models, {}, {"weight": 1.0, "density": 0.3})
    (tmp_path / "cache").mkdir()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    first = neurokern("warmup", str(cfg), "--quiet")
    second = neurokern("warmup", str(cfg), "--quiet")
    merged = neurokern("merge", str(cfg), str(tmp_path / "out"), "--quiet")
    assert first.returncode == 0 and second.returncode == 0 and merged.returncode == 0, first.stderr + merged.stderr
    count = int(first.stdout.splitlines()[-1].split()[1])
    assert count > 0 and f"into {tmp_path / 'cache'}" in first.stdout
    assert second.stdout.splitlines()[-1].startswith("compiled 0 kernels")
    assert len(kernel_warmup.cached_kernels(str(tmp_path / "cache"))) == count  # the merge added none
