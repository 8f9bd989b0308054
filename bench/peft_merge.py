#!/usr/bin/env python3
"""Merging LoRA adapters into one: neurokern.integrations.peft.add_weighted_adapter against PEFT's
LoraModel.add_weighted_adapter, wall time and peak memory.

    python3 bench/peft_merge.py --device cuda                 # 7B-shaped, writes bench/results/peft-merge-<gpu>.json
    python3 bench/peft_merge.py --small --device cpu --out D  # tiny shapes: checks the script itself

The model is Llama-2-7B-shaped (hidden 4096, FFN 11008, 32 layers, vocab 32000; bf16, built in
place with random weights, no download) with 4 LoRA adapters of rank 16 on every linear layer of
the decoder (q, k, v, o, gate, up, down: 224 modules), their factors random (float32, PEFT's
default), saved with save_pretrained. For each combination type (--combinations):

- PEFT: the 4 adapters loaded in one PeftModel on --device; add_weighted_adapter timed (a device
  sync at the end), peak memory above what was allocated before the call;
- neurokern: add_weighted_adapter on the 4 adapter folders (read from the page cache: the folders
  were just written; the read is in the time, while PEFT's adapters are already in memory) on
  --device, timed the same way after a first call that compiles its Triton kernels (that call's
  time is first_call_seconds);
- max_rel_diff: the largest relative difference of B·A between the two, over the first 8 modules
  (PEFT writes "cat" into a new adapter of the model's dtype, bf16 here, so it differs by bf16's
  rounding; DARE's masks are different draws, flagged random_masks_differ).

Peak memory: torch.cuda.max_memory_allocated on a GPU; on a CPU the process's resident set,
sampled every millisecond (psutil). --layers cuts the number of decoder layers (the SVD types take
about a second a module on an H100; recorded in the JSON).
"""
import argparse
import copy
import json
import platform
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

# bench/ holds a kernels.py, which would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.machine import device_tag  # noqa: E402

LLAMA2_7B = {"vocab": 32000, "hidden": 4096, "ffn": 11008, "layers": 32, "heads": 32, "kv_heads": 32}
SMALL = {"vocab": 128, "hidden": 64, "ffn": 176, "layers": 2, "heads": 4, "kv_heads": 2}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS, RANK = 4, 16
WEIGHTS = [0.4, 0.3, -0.2, 0.5]


class Peak:
    """Peak memory of a block above its start: the CUDA allocator's, or the sampled host RSS."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil
        process = psutil.Process()
        self.start = self.top = process.memory_info().rss
        self.stop = threading.Event()

        def sample():
            while not self.stop.is_set():
                self.top = max(self.top, process.memory_info().rss)
                time.sleep(0.001)
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.stop.set()
            self.thread.join()
            self.bytes = self.top - self.start


def build(shape: dict, device: torch.device, work: Path):
    """The base model on the device, 4 adapters saved under work/, and PEFT's model holding them."""
    import transformers
    from peft import LoraConfig, get_peft_model
    config = transformers.LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                                      intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
                                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"])
    dtype = torch.bfloat16
    with torch.device(device):
        base = transformers.LlamaForCausalLM._from_config(config, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(0)
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS)
    model = get_peft_model(base, lora, adapter_name="a0")
    for i in range(1, ADAPTERS):
        model.add_adapter(f"a{i}", copy.deepcopy(lora))
    paths = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=p.dtype) / p.shape[-1] ** 0.5)
    for i in range(ADAPTERS):  # an adapter not named "default" is saved into a folder of its name
        model.save_pretrained(work, selected_adapters=[f"a{i}"])
        paths.append(work / f"a{i}")
    return model, paths


def products(merged: dict, count: int = 8) -> dict:
    out = {}
    for key in sorted(merged):
        if ".lora_A." in key and len(out) < count:
            b = merged[key.replace(".lora_A.", ".lora_B.")]
            out[key] = b.float() @ merged[key].float()
    return out


