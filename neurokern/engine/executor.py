"""The pipeline: reader threads fill host buffers (pinned when the device is a GPU) with the
tensors of the next work units while the device merges the current one; H2D copies run on a side
stream; merged units are copied back (D2H) into host buffers that the writer thread drains. Every
queue is bounded, so memory stays at the plan's estimate whatever the model size. On a GPU,
units of the first pass may stay on the device (within the budget) for the later passes."""
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

from neurokern.engine.plan import HOST_SLOTS, Plan, Unit
from neurokern.engine.settings import EngineSettings
from neurokern.engine.sources import TensorInfo, TensorSource
from neurokern.engine.timing import Recorder


def serial_torch_thread() -> None:
    """Each reader thread's torch work (an adapter's ΔW product and sum, a dtype conversion) stays
    on that thread: otherwise every reader spreads each op over all the cores (16 readers, each
    with 16 intra-op threads, on a 16-core GPU machine)."""
    torch.set_num_threads(1)


# Derived tensors (a LoRA adapter's weights, formed by the thread that reads them) are formed by at
# most this many reader threads at once: on an H100 machine's 16 cores, pieces formed by a dozen torch
# calls each (the Python path bench/adapter_read.py compares with) came at 2.38 GB/s on 8 threads and
# 1.15 on 16 (bench/results/adapter-read-x86_64-16cores.json); lora_add_rows, one call and one pass
# over a piece without the GIL, is not measured there yet. On 2 cores 2 threads beat 1. Stored
# tensors are read by all settings.read_threads.
DERIVED_READERS = 8


