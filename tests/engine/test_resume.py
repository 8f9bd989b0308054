"""A merge killed at any point (SIGKILL-like: os._exit, no cleanup) leaves no OUT_DIR, and
`--resume` finishes it byte-identically to an uninterrupted run. The kill comes from tests/faults.py,
which runs the command with the engine's functions wrapped, so the points are deterministic:
inside each streaming pass, right after the pre-pass results are saved, mid-shard, after whole
shards, after the folder is complete, and between removing the state and the rename."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neurokern.cli import main
from neurokern.engine import merge_models, plan
from neurokern.engine.settings import EngineSettings

from engine_helpers import make_models, read_dir, write_config

UNIT = 20_000  # bytes of input per work unit: 14 units in 3 shards
FAULTS = Path(__file__).resolve().parents[1] / "faults.py"

CONFIGS = {
    # global trim + default lambda: histogram, boundary and l1 passes before the merge pass
    "neuromerging": ("neuromerging", {"density": 0.2}, None),
    # exact-k global trim: the saved state holds tie limits found by re-reading units
    "ties_global": ("ties", {"trim_scope": "global"}, {"weight": 1.0, "density": [0.2, 0.3, 0.25]}),
    # FusionBench's TIES: histogram, boundary and the whole model's vote (ModelMajority) before the merge
    "ties_fusion_bench": ("ties", {"trim_scope": "global", "ties": "keep_floor", "elect_on": "unweighted",
                                   "zero_sign": "model_majority", "normalize": False}, {"density": 0.3}),
}
POINTS = [
    ("neuromerging", "batches:3"),  # histogram pass (14 units a pass)
    ("neuromerging", "batches:17"),  # boundary pass
    ("neuromerging", "batches:31"),  # l1 pass
    ("neuromerging", "saved"),
    ("neuromerging", "batches:45"),  # merge pass, third unit
    ("neuromerging", "tensors:1"),  # inside the first shard
    ("neuromerging", "shards:1"),
    ("neuromerging", "publish"),
    ("neuromerging", "rename"),
    ("ties_global", "saved"),
    ("ties_global", "tensors:17"),
    ("ties_fusion_bench", "batches:31"),  # the vote pass
    ("ties_fusion_bench", "saved"),
]


@pytest.fixture(scope="module")
def configs(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    out = {}
    for name, (method, params, per_model) in CONFIGS.items():
        cfg = write_config(folder / f"{name}.yaml", method, models, params, per_model,
                           extra={"out_shard_size": "20KB"})
        result = merge_models(cfg, folder / f"{name}-ref", device="cpu", settings=EngineSettings(max_unit_bytes=UNIT))
        assert (len(result.plan.units), len(result.plan.shards)) == (14, 3)  # POINTS count on these
        out[name] = (cfg, read_dir(folder / f"{name}-ref"))
    return out


def cli(*args, crash=None):
    """`python -m neurokern merge ARGS`; with crash=KIND:N it ends at once at that event (tests/faults.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["NEUROKERN_MAX_UNIT_BYTES"] = str(UNIT)
    fault = [str(FAULTS), "crash", crash] if crash else []
    return subprocess.run([sys.executable, *fault, "-m", "neurokern", "merge", *map(str, args), "--device", "cpu",
                           "--quiet"], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("config,point", POINTS, ids=[f"{c}-{p}" for c, p in POINTS])
def test_resume_after_kill_is_byte_identical(configs, tmp_path, monkeypatch, config, point):
    cfg, expected = configs[config]
    out = tmp_path / "merged"
    killed = cli(cfg, out, crash=point)
    assert killed.returncode == 137, killed.stderr
    assert not out.exists()  # output appears only by the final rename
    partial = tmp_path / "merged.partial"
    assert partial.is_dir()

    monkeypatch.setenv("NEUROKERN_MAX_UNIT_BYTES", str(UNIT))
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet", "--resume"]) == 0
    assert read_dir(out) == expected
    assert not partial.exists()


def test_resume_skips_finished_shards(configs, tmp_path, monkeypatch):
    cfg, expected = configs["neuromerging"]
    out = tmp_path / "merged"
    assert cli(cfg, out, crash="shards:2").returncode == 137
    done = sorted(p.name for p in (tmp_path / "merged.partial").glob("*.safetensors"))
    assert len(done) == 2
    stamps = {n: (tmp_path / "merged.partial" / n).stat().st_mtime_ns for n in done}
    monkeypatch.setenv("NEUROKERN_MAX_UNIT_BYTES", str(UNIT))
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet", "--resume"]) == 0
    assert {n: (out / n).stat().st_mtime_ns for n in done} == stamps  # not rewritten
    assert read_dir(out) == expected


def test_rerun_without_resume_or_with_other_config_is_refused(configs, tmp_path, capsys):
    cfg, _ = configs["neuromerging"]
    other, _ = configs["ties_global"]
    out = tmp_path / "merged"
    assert cli(cfg, out, crash="shards:1").returncode == 137
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds an interrupted merge; pass --resume" in err
    assert main(["merge", str(other), str(out), "--device", "cpu", "--quiet", "--resume"]) == 2
    assert "different config or different inputs" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "merged.partial").is_dir()


def test_resume_redoes_a_recorded_shard_whose_bytes_differ(configs, tmp_path, monkeypatch, capsys):
    """Without --fsync a power loss can keep a shard's done record but lose its bytes: --resume
    checks every recorded shard against its sha256, writes again the ones that differ and says so
    (the old code said nothing)."""
    cfg, expected = configs["neuromerging"]
    out = tmp_path / "merged"
    killed = cli(cfg, out, crash="shards:1")
    assert killed.returncode == 137, killed.stderr
    partial = tmp_path / "merged.partial"
    (done,) = [p for p in partial.glob("*.safetensors")]
    data = bytearray(done.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    done.write_bytes(bytes(data))
    monkeypatch.setenv("NEUROKERN_MAX_UNIT_BYTES", str(UNIT))
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet", "--resume"]) == 0
    assert capsys.readouterr().err == (f"neurokern: resume: {done}: its bytes differ from the recorded digest; "
                                       "writing it again\n")
    assert read_dir(out) == expected


def test_fsync_output_is_the_same(configs, tmp_path, monkeypatch):
    cfg, expected = configs["ties_global"]
    monkeypatch.setenv("NEUROKERN_MAX_UNIT_BYTES", str(UNIT))
    assert main(["merge", str(cfg), str(tmp_path / "merged"), "--device", "cpu", "--quiet", "--fsync"]) == 0
    assert read_dir(tmp_path / "merged") == expected


def start_stalled(*args, stall):
    """A merge that stops (sleeps) at the event `stall` (KIND:N, tests/faults.py), holding what it holds."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["NEUROKERN_MAX_UNIT_BYTES"] = str(UNIT)
    return subprocess.Popen([sys.executable, str(FAULTS), "stall", stall, "-m", "neurokern", "merge", *map(str, args),
                             "--device", "cpu", "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(condition, what, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} did not happen: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)


def test_second_merge_on_a_running_one_is_refused(configs, tmp_path, monkeypatch, capsys):
    """The old code let a second `--resume` delete the running merge's .tmp shard and run over it."""
    cfg, expected = configs["neuromerging"]
    out, partial = tmp_path / "merged", tmp_path / "merged.partial"
    first = start_stalled(cfg, out, stall="tensors:2")
    try:
        wait_for(lambda: list(partial.glob("*.tmp")), "the first shard begun", first)
        (tmp,) = partial.glob("*.tmp")
        inode = tmp.stat().st_ino  # its bytes may still change: the first merge stalls after queueing its writes
        monkeypatch.setenv("NEUROKERN_MAX_UNIT_BYTES", str(UNIT))
        for extra in (["--resume"], []):
            assert main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet", *extra]) == 2
            err = capsys.readouterr().err
            assert err == (f"neurokern: error: another merge is running in {partial} (pid {first.pid} on "
                           f"{socket.gethostname()}); wait for it to end, or stop it and rerun with --resume\n")
            assert tmp.stat().st_ino == inode and not out.exists()
    finally:
        first.kill()
        first.wait()
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet", "--resume"]) == 0
    assert read_dir(out) == expected


def test_sigterm_says_so_and_resumes(configs, tmp_path, monkeypatch):
    cfg, expected = configs["neuromerging"]
    out, partial = tmp_path / "merged", tmp_path / "merged.partial"
    proc = start_stalled(cfg, out, stall="batches:3")
    wait_for(lambda: (partial / ".neurokern" / "state.json").exists(), "the merge begun", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err == f"neurokern: terminated (SIGTERM); rerun with --resume to finish from {partial}\n"
    monkeypatch.setenv("NEUROKERN_MAX_UNIT_BYTES", str(UNIT))
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet", "--resume"]) == 0
    assert read_dir(out) == expected


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["new-mtime", "mtime-restored"])
def test_resume_refuses_inputs_changed_since_the_interrupted_run(tmp_path, monkeypatch, capsys, keep_mtime):
    """task_1 replaced by another fine-tune with the same header (so the plan digest is the same):
    the old code finished the merge from both, exit 0. With the mtime put back, only the sampled
    bytes tell."""
    root, other = make_models(tmp_path / "models"), make_models(tmp_path / "other", seed=1)
    method, params, per_model = CONFIGS["neuromerging"]
    cfg = write_config(tmp_path / "c.yaml", method, root, params, per_model, extra={"out_shard_size": "20KB"})
    out, partial = tmp_path / "merged", tmp_path / "merged.partial"
    assert cli(cfg, out, crash="shards:2").returncode == 137
    replaced = sorted((root / "task_1").glob("*.safetensors"))
    for file in replaced:
        new = (other / "task_1" / file.name).read_bytes()
        assert new[:200] == file.read_bytes()[:200] and new != file.read_bytes()  # same header, other weights
        stamp = file.stat()
        file.write_bytes(new)
        if keep_mtime:
            os.utime(file, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    monkeypatch.setenv("NEUROKERN_MAX_UNIT_BYTES", str(UNIT))
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet", "--resume"]) == 2
    err = capsys.readouterr().err
    why = "sampled bytes" if keep_mtime else "modification time, sampled bytes"
    assert err == (f"neurokern: error: inputs changed since the interrupted run: {replaced[0]} ({why} changed); the "
                   f"merge in {partial} cannot be finished with them, delete it to start over\n")
    assert not out.exists() and len(list(partial.glob("*.safetensors"))) == 2  # the interrupted merge is kept


def _double_first_threshold(data):
    """The stored global trim's first threshold, doubled, wherever the file keeps it."""
    if isinstance(data, dict):
        if "threshold" in data:
            data["threshold"][0] = float.hex(2 * float.fromhex(data["threshold"][0]))
            return True
        return any(_double_first_threshold(v) for v in data.values())
    return False


@pytest.mark.parametrize("edit", ["threshold", "garbled"])
def test_resume_recomputes_an_edited_or_garbled_global_state(configs, tmp_path, monkeypatch, capsys, edit):
    """The old code merged the rest with an edited threshold (exit 0, other bytes) and raised a
    traceback on a garbled file."""
    cfg, expected = configs["neuromerging"]
    out = tmp_path / "merged"
    assert cli(cfg, out, crash="shards:1").returncode == 137
    saved = tmp_path / "merged.partial" / ".neurokern" / "global.json"
    if edit == "threshold":
        data = json.loads(saved.read_text())
        assert _double_first_threshold(data)
        saved.write_text(json.dumps(data))
    else:
        saved.write_text('{"trim": {"threshold": [')
    monkeypatch.setenv("NEUROKERN_MAX_UNIT_BYTES", str(UNIT))
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet", "--resume"]) == 0
    why = "does not match its sha256" if edit == "threshold" else "is not valid JSON"
    assert capsys.readouterr().err == f"neurokern: resume: {saved} {why}; computing the global thresholds again\n"
    assert read_dir(out) == expected


def test_resume_rewrites_a_shard_whose_record_is_garbled(configs, tmp_path, monkeypatch, capsys):
    """A done record holding valid JSON of the wrong kind: the old code raised a traceback."""
    cfg, expected = configs["neuromerging"]
    out, partial = tmp_path / "merged", tmp_path / "merged.partial"
    assert cli(cfg, out, crash="shards:1").returncode == 137
    (record,) = (partial / ".neurokern" / "done").glob("*.json")
    record.write_text("[1]")
    monkeypatch.setenv("NEUROKERN_MAX_UNIT_BYTES", str(UNIT))
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet", "--resume"]) == 0
    shard = partial / record.name[:-len(".json")]
    assert capsys.readouterr().err == f"neurokern: resume: {shard}: its record is unreadable; writing it again\n"
    assert read_dir(out) == expected


def test_resume_summary_counts_what_this_run_did(configs, tmp_path, monkeypatch, capsys):
    """The old summary gave the whole input as read (a speed no disk has) and every pass."""
    cfg, expected = configs["neuromerging"]
    out = tmp_path / "merged"
    assert cli(cfg, out, crash="shards:2").returncode == 137
    monkeypatch.setenv("NEUROKERN_MAX_UNIT_BYTES", str(UNIT))  # main() reads it
    result = merge_models(cfg, tmp_path / "dry", device="cpu", dry_run=True, settings=EngineSettings(max_unit_bytes=UNIT))
    last = result.plan.shards[-1].index  # one rank finishes the shards in order
    left = sum(u.in_bytes for u in result.plan.units if u.shard == last)
    assert 0 < left < result.plan.total_in_bytes
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "--resume"]) == 0
    summary = capsys.readouterr().out
    assert re.fullmatch(rf"merged 25 tensors into {re.escape(str(out))} in [\d.]+ s \(resumed, 2 of 3 shards were done; "
                        rf"{plan.human_bytes(left)} read, [\d.]+ [kMG]?B/s; passes: merge\)\n", summary), summary
    assert read_dir(out) == expected
    killed = tmp_path / "renamed"
    assert cli(cfg, killed, crash="rename").returncode == 137
    assert main(["merge", str(cfg), str(killed), "--device", "cpu", "--resume"]) == 0
    assert capsys.readouterr().out.endswith("(resumed, 3 of 3 shards were done; nothing read; passes: none left)\n")


def test_resume_refuses_a_state_without_input_fingerprints(configs, tmp_path, monkeypatch, capsys):
    """A partial folder of a neurokern that recorded no fingerprints: its inputs cannot be verified."""
    cfg, _ = configs["ties_global"]
    out, partial = tmp_path / "merged", tmp_path / "merged.partial"
    assert cli(cfg, out, crash="shards:1").returncode == 137
    state = partial / ".neurokern" / "state.json"
    state.write_text(json.dumps({"digest": json.loads(state.read_text())["digest"]}))
    monkeypatch.setenv("NEUROKERN_MAX_UNIT_BYTES", str(UNIT))
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet", "--resume"]) == 2
    assert capsys.readouterr().err == (f"neurokern: error: {partial} records no fingerprints of its inputs (made by an "
                                       "older neurokern); delete it to start over\n")
    assert partial.is_dir()


def test_resume_refuses_a_garbled_state_file(configs, tmp_path, monkeypatch, capsys):
    cfg, _ = configs["ties_global"]
    out, partial = tmp_path / "merged", tmp_path / "merged.partial"
    assert cli(cfg, out, crash="shards:1").returncode == 137
    (partial / ".neurokern" / "state.json").write_text('{"digest": ')
    monkeypatch.setenv("NEUROKERN_MAX_UNIT_BYTES", str(UNIT))
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet", "--resume"]) == 2
    assert capsys.readouterr().err == (f"neurokern: error: {partial} is not an interrupted neurokern merge of this "
                                       "config (.neurokern/state.json is missing or unreadable); delete it to start "
                                       "over\n")
    assert len(list(partial.glob("*.safetensors"))) == 1
