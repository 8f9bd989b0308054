"""Kernel benchmark on a TinyLlama-1.1B-shaped set (base + T fine-tuned, bf16, resident on the GPU).

Measures in one run: the device-to-device copy bandwidth, each op / method's median time, the
bytes it must move at least (each input read once, each output written once), achieved GB/s,
fraction of the copy bandwidth, and the speedup over the eager PyTorch reference. Writes
bench/results/kernels-<gpu>.json and a roofline-style PNG (if matplotlib is there).

    python bench/kernels.py [--tasks 4] [--layers 22] [--skip-eager]
"""
import argparse
import json
import platform
import time
from pathlib import Path
from typing import NamedTuple

import torch

import neurokern as nk
from neurokern import ops
from neurokern.models import load_models

HIDDEN, FFN, VOCAB, KV = 2048, 5632, 32000, 256


def tinyllama_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV, HIDDEN),
            p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN), p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        })
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def make_models(shapes, T, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    base = {k: (torch.randn(s, generator=g, device=device) * 0.02).to(dtype) for k, s in shapes.items()}
    fts = []
    for _ in range(T):
        fts.append({k: (v.float() + 0.002 * torch.randn(v.shape, generator=g, device=device)).to(dtype) for k, v in base.items()})
    return base, fts


def set_arguments(parser) -> None:
    """--tasks, --layers and --out, the options of every script on this set."""
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")


def lists(base, fts):
    """(names, base list, fine-tuned list task-major) of a set, as the list ops take them."""
    names = list(base)
    return names, [base[n] for n in names], [f[n] for f in fts for n in names]


def flat(base_list, ft_list):
    """The lists as one flat tensor per model: (base, [fine-tuned of each task])."""
    def cat(tensors):
        return torch.cat([t.reshape(-1) for t in tensors])
    n = len(base_list)
    return cat(base_list), [cat(ft_list[t * n:(t + 1) * n]) for t in range(len(ft_list) // n)]


class ListSet(NamedTuple):
    """The set of --tasks / --layers on the GPU as the list ops take it (bench/list_overhead.py,
    bench/tune_triton.py): names, the base list and the fine-tuned list (task-major), T, the param
    count N, the bytes a merge moves (read base + T fine-tuned, write one), the copy bandwidth
    measured beside it; rows: task-arithmetic coefficients, one row per tensor; grads: one gradient
    per tensor; k and trim: TIES's per-tensor keep counts (density 0.2) and exact trims."""
    device: torch.device
    names: list
    base_list: list
    ft_list: list
    T: int
    N: int
    merge_bytes: int
    copy: float
    rows: torch.Tensor
    grads: list
    k: list
    trim: tuple


def list_set(args, device=torch.device("cuda")) -> ListSet:
    T = args.tasks
    base, fts = make_models(tinyllama_shapes(args.layers), T, device)
    names, base_list, ft_list = lists(base, fts)
    N = sum(b.numel() for b in base_list)
    copy = copy_bandwidth(device)
    rows = torch.tensor([1.0] + [0.3] * T, device=device).expand(len(names), -1).contiguous()
    grads = [torch.randn_like(b) for b in base_list]
    k = [max(1, int(0.2 * b.numel())) for b in base_list for _ in range(T)]
    trim = ops.magnitude_threshold(base_list, ft_list, k, False, per_tensor=True)
    return ListSet(device, names, base_list, ft_list, T, N, (T + 2) * N * 2, copy, rows, grads, k, trim)


def write_report(out: Path, prefix: str, s: ListSet, **fields) -> None:
    """out/<prefix>-<gpu>.json: the device, torch version, copy bandwidth, T, N and date of set s,
    then fields."""
    device = torch.cuda.get_device_name(s.device)
    report = {"device": device, "torch": torch.__version__, "copy_GBps": round(s.copy, 1), "tasks": s.T,
              "params": s.N, "date": time.strftime("%Y-%m-%d"), **fields}
    path = results_path(out, prefix, device)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def results_path(out: Path, prefix: str, device_name: str, suffix: str = ".json") -> Path:
    """out/<prefix>-<gpu><suffix>, the folder made if missing ("NVIDIA H200" -> h200)."""
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{prefix}-{device_name.lower().replace('nvidia ', '').replace(' ', '-')}{suffix}"


def bench(fn, warmup=2, reps=10) -> float:
    """Median milliseconds of fn() over reps runs (CUDA events), after warm-up runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), warmup=3, reps=20)
    return 2 * src.numel() / ms / 1e6


# Eager PyTorch references, the way a user without neurokern writes them.
def eager_ties(base, fts, density=0.2):
    out = {}
    for name, b in base.items():
        taus = torch.stack([f[name].float() - b.float() for f in fts])
        flat = taus.view(len(fts), -1)
        k = max(1, int(density * flat.shape[1]))
        kth = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
        taus = taus * (flat.abs() >= kth).view_as(taus)
        sign = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(taus) == sign)
        mixed = (taus * agree).sum(0) / agree.sum(0).clamp_min(1)
        out[name] = (b.float() + mixed).to(b.dtype)
    return out


def eager_task_arithmetic(base, fts, weights):
    return {n: (b.float() + sum(w * (f[n].float() - b.float()) for w, f in zip(weights, fts))).to(b.dtype) for n, b in base.items()}


def eager_threshold(base, fts, density):
    """Global exact threshold per task: kthvalue over the flattened model (FusionBench style)."""
    out = []
    for f in fts:
        flat = torch.cat([(f[n].float() - b.float()).abs().flatten() for n, b in base.items()])
        out.append(flat.kthvalue(int(flat.numel() * (1 - density))).values)
    return out


def flat_reference(record, base_list, ft_list, coeffs, nbytes):
    """What the same bytes reach as one flat tensor per model: weighted_sum (one program grid, no
    pointer table) and torch.compile's fused kernel for the same formula (inductor's Triton), the
    ceiling a (T+1)-read, 1-write stream reaches on this GPU."""
    flat_base, flat_fts = flat(base_list, ft_list)
    record("weighted_sum_forward_flat", lambda: ops.weighted_sum(flat_base, flat_fts, coeffs), nbytes)
    a = coeffs.tolist()

    def formula(b, *fs):
        w = b.float()
        acc = a[0] * w
        for t, f in enumerate(fs):
            acc = acc + a[t + 1] * (f.float() - w)
        return acc.to(b.dtype)
    try:
        fused = torch.compile(formula, dynamic=False)
        fused(flat_base, *flat_fts)
        record("inductor_fused_flat", lambda: fused(flat_base, *flat_fts), nbytes)
    except Exception as exc:  # noqa: BLE001 (no compiler on this machine: the entry is left out)
        print(f"inductor reference skipped: {type(exc).__name__}: {str(exc)[:200]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    set_arguments(parser)
    parser.add_argument("--skip-eager", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated measurements to run (default: all), e.g. ties,neuromerging")
    args = parser.parse_args()
    only = {k for k in args.only.split(",") if k}
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    T = args.tasks
    shapes = tinyllama_shapes(args.layers)
    base, fts = make_models(shapes, T, device)
    N = sum(t.numel() for t in base.values())
    esize = 2
    copy = copy_bandwidth(device)
    print(f"{name}: {len(base)} tensors, {N / 1e9:.3f} B params x (1 + {T}) bf16; copy {copy:.0f} GB/s")

    names, base_list, ft_list = lists(base, fts)
    weights = [0.3] * T
    merge_bytes = (T + 2) * N * esize  # read base + T fine-tuned, write the merged model
    results = {}

    eager = not args.skip_eager

    def record(key, fn, nbytes, eager_fn=None):
        """Times fn (and, unless --skip-eager, eager_fn once) if --only leaves key in."""
        if only and key not in only:
            return
        ms = bench(fn)
        eager_ms = bench(eager_fn, warmup=0, reps=1) if eager and eager_fn is not None else None
        gbps = nbytes / ms / 1e6
        entry = {"ms": round(ms, 3), "bytes": nbytes, "GBps": round(gbps, 1), "fraction_of_copy": round(gbps / copy, 3)}
        if eager_ms is not None:
            entry["eager_ms"] = round(eager_ms, 3)
            entry["speedup_vs_eager"] = round(eager_ms / ms, 1)
        results[key] = entry
        print(f"{key:28s} {ms:9.3f} ms {gbps:8.0f} GB/s {gbps / copy:6.1%} of copy"
              + (f"  eager {eager_ms:9.1f} ms  x{eager_ms / ms:.1f}" if eager_ms else ""))

    record("ties", lambda: nk.merge(base, fts, method="ties", density=0.2), merge_bytes,
           lambda: eager_ties(base, fts))
    record("task_arithmetic", lambda: nk.merge(base, fts, method="task_arithmetic", weights=weights), merge_bytes,
           lambda: eager_task_arithmetic(base, fts, weights))
    record("neuromerging", lambda: nk.merge(base, fts, method="neuromerging"), merge_bytes)
    k = [max(1, int(0.2 * N))] * T
    record("magnitude_threshold", lambda: ops.magnitude_threshold(base_list, ft_list, k, True),
           T * N * esize + N * esize, lambda: eager_threshold(base, fts, 0.2))
    # The parts of the methods above, alone.
    k_tensor = [max(1, int(0.2 * b.numel())) for b in base_list for _ in range(T)]
    record("ties_threshold_per_tensor",
           lambda: ops.magnitude_threshold(base_list, ft_list, k_tensor, False, per_tensor=True), (T + 1) * N * esize)
    trim = ops.magnitude_threshold(base_list, ft_list, k_tensor, False, per_tensor=True)
    record("ties_merge_multi", lambda: ops.ties_merge_multi(base_list, ft_list, [1.0] * T, trim), merge_bytes)
    record("input_checks", lambda: load_models(base, fts, None), (T + 1) * N * esize)
    coeffs = torch.tensor([1.0] + weights, device=device)
    rows = coeffs.expand(len(names), -1).contiguous()
    grads = {n: torch.randn_like(b) for n, b in base.items()}
    grad_list = [grads[n] for n in names]
    record("weighted_sum_forward", lambda: ops.weighted_sum_multi(base_list, ft_list, rows), merge_bytes)
    record("weighted_sum_forward_per_tensor_calls",
           lambda: [ops.weighted_sum(base[n], [f[n] for f in fts], coeffs) for n in names], merge_bytes)
    if not only or {"weighted_sum_forward_flat", "inductor_fused_flat"} & only:
        flat_reference(record, base_list, ft_list, coeffs, merge_bytes)
    record("weighted_sum_backward",
           lambda: torch.ops.neurokern.weighted_sum_multi_backward(grad_list, base_list, ft_list, rows),
           (T + 2) * N * esize)
    record("weighted_sum_backward_per_tensor_calls",
           lambda: [torch.ops.neurokern.weighted_sum_backward(grads[n], base[n], [f[n] for f in fts], coeffs, None, None, 0)
                    for n in names],
           (T + 2) * N * esize)

    report = {
        "device": name, "torch": torch.__version__, "triton": _triton_version(), "python": platform.python_version(),
        "tensors": len(base), "params": N, "tasks": T, "dtype": "bfloat16", "copy_GBps": round(copy, 1),
        "ops": results, "date": time.strftime("%Y-%m-%d"),
    }
    path = results_path(args.out, "kernels", name)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    _plot(report, results_path(args.out, "kernels", name, ".png"))


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def _plot(report, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ops_ = report["ops"]
    names = list(ops_)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(names, [ops_[n]["GBps"] for n in names], color="tab:blue")
    ax.axvline(report["copy_GBps"], color="tab:red", linestyle="--", label=f"copy {report['copy_GBps']:.0f} GB/s")
    ax.set_xlabel("achieved GB/s (minimum bytes moved / time)")
    ax.set_title(f"neurokern kernels, {report['device']}, 1.1B-shaped bf16, T={report['tasks']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
