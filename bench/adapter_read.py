#!/usr/bin/env python3
"""How fast the engine's readers form adapted weights (base weight + scale·B·A, a piece of rows at
a time) from a LoRA adapter folder, against reading a full fine-tuned model's tensors: the rate
the CPU side gives the merge when its inputs are adapters.

    python3 bench/adapter_read.py                      # bench/results/adapter-read-<machine>.json
    python3 bench/adapter_read.py --small --out DIR    # tiny shapes: checks the script

On disk (a temporary folder; the files are read from the page cache, so the figures are the CPU's,
not the disk's): a Llama-2-7B-wide base of --layers decoder layers (bf16), one fine-tuned model of
the same shapes, and one LoRA adapter of rank 16 (float32 factors, PEFT's default) on q, k, v, o,
gate, up and down. For 1, 2, 4, ... threads up to the machine's cores, every decoder tensor is
read in the engine's pieces (the adapter's own pieces; 16 MiB for the full model) into host
memory, as the engine's reader threads do (each thread's torch ops on that thread): GB/s of tensor
bytes delivered, the best of --repeats timings. The adapter is read three ways: as the engine
reads it (one lora_add_rows call per piece), by the Python path the readers ran before that op (a
dozen torch calls per piece, each streaming the piece's float32 ΔW through memory; kept here only
to compare), and by the op with torch's intra-op threads, as the readers ran before they were made
serial. Before timing, every adapted tensor read both ways is checked to be the same bytes.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

LLAMA2_7B = {"hidden": 4096, "ffn": 11008, "layers": 2}
SMALL = {"hidden": 64, "ffn": 176, "layers": 2}
TARGETS = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
RANK, ALPHA = 16, 32
GB = 1e9


def shapes(arch: dict) -> dict[str, tuple[int, int]]:
    h, f = arch["hidden"], arch["ffn"]
    out = {}
    for i in range(arch["layers"]):
        for part, names in TARGETS.items():
            for name in names:
                rows, cols = {"gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}.get(name, (h, h))
                out[f"model.layers.{i}.{part}.{name}.weight"] = (rows, cols)
    return out


def write_inputs(root: Path, arch: dict) -> tuple[Path, Path, Path]:
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) * 0.02).bfloat16() for k, s in shapes(arch).items()}
    tuned = {k: (v.float() + 0.002 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
    folders = [root / "base", root / "finetuned", root / "adapter"]
    for folder in folders:
        folder.mkdir(parents=True)
    save_file(base, str(folders[0] / "model.safetensors"))
    save_file(tuned, str(folders[1] / "model.safetensors"))
    factors = {}
    for name, (rows, cols) in shapes(arch).items():
        key = "base_model.model." + name[:-len(".weight")]
        factors[key + ".lora_A.weight"] = torch.randn(RANK, cols, generator=g) * 0.01
        factors[key + ".lora_B.weight"] = torch.randn(rows, RANK, generator=g) * 0.01
    save_file(factors, str(folders[2] / "adapter_model.safetensors"))
    (folders[2] / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": sorted(sum(TARGETS.values(), [])),
        "base_model_name_or_path": str(folders[0])}))
    return tuple(folders)


_work = threading.local()


def python_path_read(self, out: torch.Tensor, begin: int, end: int) -> None:
    """LoraDelta.read as the readers formed a piece before lora_add_rows: the piece's product in a
    float32 buffer the thread keeps, then scale, the factors' dtype, the add with the rows and the
    rounding into them, each a torch call over the whole piece. (This bench's adapters replace no
    tensor: the weight's rows are the base's.)"""
    from neurokern.engine.adapters import factors, product_rows, read_rows
    from neurokern.engine.sources import read_into

    assert self.weight.derive is None
    if begin >= end:
        return
    first, last = begin // self.row_bytes, -(-end // self.row_bytes)
    at, dtype = first * self.row_bytes, self.weight.dtype
    in_place = at == begin and last * self.row_bytes == end and (out.data_ptr() + begin) % dtype.itemsize == 0
    if in_place:
        read_into(self.weight, out, begin, end)
        rows = out[begin:end].view(dtype).view(last - first, -1)
    else:
        rows = read_rows(self.weight, first, last)
    m = self.module
    lo, hi = product_rows(first, last, self.rows)
    numel = (hi - lo) * rows.shape[1]
    if getattr(_work, "buf", None) is None or _work.buf.numel() < numel:
        _work.buf = torch.empty(numel, dtype=torch.float32)
    A, B = factors(m) if m.transposed else factors(m, slice(lo, hi))
    if A.dtype != torch.float32:
        A, B = A.float(), B.float()
    left, right = (B, A[:, lo:hi]) if m.transposed else (B, A)
    product = torch.mm(left, right, out=_work.buf[:numel].view(left.shape[0], right.shape[1]))
    delta = (product.T if m.transposed else product).mul_(m.scale).to(m.B.dtype)[first - lo:last - lo]
    if m.embedding:
        rows += delta.to(dtype)
    elif torch.promote_types(dtype, delta.dtype) == delta.dtype:
        rows.copy_(delta.add_(rows))
    else:
        rows += delta
    if not in_place:
        out[begin:end].copy_(rows.view(-1).view(torch.uint8)[begin - at:end - at])


@contextmanager
def python_path():
    """The engine's adapters read by python_path_read instead of lora_add_rows."""
    from neurokern.engine.adapters import LoraDelta

    op_read, LoraDelta.read = LoraDelta.read, python_path_read
    try:
        yield
    finally:
        LoraDelta.read = op_read


