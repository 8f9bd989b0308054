"""The `neurokern` command line (also `python -m neurokern`, and under `torchrun ... -m neurokern`)."""
import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from neurokern import params
from neurokern.errors import NeurokernError


def merge_command(args: argparse.Namespace) -> int:
    from neurokern.config import load_config
    from neurokern.engine import kernel_warmup, prefetch
    from neurokern.engine.settings import EngineSettings
    from neurokern.engine.timing import Recorder

    settings = EngineSettings.from_env()
    recorder = Recorder.from_settings(settings)  # the merge's: its warm-up reads are timed too
    if not args.dry_run:  # the inputs are read and Triton's runtime warmed while torch is imported
        prefetch.start(load_config(args.config), settings, recorder, args.resume)
        kernel_warmup.start_runtime(args.device)
    from neurokern.engine import merge_models
    from neurokern.engine.plan import human_bytes

    kwargs = dict(device=args.device, memory_budget=args.memory_budget, host_memory_budget=args.host_memory_budget,
                  allow_pickle=args.allow_pickle, progress=False if args.quiet else None, fsync=args.fsync,
                  settings=settings, recorder=recorder)
    if args.dry_run:
        config = load_config(args.config)
        result = merge_models(args.config, args.out_dir, dry_run=True, **kwargs)
        print(f"method: {config.method} {config.params}")
        print(f"base:   {config.base_model}")
        for path in config.models:
            print(f"model:  {path}")
        if config.stack:
            print(f"stack:  {config.describe_stack()}")
        print(f"output: {args.out_dir} (shards of at most {human_bytes(config.out_shard_size)})")
        print(result.stats["description"])
        return 0
    result = merge_models(args.config, args.out_dir, resume=args.resume, **kwargs)
    if not args.quiet and _is_main():
        shards = len(result.plan.shards)
        resumed = f"resumed, {result.shards_reused} of {shards} shards were done; " if args.resume else ""
        read = (f"{human_bytes(result.bytes_read)} read, {human_bytes(result.bytes_read / max(result.seconds, 1e-9))}/s"
                if result.bytes_read else "nothing read")
        print(f"merged {len(result.plan.tensors)} tensors into {args.out_dir} in {result.seconds:.1f} s "
              f"({resumed}{read}; passes: {' -> '.join(result.passes) or 'none left'})")
    return 0


