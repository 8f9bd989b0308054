"""Checking user-facing parameters: one place for the messages a user sees."""
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from neurokern.errors import NeurokernError


def choice(where: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise NeurokernError(f"{where}: {name} must be one of {options}; got {value!r}")
    return value


def number(where: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise NeurokernError(f"{where}: {name} must be a finite number; got {value!r}")
    return float(value)


def density(where: str, value: Any, name: str = "density") -> float:
    value = number(where, name, value)
    if not 0.0 < value <= 1.0:
        raise NeurokernError(f"{where}: {name} must be in (0, 1]; got {value}")
    return value


def densities(where: str, value: Any, num_tasks: int) -> list[float]:
    """One density for every model, or a list with one per model (mergekit's per-model density)."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_tasks:
            raise NeurokernError(
                f"{where}: density has {len(value)} entries for {num_tasks} fine-tuned models; give one per model"
            )
        return [density(where, d, f"density[{i}]") for i, d in enumerate(value)]
    return [density(where, value)] * num_tasks


def weights(where: str, value: Optional[Sequence[Any]], num_tasks: int) -> list[float]:
    """Per-model weights: default 1 each; one finite number per fine-tuned model."""
    if value is None:
        return [1.0] * num_tasks
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [number(where, "weights", value)] * num_tasks
    value = list(value)
    if len(value) != num_tasks:
        raise NeurokernError(
            f"{where}: weights has {len(value)} entries for {num_tasks} fine-tuned models; give one per model"
        )
    return [number(where, f"weights[{i}]", w) for i, w in enumerate(value)]


def normalize(where: str, value: Any) -> str:
    """mergekit's bool or neurokern's name: True -> "weights", False/None -> "none"."""
    if value is True:
        return "weights"
    if value is False or value is None:
        return "none"
    return choice(where, "normalize", value, ["weights", "count", "none"])


def integer(where: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise NeurokernError(f"{where}: {name} must be an integer; got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Parameters that vary over the tensors of a model: mergekit's gradients and filters.

# The layer index in a tensor name: model.layers.3.mlp..., transformer.h.3.attn..., blocks.3...
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> Optional[int]:
    """The layer index a tensor name holds, or None for a tensor outside the layers."""
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


# Tensors outside the layers that mergekit counts before them (its "pre" weights: embeddings); the
# others outside the layers (final norm, head) come after them.
BEFORE_LAYERS = re.compile(r"embed|wte|wpe")


@dataclass(frozen=True)
class Layers:
    """Where each output layer sits in mergekit's output slices, which sets its place t in [0, 1]
    along a gradient: layer i of a slice of n layers has t = i / (n - 1) (1 when n = 1); a tensor
    outside the layers (embeddings, final norm, head) has t = 0, as in mergekit, and takes the
    settings of the first slice (embeddings) or of the last (the others)."""

    slices: tuple[tuple[int, int], ...]  # (first output layer, number of layers) of each slice

    def slice_of(self, name: str) -> int:
        layer = layer_of(name)
        if layer is None:
            return 0 if BEFORE_LAYERS.search(name) else len(self.slices) - 1
        for index, (first, count) in enumerate(self.slices):
            if first <= layer < first + count:
                return index
        return len(self.slices) - 1

    def t(self, name: str) -> float:
        layer = layer_of(name)
        if layer is None:
            return 0.0
        first, count = self.slices[self.slice_of(name)]
        return (layer - first) / (count - 1) if count > 1 else 1.0


@dataclass(frozen=True)
class PerTensor:
    """A parameter value that depends on the tensor (mergekit's per-layer gradients and filters).
    `settings` holds, for each output slice (Layers), the value from the most specific scope to the
    least (a model's parameters, then the slice's, then the config's top-level ones); each is a
    scalar, a gradient (a tuple of numbers interpolated along the slice's layers) or a tuple of
    Conditions, the first whose filter is a substring of the tensor's name applying. The first
    scope with a value for a tensor gives it; `default` applies when none has one."""

    key: str = field(compare=False)  # the config key, for messages
    settings: tuple[tuple[Any, ...], ...] = ()
    layers: Layers = Layers(((0, 1),))
    default: Any = None

    def at(self, name: str) -> Any:
        t = self.layers.t(name)
        for setting in self.settings[self.layers.slice_of(name)]:
            value = _evaluate(setting, name, t)
            if value is not None:
                return value
        return self.default

    def __repr__(self) -> str:
        def show(setting):
            if isinstance(setting, tuple) and setting and isinstance(setting[0], Condition):
                return "[" + ", ".join(f"{c.filter or '*'}: {show(c.value)}" for c in setting) + "]"
            return repr(list(setting)) if isinstance(setting, tuple) else repr(setting)
        chains = " | ".join(" > ".join(show(s) for s in chain if s is not None) or "-" for chain in self.settings)
        return f"per-tensor {self.key} ({chains}; layers {list(self.layers.slices)}; default {self.default!r})"

    def leaves(self) -> list:
        """Every value a setting names (the ends a gradient interpolates between), and the default:
        checking these checks every value the parameter can take, for checks of a range."""
        found: list = []
        for chain in self.settings:
            for setting in chain:
                _leaves(setting, found)
        if self.default is not None:
            found.append(self.default)
        return list(dict.fromkeys(found))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _evaluate(setting: Any, name: str, t: float) -> Any:
    """mergekit's evaluate_setting: scalars as they are, a numeric gradient interpolated at t (any
    other list indexed at t), conditions by filter (None when none matches)."""
    if not isinstance(setting, tuple):
        return setting
    if not setting:
        return None
    if isinstance(setting[0], Condition):
        for condition in setting:
            if condition.filter in (None, "*") or (name and condition.filter in name):
                return _evaluate(condition.value, name, t)
        return None
    if not all(_is_number(v) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    low = int(scaled)
    high = min(len(setting) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * setting[low] + frac * setting[high]


def _leaves(setting: Any, found: list) -> None:
    if setting is None:
        return
    if not isinstance(setting, tuple):
        found.append(setting)
    elif setting and isinstance(setting[0], Condition):
        for condition in setting:
            _leaves(condition.value, found)
    else:
        found.extend(setting)


@dataclass(frozen=True)
class Condition:
    """One `- filter: ... value: ...` entry of a mergekit parameter."""

    filter: Optional[str]
    value: Any


def varies(value: Any) -> bool:
    """Whether a parameter value (or an entry of a per-model list) is a PerTensor."""
    if isinstance(value, PerTensor):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, PerTensor) for v in value)


def at(value: Any, name: str) -> Any:
    """A parameter value for one tensor: PerTensor entries evaluated, the rest as given."""
    if isinstance(value, PerTensor):
        return value.at(name)
    if isinstance(value, (list, tuple)) and any(isinstance(v, PerTensor) for v in value):
        return [v.at(name) if isinstance(v, PerTensor) else v for v in value]
    return value


def device(where: str, value: Any, present: bool = True) -> Any:
    """The torch.device of a user's device argument (a name, a torch.device): a name torch does not
    know is an error, and so (present) is a CUDA device this machine does not have. torch is
    imported here, not by the module (a config is read without it)."""
    import torch

    try:
        dev = value if isinstance(value, torch.device) else torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise NeurokernError(f"{where}: device {value!r} is not a device name (cpu, cuda, cuda:N, ...)") from None
    if present and dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise NeurokernError(f"{where}: device {str(value)!r}, but torch sees no CUDA GPU here (a CPU-only build of "
                                 "torch, or no GPU visible); use device 'cpu'")
        if dev.index is not None and dev.index >= count:
            raise NeurokernError(f"{where}: device {str(value)!r}, but this machine has {count} CUDA GPU(s): "
                                 f"cuda:0 to cuda:{count - 1}")
    return dev
