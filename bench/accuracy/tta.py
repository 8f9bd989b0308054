"""The test-time methods of the suite, AdaMerging and Model Tinting, and their ablations: each run
a `TTA` (its settings) trained through nk.tint on the unlabelled test inputs of every task, with
its learning curve recorded.

One run: a TintedModel over the classifier head(encoder(x)) whose merged parameters are the
encoder's (λ layer-wise, one per tensor and task, starting at the prior) and whose per-task layers
are the heads (frozen at the fine-tuned heads unless tinted) and the tinted layer; nk.tint.fit for
`steps` epochs; then validation and test accuracy per task, routed through each task's tint and
head. Every `curve_every` epochs (and before the first) the curve records validation and test
accuracy, the loss, λ per task (mean, and the share of λ at 0 and at 1, where the clamp stops its
gradient) and how far the tints moved (‖tint − tint₀‖ / ‖tint₀‖).

Runs are independent: `run_many` spreads them over worker processes (on one GPU the runs are
bound by the host's Python, so processes run side by side at nearly full speed each), each worker
loading the fine-tuned models once from the checkpoint folder.
"""
from __future__ import annotations

import copy
import fnmatch
import dataclasses
import os
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from bench.accuracy.finetune import accuracy, autocast, predict
from bench.accuracy.model import Classifier

LOSSES = ("entropy", "pseudo", "pseudo_conf")


@dataclass(frozen=True)
class TTA:
    """One test-time training run. tint: names of the family's single layers (tint_layers()) given
    a trainable copy per task; none: AdaMerging. prior: the initial λ, a number or
    "task_arithmetic" (the scale task arithmetic found on validation). steps: epochs; each takes
    one step per task ("tasks") or one step on the sum of the tasks' losses ("joint")."""
    loss: str
    tint: tuple = ()
    steps: int = 500
    lr_tint: float = 1e-2
    lr_lambda: float = 1e-2
    train_lambda: bool = True
    prior: Union[float, str] = 0.3
    schedule: str = "tasks"
    batch_size: int = 32
    precision: str = "bf16"
    seed: int = 0
    label: str = ""

    def settings(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "label"}


# The suite's rows. AdaMerging as its reference runs it (entropy, one step per epoch on the sum of
# the tasks' losses, λ at lr 1e-3, 500 steps). Model Tinting as its reference runs it: the head as
# its tint, λ and the tint at lr 1e-2, 500 epochs (the lr ablation: λ at 1e-3 did worse on both
# families, bench/results/tinting-diagnosis.md).
METHODS = {
    "adamerging": TTA("entropy", schedule="joint", lr_lambda=1e-3,
                      label="AdaMerging (layer-wise, entropy)"),
    "tinting": TTA("pseudo", tint=("head",), label="Model Tinting (head tint, pseudo-labels)"),
    "tinting_conf": TTA("pseudo_conf", tint=("head",), label="Model Tinting++ (confidence filtering)"),
}


GRID = ("lr", "lambda", "layer", "loss", "precision", "adamerging")


