#!/usr/bin/env python3
"""70B-class merges: the streaming engine at Llama-3-70B widths, measured, and a throughput model.

    python3 bench/large_merge.py                  # GPU machine: bench/results/large-<gpu>.json, large-model-<gpu>.md
    python3 bench/large_merge.py --smoke          # tiny widths, any machine (CPU too): checks the script
    python3 bench/large_merge.py --model-only bench/results/large-<gpu>.json   # large-model-<gpu>.md again

Llama-3-70B widths: hidden 8192, MLP 28672, 80 layers, 64 query heads and 8 KV heads of 128,
vocabulary 128256, bf16: 70.6 B parameters, 141 GB a model; base + 3 fine-tuned = 564 GB read.
Steps (each prints a line; the JSON is rewritten after each):
 1. source rate: the generated inputs (neurokern.engine.synthetic) read by 16 threads into host
    memory, alone: what the generator gives when nothing else runs (it must outrun the pipeline);
 2. generated inputs, output hashed: a 1-layer run (it compiles the Triton kernels on a fresh
    machine), a 4-layer probe, then the whole 80-layer model (or what --time-budget allows at the
    probe's rate) merged with
    merge_models(sources=..., discard_output=True) in a child process: reads into pinned buffers,
    H2D, the kernels, D2H, sha256 of every output byte (the digests a written merge records), under
    --memory-budget / --host-memory-budget; seconds, input GB/s, seconds per layer, peak host RSS
    and GPU memory, NEUROKERN_PROFILE's breakdown;
 3. real files: as many 70B-width layers as --max-disk-gb holds (base + 3 fine-tuned on disk, plus
    both outputs), the cold read floor, `neurokern merge` twice with the inputs evicted from the page
    cache (its libraries read back first, as mergekit's are; the first run compiles the Triton
    kernels on a fresh machine, the second is timed; NEUROKERN_PROFILE's breakdown), and mergekit
    0.1.5 (`mergekit-yaml --gpu-rich`) on the same files and config when it imports
    (bench/e2e_merge.py's runner: wheels in .whl/ are installed for it), and how far apart the
    outputs are;
 4. the throughput model (docs/large-models.md): wall time of a full 70B merge on 1, 2, 8 GPUs and
    on 2 nodes as a function of disk and network bandwidth, from these figures, into
    large-model-<gpu>.md next to the JSON.
Expected on an H100 box: 6-9 min; --time-budget (default 520 s) bounds it.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# bench/ holds a kernels.py, which would shadow the `kernels` package that transformers imports: the
# repository root goes on the path instead of this folder, and the other scripts are `bench.*`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

GB = 1e9
START = time.perf_counter()
LLAMA_70B = {"hidden": 8192, "ffn": 28672, "layers": 80, "heads": 64, "kv_heads": 8, "vocab": 128256}
SMOKE = {"hidden": 64, "ffn": 176, "layers": 6, "heads": 4, "kv_heads": 2, "vocab": 512}
FINETUNED = 3
FINETUNED_PLUS_BASE = FINETUNED + 1
# the engine's plan at 70B widths needs ~31.5 GB of host and ~37.8 GB of device memory: three input
# slots and the merge's float32 work on the embedding matrix (128256 x 8192, 4 models), whatever the depth
BUDGETS = {"memory_budget": "40GiB", "host_memory_budget": "32GiB"}
SMOKE_BUDGETS = {"memory_budget": "64MiB", "host_memory_budget": "64MiB"}
METHODS = {
    "ties": {"merge_method": "ties", "parameters": {"normalize": True}, "per_model": {"weight": 1.0, "density": 0.2}},
    "neuromerging": {"merge_method": "neuromerging", "parameters": {"density": 0.1, "trim_scope": "global"},
                     "per_model": {}},
}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {msg}", flush=True)


def arch_args(arch: dict) -> dict:
    return {k: arch[k] for k in ("hidden", "ffn", "layers", "heads", "kv_heads", "vocab")}


def config(method: str, base: str, tasks: list[str]) -> dict:
    spec = METHODS[method]
    return {"merge_method": spec["merge_method"], "base_model": base,
            "models": [{"model": t, **({"parameters": spec["per_model"]} if spec["per_model"] else {})} for t in tasks],
            "parameters": spec["parameters"], "dtype": "bfloat16"}


def layer_bytes(arch: dict) -> int:
    """bf16 bytes of one decoder layer of one model."""
    h, f = arch["hidden"], arch["ffn"]
    kv = h * arch["kv_heads"] // arch["heads"]
    return 2 * (2 * h * h + 2 * kv * h + 3 * f * h + 2 * h)


def model_bytes(arch: dict) -> int:
    return 2 * (2 * arch["vocab"] * arch["hidden"] + arch["hidden"]) + arch["layers"] * layer_bytes(arch)


# ---- the child: one merge of generated inputs, output hashed ---------------------------------------
def child(spec: dict) -> None:
    """Runs in its own process (peak RSS and GPU memory are the merge's): prints NK_STATS {json}."""
    import torch

    from bench.machine import peak_memory
    from neurokern.engine import merge_models
    from neurokern.engine.synthetic import llama_shapes, synthetic_models

    models = synthetic_models(llama_shapes(**spec["arch"]), FINETUNED, root="/synthetic/llama",
                              pool_bytes=spec["pool_bytes"])
    cfg = config(spec["method"], str(models[0].path), [str(m.path) for m in models[1:]])
    for m in models:  # the generator's pools, made before the clock starts
        info = next(iter(m.tensors.values()))
        m.read_into(info, torch.empty(16, dtype=torch.uint8), 0, 16)
    t = time.perf_counter()
    result = merge_models(cfg, spec["out"], device=spec["device"], sources=models, discard_output=True,
                          progress=False, **spec["budgets"])
    seconds = time.perf_counter() - t
    est = result.plan.estimate(spec["device"] == "cuda")
    print("NK_STATS " + json.dumps({
        "seconds": seconds, "engine_seconds": result.seconds, "bytes_read": result.bytes_read,
        "input_bytes": result.plan.total_in_bytes, "output_bytes": result.plan.total_out_bytes,
        "passes": result.passes, "shards": len(result.plan.shards), "units": len(result.plan.units),
        "unit_cap": result.plan.unit_cap, "estimate": est, **peak_memory(),
        "digests": result.shard_digests}), flush=True)
    sys.stderr.flush()
    os._exit(0)


def run_child(spec: dict, env: dict, timeout: float) -> dict:
    from bench import e2e_merge as e2e

    r = e2e.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], env, timeout)
    stats = next((json.loads(line[len("NK_STATS "):]) for line in (r.get("stdout") or "").splitlines()
                  if line.startswith("NK_STATS ")), None)
    if r["rc"] != 0 or stats is None:
        return {"error": r.get("error") or f"exit {r['rc']}: " + (r.get("stderr") or "")[-2000:]}
    layers = spec["arch"]["layers"]
    rate = stats["bytes_read"] / stats["seconds"]
    out = {"layers": layers, "method": spec["method"], "wall_s": round(r["wall_s"], 2), "merge_s": round(stats["seconds"], 2),
           "input_GB": round(stats["input_bytes"] / GB, 3), "bytes_read_GB": round(stats["bytes_read"] / GB, 3),
           "output_GB": round(stats["output_bytes"] / GB, 3), "input_GBps": round(rate / GB, 3),
           "seconds_per_layer": round(FINETUNED_PLUS_BASE * layer_bytes(spec["arch"]) / rate, 3),
           "passes": stats["passes"], "effective_passes": round(stats["bytes_read"] / stats["input_bytes"], 3),
           "shards": stats["shards"], "units": stats["units"], "unit_cap_GB": round(stats["unit_cap"] / GB, 3),
           "estimate_GB": {k: round(v / GB, 2) for k, v in stats["estimate"].items()},
           "peak_host_rss_GB": round(stats["peak_rss"] / GB, 2),
           "peak_gpu_reserved_GB": round(stats["peak_gpu_reserved"] / GB, 2),
           "peak_gpu_allocated_GB": round(stats["peak_gpu_allocated"] / GB, 2),
           "peak_gpu_nvml_GB": round(r.get("peak_gpu_nvml", 0) / GB, 2),
           "first_digests": dict(list(stats["digests"].items())[:2])}
    if env.get("NEUROKERN_PROFILE"):
        out["profile"] = (r.get("stderr") or "")[-5000:]
    return out


