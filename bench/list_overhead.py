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
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.kernels import bench, flat, list_set, set_arguments, write_report
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
    st = list_set(args)
    coeffs = st.rows[0]
    flat_base, flat_fts = flat(st.base_list, st.ft_list)
    cases = {
        "weighted_sum_multi (201 tensors)": (
            lambda: ops.weighted_sum_multi(st.base_list, st.ft_list, st.rows), st.merge_bytes),
        "weighted_sum, one flat tensor": (lambda: ops.weighted_sum(flat_base, flat_fts, coeffs), st.merge_bytes),
        "weighted_sum_multi, one flat tensor": (
            lambda: ops.weighted_sum_multi([flat_base], flat_fts, coeffs[None].contiguous()), st.merge_bytes),
        "weighted_sum_multi_backward (201 tensors)": (
            lambda: torch.ops.neurokern.weighted_sum_multi_backward(st.grads, st.base_list, st.ft_list, st.rows), st.merge_bytes),
        "ties_merge_multi (201 tensors)": (
            lambda: ops.ties_merge_multi(st.base_list, st.ft_list, [1.0] * st.T, st.trim), st.merge_bytes),
        "magnitude_threshold per tensor (201 x T)": (
            lambda: ops.magnitude_threshold(st.base_list, st.ft_list, st.k, False, per_tensor=True), (st.T + 1) * st.N * 2),
    }
    results = {}
    print(f"{torch.cuda.get_device_name(st.device)}: copy {st.copy:.0f} GB/s; {len(st.names)} tensors, "
          f"{st.N / 1e9:.3f} B params x (1 + {st.T})")
    for name, (fn, nbytes) in cases.items():
        call, gpu, host = bench(fn), gpu_ms(fn), host_ms(fn)
        results[name] = {"call_ms": round(call, 3), "gpu_ms": round(gpu, 3), "host_ms": round(host, 3), "bytes": nbytes,
                         "call_fraction_of_copy": round(nbytes / call / 1e6 / st.copy, 3),
                         "gpu_fraction_of_copy": round(nbytes / gpu / 1e6 / st.copy, 3)}
        r = results[name]
        print(f"{name:44s} call {call:7.3f} ms ({r['call_fraction_of_copy']:6.1%})  gpu {gpu:7.3f} ms "
              f"({r['gpu_fraction_of_copy']:6.1%})  host {host:6.3f} ms", flush=True)
    write_report(args.out, "list-overhead", st, tensors=len(st.names), ops=results)


if __name__ == "__main__":
    main()
