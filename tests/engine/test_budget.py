"""Memory: the plan fits the budget (smaller budgets give smaller work units), a budget too small for
the largest tensor is a clear error, the process's peak memory stays near the budget on inputs
several times larger, and --dry-run prints the plan and the estimate without writing anything."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from neurokern.cli import main
from neurokern.engine import merge_models

from engine_helpers import write_config, write_matrix_models, write_model


@pytest.mark.parametrize("method,params,per_model", [
    ("ties", None, {"density": 0.3}),
    ("neuromerging", {"density": 0.2}, None),
])
def test_plan_fits_budget(models, tmp_path, method, params, per_model):
    cfg = write_config(tmp_path / "c.yaml", method, models, params, per_model, extra={"dtype": "float32"})
    units = []
    for budget in (250_000, 500_000, 2**20, 8 * 2**30):
        result = merge_models(cfg, tmp_path / f"out-{budget}", device="cpu", memory_budget=budget, dry_run=True)
        est = result.plan.estimate(cuda=False)
        assert est["host"] <= budget
        units.append(len(result.plan.units))
        assert f"(budget {budget / 1e3:.2f} kB)" in result.stats["description"] or budget >= 1e6
        assert not (tmp_path / f"out-{budget}").exists()
    assert units == sorted(units, reverse=True) and units[0] > units[-1] == 1
    # on a GPU the device budget bounds the staged units, the host budget the read-ahead
    result = merge_models(cfg, tmp_path / "o", device="cpu", memory_budget=300_000, dry_run=True)
    assert result.plan.estimate(cuda=True)["device"] > 0


def test_budget_too_small_names_the_largest_tensor(models, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", "ties", models, None, {"density": 0.3})
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--device", "cpu", "--memory-budget", "50KB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "memory budget too small: the largest tensor, 'model.embed_tokens.weight' (BF16[80, 32] in " in err
    assert "raise --memory-budget" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--device", "cpu", "--memory-budget", "lots"]) == 2
    assert "expected a size such as 5GB or 500MiB" in capsys.readouterr().err


def test_budget_too_small_names_the_option_that_set_it(models, tmp_path, capsys):
    """--host-memory-budget is the limit: the old message said to raise --memory-budget."""
    cfg = write_config(tmp_path / "c.yaml", "ties", models, None, {"density": 0.3})
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--device", "cpu", "--memory-budget", "1GB",
                 "--host-memory-budget", "50KB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs host ~" in err and err.endswith("; raise --host-memory-budget\n"), err


def test_dry_run_prints_plan_and_writes_nothing(models, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", "neuromerging", models, {"density": 0.2}, None,
                       extra={"out_shard_size": "20KB"})
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--device", "cpu", "--dry-run", "--memory-budget", "1MB"]) == 0
    out = capsys.readouterr().out
    for text in ("method: neuromerging", f"model:  {models / 'task_2'}", "(shards of at most 20.00 kB)",
                 "tensors: 25 (24 merged, 1 copied from the base)", "output 53.63 kB in 3 shard(s)",
                 "passes:  histogram -> boundary -> l1 -> merge", "memory:  host ~", "(budget 1.00 MB)"):
        assert text in out, (text, out)
    assert list(tmp_path.iterdir()) == [cfg]
    # the dry run reads every header: bad inputs fail it as they would fail the merge
    cfg.write_text(cfg.read_text().replace(str(models / "task_1"), str(models / "nope")))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--device", "cpu", "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import neurokern as nk

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    root, budget = sys.argv[1], int(sys.argv[2])
    cfg = {"merge_method": "ties", "base_model": root + "/base",
           "models": [{"model": root + f"/t{i}", "parameters": {"density": 0.3}} for i in range(3)],
           "out_shard_size": "20MB"}
    small = dict(cfg, base_model=root + "/small/base",
                 models=[{"model": root + f"/small/t{i}", "parameters": {"density": 0.3}} for i in range(3)])
    nk.merge_models(small, root + "/warm", device="cpu")  # code paths and allocator warmed up
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current RSS
    except OSError as exc:
        print(json.dumps({"skip": f"cannot reset the peak RSS: {exc}"}))
        sys.exit(0)
    before = status("VmRSS")
    result = nk.merge_models(cfg, root + "/out", device="cpu", memory_budget=budget)
    after = status("VmHWM")
    print(json.dumps({"growth": after - before, "estimate": result.plan.estimate(False)["host"],
                      "units": len(result.plan.units), "input": result.plan.total_in_bytes}))
""")


def test_peak_memory_stays_near_budget(tmp_path):
    """4 models of 48 MB (192 MB of input) under a 64 MiB budget: the peak RSS grows by less than
    the budget (an in-memory merge holds all 192 MB plus the output)."""
    base = write_matrix_models(tmp_path)
    tiny = {n: w[:8, :8].contiguous() for n, w in list(base.items())[:2]}
    write_model(tmp_path / "small" / "base", tiny)
    for t in range(3):
        write_model(tmp_path / "small" / f"t{t}", {n: w + 0.01 for n, w in tiny.items()})
    budget = 64 * 2**20
    # A fixed mmap threshold makes glibc return freed large blocks at once, so the peak RSS measures
    # what the engine holds rather than how malloc's arenas happen to keep freed memory.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path), str(budget)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in stats:
        pytest.skip(stats["skip"])
    assert stats["input"] >= 3 * budget and stats["units"] > 1
    assert stats["estimate"] <= budget
    assert stats["growth"] < budget, stats
