"""nk.merge: merge in-memory models (state dicts or nn.Modules) with any method."""
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from neurokern import params as checks
from neurokern.errors import NeurokernError
from neurokern.methods import METHODS, Method, check_device
from neurokern.models import ModelSet, load_models


def merge(
    base: Any,
    finetuned: Sequence[Any],
    method: str = "neuromerging",
    *,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
    **params: Any,
) -> dict[str, Tensor]:
    """Merge fine-tuned models of one pre-trained model into one.

    base: the pre-trained model; finetuned: one model per task; each a state dict (name -> tensor)
    or an nn.Module. Every model must hold the same tensor names, shapes and dtypes. Returns the
    merged state dict in base's key order and dtypes: floating-point tensors merged, other entries
    (integer buffers) copied from base. It runs where the tensors are, or on `device`.

    method and its parameters (defaults in brackets; semantics in the README):
      "task_arithmetic": weights [1 each], scale [1.0], normalize [False]
      "ties":            density [0.2], weights, consensus ["sum"|"count"], normalize [True |
                         "count" | None], scale [1.0], trim_scope ["tensor"|"global"],
                         ties ["exact_k"|"keep"|"keep_floor"], elect_on ["weighted"|"unweighted"],
                         zero_sign ["positive"|"majority"|"model_majority"]
      "dare", "dare_ties": density [0.3], weights, seed [0], rescale ["density"|"l1"|None],
                         normalize [False], scale [1.0]; dare_ties also consensus ["sum"|"count"],
                         elect_on ["weighted"|"unweighted"]
      "magnitude_prune": density [0.2], weights, scale [1.0], trim_scope ["tensor"|"global"],
                         ties ["exact_k"|"keep"] (PEFT's: a trim per task vector, then a weighted sum)
      "neuromerging":    density [0.1], scale [None: 1/(1-sigma)], scale_parallel [0.0: lite],
                         trim_scope ["global"|"tensor"], parallel_basis ["unit"|"neuron"],
                         gamma [1.0]
    mergekit's other methods, with its semantics (docs/mergekit.md):
      "linear":          weights [1 each], base_weight [0.0: the base takes no part], normalize [True]
      "slerp":           t [0.5] (one fine-tuned model)
      "nuslerp":         weights (two), nuslerp_flatten [True], nuslerp_row_wise [False], use_base [True]
      "model_stock":     filter_wise [False] (at least two fine-tuned models)
      "breadcrumbs", "breadcrumbs_ties": weights, density [1.0], gamma [0.01], rescale [False],
                         normalize [False], scale [1.0]
      "della", "della_linear": weights, density [1.0], epsilon [0.15], rescale [True], normalize
                         [della: True; della_linear: False], scale [1.0], seed [0]
      "passthrough":     scale [None] (the engine's slices; nk.merge needs a fine-tuned model)
    ties, neuromerging, magnitude_prune, breadcrumbs and della take one density or a list with one per model
    (mergekit's per-model density); any parameter may be a neurokern.params.PerTensor (a value per
    tensor: mergekit's per-layer gradients and filters). Bad input raises NeurokernError (a ValueError) naming the tensor or parameter.
    """
    if method not in METHODS:
        raise NeurokernError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    spec = METHODS[method]
    models = load_models(base, finetuned, None if device is None else checks.device("nk.merge", device))
    checked = spec.params(params, models.num_tasks)
    merged = run_checked(spec, models, checked, progress)
    return {name: merged.get(name, tensor) for name, tensor in models.base.items()}


def run_checked(spec: Method, models: ModelSet, checked: Any, progress: bool = False,
                pre: Optional[dict[str, Any]] = None) -> dict[str, Tensor]:
    """spec's merge of models.names (pre: its passes' results, if computed already) with the NaN /
    Inf check (models.check): an input holding NaN / Inf, or a merged value beyond its dtype's
    range, is a NeurokernError naming the tensor. Where the method fails on such inputs before the
    check, the check's error is the one raised."""
    if not models.names:
        return {}  # nothing to merge: the base's entries
    check_device(models.base[models.names[0]].device)
    try:
        merged = spec.run(models, checked, progress, pre)
    except Exception:
        models.check.raise_for_inputs(models.names)
        raise
    models.check.later(models.names, merged)()
    return merged
