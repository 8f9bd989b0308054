#!/usr/bin/env python3
"""How fast can one output shard be put into the page cache? The engine's writer (8 threads,
8 MiB pwrites into one file, each piece hashed) against other ways of writing the same bytes.

    python3 bench/write_paths.py [--dir /tmp] [--gb 2.2] [--rounds 3] [--out results.json]

Each variant writes the same random bytes to a new file in --dir; the file is evicted from the
page cache (sync + fadvise DONTNEED) and deleted between runs; variants are interleaved over the
rounds and the median is reported. Buffered writes to one ext4 file take its inode lock, so
parallel pwrites to one file serialize, and several files are the control; a shared mapping
avoids the lock but pays a page fault per page. The "over a written file" variants write over a
file of zeros written just before (untimed): its pages are in the page cache already.
"""
import argparse
import hashlib
import json
import mmap
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from neurokern.engine.writer import WRITE_PIECE as PIECE, WRITE_THREADS

FILES = 4  # the several-files variant: the bytes split into this many files


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def pwrite_pool(path, src, threads, hashed, size_first="", files=1):
    """PIECE-byte pwrites from a pool of threads, into one file or split into `files` files
    (pieces handed out round-robin across them); size_first "keep" writes over a file written
    before (its pages in the page cache, dirty)."""
    per = -(-len(src) // files)
    paths = [path] if files == 1 else [f"{path}.{i}" for i in range(files)]
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | (0 if size_first == "keep" else os.O_TRUNC), 0o644) for p in paths]
    if size_first == "ftruncate":
        os.ftruncate(fds[0], len(src))
    view = memoryview(src)

    def piece(at):
        data = view[at:at + PIECE]
        _pwrite_all(fds[at // per], data, at % per)
        if hashed:
            hashlib.sha256(data).digest()

    starts = [f * per + o for o in range(0, per, PIECE) for f in range(files) if f * per + o < len(src)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(piece, starts))
    for fd in fds:
        os.close(fd)


def mmap_pool(path, src, threads, hashed, size_first="ftruncate"):
    """The same pieces copied into a shared mapping of the file (sized by ftruncate or fallocate;
    "keep": a file written before, whose size it has)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | (0 if size_first == "keep" else os.O_TRUNC), 0o644)
    if size_first == "fallocate":
        os.posix_fallocate(fd, 0, len(src))
    elif size_first == "ftruncate":
        os.ftruncate(fd, len(src))
    mapped = mmap.mmap(fd, len(src))
    dst = np.frombuffer(mapped, dtype=np.uint8)

    def piece(at):
        dst[at:at + PIECE] = src[at:at + PIECE]  # numpy drops the GIL for the copy
        if hashed:
            hashlib.sha256(src[at:at + PIECE]).digest()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(piece, range(0, len(src), PIECE)))
    del dst
    mapped.close()
    os.close(fd)


W = WRITE_THREADS
VARIANTS = {
    f"engine: pwrite {W} threads + sha256": lambda p, s: pwrite_pool(p, s, W, True),
    f"pwrite {W} threads, no hash": lambda p, s: pwrite_pool(p, s, W, False),
    "pwrite 1 thread, no hash": lambda p, s: pwrite_pool(p, s, 1, False),
    f"pwrite {W} threads + sha256, ftruncate first": lambda p, s: pwrite_pool(p, s, W, True, "ftruncate"),
    f"mmap {W} threads + sha256 (ftruncate)": lambda p, s: mmap_pool(p, s, W, True),
    f"mmap {W} threads + sha256 (fallocate)": lambda p, s: mmap_pool(p, s, W, True, "fallocate"),
    f"mmap {2 * W} threads + sha256 (fallocate)": lambda p, s: mmap_pool(p, s, 2 * W, True, "fallocate"),
    f"{FILES} files, pwrite {W} threads + sha256": lambda p, s: pwrite_pool(p, s, W, True, files=FILES),
    f"over a written file: pwrite {W} threads + sha256": lambda p, s: pwrite_pool(p, s, W, True, "keep"),
    f"over a written file: mmap {W} threads + sha256": lambda p, s: mmap_pool(p, s, W, True, "keep"),
}
# Untimed, before a variant: the file it writes over (zeros, left dirty in the page cache)
PREPARE = {name: (lambda p, s: pwrite_pool(p, np.zeros_like(s), W, False)) for name in VARIANTS if name.startswith("over")}


def _cleanup(path):
    for p in [path] + [f"{path}.{i}" for i in range(FILES)]:
        if os.path.exists(p):
            fd = os.open(p, os.O_RDONLY)
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            os.unlink(p)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--gb", type=float, default=2.2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    src = np.random.default_rng(0).integers(0, 256, int(args.gb * 1e9), dtype=np.uint8)
    path = os.path.join(args.dir, "neurokern-write-bench.bin")
    times = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, fn in VARIANTS.items():
            _cleanup(path)
            os.sync()
            if name in PREPARE:
                PREPARE[name](path, src)
            t = time.perf_counter()
            fn(path, src)
            times[name].append(time.perf_counter() - t)
    _cleanup(path)
    res = {"dir": args.dir, "GB": len(src) / 1e9, "cpus": os.cpu_count(), "variants": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        res["variants"][name] = {"s": round(med, 3), "GBps": round(len(src) / med / 1e9, 2), "runs": [round(t, 3) for t in ts]}
        print(f"{name:48s} {len(src) / med / 1e9:6.2f} GB/s  {[round(t, 2) for t in ts]}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
