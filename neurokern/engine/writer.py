"""Output: shards written into OUT_DIR.partial/ next to OUT_DIR, renamed there once complete.

Each shard file is laid out up front from the plan (header first), filled by pwrite as merged
tensors arrive on the writer thread, renamed from `<file>.tmp` to `<file>`, and recorded (bytes,
digest) in `.neurokern/done/<file>.json`. A resumed run checks the recorded shards against their
digest and skips those that match. At the end rank 0 adds the index, the side files (config.json,
tokenizer files), the config echo and the manifest, removes `.neurokern/`, and renames the folder
to OUT_DIR: output appears only complete.

The digest (`sha256_tree` in the records and the manifest) is the sha256 of the concatenated
sha256 digests of the header and of every WRITE_PIECE-byte piece of each tensor's bytes, in file
order: the pieces are hashed in parallel as they are written (one sha256 stream runs at about 1 GB/s,
slower than the merge).

Durability: by default the bytes are left to the page cache (as mergekit and save_pretrained do):
the output is whole or absent after a crash of the process, and the disk is not kept busy writing
the output while the merge still reads its inputs. `durable` (--fsync) also survives a power loss: the writeback of
each tensor starts at once, every shard is fsync'ed before it is recorded, and so is the folder
before the rename.
"""
import hashlib
import json
import os
import queue
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from neurokern.checkpoint import INDEX, SIDE_FILES
from neurokern.engine import timing
from neurokern.engine.plan import OUT_SLOTS, Plan, Shard
from neurokern.errors import NeurokernError

# A unit's tensors are written by a pool of threads in pieces while the writer thread hashes them
# in file order: writing and hashing overlap, and neither is one thread's copy speed.
WRITE_THREADS = 8
WRITE_PIECE = 8 * 2**20
DIGEST = "sha256_tree"
STATE = ".neurokern"
MANIFEST = "neurokern_manifest.json"
CONFIG_ECHO = "neurokern_config.yml"


def partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


def crash_hook(kind: str, count: int = 0) -> None:
    """Tests only: NEUROKERN_TEST_CRASH=KIND:N ends the process at once (os._exit, no cleanup, as a
    SIGKILL would) at the N-th event of KIND: batches (units read in any pass), saved (the
    pre-pass results written), tensors (tensors written), shards (shards finished), publish (the
    folder complete, before its state is removed), rename (state removed, before the rename)."""
    spec = os.environ.get("NEUROKERN_TEST_CRASH")
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want == kind and count >= int(n or 0):
        os._exit(137)


def done_record(partial: Path, shard: Shard, verify: bool = False) -> Optional[dict]:
    """The record of a finished shard, if its file has the planned size; verify: and its digest
    (a resumed run: without fsync a power loss can leave a record whose bytes never reached the
    disk)."""
    path = partial / STATE / "done" / (shard.file + ".json")
    try:
        record = json.loads(path.read_text())
        if (partial / shard.file).stat().st_size == record["bytes"] == shard.nbytes:
            if not verify or file_digest(partial / shard.file, shard) == record[DIGEST]:
                return record
    except (OSError, ValueError, KeyError):
        pass
    return None


def _pieces(start: int, end: int) -> range:
    return range(start, end, WRITE_PIECE)


def tree_digest(header_digest: bytes, piece_digests: dict[int, bytes]) -> str:
    """The shard digest from its header's and its pieces' sha256 (pieces keyed by file offset)."""
    h = hashlib.sha256(header_digest)
    for offset in sorted(piece_digests):
        h.update(piece_digests[offset])
    return h.hexdigest()


def file_digest(path: Path, shard: Shard) -> str:
    """A written shard's digest, read back from its file."""
    pieces = {}
    with open(path, "rb") as f:
        header = f.read(len(shard.header))
        for start, end in shard.layout.values():
            for at in _pieces(start, end):
                f.seek(at)
                pieces[at] = hashlib.sha256(f.read(min(WRITE_PIECE, end - at))).digest()
    return tree_digest(hashlib.sha256(header).digest(), pieces)


