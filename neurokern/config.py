"""Merge configs (YAML or dict) with mergekit's keys where they overlap, checked up front."""
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from neurokern.engine.files import read_file
from neurokern.errors import NeurokernError
from neurokern.params import Condition, Layers, PerTensor, layer_of

# mergekit method -> (neurokern method, parameter defaults that give mergekit's semantics)
MERGEKIT_METHODS = {
    "task_arithmetic": ("task_arithmetic", {"normalize": False}),
    "ties": ("ties", {"normalize": True}),
    "dare_ties": ("dare_ties", {"normalize": False, "rescale": "l1"}),
    "dare_linear": ("dare", {"normalize": False, "rescale": "l1"}),
    "breadcrumbs": ("breadcrumbs", {}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {}),
    "della": ("della", {}),
    "della_linear": ("della_linear", {}),
    "linear": ("linear", {}),
    "slerp": ("slerp", {}),
    "nuslerp": ("nuslerp", {}),
    "model_stock": ("model_stock", {}),
    "passthrough": ("passthrough", {}),
    "neuromerging": ("neuromerging", {}),
    "magnitude_prune": ("magnitude_prune", {}),  # PEFT's, not mergekit's
}
# mergekit 0.1.5's other methods: named in the error a config that asks for one gets
MERGEKIT_ONLY = ("sce", "karcher", "multislerp", "nearswap", "arcee_fusion", "ram", "ramplus_tl")
TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "chat_template", "out_shard_size"}
UNSUPPORTED_TOP = {"modules": "per-module configs (multimodal models) are not supported; use models: or slices:"}
MODEL_KEYS = {"model", "parameters"}
SLICE_KEYS = {"sources", "parameters"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
GTA = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
# The parameters each mergekit method takes, per model (mergekit's NON_BASE and INPUT scopes) and for
# the whole merge; neuromerging and registered methods take neurokern's own names.
PER_MODEL_KEYS = {**{m: ("weight", "density") for m in GTA}, "linear": ("weight",), "nuslerp": ("weight",),
                  "passthrough": ("scale",), "slerp": (), "model_stock": ()}
PER_MODEL_KEYS.update(breadcrumbs=("weight", "density", "gamma"), breadcrumbs_ties=("weight", "density", "gamma"),
                      della=("weight", "density", "epsilon"), della_linear=("weight", "density", "epsilon"))
SHARED_KEYS = {**{m: ("normalize", "rescale", "lambda", "int8_mask") for m in GTA}, "linear": ("normalize",),
               "slerp": ("t",), "nuslerp": ("nuslerp_flatten", "nuslerp_row_wise"), "model_stock": ("filter_wise",),
               "passthrough": ()}
SHARED_KEYS["task_arithmetic"] = ("normalize", "lambda", "int8_mask")
SHARED_KEYS["ties"] = ("normalize", "lambda", "int8_mask")
PER_MODEL = {"weight", "density"}  # per-model keys of neurokern's own methods (neuromerging, registered ones)
RENAMED = {"lambda": "scale", "weight": "weights"}  # mergekit's name -> neurokern's
IGNORED = {"int8_mask"}  # mergekit's memory options that do not change the result
# mergekit's defaults for the per-model parameters of its methods (density 1.0: no trim)
MERGEKIT_DEFAULTS = {
    **{m: {"weight": 1.0, "density": 1.0} for m in GTA},
    "task_arithmetic": {"weight": 1.0},
    "linear": {"weight": 1.0},
    "nuslerp": {"weight": 1.0},
    "breadcrumbs": {"weight": 1.0, "density": 1.0, "gamma": 0.01},
    "breadcrumbs_ties": {"weight": 1.0, "density": 1.0, "gamma": 0.01},
    "della": {"weight": 1.0, "density": 1.0, "epsilon": 0.15},
    "della_linear": {"weight": 1.0, "density": 1.0, "epsilon": 0.15},
}
NEEDS_BASE = set(GTA) | {"slerp", "model_stock", "neuromerging", "magnitude_prune"}
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


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
    if merge_method in MERGEKIT_ONLY:
        raise NeurokernError(f"config key 'merge_method': mergekit's {merge_method!r} is not implemented in neurokern; "
                             f"it implements {', '.join([*MERGEKIT_METHODS, *registered])}")
    raise NeurokernError(
        f"config key 'merge_method': {merge_method!r} is not one of {', '.join([*MERGEKIT_METHODS, *registered])}"
    )


@dataclass
class MergeConfig:
    method: str
    base_model: Path
    models: list[Path]
    params: dict[str, Any] = field(default_factory=dict)
    dtype: Optional[str] = None  # the inputs' floating-point tensors are converted to it (mergekit's dtype)
    out_dtype: Optional[str] = None  # the output's, when it differs (mergekit's out_dtype)
    tokenizer_source: Optional[Path] = None
    out_shard_size: int = 5 * 2**30
    raw: dict[str, Any] = field(default_factory=dict)
    # slices: of passthrough: the output's layers, each (model folder, its layer index), in output
    # order; the base_model gives the tensors outside the layers before them (embeddings), and
    # `last_model` those after them (final norm, head). None: the models' tensors as they are.
    stack: Optional[tuple[tuple[Path, int], ...]] = None
    last_model: Optional[Path] = None
    base_is_first_model: bool = False  # no base_model (linear, nuslerp): the first model stands in as the base
    config_updates: dict[str, Any] = field(default_factory=dict)  # keys of the output's config.json
    chat_template: Optional[str] = None  # the text the output's chat_template.jinja gets (mergekit's chat_template)
    # neurokern parameter name -> where the config set it, for errors in the config's own words:
    # "weights" -> ["models[1].parameters.weight", ...] (one per fine-tuned model), "scale" -> "parameters.lambda"
    yaml_names: dict[str, Any] = field(default_factory=dict)

    def describe_stack(self) -> str:
        """The passthrough stack in words: "layers 0-23 of A, 20-39 of B"."""
        runs: list[list] = []
        for path, layer in self.stack or ():
            if runs and runs[-1][0] == path and runs[-1][2] == layer - 1:
                runs[-1][2] = layer
            else:
                runs.append([path, layer, layer])
        return ", ".join(f"layers {a}-{b} of {path}" for path, a, b in runs)

    def in_yaml_terms(self, message: str) -> str:
        """A method's parameter error reworded with the config's keys (weight, lambda, models[i])."""
        for name, where in self.yaml_names.items():
            if isinstance(where, list):
                def entry(match, where=where):
                    index = int(match.group(1))
                    return f"config {where[index]}" if index < len(where) else match.group(0)
                message = re.sub(rf"method '[^']+': {name}\[(\d+)\]", entry, message)
                every = where[0] if len(where) == 1 else re.sub(r"\[\d+\]", "[*]", where[0], count=1)
                message = re.sub(rf"method '[^']+': {name}\b", f"config {every}", message)
            else:
                message = re.sub(rf"method '[^']+': {name}\b", f"config {where}", message)
        return message


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
        takes = f"allowed: {', '.join(sorted(allowed))}" if allowed else "none are taken here"
        raise NeurokernError(f"{where}: unknown key(s) {', '.join(map(repr, extra))}; {takes}")


@dataclass
class _Source:
    path: Path
    layer_range: Optional[tuple[int, int]]
    params: dict[str, Any]
    where: str  # e.g. "models[2]" or "slices[0].sources[1]"


def _read(source: Union[str, Path, dict], root: Optional[Path]) -> tuple[dict, Path]:
    if isinstance(source, dict):
        return source, root or Path.cwd()
    path = Path(source)
    try:
        documents = list(yaml.safe_load_all(read_file(path, "config ").decode("utf-8")))
    except UnicodeDecodeError as exc:
        raise NeurokernError(f"config {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise NeurokernError(f"config {path} is not valid YAML ({where}{problem})") from exc
    if len(documents) > 1:
        raise NeurokernError(f"config {path} holds {len(documents)} YAML documents (a mergekit-multi config); "
                             "neurokern merges one config at a time: give each its own file")
    return (documents[0] if documents else None), root or path.parent


def resolve_path(value: Any, key: str, root: Path) -> Path:
    """A model path of a config. An absolute path is itself. A relative one is looked for where
    mergekit looks (the working directory) and in the config's folder: the one that exists is
    taken; when both exist and differ, that is an error naming both; when neither does, the
    config's folder (the error then names that path)."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise NeurokernError(f"config key {key!r}: expected a model folder or .safetensors file; got {value!r}")
    text = str(value)
    if "+" in text and not Path(text).exists():
        raise NeurokernError(f"config key {key!r}: {text!r} names a LoRA (model+adapter); merge the adapter into its model "
                             "first (neurokern reads full models)")
    path = Path(text).expanduser()
    if path.is_absolute():
        return path
    in_cwd, in_root = Path.cwd() / path, (Path(root) / path).absolute()
    if in_cwd.exists() and in_root.exists() and in_cwd.resolve() != in_root.resolve():
        raise NeurokernError(f"config key {key!r}: {text!r} is both {in_cwd} (relative to the working directory, "
                             f"as mergekit reads it) and {in_root} (relative to the config's folder); give an absolute path")
    return in_cwd if in_cwd.exists() else in_root


def _setting(value: Any, where: str) -> Any:
    """A mergekit parameter setting in hashable form: a scalar, a gradient (tuple of scalars) or a
    tuple of Conditions."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if all(isinstance(v, dict) for v in value):
            conditions = []
            for i, v in enumerate(value):
                extra = sorted(set(v) - {"filter", "value"})
                if extra or "value" not in v:
                    raise NeurokernError(f"config {where}[{i}]: expected {{filter: NAME_PART, value: ...}}; got {v!r}")
                if v.get("filter") is not None and not isinstance(v["filter"], str):
                    raise NeurokernError(f"config {where}[{i}].filter: expected a piece of a tensor name; got {v['filter']!r}")
                inner = _setting(v["value"], f"{where}[{i}].value")
                if isinstance(inner, tuple) and inner and isinstance(inner[0], Condition):
                    raise NeurokernError(f"config {where}[{i}].value: expected a value or a gradient list; got {v['value']!r}")
                conditions.append(Condition(v.get("filter"), inner))
            return tuple(conditions)
        if all(isinstance(v, (bool, int, float, str)) for v in value):
            return tuple(value)
    raise NeurokernError(f"config {where}: expected a value, a gradient list such as [0, 0.5, 1] or a list of "
                         f"{{filter: ..., value: ...}}; got {value!r}")


def _layer_count(folder: Path) -> int:
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise NeurokernError(f"{folder / 'config.json'}: cannot read the number of layers that per-layer parameter "
                             f"values (gradients) need ({exc})") from exc
    for key in LAYER_COUNT_KEYS:
        if isinstance(data.get(key), int):
            return data[key]
    raise NeurokernError(f"{folder / 'config.json'} has none of {', '.join(LAYER_COUNT_KEYS)}: per-layer parameter "
                         "values (gradients) need the number of layers")


def _range(value: Any, where: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not 0 <= value[0] < value[1]):
        raise NeurokernError(f"config {where}.layer_range: expected [first, end) layer indices such as [0, 16]; got {value!r}")
    return int(value[0]), int(value[1])


def _sources(raw: dict, path) -> list[tuple[list[_Source], dict[str, Any], str]]:
    """The config's slices, each (sources, slice parameters, where); `models:` is one slice."""
    def params_of(entry: dict, where: str) -> dict:
        value = entry.get("parameters") or {}
        if not isinstance(value, dict):
            raise NeurokernError(f"config {where}.parameters: expected a mapping such as {{weight: 1.0, density: 0.5}}")
        return value

    if "models" in raw:
        entries = raw["models"]
        if not isinstance(entries, list) or not entries:
            raise NeurokernError("config key 'models': expected a non-empty list of {model: PATH, parameters: {...}}")
        sources = []
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict) or "model" not in entry:
                raise NeurokernError(f"config models[{i}]: expected {{model: PATH, parameters: {{...}}}}")
            _unknown(entry, MODEL_KEYS, f"config models[{i}]")
            sources.append(_Source(path(entry["model"], f"models[{i}].model"), None, params_of(entry, f"models[{i}]"),
                                   f"models[{i}]"))
        return [(sources, {}, "parameters")]
    slices = raw["slices"]
    if not isinstance(slices, list) or not slices:
        raise NeurokernError("config key 'slices': expected a non-empty list of {sources: [{model: PATH, layer_range: [a, b]}]}")
    out = []
    for k, piece in enumerate(slices):
        where = f"slices[{k}]"
        if not isinstance(piece, dict) or not isinstance(piece.get("sources"), list) or not piece["sources"]:
            raise NeurokernError(f"config {where}: expected {{sources: [{{model: PATH, layer_range: [a, b]}}, ...]}}")
        if "base_model" in piece or "residual_weight" in piece:
            key = "base_model" if "base_model" in piece else "residual_weight"
            raise NeurokernError(f"config {where}.{key}: a per-slice {key} is not supported; set base_model at the top")
        _unknown(piece, SLICE_KEYS, f"config {where}")
        sources = []
        for i, entry in enumerate(piece["sources"]):
            at = f"{where}.sources[{i}]"
            if not isinstance(entry, dict) or "model" not in entry or "layer_range" not in entry:
                raise NeurokernError(f"config {at}: expected {{model: PATH, layer_range: [a, b]}}")
            _unknown(entry, SOURCE_KEYS, f"config {at}")
            sources.append(_Source(path(entry["model"], f"{at}.model"), _range(entry["layer_range"], at),
                                   params_of(entry, at), at))
        out.append((sources, params_of(piece, where), f"{where}.parameters"))
    return out


def load_config(source: Union[str, Path, dict], root: Optional[Path] = None) -> MergeConfig:
    """Read and check a merge config (mergekit's keys). Relative model paths: resolve_path."""
    raw, root = _read(source, root)
    if not isinstance(raw, dict):
        raise NeurokernError("config: expected a mapping with merge_method, base_model and models")
    if "merge_method" not in raw:
        raise NeurokernError("config: missing key 'merge_method'")
    method, params = _method(raw["merge_method"])  # an unsupported method is the error to give first
    params = dict(params)
    for key, why in UNSUPPORTED_TOP.items():
        if key in raw:
            raise NeurokernError(f"config key {key!r}: {why}")
    _unknown(raw, TOP_KEYS, "config")
    if "models" not in raw and "slices" not in raw:
        raise NeurokernError("config: missing key 'models'")
    if "models" in raw and "slices" in raw:
        raise NeurokernError("config: give 'models' or 'slices', not both")
    merge_method = raw["merge_method"]
    path = lambda value, key: resolve_path(value, key, Path(root))  # noqa: E731
    base_model = path(raw["base_model"], "base_model") if raw.get("base_model") is not None else None
    if base_model is None and (merge_method in NEEDS_BASE or merge_method not in MERGEKIT_METHODS):
        raise NeurokernError(f"config: missing key 'base_model' (merge method {merge_method!r} needs one)")
    slices = _sources(raw, path)
    top = raw.get("parameters") or {}
    if not isinstance(top, dict):
        raise NeurokernError("config key 'parameters': expected a mapping such as {normalize: true, lambda: 1.0}")

    referenced = list(dict.fromkeys([*([base_model] if base_model else []), *(s.path for sources, _, _ in slices for s in sources)]))
    common = dict(
        chat_template=_chat_template(raw.get("chat_template"), referenced),
        dtype=_dtype(raw, "dtype"), out_dtype=_dtype(raw, "out_dtype"), tokenizer_source=_tokenizer(raw, base_model, path),
        out_shard_size=parse_size(raw.get("out_shard_size", 5 * 2**30), "out_shard_size"), raw=raw)
    if method == "passthrough":
        return _passthrough(slices, top, base_model, method, params, common)

    # Every slice of a merge names the same models; their layers must stay where they are.
    first = slices[0][0]
    for k, (sources, _, _) in enumerate(slices[1:], 1):
        if [s.path for s in sources] != [s.path for s in first]:
            raise NeurokernError(f"config slices[{k}].sources: every slice of a {merge_method} merge must name the same "
                                 "models in the same order (only passthrough stacks layers of different models)")
    layers = _layers(slices, base_model or first[0].path, merge_method)

    if base_model is None:  # linear, nuslerp: the first model stands in as the engine's base
        inputs, engine_base = list(range(len(first))), first[0].path
    else:
        engine_base = base_model
        inputs = [i for i, s in enumerate(first) if s.path != base_model]  # mergekit skips the base too
    if len(inputs) == (0 if base_model is not None else 1) and merge_method != "linear":
        raise NeurokernError("config key 'models': no fine-tuned model besides the base_model")
    per_model_keys = PER_MODEL_KEYS.get(merge_method, tuple(PER_MODEL))
    shared_keys = SHARED_KEYS.get(merge_method)
    mergekit_defaults = MERGEKIT_DEFAULTS.get(merge_method, {})
    for sources, slice_params, where in slices:
        for s in sources:
            _unknown(s.params, set(per_model_keys), f"config {s.where}.parameters")
        if shared_keys is not None and where != "parameters":
            _unknown(slice_params, set(per_model_keys) | set(shared_keys), f"config {where}")

    def value(key: str, entry: Optional[int], default: Any, label: str) -> Any:
        """One parameter for one model (entry: its index among the sources) or for the merge."""
        chains = []
        for sources, slice_params, where in slices:
            chain = []
            if entry is not None:
                chain.append(_setting(sources[entry].params.get(key), f"{sources[entry].where}.parameters.{key}"))
            if slices[0][2] != "parameters":
                chain.append(_setting(slice_params.get(key), f"{where}.{key}"))
            chain.append(_setting(top.get(key), f"parameters.{key}"))
            chains.append(tuple(chain))
        if all(not isinstance(v, tuple) for chain in chains for v in chain):
            found = {next((v for v in chain if v is not None), None) for chain in chains}
            if len(found) == 1:
                found_value = found.pop()
                return default if found_value is None else found_value
        gradient = any(_has_gradient(v) for chain in chains for v in chain)
        return PerTensor(label, tuple(chains), layers() if gradient or len(slices) > 1 else Layers(((0, 1),)), default)

    yaml_names: dict[str, Any] = {}
    for key in per_model_keys:
        name = RENAMED.get(key, key)
        if key == "weight" and merge_method == "linear" and base_model is not None:
            listed = next((i for i, s in enumerate(first) if s.path == base_model), None)
            base_weight = value(key, listed, None, "weight")
            if base_weight is None:
                raise NeurokernError("config: linear merges the base_model with the models; give the base_model a weight "
                                     "(list it under models with parameters: {weight: ...}, or set parameters.weight)")
            params["base_weight"] = base_weight
        entries = inputs
        if key == "weight" and merge_method == "linear" and base_model is None:
            params["base_weight"] = value(key, 0, mergekit_defaults.get(key), "weight")
            entries = inputs[1:]
        values = [value(key, i, mergekit_defaults.get(key), f"{first[i].where}.parameters.{key}") for i in entries]
        if merge_method == "nuslerp" and key == "weight" and base_model is None:
            params["use_base"] = False
        if all(v is None for v in values) or not values:
            continue
        if any(v is None for v in values):
            raise NeurokernError(f"config models[*].parameters.{key}: give a {key} for every model or for none")
        if key == "density" and len(set(values)) == 1:  # one value (or one per-tensor value) for every model
            params[name] = values[0]
        else:
            params[name] = values
        yaml_names[name] = [f"{first[i].where}.parameters.{key}" for i in entries]

    method_defaults = dict(params)
    shared = dict.fromkeys([*top, *(k for _, slice_params, _ in slices for k in slice_params)])
    for key in shared:
        if key in per_model_keys or key in IGNORED or (key == "rescale" and merge_method == "task_arithmetic"):
            continue  # mergekit's task_arithmetic has nothing to rescale
        if key == "weights" and isinstance(top.get(key), list):
            # nk.merge's name for one weight per fine-tuned model, not a mergekit key: a list
            # there is per model (never a per-layer gradient, which mergekit's `weight` takes)
            if "weight" in top or any("weight" in slice_params or any("weight" in s.params for s in sources)
                                      for sources, slice_params, _ in slices):
                raise NeurokernError("config: give models[*].parameters.weight or parameters.weights (one per "
                                     "fine-tuned model), not both")
            params["weights"], yaml_names["weights"] = list(top[key]), "parameters.weights"
            continue
        name = RENAMED.get(key, key)
        params[name] = value(key, None, method_defaults.get(name), f"parameters.{key}")
        yaml_names[name] = f"parameters.{key}" if key in top else f"slices[*].parameters.{key}"
    if merge_method in GTA and "rescale" in params and method in ("dare", "dare_ties"):
        params["rescale"] = _rescale(params["rescale"])

    return MergeConfig(method=method, base_model=engine_base, models=[first[i].path for i in inputs
                                                                    if not (base_model is None and i == 0)],
                       params=params, yaml_names=yaml_names, base_is_first_model=base_model is None, **common)


def _has_gradient(setting: Any) -> bool:
    if not isinstance(setting, tuple):
        return False
    if setting and isinstance(setting[0], Condition):
        return any(_has_gradient(c.value) for c in setting)
    return True


def _rescale(value: Any) -> Any:
    """mergekit's boolean rescale of DARE: True is its L1-norm match, False none."""
    if value is True:
        return "l1"
    if value is False:
        return None
    return value


def _layers(slices, model: Path, merge_method: str):
    """A function giving the Layers of the config (read only when a parameter varies: the models:
    form takes the layer count from the model's config.json)."""
    if slices[0][0][0].layer_range is None:
        return lambda: Layers(((0, _layer_count(model)),))
    position, table = 0, []
    for k, (sources, _, _) in enumerate(slices):
        ranges = {s.layer_range for s in sources}
        first, end = sources[0].layer_range
        if len(ranges) != 1 or first != position:
            raise NeurokernError(f"config slices[{k}].sources: a {merge_method} merge keeps every layer in its place, so "
                                 f"each source of this slice needs layer_range [{position}, ...] (only passthrough moves "
                                 "layers)")
        table.append((first, end - first))
        position = end
    count = _layer_count(model) if (model / "config.json").is_file() else position
    if position != count:
        raise NeurokernError(f"config slices: the slices cover layers [0, {position}) of {count}; a {merge_method} merge "
                             "covers every layer once (only passthrough drops or repeats layers)")
    return lambda: Layers(tuple(table))


def _dtype(raw: dict, key: str) -> Optional[str]:
    dtype = raw.get(key)
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise NeurokernError(f"config key {key!r}: expected float32, bfloat16 or float16; got {dtype!r}")
    return dtype


def _tokenizer(raw: dict, base_model: Optional[Path], path) -> Optional[Path]:
    source = raw.get("tokenizer_source")
    tokenizer = raw.get("tokenizer")
    if tokenizer is not None:
        if source is not None:
            raise NeurokernError("config: give tokenizer_source or tokenizer, not both")
        if not isinstance(tokenizer, dict):
            raise NeurokernError("config key 'tokenizer': expected {source: base | PATH}")
        for key in ("tokens", "pad_to_multiple_of"):
            if tokenizer.get(key):
                raise NeurokernError(f"config key 'tokenizer.{key}': building a vocabulary (added tokens, padding the "
                                     "embeddings) is not supported; neurokern copies one model's tokenizer")
        _unknown(tokenizer, {"source", "tokens", "pad_to_multiple_of"}, "config key 'tokenizer'")
        source = tokenizer.get("source")
    if source is None:
        return None
    if source == "union":
        raise NeurokernError("config key 'tokenizer_source': 'union' (a merged vocabulary) is not supported; "
                             "give 'base' or a model folder")
    if source == "base":
        if base_model is None:
            raise NeurokernError("config key 'tokenizer_source': 'base' needs a base_model")
        return base_model
    return path(source, "tokenizer_source")


def _chat_template(value: Any, models: list[Path]) -> Optional[str]:
    """mergekit's chat_template: "auto" (the template most of the models have, in the order they are
    named; none: the tokenizer's own), the name of one of mergekit's templates (read from the
    installed mergekit), or the template's text."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise NeurokernError(f"config key 'chat_template': expected auto, a template name or a template; got {value!r}")
    if value == "auto":
        found = [t.strip() for t in map(_model_chat_template, models) if t]
        return max(found, key=found.count) if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        from importlib import resources

        try:
            templates = resources.files("mergekit._data.chat_templates")
        except ImportError as exc:
            raise NeurokernError(f"config key 'chat_template': {value!r} names one of mergekit's templates; install "
                                 "mergekit (pip install 'neurokern[mergekit]') for them, or give the template's text"
                                 ) from exc
        if templates.joinpath(value + ".jinja").is_file():
            return templates.joinpath(value + ".jinja").read_text()
        names = sorted(p.name[:-6] for p in templates.iterdir() if p.name.endswith(".jinja"))
        raise NeurokernError(f"config key 'chat_template': {value!r} is not one of mergekit's templates "
                             f"({', '.join(names)}), nor a template's text")
    if len(value) < 20:
        raise NeurokernError(f"config key 'chat_template': {value!r} is neither a template name nor a template")
    return value


def _model_chat_template(folder: Path) -> Optional[str]:
    """A model folder's chat template: chat_template.jinja, else tokenizer_config.json's chat_template."""
    try:
        return (folder / "chat_template.jinja").read_text()
    except OSError:
        pass
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _passthrough(slices, top, base_model, method, params, common) -> MergeConfig:
    """passthrough: one model copied (models:), or a stack of layers from several models (slices:),
    each source one model's layers, renamed to their place in the output."""
    scale = lambda s, where: _setting(s.params.get("scale", top.get("scale")), where)  # noqa: E731
    for key in top:
        if key != "scale":
            raise NeurokernError(f"config parameters.{key}: passthrough takes only scale")
    if slices[0][0][0].layer_range is None:
        sources = slices[0][0]
        if len(sources) != 1:
            raise NeurokernError("config key 'models': passthrough copies exactly one model; stack layers of several "
                                 "with slices:")
        value = scale(sources[0], "models[0].parameters.scale")
        if isinstance(value, tuple):
            value = PerTensor("scale", ((value,),), Layers(((0, _layer_count(sources[0].path)),)))
        return MergeConfig(method=method, base_model=sources[0].path, models=[], params={**params, "scale": value} if value is not None else params,
                           yaml_names={"scale": "models[0].parameters.scale"}, **common)
    stack, table, chains, position = [], [], [], 0
    for k, (sources, slice_params, where) in enumerate(slices):
        if len(sources) != 1:
            raise NeurokernError(f"config slices[{k}].sources: passthrough takes one source per slice; got {len(sources)}")
        source = sources[0]
        _unknown(source.params, {"scale"}, f"config {source.where}.parameters")
        first, end = source.layer_range
        stack += [(source.path, layer) for layer in range(first, end)]
        table.append((position, end - first))
        position += end - first
        chains.append((_setting(source.params.get("scale"), f"{source.where}.parameters.scale"),
                       _setting(slice_params.get("scale"), f"slices[{k}].parameters.scale"),
                       _setting(top.get("scale"), "parameters.scale")))
    if any(v is not None for chain in chains for v in chain):
        params = {**params, "scale": PerTensor("scale", tuple(chains), Layers(tuple(table)))}
    donor = slices[0][0][0].path
    counts = {}
    try:
        counts = json.loads((donor / "config.json").read_text())
    except (OSError, ValueError):
        pass
    key = next((k for k in LAYER_COUNT_KEYS if isinstance(counts.get(k), int)), "num_hidden_layers")
    return MergeConfig(method=method, base_model=donor, models=[], params=params, stack=tuple(stack),
                       last_model=slices[-1][0][0].path, config_updates={key: len(stack)}, **common)
