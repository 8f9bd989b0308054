"""NEUROKERN_PROFILE=1: where the time of a merge goes, printed to stderr when merge_models ends.
NEUROKERN_TRACE=FILE.json: every timed block as a timeline (Chrome trace format: chrome://tracing,
ui.perfetto.dev), one row per thread, in seconds since the process started.

Seconds are summed per key within a section (start-up, then one section per pass, then the end).
`span(key)` times a block on any thread; `busy(key, nbytes)` also tracks overlapping blocks (the
reader's parallel reads) as the wall time during which at least one was running, the thread-seconds
and the bytes. Off (the default), every call returns at once."""
import json
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

PROFILE = os.environ.get("NEUROKERN_PROFILE", "") not in ("", "0")
TRACE = os.environ.get("NEUROKERN_TRACE", "")
ENABLED = PROFILE or bool(TRACE)
_OFF = nullcontext()


class _Busy:
    def __init__(self):
        self.running, self.since, self.wall, self.thread_s, self.nbytes = 0, 0.0, 0.0, 0.0, 0


_lock = threading.Lock()
_sections: dict[str, dict[str, float]] = {}
_busy: dict[tuple[str, str], _Busy] = {}
_section = "start-up"
_events: list[tuple] = []  # (key, section, thread, start, end, nbytes) of every block, when tracing


def section(name: str) -> None:
    """Later figures go to section `name` (a pass, or "end")."""
    global _section
    again = name == _section
    _section = name
    if TRACE and (not again or name == "start-up"):  # start-up: each merge_models call begins one
        now = time.perf_counter()
        _record(f"section {name}", now, now, 0)


def _record(key: str, start: float, end: float, nbytes: int) -> None:
    with _lock:
        _events.append((key, _section, threading.current_thread().name, start, end, nbytes))


def add(key: str, seconds: float) -> None:
    if ENABLED:
        with _lock:
            figures = _sections.setdefault(_section, {})
            figures[key] = figures.get(key, 0.0) + seconds


def span(key: str):
    return _span(key) if ENABLED else _OFF


@contextmanager
def _span(key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        end = time.perf_counter()
        add(key, end - start)
        if TRACE:
            _record(key, start, end, 0)


def busy(key: str, nbytes: int):
    return _busy_span(key, nbytes) if ENABLED else _OFF


@contextmanager
def _busy_span(key: str, nbytes: int):
    start = time.perf_counter()
    with _lock:
        b = _busy.setdefault((_section, key), _Busy())
        if b.running == 0:
            b.since = start
        b.running += 1
    try:
        yield
    finally:
        end = time.perf_counter()
        with _lock:
            b.running -= 1
            b.thread_s += end - start
            b.nbytes += nbytes
            if b.running == 0:
                b.wall += end - b.since
        if TRACE:
            _record(key, start, end, nbytes)


def _process_age() -> float:
    """Seconds since this process started (Linux); 0 where unknown."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def add_process_age(key: str) -> None:
    """Seconds since this process started: at the start of merge_models from the command line, the
    interpreter's start-up and the imports; at its end, what is left is the exit."""
    if ENABLED:
        add(key, _process_age())


def _write_trace(path: str, recorded: list[tuple]) -> None:
    """The recorded blocks as Chrome trace events (microseconds since the process started)."""
    base = time.perf_counter() - _process_age()
    threads: dict[str, int] = {}
    events = []
    for key, where, thread, start, end, nbytes in recorded:
        tid = threads.setdefault(thread, len(threads))
        event = {"name": key, "cat": where, "pid": 0, "tid": tid, "ts": round((start - base) * 1e6, 1)}
        if key.startswith("section "):  # a pass begins: a line across every thread
            event.update(ph="i", s="g")
        else:
            event.update(ph="X", dur=round((end - start) * 1e6, 1), args={"bytes": nbytes} if nbytes else {})
        events.append(event)
    events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": thread}}
               for thread, tid in threads.items()]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    os.replace(tmp, path)


def report(file=None) -> None:
    """Print every section's figures (and write the trace), then forget them: the next merge
    starts afresh."""
    if TRACE:
        with _lock:
            events, _events[:] = list(_events), []
        try:
            _write_trace(TRACE, events)
        except OSError as exc:
            print(f"neurokern: cannot write the trace {TRACE}: {exc.strerror or exc}", file=file or sys.stderr)
    if not PROFILE:
        with _lock:
            _sections.clear()
            _busy.clear()
        return
    lines = ["neurokern profile (NEUROKERN_PROFILE=1), seconds:"]
    with _lock:
        for name in dict.fromkeys([*_sections, *(where for where, _ in _busy)]):
            lines.append(f"  [{name}]")
            lines += [f"    {key:<56} {s:8.3f}" for key, s in _sections.get(name, {}).items()]
            for (where, key), b in _busy.items():
                if where == name:
                    rate = b.nbytes / b.wall / 1e9 if b.wall else 0.0
                    lines.append(f"    {key + ' busy (any in flight)':<56} {b.wall:8.3f}   {b.nbytes / 1e9:.2f} GB, "
                                 f"{rate:.2f} GB/s while busy, {b.thread_s:.1f} thread-s")
        _sections.clear()
        _busy.clear()
    try:  # bytes this process made the kernel fetch from or send to storage (page cache misses)
        with open("/proc/self/io") as f:
            io = dict(line.split(": ") for line in f.read().splitlines())
        lines.append(f"  disk I/O of the process so far: read {int(io['read_bytes']) / 1e9:.2f} GB, "
                     f"written {int(io['write_bytes']) / 1e9:.2f} GB")
    except (OSError, ValueError, KeyError):
        pass
    print("\n".join(lines), file=file or sys.stderr)
