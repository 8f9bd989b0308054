"""The accuracy suite in one go: tokenize the cached tasks, fine-tune one encoder per task, merge
with every method, evaluate, and write accuracy.json / accuracy.md / accuracy.png."""
from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from neurokern.accuracy import data as data_mod
from neurokern.accuracy.finetune import Recipe, Task, finetune
from neurokern.accuracy.methods import LAMBDA_GRID, METHODS, Context, TTAConfig, run_method
from neurokern.accuracy.model import encoder_state, load_encoder, load_tokenizer, save_encoder, tokenize

DEFAULT_METHODS = tuple(METHODS)


def load_tasks(data_dir, names: Optional[Sequence[str]], tokenizer, max_len: int,
               max_train: Optional[int] = None) -> tuple[list[Task], dict]:
    sources = json.loads((Path(data_dir) / "sources.json").read_text(encoding="utf-8"))
    names = list(names or sources["tasks"])
    unknown = [n for n in names if n not in sources["tasks"]]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; the cache at {data_dir} has {list(sources['tasks'])}")
    tasks = []
    for name in names:
        raw = data_mod.load_task(data_dir, name)
        ids, y = {}, {}
        for split in ("train", "val", "test"):
            texts, labels = raw[split]
            if split == "train" and max_train is not None:
                texts, labels = texts[:max_train], labels[:max_train]
            ids[split] = tokenize(tokenizer, texts, max_len)
            y[split] = torch.tensor(labels, dtype=torch.long)
        tasks.append(Task(name, raw["labels"], ids, y))
    return tasks, sources


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
    # name: (suite method used for the label, nk method, params); each with λ searched on validation
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


def investigate(ctx: Context, log, deadline: Optional[float] = None) -> dict:
    """Why the ordering may differ from the papers: density, trim scope and number of tasks."""
    from neurokern.accuracy.methods import _static

    out = {"variants": {}, "task_count": {}}
    for name, (method, params) in INVESTIGATIONS.items():
        if deadline and time.perf_counter() > deadline:
            ctx.notes.append("investigation cut short: time budget spent")
            return out
        res = run_method_fn(_static(method, params, search=True), ctx)
        out["variants"][name] = res
        log(f"  investigate {name}: test avg {_avg(res.get('test')):.4f} (λ={res.get('params', {}).get('scale')})")
    T = len(ctx.tasks)
    counts = sorted({k for k in (2, 4, T // 2 + T % 2, T) if 2 <= k <= T})
    for k in counts:
        if deadline and time.perf_counter() > deadline:
            ctx.notes.append("investigation cut short: time budget spent")
            return out
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


def run_suite(data_dir, model_dir, out_dir, tasks: Optional[Sequence[str]] = None,
              methods: Optional[Sequence[str]] = None, device: str = "cuda", recipe: Recipe = Recipe(),
              tta: TTAConfig = TTAConfig(), lambda_grid: Sequence[float] = LAMBDA_GRID,
              max_train: Optional[int] = None, ckpt_dir=None, do_investigate: bool = False,
              eval_batch: int = 256, plot: bool = True, verbose: bool = True,
              time_budget: Optional[float] = None) -> dict:
    """Run the suite; with time_budget (seconds from the start), methods that would start after it
    are reported as skipped and the investigation is left out. The report is rewritten after every
    method, so a run cut short still leaves accuracy.json / accuracy.md."""
    t0 = time.perf_counter()
    log = print if verbose else (lambda *a, **k: None)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    methods = list(methods or DEFAULT_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    tokenizer = load_tokenizer(model_dir)
    task_list, sources = load_tasks(data_dir, tasks, tokenizer, recipe.max_len, max_train)
    log(f"{len(task_list)} tasks tokenized in {time.perf_counter() - t0:.1f} s: "
        + ", ".join(f"{t.name} ({len(t.ids['train'])}/{len(t.ids['val'])}/{len(t.ids['test'])})" for t in task_list))
    base_encoder = load_encoder(model_dir).to(dev).eval()
    base = encoder_state(base_encoder)

    finetuned, heads, ft_logs = [], [], {}
    t_ft = time.perf_counter()
    for i, task in enumerate(task_list):
        res = finetune(base_encoder, task, recipe, recipe.seed + i, dev)
        finetuned.append(encoder_state(res["encoder"]))
        heads.append(res["head"])
        ft_logs[task.name] = res["log"]
        if ckpt_dir:
            save_encoder(res["encoder"], Path(ckpt_dir) / task.name, tokenizer_dir=model_dir)
            torch.save(res["head"].state_dict(), Path(ckpt_dir) / task.name / "head.pt")
        log(f"fine-tuned {task.name}: {res['log']['steps']} steps in {res['log']['train_seconds']:.1f} s, "
            f"loss {res['log']['loss_first']:.3f} -> {res['log']['loss_last']:.3f}")
        del res
    finetune_seconds = time.perf_counter() - t_ft

    ctx = Context(task_list, base, finetuned, heads, base_encoder, dev, lambda_grid=tuple(lambda_grid), tta=tta,
                  eval_batch=eval_batch)
    deadline = t0 + time_budget if time_budget else None
    ctx.deadline = deadline
    ctx.reserve = 60.0 if do_investigate else 10.0
    ctx.tta_left = sum(m in ("adamerging", "tinting", "tinting_conf") for m in methods)
    from neurokern.accuracy.report import write_report

    report = {
        "suite": "neurokern accuracy",
        "model": str(model_dir),
        "environment": _environment(dev),
        "recipe": recipe.asdict(),
        "tta": dataclasses.asdict(tta),
        "lambda_grid": list(lambda_grid),
        "max_train": max_train,
        "time_budget": time_budget,
        "tasks": {t.name: {"labels": t.labels, "sizes": {s: len(t.ids[s]) for s in t.ids},
                           **{k: v for k, v in sources["tasks"].get(t.name, {}).items()
                              if k in ("package", "version", "licence", "what", "majority_baseline",
                                       "best_single_token_rule", "naive_bayes_bow_test_accuracy")}}
                  for t in task_list},
        "finetune": ft_logs,
        "finetune_seconds": finetune_seconds,
        "methods": {},
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
    for name in methods:
        if deadline and time.perf_counter() > deadline:
            res = {"status": "skipped", "note": f"time budget of {time_budget:.0f} s spent", "label": name}
        else:
            res = run_method(name, ctx)
        report["methods"][name] = res
        if res["status"] == "ok":
            log(f"{name:26s} test avg {_avg(res['test']):.4f}  {res['seconds']:7.2f} s  "
                + " ".join(f"{k}={v}" for k, v in res.get("params", {}).items() if k in ("scale", "scale_parallel")))
        else:
            log(f"{name:26s} {res['status']}: {res.get('note', '')}")
        save()
    if do_investigate:
        if deadline and time.perf_counter() > deadline:
            ctx.notes.append("investigation skipped: time budget spent")
        else:
            report["investigation"] = investigate(ctx, log, deadline)
    paths = save(final=True)
    log("wrote " + ", ".join(str(p) for p in paths) + f" (total {report['total_seconds']:.1f} s)")
    return report
