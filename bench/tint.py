"""Benchmark of neurokern.tint: test-time steps and tinted (task-routed) inference, 8 tasks.

    python bench/tint.py                      # GPU: BERT-base and ViT-B/32 sizes, ~1-2 min on an H100
    python bench/tint.py --smoke              # tiny sizes, any device (a CPU check of the script)
    python bench/tint.py --models bert-base --out DIR

Writes DIR/tint-<gpu>.json (DIR defaults to bench/results; "tint-cpu.json" on a CPU, with
"-smoke" added for --smoke) holding the device name, torch / triton versions and per model:

 step (one test-time step for one task, batch --batch):
   tinted_ms     TintedModel: theta(lambda) by weighted_sum (layer-wise lambda, one call per shape
                 group), forward with the task's tint, cross-entropy, backward to lambda and the
                 tints (no optimizer step);
   plain_ms      forward + cross-entropy + backward of the same model with fixed weights (every
                 parameter requires grad, as in fine-tuning): the target is tinted <= 1.2x plain;
                 the two are measured in 5 alternating rounds (`rounds`); each is the median of
                 its rounds, ratio_tinted_vs_plain the median of the rounds' ratios;
   reference_ms  the step merged the way the reference code does: theta0 + sum_t lambda_t tau_t as
                 eager PyTorch over every tensor, every step (task vectors precomputed on the device);
   merge_forward_ms / merge_backward_ms  the weighted_sum merge alone and its backward alone;
   fit_step_ms   one optimizer step of nk.tint.fit(loss="pseudo_conf") as the user runs it (teacher
                 forward, Adam on lambda and the tints included), wall clock over a few epochs.
 inference (no grad, merged weights built once; a batch of --infer-batch inputs, 8 tasks mixed):
   mixed_ms      model(x, task_ids): shared layers once, the tint layer through tinted_linear;
   dense_ms      one dense model on the same batch: the target is dense_ms / mixed_ms >= 0.9;
   loop_ms       one forward per task on its rows (what serving without routing does).

The models are built in plain torch (no transformers, no download): BERT-base (post-LN encoder,
vocabulary 30522, 512 positions, 12 x (768, 12 heads, MLP 3072), pooler, classifier; 110 M
parameters; inputs [B, 128] token ids) and CLIP ViT-B/32's image tower (32x32 patches of 224x224
images, 12 x (768, 12 heads, MLP 3072), projection to 512, classifier; 88 M parameters). The
8 "fine-tuned" models are the random pre-trained weights plus small noise (timing does not depend
on the values). GPU times: triton.testing.do_bench medians (CUDA events); CPU: wall-clock medians.
"""
import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

# bench/ holds a kernels.py, which would shadow the `kernels` package that transformers imports: the
# repository root goes on the path instead of this folder, and the other scripts are `bench.*`
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
from bench.machine import device_tag  # noqa: E402
from neurokern.tint import TintedModel, fit  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- models

class Block(nn.Module):
    """A transformer block: self-attention (q, k, v, o projections; SDPA) and an MLP (fc1, fc2)."""

    def __init__(self, d: int, ff: int, heads: int, pre_ln: bool):
        super().__init__()
        self.heads, self.pre_ln = heads, pre_ln
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)

    def attention(self, h):
        B, S, d = h.shape

        def split(t):
            return t.view(B, S, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        return self.o(a.transpose(1, 2).reshape(B, S, d))

    def forward(self, x):
        if self.pre_ln:  # CLIP ViT
            x = x + self.attention(self.ln1(x))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        x = self.ln1(x + self.attention(x))  # BERT
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class Bert(nn.Module):
    """BERT-base-shaped classifier: inputs [B, S] token ids."""

    def __init__(self, vocab=30522, d=768, ff=3072, layers=12, heads=12, positions=512, classes=10):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(positions, d)
        self.typ = nn.Embedding(2, d)
        self.ln = nn.LayerNorm(d)
        self.layers = nn.ModuleList(Block(d, ff, heads, pre_ln=False) for _ in range(layers))
        self.pooler = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        x = self.tok(ids) + self.pos.weight[: ids.shape[1]] + self.typ.weight[0]
        x = self.ln(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(torch.tanh(self.pooler(x[:, 0])))


class ViT(nn.Module):
    """CLIP ViT-B/32-shaped image classifier: inputs [B, 3, H, W]."""

    def __init__(self, image=224, patch=32, d=768, ff=3072, layers=12, heads=12, embed=512, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch, bias=False)
        self.cls = nn.Parameter(0.02 * torch.randn(d))
        self.pos = nn.Parameter(0.02 * torch.randn((image // patch) ** 2 + 1, d))
        self.ln_pre = nn.LayerNorm(d)
        self.layers = nn.ModuleList(Block(d, ff, heads, pre_ln=True) for _ in range(layers))
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, embed, bias=False)
        self.head = nn.Linear(embed, classes)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], 1) + self.pos
        x = self.ln_pre(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.proj(self.ln_post(x[:, 0])))


MODELS = {
    # name: (class, full-size kwargs, --smoke kwargs, input maker(batch, generator, kwargs))
    "bert-base": (Bert, {}, dict(vocab=1000, d=64, ff=256, layers=2, heads=4, positions=64),
                  lambda B, g, kw, seq: torch.randint(0, kw.get("vocab", 30522), (B, seq), generator=g)),
    "vit-b32": (ViT, {}, dict(image=64, d=64, ff=256, layers=2, heads=4, embed=32),
                lambda B, g, kw, seq: torch.randn(B, 3, kw.get("image", 224), kw.get("image", 224), generator=g)),
}


# ------------------------------------------------------------------------------------- timing

ROUNDS = 5  # alternating measurements of the tinted and the plain step


def timer(device: torch.device, reps: int):
    if device.type == "cuda":
        import triton.testing

        def cuda_time(fn):
            return float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))

        return cuda_time

    def cpu_time(fn):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_time


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------- one model

