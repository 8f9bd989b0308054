#!/usr/bin/env python3
"""Host time against GPU time of the list ops on the TinyLlama-1.1B-shaped set (base + T fine-tuned,
bf16, 201 tensors, resident on the GPU), next to the same bytes as one flat tensor per model.

For each op: the call's time as bench/kernels.py measures it (CUDA events around the call, so the
GPU's idle time while the host prepares the launch counts), the GPU time of its kernels alone
(torch.profiler), the host time of a call (its launches queued, not waited for) and the fraction
of the measured copy bandwidth each time reaches. Writes bench/results/list-overhead-<gpu>.json.

    python bench/list_overhead.py [--tasks 4] [--layers 22]
"""
import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.kernels import bench, copy_bandwidth, flat, lists, make_models, results_path, set_arguments, tinyllama_shapes
from neurokern import ops

CALLS = 5  # profiled calls per op


def gpu_ms(fn) -> float:
    """Milliseconds of device kernels and copies per call of fn, from the profiler."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / CALLS / 1e3


def host_ms(fn, calls: int = 20) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    return host


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    set_arguments(parser)
    args = parser.parse_args()
    device = torch.device("cuda")
    T = args.tasks
    base, fts = make_models(tinyllama_shapes(args.layers), T, device)
    names, base_list, ft_list = lists(base, fts)
    N = sum(b.numel() for b in base_list)
    copy = copy_bandwidth(device)
    coeffs = torch.tensor([1.0] + [0.3] * T, device=device)
    rows = coeffs.expand(len(names), -1).contiguous()
    grads = [torch.randn_like(b) for b in base_list]
    k = [max(1, int(0.2 * b.numel())) for b in base_list for _ in range(T)]
    trim = ops.magnitude_threshold(base_list, ft_list, k, False, per_tensor=True)
    flat_base, flat_fts = flat(base_list, ft_list)
    merge_bytes = (T + 2) * N * 2
    cases = {
        "weighted_sum_multi (201 tensors)": (lambda: ops.weighted_sum_multi(base_list, ft_list, rows), merge_bytes),
        "weighted_sum, one flat tensor": (lambda: ops.weighted_sum(flat_base, flat_fts, coeffs), merge_bytes),
        "weighted_sum_multi, one flat tensor": (lambda: ops.weighted_sum_multi([flat_base], flat_fts, coeffs[None].contiguous()), merge_bytes),
        "weighted_sum_multi_backward (201 tensors)": (
            lambda: torch.ops.neurokern.weighted_sum_multi_backward(grads, base_list, ft_list, rows), merge_bytes),
        "ties_merge_multi (201 tensors)": (lambda: ops.ties_merge_multi(base_list, ft_list, [1.0] * T, trim), merge_bytes),
        "magnitude_threshold per tensor (201 x T)": (
            lambda: ops.magnitude_threshold(base_list, ft_list, k, False, per_tensor=True), (T + 1) * N * 2),
    }
    results = {}
    print(f"{torch.cuda.get_device_name(device)}: copy {copy:.0f} GB/s; {len(names)} tensors, {N / 1e9:.3f} B params x (1 + {T})")
    for name, (fn, nbytes) in cases.items():
        call, gpu, host = bench(fn), gpu_ms(fn), host_ms(fn)
        results[name] = {"call_ms": round(call, 3), "gpu_ms": round(gpu, 3), "host_ms": round(host, 3), "bytes": nbytes,
                         "call_fraction_of_copy": round(nbytes / call / 1e6 / copy, 3),
                         "gpu_fraction_of_copy": round(nbytes / gpu / 1e6 / copy, 3)}
        r = results[name]
        print(f"{name:44s} call {call:7.3f} ms ({r['call_fraction_of_copy']:6.1%})  gpu {gpu:7.3f} ms "
              f"({r['gpu_fraction_of_copy']:6.1%})  host {host:6.3f} ms", flush=True)
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "copy_GBps": round(copy, 1),
              "tasks": T, "tensors": len(names), "params": N, "date": time.strftime("%Y-%m-%d"), "ops": results}
    path = results_path(args.out, "list-overhead", report["device"])
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
