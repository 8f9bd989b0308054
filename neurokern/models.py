"""Turning user inputs (state dicts or nn.Modules) into checked tensor groups."""
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from neurokern.errors import NeurokernError
from neurokern.ops import STORAGE_DTYPES, nonfinite_flags



def as_state_dict(model: Any, what: str) -> dict[str, Tensor]:
    """model's tensors by name, none of them tracking gradients (a merge is no training step)."""
    if isinstance(model, torch.nn.Module):
        return model.state_dict()  # detached already (keep_vars=False)
    if isinstance(model, Mapping):
        out = dict(model)
        for key, value in out.items():
            if not isinstance(value, Tensor):
                raise NeurokernError(f"{what}[{key!r}] is a {type(value).__name__}, expected a torch.Tensor")
            # detach only where it changes something: a new tensor object costs about a
            # microsecond, a millisecond or more over a model of several copies
            if value.requires_grad:
                out[key] = value.detach()
        return out
    raise NeurokernError(f"{what} must be a state dict (name -> tensor) or an nn.Module; got {type(model).__name__}")


@dataclass
class ModelSet:
    """The checked inputs of one merge: tensors to merge (same names, shapes, dtypes in every
    model) and the base's other entries (integer buffers), which are copied through."""

    base: dict[str, Tensor]
    finetuned: list[dict[str, Tensor]]
    names: list[str]  # floating-point tensors to merge, in the base's order
    finite_checked: bool = True  # False: NaN / Inf not looked for yet (the method's trim will)

    @property
    def num_tasks(self) -> int:
        return len(self.finetuned)


