"""Block-size sweep of the multi-tensor Triton kernels on the TinyLlama-1.1B-shaped set (bf16,
base + T fine-tuned, on the GPU): weighted_sum_multi forward and backward, ties_merge_multi and
dare_multi, each over its launch constants (elements per program, warps). Prints a table and writes
bench/results/tune-triton-<gpu>.json; the winners go into neurokern/ops/triton/elementwise.py by
hand.

    python bench/tune_triton.py [--tasks 4] [--layers 22]
"""
import argparse

import torch

from bench.kernels import bench, list_set, set_arguments, write_report
from neurokern import ops
from neurokern.ops.triton import elementwise as ew

WARPS = (4, 8)
FORWARD_BLOCKS = (1024, 2048, 4096)
BACKWARD = [(512, 8192), (1024, 8192), (1024, 16384), (2048, 16384)]  # (RED_BLOCK, CHUNK)
ELECTION_BLOCKS = (256, 512, 1024, 2048)


def sweep(name, nbytes, copy, configs, apply, fn, results):
    for config in configs:
        restore = apply(*config)
        try:
            ms = bench(fn, warmup=2, reps=7)
        except Exception as exc:  # noqa: BLE001 (a config that does not compile or fit is reported)
            print(f"{name:14s} {config}: failed ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        finally:
            restore()
        gbps = nbytes / ms / 1e6
        results.setdefault(name, []).append({"config": list(config), "ms": round(ms, 3), "GBps": round(gbps, 1),
                                             "fraction_of_copy": round(gbps / copy, 3)})
        print(f"{name:14s} {str(config):16s} {ms:8.3f} ms {gbps:7.0f} GB/s {gbps / copy:6.1%}")


def setter(**names):
    """apply(*values): set the module constants of ew named by `names` (in order), return undo."""
    def apply(*values):
        old = {k: getattr(ew, k) for k in names}
        old_launch = dict(ew.LAUNCH)
        for key, value in zip(names, values):
            if key == "NUM_WARPS":
                ew.LAUNCH["num_warps"] = value
            else:
                setattr(ew, key, value)

        def restore():
            for k, v in old.items():
                setattr(ew, k, v)
            ew.LAUNCH.clear()
            ew.LAUNCH.update(old_launch)
        return restore
    return apply


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    set_arguments(parser)
    args = parser.parse_args()
    st = list_set(args)
    print(f"{torch.cuda.get_device_name(st.device)}: {st.N / 1e9:.3f} B params x (1 + {st.T}); copy {st.copy:.0f} GB/s")
    keys = list(range(len(st.names) * st.T))
    results = {}
    sweep("ws_forward", st.merge_bytes, st.copy, [(b, w) for b in FORWARD_BLOCKS for w in WARPS],
          setter(BLOCK=None, NUM_WARPS=None), lambda: ops.weighted_sum_multi(st.base_list, st.ft_list, st.rows), results)
    sweep("ws_backward", st.merge_bytes, st.copy, [(r, c, w) for r, c in BACKWARD for w in WARPS],
          setter(RED_BLOCK=None, CHUNK=None, NUM_WARPS=None),
          lambda: torch.ops.neurokern.weighted_sum_multi_backward(st.grads, st.base_list, st.ft_list, st.rows), results)
    election = [((b, b), w) for b in ELECTION_BLOCKS for w in (2,) + WARPS]
    sweep("ties_merge", st.merge_bytes, st.copy, election, setter(ELECTION_BLOCKS=None, NUM_WARPS=None),
          lambda: ops.ties_merge_multi(st.base_list, st.ft_list, [1.0] * st.T, st.trim), results)
    sweep("dare", st.merge_bytes, st.copy, election, setter(ELECTION_BLOCKS=None, NUM_WARPS=None),
          lambda: torch.ops.neurokern.dare_multi(st.base_list, st.ft_list, [0.3] * st.T, 0.5, keys), results)
    write_report(args.out, "tune-triton", st, sweeps=results)


if __name__ == "__main__":
    main()
