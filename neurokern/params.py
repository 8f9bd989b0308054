"""Checking user-facing parameters: one place for the messages a user sees."""
import math
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
