"""The pipeline: reader threads fill host buffers (pinned when the device is a GPU) with the
tensors of the next work units while the device merges the current one; H2D copies run on a side
stream; merged units are copied back (D2H) into host buffers that the writer thread drains. Every
queue is bounded, so memory stays at the plan's estimate whatever the model size. On a GPU,
units of the first pass may stay on the device (within the budget) for the later passes."""
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

from neurokern.engine.plan import HOST_SLOTS, Plan, Unit
from neurokern.engine.sources import Model, read_into

READ_THREADS = int(os.environ.get("NEUROKERN_READ_THREADS", "8"))


@dataclass
class Batch:
    """One unit's inputs where the method runs: base and fine-tuned tensors by name."""

    unit: Unit
    base: dict[str, Tensor]
    finetuned: list[dict[str, Tensor]]
    nbytes: int


class _Slots:
    """A fixed set of reusable host buffers (pinned for fast, asynchronous copies)."""

    def __init__(self, count: int, nbytes: int, pin: bool):
        self.free: queue.Queue = queue.Queue()
        for _ in range(count):
            self.free.put(torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin))

    def get(self, stop: threading.Event, check=None) -> Optional[Tensor]:
        """A free buffer; None once `stop` is set. `check` runs while waiting (it raises the error
        of the thread that should give buffers back, so a failed consumer is no deadlock)."""
        while not stop.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                if check is not None:
                    check()
        return None

    def put(self, slot: Tensor) -> None:
        self.free.put(slot)


class Reader:
    """Reads units, in order, into host slots on a background thread (parallel preads)."""

    def __init__(self, plan: Plan, models: list[Model], pin: bool):
        self.plan, self.models = plan, models
        padding = 16 * len(models) * max((len(u.names) for u in plan.units), default=0)
        self.slots = _Slots(HOST_SLOTS, plan.unit_cap + padding, pin)
        self.pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="neurokern-read")
        self.fds: list[dict] = []
        self._local = threading.local()

    def _fds(self) -> dict:
        if not hasattr(self._local, "fds"):
            self._local.fds = {}
            self.fds.append(self._local.fds)
        return self._local.fds

    def _read(self, info, dest):
        read_into(info, dest, self._fds())

    def _load(self, unit: Unit, slot: Tensor) -> tuple[list[dict[str, Tensor]], int]:
        views, jobs, offset = [], [], 0
        for m in self.models:
            per_model = {}
            for name in unit.names:
                info = m.tensors[name]
                dest = slot[offset:offset + info.nbytes]
                offset += info.nbytes
                offset += -offset % 16  # keep every tensor view aligned
                per_model[name] = dest
                jobs.append(self.pool.submit(self._read, info, dest))
            views.append(per_model)
        for job in jobs:
            job.result()
        typed = [{n: v.view(m.tensors[n].dtype).view(m.tensors[n].shape) if m.tensors[n].nbytes else
                  torch.empty(m.tensors[n].shape, dtype=m.tensors[n].dtype)
                  for n, v in per_model.items()} for m, per_model in zip(self.models, views)]
        return typed, offset

    def iterate(self, units: list[Unit]) -> Iterator[tuple[Batch, Tensor]]:
        ready: queue.Queue = queue.Queue(maxsize=HOST_SLOTS)
        stop = threading.Event()

        def work():
            try:
                for unit in units:
                    slot = self.slots.get(stop)
                    if slot is None:
                        return
                    tensors, nbytes = self._load(unit, slot)
                    ready.put((Batch(unit, tensors[0], tensors[1:], unit.in_bytes), slot))
                ready.put(None)
            except BaseException as exc:  # noqa: BLE001 (handed to the consumer)
                ready.put(exc)

        thread = threading.Thread(target=work, name="neurokern-reader", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Closed early (an error, or the consumer stopped): stop the worker and take back the
            # slots of the units it read ahead, including any it queued just before it ended.
            stop.set()
            while thread.is_alive():
                try:
                    self._give_back(ready.get(timeout=0.05))
                except queue.Empty:
                    pass
            while True:
                try:
                    self._give_back(ready.get_nowait())
                except queue.Empty:
                    break

    def _give_back(self, item) -> None:
        if isinstance(item, tuple):
            self.slots.put(item[1])

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for fds in self.fds:
            for fd in fds.values():
                os.close(fd)
            fds.clear()


class Stager:
    """Moves host batches to the device: H2D on a side stream (CUDA), the config's dtype applied,
    and an optional budget-bounded cache of device batches for later passes."""

    def __init__(self, device: torch.device, out_dtype: Optional[torch.dtype], cache_bytes: int = 0):
        self.device, self.out_dtype = device, out_dtype
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.cache: dict[int, Batch] = {}
        self.cache_left = cache_bytes

    def _convert(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.out_dtype is None:
            return sd
        return {n: t.to(self.out_dtype) if t.is_floating_point() else t for n, t in sd.items()}

    def stage(self, batch: Batch, slot: Tensor, reader: Reader) -> "Staged":
        if not self.cuda:
            # On the CPU the slot is the working memory: the batch views it (tensors whose dtype
            # the config changes are converted copies) until the unit is done with.
            staged = Batch(batch.unit, self._convert(batch.base), [self._convert(sd) for sd in batch.finetuned],
                           batch.nbytes)
            return Staged(staged, None, lambda: reader.slots.put(slot), early=False)
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
            event.synchronize()  # the H2D copy has read the slot
            reader.slots.put(slot)
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
    """Every unit's batch on the device, in order: cached ones directly, the others read ahead and
    staged one unit ahead of the one being merged (so H2D overlaps the kernels). Closing the
    generator early (break, an exception, garbage collection) gives every slot back."""
    to_read = [u for u in units if u.index not in stager.cache]
    stream = reader.iterate(to_read)
    current: Optional[Staged] = None
    pending: Optional[Staged] = None

    def next_staged() -> Optional[Staged]:
        item = next(stream, None)
        if item is None:
            return None
        return stager.stage(item[0], item[1], reader)

    try:
        for unit in units:
            if unit.index in stager.cache:
                batch = stager.cache[unit.index]
                yield batch
            else:
                current, pending = (pending or next_staged()), None
                batch = stager.ready(current, keep)
                if stager.cuda:
                    pending = next_staged()  # the next unit's H2D overlaps this one's kernels
                yield batch
                current.release()
                current = None
            if progress is not None:
                progress(batch)
    finally:
        for staged in (current, pending):
            if staged is not None:
                staged.release()
        stream.close()
