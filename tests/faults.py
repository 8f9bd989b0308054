"""Faults injected from the tests into a merge process: the process ends at once (os._exit(137),
no cleanup, as a SIGKILL would) or stops (sleeps until a signal ends it) at the N-th event of a
kind. The library has no hook for this: this entry point wraps the engine's own functions at each
event, counting calls, and then runs the program it is given as Python would:

    python tests/faults.py crash|stall KIND[:N] -m MODULE ARGS...   (as `python -m MODULE ARGS...`)
    python tests/faults.py crash|stall KIND[:N] SCRIPT ARGS...      (as `python SCRIPT ARGS...`)

and under torchrun every rank the same way, counting its own events:
`python -m torch.distributed.run ... tests/faults.py crash shards:1 -m neurokern merge ...`.

Events, counted from 1 in each process (N defaults to 1):
- batches: a unit's batch handed out by a streaming pass (any pass, pre-pass or merge), after its
  progress tick: the `progress` callback run.py passes to executor.batches returned.
- saved: the pre-pass results written (run.save_global returned; rank 0 only).
- tensors: a merged tensor's pieces queued for writing (ShardWriter._write returned).
- shards: a shard finished: renamed from .tmp and recorded (ShardWriter._finish returned).
- publish: the folder complete (index, side files, manifest), its resume state still there
  (writer.publish calls writer.rename).
- rename: the resume state removed, before the folder's rename (writer.remove_state returned).
"""
import os
import runpy
import sys
import time
from functools import wraps

KINDS = ("batches", "saved", "tensors", "shards", "publish", "rename")
USAGE = "usage: faults.py crash|stall KIND[:N] (-m MODULE | SCRIPT) ARGS..."


def parse(argv: list[str]) -> tuple[str, str, int, list[str]]:
    """(crash or stall, kind, N, the program's argv) from this entry point's arguments."""
    if len(argv) < 3 or argv[0] not in ("crash", "stall") or (argv[2] == "-m" and len(argv) < 4):
        raise SystemExit(USAGE)
    kind, _, count = argv[1].partition(":")
    if kind not in KINDS or not (count == "" or (count.isdigit() and int(count) >= 1)):
        raise SystemExit(f"faults.py: {argv[1]!r}: expected KIND or KIND:N, KIND one of {', '.join(KINDS)} and N "
                         f"a whole number above 0\n{USAGE}")
    return argv[0], kind, int(count or 1), argv[2:]


def inject(action: str, kind: str, at: int) -> None:
    """Wrap the function at the event of `kind` so that its `at`-th call ends (crash) or stops
    (stall) the process once the function has done its work (before it, for publish)."""
    from neurokern.engine import run, writer

    calls = [0]

    def event() -> None:
        calls[0] += 1
        if calls[0] < at:
            return
        if action == "crash":
            os._exit(137)
        while True:
            time.sleep(1)

    def after(function):
        @wraps(function)
        def wrapped(*args, **kwargs):
            result = function(*args, **kwargs)
            event()
            return result
        return wrapped

    if kind == "batches":
        real_batches = run.batches

        @wraps(real_batches)
        def batches(*args, progress=None, **kwargs):
            return real_batches(*args, progress=None if progress is None else after(progress), **kwargs)
        run.batches = batches
    elif kind == "saved":
        run.save_global = after(run.save_global)
    elif kind == "tensors":
        writer.ShardWriter._write = after(writer.ShardWriter._write)
    elif kind == "shards":
        writer.ShardWriter._finish = after(writer.ShardWriter._finish)
    elif kind == "publish":
        real_rename = writer.rename

        @wraps(real_rename)
        def rename(*args, **kwargs):
            event()
            return real_rename(*args, **kwargs)
        writer.rename = rename  # publish's call; run.py's own (a resumed, published folder) is not one
    else:
        writer.remove_state = after(writer.remove_state)


def main() -> None:
    action, kind, at, program = parse(sys.argv[1:])
    # sys.path[0] as Python sets it for the program: the working folder for -m, the script's folder
    if program[0] == "-m":
        sys.path[0] = os.getcwd()
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(program[0]))
    inject(action, kind, at)
    if program[0] == "-m":
        sys.argv = [program[1], *program[2:]]  # runpy puts the module's file in argv[0]
        runpy.run_module(program[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = program
        runpy.run_path(program[0], run_name="__main__")


if __name__ == "__main__":
    main()
