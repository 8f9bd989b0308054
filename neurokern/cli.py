"""The `neurokern` command line."""
import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

from neurokern.errors import NeurokernError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_command(args: argparse.Namespace) -> int:
    from neurokern.checkpoint import check_output_dir, load_model, write_model
    from neurokern.config import load_config
    from neurokern.merge import merge

    config = load_config(args.config)
    check_output_dir(Path(args.out_dir))
    if args.dry_run:
        print(f"method: {config.method} {config.params}")
        print(f"base:   {config.base_model}")
        for path in config.models:
            print(f"model:  {path}")
        print(f"output: {args.out_dir} (shards of at most {config.out_shard_size} bytes)")
        return 0
    start = time.perf_counter()
    dtype = DTYPES.get(config.dtype) if config.dtype else None
    base = load_model(config.base_model, dtype)
    finetuned = [load_model(p, dtype) for p in config.models]
    merged = merge(base, finetuned, method=config.method, device=args.device, progress=True, **config.params)
    merged = {k: v.cpu() for k, v in merged.items()}
    side_sources = [config.tokenizer_source or config.base_model, config.base_model]
    echo = {"neurokern_config.yml": yaml.safe_dump(config.raw, sort_keys=False)}
    write_model(merged, Path(args.out_dir), config.out_shard_size, side_sources, echo)
    print(f"merged {len(merged)} tensors with {config.method} into {args.out_dir} in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="neurokern", description="Merge fine-tuned models.")
    sub = parser.add_subparsers(dest="command", required=True)
    merge_p = sub.add_parser("merge", help="merge the models a YAML config names into OUT_DIR")
    merge_p.add_argument("config", help="merge config (YAML, mergekit keys)")
    merge_p.add_argument("out_dir", help="output folder (created; must not exist or be empty)")
    merge_p.add_argument("--device", default=None, help="cpu or cuda (default: where the weights load, the CPU)")
    merge_p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    merge_p.set_defaults(run=merge_command)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except NeurokernError as exc:
        print(f"neurokern: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
