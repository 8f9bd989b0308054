#!/usr/bin/env python3
"""NeuroMerging's per-neuron solve (torch.ops.neurokern.neuromerge_coeffs) on the rows of a
1.1B-shaped model: milliseconds per call for T = 2, 4 and 8 on the CPU kernel (and the CUDA
kernel where a GPU is present), with how many rows the eigen-solve's sweeps reach.

    python3 bench/neuromerge_coeffs.py [--rows 458752] [--devices cpu,cuda] [--out DIR]
        # DIR/neuromerge-coeffs-<device>.json (the last device's name)

The inputs are what neuron_stats gives the op: per row, the Gram of T task vectors, their dots with
the pre-trained neuron and its squared norm, here from random rows of 256 columns (float64). The
default row count is the TinyLlama-1.1B set's (every row of its 2-D tensors).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import neurokern.ops  # noqa: E402,F401 (registers the ops)
from bench.machine import device_tag  # noqa: E402


def statistics(rows: int, T: int, cols: int = 256, seed: int = 0):
    """(gram [R, T, T], dots [R, T], sqnorm [R]) of random task vectors and neurons, float64."""
    g = torch.Generator().manual_seed(seed)
    gram, dots, sqnorm = [], [], []
    for start in range(0, rows, 16384):  # in slices: R x T x cols at once would take gigabytes
        n = min(16384, rows - start)
        X = torch.randn(n, T, cols, generator=g, dtype=torch.float64)
        w = torch.randn(n, cols, generator=g, dtype=torch.float64)
        gram.append(X @ X.transpose(1, 2))
        dots.append((X @ w.unsqueeze(2)).squeeze(2))
        sqnorm.append((w * w).sum(1))
    return torch.cat(gram), torch.cat(dots), torch.cat(sqnorm)


def time_ms(fn, device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=458752)
    ap.add_argument("--tasks", default="2,4,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--devices", default="cpu,cuda", help="of cpu and cuda, those to time (cuda where present)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    devices = [torch.device(d) for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    report = {"bench": "neuromerge_coeffs", "rows": args.rows, "commit": commit or None, "torch": torch.__version__,
              "cpu_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "ms": {}}
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        report["ms"][name] = {}
        for T in map(int, args.tasks.split(",")):
            gram, dots, sqnorm = (t.to(device) for t in statistics(args.rows, T))
            ms = time_ms(lambda: torch.ops.neurokern.neuromerge_coeffs(gram, dots, sqnorm, 0.0, 1.0, "unit", 1.0),
                         device, args.reps)
            report["ms"][name][f"T={T}"] = round(ms, 3)
            print(f"{name:24s} T={T}: {ms:10.2f} ms ({args.rows} rows)", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        tag = device_tag(devices[-1])
        (args.out / f"neuromerge-coeffs-{tag}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
