"""Two nodes (`torchrun --nnodes 2`), played by two torchrun agents on this machine with one CPU
rank each (gloo over the loopback): the output is byte-identical to one process; ranks whose
output folders are not one shared file system, or that read another config, stop with one clear
line before writing anything; an interrupted two-node merge resumes in one process to the same
bytes."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from neurokern.engine import merge_models
from neurokern.engine.settings import EngineSettings

from engine_helpers import read_dir, write_config

UNIT = 20_000
ROOT = Path(__file__).resolve().parents[2]
FAULTS = ROOT / "tests" / "faults.py"


@pytest.fixture
def unit():
    """Settings of many small work units (the subprocesses get NEUROKERN_MAX_UNIT_BYTES)."""
    return EngineSettings(max_unit_bytes=UNIT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(cfg, out: str, cwds: tuple[Path, Path], crash: str = None) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2 --node-rank R --nproc-per-node 1` for R = 0, 1, each in its own working
    folder (a relative `out` then names a folder of each node's own), at once. cfg: one config, or
    one per node. crash=KIND:N: each node's rank ends at once at its N-th event of KIND (tests/faults.py)."""
    cfgs = cfg if isinstance(cfg, (list, tuple)) else (cfg, cfg)
    env = {k: v for k, v in os.environ.items()
           if k not in ("NEUROKERN_DIST_BACKEND", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(NEUROKERN_MAX_UNIT_BYTES=str(UNIT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    program = [str(FAULTS), "crash", crash, "-m", "neurokern"] if crash else ["-m", "neurokern"]
    port = free_port()
    procs = []
    for node, cwd in enumerate(cwds):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
               *program, "merge", str(cfgs[node]), out, "--device", "cpu", "--quiet"]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


def neuromerging_config(models: Path, tmp_path: Path) -> Path:
    # global trim and the default lambda: histograms and L1 sums all-reduced across the nodes
    return write_config(tmp_path / "c.yaml", "neuromerging", models, {"density": 0.2}, None,
                        extra={"out_shard_size": "20KB"})


def test_two_nodes_byte_identical_to_one_process(models, tmp_path, unit):
    cfg = neuromerging_config(models, tmp_path)
    result = merge_models(cfg, tmp_path / "one", device="cpu", settings=unit)
    assert len(result.plan.shards) >= 3 and all(result.plan.rank_shards(2))  # both nodes write shards
    runs = two_nodes(cfg, str(tmp_path / "two"), (tmp_path, tmp_path))
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
    assert read_dir(tmp_path / "two") == read_dir(tmp_path / "one")
    assert not (tmp_path / "two.partial").exists()


def test_nodes_that_share_no_output_folder_stop_with_one_line(models, tmp_path, unit):
    """Node 1 cannot see the OUT_DIR.partial node 0 made (here: a relative OUT_DIR in another
    working folder, as on a node with its own disk): both stop before writing a shard."""
    cfg = neuromerging_config(models, tmp_path)
    nodes = (tmp_path / "node0", tmp_path / "node1")
    for n in nodes:
        n.mkdir()
    runs = two_nodes(cfg, "out", nodes)
    assert all(r.returncode != 0 for r in runs)
    line = ("out.partial, made by rank 0, is not visible to rank(s) 1{}: under torchrun every rank writes its "
            "shards into that folder, so OUT_DIR must be on a file system that every node mounts at the same path")
    errors = [[x for x in r.stderr.splitlines() if x.startswith("neurokern: error:")] for r in runs]
    assert len(errors[0]) == 1 and line.format("") in errors[0][0], runs[0].stderr[-3000:]
    assert len(errors[1]) == 1 and line.format(f" (this is rank 1, on {socket.gethostname()})") in errors[1][0]
    assert list(nodes[0].iterdir()) == [] and list(nodes[1].iterdir()) == []  # nothing written, nothing left


def test_nodes_with_another_config_stop_with_one_line(models, tmp_path, unit):
    """Node 1 reads another config (another density): its plan differs from rank 0's."""
    cfg = neuromerging_config(models, tmp_path)
    (tmp_path / "other").mkdir()
    other = write_config(tmp_path / "other" / "c.yaml", "neuromerging", models, {"density": 0.3}, None,
                         extra={"out_shard_size": "20KB"})
    runs = two_nodes((cfg, other), str(tmp_path / "out"), (tmp_path, tmp_path))
    assert all(r.returncode != 0 for r in runs)
    line = ("rank(s) 1{} made another plan than rank 0 (a different config, or different input files at the same "
            "paths): every node must read the same config and the same inputs")
    errors = [[x for x in r.stderr.splitlines() if x.startswith("neurokern: error:")] for r in runs]
    assert len(errors[0]) == 1 and line.format("") in errors[0][0], runs[0].stderr[-3000:]
    assert len(errors[1]) == 1 and line.format(f" (this is rank 1, on {socket.gethostname()})") in errors[1][0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_interrupted_two_node_merge_resumes_in_one_process(models, tmp_path, unit):
    cfg = neuromerging_config(models, tmp_path)
    merge_models(cfg, tmp_path / "ref", device="cpu", settings=unit)
    runs = two_nodes(cfg, str(tmp_path / "out"), (tmp_path, tmp_path), crash="shards:1")  # each stops after a shard
    assert all(r.returncode != 0 for r in runs)
    partial = tmp_path / "out.partial"
    assert not (tmp_path / "out").exists() and len(list(partial.glob("*.safetensors"))) == 2
    merge_models(cfg, tmp_path / "out", device="cpu", resume=True, settings=unit)
    assert read_dir(tmp_path / "out") == read_dir(tmp_path / "ref")
