"""FusionBench's layer-wise AdaMerging step against neurokern's, on the same model and data, in one run.

    python bench/fusionbench_adamerging.py --device cuda     # ViT-B/32-sized encoder, 8 tasks (GPU)
    python bench/fusionbench_adamerging.py --smoke           # tiny sizes, any device (a check of the script)

Writes DIR/fusionbench-adamerging-<device>.json (DIR defaults to bench/results; "-smoke" added for
--smoke) holding the device name, torch and fusion-bench versions and:

 step_ms (median over --reps steps, after --warmup steps; wall clock with the device synchronised):
   fusion_bench   fusion_bench.models.wrappers.layer_wise_fusion.LayerWiseMergedModel driven as
                  fusion-bench's LayerWiseAdaMergingAlgorithm.test_time_adaptation drives it: for each
                  task a forward through torch.func.functional_call on the merged state dict, its
                  entropy_loss, backward(retain_graph=True); one Adam step; merge_weights() (a Python
                  sum over every tensor and task: θ0 + Σ_t λ_{t,p} τ_{t,p});
   neurokern      neurokern.tint.TintedModel (coefficients="layer") as neurokern.tint.fit's joint
                  schedule runs it: the summed entropy of every task's batch, one backward (θ(λ) by the
                  weighted_sum op, one call per shape group, and its fused backward), one Adam step;
   speedup        fusion_bench / neurokern.
 agreement: both start at λ = init (0.3) and see the same batches; after the same number of steps the
   largest |λ_fusion_bench − λ_neurokern| over every tensor and task (each side uses its own entropy:
   fusion-bench adds 1e-8 inside the log).

The model is CLIP ViT-B/32's image tower in plain torch (bench/tint.py's ViT without its classifier:
the 512-d image embedding), as fusion-bench's CLIP AdaMerging merges the vision encoder and scores
its features with each task's fixed classification head; here a head is a random [classes, 512]
matrix per task. The fine-tuned encoders are the pre-trained weights plus small noise; the inputs are
random images (a step's cost does not depend on the values). float32 on both sides.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

# bench/ holds a kernels.py, which would shadow the `kernels` package that transformers imports: the
# repository root goes on the path instead of this folder, and bench/tint.py is `bench.tint`
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
from bench.machine import device_tag  # noqa: E402
from bench.tint import ViT, device_name  # noqa: E402  (the same encoder as the tint benchmark)

from fusion_bench.method.adamerging.entropy_loss import entropy_loss  # noqa: E402
from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights  # noqa: E402

from neurokern.tint import TintedModel, entropy  # noqa: E402

T0 = time.perf_counter()
FULL = dict(image=224, patch=32, d=768, ff=3072, layers=12, heads=12, embed=512)
SMOKE = dict(image=32, patch=16, d=32, ff=64, layers=2, heads=2, embed=16)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder(kw: dict) -> nn.Module:
    model = ViT(**kw, classes=1)
    model.head = nn.Identity()  # the image embedding; the tasks' heads score it
    return model


def build(args, device: torch.device):
    kw = SMOKE if args.smoke else FULL
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    pretrained = encoder(kw).to(device)
    finetuned = []
    with torch.no_grad():
        for _ in range(args.tasks):
            model = copy.deepcopy(pretrained)
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g).to(device))
            finetuned.append(model)
    heads = [torch.randn(args.classes, kw["embed"], generator=g).to(device) / kw["embed"] ** 0.5 for _ in range(args.tasks)]
    # per step and task one batch; the steps cycle through --batches of them, the same on both sides
    batches = [[torch.randn(args.batch, 3, kw["image"], kw["image"], generator=g).to(device) for _ in range(args.tasks)]
               for _ in range(args.batches)]
    return kw, pretrained, finetuned, heads, batches


class FusionBenchSide:
    """fusion-bench's wrapper and loop (LayerWiseAdaMergingAlgorithm.test_time_adaptation)."""

    def __init__(self, pretrained, finetuned, heads, lr, init):
        num_layers = sum(1 for p in pretrained.parameters() if p.requires_grad)
        weights = get_layer_wise_weights(len(finetuned), num_layers, init).to(heads[0].device)
        self.module = LayerWiseMergedModel(weights, copy.deepcopy(pretrained), [copy.deepcopy(m) for m in finetuned],
                                           clamp_weights=True, tie_weights=True, strict=False)
        self.names = [n for n, p in pretrained.named_parameters() if p.requires_grad]
        self.heads = heads
        self.optimizer = torch.optim.Adam([self.module.merge_weight], lr=lr)
        self.module.train()
        self.module.merge_weights()

    def step(self, batch) -> None:
        for x, head in zip(batch, self.heads):
            loss = entropy_loss(self.module(x) @ head.T)
            loss.backward(retain_graph=True)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.module.merge_weights()

    def lambdas(self) -> dict[str, torch.Tensor]:
        weight = self.module.merge_weight.detach().clamp(0, 1)
        return {n: weight[:, i] for i, n in enumerate(self.names)}


