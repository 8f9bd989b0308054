"""The read-ahead pipeline gives every host slot back, however an iteration ends: abandoned
iterations, later passes and many small units under a tiny budget never wait forever. Each test
runs under a watchdog, so a deadlock fails the test instead of hanging the suite."""
import threading

import pytest
import torch

from neurokern.engine import merge_models
from neurokern.engine.executor import Reader, Stager, batches
from neurokern.engine.plan import HOST_SLOTS, make_plan
from neurokern.engine.settings import EngineSettings
from neurokern.engine.sources import Model
from neurokern.methods import global_trim
from neurokern.methods.global_trim import tied_position

from engine_helpers import read_dir, within, write_config

WATCHDOG_S = 60


def _setup(models):
    base = Model(models / "base", "base_model")
    fts = [Model(models / f"task_{t}", f"models[{t}]") for t in range(3)]
    p = make_plan(base, 4, None, 40_000, max_unit_bytes=20_000)
    assert len(p.units) > 2 * HOST_SLOTS
    return p, Reader(p, [base] + fts, torch.device("cpu")), Stager(torch.device("cpu"), None)


def test_abandoned_iterations_give_their_slots_back(models):
    p, reader, stager = _setup(models)

    def run():
        # More abandoned iterations than there are slots, each holding a batch when closed: with a
        # slot lost per abandoned iteration the full pass below would wait forever.
        for _ in range(2 * HOST_SLOTS + 1):
            it = batches(p, p.units, reader, stager)
            next(it)
            it.close()
        for _ in range(HOST_SLOTS + 1):
            for batch in batches(p, p.units[:1], reader, stager):  # left by `return` in callers
                break
        seen = [b.unit.index for b in batches(p, p.units, reader, stager)]
        assert seen == [u.index for u in p.units]
        return reader.slots.free.qsize(), reader.slots.made

    try:
        free, made = within(WATCHDOG_S, run)
        assert free == made <= HOST_SLOTS  # every slot is back once the pass ended
    finally:
        reader.close()


def test_error_in_consumer_gives_slots_back(models):
    p, reader, stager = _setup(models)

    def run():
        for _ in range(2 * HOST_SLOTS):
            with pytest.raises(KeyError):
                for batch in batches(p, p.units, reader, stager):
                    raise KeyError("consumer failed")
        return sum(1 for _ in batches(p, p.units, reader, stager))

    try:
        assert within(WATCHDOG_S, run) == len(p.units)
    finally:
        reader.close()


@pytest.mark.parametrize("method,params,per_model", [
    # exact-k global trim: the tie positions are found by re-reading single units (the case that
    # used to strand one slot per task and hang the merge pass)
    ("ties", {"trim_scope": "global"}, {"weight": 1.0, "density": [0.2, 0.3, 0.25]}),
    ("neuromerging", {"density": 0.2}, None),  # histogram, boundary, l1 and merge passes
])
def test_multi_pass_merges_under_tiny_budget(models, tmp_path, monkeypatch, method, params, per_model):
    located = []
    monkeypatch.setattr(global_trim, "tied_position", lambda *a: located.append(a) or tied_position(*a))
    cfg = write_config(tmp_path / "c.yaml", method, models, params, per_model, extra={"out_shard_size": "20KB"})
    small = within(WATCHDOG_S, merge_models, cfg, tmp_path / "small", device="cpu", memory_budget="200KB")
    assert len(small.plan.units) > 2 * HOST_SLOTS  # more units than slots, in every pass
    assert len(located) == (3 if method == "ties" else 0)  # a re-read per task for its last tied entry
    assert small.plan.estimate(False)["host"] <= 200_000
    within(WATCHDOG_S, merge_models, cfg, tmp_path / "big", device="cpu")
    assert read_dir(tmp_path / "small") == read_dir(tmp_path / "big")


def test_profile_report(models, tmp_path, capsys):
    """NEUROKERN_PROFILE=1: merge_models prints where the time went, per section, on stderr."""
    cfg = write_config(tmp_path / "c.yaml", "neuromerging", models, {"density": 0.2}, None)
    merge_models(cfg, tmp_path / "off", device="cpu", settings=EngineSettings())
    assert capsys.readouterr().err == ""
    merge_models(cfg, tmp_path / "on", device="cpu", fsync=True,  # durable: the same bytes, fsync timed
                 settings=EngineSettings(profile=True))
    err = capsys.readouterr().err
    sections = [line.strip() for line in err.splitlines() if line.strip().startswith("[")]
    assert sections == ["[start-up]", "[histogram]", "[boundary]", "[l1]", "[merge]", "[end]"], err
    for key in ("headers + plan", "wait for reads", "read busy (any in flight)", "kernels, first unit",
                "writer: fsync", "writer drain", "process age at the end"):
        assert key in err, (key, err)
    assert read_dir(tmp_path / "on") == read_dir(tmp_path / "off")


