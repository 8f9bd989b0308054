"""Block-size sweep of the Triton kernels on the GPU, each over its launch constants (elements per
program, warps). Prints a table and writes bench/results/tune-triton-<gpu>.json (--tint:
tune-triton-tint-<gpu>.json); the winners go into neurokern/ops/triton/common.py by hand.

    python bench/tune_triton.py [--tasks 4] [--layers 22] [--sweeps ...]   # TinyLlama-1.1B-shaped
        set, bf16: weighted_sum_multi forward and backward, ties_merge_multi (block and warps; blocks
        a program and how many of them its loads run ahead), dare_multi
    python bench/tune_triton.py --tint [--tasks 8]           # a TintedModel's step on ViT-B/32's
        shared weights (bf16, layer-wise lambda: one weighted_sum and one weighted_sum_backward
        per shape group, per-row coefficients, as neurokern.tint.merged stacks them)
"""
import argparse
import dataclasses

import torch

from bench.kernels import bench, copy_bandwidth, list_set, set_arguments, write_report
from neurokern import ops
from neurokern.ops.triton import common

WARPS = (4, 8)
FORWARD_BLOCKS = (1024, 2048, 4096)
BACKWARD = [(512, 8192), (1024, 8192), (1024, 16384), (2048, 16384)]  # (RED_BLOCK, CHUNK)
ELECTION_BLOCKS = (256, 512, 1024, 2048)
TIES_PIPELINE = [(8, 0), (8, 1), (8, 2), (8, 4), (16, 1), (16, 2), (4, 1)]  # (TIES_ITERS, TIES_AHEAD)
SWEEPS = ("ws_forward", "ws_backward", "ties_merge", "ties_pipeline", "dare")


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
    """apply(*values): set the module constants of neurokern.ops.triton.common named by `names` (in order), return undo."""
    def apply(*values):
        old = {k: getattr(common, k) for k in names}
        old_launch = dict(common.LAUNCH)
        for key, value in zip(names, values):
            if key == "NUM_WARPS":
                common.LAUNCH["num_warps"] = value
            else:
                setattr(common, key, value)

        def restore():
            for k, v in old.items():
                setattr(common, k, v)
            common.LAUNCH.clear()
            common.LAUNCH.update(old_launch)
        return restore
    return apply


# ViT-B/32's shared weights as neurokern.tint.merged stacks them: (tensors, elements each) per
# shape group of the 12 blocks (q/k/v/o projections; fc1; fc2), each group split into rows of
# 18432 elements (merged._row_split).
VIT_GROUPS = ((48, 768 * 768), (12, 3072 * 768), (12, 768 * 3072))
TINT_ROW = 18432


@dataclasses.dataclass
class TintSet:
    """The stacked groups, their per-row coefficients and gradients; the fields write_report reads."""
    device: torch.device
    groups: list
    T: int
    N: int
    copy: float


def tint_set(T: int, device=torch.device("cuda")) -> TintSet:
    g = torch.Generator(device=device).manual_seed(0)
    groups = []
    for tensors, numel in VIT_GROUPS:
        rows = tensors * numel // TINT_ROW
        base = (0.02 * torch.randn(rows, TINT_ROW, generator=g, device=device)).to(torch.bfloat16)
        fts = [(base + 0.002 * torch.randn(rows, TINT_ROW, generator=g, device=device)).to(torch.bfloat16)
               for _ in range(T)]
        coeffs = torch.full((T + 1, rows), 0.3, device=device)
        coeffs[0] = 1.0
        grad = torch.randn(rows, TINT_ROW, generator=g, device=device).to(torch.bfloat16)
        groups.append((base, fts, coeffs, grad))
    N = sum(b.numel() for b, *_ in groups)
    return TintSet(device, groups, T, N, copy_bandwidth(device))


def tint_sweeps(args) -> None:
    st = tint_set(args.tasks)
    print(f"{torch.cuda.get_device_name(st.device)}: ViT-B/32 groups, {st.N / 1e6:.1f} M params x (1 + {st.T}); "
          f"copy {st.copy:.0f} GB/s")
    ws = torch.ops.neurokern.weighted_sum.default
    ws_back = torch.ops.neurokern.weighted_sum_backward.default
    results = {}
    # forward reads base + T inputs and writes one (bf16); backward reads grad, base and T inputs
    sweep("tint_forward", (st.T + 2) * st.N * 2, st.copy, [(b, w) for b in FORWARD_BLOCKS for w in WARPS],
          setter(BLOCK=None, NUM_WARPS=None),
          lambda: [ws(b, f, c, None, None, 0, None) for b, f, c, _ in st.groups], results)
    sweep("tint_backward", (st.T + 2) * st.N * 2, st.copy,
          [(r, w) for r in (256, 512, 1024, 2048) for w in (2,) + WARPS], setter(RED_BLOCK=None, NUM_WARPS=None),
          lambda: [ws_back(gr, b, f, c, None, None, 0) for b, f, c, gr in st.groups], results)
    write_report(args.out, "tune-triton-tint", st, sweeps=results)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    set_arguments(parser)
    parser.add_argument("--tint", action="store_true", help="sweep a TintedModel step's kernels (ViT-B/32 groups)")
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated, of {', '.join(SWEEPS)}")
    args = parser.parse_args()
    chosen = set(args.sweeps.split(","))
    if args.tint:
        return tint_sweeps(args)
    st = list_set(args)
    print(f"{torch.cuda.get_device_name(st.device)}: {st.N / 1e9:.3f} B params x (1 + {st.T}); copy {st.copy:.0f} GB/s")
    keys = list(range(len(st.names) * st.T))
    results = {}
    if "ws_forward" in chosen:
        sweep("ws_forward", st.merge_bytes, st.copy, [(b, w) for b in FORWARD_BLOCKS for w in WARPS],
              setter(BLOCK=None, NUM_WARPS=None), lambda: ops.weighted_sum_multi(st.base_list, st.ft_list, st.rows),
              results)
    if "ws_backward" in chosen:
        sweep("ws_backward", st.merge_bytes, st.copy, [(r, c, w) for r, c in BACKWARD for w in WARPS],
              setter(RED_BLOCK=None, CHUNK=None, NUM_WARPS=None),
              lambda: torch.ops.neurokern.weighted_sum_multi_backward(st.grads, st.base_list, st.ft_list, st.rows),
              results)
    election = [((b, b), w) for b in ELECTION_BLOCKS for w in (2,) + WARPS]

    def ties():
        return ops.ties_merge_multi(st.base_list, st.ft_list, [1.0] * st.T, st.trim)
    if "ties_merge" in chosen:
        sweep("ties_merge", st.merge_bytes, st.copy, election, setter(ELECTION_BLOCKS=None, NUM_WARPS=None), ties,
              results)
    if "ties_pipeline" in chosen:
        sweep("ties_pipeline", st.merge_bytes, st.copy, TIES_PIPELINE, setter(TIES_ITERS=None, TIES_AHEAD=None), ties,
              results)
    if "dare" in chosen:
        sweep("dare", st.merge_bytes, st.copy, election, setter(ELECTION_BLOCKS=None, NUM_WARPS=None),
              lambda: torch.ops.neurokern.dare_multi(st.base_list, st.ft_list, [0.3] * st.T, 0.5, keys), results)
    write_report(args.out, "tune-triton", st, sweeps=results)


if __name__ == "__main__":
    main()
