"""Where the time of a merge goes: a Recorder, made per merge_models call from its settings
(EngineSettings.profile / .trace, the NEUROKERN_PROFILE and NEUROKERN_TRACE variables) and handed to
the code that times its blocks.

NEUROKERN_PROFILE=1: the figures, printed to stderr when merge_models ends. Seconds are summed per
key within a section (start-up, then one section per pass, then the end). `span(key)` times a block
on any thread; `busy(key, nbytes)` also tracks overlapping blocks (the reader's parallel reads) as
the wall time during which at least one was running, the thread-seconds and the bytes.
NEUROKERN_TRACE=FILE.json: every timed block as a timeline (Chrome trace format: chrome://tracing,
ui.perfetto.dev), one row per thread, in seconds since the process started, written by the Recorder.

Every block is also a torch.profiler.record_function ("neurokern: <key>") once torch is imported,
on or off: a torch.profiler trace of the caller shows the engine's blocks. This module never
imports torch (the command line times its warm-up reads while torch is being imported)."""
import json
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext


def _timeline(key: str):
    """torch.profiler.record_function of the block once torch is imported, else no context. A
    thread never waits here for an import of torch in progress (module.__spec__._initializing is
    set while its code runs)."""
    torch = sys.modules.get("torch")
    if torch is None or getattr(getattr(torch, "__spec__", None), "_initializing", True):
        return nullcontext()
    return torch.profiler.record_function(f"neurokern: {key}")


class _Busy:
    def __init__(self):
        self.running, self.since, self.wall, self.thread_s, self.nbytes = 0, 0.0, 0.0, 0.0, 0


class Recorder:
    """The figures (profile) and blocks (trace) of one merge; off (neither asked), a block is only
    its record_function."""

    def __init__(self, profile: bool = False, trace: str = ""):
        self.profile, self.trace = profile, trace
        self.enabled = profile or bool(trace)
        self._lock = threading.Lock()
        self._sections: dict[str, dict[str, float]] = {}
        self._busy: dict[tuple[str, str], _Busy] = {}
        self._section = "start-up"
        self._events: list[tuple] = []  # (key, section, thread, start, end, nbytes) of every block, when tracing

    @classmethod
    def from_settings(cls, settings) -> "Recorder":
        """From an EngineSettings' profile and trace."""
        return cls(settings.profile, settings.trace)

    def section(self, name: str) -> None:
        """Later figures go to section `name` (a pass, or "end")."""
        again = name == self._section
        self._section = name
        if self.trace and (not again or name == "start-up"):  # start-up: the merge begins
            now = time.perf_counter()
            self._record(f"section {name}", now, now, 0)

    def _record(self, key: str, start: float, end: float, nbytes: int) -> None:
        with self._lock:
            self._events.append((key, self._section, threading.current_thread().name, start, end, nbytes))

    def add(self, key: str, seconds: float) -> None:
        if self.enabled:
            with self._lock:
                figures = self._sections.setdefault(self._section, {})
                figures[key] = figures.get(key, 0.0) + seconds

    def span(self, key: str):
        return self._span(key) if self.enabled else _timeline(key)

    @contextmanager
    def _span(self, key: str):
        start = time.perf_counter()
        try:
            with _timeline(key):
                yield
        finally:
            end = time.perf_counter()
            self.add(key, end - start)
            if self.trace:
                self._record(key, start, end, 0)

    def busy(self, key: str, nbytes: int):
        return self._busy_span(key, nbytes) if self.enabled else _timeline(key)

    @contextmanager
    def _busy_span(self, key: str, nbytes: int):
        start = time.perf_counter()
        with self._lock:
            b = self._busy.setdefault((self._section, key), _Busy())
            if b.running == 0:
                b.since = start
            b.running += 1
        try:
            with _timeline(key):
                yield
        finally:
            end = time.perf_counter()
            with self._lock:
                b.running -= 1
                b.thread_s += end - start
                b.nbytes += nbytes
                if b.running == 0:
                    b.wall += end - b.since
            if self.trace:
                self._record(key, start, end, nbytes)

    def add_process_age(self, key: str) -> None:
        """Seconds since this process started: at the start of merge_models from the command line,
        the interpreter's start-up and the imports; at its end, what is left is the exit."""
        if self.enabled:
            self.add(key, _process_age())

    def report(self, file=None) -> None:
        """Print every section's figures (profile) and write the trace file."""
        if self.trace:
            with self._lock:
                events = list(self._events)
            try:
                _write_trace(self.trace, events)
            except OSError as exc:
                print(f"neurokern: cannot write the trace {self.trace}: {exc.strerror or exc}", file=file or sys.stderr)
        if not self.profile:
            return
        lines = ["neurokern profile (NEUROKERN_PROFILE=1), seconds:"]
        with self._lock:
            for name in dict.fromkeys([*self._sections, *(where for where, _ in self._busy)]):
                lines.append(f"  [{name}]")
                lines += [f"    {key:<56} {s:8.3f}" for key, s in self._sections.get(name, {}).items()]
                for (where, key), b in self._busy.items():
                    if where == name:
                        rate = b.nbytes / b.wall / 1e9 if b.wall else 0.0
                        lines.append(f"    {key + ' busy (any in flight)':<56} {b.wall:8.3f}   {b.nbytes / 1e9:.2f} GB, "
                                     f"{rate:.2f} GB/s while busy, {b.thread_s:.1f} thread-s")
        try:  # bytes this process made the kernel fetch from or send to storage (page cache misses)
            with open("/proc/self/io") as f:
                io = dict(line.split(": ") for line in f.read().splitlines())
            lines.append(f"  disk I/O of the process so far: read {int(io['read_bytes']) / 1e9:.2f} GB, "
                         f"written {int(io['write_bytes']) / 1e9:.2f} GB")
        except (OSError, ValueError, KeyError):
            pass
        print("\n".join(lines), file=file or sys.stderr)


def _process_age() -> float:
    """Seconds since this process started (Linux); 0 where unknown."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


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