def check_paths(model) -> None:
    """Every derived tensor of the model read in its pieces by both paths: the same bytes."""
    from neurokern.engine.executor import read_spans

    for info in model.tensors.values():
        if info.derive is None:
            continue
        got = []
        for path in (python_path, nullcontext):
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
            with path():
                for begin, end in read_spans(info, info.nbytes):
                    model.read_into(info, buf, begin, end)
            got.append(buf)
        if not torch.equal(*got):
            raise SystemExit(f"{info.name}: lora_add_rows and the Python path give different bytes")


def rate(model, threads: int, piece: int, serial: bool = True) -> float:
    """GB/s of tensor bytes read by `threads` threads; each tensor read in the engine's jobs
    (executor.read_spans: the adapter's derived tensors in their own pieces; others in `piece`
    bytes) into one buffer of its size. serial: each thread's torch ops on that thread alone, as
    the engine's readers run them; else spread over torch's intra-op threads."""
    from neurokern.engine.executor import read_spans, serial_torch_thread

    infos = list(model.tensors.values())
    bufs = {info.name: torch.empty(info.nbytes, dtype=torch.uint8) for info in infos}
    jobs = [(info, begin, end) for info in infos for begin, end in read_spans(info, piece)]

    def read(job):
        info, begin, end = job
        model.read_into(info, bufs[info.name], begin, end)
        return end - begin

    with ThreadPoolExecutor(threads, initializer=serial_torch_thread if serial else None) as pool:
        list(pool.map(read, jobs[:threads]))  # thread start-up and first-touch of the buffers' pages, untimed
        for buf in bufs.values():
            buf.fill_(0)
        t = time.perf_counter()
        total = sum(pool.map(read, jobs))
    return total / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes: checks the script")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="times each read is timed, the best kept (default 3)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    from neurokern.engine.adapters import AdapterModel
    from neurokern.engine.settings import EngineSettings
    from neurokern.engine.sources import Model

    arch = dict(SMALL if args.small else LLAMA2_7B)
    if args.layers:
        arch["layers"] = args.layers
    cores = os.cpu_count() or 1
    counts = sorted({1, cores} | {2 ** k for k in range(1, 8) if 2 ** k < cores})
    piece = 16 * 2**20
    rows = []
    with tempfile.TemporaryDirectory(prefix="nk-adapter-read-") as tmp:
        base_dir, tuned_dir, adapter_dir = write_inputs(Path(tmp), arch)
        base = Model(base_dir, "base_model")
        tuned = Model(tuned_dir, "models[0]")
        adapter = AdapterModel(adapter_dir, "models[0]", base)
        for path in (base_dir, tuned_dir, adapter_dir):  # the page cache holds them: CPU-bound figures
            for f in path.iterdir():
                f.read_bytes()
        check_paths(adapter)
        for threads in counts:
            full = derived = python = spread = 0.0
            for _ in range(args.repeats):  # the four reads in turn, the best of each kept
                full = max(full, rate(tuned, threads, piece))
                derived = max(derived, rate(adapter, threads, piece))
                with python_path():
                    python = max(python, rate(adapter, threads, piece))
                spread = max(spread, rate(adapter, threads, piece, serial=False))
            rows.append({"threads": threads, "full_model_GBps": round(full / GB, 3),
                         "adapter_GBps": round(derived / GB, 3), "adapter_python_path_GBps": round(python / GB, 3),
                         "op_vs_python_path": round(derived / python, 3), "adapter_vs_full": round(derived / full, 3),
                         "adapter_intra_op_threads_GBps": round(spread / GB, 3)})
            print(f"{threads:3d} threads: full model {full / GB:6.2f} GB/s, adapter formed by lora_add_rows "
                  f"{derived / GB:6.2f} GB/s, by the Python path {python / GB:6.2f} GB/s "
                  f"({derived / python:.2f}x), the op with torch's intra-op threads {spread / GB:6.2f} GB/s")
    result = {"bench": "adapter_read", "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "cores": cores, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": "bench/adapter_read.py" + (" --small" if args.small else ""), "repeats": args.repeats,
              "model": {"shape": "small" if args.small else "Llama-2-7B widths", **arch, "rank": RANK,
                        "factors": "float32", "weights": "bfloat16",
                        "piece_bytes": EngineSettings.adapter_piece_bytes},
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("adapter-read-" + ("small-" if args.small else "") + f"{platform.machine()}-{cores}cores.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
