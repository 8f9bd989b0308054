"""Merge configs (YAML or dict) with mergekit's keys where they overlap, checked up front."""
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from neurokern.engine.files import read_file
from neurokern.errors import NeurokernError

# mergekit method -> (neurokern method, parameter defaults that give mergekit's semantics)
MERGEKIT_METHODS = {
    "task_arithmetic": ("task_arithmetic", {"normalize": False}),
    "ties": ("ties", {"normalize": True}),
    "dare_ties": ("dare_ties", {"normalize": False, "rescale": "l1"}),
    "dare_linear": ("dare", {"normalize": False, "rescale": "l1"}),
    "neuromerging": ("neuromerging", {}),
    "magnitude_prune": ("magnitude_prune", {}),  # PEFT's, not mergekit's
}
TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source", "out_shard_size"}
MODEL_KEYS = {"model", "parameters"}
PER_MODEL = {"weight", "density"}
RENAMED = {"lambda": "scale"}  # mergekit's name -> neurokern's
IGNORED = {"int8_mask"}  # mergekit's memory options that do not change the result
# mergekit's defaults for the per-model parameters of its methods (density 1.0: no trim)
MERGEKIT_DEFAULTS = {
    "task_arithmetic": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 1.0},
    "dare_ties": {"weight": 1.0, "density": 1.0},
    "dare_linear": {"weight": 1.0, "density": 1.0},
}


def _method(merge_method: Any) -> tuple[str, dict[str, Any]]:
    """(neurokern method, its parameter defaults) for a mergekit name or a method added by
    neurokern.methods.register (which imports neurokern.methods, and torch with it: without that
    import no method can have been registered, and the config is read before torch is imported)."""
    if merge_method in MERGEKIT_METHODS:
        return MERGEKIT_METHODS[merge_method]
    methods = sys.modules.get("neurokern.methods")
    registered = methods.registered() if methods is not None else []
    if merge_method in registered:
        return merge_method, {}
    raise NeurokernError(
        f"config key 'merge_method': {merge_method!r} is not one of {', '.join([*MERGEKIT_METHODS, *registered])}"
    )


@dataclass
class MergeConfig:
    method: str
    base_model: Path
    models: list[Path]
    params: dict[str, Any] = field(default_factory=dict)
    dtype: Optional[str] = None
    tokenizer_source: Optional[Path] = None
    out_shard_size: int = 5 * 2**30
    raw: dict[str, Any] = field(default_factory=dict)


def parse_size(value: Union[int, str], key: str) -> int:
    """'5GB', '500MiB', '2e9' or an int number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    text = str(value).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            text, scale = text[: -len(unit)], factor
            break
    else:
        scale = 1
    try:
        size = int(float(text) * scale)
    except ValueError:
        size = 0
    if size <= 0:
        raise NeurokernError(f"config key {key!r}: expected a size such as 5GB or 500MiB; got {value!r}")
    return size


def _unknown(keys, allowed, where: str) -> None:
    extra = sorted(set(keys) - allowed)
    if extra:
        raise NeurokernError(f"{where}: unknown key(s) {', '.join(map(repr, extra))}; allowed: {', '.join(sorted(allowed))}")


def load_config(source: Union[str, Path, dict], root: Optional[Path] = None) -> MergeConfig:
    """Read and check a merge config. Relative model paths resolve against the YAML's folder."""
    if isinstance(source, dict):
        raw, root = source, root or Path.cwd()
    else:
        path = Path(source)
        try:
            raw = yaml.safe_load(read_file(path, "config ").decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise NeurokernError(f"config {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise NeurokernError(f"config {path} is not valid YAML ({where}{problem})") from exc
        root = root or path.parent
    if not isinstance(raw, dict):
        raise NeurokernError("config: expected a mapping with merge_method, base_model and models")
    _unknown(raw, TOP_KEYS, "config")
    for key in ("merge_method", "base_model", "models"):
        if key not in raw:
            raise NeurokernError(f"config: missing key {key!r}")
    method, params = _method(raw["merge_method"])
    params = dict(params)
    resolve = lambda p: Path(p) if Path(p).is_absolute() else Path(root) / p  # noqa: E731

    entries = raw["models"]
    if not isinstance(entries, list) or not entries:
        raise NeurokernError("config key 'models': expected a non-empty list of {model: PATH, parameters: {...}}")
    base_model = resolve(raw["base_model"])
    models, per_model = [], {k: [] for k in PER_MODEL}
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise NeurokernError(f"config models[{i}]: expected {{model: PATH, parameters: {{...}}}}")
        _unknown(entry, MODEL_KEYS, f"config models[{i}]")
        entry_params = entry.get("parameters") or {}
        if not isinstance(entry_params, dict):
            raise NeurokernError(f"config models[{i}].parameters: expected a mapping such as {{weight: 1.0, density: 0.5}}")
        _unknown(entry_params, PER_MODEL, f"config models[{i}].parameters")
        for key, value in entry_params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise NeurokernError(f"config models[{i}].parameters.{key}: expected a number; got {value!r} "
                                     "(mergekit's per-layer gradients and filters are not supported)")
        path = resolve(entry["model"])
        if path == base_model:
            continue  # mergekit configs often list the base among the models; mergekit skips it too
        models.append(path)
        for key in PER_MODEL:
            per_model[key].append(entry_params.get(key))
    if not models:
        raise NeurokernError("config key 'models': no fine-tuned model besides the base_model")

    # Top-level parameters; weight and density there are defaults for the models that give none
    # (mergekit's precedence), and mergekit's own default density is 1.0 (no trim).
    top = {RENAMED.get(k, k): v for k, v in (raw.get("parameters") or {}).items() if k not in IGNORED}
    defaults = MERGEKIT_DEFAULTS.get(raw["merge_method"], {})
    for key, plural in (("weight", "weights"), ("density", "density")):
        default = top.pop(key, defaults.get(key))
        values = [default if v is None else v for v in per_model[key]]
        if all(v is None for v in values):
            continue  # the method's own default applies
        if any(v is None for v in values):
            raise NeurokernError(f"config models[*].parameters.{key}: give a {key} for every model or for none")
        if key == "density" and len(set(map(repr, values))) == 1:
            params[plural] = values[0]
        else:
            params[plural] = values
    params.update(top)

    dtype = raw.get("dtype")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise NeurokernError(f"config key 'dtype': expected float32, bfloat16 or float16; got {dtype!r}")
    tokenizer_source = raw.get("tokenizer_source")
    if tokenizer_source == "union":
        raise NeurokernError("config key 'tokenizer_source': 'union' (a merged vocabulary) is not supported; "
                             "give 'base' or a model folder")
    return MergeConfig(
        method=method,
        base_model=base_model,
        models=models,
        params=params,
        dtype=dtype,
        tokenizer_source=(base_model if tokenizer_source == "base" else resolve(tokenizer_source)) if tokenizer_source else None,
        out_shard_size=parse_size(raw.get("out_shard_size", 5 * 2**30), "out_shard_size"),
        raw=raw,
    )
