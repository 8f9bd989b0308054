"""Every merging method of the suite, run on one pre-trained encoder and T fine-tuned encoders.

Task heads are never merged (as in the papers): each task keeps the head it was fine-tuned with
and the merged encoder is evaluated under every head. A method returns a result dict:

  status     "ok" | "pending" (its code is not in this checkout) | "error"
  val, test  accuracy per task (val only for methods that look at validation data)
  params     what was used (λ found, density, ...); search: the validation curve of a λ search
  seconds    wall time of the method: merging plus its λ search (validation evaluations
             included) or its test-time training; merge_seconds: one nk.merge call

λ search: the merged delta of these methods is linear in their global scale, so one nk.merge at
scale 1 gives every grid point as θ0 + λ (θ(1) − θ0) (checked: equal to nk.merge(scale=λ) to
float rounding); the λ with the best mean validation accuracy wins (the smaller on ties).
"""
from __future__ import annotations

import importlib.util
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

import neurokern as nk
from neurokern.accuracy.finetune import accuracy, autocast, evaluate, predict
from neurokern.accuracy.model import Classifier, pad

LAMBDA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0)
PARALLEL_GRID = (0.25, 0.5, 1.0, 2.0)


@dataclass
class TTAConfig:
    """Test-time training (AdaMerging, Tinting) settings; reference values in brackets."""
    steps: int = 500            # [500] AdaMerging steps / Tinting epochs (fewer when a time budget is short)
    batch_size: int = 32        # [AdaMerging 2x16, Tinting 32] unlabelled inputs per task per step
    lr_adamerging: float = 1e-3  # [1e-3]
    lr_tinting: float = 1e-2    # [1e-2]
    prior: float = 0.3          # [0.3]
    tint_layers: tuple = ("head",)  # [the per-task classification head]
    seed: int = 0


@dataclass
class Context:
    """What every method needs: tasks, the pre-trained and fine-tuned encoder states (on device),
    the per-task heads, one work encoder the merged states are loaded into, the device."""
    tasks: list
    base: dict
    finetuned: list
    heads: list
    encoder: nn.Module
    device: torch.device
    lambda_grid: Sequence[float] = LAMBDA_GRID
    tta: TTAConfig = field(default_factory=TTAConfig)
    eval_batch: int = 256
    notes: list = field(default_factory=list)
    deadline: Optional[float] = None   # time.perf_counter() value after which nothing should run
    reserve: float = 0.0               # seconds kept free before the deadline (for the investigation)
    tta_left: int = 0                  # test-time methods still to run (they share the time left)
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
        val[task.name] = accuracy(predict(ctx.encoder, head, task.ids["val"], ctx.device, ctx.eval_batch), task.y["val"])
        test[task.name] = accuracy(predict(ctx.encoder, head, task.ids["test"], ctx.device, ctx.eval_batch), task.y["test"])
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


# --------------------------------------------------------------------------- test-time methods
def tint_available() -> bool:
    return importlib.util.find_spec("neurokern.tint") is not None and hasattr(_tint(), "fit")


def _tint():
    import neurokern.tint as tint

    return tint


def _full_state(encoder_state: dict, head: Optional[nn.Module] = None) -> dict:
    out = {f"encoder.{k}": v for k, v in encoder_state.items()}
    if head is not None:
        out.update({f"head.{k}": v.detach() for k, v in head.state_dict().items()})
    return out