class ShardWriter:
    """Writes the given shards; `put` hands it merged host tensors in plan order."""

    def __init__(self, partial: Path, plan: Plan, shards: list[int], durable: bool = False):
        self.partial, self.plan, self.durable = partial, plan, durable
        self.shards = {i: plan.shards[i] for i in shards}
        self.shard_of = plan.shard_of()
        self.queue: queue.Queue = queue.Queue(maxsize=OUT_SLOTS)
        self.error: Optional[BaseException] = None
        self.open: dict[int, dict] = {}
        self.tensors_written = 0
        self.shards_written = 0
        self._where: tuple = (partial, "")
        self.stopping = False
        self.pool = ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="neurokern-write")
        self.thread = threading.Thread(target=self._run, name="neurokern-writer", daemon=True)
        self.thread.start()

    def put(self, tensors: dict[str, Tensor], wait: Optional[Callable[[], None]] = None,
            release: Optional[Callable[[], None]] = None, check: Optional[Callable[[], None]] = None) -> None:
        """tensors: host tensors of one unit; wait: blocks until they are filled (D2H done);
        release: called once they are written; check: raises if the unit must not be written (its
        inputs' NaN / Inf check), called after wait."""
        self.check()
        while True:
            try:
                self.queue.put((tensors, wait, release, check), timeout=0.1)
                return
            except queue.Full:
                self.check()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.pool.shutdown(wait=True)
        self.check()

    def abort(self) -> None:
        """Stop after the tensor being written (queued units are dropped), wait for the thread,
        close the open shards: nothing writes into the partial folder once this returns."""
        self.stopping = True
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[2] is not None:
                item[2]()  # give the unit's host buffer back
        self.queue.put(None)
        self.thread.join()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for entry in self.open.values():
            os.close(entry["fd"])
        self.open.clear()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None or self.stopping:
                    return
                tensors, wait, release, check = item
                if wait is not None:
                    with timing.span("writer: wait for D2H"):
                        wait()
                if check is not None:
                    check()
                finished, jobs = [], []
                for name, t in tensors.items():
                    self._where = (self.partial / (self.plan.shards[self.shard_of[name]].file + ".tmp"), name)
                    if self._write(name, t, jobs):
                        finished.append(self.shard_of[name])
                with timing.span("writer: wait for writes"):
                    for job in jobs:
                        job.result()
                if release is not None:
                    release()  # before the shards' fsync: the buffer goes back to the merge loop
                for index in finished:
                    self._finish(self.shards[index], self.open.pop(index))
        except OSError as exc:
            file, name = self._where
            self.error = NeurokernError(
                f"cannot write tensor {name!r} to {exc.filename or file}: {exc.strerror or exc}; the finished shards "
                f"are kept in {self.partial} (rerun with --resume once fixed)")
        except BaseException as exc:  # noqa: BLE001 (re-raised on the main thread)
            self.error = exc

    def _begin(self, shard: Shard) -> dict:
        tmp = self.partial / (shard.file + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        os.pwrite(fd, shard.header, 0)
        return {"fd": fd, "tmp": tmp, "left": len(shard.names), "header": hashlib.sha256(shard.header).digest(),
                "pieces": {}}

    def _write(self, name: str, tensor: Tensor, jobs: list) -> bool:
        """Queue the pwrites and hashes of one tensor's pieces on the pool; True when that was the
        shard's last tensor."""
        index = self.shard_of[name]
        shard = self.shards[index]
        entry = self.open.get(index)
        if entry is None:
            entry = self.open[index] = self._begin(shard)
        start, end = shard.layout[name]
        data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if end > start else memoryview(b"")
        for at in _pieces(start, end):
            jobs.append(self.pool.submit(self._pwrite, entry, data[at - start:at - start + WRITE_PIECE], at, name))
        entry["left"] -= 1
        self.tensors_written += 1
        crash_hook("tensors", self.tensors_written)
        return entry["left"] == 0

    def _pwrite(self, entry: dict, data: memoryview, offset: int, name: str) -> None:
        """Write one piece at its file offset and record its sha256 (dict stores are atomic)."""
        fd = entry["fd"]
        try:
            with timing.busy("writer: pwrite + hash", len(data)):
                done = 0
                while done < len(data):
                    done += os.pwrite(fd, data[done:], offset + done)
                entry["pieces"][offset] = hashlib.sha256(data).digest()
            if self.durable:
                _start_writeback(fd, offset, len(data))
        except OSError as exc:
            raise NeurokernError(
                f"cannot write tensor {name!r} to {exc.filename or entry['tmp']}: {exc.strerror or exc}; the finished "
                f"shards are kept in {self.partial} (rerun with --resume once fixed)") from exc

    def _finish(self, shard: Shard, entry: dict) -> None:
        fd = entry["fd"]
        try:
            if self.durable:
                with timing.span("writer: fsync"):
                    os.fsync(fd)
        finally:
            os.close(fd)
        digest = tree_digest(entry["header"], entry["pieces"])
        os.replace(entry["tmp"], self.partial / shard.file)
        record = {"file": shard.file, "bytes": shard.nbytes, DIGEST: digest}
        done = self.partial / STATE / "done"
        tmp = done / (shard.file + ".json.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, done / (shard.file + ".json"))
        self.shards_written += 1
        crash_hook("shards", self.shards_written)


def _start_writeback(fd: int, start: int, nbytes: int) -> None:
    """Start writing these bytes to disk now (DONTNEED writes dirty pages back without waiting for
    them, then drops the clean ones): the shard's fsync is left little to do, and the output does
    not fill the page cache. Only a hint: where it is not supported, nothing happens."""
    try:
        os.posix_fadvise(fd, start, nbytes, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_published(partial: Path, digest: str) -> bool:
    """True when OUT_DIR.partial is complete and only its rename is left: a run was stopped between
    removing the state and the rename (the manifest, written before, names the same inputs)."""
    if (partial / STATE / "state.json").exists():
        return False
    manifest = _read_json(partial / MANIFEST)
    return manifest is not None and manifest.get("inputs_digest") == digest


def prepare_partial(partial: Path, digest: str, resume: bool) -> None:
    """Create OUT_DIR.partial (or check it for --resume: same config and inputs)."""
    state = partial / STATE / "state.json"
    if partial.exists():
        if not resume:
            raise NeurokernError(f"{partial} holds an interrupted merge; pass --resume to finish it, or delete it")
        saved = _read_json(state)
        if saved is None:
            if is_published(partial, digest):
                return
            leftovers = [q for q in partial.rglob("*") if q.is_file() and not q.name.startswith("state.json")]
            if leftovers or any(q.name != STATE for q in partial.iterdir()):
                raise NeurokernError(f"{partial} is not an interrupted neurokern merge of this config (no "
                                     f"{STATE}/state.json); delete it to start over")
            shutil.rmtree(partial)  # stopped while it was being created: start afresh
        elif saved.get("digest") != digest:
            raise NeurokernError(f"{partial} was made from a different config or different inputs; "
                                 "delete it to start over")
        else:
            for stale in partial.glob("*.tmp"):
                stale.unlink()
            return
    try:
        (partial / STATE / "done").mkdir(parents=True)
        tmp = state.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"digest": digest}))
        os.replace(tmp, state)
    except OSError as exc:
        raise NeurokernError(f"cannot create {partial}: {exc.strerror or exc}") from exc