def test_trace_timeline(models, tmp_path, capsys):
    """NEUROKERN_TRACE=FILE: every timed block lands in a Chrome trace, one row per thread, inside
    the process's lifetime; the profile table stays off."""
    import json
    from neurokern.engine import timing
    cfg = write_config(tmp_path / "c.yaml", "neuromerging", models, {"density": 0.2}, None)
    trace = tmp_path / "trace.json"
    merge_models(cfg, tmp_path / "out", device="cpu", settings=EngineSettings(trace=str(trace)))
    assert capsys.readouterr().err == ""
    events = json.loads(trace.read_text())["traceEvents"]
    age = timing._process_age() * 1e6
    blocks = [e for e in events if e["ph"] == "X"]
    assert {e["name"] for e in blocks} >= {"headers + plan", "read", "wait for reads", "writer: pwrite + hash"}
    assert all(0 < e["ts"] and e["dur"] >= 0 and e["ts"] + e["dur"] <= age for e in blocks)
    passes = [e["name"] for e in events if e["ph"] == "i"]
    assert passes == ["section start-up", "section histogram", "section boundary", "section l1",
                      "section merge", "section end"]
    threads = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert "MainThread" in threads and len(threads) > 2  # readers and the writer's pool too
    written = sum(e["args"].get("bytes", 0) for e in blocks if e["name"] == "writer: pwrite + hash")
    shards = list((tmp_path / "out").glob("*.safetensors"))
    data = sum(f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") for f in shards)
    assert shards and written == data  # every tensor byte, headers aside
    assert not list(tmp_path.glob("*.tmp"))


def test_manifest_digests_match_the_files(models, tmp_path, monkeypatch):
    """The digests recorded while writing (pieces hashed in parallel, several per tensor here)
    equal the ones read back."""
    import json
    from neurokern.engine import writer
    from neurokern.engine.writer import DIGEST, MANIFEST, file_digest
    monkeypatch.setattr(writer, "WRITE_PIECE", 1000)
    cfg = write_config(tmp_path / "c.yaml", "ties", models, {"density": 0.3}, None, extra={"out_shard_size": "20KB"})
    result = merge_models(cfg, tmp_path / "out", device="cpu")
    shards = json.loads((tmp_path / "out" / MANIFEST).read_text())["shards"]
    assert len(shards) == len(result.plan.shards) > 1
    for shard in result.plan.shards:
        assert shards[shard.file][DIGEST] == file_digest(tmp_path / "out" / shard.file, shard)


def test_torch_profiler_shows_the_engine_blocks(models, tmp_path):
    """Every timed block is a record_function, profile and trace off: a torch.profiler trace of the
    caller shows the main thread's; with profile_all_threads, the reader and writer threads' too."""
    from torch._C._profiler import _ExperimentalConfig
    cfg = write_config(tmp_path / "c.yaml", "neuromerging", models, {"density": 0.2}, None)
    main_thread = ("config", "headers + plan", "wait for reads", "finite check", "publish")
    for all_threads in (False, True):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    experimental_config=_ExperimentalConfig(profile_all_threads=all_threads)) as prof:
            merge_models(cfg, tmp_path / f"out-{all_threads}", device="cpu", settings=EngineSettings())
        counts = {e.key: e.count for e in prof.key_averages()}
        for block in main_thread + (("read", "writer: pwrite + hash") if all_threads else ()):
            assert counts.get(f"neurokern: {block}", 0) > 0, (block, sorted(k for k in counts if "neurokern" in k))
    assert counts["neurokern: headers + plan"] == 1
    assert read_dir(tmp_path / "out-False") == read_dir(tmp_path / "out-True")


def test_readers_run_torch_serially_and_leave_the_callers_thread_count(models, tmp_path):
    """The reader threads' torch ops stay on their own thread (one intra-op thread each); after
    the merge, the calling thread and threads started later have the count the caller had."""
    from neurokern.engine import executor

    before = torch.get_num_threads()
    seen = []

    class Probe(Model):
        def read_into(self, info, out, begin=0, end=None):
            seen.append(torch.get_num_threads())
            return super().read_into(info, out, begin, end)

    p, _, stager = _setup(models)
    reader = executor.Reader(p, [Model(models / "base", "base_model")]
                             + [Probe(models / f"task_{t}", f"models[{t}]") for t in range(3)], torch.device("cpu"))
    try:
        within(WATCHDOG_S, lambda: [None for _ in batches(p, p.units, reader, stager)])
    finally:
        reader.close()
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
    later = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [before]


def test_derived_tensors_are_formed_by_a_few_readers_at_once(models, monkeypatch):
    """Reads of derived tensors (formed on the reader's thread) run at most DERIVED_READERS at a
    time, and give the bytes the stored tensors hold."""
    import time

    from neurokern.engine import executor
    from neurokern.engine.adapters import Cast
    from neurokern.engine.sources import TensorInfo

    monkeypatch.setattr(executor, "DERIVED_READERS", 2)
    lock, running, most = threading.Lock(), [0], [0]

    class SlowCast(Cast):
        def read(self, out, begin, end):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.01)
            super().read(out, begin, end)
            with lock:
                running[0] -= 1

    class Derived(Model):
        """A model whose every tensor is derived: its stored self, read through SlowCast."""
        def __init__(self, path, label):
            super().__init__(path, label)
            self.tensors = {n: TensorInfo(n, i.dtype, i.shape, i.file, -1, i.nbytes, SlowCast(i, i.dtype))
                            for n, i in self.tensors.items()}

    p, _, stager = _setup(models)
    tuned = [Derived(models / f"task_{t}", f"models[{t}]") for t in range(3)]
    reader = executor.Reader(p, [Model(models / "base", "base_model")] + tuned, torch.device("cpu"),
                             EngineSettings(read_threads=8))
    try:
        got = within(WATCHDOG_S, lambda: [{n: t.clone() for n, t in b.finetuned[0].items()}
                                          for b in batches(p, p.units, reader, stager)])
    finally:
        reader.close()
    assert most[0] == 2
    want = Model(models / "task_0", "models[0]")
    for unit in got:
        for name, t in unit.items():
            info = want.tensors[name]
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
            want.read_into(info, buf)
            assert torch.equal(t.contiguous().view(-1).view(torch.uint8), buf), name
