#!/usr/bin/env python3
"""The first merge on a fresh machine: how long the Triton kernels' compilation makes it wait, and
what `neurokern warmup` leaves of that wait.

    python3 bench/first_run.py              # GPU machine: bench/results/first-run-<gpu>.json
    python3 bench/first_run.py --smoke      # tiny shapes, any machine (CPU too): checks the script

For each method (TIES and NeuroMerging with global trim, the configs of bench/e2e_merge.py), on a
TinyLlama-width model of --layers decoder layers (base + 3 fine-tuned, bf16, written once), with
the inputs in the page cache before every run (so that only the kernels differ):
 1. cold: `neurokern merge` with TRITON_CACHE_DIR an empty folder: every kernel compiled;
 2. warm: the same again, the kernels now in that folder;
 3. after the warm-up: `neurokern warmup CONFIG` into another empty folder (timed, and what it
    compiled), then `neurokern merge` with that folder: what the warm-up missed shows as kernels
    the merge still compiles and as seconds over the warm run.
With --full-warmup, also `neurokern warmup` without a config (every method, dtype and task count)
into an empty folder, timed, then both merges with that folder.
Each merge is a subprocess (wall time from start to exit, and the engine's own figure).
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# bench/ holds a kernels.py, which would shadow the `kernels` package that transformers imports: the
# repository root goes on the path instead of this folder, and the other scripts are `bench.*`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for first-run-<gpu>.json")
    ap.add_argument("--work", default="", help="scratch folder (default /tmp/nk-first-run, not tmpfs)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the TinyLlama-width model")
    ap.add_argument("--methods", default="ties,neuromerging", help="comma-separated: ties, neuromerging")
    ap.add_argument("--full-warmup", action="store_true",
                    help="also time `neurokern warmup` without a config (every method, dtype, task count)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script on any machine")
    args = ap.parse_args()

    import subprocess

    import torch
    import yaml

    from bench import e2e_merge as e2e
    from bench.machine import device_tag
    from neurokern.engine.kernel_warmup import cached_kernels

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tag = device_tag(device) + ("-smoke" if args.smoke else "")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / f"first-run-{tag}.json"
    work = Path(args.work) if args.work else e2e.pick_work("").with_name("nk-first-run")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    env.pop("TRITON_CACHE_DIR", None)
    arch = dict(e2e.SMOKE if args.smoke else e2e.TINYLLAMA, layers=args.layers)
    res = {"device": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "model": {"shape": "smoke" if args.smoke else "TinyLlama-1.1B widths", **arch, "finetuned": 3,
                     "dtype": "bfloat16", "bytes_per_model": e2e.model_bytes(arch)},
           "page_cache": "inputs read into the page cache before every merge: only the kernels differ",
           "methods": {}, "full_warmup": None}

    def save():
        result_path.write_text(json.dumps(res, indent=2) + "\n")

    def cache(label: str) -> Path:
        folder = work / f"triton-cache-{label}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        return folder

    def kernels(folder: Path) -> int:
        return len(cached_kernels(str(folder)))

    def merge(cfg: Path, folder: Path) -> dict:
        out = work / "merged"
        shutil.rmtree(out, ignore_errors=True)
        e2e.read_all(files)  # inputs in the page cache
        before = kernels(folder)
        r = e2e.neurokern_merge(cfg, out, {**env, "TRITON_CACHE_DIR": str(folder)}, device.type, [], timeout=600)
        shutil.rmtree(out, ignore_errors=True)
        if r["rc"] != 0:
            return {"error": r.get("error", "")[-1500:]}
        return {"wall_s": r["wall_s"], "engine_s": r["engine_s"], "kernels_compiled": kernels(folder) - before}

    def warmup(folder: Path, *cli_args: str) -> dict:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "neurokern", "warmup", *cli_args, "--quiet"], capture_output=True,
                           text=True, env={**env, "TRITON_CACHE_DIR": str(folder)}, timeout=1800)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            return {"error": (r.stdout + r.stderr)[-1500:]}
        return {"wall_s": round(wall, 2), "kernels_compiled": kernels(folder), "output": r.stdout.strip()[-1500:]}

    log(f"device {name}; work {work}; results {result_path}")
    try:
        folders = e2e.write_models(work / "models", arch, 3, device)
        files = e2e.files_of(folders)
        base, tasks = folders[0], folders[1:]
        configs = {
            "ties": {"merge_method": "ties", "base_model": str(base),
                     "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.2}} for p in tasks],
                     "parameters": {"normalize": True}, "dtype": "bfloat16"},
            "neuromerging": {"merge_method": "neuromerging", "base_model": str(base),
                             "models": [{"model": str(p)} for p in tasks],
                             "parameters": {"density": 0.1, "trim_scope": "global"}, "dtype": "bfloat16"}}
        paths = {}
        for method in args.methods.split(","):
            if method not in configs:
                ap.error(f"--methods: {method!r} is not ties or neuromerging")
            paths[method] = work / f"{method}.yaml"
            paths[method].write_text(yaml.safe_dump(configs[method], sort_keys=False))
        for method, cfg in paths.items():
            m = res["methods"][method] = {}
            cold = cache(f"{method}-cold")
            m["cold"] = merge(cfg, cold)
            log(f"{method}: cold cache {m['cold']}")
            m["warm"] = merge(cfg, cold)
            log(f"{method}: warm cache {m['warm']}")
            warmed = cache(f"{method}-warmup")
            m["warmup"] = warmup(warmed, str(cfg))
            log(f"{method}: neurokern warmup CONFIG {m['warmup'].get('wall_s')} s, "
                f"{m['warmup'].get('kernels_compiled')} kernels")
            m["after_warmup"] = merge(cfg, warmed)
            log(f"{method}: after the warm-up {m['after_warmup']}")
            if all("wall_s" in m[k] for k in ("cold", "warm", "after_warmup")):
                m["jit_wait_s"] = round(m["cold"]["wall_s"] - m["warm"]["wall_s"], 2)
                m["left_after_warmup_s"] = round(m["after_warmup"]["wall_s"] - m["warm"]["wall_s"], 2)
            save()
        if args.full_warmup:
            full = cache("full")
            res["full_warmup"] = warmup(full)
            log(f"neurokern warmup (no config): {res['full_warmup'].get('wall_s')} s, "
                f"{res['full_warmup'].get('kernels_compiled')} kernels")
            res["full_warmup"]["merges_after"] = {method: merge(cfg, full) for method, cfg in paths.items()}
            save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        save()
    log(f"done: {result_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
