"""Zeros written ahead into the shard files (neurokern.engine.writer.Prefault) while the passes before
the merge pass read the inputs: the merge pass writes over them, and the output is byte-identical
to a run without them, whether every shard was prefaulted, only some (the memory bound), or none
(one-pass methods)."""
import pytest

from neurokern.engine import merge_models, plan, prefetch
from neurokern.engine import writer as writer_module

from engine_helpers import read_dir, write_config

UNIT = 20_000  # bytes of input per work unit: several units and shards


@pytest.fixture
def prefaulted(monkeypatch):
    """The file sets the Prefaults of a run returned to the writer, one per Prefault."""
    sets = []
    finish = writer_module.Prefault.finish

    def spy(self):
        files = finish(self)
        if not sets or sets[-1] is not files:
            sets.append(files)
        return files
    monkeypatch.setattr(writer_module.Prefault, "finish", spy)
    return sets


def _merge(models, folder, name, method, params, monkeypatch):
    monkeypatch.setattr(plan, "MAX_UNIT", UNIT)
    cfg = write_config(folder / f"{name}.yaml", method, models, params, extra={"out_shard_size": "20KB"})
    result = merge_models(cfg, folder / name, device="cpu")
    return result, read_dir(folder / name)


@pytest.mark.parametrize("method,params", [("neuromerging", {"density": 0.2}), ("ties", {"trim_scope": "global"})])
def test_prefaulted_output_is_byte_identical(models, tmp_path, monkeypatch, prefaulted, method, params):
    monkeypatch.setattr(writer_module, "PREFAULT", False)
    _, want = _merge(models, tmp_path, "off", method, params, monkeypatch)
    assert prefaulted == []
    monkeypatch.setattr(writer_module, "PREFAULT", True)
    result, got = _merge(models, tmp_path, "all", method, params, monkeypatch)
    shards = [s.file for s in result.plan.shards]
    assert len(shards) > 2 and prefaulted == [set(shards)]
    assert got == want
    # bounded by memory: the first shard whole, the second begun, the rest written from scratch
    first = result.plan.shards[0].nbytes
    monkeypatch.setattr(prefetch, "memory_available", lambda: int((first + 1) / writer_module.PREFAULT_SHARE))
    _, got = _merge(models, tmp_path, "some", method, params, monkeypatch)
    assert prefaulted[-1] == set(shards[:2])
    assert got == want


def test_one_pass_merge_prefaults_nothing(models, tmp_path, monkeypatch, prefaulted):
    _merge(models, tmp_path, "ties", "ties", {"trim_scope": "tensor"}, monkeypatch)
    assert prefaulted == []


def test_failed_pre_pass_leaves_no_partial_folder(models, tmp_path, monkeypatch, prefaulted):
    """An error in a pass before the merge stops the Prefault before the partial folder is removed
    (nothing writes into it afterwards)."""
    from neurokern.engine import run as engine_run
    from neurokern.errors import NeurokernError

    def broken(*args, **kwargs):
        raise NeurokernError("boundary pass failed")
    monkeypatch.setattr(engine_run.GlobalTrim, "finish_hist", broken)
    with pytest.raises(NeurokernError, match="boundary pass failed"):
        _merge(models, tmp_path, "out", "neuromerging", {"density": 0.2}, monkeypatch)
    assert len(prefaulted) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