def bench_model(name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    cls, full, small, make_input = MODELS[name]
    kw = small if args.smoke else full
    T = args.tasks
    batch, infer_batch = args.batch, args.infer_batch
    seq = args.seq if name == "bert-base" else None
    measure = timer(device, args.reps)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)

    log(f"{name}: building the model and {T} fine-tuned copies ({dtype})")
    dense = cls(**kw).to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in dense.parameters())
    layers = len(dense.layers)
    tint = args.tint or f"layers.{layers // 2}.fc1"
    finetuned = []
    with torch.no_grad():
        for _ in range(T):
            finetuned.append({n: p + 0.01 * torch.randn_like(p) for n, p in dense.named_parameters()})
    sync(device)
    t_build = time.perf_counter()
    # tint_init="finetuned": task t's tint starts at its fine-tuned layer, which step (c) uses too.
    model = TintedModel(dense, None, finetuned, tint_layers=[tint], coefficients="layer", prior=0.3,
                        tint_init="finetuned")
    sync(device)
    build_s = time.perf_counter() - t_build
    names = model.merged_names
    base = {n: p.detach() for n, p in dense.named_parameters()}
    taus = [[finetuned[t][n] - base[n] for n in names] for t in range(T)]  # the reference's task vectors
    ft_tint = [{n[len(tint) + 1:]: f[n] for n in f if n.startswith(tint + ".")} for f in finetuned]
    del finetuned
    task = 3 % T
    tint_params = {n: nn.Parameter(v.clone()) for n, v in ft_tint[task].items()}
    with torch.no_grad():  # the public API of any version of nk.tint: shape groups = weighted_sum calls
        shape_groups = len({(tuple(v.shape), v.dtype) for v in model.shared_parameters().values()})
    log(f"{name}: {n_params / 1e6:.1f} M parameters, {len(names)} merged tensors in {shape_groups} "
        f"shape groups, tint {tint!r} ({sum(v.numel() for v in ft_tint[0].values()) / 1e6:.2f} M per task); "
        f"TintedModel built in {build_s:.2f} s")

    x = make_input(batch, g, kw, seq).to(device=device, dtype=dtype if name == "vit-b32" else torch.long)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)

    # (a) the TintedModel step.
    trainable = model.trainable_parameters()

    def tinted_step():
        for q in trainable:
            q.grad = None
        loss = F.cross_entropy(model(x, task=task).float(), y)
        loss.backward()
        return loss

    # (b) plain forward + backward with fixed weights.
    plain_params = list(dense.parameters())

    def plain_step():
        for q in plain_params:
            q.grad = None
        loss = F.cross_entropy(dense(x).float(), y)
        loss.backward()
        return loss

    # (c) the reference's merge: a Python sum over tasks for every tensor, every step.
    lam = torch.full((len(names), T), 0.3, device=device, requires_grad=True)

    def reference_step():
        lam.grad = None
        for q in tint_params.values():
            q.grad = None
        lc = lam.clamp(0, 1)
        params = {n: base[n] + sum(lc[i, t] * taus[t][i] for t in range(T)) for i, n in enumerate(names)}
        params.update({f"{tint}.{k}": v for k, v in tint_params.items()})
        loss = F.cross_entropy(functional_call(dense, params, (x,)).float(), y)
        loss.backward()
        return loss

    def merge_forward():
        model.clear_cache()
        with torch.no_grad():
            return model.shared_parameters()

    merged = None
    merged_grads = None

    def merge_backward():
        torch.autograd.backward(list(merged.values()), merged_grads, inputs=[model.lambdas], retain_graph=True)

    # The same merged model in (a) and (c): equal losses and lambda gradients up to rounding.
    log(f"{name}: first steps (Triton compiles its kernels on first use)")
    check = {"loss_tinted": float(tinted_step().detach()), "loss_reference": float(reference_step().detach())}
    check["lambda_grad_rel_diff"] = float((model.lambdas.grad.float() - lam.grad).norm()
                                          / lam.grad.norm().clamp_min(1e-30))

    step = {"batch": batch, "seq": seq}
    # The tinted and the plain step alternate, ROUNDS measurements each, and the ratio is the median
    # of the rounds' ratios: the machine's drift over the run (clocks, other work on the host) then
    # moves both sides of each ratio alike.
    rounds = {"tinted_ms": [], "plain_ms": []}
    for _ in range(ROUNDS):
        for key, fn in (("tinted_ms", tinted_step), ("plain_ms", plain_step)):
            rounds[key].append(measure(fn))
    for key, times in rounds.items():
        step[key] = statistics.median(times)
        log(f"{name}: step {key} = {step[key]:.3f} ms (rounds: {', '.join(f'{t:.2f}' for t in times)})")
    step["rounds"] = rounds
    step["ratio_rounds"] = [a / b for a, b in zip(rounds["tinted_ms"], rounds["plain_ms"])]
    if args.trace:
        step["trace"] = {key: trace(fn, os.path.join(args.trace, f"tint-{name}-{key}.json.gz"), device)
                         for key, fn in (("tinted", tinted_step), ("plain", plain_step))}
    for key, fn in (("reference_ms", reference_step), ("merge_forward_ms", merge_forward)):
        step[key] = measure(fn)
        log(f"{name}: step {key} = {step[key]:.3f} ms")
    taus.clear()
    merged = model.shared_parameters()  # with grad: the graph the backward timing reruns
    merged_grads = [torch.randn_like(v) for v in merged.values()]
    model.lambdas.grad = None
    step["merge_backward_ms"] = measure(lambda: (merge_backward(), setattr(model.lambdas, "grad", None)))
    log(f"{name}: step merge_backward_ms = {step['merge_backward_ms']:.3f} ms")
    merged = merged_grads = None  # free the graph

    # fit() as the user runs it: teacher forward, pseudo_conf loss, Adam; wall clock per optimizer step.
    n_fit = max(batch, 2 * batch)
    inputs = [make_input(n_fit, g, kw, seq).to(device=device, dtype=x.dtype) for _ in range(T)]
    fit(model, inputs, loss="pseudo_conf", steps=1, batch_size=batch, progress=False)  # warm-up
    sync(device)
    epochs = 2 if args.smoke else 3
    t_fit = time.perf_counter()
    fit(model, inputs, loss="pseudo_conf", steps=epochs, batch_size=batch, progress=False)
    sync(device)
    step["fit_step_ms"] = (time.perf_counter() - t_fit) * 1e3 / (epochs * T)
    log(f"{name}: step fit_step_ms = {step['fit_step_ms']:.3f} ms (wall clock, teacher and Adam included)")
    step["ratio_tinted_vs_plain"] = statistics.median(step["ratio_rounds"])
    step["speedup_vs_reference"] = step["reference_ms"] / step["tinted_ms"]
    step["target_ratio"] = 1.2
    step["meets_target"] = step["ratio_tinted_vs_plain"] <= 1.2
    del inputs

    # (d) inference on a batch mixing the T tasks.
    xi = make_input(infer_batch, g, kw, seq).to(device=device, dtype=x.dtype)
    ids = (torch.arange(infer_batch) % T)[torch.randperm(infer_batch, generator=g)].to(device)
    rows = [torch.nonzero(ids == t).flatten() for t in range(T)]
    model.eval()
    dense.eval()

    def mixed():
        with torch.no_grad():
            return model(xi, ids)

    def dense_fwd():
        with torch.no_grad():
            return dense(xi)

    def loop():
        with torch.no_grad():
            out = torch.empty(infer_batch, 10, device=device, dtype=dtype)
            for t in range(T):
                out[rows[t]] = model(xi[rows[t]], task=t)
            return out

    mixed()  # builds and caches the merged weights
    check["mixed_vs_loop_max_abs_diff"] = float((mixed().float() - loop().float()).abs().max())
    inference = {"batch": infer_batch, "seq": seq, "tasks_in_batch": T}
    for key, fn in (("mixed_ms", mixed), ("dense_ms", dense_fwd), ("loop_ms", loop)):
        inference[key] = measure(fn)
        log(f"{name}: inference {key} = {inference[key]:.3f} ms")
    inference["mixed_samples_per_s"] = infer_batch / inference["mixed_ms"] * 1e3
    inference["dense_samples_per_s"] = infer_batch / inference["dense_ms"] * 1e3
    inference["throughput_mixed_vs_dense"] = inference["dense_ms"] / inference["mixed_ms"]
    inference["speedup_mixed_vs_loop"] = inference["loop_ms"] / inference["mixed_ms"]
    inference["target_throughput_vs_dense"] = 0.9
    inference["meets_target"] = inference["throughput_mixed_vs_dense"] >= 0.9

    ok = math.isfinite(check["loss_tinted"]) and abs(check["loss_tinted"] - check["loss_reference"]) < 0.05
    check["tinted_matches_reference"] = ok
    out = {
        "model": {"name": name, **_defaults(cls), **kw, "parameters": n_params, "tasks": T, "tint_layer": tint,
                  "tint_parameters_per_task": sum(v.numel() for v in ft_tint[0].values()),
                  "merged_tensors": len(names), "weighted_sum_calls_per_step": shape_groups,
                  "build_s": build_s},
        "step": step, "inference": inference, "checks": check,
    }
    log(f"{name}: tinted step {step['ratio_tinted_vs_plain']:.2f}x plain (target <= 1.2), "
        f"{step['speedup_vs_reference']:.1f}x faster than the reference's merge; mixed inference "
        f"{inference['throughput_mixed_vs_dense']:.2f}x dense throughput (target >= 0.9), "
        f"{inference['speedup_mixed_vs_loop']:.1f}x the task loop")
    if not ok:
        log(f"{name}: WARNING the TintedModel step and the reference step disagree: {check}")
    return out


