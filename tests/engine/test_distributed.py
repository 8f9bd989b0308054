"""`torchrun --nproc-per-node 2 -m neurokern merge ...` on the CPU (gloo) and, on a machine with two
GPUs, on both GPUs (NCCL): the ranks split the shards, sum their histograms and L1 rows, and the
output is byte-identical to one process. An interrupted two-rank merge resumes in one process (or
the other way round) to the same bytes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neurokern.engine import merge_models
from neurokern.engine.settings import EngineSettings

from engine_helpers import read_dir, write_config

UNIT = 20_000
FAULTS = Path(__file__).resolve().parents[1] / "faults.py"

CASES = {
    "neuromerging": ("neuromerging", {"density": 0.2}, None),  # global trim + default lambda
    "ties_global": ("ties", {"trim_scope": "global"}, {"weight": 1.0, "density": [0.2, 0.3, 0.25]}),  # tie positions
    "dare_ties": ("dare_ties", {"seed": 5}, {"weight": 0.6, "density": 0.5}),  # per-tensor, counter-based masks
}


def torchrun(*args, nproc=2, crash=None, device="cpu", backend=None):
    """`torchrun -m neurokern merge ARGS`; with crash=KIND:N every rank ends at once at its own N-th
    event of KIND (each rank runs tests/faults.py)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NEUROKERN_DIST_BACKEND", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(NEUROKERN_MAX_UNIT_BYTES=str(UNIT), OMP_NUM_THREADS="1")
    if backend:
        env["NEUROKERN_DIST_BACKEND"] = backend
    program = [str(FAULTS), "crash", crash, "-m", "neurokern"] if crash else ["-m", "neurokern"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *program, "merge", *map(str, args), "--device", device, "--quiet"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def unit():
    """Settings of many small work units (the subprocesses get NEUROKERN_MAX_UNIT_BYTES)."""
    return EngineSettings(max_unit_bytes=UNIT)


def two_ranks_match_one(models, tmp_path, case, unit, device="cpu", rank_device="cpu", backend=None):
    """One process on `device`, then two torchrun ranks on `rank_device`: the same bytes."""
    method, params, per_model = CASES[case]
    cfg = write_config(tmp_path / "c.yaml", method, models, params, per_model, extra={"out_shard_size": "20KB"})
    result = merge_models(cfg, tmp_path / "one", device=device, settings=unit)
    assert len(result.plan.shards) >= 3 and all(result.plan.rank_shards(2))  # both ranks write shards
    run = torchrun(cfg, tmp_path / "two", device=rank_device, backend=backend)
    assert run.returncode == 0, run.stderr[-3000:]
    assert read_dir(tmp_path / "two") == read_dir(tmp_path / "one")
    assert not (tmp_path / "two.partial").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_byte_identical_to_one(models, tmp_path, unit, case):
    two_ranks_match_one(models, tmp_path, case, unit)


def test_interrupted_two_ranks_resume_in_one_process(models, tmp_path, unit):
    method, params, per_model = CASES["neuromerging"]
    cfg = write_config(tmp_path / "c.yaml", method, models, params, per_model, extra={"out_shard_size": "20KB"})
    merge_models(cfg, tmp_path / "ref", device="cpu", settings=unit)
    run = torchrun(cfg, tmp_path / "out", crash="shards:1")  # each rank stops after its first shard
    assert run.returncode != 0
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial").is_dir()
    merge_models(cfg, tmp_path / "out", device="cpu", resume=True, settings=unit)
    assert read_dir(tmp_path / "out") == read_dir(tmp_path / "ref")


def test_unknown_backend_is_a_clear_error(models, tmp_path, unit):
    cfg = write_config(tmp_path / "c.yaml", "ties", models, {}, {"weight": 1.0, "density": 0.3})
    run = torchrun(cfg, tmp_path / "out", backend="mpi")
    assert run.returncode != 0 and "exitcode  : 2" in run.stderr  # each rank's exit code, in torchrun's report
    assert "NEUROKERN_DIST_BACKEND='mpi': expected 'gloo', or 'nccl' with --device cuda" in run.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_on_one_gpu_over_gloo(models, tmp_path, unit, case):
    """Both ranks merge on cuda:0 (their histograms and L1 rows on the GPU, summed over gloo): the
    rank split of the CUDA path, on a machine with one GPU. NCCL itself needs two GPUs (below)."""
    two_ranks_match_one(models, tmp_path, case, unit, "cuda", "cuda:0", backend="gloo")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_gpus_byte_identical_to_one_gpu(models, tmp_path, unit, case):
    """Each rank merges its shards on its own GPU (LOCAL_RANK), the global thresholds and the
    NeuroMerging lambda are summed over NCCL; the output equals a one-GPU run byte for byte."""
    two_ranks_match_one(models, tmp_path, case, unit, "cuda", "cuda")
