"""Saving and loading a TintedModel.

A saved model is a directory:
    tinted.json            format, version, task names, tint layers, heads, coefficients mode,
                           prior, lambda (clamped, for reference), per-task file names
    shared.safetensors     the merged shared weights theta(lambda*) and the module's buffers
                           (keys "buffer:<name>")
    task-<i>.safetensors   task i's tint layers and head, by full parameter name
The pre-trained and fine-tuned weights are not saved: a loaded model serves and can keep training
its tints, with the shared weights fixed (TintedModel.load builds it with the TintedModel
constructor, given the saved shared weights as a FrozenMerge).
"""
import json
import os
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

from neurokern.errors import NeurokernError
from neurokern.tint.merged import FrozenMerge
from neurokern.tint.model import module_device, per_task_layers, shared_names

FORMAT = "neurokern-tinted-model"
VERSION = 1
_BUFFER = "buffer:"


def _host(t: torch.Tensor) -> torch.Tensor:
    # safetensors wants contiguous tensors that share no storage (the merged weights are views).
    return t.detach().to("cpu", copy=True).contiguous()


def save(model, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with torch.no_grad():
        shared = {n: _host(v) for n, v in model.shared_parameters().items()}
    for n, b in model.module.named_buffers():
        shared[_BUFFER + n] = _host(b)
    save_file(shared, os.path.join(directory, "shared.safetensors"), metadata={"format": FORMAT})
    files = []
    for t, name in enumerate(model.tasks):
        state = {}
        for layer in model.layers.values():
            for n, v in layer.task_state(t).items():
                state[f"{layer.name}.{n}"] = _host(v)
        fname = f"task-{t}.safetensors"
        save_file(state, os.path.join(directory, fname), metadata={"format": FORMAT, "task": name})
        files.append(fname)
    lam = None if model.lambdas.numel() == 0 else model.coefficients_now().cpu().tolist()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "tasks": model.tasks,
        "tint_layers": model.tint_layers,
        "heads": model.heads,
        "coefficients": model.coefficients,
        "prior": model.prior,
        "pad_value": str(model.pad_value),
        "merged_parameters": len(model.merged_names),
        "lambdas": lam,
        "task_files": files,
    }
    tmp = os.path.join(directory, "tinted.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(directory, "tinted.json"))


def load(cls, directory: str, module: torch.nn.Module, device: Optional[Union[str, torch.device]] = None):
    """The TintedModel constructor on the saved parts: the shared weights as a FrozenMerge (base),
    each task's tints and heads as its fine-tuned model (tint_init="finetuned": they start as saved)."""
    path = os.path.join(directory, "tinted.json")
    if not os.path.isfile(path):
        raise NeurokernError(f"{directory!r} holds no tinted.json; expected a directory written by TintedModel.save")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise NeurokernError(f"{path}: not a neurokern tinted model of version {VERSION}")
    device = module_device(module, device)
    layer_names = per_task_layers(module, list(meta["tint_layers"]) + list(meta["heads"]))
    stored = load_file(os.path.join(directory, "shared.safetensors"))
    shared = {k: v for k, v in stored.items() if not k.startswith(_BUFFER)}
    buffers = {k[len(_BUFFER):]: v for k, v in stored.items() if k.startswith(_BUFFER)}
    merged = FrozenMerge(shared_names(module, layer_names), shared, buffers, meta.get("lambdas"), device)
    per_task = [load_file(os.path.join(directory, f)) for f in meta["task_files"]]
    for name, state in zip(meta["tasks"], per_task):
        for layer in layer_names:
            missing = [f"{layer}.{n}" for n, _ in module.get_submodule(layer).named_parameters()
                       if f"{layer}.{n}" not in state]
            if missing:
                raise NeurokernError(f"the saved tint of task {name!r} lacks {missing}")
    return cls(module, merged, per_task, tint_layers=meta["tint_layers"], heads=meta["heads"],
               coefficients=meta["coefficients"], prior=meta["prior"], tint_init="finetuned",
               task_names=meta["tasks"], device=device, pad_value=float(meta.get("pad_value", "-inf")))
