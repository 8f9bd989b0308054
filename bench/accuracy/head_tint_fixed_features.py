#!/usr/bin/env python3
"""A head tint alone on the task-arithmetic encoder, at several learning rates (suspect 5 of
bench/results/tinting-diagnosis.md).

With λ frozen the merged encoder's features of each task's test inputs do not change, so they are
computed once; each task's head tint (starting at its fine-tuned head) is then trained as
nk.tint.fit trains it with λ frozen: Adam, 500 steps of 32 test rows against the pseudo-labels of
the task's fine-tuned model, with and without the confidence filter. Float32, CPU or GPU.

    python -m bench.accuracy.head_tint_fixed_features --ckpt-dir CKPT [--lambda 0.2] [--out FILE]

CKPT: a --ckpt-dir of the accuracy suite (the fine-tuned encoders and heads of the text family).
"""
import argparse
import json

import torch
import torch.nn.functional as F

from bench.accuracy.finetune import accuracy, predict
from bench.accuracy.model import Classifier
from bench.accuracy.run import load_context
from neurokern.tint.losses import pseudo, pseudo_conf

STEPS, BATCH, POINTS = 500, 32, (50, 200, 500)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="bench/accuracy/cache")
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--lambda", dest="lam", type=float, default=0.2, help="task arithmetic's λ (default 0.2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="head-tint.json")
    args = p.parse_args()
    ctx = load_context("minilm", args.cache, None, args.ckpt_dir, args.device, 256)
    encoder = ctx.encoder
    merged = {k: b + args.lam * sum(f[k] - b for f in ctx.finetuned) for k, b in ctx.base.items()}
    with torch.no_grad():
        encoder.load_state_dict(merged, strict=False)
        features = [predict(encoder, t.x["test"], args.device, precision="fp32") for t in ctx.tasks]
        teachers = []
        for finetuned, head, task in zip(ctx.finetuned, ctx.heads, ctx.tasks):
            encoder.load_state_dict(finetuned, strict=False)
            teachers.append(predict(Classifier(encoder, head), task.x["test"], args.device, precision="fp32"))
    report = {"lambda": args.lam, "tasks": {}, "runs": {}}
    for head, task, x in zip(ctx.heads, ctx.tasks, features):
        report["tasks"][task.name] = {"head_rms": float(head.weight.detach().pow(2).mean().sqrt()),
                                      "feature_norm": float(x.norm(dim=1).mean()),
                                      "frozen_head": accuracy(F.linear(x, head.weight, head.bias), task.y["test"])}
    for loss_name, loss in (("pseudo", pseudo), ("pseudo_conf", pseudo_conf)):
        for lr in (1e-2, 1e-3, 1e-4):
            curves = {}
            for i, (head, task, x, teacher) in enumerate(zip(ctx.heads, ctx.tasks, features, teachers)):
                gen = torch.Generator().manual_seed(i)
                weight = head.weight.detach().clone().requires_grad_(True)
                bias = head.bias.detach().clone().requires_grad_(True)
                opt = torch.optim.Adam([weight, bias], lr=lr)
                order, pos, curve = torch.randperm(len(x), generator=gen), 0, []
                for step in range(1, STEPS + 1):
                    if pos + BATCH > len(x):
                        order, pos = torch.randperm(len(x), generator=gen), 0
                    rows = order[pos:pos + BATCH]
                    pos += BATCH
                    value = loss(F.linear(x[rows], weight, bias), teacher[rows])
                    opt.zero_grad()
                    value.backward()
                    opt.step()
                    if step in POINTS:
                        curve.append(accuracy(F.linear(x, weight, bias).detach(), task.y["test"]))
                curves[task.name] = curve
            mean = [sum(c[j] for c in curves.values()) / len(curves) for j in range(len(POINTS))]
            report["runs"][f"{loss_name}_lr{lr:g}"] = {"avg": mean[-1], "avg_at": dict(zip(POINTS, mean)),
                                                       "test": {k: c[-1] for k, c in curves.items()}}
            print(f"{loss_name:12s} lr {lr:g}: avg {100 * mean[-1]:.1f} "
                  f"(@{'/'.join(map(str, POINTS))}: {', '.join(f'{100 * m:.1f}' for m in mean)})", flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
