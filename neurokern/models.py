"""Turning user inputs (state dicts or nn.Modules) into checked tensor groups."""
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from neurokern.errors import NeurokernError
from neurokern.state_dicts import as_state_dict
from neurokern.ops import STORAGE_DTYPES, flagged_later, nonfinite_later



@dataclass
class ModelSet:
    """The checked inputs of one merge: tensors to merge (same names, shapes, dtypes in every
    model) and the base's other entries (integer buffers), which are copied through."""

    base: dict[str, Tensor]
    finetuned: list[dict[str, Tensor]]
    names: list[str]  # floating-point tensors to merge, in the base's order
    # the caller's NaN / Inf check; by default one whose caller checked the inputs already (the engine)
    check: "FiniteCheck" = None

    def __post_init__(self):
        if self.check is None:
            self.check = FiniteCheck(self.base, self.finetuned, inputs_checked=True)

    @property
    def num_tasks(self) -> int:
        return len(self.finetuned)

    def subset(self, names: list[str]) -> "ModelSet":
        """The same models and check, merging only `names`."""
        return ModelSet(self.base, self.finetuned, names, self.check)


def _name_list(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


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


def _first_nonfinite_later(names: list[str], base: dict[str, Tensor],
                           finetuned: list[dict[str, Tensor]]) -> Callable[[], Optional[tuple[str, str]]]:
    """(name, model label) of the first input in names' order, then model order, that holds NaN or
    Inf, or None, given by the returned function; on a GPU the check runs meanwhile (nonfinite_later)."""
    items = [(name, label, t) for name in names
             for label, t in [("base", base[name])] + [(f"finetuned[{i}]", sd[name]) for i, sd in enumerate(finetuned)]]
    positions = nonfinite_later([t for _, _, t in items])

    def first() -> Optional[tuple[str, str]]:
        bad = positions()
        return items[min(bad)][:2] if bad else None
    return first


def _nonfinite_input(name: str, label: str) -> NeurokernError:
    return NeurokernError(f"tensor {name!r} of {label} has non-finite values (NaN or Inf)")


def _unrepresentable(name: str, dtype: torch.dtype) -> NeurokernError:
    kind = str(dtype).replace("torch.", "")
    return NeurokernError(f"tensor {name!r}: merged value exceeds {kind}'s maximum ({torch.finfo(dtype).max:.4g}) "
                          "in magnitude; lower the weights or scale, or merge to a wider dtype")


class FiniteCheck:
    """The NaN / Inf check of one merge, owned by the caller that merges (nk.merge; the engine, one
    per unit of tensors): no input of a merged tensor holds NaN / Inf, and every merged value fits
    its dtype. Method code never sees it: the method layer's helpers that launch a kernel which reads
    every entry anyway (a trim's select, an untrimmed weighted sum) take flags from it for that
    kernel to set, and the caller's `later` reads those and checks, in passes of their own, only
    what no kernel covered. inputs_checked: the caller checked the inputs before the merge (the
    engine's read pass); then only the merged values are checked."""

    def __init__(self, base: dict[str, Tensor], finetuned: list[dict[str, Tensor]], inputs_checked: bool):
        self.base, self.finetuned, self.inputs_checked = base, finetuned, inputs_checked
        self._inputs: list[tuple[list[str], Tensor]] = []  # flags of task vectors holding NaN / Inf
        self._outputs: list[tuple[list[str], Tensor, bool]] = []  # flags of merged values; covers inputs too?

    def input_flags(self, names: Sequence[str], device: torch.device) -> Optional[Tensor]:
        """int32 [len(names)] flags for a kernel that reads every task vector of `names` and sets
        flag i where one of tensor i's holds NaN / Inf (magnitude_threshold's nonfinite); None where
        the inputs are checked already."""
        if self.inputs_checked or not names:
            return None
        flags = torch.empty(len(names), dtype=torch.int32, device=device)
        self._inputs.append((list(names), flags))
        return flags

    def output_flags(self, names: Sequence[str], device: torch.device, covers_inputs: bool) -> Tensor:
        """int32 [len(names)] flags for a kernel that sets flag i where merged tensor i holds NaN /
        Inf (weighted_sum_multi's nonfinite). covers_inputs: a NaN / Inf in any input of the tensor
        reaches its merged value (an untrimmed weighted sum: 0 * Inf is NaN). The kernel writes the
        merged values in the base's dtype."""
        flags = torch.empty(len(names), dtype=torch.int32, device=device)
        self._outputs.append((list(names), flags, covers_inputs))
        return flags

    def later(self, names: Sequence[str], merged: Mapping[str, Tensor],
              host: Optional[Tensor] = None) -> Callable[[], None]:
        """The check of a merge of `names` into `merged`, raised by the returned function: the first
        tensor (in `names`' order) whose inputs hold NaN / Inf, naming the model; else the first
        merged value beyond its dtype's range (the kernels compute the elements whose float32
        arithmetic overflows in float64, so finite inputs give a non-finite result only where the
        result itself does not fit). Launches the passes for what the kernels' flags did not cover
        now, and on a GPU reads every flag without a host sync (host: pinned int32 [len(names)],
        for the outputs' flags that need a pass, else one is allocated). Holds no merged tensor."""
        names = list(names)
        inputs_seen = {n for ns, _ in self._inputs for n in ns}
        inputs_seen |= {n for ns, _, covers in self._outputs if covers for n in ns}
        # a flag covers the value as the kernel wrote it, in the base's dtype: a caller that converts
        # the result (the engine's out_dtype) has the converted value checked again
        outputs_seen = {n for ns, _, _ in self._outputs for n in ns if merged[n].dtype == self.base[n].dtype}
        suspects = [(ns, flagged_later(flags)) for ns, flags in self._inputs]  # inputs, or an overflowing tau
        outputs = [(ns, flagged_later(flags)) for ns, flags, _ in self._outputs]
        unread = [n for n in names if n not in inputs_seen]
        unread_first = (_first_nonfinite_later(unread, self.base, self.finetuned) if unread and not self.inputs_checked
                        else lambda: None)
        unflagged = [n for n in names if n not in outputs_seen and merged[n].numel()]
        by_device: dict[torch.device, list[str]] = {}
        for n in unflagged:
            by_device.setdefault(merged[n].device, []).append(n)
        for ns in by_device.values():
            outputs.append((ns, nonfinite_later([merged[n] for n in ns], None if host is None else host[:len(ns)])))
            host = None
        self._inputs, self._outputs = [], []
        order = {n: i for i, n in enumerate(names)}
        merged_dtypes = {n: merged[n].dtype for n in names}

        def check() -> None:
            flagged = {ns[i] for ns, positions in outputs for i in positions()}
            if not self.inputs_checked:
                # a flag is no input error by itself (a float32 task vector or sum of finite inputs
                # may overflow): the inputs of the flagged tensors are read, with those no kernel read
                candidates = flagged | {ns[i] for ns, positions in suspects for i in positions()}
                found = [hit for hit in (_first_nonfinite_later(sorted(candidates, key=order.__getitem__), self.base,
                                                                self.finetuned)(), unread_first()) if hit]
                if found:
                    raise _nonfinite_input(*min(found, key=lambda hit: order[hit[0]]))
            for name in sorted(flagged, key=order.__getitem__):
                raise _unrepresentable(name, merged_dtypes[name])
        return check

    def raise_for_inputs(self, names: Sequence[str]) -> None:
        """Raises for the first input of `names` that holds NaN / Inf, in a pass of its own (a merge
        that failed before its kernels' flags were read); forgets the flags handed out."""
        self._inputs, self._outputs = [], []
        if not self.inputs_checked:
            hit = _first_nonfinite_later(list(names), self.base, self.finetuned)()
            if hit:
                raise _nonfinite_input(*hit)


def load_models(base: Any, finetuned: Any, device: Optional[torch.device] = None) -> ModelSet:
    """The checked ModelSet of the inputs, on `device` if given. NaN / Inf are left to its check
    (FiniteCheck), which the caller runs after the merge: a kernel that reads every entry anyway
    finds them there, with no pass of its own."""
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

    if device is not None:
        base_sd = {k: v.to(device) for k, v in base_sd.items()}
        ft_sds = [{k: sd[k].to(device) for k in names} for sd in ft_sds]
    return ModelSet(base_sd, ft_sds, names, FiniteCheck(base_sd, ft_sds, inputs_checked=False))