def run_one(model, paths, combination: str, device: torch.device, svd_rank: int) -> dict:
    """combination: a PEFT combination type; "svd:factored" is PEFT's "svd" against neurokern's
    svd="factored" (the truncated SVD from the factors)."""
    from peft.utils import get_peft_model_state_dict
    from neurokern.integrations import peft as nkp
    label = combination
    combination, _, svd = combination.partition(":")
    kw = {"density": 0.2} if combination not in ("cat", "linear", "svd") else {}
    if combination.endswith("svd"):
        kw["svd_rank"] = svd_rank
    nk_kw = {**kw, "svd": svd} if svd else kw
    name = f"merged-{combination}"
    with Peak(device) as peft_peak:
        start = time.perf_counter()
        model.add_weighted_adapter([f"a{i}" for i in range(ADAPTERS)], WEIGHTS, name, combination_type=combination, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        peft_seconds = time.perf_counter() - start
    state = get_peft_model_state_dict(model, adapter_name=name)
    peft_dtype = str(next(iter(state.values())).dtype).replace("torch.", "")
    reference = products(state)
    del state
    model.delete_adapter(name)
    # neurokern's first call compiles the Triton kernels it uses (once per machine: Triton's cache);
    # timed apart, then the call again with its kernels compiled, as PEFT's eager ops are.
    start = time.perf_counter()
    first = nkp.add_weighted_adapter(paths, WEIGHTS, combination, device=device, **nk_kw)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    nk_first_seconds = time.perf_counter() - start
    del first
    with Peak(device) as nk_peak:
        start = time.perf_counter()
        merged = nkp.add_weighted_adapter(paths, WEIGHTS, combination, device=device, **nk_kw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        nk_seconds = time.perf_counter() - start
    ours = products(merged)
    nk_dtype = str(next(iter(merged.values())).dtype).replace("torch.", "")
    del merged
    diff = max(float((ours[k] - reference[k]).abs().max() / reference[k].abs().max().clamp_min(1e-30))
               for k in reference)
    row = {"combination": label, "parameters": nk_kw,
           "peft": {"seconds": round(peft_seconds, 4), "peak_bytes": int(peft_peak.bytes)},
           "neurokern": {"seconds": round(nk_seconds, 4), "peak_bytes": int(nk_peak.bytes),
                         "first_call_seconds": round(nk_first_seconds, 4)},
           "max_rel_diff": diff, "dtypes": {"peft": peft_dtype, "neurokern": nk_dtype},
           # DARE draws its masks from torch's generator in PEFT, from neurokern's own here: the two
           # results are different draws (tests/integrations/test_peft.py compares them with equal masks)
           "random_masks_differ": combination.startswith("dare")}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (any machine): checks the script")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--combinations", default="cat,linear,ties,dare_ties,svd,svd:factored,ties_svd,dare_ties_svd",
                    help="comma-separated combination types (svd:factored: neurokern's svd='factored' against "
                         "PEFT's svd)")
    ap.add_argument("--time-budget", type=float, default=420.0,
                    help="seconds after which the remaining combinations are skipped (recorded)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--work", type=Path, default=None, help="folder for the adapter files (default: a temporary one)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    shape = dict(SMALL if args.small else LLAMA2_7B)
    if args.layers:
        shape["layers"] = args.layers
    work = Path(tempfile.mkdtemp(prefix="nk-peft-bench-", dir=args.work))
    try:
        start = time.perf_counter()
        model, paths = build(shape, device, work)
        print(f"built the model and {ADAPTERS} adapters in {time.perf_counter() - start:.1f} s", flush=True)
        runs, skipped = [], []
        for combination in args.combinations.split(","):
            if time.perf_counter() - start > args.time_budget:
                skipped.append(combination)
                continue
            runs.append(run_one(model, paths, combination, device, RANK))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name = device_tag(device)
    import peft
    result = {"shape": "small" if args.small else "llama2-7b", "dims": shape, "adapters": ADAPTERS, "rank": RANK,
              "targets": TARGETS, "modules": len(TARGETS) * shape["layers"], "weights": WEIGHTS,
              "device": name, "torch": torch.__version__, "peft": peft.__version__,
              "host": platform.node(), "date": time.strftime("%Y-%m-%d"), "runs": runs,
              "skipped_for_time": skipped}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"peft-merge-{'small-' if args.small else ''}{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
