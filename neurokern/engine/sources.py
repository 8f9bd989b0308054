"""Input models, read lazily tensor by tensor: the engine's tensor sources.

The engine reads its inputs through a small interface, `TensorSource`: a table of tensors (name,
dtype, shape, where its bytes are) and a method that reads any byte range of one tensor into a
host buffer. `Model` implements it for models on disk, `engine.adapters.AdapterModel` for LoRA
adapter folders, `engine.synthetic.SyntheticModel` for models generated on the fly (benchmarks at
sizes no disk holds, and `neurokern warmup`), `StackedModel` for a passthrough config's slices
(layers of other sources, renamed, read through them).
`merge_models(..., sources=[...])` reads a config path from the source whose `path` it is.

On disk:

A model is a Hugging Face folder (config.json + model.safetensors, or *.safetensors shards and
model.safetensors.index.json) or a bare .safetensors file. Only the headers are read up front: they
give every tensor's dtype, shape and byte range, checked as strictly as the safetensors library
checks them (engine/files.py: a header whose byte ranges do not tile the file exactly marks a
truncated or corrupt file). Tensor bytes are read later with os.preadv straight into the caller's
(pinned) buffer. Pickled checkpoints (.bin / .pt) are refused unless
allow_pickle, and then read through torch.load(mmap=True, weights_only=True).
"""
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch

from neurokern.engine.files import PICKLE_SUFFIXES, weight_files
from neurokern.engine.files import read_header as header_entries
from neurokern.engine.settings import EngineSettings
from neurokern.errors import NeurokernError
from neurokern.params import BEFORE_LAYERS, LAYER_INDEX, layer_of

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path  # where messages say the tensor is (a generated tensor: a name under its model's path)
    start: int  # absolute byte offset in the file (-1: pickled, read through torch.load, or derived)
    nbytes: int
    # A tensor computed when read (engine/adapters.py: a LoRA-adapted weight): read(out, begin,
    # end) fills bytes [begin, end) of out; pieces() the byte ranges to read it in; digest() what
    # its bytes depend on (for the plan digest).
    derive: Any = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def describe(self) -> str:
        return f"{NAMES.get(self.dtype, str(self.dtype))}{list(self.shape)}"


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one .safetensors file, from its header alone (checked: engine/files.py), in
    the header's order."""
    entries, _ = header_entries(path)
    return {e.name: TensorInfo(e.name, DTYPES[e.dtype], e.shape, path, e.start, e.nbytes) for e in entries}


def _pickle_tensors(path: Path) -> dict[str, TensorInfo]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any unpickling failure is a bad file)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        reason = next((line for line in lines if "GLOBAL" in line), lines[0])  # weights_only's refusal
        raise NeurokernError(f"{path}: cannot read pickled checkpoint with torch.load(weights_only=True): {reason}") from exc
    if not isinstance(state, dict):
        raise NeurokernError(f"{path}: pickled checkpoint is not a state dict")
    _PICKLED[path] = state
    return {n: TensorInfo(n, t.dtype, tuple(t.shape), path, -1, t.numel() * t.element_size())
            for n, t in state.items() if isinstance(t, torch.Tensor)}


_PICKLED: dict[Path, dict] = {}


@runtime_checkable
class TensorSource(Protocol):
    """One input model as the engine reads it.

    path:    what the config names (merge_models(sources=...) matches it against the config's paths)
    label:   how messages name the model ("base_model", "models[0]", ...)
    tensors: name -> TensorInfo, in the order the engine should read them; `start` is the byte
             offset passed to read_into's reads (pieces are cut at multiples of the read piece size
             in these offsets), `file` what messages name
    files:   the files a resumed merge fingerprints (engine.files.fingerprint); [] for none
    read_into(info, out, begin, end): bytes [begin, end) of the tensor's data into the same bytes
             of `out` (a contiguous uint8 CPU tensor of info.nbytes, pinned when the merge runs on a
             GPU). Called from many threads at once, for any pieces, in any order: the bytes of a
             piece must not depend on how a tensor is cut into pieces. Errors: NeurokernError.
    header_digest(): a JSON-able value that changes whenever the bytes of any tensor may change;
             the plan digest (what --resume checks) hashes it.
    work_bytes(): host memory one read_into call takes besides `out` (the plan counts it once per
             reader thread); 0 for tensors copied from storage.
    """

    path: Path
    label: str
    tensors: dict[str, TensorInfo]
    files: list[Path]

    def read_into(self, info: TensorInfo, out: torch.Tensor, begin: int = 0, end: Optional[int] = None) -> None:
        ...

    def header_digest(self) -> list:
        ...

    def work_bytes(self) -> int:
        ...


