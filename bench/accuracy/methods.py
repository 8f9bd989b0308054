"""Every merging method of the suite, run on one pre-trained encoder and T fine-tuned encoders.

Task heads are never merged (as in the papers): each task keeps the head it was fine-tuned with
and the merged encoder is evaluated under every head. A method returns a result dict:

  status     "ok" | "error"
  val, test  accuracy per task (val only for methods that look at validation data)
  params     what was used (λ found, density, ...); search: the validation curve of a λ search
  seconds    wall time of the method: merging plus its λ search (validation evaluations
             included); merge_seconds: one nk.merge call

The test-time methods (AdaMerging, Model Tinting) are in `tta`.

λ search: the merged delta of these methods is linear in their global scale, so one nk.merge at
scale 1 gives every grid point as θ0 + λ (θ(1) − θ0) (checked: equal to nk.merge(scale=λ) to
float rounding); the λ with the best mean validation accuracy wins (the smaller on ties).
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

import neurokern as nk
from bench.accuracy.finetune import accuracy, evaluate, predict
from bench.accuracy.model import Classifier

LAMBDA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0)
PARALLEL_GRID = (0.25, 0.5, 1.0, 2.0)


@dataclass
class Context:
    """What every method needs: tasks, the pre-trained and fine-tuned encoder states (on device),
    the per-task heads, one work encoder the merged states are loaded into, the device, and the
    family's tint layer names."""
    tasks: list
    base: dict
    finetuned: list
    heads: list
    encoder: nn.Module
    device: torch.device
    tint_layers: dict = field(default_factory=dict)
    lambda_grid: Sequence[float] = LAMBDA_GRID
    eval_batch: int = 256
    notes: list = field(default_factory=list)
    _cpu: Optional[tuple] = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def evaluate(self, state: dict, split: str) -> dict:
        return evaluate(self.encoder, self.heads, self.tasks, split, self.device, state, self.eval_batch)

    def merge(self, method: str, **params) -> tuple[dict, float]:
        """nk.merge on the device (on the CPU when this build has no kernels for it); (state, seconds)."""
        self.sync()
        start = time.perf_counter()
        try:
            out = nk.merge(self.base, self.finetuned, method=method, **params)
        except nk.NeurokernError as exc:
            if "no kernels" not in str(exc):
                raise
            if self._cpu is None:
                self.notes.append(f"nk.merge ran on the CPU: {exc}")
                self._cpu = ({k: v.cpu() for k, v in self.base.items()}, [{k: v.cpu() for k, v in f.items()} for f in self.finetuned])
            start = time.perf_counter()
            out = nk.merge(self._cpu[0], self._cpu[1], method=method, **params)
            out = {k: v.to(self.device) for k, v in out.items()}
        self.sync()
        return out, time.perf_counter() - start

    def scaled(self, merged: dict, lam: float) -> dict:
        return {k: (b + lam * (merged[k] - b)) if b.is_floating_point() else b for k, b in self.base.items()}


def _mean(d: dict) -> float:
    return sum(d.values()) / max(1, len(d))


def _search(ctx: Context, merged: dict, grid: Sequence[float]) -> tuple[float, list]:
    curve = []
    for lam in grid:
        val = ctx.evaluate(ctx.scaled(merged, lam), "val")
        curve.append({"lambda": lam, "val_avg": _mean(val)})
    best = max(curve, key=lambda c: (c["val_avg"], -c["lambda"]))
    return best["lambda"], curve


def _static(method: str, params: dict, search: bool) -> Callable[[Context], dict]:
    """A training-free merge with fixed params, or with its global scale λ searched on validation."""

    def run(ctx: Context) -> dict:
        start = time.perf_counter()
        p = dict(params)
        if callable(p.get("weights")):
            p["weights"] = p["weights"](len(ctx.tasks))
        if search:
            p["scale"] = 1.0
        merged, merge_s = ctx.merge(method, **p)
        out = {"nk_method": method, "params": p, "merge_seconds": merge_s}
        if search:
            lam, curve = _search(ctx, merged, ctx.lambda_grid)
            merged = ctx.scaled(merged, lam)
            out["params"] = {**p, "scale": lam}
            out["search"] = curve
        ctx.sync()
        out["seconds"] = time.perf_counter() - start
        out["val"] = ctx.evaluate(merged, "val")
        out["test"] = ctx.evaluate(merged, "test")
        return out

    return run