def read_spans(info: TensorInfo, piece: int) -> list[tuple[int, int]]:
    """The byte ranges of a tensor that the readers read as jobs of their own: a derived tensor's
    own pieces (a LoRA-adapted weight, a conversion), a pickled tensor whole (one copy from the
    loaded checkpoint), a stored one in pieces that end at multiples of `piece` in its file."""
    if info.derive is not None:
        return info.derive.pieces()
    if info.start < 0:
        return [(0, info.nbytes)]
    spans, at, stop = [], info.start, info.start + info.nbytes
    while at < stop:
        end = min(stop, (at // piece + 1) * piece)
        spans.append((at - info.start, end - info.start))
        at = end
    return spans


@dataclass
class Batch:
    """One unit's inputs where the method runs: base and fine-tuned tensors by name."""

    unit: Unit
    base: dict[str, Tensor]
    finetuned: list[dict[str, Tensor]]
    nbytes: int


class _Slots:
    """Up to `count` reusable host buffers (pinned for fast, asynchronous copies). Each is allocated
    when first asked for and none is free, or ahead of time by `prepare`: pinning takes time, and
    while it runs other CUDA calls of the process wait. A pinned buffer is a plain one of the exact
    size, page-locked with cudaHostRegister: torch's pinned allocator rounds every request up to a
    power of two (a 655 MB unit pinned 1 GiB) and took 0.7 s per GB asked on the H100 machine,
    registering 0.26 s; a process exits ~0.15 s later per GB left pinned. `close` unpins them."""

    def __init__(self, count: int, nbytes: int, what: str, device: torch.device, recorder: Optional[Recorder] = None):
        """Pinned when device (the copies' other end) is a GPU; recorder times the allocations."""
        self.count, self.nbytes, self.what, self.device = count, max(nbytes, 1), what, device
        self.recorder = recorder or Recorder()
        self.pin = device.type == "cuda"
        self.made = 0
        self.closed = False
        self.registered: list[int] = []  # addresses of the buffers page-locked by cudaHostRegister
        self.standin: Optional[int] = None  # address of prepare's plain first buffer, until pinned
        self.lock = threading.Lock()
        self.free: queue.Queue = queue.Queue()
        self.to_pin: queue.Queue = queue.Queue()  # the stand-in once given back; None: closed

    def _reserve(self) -> bool:
        with self.lock:
            if self.made >= self.count or self.closed:
                return False
            self.made += 1
            return True

    def _make(self) -> Optional[Tensor]:
        """A new buffer, or None when all `count` are made (or being made)."""
        if not self._reserve():
            return None
        try:
            with self.recorder.span(f"allocate {self.what}" + (" (pinned)" if self.pin else "")):
                if not self.pin:
                    return torch.empty(self.nbytes, dtype=torch.uint8)
                buf = torch.empty(self.nbytes, dtype=torch.uint8)
                return buf if self._register(buf) else torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
        except BaseException:
            with self.lock:
                self.made -= 1
            raise

    def _register(self, buf: Tensor) -> bool:
        """Page-lock buf in place; False when cudaHostRegister refuses. A buffer pinned after close
        is unpinned at once: it stays plain."""
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(buf.data_ptr(), self.nbytes, 0)) != 0:  # not cudaSuccess
            return False
        with self.lock:
            if not self.closed:
                self.registered.append(buf.data_ptr())
                return True
        cudart.cudaHostUnregister(buf.data_ptr())  # closed meanwhile: a plain buffer
        return True

    def close(self) -> None:
        """Unpins the registered buffers once the device is idle (no copy reads them any more);
        they stay valid host memory."""
        with self.lock:
            self.closed = True
            registered, self.registered = self.registered, []
        self.to_pin.put(None)
        if registered:
            torch.cuda.synchronize(self.device)
            for address in registered:
                torch.cuda.cudart().cudaHostUnregister(address)

    def prepare(self) -> None:
        """Allocate every buffer now, one after another on a thread of its own: the start of a
        merge is spent reading (and waiting for) the first inputs, and pinning then costs the pass
        little. The first is a plain stand-in, free at once: the first unit's reads need not wait
        for a pinning (about 0.3 s per GB, more while the disk is read), and its H2D copy is a
        synchronous one. The stand-in is pinned in its turn when first given back. A failure
        leaves the buffer to `get`, which raises it."""
        if not self.pin or not self._reserve():
            return
        standin = torch.empty(self.nbytes, dtype=torch.uint8)
        self.standin = standin.data_ptr()
        self.free.put(standin)

        def allocate_all():
            try:
                while (slot := self._make()) is not None:
                    self.free.put(slot)
            except Exception:  # noqa: BLE001 (get allocates the buffer again and raises)
                pass
            slot = self.to_pin.get()
            if slot is not None:
                try:
                    with self.recorder.span(f"allocate {self.what} (pinned)"):
                        self._register(slot)  # refused: it stays plain, as the stand-in was
                finally:
                    self.free.put(slot)
        threading.Thread(target=allocate_all, name=f"neurokern-pin-{self.what}", daemon=True).start()

    def get(self, stop: threading.Event, check=None) -> Optional[Tensor]:
        """A free buffer; None once `stop` is set. `check` runs while waiting (it raises the error
        of the thread that should give buffers back, so a failed consumer is no deadlock)."""
        while not stop.is_set():
            try:
                return self.free.get_nowait()
            except queue.Empty:
                pass
            slot = self._make()
            if slot is not None:
                return slot
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                if check is not None:
                    check()
        return None

    def put(self, slot: Tensor) -> None:
        with self.lock:
            standin = slot.data_ptr() == self.standin and not self.closed
            if standin:
                self.standin = None
        (self.to_pin if standin else self.free).put(slot)


class Loading:
    """A unit whose reads were submitted: its batch views the slot; `wait` returns once every read
    is done (raising the first error). `release` gives the slot back exactly once, after the reads
    still running end (those not started are cancelled): nothing writes into a reused slot."""

    def __init__(self, batch: Batch, slot: Tensor, jobs: list[Future], slots: _Slots):
        self.batch, self.slot, self.jobs, self._slots = batch, slot, jobs, slots

    def done(self) -> bool:
        return all(job.done() for job in self.jobs)

    def wait(self) -> None:
        for job in self.jobs:
            job.result()

    def release(self) -> None:
        slot, self.slot = self.slot, None
        if slot is None:
            return
        for job in self.jobs:
            job.cancel()
        wait(self.jobs)
        self._slots.put(slot)


class Reader:
    """Reads units, in order, into host slots: every tensor in pieces of at most
    settings.read_piece_bytes, each a job of its own (a large tensor is read by many threads at
    once, and the disk queue stays full up to the last bytes of a unit), by settings.read_threads
    threads. recorder times the reads."""

    def __init__(self, plan: Plan, models: list[TensorSource], device: torch.device,
                 settings: EngineSettings = EngineSettings(), recorder: Optional[Recorder] = None):
        self.plan, self.models = plan, models
        self.recorder = recorder or Recorder()
        self.piece = settings.read_piece_bytes
        padding = 16 * len(models) * max((len(u.names) for u in plan.units), default=0)
        self.slots = _Slots(HOST_SLOTS, plan.unit_cap + padding, "input buffers", device, self.recorder)
        if self.slots.pin:
            self.slots.prepare()
        self.intra_op_threads = torch.get_num_threads()
        self.pool = ThreadPoolExecutor(max_workers=settings.read_threads, thread_name_prefix="neurokern-read",
                                       initializer=serial_torch_thread)
        self.bytes_read = 0  # input bytes of the units submitted (one producer thread at a time adds)
        self.deriving = threading.BoundedSemaphore(DERIVED_READERS)

    def _read(self, source: TensorSource, info: TensorInfo, dest: Tensor, begin: int, end: int) -> None:
        gate = self.deriving if info.derive is not None else nullcontext()
        with gate, self.recorder.busy("read", end - begin):
            source.read_into(info, dest, begin, end)

    def _load(self, unit: Unit, slot: Tensor) -> Loading:
        """Submit the reads of a unit into a slot (in file order per model)."""
        self.bytes_read += unit.in_bytes
        tensors, jobs, offset = [], [], 0
        for m in self.models:
            typed = {}
            for name in unit.names:
                info = m.tensors[name]
                dest = slot[offset:offset + info.nbytes]
                offset += info.nbytes
                offset += -offset % 16  # keep every tensor view aligned
                for begin, end in read_spans(info, self.piece):
                    jobs.append(self.pool.submit(self._read, m, info, dest, begin, end))
                typed[name] = (dest.view(info.dtype).view(info.shape) if info.nbytes else
                               torch.empty(info.shape, dtype=info.dtype))
            tensors.append(typed)
        return Loading(Batch(unit, tensors[0], tensors[1:], unit.in_bytes), slot, jobs, self.slots)

    def iterate(self, units: list[Unit]) -> "ReadAhead":
        return ReadAhead(self, units)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        # torch keeps the last count set, from any thread, for threads that start later: the caller's again
        torch.set_num_threads(self.intra_op_threads)
        self.slots.close()


class ReadAhead:
    """The units of one iteration, read ahead: a thread takes each free slot (HOST_SLOTS in all)
    and submits the next unit's reads into it at once, so reads of up to HOST_SLOTS units are in
    flight while the consumer works. `close` ends it early or not; every slot comes back."""

    def __init__(self, reader: Reader, units: list[Unit]):
        self.ready: queue.Queue = queue.Queue()  # Loading, then None (the end) or an exception
        self.head = None  # taken from `ready`, not handed out yet
        self.stop = threading.Event()

        def produce():
            try:
                for unit in units:
                    slot = reader.slots.get(self.stop)
                    if slot is None:
                        return
                    self.ready.put(reader._load(unit, slot))
                self.ready.put(None)
            except BaseException as exc:  # noqa: BLE001 (handed to the consumer)
                self.ready.put(exc)

        self.thread = threading.Thread(target=produce, name="neurokern-reader", daemon=True)
        self.thread.start()

    def next(self, block: bool = True) -> Optional[Loading]:
        """The next unit, None at the end; with block=False also None unless the producer has
        submitted it and all its reads are done (nothing is waited for)."""
        if self.head is None:
            try:
                self.head = self.ready.get(block)
            except queue.Empty:
                return None
        item = self.head
        if isinstance(item, BaseException):
            raise item
        if item is None or (not block and not item.done()):
            return None
        self.head = None
        return item

    def close(self) -> None:
        # The producer stops at its next wait for a slot; then every unit it queued (read or
        # not) gives its slot back, including any queued just before it ended.
        self.stop.set()
        self.thread.join()
        items = [self.head]
        while not self.ready.empty():
            items.append(self.ready.get_nowait())
        self.head = None
        for item in items:
            if isinstance(item, Loading):
                item.release()


class Stager:
    """Moves host batches to the device: H2D on a side stream (CUDA), the config's dtype applied,
    and an optional budget-bounded cache of device batches for later passes; recorder times the
    waits for H2D copies."""

    def __init__(self, device: torch.device, out_dtype: Optional[torch.dtype], cache_bytes: int = 0,
                 recorder: Optional[Recorder] = None):
        self.device, self.out_dtype = device, out_dtype
        self.recorder = recorder or Recorder()
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.cache: dict[int, Batch] = {}
        self.cache_left = cache_bytes

    def _convert(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.out_dtype is None:
            return sd
        return {n: t.to(self.out_dtype) if t.is_floating_point() else t for n, t in sd.items()}

    def stage(self, loading: Loading) -> "Staged":
        """A unit whose reads are done, on its way to the device."""
        batch = loading.batch
        if not self.cuda:
            # On the CPU the slot is the working memory: the batch views it (tensors whose dtype
            # the config changes are converted copies) until the unit is done with.
            staged = Batch(batch.unit, self._convert(batch.base), [self._convert(sd) for sd in batch.finetuned],
                           batch.nbytes)
            return Staged(staged, None, loading.release, early=False)
        with torch.cuda.stream(self.stream):
            def move(sd):
                return {n: t.to(self.device, non_blocking=True) for n, t in sd.items()}
            base, fts = move(batch.base), [move(sd) for sd in batch.finetuned]
            event = torch.cuda.Event()
            event.record(self.stream)
        current = torch.cuda.current_stream(self.device)
        for sd in [base] + fts:
            for t in sd.values():
                t.record_stream(current)
        staged = Batch(batch.unit, base, fts, batch.nbytes)

        def release():
            with self.recorder.span("wait for H2D"):
                event.synchronize()  # the H2D copy has read the slot
            loading.release()
        return Staged(staged, event, release, early=True)

    def ready(self, staged: "Staged", keep: bool) -> Batch:
        """Wait for the copy, apply the dtype; cache it when asked and it fits."""
        if staged.event is not None:
            torch.cuda.current_stream(self.device).wait_event(staged.event)
        if staged.early:
            staged.release()
        b = staged.batch
        if self.cuda and self.out_dtype is not None:
            b = Batch(b.unit, self._convert(b.base), [self._convert(sd) for sd in b.finetuned], b.nbytes)
        if keep and self.cuda:
            size = sum(t.numel() * t.element_size() for sd in [b.base] + b.finetuned for t in sd.values())
            if size <= self.cache_left:
                self.cache_left -= size
                self.cache[b.unit.index] = b
        return b


class Staged:
    """A batch staged for the device and the host slot it came from. The slot goes back to the
    reader exactly once: as soon as the batch no longer views it (`early`: after the H2D copy or
    the dtype conversion), else once the unit is done with, and in any case when the pipeline is
    closed early, so that an abandoned iteration never strands a slot (the reader would wait for
    it forever)."""

    def __init__(self, batch: Batch, event: Optional[object], release, early: bool):
        self.batch, self.event, self.early = batch, event, early
        self._release = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


def batches(plan: Plan, units: list[Unit], reader: Reader, stager: Stager, keep: bool = False,
            progress=None) -> Iterator[Batch]:
    """Every unit's batch on the device, in order: cached ones directly, the others read ahead.
    On a GPU the next unit is staged (its H2D overlapping this one's kernels) when its reads are
    already done: the consumer only ever waits for the reads of the unit it needs now. Closing the
    generator early (break, an exception, garbage collection) gives every slot back."""
    ahead = reader.iterate([u for u in units if u.index not in stager.cache])
    taken: Optional[Loading] = None  # handed out by the reader, not staged yet
    current: Optional[Staged] = None
    pending: Optional[Staged] = None

    def stage(block: bool) -> Optional[Staged]:
        nonlocal taken
        with reader.recorder.span("wait for reads"):
            taken = ahead.next(block)
            if taken is None:
                return None
            taken.wait()
        staged, taken = stager.stage(taken), None
        return staged

    try:
        for unit in units:
            if unit.index in stager.cache:
                batch = stager.cache[unit.index]
                yield batch
            else:
                current, pending = (pending or stage(block=True)), None
                batch = stager.ready(current, keep)
                if stager.cuda:
                    pending = stage(block=False)
                yield batch
                current.release()
                current = None
            if progress is not None:
                progress(batch)
    finally:
        for held in (taken, current, pending):
            if held is not None:
                held.release()
        ahead.close()
