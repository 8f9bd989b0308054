"""nk.merge: merge in-memory models (state dicts or nn.Modules) with any method."""
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from neurokern.errors import NeurokernError
from neurokern.methods import METHODS, check_device
from neurokern.models import load_models


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
    target = None if device is None else torch.device(device)
    # ties / neuromerging look for NaN / Inf in their trim's pass over every entry
    models = load_models(base, finetuned, target, check_finite=not spec.checks_finite)
    checked = spec.params(params, models.num_tasks)
    if models.names:
        check_device(models.base[models.names[0]].device)
    merged = spec.run(models, checked, progress) if models.names else {}  # nothing to merge: base's entries
    return {name: merged.get(name, tensor) for name, tensor in models.base.items()}
