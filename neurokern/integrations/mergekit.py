"""neurokern's methods inside mergekit 0.1.5: `register()` adds them to mergekit's method registry
(mergekit.merge_methods.registry.register) under their own names, and `main` runs mergekit's
`mergekit-yaml` with them registered:

    neurokern-mergekit-yaml config.yml out/ [mergekit-yaml options]
    python -m neurokern.integrations.mergekit config.yml out/ [mergekit-yaml options]

mergekit merges one tensor at a time, and so do these methods: each call hands neurokern's
method the base's tensor and the fine-tuned models' versions of it, by the tensor's name.

    neurokern_ties           TIES with mergekit's semantics (per-tensor exact-k trim), neurokern's kernels
    neurokern_dare_ties      DARE + TIES election, masks keyed by (seed, tensor name, model): the same
    neurokern_dare_linear    masks as `neurokern merge`; rescale true: mergekit's L1 match
    neurokern_neuromerging   NeuroMerging with a per-tensor trim

NeuroMerging's defaults in neurokern need the whole model before any tensor is merged: its global
trim ranks every entry of the model, and its default lambda = 1 / (1 - sigma) takes sigma over the
whole model (two streaming passes of `neurokern merge`). Inside mergekit the trim is per tensor,
and without a `lambda` each tensor gets the default lambda of its own sigma; give `lambda` to
match `neurokern merge` with `trim_scope: tensor` and the same scale."""
import sys
from typing import Any, Optional

import torch

from neurokern.errors import NeurokernError
from neurokern.methods import METHODS
from neurokern.merging import run_checked
from neurokern.models import load_models

try:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import (BasePolicy, GroupMergeMethod, InputContract, MergeMethodSpec,
                                             ParameterScope, ParameterSpec, TensorGroup)
except ImportError as exc:  # the integration needs mergekit; the library does not
    raise ImportError("neurokern.integrations.mergekit needs mergekit: pip install 'neurokern[mergekit]'") from exc

SHARED, PER_MODEL = ParameterScope.SHARED, ParameterScope.NON_BASE


class NeurokernMethod(GroupMergeMethod):
    """A neurokern method as a mergekit method: mergekit's parameters (weight, density, lambda, ...)
    translated by `translate` into the neurokern method's, run on one tensor group at a time."""

    def __init__(self, name: str, method: str, parameters: tuple, translate, pretty_name: str):
        self.method = method
        self.translate = translate
        self.spec = MergeMethodSpec(name=name, parameters=parameters, pretty_name=pretty_name,
                                    contract=InputContract(base=BasePolicy.REQUIRED))

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries:
            return base
        name = group.metadata.name or "tensor"
        params = self.translate(parameters, entries)
        models = load_models({name: base}, [{name: e.tensor} for e in entries], None)
        spec = METHODS[self.method]
        merged = run_checked(spec, models, spec.params(params, len(entries)))
        return merged.get(name, base)


def _per_model(parameters: dict, key: str, entries) -> list:
    return [parameters[key][e.id] for e in entries]


def _gta(parameters: dict, entries) -> dict:
    return {"weights": _per_model(parameters, "weight", entries), "normalize": parameters["normalize"],
            "scale": parameters["lambda"]}


def _ties(parameters: dict, entries) -> dict:
    return {**_gta(parameters, entries), "density": _per_model(parameters, "density", entries)}


def _dare(parameters: dict, entries) -> dict:
    densities = _per_model(parameters, "density", entries)
    if len(set(densities)) != 1:
        raise NeurokernError(f"neurokern's DARE takes one density for all models; got {densities}")
    return {**_gta(parameters, entries), "density": densities[0], "seed": parameters["seed"],
            "rescale": "l1" if parameters["rescale"] else None}


def _neuromerging(parameters: dict, entries) -> dict:
    return {"density": _per_model(parameters, "density", entries), "scale": parameters["lambda"],
            "scale_parallel": parameters["lambda_parallel"], "trim_scope": "tensor"}


def _common(normalize: bool) -> tuple:
    return (ParameterSpec("weight", float, PER_MODEL), ParameterSpec("density", float, PER_MODEL, default=1.0),
            ParameterSpec("normalize", bool, SHARED, default=normalize), ParameterSpec("lambda", float, SHARED, default=1.0),
            ParameterSpec("int8_mask", bool, SHARED, default=False))


def methods() -> list[NeurokernMethod]:
    dare = (ParameterSpec("rescale", bool, SHARED, default=True), ParameterSpec("seed", int, SHARED, default=0))
    return [
        NeurokernMethod("neurokern_ties", "ties", _common(True), _ties, "TIES (neurokern)"),
        NeurokernMethod("neurokern_dare_ties", "dare_ties", _common(False) + dare, _dare, "DARE TIES (neurokern)"),
        NeurokernMethod("neurokern_dare_linear", "dare", _common(False) + dare, _dare, "Linear DARE (neurokern)"),
        NeurokernMethod("neurokern_neuromerging", "neuromerging",
                        (ParameterSpec("density", float, PER_MODEL, default=0.1),
                         ParameterSpec("lambda", Optional[float], SHARED, default=None),
                         ParameterSpec("lambda_parallel", float, SHARED, default=0.0)),
                        _neuromerging, "NeuroMerging (neurokern)"),
    ]


def register() -> list[str]:
    """Adds the methods to mergekit's registry (again: nothing); returns their names."""
    taken = {m.spec.name for m in registry.registered_methods()}
    added = []
    for method in methods():
        if method.spec.name not in taken:
            registry.register(method)
        added.append(method.spec.name)
    return added


def main(argv: Optional[list[str]] = None) -> None:
    """mergekit-yaml with neurokern's methods registered (same arguments and options)."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    register()
    mergekit_yaml.main(args=sys.argv[1:] if argv is None else list(argv), prog_name="neurokern-mergekit-yaml")


if __name__ == "__main__":
    main()
