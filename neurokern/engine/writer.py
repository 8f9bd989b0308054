"""Output: shards written into OUT_DIR.partial/ next to OUT_DIR, renamed there once complete.

Each shard file is laid out up front from the plan (header first), filled by pwrite as merged
tensors arrive on the writer thread, renamed from `<file>.tmp` to `<file>`, and recorded (bytes,
digest) in `.neurokern/done/<file>.json`. A resumed run checks the recorded shards against their
digest and skips those that match. At the end rank 0 adds the index, the side files (config.json,
tokenizer files), the config echo and the manifest, removes `.neurokern/`, and renames the folder
to OUT_DIR: output appears only complete.

Rank 0 holds an exclusive advisory lock (flock) on the OUT_DIR.partial folder from before it
looks at it until the merge ends: a second merge (with or without --resume) is refused and
touches nothing. `.neurokern/state.json` binds the folder to the plan digest and to a fingerprint
of every input file (engine/files.py: size, mtime, sampled bytes), which a resumed run compares;
`.neurokern/global.json` holds the pre-pass results with a sha256 over them and the plan digest.
A failure to write (a full disk, the publish step, OUT_DIR taken meanwhile) raises
KeptPartialError: the folder and its finished shards are kept for --resume.

The digest (`sha256_tree` in the records and the manifest) is the sha256 of the concatenated
sha256 digests of the header and of every WRITE_PIECE-byte piece of each tensor's bytes, in file
order: the pieces are hashed in parallel as they are written (one sha256 stream runs at about 1 GB/s,
slower than the merge).

`discard` (merge_models(discard_output=True), benchmarks): every piece is hashed as above and
nothing is written; the records hold the digests (Result.shard_digests), no shard file exists.

Ranks: every rank writes its shards into the same OUT_DIR.partial, so all ranks must see one file
system there (a folder on a mount that every node shares). `check_shared` verifies it before
anything is written: rank 0 leaves a random token in the folder, every rank reads it back.

Durability: by default the bytes are left to the page cache (as mergekit and save_pretrained do):
the output is whole or absent after a crash of the process, and the disk is not kept busy writing
the output while the merge still reads its inputs. `durable` (--fsync) also survives a power loss: the writeback of
each tensor starts at once, every shard is fsync'ed before it is recorded, and so is the folder
before the rename.
"""
import fcntl
import hashlib
import json
import os
import queue
import shutil
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from neurokern.checkpoint import INDEX
from neurokern.engine.files import open_regular
from neurokern.engine.plan import OUT_SLOTS, Plan, Shard
from neurokern.engine.timing import Recorder
from neurokern.errors import NeurokernError

# A unit's tensors are written by a pool of threads in pieces while the writer thread hashes them
# in file order: writing and hashing overlap, and neither is one thread's copy speed.
WRITE_THREADS = 8
WRITE_PIECE = 8 * 2**20
DIGEST = "sha256_tree"
STATE = ".neurokern"
MANIFEST = "neurokern_manifest.json"
CONFIG_ECHO = "neurokern_config.yml"
OWNER = "owner.json"  # in STATE: the process holding the lock


class KeptPartialError(NeurokernError):
    """An error after which OUT_DIR.partial is kept, finished shards and all, for --resume (the
    message says so): the output could not be written or put in place, the inputs are fine."""


def notice(text: str) -> None:
    """One line on stderr that is no error: what a resumed run redid, a lock that could not be taken."""
    print(f"neurokern: {text}", file=sys.stderr, flush=True)


def partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


