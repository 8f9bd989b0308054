"""Safetensors headers are checked as strictly as the safetensors library checks them: every rule
has a file that breaks it, refused with one message naming the file and the tensor, and refused by
the library too; a seeded fuzz of mutated headers finds neurokern and the library agreeing on
every file. End to end, a model with overlapping byte ranges is bad input (exit 2)."""
import json
import random
import struct

import pytest
from safetensors import safe_open

from neurokern.cli import main
from neurokern.engine.sources import read_header
from neurokern.errors import NeurokernError

from engine_helpers import make_models, write_config


def raw_file(path, header=None, data=b"", text=None):
    """A .safetensors file from a header (dict, or raw bytes `text`) and its data bytes."""
    text = text if text is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def library_accepts(path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
        return True
    except Exception:  # noqa: BLE001 (any refusal)
        return False


def f32(begin, end, shape=None):
    return {"dtype": "F32", "shape": shape if shape is not None else [(end - begin) // 4], "data_offsets": [begin, end]}


# name -> (header or raw text, data bytes, what the one-line message says)
BROKEN = {
    "overlap_full": ({"a": f32(0, 8), "b": f32(0, 8)}, 8, "tensor 'b' (data_offsets [0, 8]) overlaps tensor 'a' ([0, 8])"),
    "overlap_partial": ({"a": f32(0, 8), "b": f32(4, 12)}, 12, "tensor 'b' (data_offsets [4, 12]) overlaps tensor 'a'"),
    "gap": ({"a": f32(0, 4), "b": f32(8, 12)}, 12, "data bytes [4, 8) belong to no tensor (tensor 'b' begins at 8)"),
    "late_start": ({"a": f32(4, 12)}, 12, "data bytes [0, 4) belong to no tensor"),
    "negative_dim_reversed": ({"a": f32(0, 8), "b": f32(4, 0, [-1])}, 8,
                              "tensor 'b' has shape [-1] (a list); expected a list of non-negative"),
    "negative_dims": ({"a": f32(0, 8, [-1, -2])}, 8, "tensor 'a' has shape [-1, -2] (a list)"),
    "reversed": ({"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, 4, "data_offsets [4, 0]: its end is before its begin"),
    "float_dim": ({"a": f32(0, 8, [2.0])}, 8, "tensor 'a' has shape [2.0] (a list)"),
    "bool_dim": ({"a": f32(0, 8, [True, 2])}, 8, "tensor 'a' has shape [true, 2] (a list)"),
    "string_dim": ({"a": f32(0, 8, ["2"])}, 8, "tensor 'a' has shape [\"2\"] (a list)"),
    "float_offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}, 8, "tensor 'a' has data_offsets [0, 8.0]"),
    "three_offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, 8, "expected [begin, end]"),
    "size_mismatch": ({"a": f32(0, 8, [3])}, 8, "header says F32[3] (12 bytes) but its data_offsets [0, 8] span 8"),
    "overflow": ({"a": f32(0, 0, [2**32, 2**32, 0])}, 0, "more elements than 64 bits count"),
    "unknown_dtype": ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, 8, "tensor 'a' has dtype \"F33\""),
    "entry_not_object": ({"a": 5}, 0, "tensor 'a' has header entry 5 (a number)"),
    "missing_key": ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, 8, "expected an object with dtype, shape and data_offsets"),
    "metadata_not_strings": ({"__metadata__": {"format": 1}, "a": f32(0, 8)}, 8, "__metadata__ is {\"format\": 1}"),
    "nan_literal": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": NaN}}', 8, "header is not valid JSON"),
    "utf16": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'.encode("utf-16"), 8, "header is not valid JSON"),
    "trailing_nul": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}\0', 8, "header is not valid JSON"),
    "longer": ({"a": f32(0, 8)}, 9, "file is longer than its header says"),
    "truncated": ({"a": f32(0, 8)}, 7, "file is truncated"),
}
VALID = {
    "zero_size_first_and_last": ({"z0": f32(0, 0, [0]), "a": f32(0, 8), "z1": f32(8, 8, [0, 5])}, 8),
    "scalar": ({"a": f32(0, 4, [])}, 4),
    "out_of_order": ({"b": f32(8, 16), "a": f32(0, 8)}, 16),
    "extra_field": ({"a": {**f32(0, 8), "note": "ignored"}}, 8),
    "null_metadata": ({"__metadata__": None, "a": f32(0, 8)}, 8),
    "leading_space": (b'  {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8),
    "empty": ({}, 0),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_header_is_refused_like_the_library_does(tmp_path, case):
    header, nbytes, expect = BROKEN[case]
    path = raw_file(tmp_path / "m.safetensors", text=header, data=b"\0" * nbytes) if isinstance(header, bytes) else \
        raw_file(tmp_path / "m.safetensors", header, b"\0" * nbytes)
    assert not library_accepts(path)
    with pytest.raises(NeurokernError) as info:
        read_header(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expect in message and "\n" not in message, message


@pytest.mark.parametrize("case", sorted(VALID))
def test_valid_header_variants_are_read(tmp_path, case):
    header, nbytes = VALID[case]
    path = raw_file(tmp_path / "m.safetensors", text=header, data=b"\0" * nbytes) if isinstance(header, bytes) else \
        raw_file(tmp_path / "m.safetensors", header, b"\0" * nbytes)
    assert library_accepts(path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(read_header(path)) == sorted(f.keys())


def _mutations(rng: random.Random, header: dict, size: int):
    """One random change to a valid header (or the data size): what a corrupt or hand-made file has."""
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    kind = rng.randrange(9)
    if kind == 0:
        entry["data_offsets"][rng.randrange(2)] += rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
    elif kind == 1 and len(names) > 1:
        other = header[rng.choice([n for n in names if n != name])]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif kind == 2 and entry["shape"]:
        entry["shape"][rng.randrange(len(entry["shape"]))] = rng.choice([-1, 0, 1, 3, 2.0, "2", True, None])
    elif kind == 3:
        entry["shape"] = entry["shape"] + [rng.choice([0, 1, 2])]
    elif kind == 4:
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "I64", "U8", "F64", "f32", "Q4"])
    elif kind == 5:
        size += rng.choice([-1, 1, 8])
    elif kind == 6 and len(names) > 1:
        entry["data_offsets"] = list(header[rng.choice(names)]["data_offsets"])
    elif kind == 7:
        entry["data_offsets"] = entry["data_offsets"][::-1]
    else:
        header["__metadata__"] = rng.choice([{"format": "pt"}, {"format": 1}, ["pt"], None, "pt"])
    return header, max(size, 0)


def test_fuzzed_headers_agree_with_the_library(tmp_path):
    """400 seeded mutations of valid headers: neurokern reads a file exactly when the library does."""
    rng = random.Random(26)
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "F64": 8}
    disagree = []
    for case in range(400):
        header, at = {}, 0
        for i in range(rng.randint(1, 4)):
            dtype = rng.choice(sorted(sizes))
            shape = [rng.randint(0, 3) for _ in range(rng.randint(0, 3))]
            numel = 1
            for d in shape:
                numel *= d
            header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + numel * sizes[dtype]]}
            at += numel * sizes[dtype]
        header, size = _mutations(rng, header, at)
        path = raw_file(tmp_path / f"f{case}.safetensors", header, bytes(size))
        try:
            read_header(path)
            ours = True
        except NeurokernError:
            ours = False
        if ours != library_accepts(path):
            disagree.append((ours, json.dumps(header), size))
    assert not disagree, disagree[:5]


def test_overlapping_offsets_end_to_end(tmp_path, capsys):
    """A fine-tuned file where one tensor's offsets are another's (same size; its own bytes then
    belong to none): the old reader merged it, exit 0."""
    root = make_models(tmp_path / "models")
    cfg = write_config(tmp_path / "c.yaml", "ties", root, None, {"density": 0.3})
    file = root / "task_0" / "model.safetensors"
    (length,) = struct.unpack("<Q", file.read_bytes()[:8])
    header = json.loads(file.read_bytes()[8:8 + length])
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    header[q]["data_offsets"] = header[k]["data_offsets"]
    data = file.read_bytes()[8 + length:]
    raw_file(file, header, data)
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{file}: tensor {q!r} (data_offsets " in err and f"overlaps tensor {k!r}" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
