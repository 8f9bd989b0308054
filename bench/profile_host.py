"""Where the wall time of a whole-model merge goes on the GPU: host (Python) versus kernels.

For each method on the 1.1B-shaped set (resident on the GPU): the median wall time (bench.kernels
.bench), the GPU kernel time summed from torch.profiler, and a cProfile table of one call (the
host functions by own time and by cumulative time).

    python3 bench/profile_host.py [--methods ties,neuromerging,task_arithmetic] [--rows 25]
"""
import argparse
import cProfile
import io
import pstats

import torch

import neurokern as nk
from bench.kernels import bench, make_models, tinyllama_shapes


def kernel_ms(fn) -> float:
    """Sum of the CUDA kernel and copy times of one call (torch.profiler)."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        torch.cuda.synchronize()
    total = 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total += event.device_time
    return total / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", default="ties,neuromerging,task_arithmetic")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    T = 4
    base, fts = make_models(tinyllama_shapes(22), T, torch.device("cuda"))
    kwargs = {"ties": {"density": 0.2}, "task_arithmetic": {"weights": [0.3] * T}, "neuromerging": {}}
    for method in args.methods.split(","):
        def fn(method=method):
            return nk.merge(base, fts, method=method, **kwargs[method])
        wall = bench(fn)
        gpu = kernel_ms(fn)
        print(f"== {method}: wall {wall:.2f} ms, GPU kernels+copies {gpu:.2f} ms")
        profiler = cProfile.Profile()
        torch.cuda.synchronize()
        profiler.enable()
        fn()
        torch.cuda.synchronize()
        profiler.disable()
        for key in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(args.rows)
            print(f"-- {method}, by {key}:")
            print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])


if __name__ == "__main__":
    main()
