"""A merge killed at any point (SIGKILL-like: os._exit, no cleanup) leaves no OUT_DIR, and
`--resume` finishes it byte-identically to an uninterrupted run. The kill comes from the
NEUROKERN_TEST_CRASH hook (neurokern.engine.writer.crash_hook), so the points are deterministic:
inside each streaming pass, right after the pre-pass results are saved, mid-shard, after whole
shards, after the folder is complete, and between removing the state and the rename."""
import os
import subprocess
import sys

import pytest

from neurokern.cli import main
from neurokern.engine import merge_models, plan

from engine_helpers import read_dir, write_config

UNIT = 20_000  # bytes of input per work unit: 14 units in 3 shards

CONFIGS = {
    # global trim + default lambda: histogram, boundary and l1 passes before the merge pass
    "neuromerging": ("neuromerging", {"density": 0.2}, None),
    # exact-k global trim: the saved state holds tie limits found by re-reading units
    "ties_global": ("ties", {"trim_scope": "global"}, {"weight": 1.0, "density": [0.2, 0.3, 0.25]}),
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
]


@pytest.fixture(scope="module")
def configs(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    out = {}
    for name, (method, params, per_model) in CONFIGS.items():
        cfg = write_config(folder / f"{name}.yaml", method, models, params, per_model,
                           extra={"out_shard_size": "20KB"})
        mp = pytest.MonkeyPatch()
        mp.setattr(plan, "MAX_UNIT", UNIT)
        try:
            result = merge_models(cfg, folder / f"{name}-ref", device="cpu")
        finally:
            mp.undo()
        assert (len(result.plan.units), len(result.plan.shards)) == (14, 3)  # POINTS count on these
        out[name] = (cfg, read_dir(folder / f"{name}-ref"))
    return out


def cli(*args, crash=None, ranks=None):
    env = {k: v for k, v in os.environ.items() if k not in ("NEUROKERN_TEST_CRASH", "RANK", "WORLD_SIZE")}
    env["NEUROKERN_MAX_UNIT_BYTES"] = str(UNIT)
    if crash:
        env["NEUROKERN_TEST_CRASH"] = crash
    return subprocess.run([sys.executable, "-m", "neurokern", "merge", *map(str, args), "--device", "cpu", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("config,point", POINTS, ids=[f"{c}-{p}" for c, p in POINTS])
def test_resume_after_kill_is_byte_identical(configs, tmp_path, monkeypatch, config, point):
    cfg, expected = configs[config]
    out = tmp_path / "merged"
    killed = cli(cfg, out, crash=point)
    assert killed.returncode == 137, killed.stderr
    assert not out.exists()  # output appears only by the final rename
    partial = tmp_path / "merged.partial"
    assert partial.is_dir()

    monkeypatch.setattr(plan, "MAX_UNIT", UNIT)
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
    monkeypatch.setattr(plan, "MAX_UNIT", UNIT)
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


def test_resume_redoes_a_recorded_shard_whose_bytes_differ(configs, tmp_path, monkeypatch):
    """Without --fsync a power loss can keep a shard's done record but lose its bytes: --resume
    checks every recorded shard against its sha256 and writes again the ones that differ."""
    cfg, expected = configs["neuromerging"]
    out = tmp_path / "merged"
    killed = cli(cfg, out, crash="shards:1")
    assert killed.returncode == 137, killed.stderr
    partial = tmp_path / "merged.partial"
    (done,) = [p for p in partial.glob("*.safetensors")]
    data = bytearray(done.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    done.write_bytes(bytes(data))
    monkeypatch.setattr(plan, "MAX_UNIT", UNIT)
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet", "--resume"]) == 0
    assert read_dir(out) == expected


def test_fsync_output_is_the_same(configs, tmp_path, monkeypatch):
    cfg, expected = configs["ties_global"]
    monkeypatch.setattr(plan, "MAX_UNIT", UNIT)
    assert main(["merge", str(cfg), str(tmp_path / "merged"), "--device", "cpu", "--quiet", "--fsync"]) == 0
    assert read_dir(tmp_path / "merged") == expected
