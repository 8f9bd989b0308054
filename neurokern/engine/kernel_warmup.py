"""The first Triton launch of a process pays for the Triton runtime: the hash of Triton's own
sources and of libtriton that keys its kernel cache (`triton_key`: 0.4 s of sha256 on the H200
machine), the import of its gluon front end (0.13 s), its driver setup, and each kernel then its
load from the cache. A merge pays that off the critical path:
- `start_runtime`, from the command line before torch is imported (Triton does not import it):
  the hash and the import, on a thread, while torch's import runs (sha256 drops the GIL);
- `start`, from the moment the device is known (while the plan is made and the first inputs are
  read): the finite check (the first kernel of every pass) on tiny tensors of the dtypes the
  engine merges, on a thread.
This module imports torch only in its functions (`start`, and those of `neurokern warmup`, which
compiles every kernel of a config, or of every method, into Triton's cache ahead of a first merge).
"""
import importlib.util
import os
import threading

from neurokern.errors import NeurokernError


def start_runtime(device) -> None:
    """Warm the Triton runtime's torch-free part, unless the merge runs on the CPU (device "cpu",
    or None on a machine without the NVIDIA driver) or Triton is not installed."""
    if device == "cpu" or (device is None and not os.path.exists("/dev/nvidiactl")):
        return
    if importlib.util.find_spec("triton") is None:
        return

    def warm() -> None:
        try:
            from triton.runtime.cache import triton_key
            triton_key()  # functools.lru_cache: the launches later find it computed
            import triton.experimental.gluon  # noqa: F401 (the first launch's specialization imports it)
        except Exception:  # noqa: BLE001 (another Triton version: the first launch pays instead)
            pass

    threading.Thread(target=warm, name="neurokern-triton-warmup", daemon=True).start()


def start(device) -> None:
    import torch

    from neurokern.ops import STORAGE_DTYPES
    from neurokern.ops import triton as triton_kernels

    if device.type != "cuda" or not triton_kernels.AVAILABLE:
        return

    def warm() -> None:
        try:
            with torch.cuda.device(device):
                torch.ops.neurokern.nonfinite_flags([torch.zeros(16, dtype=d, device=device) for d in STORAGE_DTYPES])
        except Exception:  # noqa: BLE001 (the merge launches the kernel itself and reports what fails)
            pass

    threading.Thread(target=warm, name="neurokern-kernel-warmup", daemon=True).start()


# ---- `neurokern warmup`: every kernel of a config (or of every method), compiled ahead -------------
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# Without a config: tensors whose shapes give the kernels' launch choices of large models (rows and
# columns past every block size, divisible by 16 and not) and of vectors.
GENERIC_SHAPES = [("matrix", (1024, 512)), ("odd_matrix", (1001, 1000)), ("vector", (512,)), ("odd_vector", (1000,))]


def cache_dir() -> str:
    """Where Triton keeps compiled kernels (TRITON_CACHE_DIR, else Triton's default)."""
    import triton

    if os.environ.get("TRITON_CACHE_DIR"):
        return os.environ["TRITON_CACHE_DIR"]
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and getattr(knobs.cache, "dir", None):
        return knobs.cache.dir
    from triton.runtime.cache import default_cache_dir

    return default_cache_dir()


def cached_kernels(folder: str) -> dict[str, str]:
    """Cache entry -> kernel name, of the kernels compiled into Triton's cache folder."""
    found = {}
    if os.path.isdir(folder):
        for entry in os.scandir(folder):
            if entry.is_dir():
                names = [f[:-len(ext)] for f in os.listdir(entry.path) for ext in (".cubin", ".hsaco") if f.endswith(ext)]
                if names:
                    found[entry.name] = names[0]
    return found


def _config_name(method: str) -> str:
    """The merge_method a config gives for a neurokern method (mergekit's name where it has one)."""
    from neurokern.config import MERGEKIT_METHODS

    return next((k for k, (v, _) in MERGEKIT_METHODS.items() if v == method), method)


def _task_counts(spec, tasks) -> tuple[list[int], dict[int, str]]:
    """The task counts of `tasks` (default 1 to 8) that the method takes with its warm-up
    parameters (Method.warm_config), and why it refuses the others; a method that takes none of
    them but takes 0 copies one model: [0]."""
    given = {k: v for k, v in spec.warm_config.items() if k in spec.defaults}
    taken, refused = [], {}
    for T in tasks or range(1, 9):
        try:
            spec.params(dict(given), T)
            taken.append(T)
        except NeurokernError as exc:
            refused[T] = str(exc)
    if not taken:
        try:
            spec.params(dict(given), 0)
            return [0], {}
        except NeurokernError:
            pass
    return taken, refused


def skipped(config=None, methods=None, tasks=None) -> list[str]:
    """One line per method (or task counts of a method) the warm-up without a config leaves out, and
    why."""
    from neurokern.methods import METHODS

    if config is not None:
        return []
    lines = []
    for method in methods or list(METHODS):
        spec = METHODS.get(method)
        if spec is None:
            continue
        if not spec.kernels:
            lines.append(f"{method}: skipped, plain PyTorch: no Triton kernel to compile")
            continue
        _, refused = _task_counts(spec, tasks)
        if refused:
            counts = ",".join(str(T) for T in refused)
            lines.append(f"{method}: task count(s) {counts} skipped ({next(iter(refused.values()))})")
    return lines


