"""The accuracy suite in one go: load a family's tasks, fine-tune one encoder per task (or reuse
the checkpoints of an earlier run with the same recipe and data), merge with every method,
evaluate, run the test-time methods and their ablations, and write accuracy.json / accuracy.md /
accuracy.png (plus the learning curves, accuracy-curves.png)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from bench.accuracy import families
from bench.accuracy.finetune import Recipe, finetune
from bench.accuracy.methods import LAMBDA_GRID, METHODS, Context, _static, run_method
from bench.accuracy.model import encoder_state
from bench.accuracy.tta import METHODS as TTA_METHODS
from bench.accuracy.tta import TTA, ablations, default_workers, run_many

DEFAULT_METHODS = tuple(METHODS) + tuple(TTA_METHODS)


def _environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        pass
    return env


def _subset(ctx: Context, idx: Sequence[int]) -> Context:
    return dataclasses.replace(ctx, tasks=[ctx.tasks[i] for i in idx], finetuned=[ctx.finetuned[i] for i in idx],
                               heads=[ctx.heads[i] for i in idx], notes=ctx.notes, _cpu=None)


INVESTIGATIONS = {
    # name: (nk method, params); each with λ searched on validation
    "ties_density_0.1": ("ties", {"density": 0.1}),
    "ties_density_0.5": ("ties", {"density": 0.5}),
    "ties_global_trim": ("ties", {"density": 0.2, "trim_scope": "global"}),
    "neuromerging_density_0.05": ("neuromerging", {"density": 0.05}),
    "neuromerging_density_0.2": ("neuromerging", {"density": 0.2}),
    "neuromerging_density_0.5": ("neuromerging", {"density": 0.5}),
    "neuromerging_tensor_trim": ("neuromerging", {"density": 0.1, "trim_scope": "tensor"}),
}
TASK_COUNT_METHODS = {
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {"density": 0.2}),
    "neuromerging_lite": ("neuromerging", {"density": 0.1}),
}


def investigate(ctx: Context, log) -> dict:
    """Why the ordering may differ from the papers: density, trim scope and number of tasks."""
    out = {"variants": {}, "task_count": {}}
    for name, (method, params) in INVESTIGATIONS.items():
        res = run_method_fn(_static(method, params, search=True), ctx)
        out["variants"][name] = res
        log(f"  investigate {name}: test avg {_avg(res.get('test')):.4f} (λ={res.get('params', {}).get('scale')})")
    T = len(ctx.tasks)
    for k in sorted({k for k in (2, 4, T // 2 + T % 2, T) if 2 <= k <= T}):
        sub = _subset(ctx, range(k))
        row = {"tasks": [t.name for t in sub.tasks]}
        for name, (method, params) in TASK_COUNT_METHODS.items():
            res = run_method_fn(_static(method, params, search=True), sub)
            row[name] = {"test_avg": _avg(res.get("test")), "scale": res.get("params", {}).get("scale"),
                         "test": res.get("test")}
        out["task_count"][str(k)] = row
        log(f"  investigate {k} tasks: " + ", ".join(f"{m} {row[m]['test_avg']:.4f}" for m in TASK_COUNT_METHODS))
    return out


def run_method_fn(fn, ctx: Context) -> dict:
    try:
        res = fn(ctx)
        res.setdefault("status", "ok")
    except Exception as exc:
        res = {"status": "error", "note": f"{type(exc).__name__}: {exc}"}
    return res


def _avg(d) -> float:
    return sum(d.values()) / len(d) if d else float("nan")


def _fingerprint(family, cache, tasks, recipe: Recipe, device: torch.device) -> dict:
    """What the fine-tuned checkpoints depend on: reused only when all of it matches."""
    digest = hashlib.sha256()
    for t in tasks:
        for split in ("train", "val", "test"):
            digest.update(t.x[split].numpy().tobytes())
            digest.update(t.y[split].numpy().tobytes())
    return {"family": family.NAME, "cache": str(Path(cache).resolve()), "tasks": [t.name for t in tasks],
            "recipe": recipe.asdict(), "device": device.type, "data_sha256": digest.hexdigest()}


def finetune_all(family, cache, tasks, base_encoder, recipe: Recipe, device: torch.device, ckpt_dir, log) -> tuple:
    """One fine-tuned encoder state and head per task (and their logs), from ckpt_dir when an
    earlier run with the same fingerprint left them there; otherwise trained and saved there."""
    fingerprint = _fingerprint(family, cache, tasks, recipe, device)
    manifest = Path(ckpt_dir) / "manifest.json" if ckpt_dir else None
    if manifest is not None and manifest.exists() and json.loads(manifest.read_text()) == fingerprint:
        log(f"fine-tuned encoders reused from {ckpt_dir}")
        return _load_finetuned(ckpt_dir, tasks, base_encoder, device) + (True,)
    finetuned, heads, logs = [], [], {}
    for i, task in enumerate(tasks):
        res = finetune(base_encoder, task, recipe, recipe.seed + i, device)
        finetuned.append(encoder_state(res["encoder"]))
        heads.append(res["head"])
        logs[task.name] = res["log"]
        log(f"fine-tuned {task.name}: {res['log']['steps']} steps in {res['log']['train_seconds']:.1f} s, "
            f"loss {res['log']['loss_first']:.3f} -> {res['log']['loss_last']:.3f}")
        del res
    if manifest is not None:
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        manifest.unlink(missing_ok=True)
        for task, state, head in zip(tasks, finetuned, heads):
            torch.save({"encoder": {k: v.cpu() for k, v in state.items()}, "head": head.state_dict(),
                        "log": logs[task.name]}, Path(ckpt_dir) / f"{task.name}.pt")
        manifest.write_text(json.dumps(fingerprint))
    return finetuned, heads, logs, False


def _load_finetuned(ckpt_dir, tasks, base_encoder, device) -> tuple:
    from bench.accuracy.model import new_head

    finetuned, heads, logs = [], [], {}
    for task in tasks:
        saved = torch.load(Path(ckpt_dir) / f"{task.name}.pt", map_location=device, weights_only=True)
        finetuned.append(saved["encoder"])
        head = new_head(base_encoder.hidden_size, task.num_labels, 0).to(device)
        head.load_state_dict(saved["head"])
        heads.append(head.eval())
        logs[task.name] = saved["log"]
    return finetuned, heads, logs


def load_context(family_name: str, cache, task_names, ckpt_dir, device: str, eval_batch: int) -> Context:
    """A Context from the checkpoints run_suite wrote (what a worker process starts from)."""
    family = families.load(family_name)
    dev = torch.device(device)
    tasks = family.load_tasks(cache, task_names)
    base_encoder = family.load_encoder(cache).to(dev).eval()
    finetuned, heads, _ = _load_finetuned(ckpt_dir, tasks, base_encoder, dev)
    return Context(tasks, encoder_state(base_encoder), finetuned, heads, base_encoder, dev,
                   tint_layers=family.tint_layers(base_encoder), eval_batch=eval_batch)


def run_suite(family_name: str, cache, out_dir, tasks: Optional[Sequence[str]] = None,
              methods: Optional[Sequence[str]] = None, device: str = "cuda", recipe: Optional[Recipe] = None,
              tta: Optional[dict] = None, grid: Sequence[str] = (), workers: Optional[int] = None, curve_every: int = 25,
              lambda_grid: Sequence[float] = LAMBDA_GRID, max_train: Optional[int] = None, ckpt_dir=None,
              do_investigate: bool = False, eval_batch: int = 256, plot: bool = True, verbose: bool = True,
              only: Sequence[str] = ()) -> dict:
    """Run the suite. tta: the test-time methods' settings (name -> TTA; default tta.METHODS);
    grid: ablation groups (tta.GRID) to run around the "tinting" and "adamerging" settings; only: patterns
    over the ablation runs' names, keeping the matching ones (tta.ablations). The report is rewritten after every
    method, so a run cut short still leaves accuracy.json / accuracy.md."""
    t0 = time.perf_counter()
    log = print if verbose else (lambda *a, **k: None)
    family = families.load(family_name)
    recipe = recipe or family.RECIPE
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    tta = {**TTA_METHODS, **(tta or {})}
    methods = list(methods or (tuple(METHODS) + tuple(tta)))
    unknown = [m for m in methods if m not in METHODS and m not in tta]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS) + list(tta)}")
    task_list = family.load_tasks(cache, tasks)
    if max_train is not None:
        for t in task_list:
            t.x["train"], t.y["train"] = t.x["train"][:max_train], t.y["train"][:max_train]
    log(f"{len(task_list)} tasks loaded in {time.perf_counter() - t0:.1f} s: "
        + ", ".join(f"{t.name} ({len(t.y['train'])}/{len(t.y['val'])}/{len(t.y['test'])})" for t in task_list))
    base_encoder = family.load_encoder(cache).to(dev).eval()
    base = encoder_state(base_encoder)

    t_ft = time.perf_counter()
    if workers is None:
        workers = default_workers(dev)
    if workers > 1 and ckpt_dir is None:
        raise SystemExit("worker processes load the fine-tuned encoders from --ckpt-dir; give one")
    finetuned, heads, ft_logs, reused = finetune_all(family, cache, task_list, base_encoder, recipe, dev, ckpt_dir, log)
    finetune_seconds = time.perf_counter() - t_ft

    ctx = Context(task_list, base, finetuned, heads, base_encoder, dev, tint_layers=family.tint_layers(base_encoder),
                  lambda_grid=tuple(lambda_grid), eval_batch=eval_batch)
    from bench.accuracy.report import write_report

    sources, _ = families.task_sources(cache, [t.name for t in task_list])
    report = {
        "suite": "neurokern accuracy",
        "family": family.NAME,
        "family_description": family.DESCRIPTION,
        "cache": str(cache),
        "environment": _environment(dev),
        "recipe": recipe.asdict(),
        "tta": {n: {"label": t.label, **t.settings()} for n, t in tta.items()},
        "curve_every": curve_every,
        "lambda_grid": list(lambda_grid),
        "max_train": max_train,
        "tasks": {t.name: {"labels": t.labels, "sizes": {s: len(t.y[s]) for s in t.y},
                           **{k: v for k, v in sources.get(t.name, {}).items()
                              if k in ("package", "version", "licence", "what", "majority_baseline",
                                       "best_single_token_rule") or k.endswith("_test_accuracy")}}
                  for t in task_list},
        "finetune": ft_logs,
        "finetune_seconds": finetune_seconds,
        "finetune_reused": reused,
        "methods": {},
        "ablations": {},
        "investigation": None,
        "notes": ctx.notes,
    }

    def save(final: bool = False) -> list:
        report["total_seconds"] = time.perf_counter() - t0
        return write_report(report, out_dir, plot=plot and final)

    # Triton kernels compile on their first call: one untimed merge per method first.
    t_w = time.perf_counter()
    for method, params in (("task_arithmetic", {}), ("ties", {"density": 0.2}), ("dare_ties", {"density": 0.3}),
                           ("neuromerging", {"density": 0.1}), ("neuromerging", {"density": 0.1, "scale_parallel": 1.0})):
        try:
            ctx.merge(method, **params)
        except Exception as exc:
            ctx.notes.append(f"warm-up merge {method} failed: {type(exc).__name__}: {exc}")
    report["warmup_seconds"] = time.perf_counter() - t_w
    save()
    for name in (m for m in methods if m in METHODS):
        res = run_method(name, ctx)
        report["methods"][name] = res
        if res["status"] == "ok":
            log(f"{name:26s} test avg {_avg(res['test']):.4f}  {res['seconds']:7.2f} s  "
                + " ".join(f"{k}={v}" for k, v in res.get("params", {}).items() if k in ("scale", "scale_parallel")))
        else:
            log(f"{name:26s} {res['status']}: {res.get('note', '')}")
        save()

    ta = report["methods"].get("task_arithmetic", {})
    ta_lambda = ta.get("params", {}).get("scale") if ta.get("status") == "ok" else None
    runs: dict[str, TTA] = {n: tta[n] for n in methods if n in tta}
    grid_runs = ablations(ctx.tint_layers, tta["tinting"], tta["adamerging"], grid, only) if grid else {}
    where = {**{n: "methods" for n in runs}, **{n: "ablations" for n in grid_runs}}
    t_tta = time.perf_counter()

    order = list(where)

    def done(name: str, res: dict) -> None:
        res["order"] = order.index(name)
        report[where[name]][name] = res
        if res["status"] == "ok":
            log(f"{name:26s} test avg {_avg(res['test']):.4f}  {res['fit_seconds']:7.1f} s fit "
                f"({res['ms_per_step']:.1f} ms/step)  λ mean {res['lambda_mean']:.3f}")
        else:
            log(f"{name:26s} {res['status']}: {res.get('note', '')}")
        save()

    load_args = (family.NAME, str(cache), [t.name for t in task_list], str(ckpt_dir) if ckpt_dir else None,
                 str(dev), eval_batch)
    run_many({**runs, **grid_runs}, ctx, load_context, load_args, workers, curve_every, ta_lambda, done)
    report["tta_seconds"] = time.perf_counter() - t_tta
    report["tta_workers"] = workers
    if do_investigate:
        report["investigation"] = investigate(ctx, log)
    paths = save(final=True)
    log("wrote " + ", ".join(str(p) for p in paths) + f" (total {report['total_seconds']:.1f} s)")
    return report
