"""The files of an input model and their safetensors headers, without torch: the engine's warm-up
reads (engine/prefetch.py) find the inputs' byte ranges with these before torch is imported, and
engine/sources.py builds its tensor table from them.

Every file is checked before it is read: a regular file (a FIFO or a device would block or never
end), and inside its model folder (README, "Guarantees": path rules). Headers are checked as the
safetensors library checks them: UTF-8 JSON, known dtypes, shapes and offsets of non-negative
integers, each tensor's bytes exactly its shape's, and the tensors' byte ranges, sorted, tile the
data from its first byte to the end of the file (no overlap, no gap)."""
import hashlib
import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from neurokern.errors import NeurokernError

INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
MAX_HEADER = 100_000_000  # the safetensors library's limit
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
U64 = 2**64
MAX_DIM = 2**63  # torch's sizes are int64
# What a resumed merge compares for each input file, besides its size and mtime: the sha256 of this
# many pieces of this many bytes, spread evenly over the file.
SAMPLES = 16
SAMPLE_BYTES = 4096


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str  # the safetensors name: F32, BF16, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, what: str = "") -> int:
    """A read-only descriptor of path, which must be a regular file. The open never blocks (a FIFO
    without a writer would block a plain open forever); the type is checked on the descriptor.
    what: how messages name the file ("config ")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise NeurokernError(f"cannot read {what}{path}: {exc.strerror or exc}") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NeurokernError(f"{what}{path} is {_kind(mode)}, not a regular file")
    return fd


def read_file(path: Path, what: str = "") -> bytes:
    """The bytes of a small regular file (a config, an index): at most MAX_HEADER."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_HEADER:
            raise NeurokernError(f"{what}{path} is {size} bytes; expected at most {MAX_HEADER}")
        return os.pread(fd, size, 0)
    except OSError as exc:
        raise NeurokernError(f"cannot read {what}{path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _describe(value) -> str:
    kind = ("a boolean" if isinstance(value, bool) else "a number" if isinstance(value, (int, float)) else
            "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else
            "null" if value is None else "a string")
    text = json.dumps(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({kind})"


def _is_int(value, bound: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < bound


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def read_header(path: Path) -> tuple[list[HeaderEntry], int]:
    """The tensors of a .safetensors file, in the header's order, checked as described above, and
    the file's size."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise NeurokernError(f"{path}: not a safetensors file (only {size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER or 8 + length > size:
            raise NeurokernError(f"{path}: not a safetensors file, or truncated (header of {length} bytes in a file of {size})")
        raw = os.pread(fd, length, 8)
    except OSError as exc:
        raise NeurokernError(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise NeurokernError(f"{path}: not a safetensors file (header is not valid JSON: {exc})") from exc
    return _entries(path, header, 8 + length, size), size


def _entries(path: Path, header: dict, data_start: int, size: int) -> list[HeaderEntry]:
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise NeurokernError(f"{path}: __metadata__ is {_describe(metadata)}; expected an object of strings")
    entries, spans = [], []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise NeurokernError(f"{where} has header entry {_describe(entry)}; expected an object with dtype, shape "
                                 "and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise NeurokernError(f"{where} has dtype {_describe(dtype)}; expected one of {', '.join(DTYPE_SIZES)}")
        if not (isinstance(shape, list) and all(_is_int(d, MAX_DIM) for d in shape)):
            raise NeurokernError(f"{where} has shape {_describe(shape)}; expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x, U64) for x in offsets)):
            raise NeurokernError(f"{where} has data_offsets {_describe(offsets)}; expected [begin, end], two "
                                 "non-negative integers")
        begin, end = offsets
        if end < begin:
            raise NeurokernError(f"{where} has data_offsets [{begin}, {end}]: its end is before its begin")
        numel = 1
        for d in shape:  # the library's check: no running product of 64 bits or more
            numel *= d
            if numel >= U64:
                raise NeurokernError(f"{where} has shape {shape}: more elements than 64 bits count")
        if numel * DTYPE_SIZES[dtype] != end - begin:
            raise NeurokernError(f"{where} header says {dtype}{shape} ({numel * DTYPE_SIZES[dtype]} bytes) but its "
                                 f"data_offsets [{begin}, {end}] span {end - begin}")
        entries.append(HeaderEntry(name, dtype, tuple(shape), data_start + begin, end - begin))
        spans.append((begin, end, name))
    at, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin != at:
            if begin < at:
                raise NeurokernError(f"{path}: tensor {name!r} (data_offsets [{begin}, {end}]) overlaps tensor "
                                     f"{previous[2]!r} ([{previous[0]}, {previous[1]}]); expected each tensor's bytes to "
                                     "begin where the previous tensor's end")
            raise NeurokernError(f"{path}: data bytes [{at}, {begin}) belong to no tensor (tensor {name!r} begins at "
                                 f"{begin}); expected the tensors' bytes to follow each other without gaps")
        at, previous = end, (begin, end, name)
    if data_start + at != size:
        what = "truncated" if data_start + at > size else "longer than its header says"
        raise NeurokernError(f"{path}: file is {what} ({size} bytes, header needs {data_start + at}); re-download or re-save it")
    return entries


def fingerprint(path: Path) -> list:
    """[size, mtime_ns, sha256 of SAMPLES pieces of SAMPLE_BYTES spread evenly over the file, the
    first at its start and the last at its end]: what a resumed merge compares for each input."""
    fd = open_regular(path)
    try:
        st = os.fstat(fd)
        digest = hashlib.sha256()
        last = max(st.st_size - SAMPLE_BYTES, 0)
        for i in range(SAMPLES):
            digest.update(os.pread(fd, SAMPLE_BYTES, last * i // (SAMPLES - 1)))
    except OSError as exc:
        raise NeurokernError(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return [st.st_size, st.st_mtime_ns, digest.hexdigest()]


def _inside(folder: Path, file: Path) -> None:
    """Refuse a file of a model folder that resolves outside it (a symbolic link to elsewhere),
    except a Hugging Face cache snapshot's links into its repository's blobs/ (the folder is
    REPO/snapshots/REVISION, its files link to REPO/blobs/HASH)."""
    root, real = folder.resolve(), file.resolve()
    if real.is_relative_to(root):
        return
    if root.parent.name == "snapshots" and real.is_relative_to((root.parent.parent / "blobs").resolve()):
        return
    raise NeurokernError(f"{file} resolves to {real}, outside the model folder {folder}; expected the model's files "
                         "inside its folder (or, in a Hugging Face cache snapshot, in the repository's blobs/)")


def _check_file(folder: Path, file: Path, listed_in: Path = None) -> None:
    """file exists, is a regular file (a stat: nothing is opened) and lies inside folder."""
    try:
        mode = os.stat(file).st_mode
    except FileNotFoundError as exc:
        if listed_in is not None:
            raise NeurokernError(f"{file}: listed in {listed_in} but missing") from exc
        raise NeurokernError(f"{file} is a symbolic link to a missing file") from exc
    except OSError as exc:
        raise NeurokernError(f"cannot read {file}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        raise NeurokernError(f"{file} is {_kind(mode)}, not a regular file")
    _inside(folder, file)


def _index_files(folder: Path, index: Path) -> list[Path]:
    """The files an index's weight_map names: relative paths that stay inside the folder."""
    _check_file(folder, index)
    try:
        weight_map = json.loads(read_file(index).decode("utf-8"))["weight_map"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise NeurokernError(f"{index}: not a valid index ({type(exc).__name__}: {exc})") from exc
    if not isinstance(weight_map, dict):
        raise NeurokernError(f"{index}: weight_map is {_describe(weight_map)}; expected an object of tensor name -> file")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise NeurokernError(f"{index}: weight_map[{name!r}] is {_describe(file)}; expected a file name")
        relative = PurePosixPath(file)
        if relative.is_absolute() or ".." in relative.parts:
            raise NeurokernError(f"{index}: weight_map[{name!r}] is {file!r}, a path out of the model folder; expected "
                                 f"a file inside {folder}")
    files = [folder / f for f in dict.fromkeys(weight_map.values())]
    for file in files:
        _check_file(folder, file, listed_in=index)
    return files


def weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    """The weight files of a model: a file, or a folder's index shards / single file, each a regular
    file inside the folder. Nothing is opened but the index."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as exc:
        raise NeurokernError(f"model path {path} does not exist") from exc
    except OSError as exc:
        raise NeurokernError(f"cannot read model path {path}: {exc.strerror or exc}") from exc
    if stat.S_ISREG(mode):
        if path.suffix == ".safetensors" or (allow_pickle and path.suffix in PICKLE_SUFFIXES):
            return [path]
        if path.suffix in PICKLE_SUFFIXES:
            raise NeurokernError(f"{path}: pickled checkpoints can run code when loaded; convert to safetensors or pass --allow-pickle")
        raise NeurokernError(f"{path}: expected a .safetensors file or a model folder")
    if not stat.S_ISDIR(mode):
        raise NeurokernError(f"model path {path} is {_kind(mode)}; expected a .safetensors file or a model folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise NeurokernError(f"model path {path} is not a readable folder")
    for index_name, suffix in ((INDEX, ".safetensors"), (PICKLE_INDEX, ".bin")):
        index = path / index_name
        if os.path.lexists(index) and (suffix == ".safetensors" or allow_pickle):
            return _index_files(path, index)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p for s in PICKLE_SUFFIXES for p in path.glob(f"*{s}"))
        if pickled and not allow_pickle:
            raise NeurokernError(f"{path}: only pickled weights ({pickled[0].name}); convert to safetensors or pass --allow-pickle")
        files = pickled
    if not files:
        raise NeurokernError(f"{path}: no .safetensors weights found")
    for file in files:
        _check_file(path, file)
    return files


def side_files(folders: list[Path], names: tuple[str, ...]) -> dict[str, Path]:
    """name -> source of the side files (config.json, tokenizer files) that the output copies: the
    first folder holding each name wins. The same rules as for weights: a regular file inside its
    folder (a link elsewhere is refused, as it would copy that file into the output)."""
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for name in names:
            if name not in found and os.path.lexists(folder / name):
                _check_file(folder, folder / name)
                found[name] = folder / name
    return found