def pretrained(ctx: Context) -> dict:
    """Lower reference: the pre-trained encoder under each task's fine-tuned head."""
    return {"params": {}, "seconds": 0.0, "val": ctx.evaluate(ctx.base, "val"), "test": ctx.evaluate(ctx.base, "test")}


def finetuned(ctx: Context) -> dict:
    """Upper reference: each task's own fine-tuned encoder (T models)."""
    val, test = {}, {}
    for t, (task, head) in enumerate(zip(ctx.tasks, ctx.heads)):
        ctx.encoder.load_state_dict(ctx.finetuned[t], strict=False)
        model = Classifier(ctx.encoder, head).eval()
        val[task.name] = accuracy(predict(model, task.x["val"], ctx.device, ctx.eval_batch), task.y["val"])
        test[task.name] = accuracy(predict(model, task.x["test"], ctx.device, ctx.eval_batch), task.y["test"])
    return {"params": {}, "seconds": 0.0, "val": val, "test": test}


def neuromerging_full(ctx: Context, density: float = 0.1) -> dict:
    """Full NeuroMerging (λ1 ≠ 0): λ2 from the lite search, then λ1 searched on validation."""
    start = time.perf_counter()
    lite, merge_s = ctx.merge("neuromerging", density=density, scale=1.0)
    lam2, curve2 = _search(ctx, lite, ctx.lambda_grid)
    curve = []
    for lam1 in PARALLEL_GRID:
        merged, _ = ctx.merge("neuromerging", density=density, scale=lam2, scale_parallel=lam1)
        curve.append({"lambda": lam2, "lambda_parallel": lam1, "val_avg": _mean(ctx.evaluate(merged, "val"))})
    best = max(curve, key=lambda c: (c["val_avg"], -c["lambda_parallel"]))
    merged, _ = ctx.merge("neuromerging", density=density, scale=lam2, scale_parallel=best["lambda_parallel"])
    ctx.sync()
    seconds = time.perf_counter() - start
    return {"nk_method": "neuromerging", "params": {"density": density, "scale": lam2, "scale_parallel": best["lambda_parallel"]},
            "search": curve2 + curve, "merge_seconds": merge_s, "seconds": seconds,
            "val": ctx.evaluate(merged, "val"), "test": ctx.evaluate(merged, "test")}


# --------------------------------------------------------------------------- the registry
METHODS: dict[str, Callable[[Context], dict]] = {
    "pretrained": pretrained,
    "finetuned": finetuned,
    "weight_averaging": _static("task_arithmetic", {"weights": lambda T: [1.0 / T] * T}, search=False),
    "task_arithmetic": _static("task_arithmetic", {}, search=True),
    "task_arithmetic_0.3": _static("task_arithmetic", {"scale": 0.3}, search=False),
    "ties": _static("ties", {"density": 0.2}, search=True),
    "dare_ties": _static("dare_ties", {"density": 0.3, "seed": 0}, search=True),
    "neuromerging_lite_default": _static("neuromerging", {"density": 0.1}, search=False),
    "neuromerging_lite": _static("neuromerging", {"density": 0.1}, search=True),
    "neuromerging_full": neuromerging_full,
}
REFERENCES = ("pretrained", "finetuned")
LABELS = {
    "pretrained": "pre-trained encoder (fine-tuned heads)",
    "finetuned": "individual fine-tuned",
    "weight_averaging": "weight averaging",
    "task_arithmetic": "task arithmetic (λ on val)",
    "task_arithmetic_0.3": "task arithmetic (λ = 0.3, the papers' value)",
    "ties": "TIES (density 0.2, λ on val)",
    "dare_ties": "DARE-TIES (density 0.3, λ on val)",
    "neuromerging_lite_default": "NeuroMerging lite (density 0.1, default λ)",
    "neuromerging_lite": "NeuroMerging lite (density 0.1, λ on val)",
    "neuromerging_full": "NeuroMerging full (λ1, λ2 on val)",
}


def run_method(name: str, ctx: Context) -> dict:
    try:
        out = METHODS[name](ctx)
        out.setdefault("status", "ok")
    except Exception as exc:  # one failing method must not lose the others' results
        out = {"status": "error", "note": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    out["label"] = LABELS.get(name, name)
    return out
