"""Host (Python and dispatcher) cost of a nk.tint test-time step, on any device, CPU included.

The step of bench/tint.py (merge, forward with a tint, cross-entropy, backward to lambda and the
tints) on a model with the structure of BERT-base or ViT-B/32 (12 blocks, the same tensors and
modules) but narrow layers (--width, default 64), so that the time left is the host's: the number
of Python calls, torch ops and host syncs per step do not depend on the width. Prints per case
the wall and CPU (this thread) time per step (10th percentiles), and from one profiled step the torch ops called from Python (all
aten ops, nested ones included, in brackets), the host syncs (aten::_local_scalar_dense: .item(),
bool() or int() of a tensor) and the Python function calls (cProfile).

    python bench/profile_tint_host.py [--models vit-b32,bert-base] [--width 64] [--rows 0]

Cases: "plain" (forward + backward of the module, every parameter requiring grad, as bench/tint.py
times it), "tinted" (TintedModel, task=t), "tinted-mixed" (a batch mixing the 8 tasks, task_ids,
with backward), "infer-mixed" (no grad, the merged weights cached). Uses only the public API, so
it runs against any version of the package.
"""
import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.tint import MODELS  # noqa: E402
from neurokern.tint import TintedModel  # noqa: E402


def narrow(name: str, width: int) -> dict:
    """The full-size model's structure at width `width` (4 heads, MLP 4 x width)."""
    if name == "bert-base":
        return dict(vocab=1000, d=width, ff=4 * width, heads=4, positions=512)
    return dict(image=224, d=width, ff=4 * width, heads=4, embed=width)


def step_ms(fns: dict, reps: int) -> dict:
    """case -> (wall, this thread's CPU time) per call in ms, each the 10th percentile of `reps`
    calls, the cases interleaved: the CPU time is what a busy machine leaves least disturbed, a low
    percentile drops the calls other processes slowed down, and interleaving gives every case the
    same share of the slow periods."""
    for fn in fns.values():
        fn()
    wall = {case: [] for case in fns}
    cpu = {case: [] for case in fns}
    for _ in range(reps):
        for case, fn in fns.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            wall[case].append((time.perf_counter() - t0) * 1e3)
            cpu[case].append((time.thread_time() - c0) * 1e3)
    return {case: (statistics.quantiles(wall[case], n=10)[0], statistics.quantiles(cpu[case], n=10)[0])
            for case in fns}


def count(fn) -> dict:
    """torch ops, host syncs and Python calls of one call of fn."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    syncs = sum(e.name == "aten::_local_scalar_dense" for e in events)
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    stats = pstats.Stats(profiler)
    return {"ops": len(top), "ops_nested": len(events), "syncs": syncs, "py_calls": stats.total_calls,
            "stats": stats}


def cases(name: str, args) -> dict:
    cls, _, _, make_input = MODELS[name]
    kw = narrow(name, args.width)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    dense = cls(**kw)
    T = args.tasks
    with torch.no_grad():
        finetuned = [{n: p + 0.01 * torch.randn_like(p) for n, p in dense.named_parameters()} for _ in range(T)]
    tint = f"layers.{len(dense.layers) // 2}.fc1"
    model = TintedModel(dense, None, finetuned, tint_layers=[tint], coefficients="layer", prior=0.3)
    seq = args.seq if name == "bert-base" else None
    x = make_input(args.batch, g, kw, seq)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    ids = torch.arange(args.batch) % T
    trainable = model.trainable_parameters()
    plain_params = list(dense.parameters())

    def plain():
        for q in plain_params:
            q.grad = None
        F.cross_entropy(dense(x), y).backward()

    def tinted():
        for q in trainable:
            q.grad = None
        F.cross_entropy(model(x, task=3 % T), y).backward()

    def tinted_mixed():
        for q in trainable:
            q.grad = None
        F.cross_entropy(model(x, ids), y).backward()

    def infer_mixed():
        with torch.no_grad():
            model(x, ids)

    return {"plain": plain, "tinted": tinted, "tinted-mixed": tinted_mixed, "infer-mixed": infer_mixed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit-b32,bert-base")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--rows", type=int, default=0, help="print the top cProfile rows of the tinted step")
    args = p.parse_args()
    torch.set_num_threads(1)
    for name in args.models.split(","):
        fns = cases(name, args)
        print(f"== {name} structure, width {args.width}, batch {args.batch}, {args.tasks} tasks")
        print(f"{'case':14s} {'wall ms':>8s} {'cpu ms':>7s} {'ops':>6s} {'(nested)':>9s} {'syncs':>6s} {'py calls':>9s}")
        times = step_ms(fns, args.reps)
        for case, fn in fns.items():
            wall, cpu = times[case]
            c = count(fn)
            print(f"{case:14s} {wall:8.2f} {cpu:7.2f} {c['ops']:6d} {c['ops_nested']:9d} {c['syncs']:6d} {c['py_calls']:9d}")
            if args.rows and case == "tinted":
                text = io.StringIO()
                c["stats"].stream = text
                c["stats"].sort_stats("tottime").print_stats(args.rows)
                print(text.getvalue())


if __name__ == "__main__":
    main()