class Model:
    """One input model on disk (a TensorSource): its tensors (name -> TensorInfo) in file order,
    read lazily."""

    def __init__(self, path: Path, label: str, allow_pickle: bool = False):
        self.path, self.label = Path(path), label
        self.tensors: dict[str, TensorInfo] = {}
        self.files = weight_files(self.path, allow_pickle)
        for file in self.files:
            part = _pickle_tensors(file) if file.suffix in PICKLE_SUFFIXES else read_header(file)
            for name, info in part.items():
                if name in self.tensors:
                    raise NeurokernError(f"{file}: tensor {name!r} appears in more than one file of {self.path}")
                self.tensors[name] = info

    def read_into(self, info: TensorInfo, out: torch.Tensor, begin: int = 0, end: Optional[int] = None) -> None:
        read_into(info, out, begin, end)

    def work_bytes(self) -> int:
        """Memory a read job takes besides its destination: none for stored tensors (a LoRA adapter's
        derived tensors take some, engine/adapters.py)."""
        return 0

    def header_digest(self) -> list:
        sizes = {file: file.stat().st_size for file in self.files}
        return [[i.name, NAMES.get(i.dtype, str(i.dtype)), list(i.shape), i.file.name, i.start, i.nbytes,
                 sizes[i.file]] for i in self.tensors.values()]


def validate(base: TensorSource, finetuned: list[TensorSource]) -> None:
    """Same names, shapes and dtypes in every model; messages name the file and the tensor."""
    for m in finetuned:
        missing = [n for n in base.tensors if n not in m.tensors]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise NeurokernError(f"{m.label} ({m.path}) lacks tensor {missing[0]!r}{more} that the base has "
                                 f"(in {base.tensors[missing[0]].file})")
        extra = [n for n in m.tensors if n not in base.tensors]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise NeurokernError(f"{m.label}: {m.tensors[extra[0]].file} has tensor {extra[0]!r}{more} that the base lacks")
        for name, b in base.tensors.items():
            f = m.tensors[name]
            if f.shape != b.shape:
                raise NeurokernError(f"tensor {name!r}: {m.label} ({f.file}) has shape {f.shape}, base ({b.file}) has {b.shape}")
            if f.dtype != b.dtype:
                raise NeurokernError(f"tensor {name!r}: {m.label} ({f.file}) is {NAMES.get(f.dtype)}, base ({b.file}) is "
                                     f"{NAMES.get(b.dtype)}; save the models in one dtype")


def open_model(path: Path, label: str, base: "Model", allow_pickle: bool = False,
               adapter_piece_bytes: int = EngineSettings.adapter_piece_bytes):
    """A fine-tuned input: a model (folder or file), or a LoRA adapter folder (adapter_config.json),
    which reads as the base with its ΔW added (engine/adapters.py), computed in pieces of
    adapter_piece_bytes of float32 work (EngineSettings.adapter_piece_bytes)."""
    from neurokern.engine.adapters import AdapterModel, is_adapter
    if is_adapter(path):
        return AdapterModel(path, label, base, adapter_piece_bytes)
    return Model(path, label, allow_pickle)


def _pread(info: TensorInfo, view: memoryview, begin: int, end: int, at: int) -> None:
    """Bytes [begin, end) of the tensor's data into view[at:]."""
    try:
        fd = os.open(info.file, os.O_RDONLY | os.O_NONBLOCK)  # checked regular; never block on a swapped-in FIFO
        try:
            done = begin
            while done < end:
                n = os.preadv(fd, [view[at + done - begin:at + end - begin]], info.start + done)
                if n <= 0:
                    raise NeurokernError(f"{info.file}: tensor {info.name!r} ends early (file truncated while reading?)")
                done += n
        finally:
            os.close(fd)
    except OSError as exc:
        raise NeurokernError(f"cannot read tensor {info.name!r} from {info.file}: {exc.strerror or exc}") from exc


