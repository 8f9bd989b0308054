"""LoRA adapters (PEFT's folder format) as input models.

An adapter folder holds adapter_config.json and adapter_model.safetensors. Each adapted module
contributes ΔW = scale·B·A to one base weight (scale = lora_alpha/r, or lora_alpha/√r with
use_rslora; rank_pattern / alpha_pattern override r and lora_alpha per module, matched as PEFT
matches them). The fine-tuned model an adapter stands for is the base with every ΔW added and the
modules_to_save replaced, which is what PEFT's merge_and_unload makes of it.

`AdapterModel` presents that model to the engine as a source like any other: the same tensor names,
shapes and dtypes as the base; a tensor the adapter does not touch is read from the base's file; an
adapted weight is a derived tensor (TensorInfo.derive), computed when the engine reads it, a few
rows at a time, from the base's rows and the two factors (one call of the op lora_add_rows per
piece). No ΔW of the whole model is ever held: a tile of a piece at a time, on the reader's
threads.
"""
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from neurokern.engine.files import _check_file, read_file
from neurokern.engine.settings import EngineSettings
from neurokern.engine.sources import NAMES, Model, TensorInfo, read_header, read_into, read_range
from neurokern.errors import NeurokernError
from neurokern.ops import STORAGE_DTYPES, lora_add_rows

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Keys of variants whose ΔW is not scale·B·A (DoRA's magnitude, a LoRA bias, trainable tokens...).
UNSUPPORTED = {
    "lora_magnitude_vector": "DoRA (use_dora) adapters",
    "lora_B.bias": "adapters with lora_bias",
    "trainable_tokens_delta": "trainable tokens (trainable_token_indices)",
}


def is_adapter(path: Path) -> bool:
    """path is a folder holding an adapter_config.json."""
    return Path(path).is_dir() and os.path.lexists(Path(path) / CONFIG)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ΔW = scale·B·A, or its transpose (`transposed`: embeddings, whose A is
    [r, num_embeddings], and fan_in_fan_out layers such as GPT-2's Conv1D)."""

    module: str  # the module's name in the base model
    weight: str  # the base tensor it changes
    A: TensorInfo
    B: TensorInfo
    r: int
    scale: float
    transposed: bool
    embedding: bool  # PEFT rounds an embedding's ΔW to the weight's dtype before adding it

    @property
    def shape(self) -> tuple[int, int]:
        out = (self.B.shape[0], self.A.shape[1])
        return out[::-1] if self.transposed else out


@dataclass
class LoraAdapter:
    """A checked adapter folder: its config, its adapted modules (by the base tensor they change)
    and the tensors it replaces whole (modules_to_save; an embedding's stored base_layer)."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replaced: dict[str, TensorInfo] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def pattern_key(patterns: dict, module: str) -> Optional[str]:
    """The first key of a rank_pattern / alpha_pattern that matches a module name: the key, a
    regular expression, matches the whole name or a dotted suffix of it (PEFT's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _config(path: Path) -> dict[str, Any]:
    file = path / CONFIG
    _check_file(path, file)
    try:
        config = json.loads(read_file(file).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise NeurokernError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise NeurokernError(f"{file}: expected a JSON object (PEFT's adapter config)")
    where = f"{file}:"
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise NeurokernError(f"{where} peft_type is {kind!r}; neurokern reads LoRA adapters (peft_type 'LORA')")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise NeurokernError(f"{where} r is {r!r}; expected a positive integer")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise NeurokernError(f"{where} lora_alpha is {alpha!r}; expected a finite number")
    for key in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
        if not isinstance(config.get(key, False), bool):
            raise NeurokernError(f"{where} {key} is {config.get(key)!r}; expected true or false")
    for key in ("use_dora", "lora_bias"):
        if config.get(key):
            raise NeurokernError(f"{where} {key} is true; neurokern reads plain LoRA adapters "
                                 "(ΔW = scale·B·A), not DoRA or LoRA biases")
    if config.get("target_parameters"):
        raise NeurokernError(f"{where} target_parameters is set; neurokern reads adapters of modules "
                             "(target_modules), not of bare parameters")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in patterns.values()):
            raise NeurokernError(f"{where} {key} is {patterns!r}; expected an object of module pattern -> number")
    return config


def read_adapter(path: Path) -> LoraAdapter:
    """The adapter folder at path, checked: its config, and its weights' names and shapes (from the
    safetensors header alone; no tensor is read)."""
    path = Path(path)
    if not path.is_dir():
        raise NeurokernError(f"adapter path {path} is not a folder (expected {CONFIG} and {WEIGHTS} in it)")
    config = _config(path)
    weights = path / WEIGHTS
    if not os.path.lexists(weights):
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".safetensors"))
        hint = f" (found {', '.join(found)}; save it with safe_serialization=True)" if found else ""
        raise NeurokernError(f"{path}: no {WEIGHTS}{hint}")
    _check_file(path, weights)
    tensors = read_header(weights)
    adapter = LoraAdapter(path, config, files=[weights, path / CONFIG])

    factors: dict[str, dict[str, TensorInfo]] = {}
    kinds: dict[str, bool] = {}  # module -> embedding
    for key, info in tensors.items():
        if not key.startswith(PREFIX):
            raise NeurokernError(f"{weights}: tensor {key!r} does not start with {PREFIX!r}; expected PEFT's key names")
        name = key[len(PREFIX):]
        for marker, what in UNSUPPORTED.items():
            if marker in name:
                raise NeurokernError(f"{weights}: tensor {key!r}: {what} are not supported (neurokern reads "
                                     "ΔW = scale·B·A)")
        for suffix, factor, embedding in ((".lora_A.weight", "A", False), (".lora_B.weight", "B", False),
                                          (".lora_embedding_A", "A", True), (".lora_embedding_B", "B", True)):
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                factors.setdefault(module, {})[factor] = info
                kinds[module] = embedding
                break
        else:
            if name.endswith(".base_layer.weight"):  # an embedding layer saved whole (save_embedding_layers)
                name = name[: -len(".base_layer.weight")] + ".weight"
            adapter.replaced[name] = info

    rslora = config.get("use_rslora", False)
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            raise NeurokernError(f"{weights}: module {module!r} has no lora_{missing} tensor")
        A, B = pair["A"], pair["B"]
        key = pattern_key(config.get("rank_pattern") or {}, module)
        r = config["rank_pattern"][key] if key is not None else config["r"]
        key = pattern_key(config.get("alpha_pattern") or {}, module)
        alpha = config["alpha_pattern"][key] if key is not None else config.get("lora_alpha", 8)
        if len(A.shape) != 2 or len(B.shape) != 2:
            raise NeurokernError(f"{weights}: module {module!r}: lora_A is {A.describe()} and lora_B {B.describe()}; "
                                 "expected two matrices (convolution adapters are not supported)")
        if A.shape[0] != r or B.shape[1] != r:
            raise NeurokernError(f"{weights}: module {module!r}: lora_A is {A.describe()} and lora_B {B.describe()}, "
                                 f"expected rank {r} (the config's r / rank_pattern) in both")
        if A.dtype not in STORAGE_DTYPES or B.dtype != A.dtype:
            raise NeurokernError(f"{weights}: module {module!r}: lora_A is {NAMES.get(A.dtype)} and lora_B "
                                 f"{NAMES.get(B.dtype)}; expected one of F32, BF16, F16 for both")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        transposed = kinds[module] or bool(config.get("fan_in_fan_out", False))
        adapter.modules[module + ".weight"] = LoraModule(module, module + ".weight", A, B, r, scale, transposed,
                                                         kinds[module])
    return adapter


def factors(module: LoraModule, rows: Optional[slice] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's A and B, read from the adapter file; NaN / Inf in either is an error naming it.
    rows: only these rows of B (those of ΔW's rows when ΔW = B·A is not transposed)."""
    pair = read_tensor(module.A), read_tensor(module.B) if rows is None else read_rows(module.B, rows.start, rows.stop)
    for info, t in zip((module.A, module.B), pair):
        if not bool(torch.isfinite(t).all()):
            raise NeurokernError(f"tensor {info.name!r} of {info.file} has non-finite values (NaN or Inf)")
    return pair


def read_tensor(info: TensorInfo) -> torch.Tensor:
    return read_range(info, 0, info.nbytes).view(info.dtype).view(info.shape)


def read_rows(info: TensorInfo, first: int, last: int) -> torch.Tensor:
    """Rows [first, last) of a stored tensor (along its first dimension)."""
    row_bytes = info.nbytes // info.shape[0]
    return read_range(info, first * row_bytes, last * row_bytes).view(info.dtype).view(last - first, *info.shape[1:])


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float, transposed: bool) -> torch.Tensor:
    """ΔW = scale·B·A (or its transpose), as PEFT's get_delta_weight computes it on a CPU: the
    product of the factors (upcast to float32 when half-precision), times scale, in the factors'
    dtype."""
    dtype = B.dtype
    if dtype in (torch.float16, torch.bfloat16):
        A, B = A.float(), B.float()
    product = B @ A
    delta = product.T if transposed else product
    return delta.mul_(scale).to(dtype)


def add_delta(weight_rows: torch.Tensor, delta: torch.Tensor, embedding: bool) -> torch.Tensor:
    """weight_rows + ΔW rows, a new tensor, as PEFT's merge adds them in place into the weight (the
    sum formed in the wider of the two dtypes, rounded once to the weight's); an embedding's ΔW is
    rounded to the weight's dtype first. delta, a product formed for this, may be overwritten."""
    out = weight_rows.clone()
    if embedding:
        out += delta.to(out.dtype)
    elif torch.promote_types(out.dtype, delta.dtype) == delta.dtype:
        # the sum formed in delta (addition commutes exactly), then rounded into the rows: a
        # CPU's in-place add of a wider dtype into bfloat16 rows takes 1.5x as long
        out.copy_(delta.add_(out))
    else:
        out += delta
    return out


# A CPU BLAS forms a product of a few rows (or columns) another way than the whole matrix's: a row
# of B[:3] @ A differs in its last bits from the same row of B @ A, which PEFT forms, while blocks
# of a multiple of 16 rows or columns come out as the whole product's (tests/engine/
# test_adapter_math.py checks it on the machine it runs on). lora_add_rows forms ΔW over such
# blocks, or over all rows; a piece gives it B's rows of such a block (product_rows).
PRODUCT_BLOCK = 16
# lora_add_rows's float32 tile of ΔW rows (csrc/cpu/lora_add_rows.cpp, kTileBytes): at most this
# many bytes, unless PRODUCT_BLOCK rows take more.
TILE_BYTES = 256 * 2**10


def product_rows(first: int, last: int, rows: int) -> tuple[int, int]:
    """The rows [lo, hi) of ΔW whose product holds rows [first, last) of a tensor of `rows` rows:
    a multiple of PRODUCT_BLOCK of them, or all."""
    n = min(rows, -(-(last - first) // PRODUCT_BLOCK) * PRODUCT_BLOCK)
    lo = max(0, min(first, rows - n))
    return lo, lo + n


class LoraDelta:
    """The derived tensor base weight + ΔW of one adapted module, read a piece of rows at a time."""

    def __init__(self, weight: TensorInfo, module: LoraModule, piece_bytes: int):
        """piece_bytes: the float32 size of a piece's ΔW rows (the rows one read forms; ΔW itself
        is never held whole, lora_add_rows forms it a tile at a time)."""
        self.weight, self.module = weight, module
        rows, cols = weight.shape
        self.row_bytes = cols * weight.dtype.itemsize
        self.rows_per_piece = max(1, piece_bytes // max(1, 4 * cols) // PRODUCT_BLOCK) * PRODUCT_BLOCK
        self.rows = rows

    def pieces(self) -> list[tuple[int, int]]:
        step = self.rows_per_piece * self.row_bytes
        total = self.rows * self.row_bytes
        return [(at, min(at + step, total)) for at in range(0, total, step)]

    def read(self, out: torch.Tensor, begin: int, end: int) -> None:
        """Bytes [begin, end) of the tensor into the same bytes of out (uint8, the whole tensor)."""
        if begin >= end:
            return
        first, last = begin // self.row_bytes, -(-end // self.row_bytes)
        at = first * self.row_bytes  # where the rows begin
        dtype = self.weight.dtype
        in_place = (at == begin and last * self.row_bytes == end and self.weight.derive is None
                    and (out.data_ptr() + begin) % dtype.itemsize == 0)
        if in_place:  # whole rows: the base's read straight into out, ΔW added there
            read_into(self.weight, out, begin, end)
            rows = out[begin:end].view(dtype).view(last - first, -1)
        elif self.weight.derive is not None:  # a replacement stored in another dtype: converted whole
            whole = torch.empty(self.weight.nbytes, dtype=torch.uint8)
            self.weight.derive.read(whole, 0, self.weight.nbytes)
            rows = whole.view(dtype).view(self.rows, -1)[first:last]
        else:
            rows = read_rows(self.weight, first, last)
        m = self.module
        if m.transposed:  # ΔW's rows are columns of A: both factors whole
            A, B = factors(m)
            lora_add_rows(rows, A, B, m.scale, True, m.embedding, first)
        else:  # B's rows of a block whose product gives the whole product's bits
            lo, hi = product_rows(first, last, self.rows)
            A, B = factors(m, slice(lo, hi))
            lora_add_rows(rows, A, B, m.scale, False, m.embedding, first - lo)
        if not in_place:
            out[begin:end].copy_(rows.view(-1).view(torch.uint8)[begin - at:end - at])

    def work_bytes(self) -> int:
        """Memory a read of one piece takes besides the destination: the rows (when not read in
        place), the factors read (A whole; B's rows of the piece, or B whole when transposed) and
        their float32 copies when half-precision, lora_add_rows's float32 tile (and a row of it
        when transposed), which the thread keeps, and a converted replacement weight read whole."""
        rows = min(self.rows_per_piece, self.rows)
        cols = self.row_bytes // self.weight.dtype.itemsize
        A, B = self.module.A, self.module.B
        b_numel = B.numel if self.module.transposed else rows * (B.numel // B.shape[0])
        factors_bytes = (A.numel + b_numel) * (A.dtype.itemsize + (4 if A.dtype.itemsize < 4 else 0))
        tile_rows = min(self.rows, max(PRODUCT_BLOCK, TILE_BYTES // (4 * cols) // PRODUCT_BLOCK * PRODUCT_BLOCK))
        tile = (tile_rows + (1 if self.module.transposed else 0)) * cols * 4
        work = rows * self.row_bytes + factors_bytes + tile
        if self.weight.derive is not None:
            work += self.weight.nbytes + self.weight.derive.work_bytes()
        return work

    def digest(self) -> list:
        m, w = self.module, self.weight
        return ["lora", m.A.start, m.A.nbytes, m.B.start, m.B.nbytes, m.scale.hex(), m.transposed, m.embedding,
                str(w.file), w.start, w.derive.digest() if w.derive is not None else None]


class Cast:
    """A tensor stored in another dtype than the base's (modules_to_save), converted when read."""

    def __init__(self, source: TensorInfo, dtype: torch.dtype):
        self.source, self.dtype = source, dtype

    def pieces(self) -> list[tuple[int, int]]:
        return [(0, self.source.numel * self.dtype.itemsize)]

    def read(self, out: torch.Tensor, begin: int, end: int) -> None:
        value = read_tensor(self.source).to(self.dtype)
        out[begin:end].copy_(value.reshape(-1).view(torch.uint8)[begin:end])

    def work_bytes(self) -> int:
        return self.source.nbytes + self.source.numel * self.dtype.itemsize

    def digest(self) -> list:
        return ["cast", self.source.start, self.source.nbytes, NAMES[self.dtype]]


class AdapterModel:
    """A LoRA adapter folder as an input model of the engine: base's tensors, in base's order and
    dtypes, the adapted ones derived (LoraDelta, in pieces of piece_bytes of float32 work), the
    replaced ones read from the adapter file."""

    def __init__(self, path: Path, label: str, base: Model,
                 piece_bytes: int = EngineSettings.adapter_piece_bytes):
        self.path, self.label = Path(path), label
        self.adapter = adapter = read_adapter(path)
        weights = adapter.path / WEIGHTS
        for name, info in adapter.replaced.items():
            b = base.tensors.get(name)
            if b is None:
                raise NeurokernError(f"{label}: {weights} replaces tensor {name!r}, which the base ({base.path}) lacks")
            if info.shape != b.shape:
                raise NeurokernError(f"tensor {name!r}: {label} ({weights}) has shape {info.shape}, base "
                                     f"({b.file}) has {b.shape}")
        self.tensors: dict[str, TensorInfo] = {}
        for name, b in base.tensors.items():
            info = b
            if name in adapter.replaced:
                stored = adapter.replaced[name]
                info = stored if stored.dtype == b.dtype else TensorInfo(
                    name, b.dtype, b.shape, weights, -1, b.nbytes, Cast(stored, b.dtype))
            if name in adapter.modules:
                module = adapter.modules[name]
                if len(b.shape) != 2 or module.shape != b.shape:
                    raise NeurokernError(f"tensor {name!r}: {label} ({weights}) adapts module {module.module!r} "
                                         f"with ΔW of shape {module.shape}; the base ({b.file}) has {b.shape}")
                if not b.dtype.is_floating_point:
                    raise NeurokernError(f"tensor {name!r} of the base ({b.file}) is {NAMES.get(b.dtype)}; "
                                         "a LoRA adapter changes floating-point weights only")
                info = TensorInfo(name, b.dtype, b.shape, weights, -1, b.nbytes, LoraDelta(info, module, piece_bytes))
            self.tensors[name] = info
        missing = [m.weight for m in adapter.modules.values() if m.weight not in base.tensors]
        if missing:
            module = adapter.modules[missing[0]].module
            raise NeurokernError(f"{label}: {weights} adapts module {module!r}, but the base ({base.path}) has no "
                                 f"tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        self.files = adapter.files + base.files

    def read_into(self, info: TensorInfo, out: torch.Tensor, begin: int = 0, end: Optional[int] = None) -> None:
        """A TensorSource's read: stored tensors (the base's, the adapter's) and derived ones."""
        read_into(info, out, begin, end)

    def work_bytes(self) -> int:
        """The most memory one read job of a derived tensor takes (see LoraDelta.work_bytes)."""
        return max((i.derive.work_bytes() for i in self.tensors.values() if i.derive is not None), default=0)

    def header_digest(self) -> list:
        config = json.dumps(self.adapter.config, sort_keys=True, default=str)
        return [config] + [[i.name, NAMES.get(i.dtype), list(i.shape), i.file.name, i.start, i.nbytes,
                            i.derive.digest() if i.derive is not None else None] for i in self.tensors.values()]
