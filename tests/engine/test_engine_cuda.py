"""The streaming engine on a GPU (pinned slots, H2D on a side stream, device cache of the first
pass, D2H into pinned output slots): equal to nk.merge on the GPU, whatever the unit split and the
budget; resumable; a write error ends the merge instead of leaving it waiting for a buffer."""
import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import neurokern as nk
from neurokern.checkpoint import load_model
from neurokern.config import load_config
from neurokern.engine import merge_models, writer
from neurokern.engine.settings import EngineSettings

from engine_helpers import read_dir, within, write_config, write_matrix_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = {
    "ties": ("ties", {"normalize": True}, {"weight": [1.0, 0.7, 0.5], "density": 0.3}),
    "ties_global": ("ties", {"trim_scope": "global"}, {"weight": 1.0, "density": [0.2, 0.3, 0.25]}),
    "dare_ties": ("dare_ties", {"seed": 3}, {"weight": 0.5, "density": 0.4}),
    "neuromerging": ("neuromerging", {"density": 0.2}, None),
    "neuromerging_f32": ("neuromerging", {"density": 0.2}, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_streamed_equals_gpu_in_memory(models, tmp_path, case):
    method, params, per_model = CASES[case]
    extra = {"out_shard_size": "30KB", **({"dtype": "float32"} if case.endswith("f32") else {})}
    cfg_path = write_config(tmp_path / "c.yaml", method, models, params, per_model, extra=extra)
    # a budget that caches only part of the first pass on the device: cached and re-read units mix
    result = within(120, merge_models, cfg_path, tmp_path / "small", device="cuda", memory_budget="600KB",
                    settings=EngineSettings(max_unit_bytes=20_000))
    assert len(result.plan.units) > 3
    cfg = load_config(cfg_path)
    dtype = torch.float32 if cfg.dtype == "float32" else None
    expected = nk.merge(load_model(cfg.base_model, dtype), [load_model(p, dtype) for p in cfg.models],
                        method=cfg.method, device="cuda", **cfg.params)
    got = load_model(tmp_path / "small")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name].cpu()), name
    within(120, merge_models, cfg_path, tmp_path / "big", device="cuda",  # one unit per shard, all cached
           settings=EngineSettings(max_unit_bytes=1 << 30))
    assert read_dir(tmp_path / "small") == read_dir(tmp_path / "big")


def test_gpu_resume_after_kill(models, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", "neuromerging", models, {"density": 0.2}, None,
                       extra={"out_shard_size": "20KB"})
    merge_models(cfg, tmp_path / "ref", device="cuda")
    env = dict(os.environ, NEUROKERN_MAX_UNIT_BYTES="20000")
    faults = Path(__file__).resolve().parents[1] / "faults.py"  # the process ends at once after its first shard
    run = subprocess.run([sys.executable, str(faults), "crash", "shards:1", "-m", "neurokern", "merge", str(cfg),
                          str(tmp_path / "out"), "--device", "cuda", "--quiet"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 137, run.stderr[-2000:]
    merge_models(cfg, tmp_path / "out", device="cuda", resume=True)
    assert read_dir(tmp_path / "out") == read_dir(tmp_path / "ref")


def test_gpu_write_error_ends_the_merge(models, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", "ties", models, None, {"density": 0.3}, extra={"out_shard_size": "20KB"})
    real, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", pwrite)
    with pytest.raises(nk.NeurokernError, match="No space left on device"):
        within(120, merge_models, cfg, tmp_path / "out", device="cuda", settings=EngineSettings(max_unit_bytes=20_000))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["ties", "neuromerging"])
def test_gpu_peak_memory_within_budget(tmp_path, method):
    """24 matrices of 2 MB x 4 models (192 MB of input) under a 48 MiB device budget: the GPU
    memory the merge allocates at its peak stays within the budget (NeuroMerging's first pass
    caches units on the device only as far as the budget allows)."""
    write_matrix_models(tmp_path)
    cfg = {"merge_method": method, "base_model": str(tmp_path / "base"),
           "models": [{"model": str(tmp_path / f"t{t}"), "parameters": {"density": 0.2}} for t in range(3)],
           "dtype": "bfloat16"}
    budget = 48 * 2**20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = merge_models(cfg, tmp_path / "out", device="cuda", memory_budget=budget)
    assert result.plan.total_in_bytes >= 3 * budget and len(result.plan.units) > 1
    assert torch.cuda.max_memory_allocated() - before <= budget


def test_gpu_pinned_slots_exact_size_and_unpinned_on_close():
    """Slots are page-locked at their exact size (cudaHostRegister of a plain buffer), serve
    asynchronous copies both ways, and close() unpins them once the device is idle; a slot made
    after close (a late pinning thread) is a plain buffer."""
    from neurokern.engine.executor import _Slots

    slots = _Slots(2, 3 * 2**20 + 5, "test buffers", torch.device("cuda"))
    stop = threading.Event()
    a, b = slots.get(stop), slots.get(stop)
    assert a.numel() == b.numel() == 3 * 2**20 + 5 and a.is_pinned() and b.is_pinned()
    a.copy_(torch.arange(a.numel(), dtype=torch.int64).to(torch.uint8))
    dev = a.to("cuda", non_blocking=True)
    b.copy_(dev, non_blocking=True)
    slots.close()  # synchronizes the device first
    assert torch.equal(a, b) and not a.is_pinned() and not b.is_pinned()
    late = _Slots(1, 1000, "late", torch.device("cuda"))
    late.close()
    assert late._make() is None


def test_gpu_prepared_slots_plain_stand_in_then_pinned():
    """prepare: the first buffer is free at once and plain (no wait for a pinning), the others are
    pinned one after another; the stand-in, given back, is pinned in place and served again."""
    from neurokern.engine.executor import _Slots

    slots = _Slots(3, 2**20 + 3, "test buffers", torch.device("cuda"))
    slots.prepare()
    stop = threading.Event()
    first = slots.get(stop)
    assert first.numel() == 2**20 + 3 and not first.is_pinned()
    others = [slots.get(stop), slots.get(stop)]
    assert all(o.is_pinned() for o in others) and slots.made == 3
    first.fill_(7)
    dev = first.to("cuda", non_blocking=True)  # a copy from the plain buffer: synchronous, correct
    for slot in [first, *others]:
        slots.put(slot)
    again = [slots.get(stop) for _ in range(3)]
    assert sorted(s.data_ptr() for s in again) == sorted(s.data_ptr() for s in [first, *others])
    assert all(s.is_pinned() for s in again) and torch.equal(dev.cpu(), torch.full_like(first, 7))
    slots.close()
    assert not any(s.is_pinned() for s in again)
