"""Warm-up reads while a merge starts. From the moment the config is read, threads read the inputs
into the page cache, in the order the work units will need them, while torch and the kernels are
imported, the GPU is initialised, the plan is made and the first host buffers are pinned; the
reader then finds those bytes in memory. At most a quarter of the memory available is warmed, and
nothing for a resumed run or under torchrun (each rank reads only its own shards).
NEUROKERN_PREFETCH=0 (EngineSettings.prefetch) turns it off. This module does not import torch, so that the command line can
start it first."""
import os
import threading
from pathlib import Path
from typing import Iterator, Optional

from neurokern.config import MergeConfig
from neurokern.engine.files import read_header, weight_files
from neurokern.engine.settings import EngineSettings
from neurokern.engine.timing import Recorder
from neurokern.errors import NeurokernError

THREADS = 16
PIECE = 32 * 2**20  # bytes per read


class _Warmup:
    def __init__(self, key: tuple, pieces: Iterator[tuple[Path, int, int]], recorder: Recorder):
        self.key, self.pieces, self.recorder = key, pieces, recorder
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._read, name="neurokern-warmup", daemon=True)
                        for _ in range(THREADS)]
        for thread in self.threads:
            thread.start()

    def _read(self) -> None:
        # sendfile to /dev/null reads a file range into the page cache without a buffer here
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            while not self.stop.is_set():
                with self.lock:
                    piece = next(self.pieces, None)
                if piece is None:
                    return
                file, offset, nbytes = piece
                with self.recorder.busy("warm-up read", nbytes):
                    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)  # checked regular; never block
                    try:
                        done = 0
                        while done < nbytes:
                            sent = os.sendfile(null, fd, offset + done, nbytes - done)
                            if sent <= 0:
                                break
                            done += sent
                    finally:
                        os.close(fd)
        except OSError:
            return  # a file changed or sendfile cannot: the reader reads (and reports) anyway
        finally:
            os.close(null)


_current: Optional[_Warmup] = None


def start(cfg: MergeConfig, settings: EngineSettings, recorder: Recorder, resume: bool = False) -> None:
    """Warm the inputs of `cfg`, unless off (settings.prefetch), resumed, under torchrun or already
    warming them; the reads are timed into recorder (the merge's)."""
    global _current
    key = (cfg.base_model, *cfg.models)
    if not settings.prefetch or resume or int(os.environ.get("WORLD_SIZE", "1")) > 1 or (_current and _current.key == key):
        return
    stop()
    limit = _memory_available() // 4
    try:
        inputs = [_byte_ranges(path) for path in key]
    except NeurokernError:
        return  # bad inputs: the engine says what is wrong with them
    if limit > 0:
        recorder.add_process_age("process age at the warm-up start")
        _current = _Warmup(key, _pieces(inputs, limit), recorder)


def stop() -> None:
    """End the warm-up: the threads finish the read they are in."""
    global _current
    if _current is not None:
        _current.stop.set()
        for thread in _current.threads:
            thread.join()
        _current = None


def _byte_ranges(path: Path) -> dict[str, tuple[Path, int, int]]:
    """name -> (file, start, end) of every tensor of a safetensors model, in the model's order."""
    ranges = {}
    for file in weight_files(path, allow_pickle=False):
        entries, _ = read_header(file)
        for e in entries:
            ranges[e.name] = (file, e.start, e.start + e.nbytes)
    return ranges


def _pieces(inputs: list[dict], limit: int) -> Iterator[tuple[Path, int, int]]:
    """(file, offset, nbytes) in the order of the work units (the base's tensor order), up to
    `limit` bytes: windows of consecutive tensors (about PIECE bytes of the base), and in each
    window every model's bytes, contiguous ranges of a file read as one."""
    names, total = list(inputs[0]), 0
    window, size = [], 0
    for i, name in enumerate(names):
        window.append(name)
        size += inputs[0][name][2] - inputs[0][name][1]
        if size < PIECE and i + 1 < len(names):
            continue
        for ranges in inputs:
            spans: list[list] = []
            for n in window:
                if n not in ranges:
                    continue
                file, start, end = ranges[n]
                if spans and spans[-1][0] == file and spans[-1][2] == start:
                    spans[-1][2] = end
                else:
                    spans.append([file, start, end])
            for file, start, end in spans:
                for at in range(start, end, PIECE):
                    nbytes = min(PIECE, end - at)
                    yield file, at, nbytes
                    total += nbytes
                    if total >= limit:
                        return
        window, size = [], 0


def _memory_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
