"""Warm-up reads: they cover the inputs in the order of the work units, up to the limit; the command
line starts them before torch is imported; they change nothing in the output and are skipped where
they would read what the run does not (resume, torchrun)."""
import os
import subprocess
import sys
import textwrap

import pytest

from neurokern.config import load_config
from neurokern.engine import prefetch
from neurokern.engine.plan import make_plan
from neurokern.engine.settings import EngineSettings
from neurokern.engine.sources import Model
from neurokern.engine.timing import Recorder

from engine_helpers import read_dir, write_config


def _inputs(models):
    paths = [models / "base"] + [models / f"task_{t}" for t in range(3)]
    return [prefetch._byte_ranges(p) for p in paths], [Model(p, str(p)) for p in paths]


def _union(spans):
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


@pytest.mark.parametrize("piece", [100, 5000, 1 << 20])
def test_pieces_cover_every_tensor_once(models, monkeypatch, piece):
    monkeypatch.setattr(prefetch, "PIECE", piece)
    ranges, ms = _inputs(models)
    pieces = list(prefetch._pieces(ranges, limit=1 << 40))
    assert all(0 < n <= piece for _, _, n in pieces)
    got, want = {}, {}
    for file, at, n in pieces:
        got.setdefault(file, []).append((at, at + n))
    for m in ms:
        for info in m.tensors.values():
            if info.nbytes:
                want.setdefault(info.file, []).append((info.start, info.start + info.nbytes))
    assert {f: _union(s) for f, s in got.items()} == {f: _union(s) for f, s in want.items()}
    assert sum(n for _, _, n in pieces) == sum(b - a for s in want.values() for a, b in s)


def test_pieces_follow_the_work_units(models, monkeypatch):
    monkeypatch.setattr(prefetch, "PIECE", 100)  # windows of one tensor
    ranges, ms = _inputs(models)
    unit_of = {n: u.index for u in make_plan(ms[0], 4, None, 40_000, max_unit_bytes=20_000).units for n in u.names}
    name_at = {(info.file, info.start): info.name for m in ms for info in m.tensors.values()}
    units = [unit_of[name_at[(f, a)]] for f, a, _ in prefetch._pieces(ranges, limit=1 << 40) if (f, a) in name_at]
    assert units == sorted(units) and units[0] == 0 and units[-1] == len(set(unit_of.values())) - 1


def test_limit(models, monkeypatch):
    monkeypatch.setattr(prefetch, "PIECE", 1000)
    ranges, _ = _inputs(models)
    assert 10_000 <= sum(n for _, _, n in prefetch._pieces(ranges, limit=10_000)) < 10_000 + 1000


def test_skipped_for_resume_torchrun_and_when_off(models, tmp_path, monkeypatch):
    cfg = load_config(write_config(tmp_path / "c.yaml", "ties", models, None, {"density": 0.3}))
    on, off = EngineSettings(prefetch=True), EngineSettings(prefetch=False)
    recorder = Recorder()
    prefetch.start(cfg, on, recorder, resume=True)
    assert prefetch._current is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    prefetch.start(cfg, on, recorder)
    assert prefetch._current is None
    monkeypatch.delenv("WORLD_SIZE")
    prefetch.start(cfg, off, recorder)
    assert prefetch._current is None
    prefetch.start(cfg, on, recorder)
    warming = prefetch._current
    prefetch.start(cfg, on, recorder)  # already warming these inputs
    assert warming is not None and prefetch._current is warming
    prefetch.stop()
    assert prefetch._current is None and not any(t.is_alive() for t in warming.threads)


CLI = textwrap.dedent("""
    import sys
    from neurokern.engine import prefetch
    start = prefetch.start
    def recording(*args):
        print("torch imported at the warm-up start:", "torch" in sys.modules, flush=True)
        start(*args)
    prefetch.start = recording
    from neurokern.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_command_line_warms_before_importing_torch(models, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", "ties", models, None, {"density": 0.3})
    run = subprocess.run([sys.executable, "-c", CLI, "merge", str(cfg), str(tmp_path / "warm"), "--device", "cpu",
                          "--quiet"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "torch imported at the warm-up start: False" in run.stdout
    off = subprocess.run([sys.executable, "-m", "neurokern", "merge", str(cfg), str(tmp_path / "cold"), "--device",
                          "cpu", "--quiet"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NEUROKERN_PREFETCH": "0"})
    assert off.returncode == 0, off.stderr[-3000:]
    assert read_dir(tmp_path / "warm") == read_dir(tmp_path / "cold")