def publish(partial: Path, out_dir: Path, plan: Plan, side_sources: list[Path], extra_files: dict[str, str],
            manifest: dict, durable: bool = False) -> None:
    """Index, side files, config echo and manifest (the folder fsync'ed when durable), then the
    atomic rename to out_dir."""
    records = {}
    for shard in plan.shards:
        record = done_record(partial, shard)
        if record is None:
            raise NeurokernError(f"internal error: shard {shard.file} is missing from {partial}")
        records[shard.file] = {"bytes": record["bytes"], DIGEST: record[DIGEST]}
    try:
        if len(plan.shards) > 1:
            weight_map = {n: s.file for s in plan.shards for n in s.names}
            weight_map = {n: weight_map[n] for n in plan.tensors}
            index = {"metadata": {"total_size": plan.total_out_bytes}, "weight_map": weight_map}
            (partial / INDEX).write_text(json.dumps(index, indent=2))
        for folder in side_sources:
            if folder.is_dir():
                for side in SIDE_FILES:
                    if (folder / side).is_file() and not (partial / side).exists():
                        shutil.copyfile(folder / side, partial / side)
        for name, text in extra_files.items():
            (partial / name).write_text(text)
        (partial / MANIFEST).write_text(json.dumps({**manifest, "shards": records}, indent=2) + "\n")
        if durable:
            fd = os.open(partial, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as exc:
        raise NeurokernError(f"cannot write {exc.filename or partial}: {exc.strerror or exc}; "
                             f"the merged shards are kept in {partial} (rerun with --resume)") from exc
    crash_hook("publish")
    rename(partial, out_dir)


def rename(partial: Path, out_dir: Path) -> None:
    """Remove the resume state and rename the finished folder to out_dir: the output appears whole."""
    if out_dir.exists():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise NeurokernError(f"output {out_dir} exists and is not an empty folder; the result is in {partial}")
        out_dir.rmdir()
    shutil.rmtree(partial / STATE, ignore_errors=True)
    crash_hook("rename")
    os.replace(partial, out_dir)