def ablations(layers: dict, base: TTA = METHODS["tinting"], adamerging: TTA = METHODS["adamerging"],
              groups=GRID, only: Sequence[str] = ()) -> dict[str, TTA]:
    """The ablation grid around `base` (the suite's Tinting) and `adamerging`, by group: "lr" (λ's
    and the tints' learning rates, each of 1e-2, 1e-3, 1e-4; 1e-2 for both is the reference code's
    setting), "lambda" (λ frozen at, or trained from, task arithmetic's λ), "layer" (each of the
    family's other single layers tinted instead of the head, at each tint learning rate), "loss"
    (entropy with a tint),
    "precision" (fp32 instead of bf16 autocast), "adamerging" (its λ at lr 1e-2). Every Tinting
    variant runs with both losses (pseudo-labels and the confidence filter), so Tinting++ is
    compared with Tinting in every row. layers: the family's tint_layers(). Runs come group by group
    in the order of `groups`; `only` (shell-style patterns over the run names, e.g. "layer_*_tint0.01*")
    keeps the runs that match one of them."""
    unknown = [g for g in groups if g not in GRID]
    if unknown:
        raise ValueError(f"unknown ablation group(s) {unknown}; choose from {GRID}")
    runs: dict[str, TTA] = {}

    def both(name: str, label: str, **kw) -> None:
        for loss, tag in (("pseudo", ""), ("pseudo_conf", "++")):
            runs[f"{name}{'_conf' if tag else ''}"] = dataclasses.replace(
                base, loss=loss, label=f"{label}{' ' + tag if tag else ''}", **kw)

    for group in groups:  # in the order asked for: with fewer workers than runs, the first finish first
        if group == "lr":
            # The 3 x 3 grid from the reference's 1e-2 / 1e-2 down; base's own pair is the suite's
            # Tinting row.
            for lam in (1e-2, 1e-3, 1e-4):
                for tint in (1e-2, 1e-3, 1e-4):
                    if (lam, tint) != (base.lr_lambda, base.lr_tint):
                        both(f"lr_lambda{lam:g}_tint{tint:g}", f"lr λ {lam:g}, tint {tint:g}", lr_lambda=lam,
                             lr_tint=tint)
        elif group == "lambda":
            both("lambda_frozen", "λ frozen at task arithmetic's λ", train_lambda=False, prior="task_arithmetic")
            both("lambda_from_ta", "λ trained from task arithmetic's λ", prior="task_arithmetic")
        elif group == "layer":
            # A layer's weights live on their own scale (a head trained from N(0, 0.02) and a block's
            # projection differ), and Adam's steps are about lr whatever the gradient: every layer at
            # every tint learning rate.
            for key, module in layers.items():
                if (key,) != base.tint:
                    for tint in (1e-2, 1e-3, 1e-4):
                        both(f"layer_{key}_tint{tint:g}", f"tint {key} ({module}), lr {tint:g}", tint=(key,), lr_tint=tint)
        elif group == "loss":
            runs["entropy_tint"] = dataclasses.replace(base, loss="entropy", label="entropy loss, same tint")
        elif group == "precision":
            both("fp32", "fp32 (no autocast)", precision="fp32")
            runs["adamerging_fp32"] = dataclasses.replace(adamerging, precision="fp32", label="AdaMerging, fp32")
        elif group == "adamerging":
            runs["adamerging_lr1e-2"] = dataclasses.replace(adamerging, lr_lambda=1e-2, label="AdaMerging, lr 1e-2")
    if only:
        runs = {name: run for name, run in runs.items() if any(fnmatch.fnmatchcase(name, p) for p in only)}
        if not runs:
            raise ValueError(f"no ablation run of groups {list(groups)} matches {list(only)}")
    return runs


def _rms(tensors) -> Optional[float]:
    """Root mean square of the tints' starting values: the scale Adam's steps (about lr each) act on."""
    n = sum(t.numel() for t in tensors)
    return (sum(float(t.float().pow(2).sum()) for t in tensors) / n) ** 0.5 if n else None


def _tints(model) -> list[nn.Parameter]:
    return [p for p in model.trainable_parameters() if p is not model.lambdas]