def read_range(info: TensorInfo, begin: int, end: int) -> torch.Tensor:
    """Bytes [begin, end) of a stored tensor's data, as a new uint8 tensor."""
    out = torch.empty(end - begin, dtype=torch.uint8)
    if end > begin:
        _pread(info, memoryview(out.numpy()), begin, end, 0)
    return out


def read_into(info: TensorInfo, out: torch.Tensor, begin: int = 0, end: Optional[int] = None) -> None:
    """Read bytes [begin, end) of one tensor's data (default: all of it) into the same bytes of
    `out`, a contiguous uint8 CPU tensor of info.nbytes. Any thread may read any piece: each call
    opens the file (pread takes the offset)."""
    end = info.nbytes if end is None else end
    if info.derive is not None:
        info.derive.read(out, begin, end)
        return
    if info.start < 0:
        src = _PICKLED[info.file][info.name].contiguous()
        out.copy_(src.view(-1).view(torch.uint8))
        return
    _pread(info, memoryview(out.numpy()), begin, end, begin)


class StackedModel:
    """A model assembled from layers of other sources (a passthrough config's slices), a
    TensorSource: each of its tensors is a renamed entry of one source's tensor, read through that
    source (a file's bytes, a generated model's, ...). No bytes move."""

    def __init__(self, path: Path, sources: list[TensorSource], entries: dict[str, tuple[int, TensorInfo]]):
        # entries: output name -> (index into sources, the source's own TensorInfo)
        self.path, self.label = Path(path), "slices"
        self.sources, self.origin = sources, entries
        self.files = list(dict.fromkeys(f for source in sources for f in source.files))
        self.tensors = {name: replace(info, name=name) for name, (_, info) in entries.items()}

    def read_into(self, info: TensorInfo, out: torch.Tensor, begin: int = 0, end: Optional[int] = None) -> None:
        index, own = self.origin[info.name]
        self.sources[index].read_into(own, out, begin, end)

    def work_bytes(self) -> int:
        return max(source.work_bytes() for source in self.sources)

    def header_digest(self) -> list:
        return [[[name, index, own.name] for name, (index, own) in self.origin.items()],
                [[str(source.path), source.header_digest()] for source in self.sources]]


def stacked(stack: tuple[tuple[Path, int], ...], first: Path, last: Path,
            open_source: Callable[[Path], TensorSource]) -> StackedModel:
    """A passthrough config's slices as one model: output layer i is layer stack[i][1] of model
    stack[i][0] (opened with open_source), its tensors renamed to layer i; the tensors outside the
    layers come from `first` (those mergekit puts before the layers: embeddings) and from `last`
    (the others: final norm, head)."""
    paths = list(dict.fromkeys([first, *(p for p, _ in stack), last]))
    sources = [open_source(path) for path in paths]
    index = {path: i for i, path in enumerate(paths)}
    by_layer: dict[tuple[Path, int], list[TensorInfo]] = {}
    for path, source in zip(paths, sources):
        for info in source.tensors.values():
            layer = layer_of(info.name)
            if layer is not None:
                by_layer.setdefault((path, layer), []).append(info)
    entries: dict[str, tuple[int, TensorInfo]] = {}
    for info in sources[index[first]].tensors.values():
        if layer_of(info.name) is None and BEFORE_LAYERS.search(info.name):
            entries[info.name] = (index[first], info)
    for out_layer, (path, layer) in enumerate(stack):
        infos = by_layer.get((path, layer))
        if not infos:
            held = sorted({k[1] for k in by_layer if k[0] == path})
            span = f"layers {held[0]}...{held[-1]}" if held else "no numbered layers"
            raise NeurokernError(f"slices: model {path} has no layer {layer} (its tensors hold {span})")
        for info in infos:
            entries[_renamed(info.name, out_layer)] = (index[path], info)
    for info in sources[index[last]].tensors.values():
        if layer_of(info.name) is None and not BEFORE_LAYERS.search(info.name):
            entries[info.name] = (index[last], info)
    return StackedModel(first, sources, entries)


def _renamed(name: str, layer: int) -> str:
    """name with its layer index replaced by `layer`."""
    match = LAYER_INDEX.search(name)
    start, end = match.span(1)
    return f"{name[:start]}{layer}{name[end:]}"