def done_record(partial: Path, shard: Shard, verify: bool = False) -> tuple[Optional[dict], str]:
    """(the record of a finished shard, "") if its file has the planned size, and with verify its
    recorded digest (a resumed run: without fsync a power loss can leave a record whose bytes never
    reached the disk); else (None, why not: "" when the shard has no record)."""
    path = partial / STATE / "done" / (shard.file + ".json")
    record = _read_json(path)
    if record is None:
        return None, "its record is unreadable" if path.exists() else ""
    if record.get("bytes") != shard.nbytes or not isinstance(record.get(DIGEST), str):
        return None, "its record does not match the plan"
    try:
        size = (partial / shard.file).stat().st_size
        if size != shard.nbytes:
            return None, f"it has {size} bytes, not {shard.nbytes}"
        if verify and file_digest(partial / shard.file, shard) != record[DIGEST]:
            return None, "its bytes differ from the recorded digest"
    except OSError as exc:
        return None, f"it cannot be read ({exc.strerror or exc})"
    return record, ""


def recorded_digests(partial: Path, plan: Plan) -> dict[str, str]:
    """file -> sha256_tree of every shard, from the records the writers left (discard: no file)."""
    digests = {}
    for shard in plan.shards:
        record = _read_json(partial / STATE / "done" / (shard.file + ".json"))
        if record is None or not isinstance(record.get(DIGEST), str):
            raise NeurokernError(f"internal error: shard {shard.file} has no record in {partial}")
        digests[shard.file] = record[DIGEST]
    return digests


SHARED = "shared.json"  # in STATE: rank 0's token, which every rank reads back (check_shared)


def check_shared(partial: Path, ranks, digest: str) -> None:
    """Under torchrun: every rank must see the OUT_DIR.partial that rank 0 prepared (one shared file
    system) and have made the same plan (the same config and inputs: nodes may hold their own
    copies of the inputs, at the same paths), or every rank raises the same error before anything
    is written. Rank 0 writes a random token and its plan digest into the folder and hands the
    token to the others in an all-reduce; each rank reads the file back, and the ranks that could
    not, or whose plan differs, are summed. ranks: engine.distributed.Ranks."""
    if ranks.world == 1:
        return
    token = int.from_bytes(os.urandom(7), "little") if ranks.is_main else 0
    if ranks.is_main:
        try:
            write_atomic(partial / STATE / SHARED, json.dumps({"token": token, "digest": digest}).encode())
        except OSError as exc:
            raise NeurokernError(f"cannot write into {partial}: {exc.strerror or exc}") from exc
    token = int(ranks.sum_(torch.tensor([token], dtype=torch.int64)).item())
    found = _read_json(partial / STATE / SHARED) or {}
    seen, same = found.get("token") == token, found.get("digest") == digest
    flags = torch.zeros(2 * ranks.world, dtype=torch.int64)
    flags[2 * ranks.rank] = int(not seen)
    flags[2 * ranks.rank + 1] = int(seen and not same)
    flags = ranks.sum_(flags).tolist()
    blind = [r for r in range(ranks.world) if flags[2 * r]]
    other = [r for r in range(ranks.world) if flags[2 * r + 1]]
    me = f" (this is rank {ranks.rank}, on {socket.gethostname()})"
    if blind:
        raise NeurokernError(
            f"{partial}, made by rank 0, is not visible to rank(s) {', '.join(map(str, blind))}"
            f"{me if not seen else ''}: under torchrun every rank writes its shards into that folder, so OUT_DIR "
            "must be on a file system that every node mounts at the same path (NFS, Lustre, ...)")
    if other:
        raise NeurokernError(
            f"rank(s) {', '.join(map(str, other))}{me if not same else ''} made another plan than rank 0 (a "
            "different config, or different input files at the same paths): every node must read the same config "
            "and the same inputs")


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

    def __init__(self, partial: Path, plan: Plan, shards: list[int], durable: bool = False, discard: bool = False,
                 recorder: Optional[Recorder] = None):
        self.partial, self.plan, self.durable, self.discard = partial, plan, durable, discard
        self.recorder = recorder or Recorder()
        self.shards = {i: plan.shards[i] for i in shards}
        self.shard_of = plan.shard_of()
        self.queue: queue.Queue = queue.Queue(maxsize=OUT_SLOTS)
        self.error: Optional[BaseException] = None
        self.open: dict[int, dict] = {}
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
            if entry["fd"] is not None:
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
                    with self.recorder.span("writer: wait for D2H"):
                        wait()
                if check is not None:
                    check()
                finished, jobs = [], []
                for name, t in tensors.items():
                    self._where = (self.partial / (self.plan.shards[self.shard_of[name]].file + ".tmp"), name)
                    if self._write(name, t, jobs):
                        finished.append(self.shard_of[name])
                with self.recorder.span("writer: wait for writes"):
                    for job in jobs:
                        job.result()
                if release is not None:
                    release()  # before the shards' fsync: the buffer goes back to the merge loop
                for index in finished:
                    self._finish(self.shards[index], self.open.pop(index))
        except OSError as exc:
            file, name = self._where
            self.error = KeptPartialError(
                f"cannot write tensor {name!r} to {exc.filename or file}: {exc.strerror or exc}; the finished shards "
                f"are kept in {self.partial} (rerun with --resume once fixed)")
        except BaseException as exc:  # noqa: BLE001 (re-raised on the main thread)
            self.error = exc

    def _begin(self, shard: Shard) -> dict:
        tmp = self.partial / (shard.file + ".tmp")
        fd = None
        if not self.discard:
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
        return entry["left"] == 0

    def _pwrite(self, entry: dict, data: memoryview, offset: int, name: str) -> None:
        """Write one piece at its file offset and record its sha256 (dict stores are atomic)."""
        fd = entry["fd"]
        try:
            with self.recorder.busy("writer: pwrite + hash", len(data)):
                done = 0 if fd is not None else len(data)  # discard: hashed only
                while done < len(data):
                    done += os.pwrite(fd, data[done:], offset + done)
                entry["pieces"][offset] = hashlib.sha256(data).digest()
            if self.durable and fd is not None:
                _start_writeback(fd, offset, len(data))
        except OSError as exc:
            raise KeptPartialError(
                f"cannot write tensor {name!r} to {exc.filename or entry['tmp']}: {exc.strerror or exc}; the finished "
                f"shards are kept in {self.partial} (rerun with --resume once fixed)") from exc

    def _finish(self, shard: Shard, entry: dict) -> None:
        fd = entry["fd"]
        if fd is not None:
            try:
                if self.durable:
                    with self.recorder.span("writer: fsync"):
                        os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(entry["tmp"], self.partial / shard.file)
        digest = tree_digest(entry["header"], entry["pieces"])
        record = {"file": shard.file, "bytes": shard.nbytes, DIGEST: digest}
        write_atomic(self.partial / STATE / "done" / (shard.file + ".json"), json.dumps(record).encode())


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


