"""The reader: tensors read in pieces land byte for byte where they belong; the reads of up to
HOST_SLOTS units are in flight at once; the consumer waits only for the unit it needs (also on the
GPU path, which stages the next unit ahead); a failed read names its file and tensor; closing an
iteration early, reads in flight, gives every slot back once they end. Watchdogs turn a deadlock
into a failure."""
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from neurokern.engine import sources
from neurokern.engine.executor import Batch, Reader, Staged, Stager, batches
from neurokern.engine.plan import HOST_SLOTS, make_plan
from neurokern.engine.settings import EngineSettings
from neurokern.engine.sources import Model
from neurokern.errors import NeurokernError

from engine_helpers import make_models, within

WATCHDOG_S = 60


def _setup(root, piece=1000):
    """piece: not a divisor of anything, so that pieces cross tensors' ends."""
    models = [Model(root / "base", "base_model")] + [Model(root / f"task_{t}", f"models[{t}]") for t in range(3)]
    p = make_plan(models[0], 4, None, 40_000, max_unit_bytes=20_000)
    assert len(p.units) > 2 * HOST_SLOTS
    return p, models, Reader(p, models, torch.device("cpu"), EngineSettings(read_piece_bytes=piece))


def _on_disk(model: Model) -> dict[str, torch.Tensor]:
    out = {}
    for file in dict.fromkeys(info.file for info in model.tensors.values()):
        out.update(load_file(file))
    return out


def cpu_stager() -> Stager:
    return Stager(torch.device("cpu"), None)


class CopyingStager(Stager):
    """The GPU stager's handling of slots, on the CPU: the batch is copied out of its slot, which
    goes back at once (as after an H2D copy), and the next unit is staged ahead (stager.cuda)."""

    def __init__(self):
        super().__init__(torch.device("cpu"), None)
        self.cuda = True

    def stage(self, loading):
        b = loading.batch

        def copy(sd):
            return {n: t.clone() for n, t in sd.items()}
        return Staged(Batch(b.unit, copy(b.base), [copy(sd) for sd in b.finetuned], b.nbytes), None,
                      loading.release, early=True)


@pytest.mark.parametrize("stager", [cpu_stager, CopyingStager])
def test_pieces_read_every_byte(models, stager):
    p, ms, reader = _setup(models)
    assert max(info.nbytes for info in ms[0].tensors.values()) > 3 * reader.piece
    expected = [_on_disk(m) for m in ms]
    try:
        seen = within(WATCHDOG_S, lambda: [(b.unit.index, [{n: t.clone() for n, t in sd.items()}
                                                           for sd in [b.base] + b.finetuned])
                                           for b in batches(p, p.units, reader, stager())])
        assert [i for i, _ in seen] == [u.index for u in p.units]
        for unit, (_, sds) in zip(p.units, seen):
            for sd, exp in zip(sds, expected):
                assert list(sd) == unit.names
                for name, t in sd.items():
                    assert torch.equal(t, exp[name]), name
        assert reader.slots.free.qsize() == reader.slots.made <= HOST_SLOTS
    finally:
        reader.close()


class Gate:
    """Reads for which `gated(info, begin)` holds wait until the gate opens; records which units'
    reads started and how many reads are running."""

    def __init__(self, p, monkeypatch, gated):
        self.unit_of = {n: u.index for u in p.units for n in u.names}
        self.open, self.started, self.running = threading.Event(), set(), 0
        self.lock = threading.Lock()
        read_into = sources.read_into  # what engine.sources.Model.read_into calls

        def gated_read(info, out, begin=0, end=None):
            with self.lock:
                self.started.add(self.unit_of[info.name])
                self.running += 1
            try:
                if gated(info, begin):
                    assert self.open.wait(WATCHDOG_S)
                read_into(info, out, begin, end)
            finally:
                with self.lock:
                    self.running -= 1
        monkeypatch.setattr(sources, "read_into", gated_read)


def _wait_until(predicate, seconds=WATCHDOG_S):
    end = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > end:
            pytest.fail("condition not reached")
        time.sleep(0.01)


def test_reads_of_several_units_in_flight(models, monkeypatch):
    p, ms, reader = _setup(models)
    first_piece = ms[0].tensors[p.units[0].names[0]]
    gate = Gate(p, monkeypatch, lambda info, begin: info == first_piece and begin == 0)  # one read of unit 0 hangs
    it = batches(p, p.units, reader, cpu_stager())
    try:
        first = threading.Thread(target=next, args=(it,), daemon=True)
        first.start()
        # the next units' reads start without waiting for the first unit's, up to a slot each
        _wait_until(lambda: gate.started >= set(range(HOST_SLOTS)))
        time.sleep(0.2)
        assert gate.started == set(range(HOST_SLOTS))
        gate.open.set()
        first.join(WATCHDOG_S)
        assert sum(1 for _ in it) == len(p.units) - 1
    finally:
        gate.open.set()
        it.close()
        reader.close()


def test_gpu_path_yields_a_unit_without_waiting_for_the_next(models, monkeypatch):
    p, ms, reader = _setup(models)
    gate = Gate(p, monkeypatch, lambda info, begin: info.name in p.units[1].names)
    it = batches(p, p.units, reader, CopyingStager())
    try:
        assert within(WATCHDOG_S, next, it).unit.index == 0  # unit 1 still being read
        gate.open.set()
        assert [b.unit.index for b in it] == [u.index for u in p.units[1:]]
    finally:
        gate.open.set()
        it.close()
        reader.close()


@pytest.mark.parametrize("stager", [cpu_stager, CopyingStager])
def test_early_close_with_reads_in_flight_gives_every_slot_back(models, monkeypatch, stager):
    p, ms, reader = _setup(models)
    gate = Gate(p, monkeypatch, lambda info, begin: info.name not in p.units[0].names)

    def run():
        for _ in range(2 * HOST_SLOTS):
            it = batches(p, p.units, reader, stager())
            assert next(it).unit.index == 0
            _wait_until(lambda: gate.running > 0)  # later units' reads hang
            closer = threading.Thread(target=it.close, daemon=True)
            closer.start()
            time.sleep(0.1)
            assert closer.is_alive()  # close waits for the running reads into the slots
            gate.open.set()
            closer.join(WATCHDOG_S)
            assert gate.running == 0 and reader.slots.free.qsize() == reader.slots.made
            gate.open.clear()
        gate.open.set()
        return sum(1 for _ in batches(p, p.units, reader, stager()))

    try:
        assert within(WATCHDOG_S, run) == len(p.units)
        assert reader.slots.free.qsize() == reader.slots.made <= HOST_SLOTS
    finally:
        gate.open.set()
        reader.close()


def test_read_error_names_file_and_tensor(tmp_path):
    root = make_models(tmp_path)
    p, ms, reader = _setup(root)
    name = p.units[-1].names[-1]
    info = ms[2].tensors[name]
    with open(info.file, "r+b") as f:  # shorter after the headers were read
        f.truncate(info.start + info.nbytes // 2)
    try:
        with pytest.raises(NeurokernError) as exc:
            within(WATCHDOG_S, lambda: sum(1 for _ in batches(p, p.units, reader, cpu_stager())))
        assert str(info.file) in str(exc.value) and repr(name) in str(exc.value)
        assert reader.slots.free.qsize() == reader.slots.made
    finally:
        reader.close()
