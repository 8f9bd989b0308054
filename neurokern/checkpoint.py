"""Reading whole models from disk (HF folders or .safetensors files), and the file names an HF
model folder holds. Merged models are written by the streaming engine (neurokern.engine.writer)."""
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from neurokern.engine.files import INDEX, weight_files
from neurokern.errors import NeurokernError

SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def load_model(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(path, allow_pickle=False):
        try:
            part = load_file(file)
        except (SafetensorError, OSError) as exc:
            raise NeurokernError(f"{file}: cannot read safetensors ({exc})") from exc
        for name, tensor in part.items():
            if name in tensors:
                raise NeurokernError(f"{file}: tensor {name!r} appears in more than one file of {path}")
            tensors[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return tensors
