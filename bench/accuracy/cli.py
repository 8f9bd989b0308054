"""The offline accuracy suite from the command line, run from the repository root:

    python -m bench.accuracy --prepare [--family minilm] [--cache DIR]     # CPU machine, with the packages
    python -m bench.accuracy --out DIR --device cuda [--family F] [--grid GROUPS] [--tasks ...] [--methods ...]
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

DEFAULT_OUT = "bench/results"


def _csv(text: str) -> list:
    return [x for x in text.split(",") if x]


def _floats(text: str) -> list:
    return [float(x) for x in _csv(text)]


def _prior(text: str):
    return text if text == "task_arithmetic" else float(text)


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from bench.accuracy.families import FAMILIES
    from bench.accuracy.methods import LAMBDA_GRID, METHODS
    from bench.accuracy.tta import GRID
    from bench.accuracy.tta import METHODS as TTA_METHODS

    tinting = TTA_METHODS["tinting"]
    p.add_argument("--prepare", action="store_true",
                   help="build the family's cache (--cache) from the installed Debian/PyPI packages, then exit")
    p.add_argument("--family", default="minilm", choices=list(FAMILIES), help="model family (default minilm)")
    p.add_argument("--cache", default=None, help="the family's cache folder (default: the family's, under bench/accuracy)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"where accuracy.json/.md/.png go (default {DEFAULT_OUT})")
    p.add_argument("--tasks", type=_csv, default=None, help="comma-separated task names (default: every task in the cache)")
    p.add_argument("--methods", type=_csv, default=None,
                   help="comma-separated methods (default: all): " + ",".join(list(METHODS) + list(TTA_METHODS)))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g = p.add_argument_group("fine-tuning recipe (defaults: the family's)")
    for flag in ("epochs", "lr", "head-lr", "weight-decay", "warmup"):
        g.add_argument(f"--{flag}", type=float, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-train", type=int, default=None, help="use at most this many train examples per task")
    g.add_argument("--ckpt-dir", default=None,
                   help="fine-tuned encoders are saved here and reused by a later run with the same recipe and data "
                        "(needed with --workers > 1)")
    g = p.add_argument_group("merging and test-time training")
    g.add_argument("--lambda-grid", type=_floats, default=list(LAMBDA_GRID), help="λ values searched on validation")
    g.add_argument("--tta-steps", type=int, default=tinting.steps, help="AdaMerging steps / Tinting epochs")
    g.add_argument("--tta-batch", type=int, default=tinting.batch_size)
    g.add_argument("--lr-tint", type=float, default=tinting.lr_tint, help="Tinting: the tints' Adam learning rate")
    g.add_argument("--lr-lambda", type=float, default=tinting.lr_lambda, help="Tinting: λ's Adam learning rate")
    g.add_argument("--lr-adamerging", type=float, default=TTA_METHODS["adamerging"].lr_lambda)
    g.add_argument("--prior", type=_prior, default=tinting.prior, help="initial λ: a number or task_arithmetic")
    g.add_argument("--tint-layers", type=_csv, default=list(tinting.tint),
                   help="Tinting's tinted layers, by the family's names (minilm: head, last_mlp, attention_out, embedding)")
    g.add_argument("--precision", choices=["bf16", "fp32"], default=tinting.precision,
                   help="test-time training under bf16 autocast (CUDA) or in fp32")
    g.add_argument("--grid", type=_csv, default=[],
                   help="ablation groups to run around Tinting's settings: all, or any of " + ",".join(GRID))
    g.add_argument("--only", type=_csv, default=[],
                   help="keep the ablation runs whose names match one of these shell patterns (e.g. 'layer_*_tint0.01*')")
    g.add_argument("--workers", type=int, default=None,
                   help="processes for the test-time runs (default: on a GPU one per two cores, at most 12; CPU 1)")
    g.add_argument("--curve-every", type=int, default=25, help="epochs between learning-curve points")
    g.add_argument("--investigate", action="store_true", help="also sweep density, trim scope and number of tasks")
    g.add_argument("--eval-batch", type=int, default=256)
    g.add_argument("--no-plot", action="store_true")
    return p


def run_command(args) -> int:
    from bench.accuracy import families

    family = families.load(args.family)
    cache = args.cache or family.DEFAULT_CACHE
    if args.prepare:
        family.prepare(cache)
        return 0
    import dataclasses

    import torch

    from bench.accuracy.run import run_suite
    from bench.accuracy.tta import GRID
    from bench.accuracy.tta import METHODS as TTA_METHODS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    given = {"lr": args.lr, "head_lr": args.head_lr, "epochs": args.epochs, "batch_size": args.batch_size,
             "weight_decay": args.weight_decay, "warmup": args.warmup}
    recipe = dataclasses.replace(family.RECIPE, seed=args.seed, **{k: v for k, v in given.items() if v is not None})
    common = dict(steps=args.tta_steps, batch_size=args.tta_batch, precision=args.precision, seed=args.seed)
    tinted = dict(common, lr_tint=args.lr_tint, lr_lambda=args.lr_lambda, prior=args.prior,
                  tint=tuple(args.tint_layers))
    tta = {"adamerging": dataclasses.replace(TTA_METHODS["adamerging"], lr_lambda=args.lr_adamerging, **common),
           "tinting": dataclasses.replace(TTA_METHODS["tinting"], **tinted),
           "tinting_conf": dataclasses.replace(TTA_METHODS["tinting_conf"], **tinted)}
    grid = GRID if args.grid == ["all"] else args.grid
    run_suite(args.family, cache, args.out, tasks=args.tasks, methods=args.methods, device=device, recipe=recipe,
              tta=tta, grid=grid, workers=args.workers, curve_every=args.curve_every, lambda_grid=args.lambda_grid,
              max_train=args.max_train, ckpt_dir=args.ckpt_dir, do_investigate=args.investigate, eval_batch=args.eval_batch,
              plot=not args.no_plot, only=args.only)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = configure(argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter))
    return run_command(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