def _name_list(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def nonfinite(tensors: Sequence[Tensor]) -> list[int]:
    """Positions of the tensors (all on one device) that hold a NaN or Inf, with one host sync
    (nonfinite_later, waited for at once)."""
    return nonfinite_later(tensors)()


def nonfinite_later(tensors: Sequence[Tensor], host: Optional[Tensor] = None) -> Callable[[], list[int]]:
    """nonfinite without the host sync where it can: the flags of neurokern.ops.nonfinite_flags
    (on a GPU one pass that reads every tensor once, launches only). On a GPU they are copied to
    pinned host memory (`host`: int32 [len(tensors)], pinned, else one is allocated) on the current
    stream, and the returned function waits for that copy (by then the stream has usually passed
    it) and gives the positions; it holds no tensor but `host`. Elsewhere the check runs now."""
    if not tensors:
        return lambda: []
    if not tensors[0].is_cuda:
        bad = [i for i, flag in enumerate(nonfinite_flags(tensors).tolist()) if flag]
        return lambda: bad
    with torch.cuda.device(tensors[0].device):
        flags = nonfinite_flags(tensors)
        if host is None:
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

    def positions() -> list[int]:
        done.synchronize()
        return [i for i, flag in enumerate(host.tolist()) if flag]
    return positions


def _check_pairs(base: dict[str, Tensor], finetuned: list[dict[str, Tensor]], same_device: bool) -> None:
    """Every fine-tuned tensor has its base tensor's shape and dtype (and device, same_device).
    Whole models are compared as lists first (a loop over tensor pairs cost milliseconds on a
    model of hundreds of tensors); a mismatch is then named by _mismatch."""
    tensors = list(base.values())
    shapes, dtypes = [b.shape for b in tensors], [b.dtype for b in tensors]
    devices = [b.device for b in tensors] if same_device else None
    for sd in finetuned:
        column = [sd[name] for name in base]
        if ([f.shape for f in column] != shapes or [f.dtype for f in column] != dtypes
                or same_device and [f.device for f in column] != devices):
            _mismatch(base, finetuned, same_device)


def _mismatch(base: dict[str, Tensor], finetuned: list[dict[str, Tensor]], same_device: bool) -> None:
    """Raises for the first tensor (in base's order, then model order) whose fine-tuned version
    differs from base in shape, dtype or (same_device) device."""
    for name, b in base.items():
        for i, sd in enumerate(finetuned):
            f = sd[name]
            if f.shape != b.shape:
                raise NeurokernError(
                    f"tensor {name!r}: finetuned[{i}] has shape {tuple(f.shape)}, base has {tuple(b.shape)}"
                )
            if f.dtype != b.dtype:
                raise NeurokernError(
                    f"tensor {name!r}: finetuned[{i}] is {f.dtype}, base is {b.dtype}; "
                    "convert the models to one dtype before merging"
                )
            if same_device and f.device != b.device:
                raise NeurokernError(
                    f"tensor {name!r}: finetuned[{i}] is on {f.device}, base on {b.device}; "
                    "move them to one device or pass device="
                )


def _check_finite_later(names: list[str], base: dict[str, Tensor],
                        finetuned: list[dict[str, Tensor]]) -> Callable[[], None]:
    """NaN / Inf anywhere is an error naming the tensor and model (the first in the base's order),
    raised by the returned function; on a GPU the check runs meanwhile (nonfinite_later)."""
    items = [(name, label, t) for name in names
             for label, t in [("base", base[name])] + [(f"finetuned[{i}]", sd[name]) for i, sd in enumerate(finetuned)]]
    by_device: dict[torch.device, list[int]] = {}
    for index, (_, _, t) in enumerate(items):
        by_device.setdefault(t.device, []).append(index)
    pending = [(indices, nonfinite_later([items[i][2] for i in indices])) for indices in by_device.values()]

    def check() -> None:
        bad = [indices[j] for indices, positions in pending for j in positions()]
        if bad:
            name, label, _ = items[min(bad)]
            raise NeurokernError(f"tensor {name!r} of {label} has non-finite values (NaN or Inf)")
    return check


def raise_if_nonfinite(models: ModelSet, names: list[str], flags: Tensor) -> None:
    """flags[i] != 0 (int32 [len(names)], from magnitude_threshold's or weighted_sum_multi's
    nonfinite): a task vector or the merged output of names[i] holds NaN or Inf. Raises, as
    load_models' check does, for the first of them whose inputs do (float32 arithmetic on finite
    values may overflow: that is no input error)."""
    for i in torch.nonzero(flags).flatten().tolist():
        _check_finite_later([names[i]], models.base, models.finetuned)()


def raise_if_unrepresentable(models: ModelSet, names: list[str], positions: Sequence[int]) -> None:
    """positions: indices into names of merged outputs that hold NaN / Inf (weighted_sum_multi's
    nonfinite flags, or nonfinite() of the outputs). Raises for the first: the input error where its
    inputs hold NaN / Inf (as load_models' check does), else that the merged value is beyond its
    dtype's range: the kernels compute the elements whose float32 arithmetic overflows in float64,
    so finite inputs give a non-finite output only where the result itself does not fit."""
    for i in sorted(positions):
        name = names[i]
        _check_finite_later([name], models.base, models.finetuned)()
        dtype = models.base[name].dtype
        kind = str(dtype).replace("torch.", "")
        raise NeurokernError(f"tensor {name!r}: merged value exceeds {kind}'s maximum ({torch.finfo(dtype).max:.4g}) "
                             "in magnitude; lower the weights or scale, or merge to a wider dtype")


def load_models(base: Any, finetuned: Any, device: Optional[torch.device] = None,
                check_finite: bool = True) -> ModelSet:
    """The checked ModelSet of the inputs, on `device` if given. check_finite=False leaves the
    NaN / Inf check to the caller (finite_checked False): a method whose trim reads every entry
    looks for them there (raise_if_nonfinite) instead of in a pass of its own."""
    base_sd = as_state_dict(base, "base")
    if isinstance(finetuned, (Mapping, torch.nn.Module)) or not isinstance(finetuned, Sequence):
        raise NeurokernError("finetuned must be a list of state dicts or nn.Modules (one per task)")
    if len(finetuned) == 0:
        raise NeurokernError("finetuned is empty: give at least one fine-tuned model")
    ft_sds = [as_state_dict(m, f"finetuned[{i}]") for i, m in enumerate(finetuned)]
    if not base_sd:
        raise NeurokernError("base has no tensors")

    for i, sd in enumerate(ft_sds):
        missing = [k for k in base_sd if k not in sd]
        extra = [k for k in sd if k not in base_sd]
        if missing:
            raise NeurokernError(f"finetuned[{i}] lacks tensor(s) {_name_list(missing)} that base has")
        if extra:
            raise NeurokernError(f"finetuned[{i}] has tensor(s) {_name_list(extra)} that base lacks")

    # the finite check of the mergeable tensors runs on the GPU while the host checks the pairs
    finite_check = _check_finite_later(
        [name for name, b in base_sd.items() if b.is_floating_point() and b.dtype in STORAGE_DTYPES],
        base_sd, ft_sds) if check_finite else lambda: None
    _check_pairs(base_sd, ft_sds, same_device=device is None)
    names = []
    for name, b in base_sd.items():
        if not b.is_floating_point():
            continue
        if b.dtype not in STORAGE_DTYPES:
            raise NeurokernError(
                f"tensor {name!r} is {b.dtype}; neurokern merges float32, bfloat16 and float16 tensors"
            )
        names.append(name)
    finite_check()

    if device is not None:
        base_sd = {k: v.to(device) for k, v in base_sd.items()}
        ft_sds = [{k: sd[k].to(device) for k in names} for sd in ft_sds]
    return ModelSet(base_sd, ft_sds, names, check_finite)
