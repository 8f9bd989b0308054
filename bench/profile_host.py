"""Where the wall time of a whole-model merge goes on the GPU: host (Python) versus kernels.

For each method on the 1.1B-shaped set (resident on the GPU): the median wall time (bench.kernels
.bench), the GPU time of one call from torch.profiler (every kernel and copy, summed, and per
kernel name), the rest of the wall time (the GPU idle while the host launches, checks and
synchronises), and a cProfile table of one call (the host functions by own time and by cumulative
time). Printed, and written to bench/results/host-vs-gpu-<gpu>.json (--out).

    python3 bench/profile_host.py [--methods ties,neuromerging,task_arithmetic] [--rows 25]
"""
import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import torch

import neurokern as nk
from bench.kernels import bench, make_models, tinyllama_shapes
from bench.machine import device_tag


def kernel_ms(fn) -> dict[str, float]:
    """Milliseconds of GPU time of one call per CUDA kernel / copy name (torch.profiler), largest first."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] = times.get(event.name, 0.0) + event.device_time / 1e3
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", default="ties,neuromerging,task_arithmetic")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    T = 4
    device = torch.device("cuda")
    base, fts = make_models(tinyllama_shapes(22), T, device)
    kwargs = {"ties": {"density": 0.2}, "task_arithmetic": {"weights": [0.3] * T}, "neuromerging": {}}
    res = {"bench": "profile_host", "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "set": f"TinyLlama-1.1B-shaped, base + {T} fine-tuned, bf16, on the GPU",
           "methods": {}}
    for method in args.methods.split(","):
        def fn(method=method):
            return nk.merge(base, fts, method=method, **kwargs[method])
        wall = bench(fn)
        kernels = kernel_ms(fn)
        gpu = sum(kernels.values())
        print(f"== {method}: wall {wall:.2f} ms, GPU kernels+copies {gpu:.2f} ms, the rest {wall - gpu:.2f} ms")
        for name, ms in list(kernels.items())[:8]:
            print(f"   {ms:8.3f} ms  {name[:100]}")
        res["methods"][method] = {"wall_ms": round(wall, 3), "gpu_ms": round(gpu, 3),
                                  "gpu_idle_ms": round(max(0.0, wall - gpu), 3),
                                  "kernels_ms": {k[:120]: round(v, 3) for k, v in list(kernels.items())[:12]}}
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
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"host-vs-gpu-{device_tag(device)}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