def run_tta(ctx, tta: TTA, curve_every: int = 25, ta_lambda: Optional[float] = None) -> dict:
    """Train one TintedModel as `tta` says on ctx's tasks; returns the suite's result dict plus the
    curve, λ statistics and timings."""
    import neurokern.tint as tint

    if tta.loss not in LOSSES:
        raise ValueError(f"TTA.loss must be one of {LOSSES}; got {tta.loss!r}")
    unknown = [k for k in tta.tint if k not in ctx.tint_layers]
    if unknown:
        raise ValueError(f"unknown tint layer(s) {unknown}; the family has {list(ctx.tint_layers)}")
    prior = tta.prior
    if prior == "task_arithmetic":
        if ta_lambda is None:
            raise ValueError("prior='task_arithmetic' needs task arithmetic's λ (run it first)")
        prior = float(ta_lambda)
    device = ctx.device
    start = time.perf_counter()
    encoder = copy.deepcopy(ctx.encoder).eval()
    module = Classifier(encoder, nn.Linear(encoder.hidden_size, 1)).to(device).eval()
    base = {f"encoder.{k}": v for k, v in ctx.base.items()}
    fts = [{**{f"encoder.{k}": v for k, v in f.items()}, **{f"head.{k}": v.detach() for k, v in h.state_dict().items()}}
           for f, h in zip(ctx.finetuned, ctx.heads)]
    model = tint.TintedModel(module, base, fts, tint_layers=[ctx.tint_layers[k] for k in tta.tint], heads=["head"],
                             coefficients="layer", prior=min(1.0, prior), task_names=[t.name for t in ctx.tasks],
                             device=device)
    model.lambdas.requires_grad_(tta.train_lambda)
    inputs = [t.x["test"].to(device) for t in ctx.tasks]
    tints0 = [p.detach().clone() for p in _tints(model)]
    build_seconds = time.perf_counter() - start

    def evaluate(split: str, shares: Optional[dict] = None) -> dict:
        """Accuracy per task on `split`; shares, if given, gets each task's share of its most
        predicted class (a loss that collapses a task onto one class shows there)."""
        out = {}
        for i, t in enumerate(ctx.tasks):
            logits = predict(lambda x, i=i: model(x, task=i), t.x[split], device, ctx.eval_batch, tta.precision)
            out[t.name] = accuracy(logits, t.y[split])
            if shares is not None and len(logits):
                shares[t.name] = float(torch.bincount(logits.argmax(-1)).max()) / len(logits)
        return out

    curve_seconds = [0.0]

    def point(epoch: int) -> dict:
        t0 = time.perf_counter()
        with torch.no_grad():
            raw = model.lambdas.detach().float()
            per_task = raw.reshape(-1, raw.shape[-1])
            drift = None
            if tints0:
                moved = sum(float((p.detach() - p0).float().pow(2).sum()) for p, p0 in zip(_tints(model), tints0))
                drift = (moved / max(sum(float(p0.float().pow(2).sum()) for p0 in tints0), 1e-30)) ** 0.5
            shares: dict = {}
            out = {"val": evaluate("val"), "test": evaluate("test", shares), "test_top_class_share": shares,
                   "lambda_mean": per_task.clamp(0, 1).mean(0).tolist(),
                   "lambda_at_0": (per_task <= 0).float().mean(0).tolist(),
                   "lambda_at_1": (per_task >= 1).float().mean(0).tolist(),
                   "tint_drift": drift}
        curve_seconds[0] += time.perf_counter() - t0
        return out

    t_fit = time.perf_counter()
    with autocast(device, tta.precision):
        history = tint.fit(model, inputs, loss=tta.loss, steps=tta.steps, lr=tta.lr_tint, lr_lambda=tta.lr_lambda,
                           batch_size=tta.batch_size, seed=tta.seed, schedule=tta.schedule, progress=False,
                           callback=point, callback_every=curve_every)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    fit_seconds = time.perf_counter() - t_fit - curve_seconds[0]
    curve = history["callback"]
    losses = history["loss"]
    k = max(1, len(losses) // 10)
    for p in curve:  # the mean loss of the epochs since the previous point
        p["loss"] = None
    per_epoch = len(losses) // max(1, tta.steps)
    for a, b in zip(curve, curve[1:]):
        span = losses[a["epoch"] * per_epoch: b["epoch"] * per_epoch]
        b["loss"] = sum(span) / len(span) if span else None
    final = curve[-1]
    lam = model.coefficients_now()
    return {"status": "ok", "label": tta.label, "params": {**tta.settings(), "prior": prior},
            "val": final["val"], "test": final["test"], "curve": curve,
            "lambda_mean": float(lam.mean()), "lambda_per_task": final["lambda_mean"],
            "lambda_at_0": final["lambda_at_0"], "lambda_at_1": final["lambda_at_1"], "tint_drift": final["tint_drift"],
            "test_top_class_share": final["test_top_class_share"],
            "tint_rms": _rms(tints0),
            "fit_loss_first": sum(losses[:k]) / k if losses else None,
            "fit_loss_last": sum(losses[-k:]) / k if losses else None,
            "seconds": build_seconds + fit_seconds, "fit_seconds": fit_seconds, "curve_seconds": curve_seconds[0],
            "ms_per_step": 1000 * fit_seconds / max(1, len(losses))}


def guarded(ctx, name: str, tta: TTA, curve_every: int, ta_lambda: Optional[float]) -> dict:
    try:
        return run_tta(ctx, tta, curve_every, ta_lambda)
    except Exception as exc:  # one failing run must not lose the others' results
        return {"status": "error", "label": tta.label or name, "note": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-2000:]}


# --------------------------------------------------------------------------- worker processes
_WORKER: dict = {}


def _init_worker(load_context: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    _WORKER["ctx"] = load_context(*args)


def _work(name: str, tta: TTA, curve_every: int, ta_lambda: Optional[float]) -> tuple[str, dict]:
    return name, guarded(_WORKER["ctx"], name, tta, curve_every, ta_lambda)


def run_many(runs: dict[str, TTA], ctx, load_context: Callable, load_args: tuple, workers: int,
             curve_every: int, ta_lambda: Optional[float], done: Callable[[str, dict], None]) -> None:
    """Run every TTA of `runs`; done(name, result) is called as each finishes. workers <= 1: in
    this process on ctx; otherwise in that many spawned processes, each building its own context
    with load_context(*load_args)."""
    if workers <= 1 or len(runs) <= 1:
        for name, tta in runs.items():
            done(name, guarded(ctx, name, tta, curve_every, ta_lambda))
        return
    import concurrent.futures as cf
    import multiprocessing

    pool = cf.ProcessPoolExecutor(min(workers, len(runs)), mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_init_worker, initargs=(load_context, load_args))
    with pool:
        futures = [pool.submit(_work, name, tta, curve_every, ta_lambda) for name, tta in runs.items()]
        for future in cf.as_completed(futures):
            done(*future.result())


def default_workers(device: torch.device) -> int:
    """On a GPU, one process per two host cores (at most 12); on a CPU, one."""
    return max(1, min(12, (os.cpu_count() or 2) // 2)) if device.type == "cuda" else 1