def write_atomic(path: Path, data: bytes) -> None:
    """path holds data, or what it held before: written into path.tmp, then renamed over it.
    An OSError names path (a failed write names no file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    os.replace(tmp, path)


def _copy_atomic(source: Path, path: Path) -> None:
    """write_atomic for a copy of the regular file source."""
    fd = open_regular(source)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with os.fdopen(fd, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    os.replace(tmp, path)


def _canonical(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def is_published(partial: Path, digest: str) -> bool:
    """True when OUT_DIR.partial is complete and only its rename is left: a run was stopped between
    removing the state and the rename (the manifest, written before, names the same inputs)."""
    if (partial / STATE / "state.json").exists():
        return False
    manifest = _read_json(partial / MANIFEST)
    return manifest is not None and manifest.get("inputs_digest") == digest


def _owner(partial: Path) -> str:
    owner = _read_json(partial / STATE / OWNER)
    if owner is None:
        return "its process is not recorded yet"
    return f"pid {owner.get('pid')} on {owner.get('host')}"


def lock_partial(partial: Path) -> tuple[int, bool]:
    """Create OUT_DIR.partial if it does not exist and lock it (flock, exclusive, on the folder
    itself: the lock follows it through the final rename). Returns the descriptor that holds the
    lock until closed or the process ends, and whether this call created the folder. A merge
    already holding it is an error that names its process. On a file system without locks the
    merge goes on unlocked, with a notice."""
    if partial.is_symlink() or (partial.exists() and not partial.is_dir()):
        raise NeurokernError(f"{partial} exists and is not a folder; neurokern did not make it, delete it")
    while True:
        try:
            partial.mkdir()
            created = True
        except FileExistsError:
            created = False
        except OSError as exc:
            raise NeurokernError(f"cannot create {partial}: {exc.strerror or exc}") from exc
        try:
            fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # removed since the mkdir: again
        except OSError as exc:
            raise NeurokernError(f"cannot open {partial}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NeurokernError(f"another merge is running in {partial} ({_owner(partial)}); wait for it to end, "
                                 "or stop it and rerun with --resume") from None
        except OSError as exc:
            notice(f"cannot lock {partial} ({exc.strerror or exc}); make sure no other merge writes into it")
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(partial, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:  # the folder at that path still (a merge ending after the mkdir removes or renames it)
            try:
                (partial / STATE).mkdir(exist_ok=True)
                write_atomic(partial / STATE / OWNER, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
            except OSError as exc:
                os.close(fd)
                raise NeurokernError(f"cannot write into {partial}: {exc.strerror or exc}") from exc
            return fd, created
        os.close(fd)


def prepare_partial(partial: Path, digest: str, fingerprints: Callable[[], dict], resume: bool) -> bool:
    """With the lock held: start OUT_DIR.partial afresh (True), or check an interrupted merge in it
    for --resume (False): same plan digest, and every input file's fingerprint (fingerprints():
    path -> engine.files.fingerprint) as recorded when it began."""
    state = partial / STATE / "state.json"
    saved = _read_json(state)
    if saved is None:
        contents = [q for q in partial.iterdir() if q.name != STATE]  # a run stopped while it began leaves none
        contents += [q for q in (partial / STATE).rglob("*")
                     if q.is_file() and q.name not in (OWNER, OWNER + ".tmp", "state.json.tmp")]
        if contents:
            if is_published(partial, digest):
                if resume:
                    return False
                raise NeurokernError(f"{partial} holds a finished merge whose rename was interrupted; pass --resume "
                                     "to put it in place")
            raise NeurokernError(f"{partial} is not an interrupted neurokern merge of this config "
                                 f"({STATE}/state.json is missing or unreadable); delete it to start over")
    elif not resume:
        raise NeurokernError(f"{partial} holds an interrupted merge; pass --resume to finish it, or delete it")
    elif saved.get("digest") != digest:
        raise NeurokernError(f"{partial} was made from a different config or different inputs; "
                             "delete it to start over")
    else:
        recorded = saved.get("inputs")
        if not isinstance(recorded, dict):
            raise NeurokernError(f"{partial} records no fingerprints of its inputs (made by an older neurokern); "
                                 "delete it to start over")
        for file, now in fingerprints().items():
            before = recorded.get(file) or [None] * len(now)
            if before != now:
                changed = [what for what, b, n in zip(("size", "modification time", "sampled bytes"), before, now) if b != n]
                raise NeurokernError(f"inputs changed since the interrupted run: {file} ({', '.join(changed)} changed); "
                                     f"the merge in {partial} cannot be finished with them, delete it to start over")
        for stale in partial.glob("*.tmp"):
            stale.unlink()
        return False
    try:
        (partial / STATE / "done").mkdir(parents=True, exist_ok=True)
        write_atomic(state, json.dumps({"digest": digest, "inputs": fingerprints()}).encode())
    except OSError as exc:
        raise NeurokernError(f"cannot create {partial}: {exc.strerror or exc}") from exc
    return True


def save_global(partial: Path, digest: str, values: dict) -> None:
    """The pre-pass results (JSON values) for a resumed run, bound to the plan digest by a sha256."""
    body = {"plan": digest, "values": values}
    try:
        write_atomic(partial / STATE / "global.json",
                     json.dumps({**body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}).encode())
    except OSError as exc:
        raise KeptPartialError(f"cannot write {partial / STATE / 'global.json'}: {exc.strerror or exc}; "
                               f"{partial} is kept (rerun with --resume once fixed)") from exc


def load_global(partial: Path, digest: str) -> tuple[Optional[dict], str]:
    """(values, "") as save_global stored them for this plan; (None, "") when there are none;
    (None, why they cannot be used) when the file is garbled or does not match its sha256."""
    path = partial / STATE / "global.json"
    if not path.exists():
        return None, ""
    data = _read_json(path)
    if data is None:
        return None, f"{path} is not valid JSON"
    body = {"plan": data.get("plan"), "values": data.get("values")}
    if data.get("sha256") != hashlib.sha256(_canonical(body)).hexdigest() or not isinstance(body["values"], dict):
        return None, f"{path} does not match its sha256"
    if body["plan"] != digest:
        return None, f"{path} was made for another plan"
    return body["values"], ""


def publish(partial: Path, out_dir: Path, plan: Plan, side_files: dict[str, Path], extra_files: dict[str, str],
            manifest: dict, durable: bool = False) -> None:
    """Index, side files (name -> source), config echo and manifest (the folder fsync'ed when
    durable), then the atomic rename to out_dir. Any failure keeps the folder for --resume, which
    writes these files again."""
    try:
        records = {}
        for shard in plan.shards:
            record, _ = done_record(partial, shard)
            if record is None:
                raise NeurokernError(f"internal error: shard {shard.file} is missing from {partial}")
            records[shard.file] = {"bytes": record["bytes"], DIGEST: record[DIGEST]}
        if len(plan.shards) > 1:
            weight_map = {n: s.file for s in plan.shards for n in s.names}
            weight_map = {n: weight_map[n] for n in plan.tensors}
            index = {"metadata": {"total_size": plan.total_out_bytes}, "weight_map": weight_map}
            write_atomic(partial / INDEX, json.dumps(index, indent=2).encode())
        for name, source in side_files.items():
            _copy_atomic(source, partial / name)
        for name, text in extra_files.items():
            write_atomic(partial / name, text.encode())
        write_atomic(partial / MANIFEST, (json.dumps({**manifest, "shards": records}, indent=2) + "\n").encode())
        if durable:
            fd = os.open(partial, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as exc:
        raise KeptPartialError(f"cannot write {exc.filename or partial}: {exc.strerror or exc}; the merged shards are "
                               f"kept in {partial} (rerun with --resume once fixed)") from exc
    except NeurokernError as exc:
        raise KeptPartialError(f"{exc}; the merged shards are kept in {partial} (rerun with --resume once fixed)") from exc
    rename(partial, out_dir)


def remove_state(partial: Path) -> None:
    """Remove the resume state (.neurokern/) of a complete folder: from then on a stopped run leaves
    a folder that is_published recognises, and --resume has only the rename left to do."""
    shutil.rmtree(partial / STATE, ignore_errors=True)


def rename(partial: Path, out_dir: Path) -> None:
    """Remove the resume state and rename the finished folder to out_dir: the output appears whole.
    An out_dir that is no empty folder (made while the merge ran) keeps the result in partial."""
    try:
        if out_dir.is_symlink() or out_dir.exists():
            if out_dir.is_symlink() or not out_dir.is_dir() or any(out_dir.iterdir()):
                raise KeptPartialError(f"output {out_dir} exists and is not an empty folder; the merged model is in "
                                       f"{partial}: move {out_dir} away, then rerun with --resume to put it in place")
            out_dir.rmdir()
        remove_state(partial)
        os.replace(partial, out_dir)
    except OSError as exc:
        raise KeptPartialError(f"cannot rename {partial} to {out_dir}: {exc.strerror or exc}; the merged model is in "
                               f"{partial} (rerun with --resume once fixed)") from exc
