"""Reading models from disk (HF folders or .safetensors files) and writing merged ones, whole
and atomically: output appears only by a rename once every file is complete."""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from neurokern.errors import NeurokernError

INDEX = "model.safetensors.index.json"
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt",
    "added_tokens.json",
)


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a model: a .safetensors file, or a folder's index shards / single file."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise NeurokernError(f"{path}: expected a .safetensors file (pickled checkpoints are not read)")
        return [path]
    if not path.is_dir():
        raise NeurokernError(f"model path {path} does not exist")
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise NeurokernError(f"{index}: not a valid safetensors index ({exc})") from exc
        return [path / f for f in dict.fromkeys(weight_map.values())]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise NeurokernError(f"{path}: no .safetensors weights found (pickled .bin checkpoints are not read)")
    return files


def load_model(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        try:
            part = load_file(file)
        except (SafetensorError, OSError) as exc:
            raise NeurokernError(f"{file}: cannot read safetensors ({exc})") from exc
        for name, tensor in part.items():
            if name in tensors:
                raise NeurokernError(f"{file}: tensor {name!r} appears in more than one file of {path}")
            tensors[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return tensors


def shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Names grouped into shards of at most max_bytes (a larger tensor gets a shard alone)."""
    shards, current, size = [], [], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def check_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise NeurokernError(f"output {out_dir} exists and is not an empty folder")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Give the finished temp folder ordinary permissions (mkdtemp makes it private) and rename it."""
    umask = os.umask(0)
    os.umask(umask)
    for item in tmp.iterdir():
        item.chmod(0o666 & ~umask)
    tmp.chmod(0o777 & ~umask)
    check_output_dir(out_dir)
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)


def write_model(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int,
                copy_from: Iterable[Path], extra_files: dict[str, str]) -> None:
    """Write state as sharded safetensors + index, the side files found in copy_from folders and
    extra_files (name -> text), into a temp folder renamed to out_dir at the end."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        groups = shard(state, max_shard_bytes)
        names = ["model.safetensors"] if len(groups) == 1 else [
            f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))
        ]
        weight_map = {}
        for file, group in zip(names, groups):
            save_file({n: state[n].contiguous() for n in group}, str(tmp / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in group})
        if len(groups) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
        for folder in copy_from:
            if folder.is_dir():
                for side in SIDE_FILES:
                    if (folder / side).is_file() and not (tmp / side).exists():
                        shutil.copy2(folder / side, tmp / side)
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