def _defaults(cls) -> dict:
    return {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()
            if v.default is not inspect.Parameter.empty}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def trace(fn, path: str, device, steps: int = 3) -> dict:
    """A torch.profiler timeline of `steps` calls of fn into path (Chrome trace format, gzipped),
    and the operators' device (else host) time, summed over the steps, the largest first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    prof.export_chrome_trace(path)
    device_time = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: -getattr(e, device_time, 0.0))[:15]
    return {"file": os.path.basename(path), "steps": steps,
            "top_ms": {e.key: round(getattr(e, device_time, 0.0) / 1e3 / steps, 4) for e in rows}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny models and batches (a quick check, e.g. on a CPU)")
    p.add_argument("--models", default="bert-base,vit-b32", help="comma-separated: bert-base, vit-b32")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="storage dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--batch", type=int, default=None, help="test-time step batch (default 32; 4 with --smoke)")
    p.add_argument("--infer-batch", type=int, default=None,
                   help="mixed inference batch (default 256; 16 with --smoke)")
    p.add_argument("--seq", type=int, default=None, help="BERT sequence length (default 128; 16 with --smoke)")
    p.add_argument("--tint", default=None, help="the tint layer (default the middle block's fc1)")
    p.add_argument("--reps", type=int, default=5, help="CPU repetitions (CUDA: do_bench's own)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="directory for tint-<device>.json (default bench/results)")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="also write a torch.profiler timeline of 3 tinted and 3 plain steps per model into DIR")
    args = p.parse_args(argv)
    args.batch = args.batch or (4 if args.smoke else 32)
    args.infer_batch = args.infer_batch or (16 if args.smoke else 256)
    args.seq = args.seq or (16 if args.smoke else 128)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        p.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for float32 runs (both sides alike)
    log(f"device {device_name(device)}; torch {torch.__version__}; triton {_triton_version()}; "
        f"models {models}; {args.tasks} tasks; {dtype}")

    report = {
        "bench": "tint",
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": str(dtype).replace("torch.", ""),
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d"),
        "models": {},
    }
    for name in models:
        report["models"][name] = bench_model(name, args, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["seconds"] = time.perf_counter() - T0

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"tint-{device_tag(device)}{'-smoke' if args.smoke else ''}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    log(f"wrote {path} ({report['seconds']:.0f} s in all)")
    return report


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