# ---- 1. the generator alone ----------------------------------------------------------------------
def source_rate(arch: dict, pool_bytes: int, layers: int = 2, threads: int = 16) -> float:
    """GB/s of the generated inputs (the decoder layers of base + 3) read into host memory by
    `threads` threads in 16 MiB pieces. The pieces of a tensor land in one shared buffer (what it
    holds afterwards does not matter): the figure is the generator's, not the allocator's."""
    import torch

    from neurokern.engine.synthetic import llama_shapes, synthetic_models

    models = synthetic_models(llama_shapes(**{**arch, "layers": layers}), FINETUNED, pool_bytes=pool_bytes)
    piece = 16 * 2**20
    tensors = [info for info in models[0].tensors.values() if ".layers." in info.name]
    buf = torch.zeros(max(info.nbytes for info in tensors), dtype=torch.uint8)  # resident before the clock
    jobs = [(m, m.tensors[info.name], at, min(at + piece, info.nbytes)) for m in models for info in tensors
            for at in range(0, info.nbytes, piece)]

    def read(job):
        m, info, begin, end = job
        m.read_into(info, buf[:info.nbytes], begin, end)
        return end - begin

    for m in models:  # the pools, made before the clock starts
        info = next(iter(m.tensors.values()))
        m.read_into(info, torch.empty(16, dtype=torch.uint8), 0, 16)
    with ThreadPoolExecutor(threads) as pool:
        t = time.perf_counter()
        total = sum(pool.map(read, jobs))
    return total / (time.perf_counter() - t)


