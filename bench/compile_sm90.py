#!/usr/bin/env python3
"""Compile, with the real Triton compiler and no GPU, every Triton kernel specialization that a set
of tests launches, for an H100 (sm_90): a check that runs where CI runs, and compile times.

    python bench/compile_sm90.py tests/ops/triton -k weighted_sum      # the pytest arguments
    python bench/compile_sm90.py --out DIR tests/ops/triton             # DIR/compile-sm90.json

Step 1 runs the tests under the Triton interpreter (TRITON_INTERPRET=1, in a subprocess) and records
each launch: the kernel, the type of every argument (tensor dtypes, integer widths), the constexpr
values and the launch options (num_warps, num_stages, enable_fp_fusion). Step 2 imports the same
kernels as compiled Triton functions and compiles every distinct specialization to PTX and a cubin
for GPUTarget("cuda", 90, 32) with the ptxas that ships with Triton. The interpreter accepts code
that the compiler refuses (a global read inside a kernel, a Python value where a constexpr is
needed): those fail here.

Not modelled: Triton's value specializations (integers divisible by 16 or equal to 1), which change
the code generated, not whether it compiles. Compile times are this machine's CPU, one kernel at a
time; they rank kernels, they are not a GPU machine's first-run time.
"""
import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))  # this tree's neurokern, whatever is installed

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
           "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _record_plugin(path: str):
    """A pytest plugin that records every interpreted kernel launch into `path` (JSON lines)."""
    import inspect

    import torch
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    seen: set = set()
    out = open(path, "a")
    run = InterpretedFunction.run

    def describe(fn, args, kwargs) -> dict:
        params = list(inspect.signature(fn).parameters.values())
        values = dict(zip([p.name for p in params], args))
        options = {}
        for key, value in kwargs.items():
            if key in {p.name for p in params}:
                values[key] = value
            else:
                options[key] = value
        signature, constexprs = {}, {}
        for p in params:
            if p.name not in values:
                if p.default is inspect.Parameter.empty:
                    raise ValueError(f"{fn.__name__}: no value for {p.name}")
                values[p.name] = p.default
            v = values[p.name]
            if p.annotation is tl.constexpr or p.annotation == "tl.constexpr" or v is None:
                signature[p.name] = "constexpr"
                constexprs[p.name] = v.value if isinstance(v, tl.constexpr) else v
            elif isinstance(v, torch.Tensor):
                signature[p.name] = "*" + _DTYPES[str(v.dtype).replace("torch.", "")]
            elif isinstance(v, bool):
                signature[p.name] = "i1"
            elif isinstance(v, int):
                signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            elif isinstance(v, float):
                signature[p.name] = "fp32"
            else:
                raise ValueError(f"{fn.__name__}: argument {p.name} of type {type(v).__name__}")
        return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
                "constexprs": constexprs, "options": options}

    def recording_run(self, *args, grid, warmup, **kwargs):
        try:
            record = describe(self.fn, args, kwargs)
            key = json.dumps(record, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                out.write(key + "\n")
                out.flush()
        except Exception as exc:  # noqa: BLE001 (recorded, not fatal: the test still runs)
            out.write(json.dumps({"kernel": getattr(self.fn, "__name__", "?"), "unrecorded": repr(exc)}) + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


def record(pytest_args: list[str], path: Path) -> int:
    path.unlink(missing_ok=True)
    code = ("import sys, pytest; sys.path.insert(0, %r); import bench.compile_sm90 as c; "
            "c._record_plugin(%r); sys.exit(pytest.main(%r))" % (str(ROOT), str(path), pytest_args + ["-q", "-p", "no:cacheprovider"]))
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-c", code], cwd=ROOT, env=env)


def compile_all(path: Path) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    rows, failures, unrecorded = [], [], []
    for line in path.read_text().splitlines():
        spec = json.loads(line)
        if "unrecorded" in spec:
            unrecorded.append(spec)
            continue
        try:
            fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        except ImportError as exc:  # a kernel defined in a test module
            unrecorded.append({"kernel": f"{spec['module']}.{spec['kernel']}", "unrecorded": repr(exc)})
            continue
        names = fn.arg_names
        constexprs = {(names.index(k),): v for k, v in spec["constexprs"].items()}
        options = {k: v for k, v in spec["options"].items() if k in ("num_warps", "num_stages", "enable_fp_fusion")}
        start = time.perf_counter()
        try:
            triton.compile(ASTSource(fn=fn, signature=spec["signature"], constexprs=constexprs), target=target,
                           options=options)
            error = None
        except Exception as exc:  # noqa: BLE001 (every failure is reported)
            error = f"{type(exc).__name__}: {str(exc)[:400]}"
        seconds = time.perf_counter() - start
        row = {"kernel": f"{spec['module']}.{spec['kernel']}", "constexprs": spec["constexprs"],
               "seconds": round(seconds, 3)}
        rows.append(row)
        if error:
            failures.append({**row, "error": error})
            print(f"FAILED {row['kernel']} {spec['constexprs']}: {error}", flush=True)
    by_kernel: dict = {}
    for r in rows:
        k = by_kernel.setdefault(r["kernel"], {"variants": 0, "seconds": 0.0, "max_seconds": 0.0})
        k["variants"] += 1
        k["seconds"] = round(k["seconds"] + r["seconds"], 3)
        k["max_seconds"] = max(k["max_seconds"], r["seconds"])
    return {"target": "cuda sm_90", "triton": triton.__version__, "variants": len(rows),
            "failed": len(failures), "unrecorded": unrecorded, "failures": failures,
            "seconds": round(sum(r["seconds"] for r in rows), 2),
            "by_kernel": dict(sorted(by_kernel.items(), key=lambda kv: -kv[1]["seconds"]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="folder for compile-sm90.json (default: print only)")
    ap.add_argument("--launches", type=Path, default=None, help="compile the launches an earlier run recorded (JSON lines)")
    args, pytest_args = ap.parse_known_args()
    os.environ.pop("TRITON_INTERPRET", None)
    # a fresh kernel cache: every specialization is compiled, none read back from an earlier run
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="nk-compile-sm90-cache-")
    if args.launches:  # launches recorded by an earlier run: compile only
        launches, rc = args.launches, 0
    else:
        launches = Path(os.environ.get("TMPDIR", "/tmp")) / f"nk-compile-sm90-{os.getpid()}.jsonl"
        rc = record(pytest_args, launches)
    print(f"tests rc {rc}; {sum(1 for _ in launches.open())} distinct launches recorded", flush=True)
    report = compile_all(launches)
    report["tests"] = pytest_args
    for name, k in list(report["by_kernel"].items())[:15]:
        print(f"{k['seconds']:8.1f} s {k['variants']:4d} variants (max {k['max_seconds']:.1f} s)  {name}")
    print(f"{report['variants']} variants compiled for sm_90 in {report['seconds']} s, {report['failed']} failed, "
          f"{len(report['unrecorded'])} launches not recorded")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compile-sm90.json").write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["failed"] or report["unrecorded"] or rc not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
