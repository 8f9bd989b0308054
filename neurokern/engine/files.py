"""The files of an input model and their safetensors headers, without torch: the engine's warm-up
reads (engine/prefetch.py) find the inputs' byte ranges with these before torch is imported, and
engine/sources.py builds its tensor table from them."""
import json
import os
import struct
from pathlib import Path

from neurokern.errors import NeurokernError

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
MAX_HEADER = 100 * 2**20


def read_json_header(path: Path) -> tuple[dict, int, int]:
    """The header of a .safetensors file as JSON, where its data starts, and the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise NeurokernError(f"{path}: not a safetensors file (only {size} bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER or 8 + length > size:
                raise NeurokernError(f"{path}: not a safetensors file, or truncated (header of {length} bytes in a file of {size})")
            raw = f.read(length)
    except OSError as exc:
        raise NeurokernError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise NeurokernError(f"{path}: not a safetensors file (header is not valid JSON: {exc})") from exc
    return header, 8 + length, size


def weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    """The weight files of a model: a file, or a folder's index shards / single file."""
    if path.is_file():
        if path.suffix == ".safetensors" or (allow_pickle and path.suffix in PICKLE_SUFFIXES):
            return [path]
        if path.suffix in PICKLE_SUFFIXES:
            raise NeurokernError(f"{path}: pickled checkpoints can run code when loaded; convert to safetensors or pass --allow-pickle")
        raise NeurokernError(f"{path}: expected a .safetensors file or a model folder")
    if not path.exists():
        raise NeurokernError(f"model path {path} does not exist")
    if not path.is_dir() or not os.access(path, os.R_OK | os.X_OK):
        raise NeurokernError(f"model path {path} is not a readable folder")
    for index_name, suffix in ((INDEX, ".safetensors"), ("pytorch_model.bin.index.json", ".bin")):
        index = path / index_name
        if index.is_file() and (suffix == ".safetensors" or allow_pickle):
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise NeurokernError(f"{index}: not a valid index ({exc})") from exc
            return [path / f for f in dict.fromkeys(weight_map.values())]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p for s in PICKLE_SUFFIXES for p in path.glob(f"*{s}"))
    if pickled and allow_pickle:
        return pickled
    if pickled:
        raise NeurokernError(f"{path}: only pickled weights ({pickled[0].name}); convert to safetensors or pass --allow-pickle")
    raise NeurokernError(f"{path}: no .safetensors weights found")