# ---- 3. files on disk, against mergekit --------------------------------------------------------------
def files_step(args, arch: dict, work: Path, device, env: dict, left, budgets: dict) -> dict:
    from bench import e2e_merge as e2e
    import yaml

    free = shutil.disk_usage(work).free
    # the real run leaves 4 GiB to the machine; the smoke's kilobytes only need to fit
    disk_cap = min(free - (0 if args.smoke else 4 * 2**30), args.max_disk_gb * GB)
    # 4 inputs + neurokern's output + mergekit's output
    need = lambda n: 6 * model_bytes({**arch, "layers": n}) + 2**30  # noqa: E731
    if args.layers is not None:
        layers = args.layers
    else:
        layers = max((n for n in range(0, arch["layers"] + 1) if need(n) <= disk_cap), default=-1)
        if layers < 0:
            return {"skipped": f"even 0 layers (the embeddings) need {need(0) / GB:.1f} GB; {disk_cap / GB:.1f} GB allowed"}
    shape = {**arch, "layers": layers}
    e2e_arch = {"vocab": shape["vocab"], "hidden": shape["hidden"], "ffn": shape["ffn"], "layers": layers,
                "heads": shape["heads"], "kv_heads": shape["kv_heads"]}
    info = {"layers": layers, "bytes_per_model_GB": round(model_bytes(shape) / GB, 2),
            "disk_needed_GB": round(need(layers) / GB, 1), "disk_cap_GB": round(disk_cap / GB, 1),
            "why_this_many_layers": "as many 70B-width decoder layers as --max-disk-gb and the free disk hold for "
                                    "base + 3 fine-tuned inputs and both outputs (embeddings and lm_head included)"}
    log(f"files: {layers} layers at 70B widths, {info['bytes_per_model_GB']} GB a model")
    t = time.perf_counter()
    folders = e2e.write_models(work / "files", e2e_arch, FINETUNED, device)
    os.sync()
    info["generate_and_write_s"] = round(time.perf_counter() - t, 1)
    files = e2e.files_of(folders)
    if args.smoke:  # a shared test machine: only these files leave the page cache
        e2e.evict(files)
        how = "posix_fadvise(DONTNEED)"
    else:
        how = e2e.drop_caches(files)
    read_s, n = e2e.read_all(files)
    info.update(read_floor_s=round(read_s, 2), read_floor_GBps=round(n / read_s / GB, 3), read_floor_how=how,
                input_GB=round(n / GB, 2))
    log(f"files: read floor {read_s:.1f} s ({n / read_s / GB:.2f} GB/s, {how})")
    cfg_path = work / "files-ties.yaml"
    cfg_path.write_text(yaml.safe_dump(config("ties", str(folders[0]), [str(f) for f in folders[1:]]), sort_keys=False))
    extra = ["--memory-budget", budgets["memory_budget"], "--host-memory-budget", budgets["host_memory_budget"]]
    # the read floor dropped every cached page, the libraries' too: read them again first, as for mergekit
    subprocess.run([sys.executable, "-c", e2e.WARM_NEUROKERN], env=env, capture_output=True)
    nk_env = env if args.no_profile else dict(env, NEUROKERN_PROFILE="1")
    # twice, the inputs evicted before each: the first run compiles the Triton kernels where the
    # machine has not run them yet (a first merge), the second finds them in Triton's cache
    for key in ("neurokern_ties_first", "neurokern_ties"):
        shutil.rmtree(work / "nk-ties", ignore_errors=True)
        e2e.evict(files)
        r = info[key] = e2e.neurokern_merge(cfg_path, work / "nk-ties", nk_env, device.type, extra,
                                            timeout=max(60.0, left()))
        if r["rc"] != 0:
            log(f"files: neurokern FAILED: {r.get('error', '')[-500:]}")
            break
        log(f"files: neurokern TIES ({key}) {r['wall_s']:.1f} s ({read_s / r['wall_s']:.2f} of the read floor's "
            f"rate), peak RSS {r['peak_host_rss_GB']} GB, GPU {r['peak_gpu_GB']} GB")
    if r["rc"] == 0:
        info["neurokern_ties_s"] = r["wall_s"]
        info["streams_at_fraction_of_read_floor"] = round(read_s / r["wall_s"], 3)
    mk = info["mergekit"] = {}
    if args.skip_mergekit:
        mk["reason"] = "skipped (--skip-mergekit)"
    elif left() < 120:
        mk["reason"] = f"skipped: {left():.0f} s of the time budget left"
    else:
        mk_env, version = e2e.mergekit_env(work, env)
        if mk_env is None:
            mk["reason"] = version
        else:
            mk["version"] = version
            e2e.evict(files)
            subprocess.run([sys.executable, "-c", e2e.WARM_MERGEKIT], env=mk_env, capture_output=True)
            flags = ["--gpu-rich"] if device.type == "cuda" else []
            cmd = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg_path), str(work / "mk-ties"), *flags,
                   "--no-write-model-card"]
            mk["command"] = "mergekit-yaml files-ties.yaml OUT " + " ".join(flags + ["--no-write-model-card"])
            rm = e2e.run(cmd, mk_env, max(60.0, left() - 20))
            if rm["rc"] == 0:
                mk.update(ties_s=round(rm["wall_s"], 2), peak_host_rss_GB=round(rm["peak_rss"] / GB, 2),
                          peak_gpu_GB_nvml=round(rm["peak_gpu_nvml"] / GB, 2))
                if r["rc"] == 0:
                    mk["speedup_neurokern_vs_mergekit"] = round(rm["wall_s"] / r["wall_s"], 2)
                    mk["vs_neurokern"] = e2e.compare(work / "nk-ties", work / "mk-ties", device)
                log(f"files: {mk['command']}: {rm['wall_s']:.1f} s")
            else:
                mk["reason"] = rm.get("error") or f"exit {rm['rc']}: " + (rm.get("stderr") or "")[-800:]
                log(f"files: mergekit failed: {mk['reason'][-300:]}")
    if "reason" in mk:
        log(f"files: mergekit: {mk['reason'][:200]}")
    for folder in ("files", "nk-ties", "mk-ties"):
        shutil.rmtree(work / folder, ignore_errors=True)
    return info


