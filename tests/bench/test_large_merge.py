"""bench/large_merge.py and bench/first_run.py in their --smoke modes and bench/adapter_read.py
--small (tiny widths on the CPU: the scripts as the GPU run uses them), and the throughput model's
arithmetic."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import large_merge  # noqa: E402


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=400)


def test_large_merge_smoke(tmp_path):
    run = script("large_merge.py", "--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                 "--skip-mergekit", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "large-cpu-smoke.json").read_text())
    arch = large_merge.SMOKE
    syn = res["synthetic"]
    assert syn["layers"] == arch["layers"] and syn["method"] == "ties" and syn["passes"] == ["merge"]
    # every input byte of base + 3 read once; the output hashed, nothing written
    assert syn["bytes_read_GB"] == pytest.approx(4 * large_merge.model_bytes(arch) / 1e9, abs=1e-3)
    assert syn["peak_host_rss_GB"] > 0 and syn["first_digests"] and "profile" in syn
    assert res["synthetic_runs"]["ties_compile"]["layers"] == 1 and res["synthetic_runs"]["ties_probe"]["layers"] == 2
    files = res["files"]
    assert files.get("layers") == arch["layers"] and files["neurokern_ties"]["rc"] == 0, files
    assert files["mergekit"]["reason"] == "skipped (--skip-mergekit)"
    assert 0 < files["streams_at_fraction_of_read_floor"]
    assert set(res["imbalance"]) == {"shards", "1", "2", "8", "16"} and res["imbalance"]["1"] == 1.0
    md = (tmp_path / "out" / "large-model-cpu-smoke.md").read_text()
    assert "| R (GB/s) | 1 GPU | 2 GPUs | 8 GPUs | 2 nodes x 8 GPUs |" in md and "## TIES (per-tensor trim): p = 1" in md
    assert not (tmp_path / "work").exists()
    # the model again from the JSON alone: the same file
    again = script("large_merge.py", "--model-only", str(tmp_path / "out" / "large-cpu-smoke.json"), cwd=tmp_path)
    assert again.returncode == 0 and (tmp_path / "out" / "large-model-cpu-smoke.md").read_text() == md
    assert "process age at merge_models" in files["neurokern_ties"]["profile"] and files["neurokern_ties_first"]["rc"] == 0


def test_large_merge_files_only(tmp_path):
    """--synthetic-from: steps 1-2 taken from an earlier results file, only the files step runs."""
    earlier = tmp_path / "earlier.json"
    arch = large_merge.SMOKE
    synthetic = {"layers": arch["layers"], "method": "ties", "input_GBps": 1.5}
    earlier.write_text(json.dumps({"device": "cpu", "date": "2026-01-01", "model": {"arch": arch},
                                   "source_rate_GBps": 9.0, "synthetic": synthetic, "synthetic_runs": {"ties": synthetic}}))
    run = script("large_merge.py", "--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                 "--skip-mergekit", "--synthetic-from", str(earlier), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "generator alone" not in run.stdout and "probe run" not in run.stdout
    res = json.loads((tmp_path / "out" / "large-cpu-smoke.json").read_text())
    assert res["synthetic"] == synthetic and res["source_rate_GBps"] == 9.0 and "earlier.json" in res["notes"][0]
    assert res["files"]["neurokern_ties"]["rc"] == 0 and res["pipeline_over_disk"] > 0
    assert "1.50 GB/s of input" in (tmp_path / "out" / "large-model-cpu-smoke.md").read_text()
    earlier.write_text(json.dumps({"device": "another GPU", "model": {"arch": arch}}))
    wrong = script("large_merge.py", "--smoke", "--out", str(tmp_path / "out2"), "--synthetic-from", str(earlier),
                   cwd=tmp_path)
    assert wrong.returncode == 2 and "measured on another GPU" in wrong.stderr


def test_first_run_smoke(tmp_path):
    run = script("first_run.py", "--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                 "--methods", "ties", "--layers", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "first-run-cpu-smoke.json").read_text())
    ties = res["methods"]["ties"]
    for step in ("cold", "warm", "after_warmup"):
        assert ties[step]["wall_s"] > 0 and ties[step]["kernels_compiled"] == 0  # no Triton on the CPU
    assert "no CUDA GPU here" in ties["warmup"]["output"]
    assert "jit_wait_s" in ties and "left_after_warmup_s" in ties and res["full_warmup"] is None


def test_throughput_model_names_the_bound():
    I, O = 564e9, 141e9
    # one GPU at 10 GB/s on a 2 GB/s disk that also takes the output: the disk, 282 + 70.5 s + start-up
    assert large_merge.predict(I, O, 1, 1.0, 1, 1, G=10e9, R=2e9, W=2e9) == (pytest.approx(357.5), "disk")
    # the output on a disk of its own: reading bounds it
    assert large_merge.predict(I, O, 1, 1.0, 1, 1, G=10e9, R=2e9, W=2e9, same_disk=False) == (
        pytest.approx(287.0), "disk read")
    # a 20 GB/s disk: the one GPU's pipeline, 56.4 s
    assert large_merge.predict(I, O, 1, 1.0, 1, 1, G=10e9, R=20e9, W=20e9) == (pytest.approx(61.4), "GPU pipeline")
    # 8 GPUs on that disk: the disk again (70.5 s) and not the pipelines (7 s)
    assert large_merge.predict(I, O, 1, 1.0, 1, 8, G=10e9, R=20e9, W=20e9)[1] == "disk"
    # 2 nodes x 8 GPUs on a 100 Gb/s link each, three passes, imbalance 1.16: the network
    t, bound = large_merge.predict(I, O, 3, 1.16, 2, 8, G=10e9, R=1e30, W=1e30, N=12.5e9)
    assert bound == "network" and t == pytest.approx(1.16 * 3 * I / 2 / 12.5e9 + 5)
    # the 70B plan: 28 shards of at most 5 GB; one rank holds them all, 16 ranks split them unevenly
    f = large_merge.imbalance(large_merge.LLAMA_70B, large_merge.BUDGETS)
    assert f["shards"] == 28 and f[1] == 1.0 and 1.0 < f[16] < 1.3


def test_adapter_read_small(tmp_path):
    run = script("adapter_read.py", "--small", "--out", str(tmp_path), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads(next(tmp_path.glob("adapter-read-small-*.json")).read_text())
    threads = [row["threads"] for row in res["rows"]]
    assert threads[0] == 1 and threads[-1] == res["cores"] and threads == sorted(set(threads))
    assert all(row["full_model_GBps"] > 0 and row["adapter_GBps"] > 0 and row["adapter_python_path_GBps"] > 0
               and row["adapter_intra_op_threads_GBps"] > 0 for row in res["rows"])
    assert res["model"]["rank"] == 16 and res["model"]["layers"] == 2