def _test_time(loss: str, tinted: bool) -> Callable[[Context], dict]:
    """AdaMerging (loss "entropy", no tint) or Model Tinting (loss "pseudo" / "pseudo_conf",
    tints = ctx.tta.tint_layers) through nk.tint, on the unlabelled test inputs of every task."""

    def run(ctx: Context) -> dict:
        if not tint_available():
            return {"status": "pending", "note": "neurokern.tint (nk.tint.fit) is not in this checkout"}
        tint = _tint()
        cfg = ctx.tta
        layers = list(cfg.tint_layers) if tinted else []
        ctx.sync()
        start = time.perf_counter()
        # The architecture: the work encoder plus a head placeholder (heads differ in shape per task);
        # it takes packed inputs [B, 2, L] (token ids, attention mask), nk.tint.fit's one-tensor x.
        module = PackedClassifier(ctx.encoder, nn.Linear(ctx.encoder.config.hidden_size, 1)).to(ctx.device).eval()
        base = _full_state(ctx.base)
        fts = [_full_state(f, h) for f, h in zip(ctx.finetuned, ctx.heads)]
        model = tint.TintedModel(module, base, fts, tint_layers=layers, heads=["head"], coefficients="layer",
                                 prior=cfg.prior, task_names=[t.name for t in ctx.tasks], device=ctx.device)
        inputs = [pack(t.ids["test"], ctx.device) for t in ctx.tasks]
        ctx.sync()
        build_seconds = time.perf_counter() - start
        lr = cfg.lr_adamerging if loss == "entropy" else cfg.lr_tinting
        # AdaMerging's reference loop takes one step on the sum of the tasks' losses ("joint");
        # Tinting's one step per task per epoch ("tasks").
        schedule = "joint" if loss == "entropy" else "tasks"

        def fit(m, steps):
            with autocast(ctx.device):
                return tint.fit(m, inputs, loss=loss, steps=steps, lr=lr, batch_size=cfg.batch_size,
                                seed=cfg.seed, schedule=schedule, progress=False)

        steps, note = cfg.steps, None
        if ctx.deadline is not None:
            # Time a few steps on a throwaway copy, then fit as many steps as the time left allows.
            probe = tint.TintedModel(module, base, fts, tint_layers=layers, heads=["head"], coefficients="layer",
                                     prior=cfg.prior, task_names=[t.name for t in ctx.tasks], device=ctx.device)
            fit(probe, 1)
            ctx.sync()
            t_probe = time.perf_counter()
            fit(probe, 3)
            ctx.sync()
            per_step = (time.perf_counter() - t_probe) / 3
            del probe
            share = (ctx.deadline - time.perf_counter() - ctx.reserve) / max(1, ctx.tta_left)
            affordable = max(1, int(0.85 * share / per_step))
            if affordable < steps:
                note = (f"{steps} steps requested, {affordable} run: {per_step * 1000:.0f} ms per step and "
                        f"{share:.0f} s of the time budget for this method")
                steps = affordable
        ctx.tta_left = max(0, ctx.tta_left - 1)
        t_fit = time.perf_counter()
        log = fit(model, steps)
        ctx.sync()
        fit_seconds = time.perf_counter() - t_fit
        seconds = build_seconds + fit_seconds  # the probe above is not the method's cost
        val, test = {}, {}
        with torch.no_grad():
            for i, t in enumerate(ctx.tasks):
                val[t.name] = accuracy(_predict_tinted(model, i, t.ids["val"], ctx), t.y["val"])
                test[t.name] = accuracy(_predict_tinted(model, i, t.ids["test"], ctx), t.y["test"])
        lam = model.coefficients_now()
        out = {"params": {"loss": loss, "tint_layers": layers, "coefficients": "layer", "schedule": schedule, "steps": steps,
                          "lr": lr, "batch_size": cfg.batch_size, "prior": cfg.prior, "seed": cfg.seed},
               "lambda_mean": float(lam.mean()), "lambda_per_task": [float(x) for x in lam.mean(0)],
               "seconds": seconds, "fit_seconds": fit_seconds, "val": val, "test": test}
        if note:
            out["note"] = note
            ctx.notes.append(f"{loss}: {note}")
        losses = log.get("loss", []) if isinstance(log, dict) else []
        if losses:
            k = max(1, len(losses) // 10)
            out["fit_loss_first"] = sum(losses[:k]) / k
            out["fit_loss_last"] = sum(losses[-k:]) / k
        return out

    return run


class PackedClassifier(Classifier):
    """Classifier on one tensor x [B, 2, L] = (token ids, attention mask), cut to the batch's
    longest input: the single-tensor input nk.tint.fit and TintedModel pass through."""

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = x[:, 0], x[:, 1]
        width = max(1, int(mask.sum(1).max()))
        return self.head(self.features(ids[:, :width], mask[:, :width]))


def pack(ids: Sequence[Sequence[int]], device) -> Tensor:
    """Token id lists -> [N, 2, L] (ids, mask), padded to the longest."""
    b_ids, b_mask = pad(ids, device)
    return torch.stack([b_ids, b_mask], 1)


@torch.no_grad()
def _predict_tinted(model, task: int, ids: Sequence[Sequence[int]], ctx: Context) -> Tensor:
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = None
    for s in range(0, len(order), ctx.eval_batch):
        idx = order[s: s + ctx.eval_batch]
        with autocast(ctx.device):
            logits = model(pack([ids[i] for i in idx], ctx.device), task=task).float().cpu()
        if out is None:
            out = torch.empty(len(ids), logits.shape[-1])
        out[idx] = logits
    return out


# --------------------------------------------------------------------------- the registry
METHODS: dict[str, Callable[[Context], dict]] = {
    "pretrained": pretrained,
    "finetuned": finetuned,
    "weight_averaging": _static("task_arithmetic", {"weights": lambda T: [1.0 / T] * T}, search=False),
    "task_arithmetic": _static("task_arithmetic", {}, search=True),
    "ties": _static("ties", {"density": 0.2}, search=True),
    "dare_ties": _static("dare_ties", {"density": 0.3, "seed": 0}, search=True),
    "neuromerging_lite_default": _static("neuromerging", {"density": 0.1}, search=False),
    "neuromerging_lite": _static("neuromerging", {"density": 0.1}, search=True),
    "neuromerging_full": neuromerging_full,
    "adamerging": _test_time("entropy", False),
    "tinting": _test_time("pseudo", True),
    "tinting_conf": _test_time("pseudo_conf", True),
}
REFERENCES = ("pretrained", "finetuned")
LABELS = {
    "pretrained": "pre-trained encoder (fine-tuned heads)",
    "finetuned": "individual fine-tuned",
    "weight_averaging": "weight averaging",
    "task_arithmetic": "task arithmetic (λ on val)",
    "ties": "TIES (density 0.2, λ on val)",
    "dare_ties": "DARE-TIES (density 0.3, λ on val)",
    "neuromerging_lite_default": "NeuroMerging lite (density 0.1, default λ)",
    "neuromerging_lite": "NeuroMerging lite (density 0.1, λ on val)",
    "neuromerging_full": "NeuroMerging full (λ1, λ2 on val)",
    "adamerging": "AdaMerging (layer-wise, entropy)",
    "tinting": "Model Tinting (head tint, pseudo-labels)",
    "tinting_conf": "Model Tinting++ (confidence filtering)",
}


def run_method(name: str, ctx: Context) -> dict:
    try:
        out = METHODS[name](ctx)
        out.setdefault("status", "ok")
    except Exception as exc:  # one failing method must not lose the others' results
        out = {"status": "error", "note": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    out["label"] = LABELS.get(name, name)
    return out