# ---- 4. the throughput model -------------------------------------------------------------------------
def imbalance(arch: dict, budgets: dict, worlds=(1, 2, 8, 16)) -> dict:
    """world -> (largest rank's output bytes x world / all output bytes) of the model's plan (5 GB
    shards): a rank merges whole output shards, so the slowest rank carries this factor over an
    even split; "shards" -> their number."""
    from neurokern.config import parse_size
    from neurokern.engine.plan import make_plan
    from neurokern.engine.synthetic import llama_shapes, synthetic_models

    base = synthetic_models(llama_shapes(**arch), 0)[0]
    plan = make_plan(base, FINETUNED_PLUS_BASE, None, 5 * 2**30, parse_size(budgets["memory_budget"], "m"),
                     parse_size(budgets["host_memory_budget"], "h"), cuda=True)
    out = {"shards": len(plan.shards)}
    for world in worlds:
        loads = [sum(plan.shards[i].nbytes for i in shards) for shards in plan.rank_shards(world)]
        out[world] = max(loads) * world / sum(loads)
    return out


def predict(I: float, O: float, p: float, f: float, nodes: int, gpus: int, G: float, R: float, W: float,
            N: float = None, same_disk: bool = True, start: float = 5.0) -> tuple[float, str]:
    """Seconds and the bounding resource of one merge (docs/large-models.md, "Throughput model").
    I, O: input bytes of one read of all models, output bytes; p: input reads (passes); f: shard
    imbalance of the world size; per node: `gpus` pipelines of G input bytes/s each, a disk reading
    R and writing W bytes/s (same_disk: the output goes to the input disk, whose time is then the
    sum of both); N: each node's network bytes/s when inputs and output go over the network to
    shared storage (None: local disks). The pipeline overlaps reading, the kernels and writing, so
    the slowest resource sets the time."""
    node_in, node_out = f * p * I / nodes, f * O / nodes
    if N is not None:
        terms = {"GPU pipeline": node_in / (gpus * G), "network": max(node_in, node_out) / N}
    elif same_disk:
        terms = {"GPU pipeline": node_in / (gpus * G), "disk": node_in / R + node_out / W}
    else:
        terms = {"GPU pipeline": node_in / (gpus * G), "disk read": node_in / R, "output write": node_out / W}
    bound = max(terms, key=terms.get)
    return terms[bound] + start, bound