def _task_counts(text: str) -> list[int]:
    """--tasks: "1-8", "3" or "2,4,6"."""
    try:
        counts = []
        for part in text.split(","):
            low, _, high = part.partition("-")
            counts += list(range(int(low), int(high or low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected task counts such as 1-8, 3 or 2,4; got {text!r}") from None
    if not counts or not all(1 <= c <= 8 for c in counts):
        raise argparse.ArgumentTypeError(f"task counts go from 1 to 8 (the kernels' range); got {text!r}")
    return sorted(set(counts))


def warmup_command(args: argparse.Namespace) -> int:
    import importlib.util

    from neurokern.engine import kernel_warmup

    # a bad config or argument is an error on any machine; only then is the GPU looked for
    cases = kernel_warmup.warmup_cases(args.config, args.method, args.dtype, args.tasks)
    import torch

    if params.device("--device", args.device, present=False).type != "cuda":
        raise NeurokernError(f"--device {args.device}: the warm-up compiles GPU kernels; give a CUDA device")

    if not torch.cuda.is_available():
        print("neurokern warmup: no CUDA GPU here; Triton compiles kernels for a GPU only, so there is nothing to do")
        return 0
    if importlib.util.find_spec("triton") is None:
        print("neurokern warmup: Triton is not installed (pip install triton); neurokern's GPU kernels need it")
        return 0
    device = torch.device(args.device)
    what = f"config {args.config}" if args.config else "every method, dtype and task count asked"
    skipped = kernel_warmup.skipped(args.config, args.method, args.tasks)
    left_out = f" ({len(skipped)} skipped, see below)" if skipped and not args.quiet else ""
    print(f"neurokern warmup: {len(cases)} case(s) of {what}{left_out} on {torch.cuda.get_device_name(device)}; "
          f"Triton's cache: {kernel_warmup.cache_dir()}", flush=True)
    if not args.quiet:
        for line in skipped:
            print(f"  {line}")
    report = kernel_warmup.compile_kernels(cases, device, report=(lambda line: None) if args.quiet else print)
    kinds = ", ".join(f"{name} x{n}" for name, n in report["kernels"].items())
    print(f"compiled {report['compiled']} kernels in {report['seconds']:.1f} s into {report['cache_dir']} "
          f"({report['cached_before']} were there before){': ' + kinds if kinds else ''}")
    return 0


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: the same unwinding as Ctrl-C (the partial output is kept
    for --resume), then exit code 143."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="neurokern", description="Merge fine-tuned models.")
    sub = parser.add_subparsers(dest="command", required=True)
    merge_p = sub.add_parser("merge", help="merge the models a YAML config names into OUT_DIR, streamed from disk")
    merge_p.add_argument("config", help="merge config (YAML, mergekit keys)")
    merge_p.add_argument("out_dir", help="output folder (created; must not exist or be empty)")
    merge_p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available); under torchrun "
                         "each rank takes the GPU of its LOCAL_RANK")
    merge_p.add_argument("--memory-budget", default=None, metavar="SIZE",
                         help="memory budget of the host and of the GPU, e.g. 16GiB (default: 8GiB of host memory "
                              "and 70%% of the GPU memory free at the start)")
    merge_p.add_argument("--host-memory-budget", default=None, metavar="SIZE",
                         help="host memory budget when it differs from --memory-budget")
    merge_p.add_argument("--resume", action="store_true",
                         help="finish an interrupted merge from OUT_DIR.partial (same config and inputs)")
    merge_p.add_argument("--fsync", action="store_true",
                         help="write the output to disk before returning (durable across a power loss); by default "
                              "it is left to the page cache, whole or absent after a crash of the process")
    merge_p.add_argument("--dry-run", action="store_true", help="print the plan and the memory estimate, write nothing")
    merge_p.add_argument("--allow-pickle", action="store_true",
                         help="also read pickled .bin/.pt checkpoints (they can run code when loaded)")
    merge_p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    merge_p.set_defaults(run=merge_command)
    warm_p = sub.add_parser("warmup", help="compile the GPU kernels a merge uses into Triton's cache, so that the "
                            "first merge does not wait for them")
    warm_p.add_argument("config", nargs="?", default=None,
                        help="merge config: its method, parameters, dtype, task count and tensor shapes (headers "
                             "only are read); without one, every method for --dtype and --tasks")
    warm_p.add_argument("--device", default="cuda", help="the GPU to compile for (default: cuda, the current one)")
    warm_p.add_argument("--method", action="append", default=None, metavar="NAME",
                        help="without a config: only this method (repeatable; default: all)")
    warm_p.add_argument("--dtype", action="append", default=None, choices=["float32", "bfloat16", "float16"],
                        help="without a config: only this storage dtype (repeatable; default: all three)")
    warm_p.add_argument("--tasks", type=_task_counts, default=None, metavar="COUNTS",
                        help="without a config: numbers of fine-tuned models, e.g. 1-8 (default), 3 or 2,4; a method "
                             "runs those it takes (passthrough: the one model it copies)")
    warm_p.add_argument("--quiet", action="store_true", help="only the summary line")
    warm_p.set_defaults(run=warmup_command)
    args = parser.parse_args(argv)
    if args.command == "warmup" and args.config and (args.method or args.dtype or args.tasks):
        warm_p.error("--method, --dtype and --tasks are for a warm-up without a config; a config sets them")
    handles_sigterm = args.command == "merge" and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if handles_sigterm else None
    try:
        return args.run(args)
    except NeurokernError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        print(f"neurokern: error: {'; '.join(lines)}", file=sys.stderr)  # one line, whatever a library said
        return 2
    except KeyboardInterrupt as exc:
        if args.command != "merge":
            raise
        what, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        partial = Path(args.out_dir).with_name(Path(args.out_dir).name + ".partial")
        then = (f"rerun with --resume to finish from {partial}" if partial.is_dir() else "no output was written")
        print(f"neurokern: {what}; {then}", file=sys.stderr)
        return code
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The `neurokern` command (and `python -m neurokern`): main(), then exit at once. Everything
    main() wrote is closed or renamed by then; the interpreter's teardown (CUDA context, pinned
    buffers, thread pools, modules) would only add a second or more."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