class NeurokernSide:
    """neurokern.tint: a TintedModel with layer-wise λ, fit's joint schedule."""

    def __init__(self, pretrained, finetuned, heads, lr, init):
        self.model = TintedModel(pretrained, None, finetuned,
                                 coefficients="layer", prior=init)
        self.heads = heads
        self.optimizer = torch.optim.Adam([self.model.lambdas], lr=lr)

    def step(self, batch) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = sum(entropy(self.model(x) @ head.T) for x, head in zip(batch, self.heads))
        loss.backward()
        self.optimizer.step()

    def lambdas(self) -> dict[str, torch.Tensor]:
        coefficients = self.model.coefficients_now()
        return {n: coefficients[i] for i, n in enumerate(self.model.merged_names)}


def time_steps(side, batches, warmup: int, reps: int, device: torch.device) -> list[float]:
    for i in range(warmup):
        side.step(batches[i % len(batches)])
    times = []
    for i in range(warmup, warmup + reps):
        sync(device)
        start = time.perf_counter()
        side.step(batches[i % len(batches)])
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="a tiny encoder, 3 tasks, small batches (any device)")
    p.add_argument("--tasks", type=int, default=None, help="default 8 (3 with --smoke)")
    p.add_argument("--batch", type=int, default=None, help="inputs per task and step (default 16, fusion-bench's; 2 with --smoke)")
    p.add_argument("--batches", type=int, default=4, help="distinct batches per task the steps cycle through")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's rate on λ (fusion-bench's AdaMerging default)")
    p.add_argument("--init", type=float, default=0.3, help="the initial λ (fusion-bench's init_values)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --smoke)")
    p.add_argument("--reps", type=int, default=None, help="timed steps (default 20; 2 with --smoke)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="directory for fusionbench-adamerging-<device>.json (default bench/results)")
    args = p.parse_args(argv)
    args.tasks = args.tasks or (3 if args.smoke else 8)
    args.batch = args.batch or (2 if args.smoke else 16)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.reps = args.reps or (2 if args.smoke else 20)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")

    import fusion_bench

    kw, pretrained, finetuned, heads, batches = build(args, device)
    parameters = sum(p.numel() for p in pretrained.parameters())
    log(f"device {device_name(device)}; ViT encoder {kw} ({parameters / 1e6:.1f} M parameters), {args.tasks} tasks, "
        f"batch {args.batch}")
    sides = {"fusion_bench": FusionBenchSide(pretrained, finetuned, heads, args.lr, args.init),
             "neurokern": NeurokernSide(pretrained, finetuned, heads, args.lr, args.init)}
    times = {}
    for name, side in sides.items():
        times[name] = time_steps(side, batches, args.warmup, args.reps, device)
        log(f"{name}: {statistics.median(times[name]):.2f} ms a step")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    got, want = sides["neurokern"].lambdas(), sides["fusion_bench"].lambdas()
    gap = max(float((got[n] - want[n]).abs().max()) for n in want)
    moved = max(float((want[n] - args.init).abs().max()) for n in want)
    step = {name: statistics.median(t) for name, t in times.items()}
    report = {
        "bench": "fusionbench_adamerging",
        "device": device_name(device),
        "torch": torch.__version__,
        "fusion_bench": getattr(fusion_bench, "__version__", None) or _version("fusion-bench"),
        "python": platform.python_version(),
        "dtype": "float32",
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d"),
        "model": {"encoder": "ViT", **kw, "parameters": parameters, "merged_tensors": len(want), "tasks": args.tasks,
                  "classes": args.classes, "batch_per_task": args.batch},
        "steps": {"warmup": args.warmup, "timed": args.reps, "lr": args.lr, "init": args.init},
        "step_ms": {**step, "speedup": step["fusion_bench"] / step["neurokern"]},
        "step_ms_all": times,
        "agreement": {"max_abs_lambda_difference": gap, "max_lambda_move_from_init": moved},
        "seconds": time.perf_counter() - T0,
    }
    log(f"neurokern {report['step_ms']['speedup']:.2f}x fusion-bench's step; λ agree to {gap:.2e} "
        f"(moved up to {moved:.2e} from {args.init})")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"fusionbench-adamerging-{device_tag(device)}{'-smoke' if args.smoke else ''}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    log(f"wrote {path}")
    return report


def _version(package: str):
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