def model_name(json_name: str) -> str:
    """large-<gpu>.json -> large-model-<gpu>.md"""
    return "large-model-" + json_name[len("large-"):-len(".json")] + ".md"


def model_markdown(res: dict) -> str:
    syn, files = res.get("synthetic") or {}, res.get("files") or {}
    G = (syn.get("input_GBps") or 0) * GB
    R = (files.get("read_floor_GBps") or 0) * GB
    arch = res["model"]["arch"]
    I = FINETUNED_PLUS_BASE * model_bytes(arch)
    O = model_bytes(arch)
    f = {int(k): v for k, v in res.get("imbalance", {}).items() if k != "shards"}
    lines = [f"# 70B throughput model ({res['device']}, {res.get('date', '')})", "",
             "Generated by `bench/large_merge.py` from `" + res.get("json", "large-*.json") + "`; formulas in "
             "docs/large-models.md (\"Throughput model\").", "",
             f"- model: {res['model']['shape']}, base + {FINETUNED} fine-tuned, I = {I / GB:.0f} GB read per pass, "
             f"O = {O / GB:.0f} GB written",
             "- G, one GPU's pipeline (generated inputs, output hashed): "
             + (f"{G / GB:.2f} GB/s of input ({syn.get('layers')} layers, {syn.get('method')})" if G else "not measured"),
             "- R, this machine's disk (cold read floor of the files step): " + (f"{R / GB:.2f} GB/s" if R else "not measured"),
             f"- shard imbalance f (largest rank's output x world / total; {res.get('imbalance', {}).get('shards')} "
             "shards of at most 5 GB): "
             + ", ".join(f"{w} ranks {v:.3f}" for w, v in sorted(f.items())), ""]
    if not G:
        lines.append("No GPU figure in this file: nothing to model yet.")
        return "\n".join(lines) + "\n"
    passes = {"TIES (per-tensor trim)": 1.0, "TIES, global trim (histogram, boundary, merge reads)": 3.0,
              "NeuroMerging, global trim (histogram, boundary, L1, merge reads)": 4.0}
    disks = sorted({1.0, 2.0, 4.0, 8.0, 16.0} | ({round(R / GB, 2)} if R else set()))
    for label, p in passes.items():
        lines += [f"## {label}: p = {p:g}", "",
                  "Wall time in seconds (and the bound) with every node's inputs and output on one local disk "
                  "of R GB/s (reads and writes share it):", "",
                  "| R (GB/s) | 1 GPU | 2 GPUs | 8 GPUs | 2 nodes x 8 GPUs |", "|---|---|---|---|---|"]
        for r in disks:
            cells = []
            for nodes, gpus in ((1, 1), (1, 2), (1, 8), (2, 8)):
                t, bound = predict(I, O, p, f.get(nodes * gpus, 1.0), nodes, gpus, G, r * GB, r * GB)
                cells.append(f"{t:.0f} s ({bound})")
            lines.append(f"| {r:g} | " + " | ".join(cells) + " |")
        lines += ["", "2 nodes x 8 GPUs, inputs and output on shared storage over each node's network link of N GB/s "
                      "(full duplex; the storage itself taken as faster):", "", "| N (GB/s) | seconds (bound) |",
                  "|---|---|"]
        for n in (3.125, 12.5, 25.0, 50.0):
            t, bound = predict(I, O, p, f.get(16, 1.0), 2, 8, G, 1e30, 1e30, N=n * GB)
            lines.append(f"| {n:g} ({n * 8:g} Gb/s) | {t:.0f} s ({bound}) |")
        lines.append("")
    lines += ["G per GPU is measured on one GPU; 8 pipelines on one host also share its memory bandwidth and PCIe "
              "switches, which the table does not model: take the 8-GPU column as a lower bound until a multi-GPU "
              "run measures it. Start-up is taken as 5 s."]
    return "\n".join(lines) + "\n"


