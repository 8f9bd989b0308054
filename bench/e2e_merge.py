#!/usr/bin/env python3
"""End-to-end whole-model merges on a GPU machine: disk to disk, cold page cache.

    python3 bench/e2e_merge.py --out $OUT            # writes $OUT/e2e-<gpu>.json (and prints progress)

What it does, in order (each step prints a line; the JSON is rewritten after every step):
 1. writes a TinyLlama-1.1B-shaped base and 4 fine-tuned copies (bf16, HF folders, 2 shards each,
    11 GB) under --work (default /tmp/nk-e2e; a folder on a disk, not tmpfs, is picked if /tmp is
    in memory);
 2. the cold read floor: page cache dropped (`echo 3 > /proc/sys/vm/drop_caches`, else
    posix_fadvise(DONTNEED) on every file), then every input byte read by 16 threads in file
    order; the same after evicting only the inputs, and in the order of the engine's warm-up reads;
 3. `neurokern merge` of a mergekit TIES config and of NeuroMerging (global trim, default lambda),
    as subprocesses (wall time including start-up; the engine's own time too), with peak host RSS
    and peak GPU memory: first once with the inputs in the page cache (on a fresh machine that run
    also compiles the Triton kernels into Triton's cache, as any first use does; recorded), then
    timed with the input files evicted from the page cache (sync + posix_fadvise(DONTNEED) on each:
    cold inputs, while the libraries stay as warm as on a machine where Python ran before);
 4. `mergekit-yaml --gpu-rich` on the same files and config, if mergekit imports (wheels in .whl/
    at the repo root are installed into --work when it does not), and how far its output is from
    neurokern's;
 5. a 7B-shaped merge (Llama-2-7B widths: hidden 4096, FFN 11008, vocab 32000; base + 3
    fine-tuned) under --memory-budget 16GiB (GPU) / --host-memory-budget 32GiB: the number of
    decoder layers is cut from 32 to what the disk and the time left allow (recorded; memory use
    depends on the largest tensor and the work-unit size, not on the layer count).
The 1.1B inputs are deleted before the 7B step. Expected on an H100 box: 4-7 min, at most ~45 GB of
disk (--time-budget, default 450 s, bounds it; steps that no longer fit are recorded as skipped).
`--smoke` runs tiny shapes on any machine (CPU too) to check the script itself.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# bench/ holds a kernels.py, which would shadow the `kernels` package that transformers imports: the
# repository root goes on the path instead of this folder, and the other scripts are `bench.*`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))
from bench.machine import device_tag  # noqa: E402
GB = 1e9
START = time.perf_counter()

TINYLLAMA = {"vocab": 32000, "hidden": 2048, "ffn": 5632, "layers": 22, "heads": 32, "kv_heads": 4}
LLAMA2_7B = {"vocab": 32000, "hidden": 4096, "ffn": 11008, "layers": 32, "heads": 32, "kv_heads": 32}
SMOKE = {"vocab": 512, "hidden": 64, "ffn": 176, "layers": 2, "heads": 4, "kv_heads": 2}
SMOKE_7B = {"vocab": 512, "hidden": 128, "ffn": 352, "layers": 8, "heads": 4, "kv_heads": 4}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - START


# ---- models ------------------------------------------------------------------------------------
def tensor_shapes(arch: dict) -> list[tuple[str, tuple[int, ...]]]:
    """A LlamaForCausalLM's tensors, in the order Hugging Face saves them."""
    h, f, v = arch["hidden"], arch["ffn"], arch["vocab"]
    kv = h * arch["kv_heads"] // arch["heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(arch["layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def model_bytes(arch: dict) -> int:
    return sum(2 * _numel(s) for _, s in tensor_shapes(arch))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def hf_config(arch: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": arch["hidden"],
            "intermediate_size": arch["ffn"], "num_hidden_layers": arch["layers"],
            "num_attention_heads": arch["heads"], "num_key_value_heads": arch["kv_heads"],
            "vocab_size": arch["vocab"], "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def write_models(root: Path, arch: dict, n_ft: int, device: torch.device, shards: int = 2) -> list[Path]:
    """Base + n_ft fine-tuned copies (bf16): base ~ N(0, 0.02) (norms 1), each fine-tuned copy the
    base plus a dense task vector ~ N(0, 0.002) on half of the entries. Generated on the device."""
    from safetensors.torch import save_file

    names = tensor_shapes(arch)
    per_shard = -(-len(names) // shards)
    g = torch.Generator(device=device).manual_seed(0)
    base = {}
    for n, s in names:
        base[n] = (torch.ones(s, device=device) if len(s) == 1 else
                   0.02 * torch.randn(s, device=device, generator=g)).to(torch.bfloat16)
    folders = []
    for m in range(n_ft + 1):
        folder = root / ("base" if m == 0 else f"task_{m}")
        folder.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {}
            for n, _ in names[i * per_shard:(i + 1) * per_shard]:
                w = base[n]
                if m:
                    delta = 0.002 * torch.randn(w.shape, device=device, generator=g)
                    delta *= torch.rand(w.shape, device=device, generator=g) < 0.5
                    w = (w.float() + delta).to(torch.bfloat16)
                part[n] = w.cpu()
            save_file(part, str(folder / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
            del part
        total = sum(2 * _numel(s) for _, s in names)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (folder / "config.json").write_text(json.dumps(hf_config(arch), indent=2))
        folders.append(folder)
    del base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folders


def files_of(folders: list[Path]) -> list[Path]:
    return [f for d in folders for f in sorted(d.glob("*.safetensors"))]


# ---- page cache and reading ----------------------------------------------------------------------
def evict(files: list[Path]) -> None:
    """The files' pages out of the page cache (written back first), nothing else."""
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_caches(files: list[Path]) -> str:
    """The whole page cache dropped where allowed, else the files evicted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        evict(files)
        return "posix_fadvise(DONTNEED)"


WARM_MERGEKIT = ("import torch, mergekit.merge, mergekit.scripts.run_yaml, transformers\n"
                 "if torch.cuda.is_available(): torch.zeros(1, device='cuda')")
# the same for neurokern: its libraries read into the page cache, as they are on a machine where it ran before
WARM_NEUROKERN = ("import torch, triton, neurokern.cli, neurokern.engine, neurokern.ops\n"
                  "if torch.cuda.is_available(): torch.zeros(1, device='cuda')")
COLD = ("input files evicted from the page cache (sync, then posix_fadvise(DONTNEED) on each); the libraries "
        "(and Triton's kernel cache) warm from an earlier run, as on a machine where the tool ran before")


def read_all(files: list[Path], threads: int = 16, chunk: int = 64 * 2**20) -> tuple[float, int]:
    jobs = [(p, off, min(chunk, p.stat().st_size - off)) for p in files for off in range(0, p.stat().st_size, chunk)]
    local = threading.local()

    def read(job):
        path, off, n = job
        if not hasattr(local, "buf"):
            local.buf = bytearray(chunk)
        fd = os.open(path, os.O_RDONLY)
        try:
            view, done = memoryview(local.buf)[:n], 0
            while done < n:
                done += os.preadv(fd, [view[done:]], off + done)
        finally:
            os.close(fd)
        return n

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, jobs))
    return time.perf_counter() - t, total


def read_in_warmup_order(folders: list[Path]) -> float:
    """Seconds the engine's warm-up readers (neurokern.engine.prefetch: its threads and pieces, in
    the work units' order: each window of the base's tensors, then every model's bytes of it) take
    to bring every input into the page cache; against read_all's file order, whether that order
    costs the merges read speed."""
    from neurokern.engine import prefetch
    from neurokern.engine.timing import Recorder

    inputs = [prefetch._byte_ranges(folder) for folder in folders]
    t = time.perf_counter()
    warmup = prefetch._Warmup(("e2e",), prefetch._pieces(inputs, 1 << 62), Recorder())
    for thread in warmup.threads:
        thread.join()
    return time.perf_counter() - t


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    try:
        for line in open("/proc/mounts"):
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def pick_work(requested: str) -> Path:
    if requested:
        return Path(requested)
    for cand in (Path("/tmp"), Path("/var/tmp"), ROOT):
        if cand.is_dir() and fs_type(cand) not in ("tmpfs", "ramfs"):
            return cand / "nk-e2e"
    return Path("/tmp/nk-e2e")


# ---- subprocesses with peak memory -----------------------------------------------------------------
class Monitor(threading.Thread):
    """Polls a child's VmHWM (its peak RSS, monotonic) and the GPU's used memory (NVML, whole device)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop, self.rss, self.gpu = pid, threading.Event(), 0, 0
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
            self.gpu0 = pynvml.nvmlDeviceGetMemoryInfo(self.nvml[1]).used
        except Exception:  # noqa: BLE001 (no NVML: no device-wide figure)
            self.nvml, self.gpu0 = None, 0

    def run(self):
        while not self.stop.is_set():
            try:
                for line in open(f"/proc/{self.pid}/status"):
                    if line.startswith("VmHWM:"):
                        self.rss = max(self.rss, int(line.split()[1]) * 1024)
            except OSError:
                pass
            if self.nvml:
                pynvml, handle = self.nvml
                self.gpu = max(self.gpu, pynvml.nvmlDeviceGetMemoryInfo(handle).used - self.gpu0)
            self.stop.wait(0.1)


def run(cmd: list[str], env: dict, timeout: float) -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mon = Monitor(proc.pid)
    mon.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {"rc": None, "wall_s": time.perf_counter() - t, "error": f"timed out after {timeout:.0f} s",
                "tail": (out + err)[-2000:]}
    finally:
        mon.stop.set()
        mon.join()
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t, "stdout": out, "stderr": err,
            "peak_rss": mon.rss, "peak_gpu_nvml": mon.gpu}


# neurokern's CLI in-process, then its own peak figures (exact, from inside)
NK_WRAPPER = """
import json, os, sys, time
from neurokern.cli import main  # imports no torch: the command line starts its reads first
t = time.perf_counter()
rc = main(sys.argv[1:])
seconds = time.perf_counter() - t
from bench.machine import peak_memory
print("NK_STATS " + json.dumps({"rc": rc, "seconds": seconds, **peak_memory()}), flush=True)
sys.stderr.flush()
os._exit(rc)  # as the neurokern command ends (neurokern.cli.entry)
"""


def neurokern_merge(cfg: Path, out: Path, env: dict, device: str, extra: list[str], timeout: float) -> dict:
    r = run([sys.executable, "-c", NK_WRAPPER, "merge", str(cfg), str(out), "--device", device, *extra], env, timeout)
    stats = {}
    for line in (r.get("stdout") or "").splitlines():
        if line.startswith("NK_STATS "):
            stats = json.loads(line[len("NK_STATS "):])
    summary = re.search(r"merged (\d+) tensors .* in ([\d.]+) s \((.*)\)", r.get("stdout") or "")
    res = {"wall_s": round(r["wall_s"], 2), "rc": r["rc"]}
    if r["rc"] != 0:
        res["error"] = r.get("error") or (r.get("stderr") or "")[-1500:]
        return res
    res.update(engine_s=round(stats.get("seconds", float("nan")), 2),
               peak_host_rss_GB=round(stats.get("peak_rss", r["peak_rss"]) / GB, 2),
               peak_gpu_GB=round(stats.get("peak_gpu_reserved", 0) / GB, 2),
               peak_gpu_allocated_GB=round(stats.get("peak_gpu_allocated", 0) / GB, 2),
               summary=summary.group(0) if summary else None)
    if env.get("NEUROKERN_PROFILE"):  # the engine's timing breakdown (stderr)
        res["profile"] = (r.get("stderr") or "")[-4000:]
    return res


def mergekit_env(work: Path, env: dict) -> tuple[dict, str]:
    """An environment where mergekit imports, or the reason there is none."""
    probe = [sys.executable, "-c", "import mergekit.scripts.run_yaml, importlib.metadata as m; print(m.version('mergekit'))"]
    r = subprocess.run(probe, env=env, capture_output=True, text=True)
    if r.returncode == 0:
        return env, r.stdout.strip()
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not any(w.name.startswith("mergekit-") for w in wheels):
        return None, "mergekit is not importable and no mergekit wheel in .whl/: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    site = work / "mergekit-site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", str(site), *map(str, wheels)], capture_output=True, text=True)
    if inst.returncode != 0:
        return None, "installing .whl/ failed: " + inst.stderr.strip()[-500:]
    env = dict(env, PYTHONPATH=f"{site}{os.pathsep}{env.get('PYTHONPATH', '')}")
    r = subprocess.run(probe, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return None, "mergekit from .whl/ does not import: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return env, r.stdout.strip()


def compare(a: Path, b: Path, device: torch.device) -> dict:
    """Share of differing elements and largest difference between two merged models."""
    from safetensors import safe_open

    def tensors(folder):
        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
            [p.name for p in folder.glob("*.safetensors")]
        for f in files:
            with safe_open(str(folder / f), "pt", device=str(device)) as h:
                for k in h.keys():
                    yield k, h.get_tensor(k)

    other = dict(tensors(b))
    diff = total = 0
    worst = 0.0
    for k, x in tensors(a):
        y = other.pop(k, None)
        if y is None or y.shape != x.shape:
            return {"error": f"tensor {k} missing or of another shape in {b}"}
        d = (x.float() - y.float()).abs()
        diff += int((d > 0).sum())
        total += d.numel()
        worst = max(worst, float(d.max()))
    return {"differing_fraction": diff / max(total, 1), "max_abs_diff": worst, "extra_tensors": len(other)}


# ---- the benchmark -------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for e2e-<gpu>.json")
    ap.add_argument("--work", default="", help="scratch folder on a local disk (default /tmp/nk-e2e, not tmpfs)")
    ap.add_argument("--time-budget", type=float, default=450.0, help="seconds; later steps are skipped past it")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--layers-7b", type=int, default=None, help="decoder layers of the 7B-shaped model (default: fit)")
    ap.add_argument("--max-disk-gb", type=float, default=45.0, help="disk the 7B step may use (inputs + output)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--trace", default="", help="folder for a timeline of each timed neurokern run "
                    "(NEUROKERN_TRACE: trace-<method>.json, Chrome trace format)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script on any machine")
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tag = device_tag(device) + ("-smoke" if args.smoke else "")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / f"e2e-{tag}.json"
    work = pick_work(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    small, seven = (SMOKE, SMOKE_7B) if args.smoke else (TINYLLAMA, LLAMA2_7B)
    res = {"device": name, "torch": torch.__version__, "work_dir": str(work), "work_fs": fs_type(work),
           "disk_free_GB": round(shutil.disk_usage(work).free / GB, 1), "cpus": os.cpu_count(),
           "model": {"shape": "TinyLlama-1.1B" if not args.smoke else "smoke", **small,
                     "params": sum(_numel(s) for _, s in tensor_shapes(small)), "dtype": "bfloat16",
                     "finetuned": 4, "bytes_per_model": model_bytes(small)},
           "read_floor_s": None, "neurokern": {}, "mergekit": {}, "peak_host_rss_GB": None, "peak_gpu_GB": None,
           "7b": None, "notes": []}

    def save():
        result_path.write_text(json.dumps(res, indent=2) + "\n")

    def left() -> float:
        return args.time_budget - elapsed()

    log(f"device {name}; work dir {work} ({res['work_fs']}, {res['disk_free_GB']} GB free); results {result_path}")
    try:
        # 1. inputs
        t = time.perf_counter()
        folders = write_models(work / "tiny", small, 4, device)
        os.sync()
        gen_s = time.perf_counter() - t
        files = files_of(folders)
        in_bytes = sum(f.stat().st_size for f in files)
        write_bw = in_bytes / gen_s
        res["model"]["generate_and_write_s"] = round(gen_s, 1)
        log(f"wrote base + 4 fine-tuned: {in_bytes / GB:.2f} GB in {gen_s:.1f} s ({write_bw / GB:.2f} GB/s with sync)")

        # 2. cold read floor; the same after evicting only the inputs (how the merges start)
        how = drop_caches(files)
        read_s, n = read_all(files)
        read_bw = n / read_s
        res["read_floor_s"] = round(read_s, 2)
        res["read_floor_GBps"] = round(read_bw / GB, 2)
        log(f"cold read floor ({how}): {n / GB:.2f} GB in {read_s:.2f} s = {read_bw / GB:.2f} GB/s")
        evict(files)
        evicted_s, _ = read_all(files)
        res["read_floor_evicted_inputs_s"] = round(evicted_s, 2)
        log(f"read after evicting the inputs only: {evicted_s:.2f} s")
        evict(files)
        res["read_warmup_order_evicted_s"] = round(read_in_warmup_order(folders), 2)
        log(f"the same in the engine's warm-up order: {res['read_warmup_order_evicted_s']:.2f} s")
        save()

        # 3. neurokern
        base, tasks = folders[0], folders[1:]
        ties = {"merge_method": "ties", "base_model": str(base),
                "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.2}} for p in tasks],
                "parameters": {"normalize": True, "lambda": 1.0}, "dtype": "bfloat16"}
        neuro = {"merge_method": "neuromerging", "base_model": str(base), "models": [{"model": str(p)} for p in tasks],
                 "parameters": {"density": 0.1, "trim_scope": "global"}, "dtype": "bfloat16"}
        import yaml
        cfgs = {}
        for key, cfg in (("ties", ties), ("neuromerging", neuro)):
            cfgs[key] = work / f"{key}.yaml"
            cfgs[key].write_text(yaml.safe_dump(cfg, sort_keys=False))
        timeout = max(60.0, left())
        peaks_rss, peaks_gpu = [], []
        res["cold_cache"] = COLD
        for key in ("ties", "neuromerging"):
            out = work / f"nk-{key}"
            first = neurokern_merge(cfgs[key], out, env, device.type, [], timeout=max(60.0, left()))
            res["neurokern"][f"{key}_first_run_s"] = first["wall_s"] if first["rc"] == 0 else None
            log(f"neurokern {key}, first run (inputs in the page cache, Triton compiling on a fresh machine): "
                f"{first['wall_s']:.1f} s")
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # a failed first run
            evict(files)
            timed_env = {**env, "NEUROKERN_TRACE": str(Path(args.trace) / f"trace-{key}.json")} if args.trace else env
            r = neurokern_merge(cfgs[key], out, timed_env, device.type, [], timeout=max(60.0, left()))
            res["neurokern"][f"{key}_s"] = r["wall_s"] if r["rc"] == 0 else None
            res["neurokern"][f"{key}_detail"] = r
            if r["rc"] == 0:
                peaks_rss.append(r["peak_host_rss_GB"])
                peaks_gpu.append(r["peak_gpu_GB"])
                log(f"neurokern {key}: {r['wall_s']:.1f} s end to end (engine {r['engine_s']:.1f} s), peak RSS "
                    f"{r['peak_host_rss_GB']:.1f} GB, GPU {r['peak_gpu_GB']:.1f} GB")
            else:
                log(f"neurokern {key} FAILED: {r.get('error', '')[-500:]}")
            save()
        res["neurokern"]["flags"] = f"--device {device.type} (default budgets: 8 GiB host, 70% of free GPU memory)"
        res["peak_host_rss_GB"] = max(peaks_rss, default=None)
        res["peak_gpu_GB"] = max(peaks_gpu, default=None)
        shutil.rmtree(work / "nk-neuromerging", ignore_errors=True)

        # 4. mergekit
        mk = res["mergekit"]
        mk["ties_gpu_rich_s"] = None
        if args.skip_mergekit:
            mk["reason"] = "skipped (--skip-mergekit)"
        elif left() < 90:
            mk["reason"] = f"skipped: {left():.0f} s of the time budget left"
        else:
            mk_env, version = mergekit_env(work, env)
            if mk_env is None:
                mk["reason"] = version
                log(f"mergekit: {version}")
            else:
                mk["version"] = version
                evict(files)
                subprocess.run([sys.executable, "-c", WARM_MERGEKIT], env=mk_env, capture_output=True)
                flags = ["--gpu-rich"] if device.type == "cuda" else []
                cmd = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfgs["ties"]), str(work / "mk-ties"),
                       *flags, "--no-write-model-card"]
                budget_mk = min(timeout, max(60.0, left() - 120 if not args.skip_7b else left()))
                r = run(cmd, mk_env, budget_mk)
                mk["command"] = "mergekit-yaml ties.yaml OUT " + " ".join(flags + ["--no-write-model-card"])
                if r["rc"] == 0:
                    mk["ties_gpu_rich_s"] = round(r["wall_s"], 2)
                    mk["peak_host_rss_GB"] = round(r["peak_rss"] / GB, 2)
                    mk["peak_gpu_GB_nvml"] = round(r["peak_gpu_nvml"] / GB, 2)
                    mk["vs_neurokern_ties"] = compare(work / "nk-ties", work / "mk-ties", device)
                    log(f"{mk['command']}: {r['wall_s']:.1f} s; vs neurokern: {mk['vs_neurokern_ties']}")
                else:
                    mk["reason"] = r.get("error") or f"exit {r['rc']}: " + (r.get("stderr") or "")[-800:]
                    log(f"mergekit failed: {mk['reason'][-300:]}")
        if res["neurokern"].get("ties_s") and mk.get("ties_gpu_rich_s"):
            mk["speedup_neurokern_vs_mergekit"] = round(mk["ties_gpu_rich_s"] / res["neurokern"]["ties_s"], 2)
        save()
        shutil.rmtree(work / "tiny", ignore_errors=True)
        shutil.rmtree(work / "nk-ties", ignore_errors=True)
        shutil.rmtree(work / "mk-ties", ignore_errors=True)

        # 5. 7B-shaped, under budgets
        if args.skip_7b:
            res["7b"] = {"skipped": "--skip-7b"}
        else:
            res["7b"] = seven_b(args, seven, work, device, env, write_bw, read_bw, left)
        save()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        save()
    log(f"done: {result_path}")
    print(json.dumps(res, indent=2))
    return 0


def seven_b(args, arch: dict, work: Path, device: torch.device, env: dict, write_bw: float, read_bw: float, left) -> dict:
    n_ft = 3
    free = shutil.disk_usage(work).free
    disk_cap = min(free - 4 * 2**30, args.max_disk_gb * GB)

    def cost(layers: int) -> tuple[float, int]:
        size = model_bytes({**arch, "layers": layers})
        disk = (n_ft + 2) * size + 2 * 2**30
        seconds = ((n_ft + 1) * size / write_bw + 10  # generate, write, sync
                   + (n_ft + 1) * size / read_bw + size / write_bw + 25)  # one merge from a cold cache
        return seconds, disk

    if args.layers_7b:
        layers = args.layers_7b
    else:
        layers = 0
        for n in range(arch["layers"], 0, -1):
            seconds, disk = cost(n)
            if disk <= disk_cap and seconds <= left() - 15:
                layers = n
                break
        if layers == 0:
            return {"skipped": f"no layer count fits: {left():.0f} s left, {free / GB:.1f} GB free, cap "
                               f"{args.max_disk_gb} GB"}
    shape = {**arch, "layers": layers}
    info = {"shape": f"Llama-2-7B widths, {layers} of 32 decoder layers", **shape,
            "params": sum(_numel(s) for _, s in tensor_shapes(shape)), "finetuned": n_ft, "dtype": "bfloat16",
            "bytes_per_model": model_bytes(shape),
            "why_fewer_layers": "base + 3 fine-tuned full 7B models in bf16 are 54 GB, more than the box's disk "
                                "allows next to the output; layers are cut to fit disk and time. Peak memory is set by "
                                "the largest tensor (embeddings, 32000x4096) and the work-unit size, which the layer "
                                "count does not change; time scales with the bytes read.",
            "budgets": "--memory-budget 16GiB --host-memory-budget 32GiB"}
    log(f"7B-shaped: {layers} layers, {info['params'] / 1e9:.2f} B params, {info['bytes_per_model'] / GB:.1f} GB per model")
    t = time.perf_counter()
    folders = write_models(work / "7b", shape, n_ft, device)
    os.sync()
    info["generate_and_write_s"] = round(time.perf_counter() - t, 1)
    files = files_of(folders)
    base, tasks = folders[0], folders[1:]
    import yaml
    extra = ["--memory-budget", "16GiB", "--host-memory-budget", "32GiB"]
    methods = [("ties", {"merge_method": "ties", "base_model": str(base),
                         "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.2}} for p in tasks],
                         "parameters": {"normalize": True}, "dtype": "bfloat16"}),
               ("neuromerging", {"merge_method": "neuromerging", "base_model": str(base),
                                 "models": [{"model": str(p)} for p in tasks],
                                 "parameters": {"density": 0.1, "trim_scope": "global"}, "dtype": "bfloat16"})]
    one_merge = cost(layers)[0] - (n_ft + 1) * info["bytes_per_model"] / write_bw - 10
    for key, cfg in methods:
        if key != "ties" and left() < 1.5 * one_merge:
            info[f"{key}_s"] = None
            info[f"{key}_skipped"] = f"{left():.0f} s of the time budget left"
            continue
        path = work / f"7b-{key}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        evict(files)
        r = neurokern_merge(path, work / f"7b-out-{key}", env, device.type, extra, timeout=max(60.0, left() + 60))
        info[f"{key}_s"] = r["wall_s"] if r["rc"] == 0 else None
        info[f"{key}_detail"] = r
        if r["rc"] == 0:
            log(f"7B-shaped neurokern {key}: {r['wall_s']:.1f} s (engine {r['engine_s']:.1f} s), peak RSS "
                f"{r['peak_host_rss_GB']:.1f} GB, GPU {r['peak_gpu_GB']:.1f} GB (reserved)")
            info["peak_host_rss_GB"] = max(info.get("peak_host_rss_GB") or 0, r["peak_host_rss_GB"])
            info["peak_gpu_GB"] = max(info.get("peak_gpu_GB") or 0, r["peak_gpu_GB"])
        else:
            log(f"7B-shaped neurokern {key} FAILED: {r.get('error', '')[-500:]}")
        shutil.rmtree(work / f"7b-out-{key}", ignore_errors=True)
    return info


if __name__ == "__main__":
    sys.exit(main())
