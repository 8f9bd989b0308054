"""accuracy.json, accuracy.md, accuracy.png (mean accuracy per method) and accuracy-curves.png
(the test-time runs' learning curves) from the suite's results. Plots need matplotlib; without
it they are left out and the markdown says so."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from bench.accuracy.methods import METHODS, REFERENCES
from bench.accuracy.tta import METHODS as TTA_METHODS

# The papers' orderings checked here: (better, worse, claim) by mean test accuracy; a margin in
# points makes "better" mean "at most that far below" (Tinting within 2 points of fine-tuned).
ORDERINGS = (
    ("neuromerging_lite", "ties", "NeuroMerging (λ on val) > TIES (λ on val)", 0.0),
    ("ties", "task_arithmetic", "TIES > task arithmetic", 0.0),
    ("neuromerging_lite", "task_arithmetic", "NeuroMerging (λ on val) > task arithmetic", 0.0),
    ("neuromerging_lite_default", "ties", "NeuroMerging (default λ) > TIES (λ on val)", 0.0),
    ("adamerging", "task_arithmetic", "AdaMerging > task arithmetic (λ on val)", 0.0),
    ("tinting", "adamerging", "Tinting > AdaMerging", 0.0),
    ("tinting_conf", "adamerging", "Tinting++ > AdaMerging", 0.0),
    ("tinting", "finetuned", "Tinting within 2 points of the individual fine-tuned models", -0.02),
    ("tinting_conf", "finetuned", "Tinting++ within 2 points of the individual fine-tuned models", -0.02),
)
ORDER = tuple(METHODS) + tuple(TTA_METHODS)


def _avg(d: Optional[dict]) -> float:
    return sum(d.values()) / len(d) if d else float("nan")


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def summarise(report: dict) -> dict:
    """Per method: mean test accuracy and normalised accuracy (merged / fine-tuned, per task, averaged)."""
    methods = report["methods"]
    ft = methods.get("finetuned", {}).get("test")
    out = {}
    for name, res in methods.items():
        if res.get("status") != "ok":
            continue
        test = res["test"]
        norm = None
        if ft:
            norm = sum(test[t] / ft[t] for t in test if ft.get(t)) / max(1, len(test))
        out[name] = {"avg": _avg(test), "normalized": norm, "val_avg": _avg(res.get("val"))}
    return out


def orderings(summary: dict) -> list:
    rows = []
    for better, worse, text, slack in ORDERINGS:
        if better in summary and worse in summary:
            a, b = summary[better]["avg"], summary[worse]["avg"]
            rows.append({"claim": text, "better": better, "worse": worse, "better_avg": a, "worse_avg": b,
                         "holds": a - b > slack if slack == 0 else a - b >= slack, "margin": a - b})
    return rows


def _baselines(task: dict) -> str:
    """The task's cheap baselines on test besides the majority class (text: the best single-token
    rule and naive Bayes; images: nearest centroid and 1-NN on pixels)."""
    out = []
    rule = task.get("best_single_token_rule")
    if rule:
        out.append(f"token rule (`{rule.get('token')}`) {_pct(rule.get('test_accuracy'))}")
    for key, value in task.items():
        if key.endswith("_test_accuracy"):
            out.append(f"{key[: -len('_test_accuracy')].replace('_', ' ')} {_pct(value)}")
    return "; ".join(out) or "—"


def _ordered(methods: dict) -> dict:
    return {n: methods[n] for n in sorted(methods, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))}


def markdown(report: dict, summary: dict, checks: list) -> str:
    tasks = list(report["tasks"])
    methods = _ordered(report["methods"])
    env = report["environment"]
    reused = " (reused from an earlier run's checkpoints)" if report.get("finetune_reused") else ""
    lines = [
        f"# Accuracy suite: {report['family']}",
        "",
        f"Device: {env.get('gpu', env.get('device'))}; torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}; commit {str(env.get('git_commit'))[:12]}. Total wall time "
        f"{report['total_seconds']:.0f} s (fine-tuning {report['finetune_seconds']:.0f} s{reused}; test-time "
        f"runs {report.get('tta_seconds', 0):.0f} s in {report.get('tta_workers', 1)} processes).",
        "",
        f"Model: {report['family_description']}. One pre-trained encoder, one fully fine-tuned copy per task, "
        "each with its own linear head; heads are never merged (each task keeps its fine-tuned head, as in "
        "the papers). Accuracy in %, test splits.",
        "",
        "Fine-tuning recipe (all tasks): " + ", ".join(f"{k}={v}" for k, v in report["recipe"].items())
        + "; seed of task i = seed + i.",
        "",
        "## Tasks",
        "",
        "| task | what | classes | train / val / test | majority | other baselines | fine-tuned |",
        "|---|---|---|---|---|---|---|",
    ]
    ft = methods.get("finetuned", {}).get("test", {})
    for name, t in report["tasks"].items():
        maj = (t.get("majority_baseline") or {}).get("test_accuracy")
        lines.append(f"| {name} | {t.get('what', '')} | {len(t['labels'])} | {t['sizes']['train']} / "
                     f"{t['sizes']['val']} / {t['sizes']['test']} | {_pct(maj)} | {_baselines(t)} | "
                     f"{_pct(ft.get(name))} |")
    lines += ["", "Sources and licences:", ""]
    for name, t in report["tasks"].items():
        lines.append(f"- **{name}**: {t.get('package', '?')} {t.get('version', '')} — {t.get('licence', '?')}")

    short = {t: t.replace("_", " ") for t in tasks}
    lines += ["", "## Results", "",
              "| method | " + " | ".join(short[t] for t in tasks) + " | avg | normalised | seconds | merge s | λ / params |",
              "|---|" + "---|" * len(tasks) + "---|---|---|---|---|"]
    for name, res in methods.items():
        label = res.get("label", name)
        if res.get("status") != "ok":
            lines.append(f"| {label} | " + " | ".join("—" for _ in tasks) + f" | {res.get('status')} | | | | "
                         f"{res.get('note', '')[:120]} |")
            continue
        p = res.get("params", {})
        shown = {k: p[k] for k in ("scale", "scale_parallel", "density", "steps", "lr_lambda", "lr_tint")
                 if k in p and p[k] is not None}
        ptxt = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        s = summary[name]
        bold = name not in REFERENCES
        avg = f"**{_pct(s['avg'])}**" if bold else _pct(s["avg"])
        lines.append(f"| {label} | " + " | ".join(_pct(res["test"].get(t)) for t in tasks)
                     + f" | {avg} | {_pct(s['normalized'])} | {res.get('seconds', 0):.1f} | "
                     + (f"{res['merge_seconds']:.2f}" if "merge_seconds" in res else "") + f" | {ptxt} |")
    lines += ["", "Seconds: the method's wall time on the device: one nk.merge plus, where λ is searched, the "
              "validation evaluations of the search; for AdaMerging and Tinting the test-time training "
              "(building the TintedModel included, the learning curve's evaluations not), run side by side with "
              "the other test-time runs. merge s: one nk.merge call (kernels compiled beforehand). "
              "Normalised: merged / fine-tuned accuracy per task, averaged."]

    lines += ["", "## Do the papers' orderings hold here?", ""]
    for c in checks:
        lines.append(f"- {c['claim']}: {_pct(c['better_avg'])} vs {_pct(c['worse_avg'])} → "
                     f"**{'holds' if c['holds'] else 'does not hold'}** ({100 * c['margin']:+.1f} points)")
    if not checks:
        lines.append("- (not enough methods ran to check)")

    searched = [(n, r) for n, r in methods.items() if r.get("search")]
    if searched:
        lines += ["", "## λ searches (mean validation accuracy)", ""]
        for name, res in searched:
            pts = ", ".join(f"{c['lambda']:g}" + (f"/λ1={c['lambda_parallel']:g}" if "lambda_parallel" in c else "")
                            + f": {_pct(c['val_avg'])}" for c in res["search"])
            lines.append(f"- {res.get('label', name)}: {pts}")

    inv = report.get("investigation")
    if inv:
        lines += ["", "## Investigation: density, trim scope, number of tasks", "",
                  "| variant | avg | normalised | λ |", "|---|---|---|---|"]
        ftd = methods.get("finetuned", {}).get("test", {})
        for name, res in inv["variants"].items():
            if res.get("status") != "ok":
                lines.append(f"| {name} | {res.get('status')} | | {res.get('note', '')[:80]} |")
                continue
            norm = sum(res["test"][t] / ftd[t] for t in res["test"] if ftd.get(t)) / len(res["test"]) if ftd else None
            lines.append(f"| {name} | {_pct(_avg(res['test']))} | {_pct(norm)} | {res['params'].get('scale')} |")
        if inv.get("task_count"):
            names = [k for k in next(iter(inv["task_count"].values())) if k != "tasks"]
            lines += ["", "Merging the first k tasks only (mean test accuracy over those k; λ searched each time):", "",
                      "| k | " + " | ".join(names) + " | fine-tuned |", "|---|" + "---|" * (len(names) + 1)]
            for k, row in inv["task_count"].items():
                ftk = _avg({t: ftd[t] for t in row["tasks"] if t in ftd}) if ftd else None
                lines.append(f"| {k} | " + " | ".join(f"{_pct(row[n]['test_avg'])} (λ={row[n]['scale']})" for n in names)
                             + f" | {_pct(ftk)} |")

    tt = {n: r for n, r in methods.items() if n in report.get("tta", {}) and r.get("status") == "ok"}
    if tt:
        lines += ["", "## Test-time runs", "",
                  "Settings: " + "; ".join(f"{r.get('label', n)}: " + ", ".join(
                      f"{k}={v}" for k, v in report["tta"][n].items() if k != "label") for n, r in tt.items()), ""]
        lines += _tta_table(tt, tasks)
    ablations = dict(sorted(report.get("ablations", {}).items(), key=lambda kv: kv[1].get("order", 0)))
    if ablations:
        lines += ["", "## Ablations (every row a full run)", "",
                  "Rows differ from the Tinting row above only in what they name. Tinting++ (confidence filter) "
                  "beside each Tinting row. Steps: test accuracy after 50 and 200 epochs of the same run "
                  "(Adam with a constant learning rate: a shorter run is the same run stopped earlier).", ""]
        lines += _tta_table(ablations, tasks)
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines.append("")
    return "\n".join(lines)




def _at(curve: list, epoch: int) -> Optional[float]:
    for p in curve:
        if p["epoch"] == epoch:
            return _avg(p["test"])
    return None


def _tta_table(runs: dict, tasks: list) -> list:
    lines = ["| run | avg test | @50 | @200 | λ mean | λ at 0 / 1 | tint moved | ms / step | " +
             " | ".join(t.replace("_", " ") for t in tasks) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(tasks)]
    for name, r in runs.items():
        if r.get("status") != "ok":
            lines.append(f"| {r.get('label', name)} | {r.get('status')}: {r.get('note', '')[:100]} |")
            continue
        curve = r.get("curve", [])
        at0 = sum(r["lambda_at_0"]) / len(r["lambda_at_0"])
        at1 = sum(r["lambda_at_1"]) / len(r["lambda_at_1"])
        drift = "—" if r.get("tint_drift") is None else f"{r['tint_drift']:.3f}"
        lines.append(f"| {r.get('label', name)} | **{_pct(_avg(r['test']))}** | {_pct(_at(curve, 50))} | "
                     f"{_pct(_at(curve, 200))} | {r['lambda_mean']:.3f} | {100 * at0:.0f}% / {100 * at1:.0f}% | "
                     f"{drift} | {r['ms_per_step']:.1f} | " + " | ".join(_pct(r["test"].get(t)) for t in tasks) + " |")
    return lines


# --------------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_png(report: dict, summary: dict, path: Path) -> None:
    """Mean test accuracy per method (bars) and per task (grouped bars)."""
    plt = _pyplot()
    names = [n for n in _ordered(report["methods"]) if n in summary]
    tasks = list(report["tasks"])
    ft = summary.get("finetuned", {}).get("avg")
    fig, axes = plt.subplots(1, 2, figsize=(17, 0.45 * len(names) + 2.5), gridspec_kw={"width_ratios": [1, 1.6]})
    ax = axes[0]
    labels = [report["methods"][n].get("label", n) for n in names][::-1]
    values = [100 * summary[n]["avg"] for n in names][::-1]
    ax.barh(labels, values, color=["#888888" if n in REFERENCES else "#3a6ea5" for n in names][::-1])
    for i, v in enumerate(values):
        ax.text(v + 0.5, i, f"{v:.1f}", va="center", fontsize=8)
    if ft:
        ax.axvline(100 * ft, color="k", ls="--", lw=1)
    ax.set_xlabel("mean test accuracy (%)")
    ax.set_xlim(0, 105)
    ax = axes[1]
    width = 0.8 / max(1, len(names))
    for j, n in enumerate(names):
        test = report["methods"][n]["test"]
        ax.bar([i + j * width for i in range(len(tasks))], [100 * test[t] for t in tasks], width,
               label=report["methods"][n].get("label", n))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=20, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"Merging fine-tuned encoders ({report['family']}): " + str(report["environment"].get("gpu", "")))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(report: dict, path: Path) -> bool:
    """Validation accuracy, mean λ and the tints' relative change against epochs, for every test-time
    run that recorded a curve; references as horizontal lines. False when there is nothing to draw."""
    runs = {**{n: r for n, r in _ordered(report["methods"]).items() if r.get("curve")},
            **{n: r for n, r in report.get("ablations", {}).items() if r.get("curve")}}
    runs = {n: r for n, r in runs.items() if r.get("status") == "ok"}
    if not runs:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(20, 7))
    for i, (name, r) in enumerate(runs.items()):
        style = "-" if name in report["methods"] else ":"
        epochs = [p["epoch"] for p in r["curve"]]
        color = plt.cm.tab20(i % 20)
        axes[0].plot(epochs, [100 * _avg(p["val"]) for p in r["curve"]], style, color=color, label=r.get("label", name))
        axes[1].plot(epochs, [sum(p["lambda_mean"]) / len(p["lambda_mean"]) for p in r["curve"]], style, color=color)
        if r["curve"][-1].get("tint_drift") is not None:
            axes[2].plot(epochs, [p["tint_drift"] for p in r["curve"]], style, color=color)
    for ref, ls in (("finetuned", "--"), ("task_arithmetic", "-."), ("pretrained", ":")):
        res = report["methods"].get(ref)
        if res and res.get("status") == "ok":
            axes[0].axhline(100 * _avg(res["val"]), color="k", ls=ls, lw=1, label=res.get("label", ref))
    axes[0].set(xlabel="epoch", ylabel="mean validation accuracy (%)", title="accuracy")
    axes[1].set(xlabel="epoch", ylabel="mean λ (clamped)", title="λ")
    axes[2].set(xlabel="epoch", ylabel="‖tint − tint₀‖ / ‖tint₀‖", title="how far the tints moved")
    axes[2].set_yscale("log")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7)
    fig.suptitle(f"Test-time runs ({report['family']}), {report['environment'].get('gpu', '')}")
    fig.tight_layout(rect=(0, 0.16 if len(runs) > 8 else 0.1, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(report: dict, out_dir, plot: bool = True, stem: str = "accuracy") -> list:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(report)
    checks = orderings(summary)
    report = {**report, "summary": summary, "orderings": checks}
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    if plot and summary:
        if _pyplot() is None:
            report["notes"] = list(report.get("notes", [])) + ["plots left out: matplotlib is not installed"]
        else:
            plot_png(report, summary, out / f"{stem}.png")
            paths.append(out / f"{stem}.png")
            if plot_curves(report, out / f"{stem}-curves.png"):
                paths.append(out / f"{stem}-curves.png")
    _replace(paths[0], json.dumps(report, indent=1, ensure_ascii=False, default=str))
    _replace(paths[1], markdown(report, summary, checks))
    return paths


def _replace(path: Path, text: str) -> None:
    """Write by rename: a run stopped mid-write leaves the previous report whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