# ---- the benchmark -------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for large-<gpu>.json and large-model-<gpu>.md")
    ap.add_argument("--work", default="", help="scratch folder on a local disk (default /tmp/nk-large, not tmpfs)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--time-budget", type=float, default=520.0, help="seconds; later steps shrink or are skipped")
    ap.add_argument("--methods", default="ties", help="comma-separated, of: " + ", ".join(METHODS))
    ap.add_argument("--synthetic-layers", type=int, default=None, help="decoder layers of the generated model "
                    "(default: all 80, or what the time budget allows)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers written to disk (default: what fits)")
    ap.add_argument("--max-disk-gb", type=float, default=50.0, help="disk the files step may use")
    ap.add_argument("--memory-budget", default=None, help=f"device budget (default {BUDGETS['memory_budget']})")
    ap.add_argument("--host-memory-budget", default=None,
                    help=f"host budget (default {BUDGETS['host_memory_budget']})")
    ap.add_argument("--pool-mb", type=int, default=64, help="generator pool per model and dtype, MiB")
    ap.add_argument("--skip-files", action="store_true")
    ap.add_argument("--synthetic-from", default="", metavar="JSON",
                    help="skip steps 1-2: take their figures from an earlier large-<gpu>.json of this machine")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--no-profile", action="store_true", help="no NEUROKERN_PROFILE breakdown of the generated run and of the file run")
    ap.add_argument("--smoke", action="store_true", help="tiny widths: checks the script on any machine")
    ap.add_argument("--model-only", default="", metavar="JSON", help="write large-model.md from a results file")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
    if args.model_only:
        res = json.loads(Path(args.model_only).read_text())
        path = Path(args.model_only).with_name(model_name(Path(args.model_only).name))
        path.write_text(model_markdown(res))
        print(path.read_text())
        return 0

    import torch

    from bench import e2e_merge as e2e
    from bench.machine import device_tag

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tag = device_tag(device) + ("-smoke" if args.smoke else "")
    arch = SMOKE if args.smoke else LLAMA_70B
    budgets = dict(SMOKE_BUDGETS if args.smoke else BUDGETS)
    budgets.update({k: v for k, v in (("memory_budget", args.memory_budget),
                                      ("host_memory_budget", args.host_memory_budget)) if v})
    methods = [m for m in args.methods.split(",") if m]
    if any(m not in METHODS for m in methods):
        ap.error(f"--methods: choose from {', '.join(METHODS)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / f"large-{tag}.json"
    work = Path(args.work) if args.work else e2e.pick_work("").with_name("nk-large")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    pool_bytes = (2 if args.smoke else args.pool_mb) * 2**20
    res = {"device": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpus": os.cpu_count(),
           "host_memory_GB": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1),
           "work_dir": str(work), "work_fs": e2e.fs_type(work), "json": result_path.name,
           "model": {"shape": "smoke" if args.smoke else "Llama-3-70B widths", "arch": arch,
                     "bytes_per_model": model_bytes(arch), "bytes_per_layer": layer_bytes(arch),
                     "finetuned": FINETUNED, "dtype": "bfloat16"},
           "budgets": budgets, "source_rate_GBps": None, "synthetic": None, "synthetic_runs": {}, "files": None,
           "imbalance": {}, "notes": []}

    def save():
        result_path.write_text(json.dumps(res, indent=2) + "\n")

    def left() -> float:
        return args.time_budget - (time.perf_counter() - START)

    log(f"device {name}; work {work} ({res['work_fs']}); results {result_path}")
    try:
        res["imbalance"] = {str(k): round(v, 4) for k, v in imbalance(arch, budgets).items()}
        if args.synthetic_from:  # steps 1-2 as an earlier run on this machine measured them
            earlier = json.loads(Path(args.synthetic_from).read_text())
            if earlier.get("device") != name or earlier.get("model", {}).get("arch") != arch:
                ap.error(f"--synthetic-from {args.synthetic_from}: measured on {earlier.get('device')} at other "
                         f"widths; this run is {name}")
            for key in ("source_rate_GBps", "synthetic", "synthetic_runs"):
                res[key] = earlier.get(key)
            res["notes"].append(f"steps 1-2 (generated inputs) from {Path(args.synthetic_from).name}, measured "
                                f"{earlier.get('date')} on the same device kind")
            methods = []
        else:
            rate = source_rate(arch, pool_bytes)
            res["source_rate_GBps"] = round(rate / GB, 2)
            log(f"generator alone: {rate / GB:.2f} GB/s into host memory (16 threads)")
        save()

        base_spec = {"device": device.type, "budgets": budgets, "pool_bytes": pool_bytes, "out": str(work / "discarded")}
        child_env = dict(env, NEUROKERN_PROFILE="1") if not args.no_profile else env
        share = 0.55 if not args.skip_files else 0.9  # of the time left, for the generated runs
        for method in methods:
            # a first run compiles the Triton kernels (on a fresh machine), a second measures the rate
            for probe_name, probe_layers in (("compile", 1), ("probe", 2 if args.smoke else 4)):
                probe = run_child({**base_spec, "method": method, "arch": arch_args({**arch, "layers": probe_layers})},
                                  env, max(60.0, left()))
                res["synthetic_runs"][f"{method}_{probe_name}"] = probe
                if "error" in probe:
                    log(f"{method}: {probe_name} run FAILED: {probe['error'][-800:]}")
                    break
                log(f"{method}: {probe_name} run, {probe_layers} layers: {probe['wall_s']:.1f} s "
                    f"({probe['input_GBps']:.2f} GB/s)")
            save()
            if "error" in probe:
                continue
            if args.synthetic_layers is not None:
                layers = args.synthetic_layers
            else:  # time per layer from the probe, with a margin; all 80 when they fit
                fixed = 15.0  # the child's start-up and the embeddings' share
                per_layer = FINETUNED_PLUS_BASE * layer_bytes(arch) / (probe["input_GBps"] * GB)
                budget = left() * share / len(methods) - fixed
                layers = int(max(1, min(arch["layers"], budget / (1.3 * per_layer))))
            spec = {**base_spec, "method": method, "arch": arch_args({**arch, "layers": layers})}
            run = run_child(spec, child_env, max(60.0, left()))
            res["synthetic_runs"][method] = run
            if "error" in run:
                log(f"{method}: {layers} layers FAILED: {run['error'][-800:]}")
            else:
                log(f"{method}: {layers} layers, {run['bytes_read_GB']} GB read in {run['merge_s']:.1f} s = "
                    f"{run['input_GBps']:.2f} GB/s, {run['seconds_per_layer']:.2f} s a layer; peak RSS "
                    f"{run['peak_host_rss_GB']} GB, GPU {run['peak_gpu_reserved_GB']} GB reserved")
                if res["synthetic"] is None:
                    res["synthetic"] = run
            save()
        if args.skip_files:
            res["files"] = {"skipped": "--skip-files"}
        elif left() < 90:
            res["files"] = {"skipped": f"{left():.0f} s of the time budget left"}
        else:
            res["files"] = files_step(args, arch, work, device, env, left, budgets)
        files = res["files"] or {}
        if res["synthetic"] and files.get("read_floor_GBps"):
            ratio = res["synthetic"]["input_GBps"] / files["read_floor_GBps"]
            res["pipeline_over_disk"] = round(ratio, 2)
            res["notes"].append(f"one GPU's pipeline takes {ratio:.2f}x this disk's read rate: "
                                + ("the disk bounds a one-GPU merge" if ratio >= 1 else "the pipeline bounds it"))
        save()
        (out_dir / model_name(result_path.name)).write_text(model_markdown(res))
        log(f"throughput model: {out_dir / model_name(result_path.name)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        save()
    log(f"done: {result_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