def warmup_cases(config=None, methods=None, dtypes=None, tasks=None) -> list[dict]:
    """What `neurokern warmup` runs: one case per (method, dtype, task count), each with the tensors
    (name, shape, stored dtype) to merge and the config of its engine run. With a config: its
    method, parameters, task count and dtype, on one tensor of each distinct shape and dtype of its
    base model (read from the headers only; a config's slices: a copy of its first model, scaled
    where the config scales, as stacking launches no kernel). Without: every method with kernels
    (Method.kernels; with the default density a config would give it and Method.warm_config),
    dtypes float32, bfloat16, float16 and 1 to 8 fine-tuned models where the method takes that
    many (a method of none: the one model it copies), on GENERIC_SHAPES; `skipped` says what is
    left out."""
    import torch

    from neurokern.config import load_config
    from neurokern.engine.sources import Model
    from neurokern.methods import METHODS

    if config is not None:
        cfg = load_config(config)
        base = Model(cfg.base_model, "base_model")
        distinct = {}
        for info in base.tensors.values():
            distinct.setdefault((info.shape, info.dtype), info.name)
        shapes = [(name, shape, dtype) for (shape, dtype), name in distinct.items()]
        case = {"method": cfg.method, "dtype": cfg.dtype or "as stored", "tasks": len(cfg.models), "shapes": shapes,
                "config": cfg.raw if isinstance(config, dict) else config, "paths": [cfg.base_model, *cfg.models],
                "out_dtype": cfg.dtype, "params": cfg.params}
        if cfg.stack:  # the stack's layers need models to take them from; its kernels are a copy's
            spec = METHODS[cfg.method]
            scaled = {k: v for k, v in spec.warm_config.items() if k in cfg.params}
            raw = {"merge_method": cfg.raw["merge_method"], "models": [str(cfg.base_model)]}
            raw.update({"parameters": scaled} if scaled else {})
            raw.update({"dtype": cfg.dtype} if cfg.dtype else {})
            case.update(config=raw, params=scaled)
        return [case]
    cases = []
    for method in methods or list(METHODS):
        if method not in METHODS:
            raise NeurokernError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        spec = METHODS[method]
        if not spec.kernels:
            continue
        taken, _ = _task_counts(spec, tasks)
        for dtype in dtypes or list(DTYPE_NAMES):
            stored = getattr(torch, dtype)
            for T in taken:
                shapes = [(name, shape, stored) for name, shape in GENERIC_SHAPES]
                root = f"/neurokern-warmup/{method}-{dtype}-{T}"
                paths = [f"{root}/base"] + [f"{root}/task_{t}" for t in range(1, T + 1)]
                raw = ({"merge_method": _config_name(method), "models": paths} if T == 0  # the one model copied
                       else {"merge_method": _config_name(method), "base_model": paths[0], "models": paths[1:]})
                params = dict(spec.warm_config)
                if "density" in spec.defaults:
                    params["density"] = spec.defaults["density"]
                if params:
                    raw["parameters"] = params
                cases.append({"method": method, "dtype": dtype, "tasks": T, "shapes": shapes, "config": raw,
                              "paths": paths, "out_dtype": None,
                              "params": {k: v for k, v in spec.warm_config.items() if k in spec.defaults}})
    return cases


def compile_kernels(cases: list[dict], device, report=print) -> dict:
    """Runs every case twice on `device` (a copy of one model, passthrough: the first way only), as the command line merges (neurokern.engine.merge_models
    on generated inputs of the case's shapes, output hashed and dropped) and as nk.merge does (the
    method on in-memory tensors, one tensor at a time): every Triton kernel either launches is
    compiled into Triton's cache, or loaded from it. Returns what was compiled and where."""
    import tempfile
    import time
    from collections import Counter
    from pathlib import Path

    import torch

    from neurokern.engine.run import DTYPES, merge_models
    from neurokern.engine.synthetic import synthetic_models
    from neurokern.methods import METHODS
    from neurokern.merging import run_checked
    from neurokern.models import load_models

    device = torch.device(device)
    folder = cache_dir() if device.type == "cuda" else ""
    before = cached_kernels(folder) if folder else {}
    start = time.perf_counter()
    done = []
    with tempfile.TemporaryDirectory(prefix="neurokern-warmup-") as scratch:
        for i, case in enumerate(cases):
            t = time.perf_counter()
            # generated inputs at the config's paths: no file is opened
            models = synthetic_models(case["shapes"], case["tasks"], pool_bytes=2**21, paths=case["paths"])
            merge_models(case["config"], Path(scratch) / f"case-{i}", device=str(device), sources=models,
                         discard_output=True, progress=False)
            spec = METHODS[case["method"]]
            params = spec.params(dict(case["params"]), case["tasks"])
            convert = DTYPES.get(case["out_dtype"])
            # nk.merge's path; a copy of one model (passthrough) is the engine's alone: nk.merge needs a fine-tuned model
            for name, shape, dtype in case["shapes"] if case["tasks"] else []:
                if not dtype.is_floating_point:
                    continue
                state = []
                for model in models:
                    info = model.tensors[name]
                    host = torch.empty(info.nbytes, dtype=torch.uint8)
                    model.read_into(info, host)
                    state.append({name: host.view(dtype).view(shape).to(device=device, dtype=convert or dtype)})
                run_checked(spec, load_models(state[0], state[1:], device), params)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            new = len(set(cached_kernels(folder)) - set(before)) - sum(c["new"] for c in done) if folder else 0
            done.append({"method": case["method"], "dtype": case["dtype"], "tasks": case["tasks"], "new": new,
                         "seconds": round(time.perf_counter() - t, 2)})
            report(f"{case['method']:>15} {case['dtype']:>9} T={case['tasks']}: {new} kernels compiled "
                   f"({time.perf_counter() - t:.1f} s)")
    after = cached_kernels(folder) if folder else {}
    compiled = Counter(after[k] for k in set(after) - set(before))
    return {"cache_dir": folder, "compiled": sum(compiled.values()), "kernels": dict(sorted(compiled.items())),
            "cached_before": len(before), "cases": done, "seconds": round(time.perf_counter() - start, 2)}
