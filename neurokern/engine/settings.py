"""The engine's settings from the environment: every NEUROKERN_* variable a merge reads, read once
by `EngineSettings.from_env()` (merge_models, or the command line before torch is imported) and
handed to the code that uses it. docs/environment.md lists them. This module does not import torch."""
import os
from dataclasses import dataclass
from typing import Mapping, Optional

from neurokern.errors import NeurokernError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class EngineSettings:
    """What a merge reads from NEUROKERN_* variables; the defaults are those of an empty environment."""

    read_threads: int = 16  # NEUROKERN_READ_THREADS: threads reading the inputs
    # NEUROKERN_READ_PIECE_BYTES: every tensor is read in pieces of at most this many bytes, each a
    # job of its own (a large tensor is read by many threads at once)
    read_piece_bytes: int = 16 * 2**20
    adapter_piece_bytes: int = 4 * 2**20  # NEUROKERN_ADAPTER_PIECE_BYTES: float32 size of the ΔW rows of a piece of a LoRA-adapted weight
    max_unit_bytes: int = 512 * 2**20  # NEUROKERN_MAX_UNIT_BYTES: input bytes of one work unit (unless one tensor needs more)
    prefetch: bool = True  # NEUROKERN_PREFETCH: warm-up reads while the merge starts
    dist_backend: Optional[str] = None  # NEUROKERN_DIST_BACKEND: "nccl" or "gloo"; None: NCCL on GPUs, gloo on CPUs
    dist_timeout_s: float = 7200.0  # NEUROKERN_DIST_TIMEOUT: bound of every wait between ranks
    profile: bool = False  # NEUROKERN_PROFILE: the per-section time summary on stderr
    trace: str = ""  # NEUROKERN_TRACE: file of the Chrome trace of every timed block ("": none)

    def __post_init__(self):
        for name, variable in (("read_threads", "NEUROKERN_READ_THREADS"),
                               ("read_piece_bytes", "NEUROKERN_READ_PIECE_BYTES"),
                               ("adapter_piece_bytes", "NEUROKERN_ADAPTER_PIECE_BYTES"),
                               ("max_unit_bytes", "NEUROKERN_MAX_UNIT_BYTES")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise NeurokernError(f"{name} ({variable}) = {value!r}: expected a whole number above 0")
        if self.dist_backend not in (None, "nccl", "gloo"):
            raise NeurokernError(f"NEUROKERN_DIST_BACKEND={self.dist_backend!r}: expected 'gloo', or 'nccl' with "
                                 "--device cuda")
        if not (isinstance(self.dist_timeout_s, (int, float)) and 0 < self.dist_timeout_s < 1e9):
            raise NeurokernError(f"NEUROKERN_DIST_TIMEOUT={self.dist_timeout_s!r}: expected a number of seconds "
                                 "above 0")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "EngineSettings":
        """Every variable read once from `environ` (default os.environ); an unset or empty one takes
        the default. A bad value is one NeurokernError naming the variable and what was expected."""
        env = os.environ if environ is None else environ

        def text(variable: str) -> str:
            return env.get(variable, "").strip()

        def whole(variable: str, default: int) -> int:
            value = text(variable)
            if not value:
                return default
            if not value.isdigit() or int(value) < 1:
                raise NeurokernError(f"{variable}={value!r}: expected a whole number above 0")
            return int(value)

        def flag(variable: str, default: bool) -> bool:
            value = text(variable).lower()
            if not value:
                return default
            if value not in _TRUE + _FALSE:
                raise NeurokernError(f"{variable}={value!r}: expected 1 (on) or 0 (off)")
            return value in _TRUE

        timeout = text("NEUROKERN_DIST_TIMEOUT")
        try:
            timeout_s = float(timeout) if timeout else cls.dist_timeout_s
        except ValueError:
            timeout_s = -1.0  # refused below, naming the variable
        if not 0 < timeout_s < 1e9:
            raise NeurokernError(f"NEUROKERN_DIST_TIMEOUT={timeout!r}: expected a number of seconds above 0")
        backend = text("NEUROKERN_DIST_BACKEND") or None
        return cls(read_threads=whole("NEUROKERN_READ_THREADS", cls.read_threads),
                   read_piece_bytes=whole("NEUROKERN_READ_PIECE_BYTES", cls.read_piece_bytes),
                   adapter_piece_bytes=whole("NEUROKERN_ADAPTER_PIECE_BYTES", cls.adapter_piece_bytes),
                   max_unit_bytes=whole("NEUROKERN_MAX_UNIT_BYTES", cls.max_unit_bytes),
                   prefetch=flag("NEUROKERN_PREFETCH", cls.prefetch),
                   dist_backend=backend, dist_timeout_s=timeout_s,
                   profile=flag("NEUROKERN_PROFILE", cls.profile),
                   trace=env.get("NEUROKERN_TRACE", ""))
