"""Reading whole models from disk (HF folders or .safetensors files), and the file names an HF
model folder holds. Merged models are written by the streaming engine (neurokern.engine.writer)."""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from neurokern.engine.files import INDEX
from neurokern.errors import NeurokernError

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
