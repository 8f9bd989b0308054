"""PEFT LoRA adapters: merged into one adapter, or read as fine-tuned models.

A LoRA adapter folder (adapter_config.json + adapter_model.safetensors, PEFT's format) is a
fine-tuned model wherever neurokern takes one on disk: `nk.merge_models` and `neurokern merge`
read it through the engine's adapter source (neurokern/engine/adapters.py), each adapted weight
formed as base + scale·B·A when the engine reads it. This module adds what needs no full model:

- `merge_adapters`: adapters into one adapter. "cat" stacks the factors (exact, rank Σ r_t);
  any neurokern method runs on the adapters' ΔW_t = scale_t·B_t·A_t module by module (its
  whole-model passes over all modules first), and a truncated SVD brings the result back to a
  chosen rank, as PEFT's `*_svd` combination types do.
- `add_weighted_adapter`: PEFT's `LoraModel.add_weighted_adapter` combination types, on the
  neurokern methods that reproduce them (see docs/peft.md for what is exact).
- `load_finetuned`: an in-memory base with one adapter merged in (PEFT's merge_and_unload
  arithmetic), for `nk.merge` on state dicts.
"""
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from safetensors.torch import save_file
from torch import Tensor

from neurokern.engine.adapters import (CONFIG, PREFIX, WEIGHTS, LoraAdapter, add_delta, delta_weight, factors,
                                       read_adapter, read_tensor)
from neurokern import params as checks
from neurokern.errors import NeurokernError
from neurokern.merging import run_checked
from neurokern.methods import METHODS, PassContext, check_device
from neurokern.models import ModelSet, load_models
from neurokern.state_dicts import as_state_dict

PathLike = Union[str, os.PathLike]

# PEFT's combination types: (neurokern method, its parameters, merged in the full ΔW space).
# The factor-wise ones (not in the full space) merge the A's and the B's separately, as PEFT does.
_ELECT = {"elect_on": "unweighted", "normalize": "count"}
COMBINATIONS = {
    "svd": ("task_arithmetic", {}, True),
    "ties_svd": ("ties", _ELECT, True),
    "dare_linear_svd": ("dare", {"rescale": "density"}, True),
    "dare_ties_svd": ("dare_ties", {**_ELECT, "rescale": "density"}, True),
    "magnitude_prune_svd": ("magnitude_prune", {}, True),
    "linear": ("task_arithmetic", {}, False),
    "ties": ("ties", _ELECT, False),
    "dare_linear": ("dare", {"rescale": "density"}, False),
    "dare_ties": ("dare_ties", {**_ELECT, "rescale": "density"}, False),
    "magnitude_prune": ("magnitude_prune", {}, False),
}
_DENSITY = {"ties", "dare", "dare_ties", "magnitude_prune"}  # the methods that take a density


def _adapters(paths: Sequence[PathLike]) -> list[LoraAdapter]:
    if isinstance(paths, (str, os.PathLike)) or not paths:
        raise NeurokernError("adapters: expected a non-empty list of adapter folders")
    adapters = [read_adapter(Path(p)) for p in paths]
    for a in adapters:
        if a.replaced:
            name = next(iter(a.replaced))
            raise NeurokernError(f"{a.path}: stores tensor {name!r} whole (modules_to_save or a saved embedding "
                                 "layer), which one adapter cannot hold a merge of; merge into a full model "
                                 "(nk.merge_models) instead")
    return adapters


def _module_order(adapters: list[LoraAdapter]) -> list[str]:
    """The adapted weights of all adapters, first-seen order, with one ΔW shape each."""
    order: dict[str, tuple[int, int]] = {}
    for a in adapters:
        for name, m in a.modules.items():
            if order.setdefault(name, m.shape) != m.shape:
                raise NeurokernError(f"tensor {name!r}: {a.path} adapts it with ΔW of shape {m.shape}, another "
                                     f"adapter with {order[name]}; the adapters must belong to one base model")
    return list(order)


def _weights(weights: Optional[Sequence[float]], count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    weights = list(weights)
    if len(weights) != count:
        raise NeurokernError(f"weights has {len(weights)} entries for {count} adapters; give one per adapter")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise NeurokernError(f"weights[{i}] must be a finite number; got {w!r}")
    return [float(w) for w in weights]


def _run_method(method: str, params: dict[str, Any], numels: dict[str, int], models_of: Callable[[str], ModelSet],
                num_tasks: int, device: torch.device) -> Iterator[tuple[str, Tensor]]:
    """A method over a model given one tensor at a time (models_of(name): the ModelSet of that
    tensor): its whole-model passes first, over every tensor in order, then the merge of each
    tensor, yielded one at a time. Only one tensor's models are held at once."""
    if method not in METHODS:
        raise NeurokernError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))} or 'cat'")
    spec = METHODS[method]
    checked = spec.params(dict(params), num_tasks)
    names = list(numels)
    pre: dict[str, Any] = {}
    prepasses = spec.passes(checked)
    if prepasses:
        offsets, at = {}, 0
        for name in names:
            offsets[name], at = at, at + numels[name]
        ctx = PassContext(names, offsets, at, num_tasks, device, lambda t: t, lambda t: t,
                          lambda name, fn: fn(models_of(name)))
        finite: set[str] = set()
        for prepass in prepasses:
            prepass.begin(ctx, pre)
            for i in range(len(prepass.reads)):
                for name in names:
                    models = models_of(name)
                    if name not in finite:  # NaN / Inf before a pass reads them, once
                        models.check.raise_for_inputs(models.names)
                        finite.add(name)
                    prepass.accumulate(i, models)
                prepass.reduce(i, ctx)
            pre[prepass.key] = prepass.result()
    for name in names:
        yield name, run_checked(spec, models_of(name), checked, pre=pre if prepasses else None)[name]


def _device(device: Optional[Union[str, torch.device]]) -> torch.device:
    dev = checks.device("neurokern.integrations.peft", device or "cpu")
    check_device(dev)
    return dev


def _truncate(delta: Tensor, rank: int, driver: Optional[str]) -> tuple[Tensor, Tensor]:
    """(A, B) of rank `rank` with B·A the best rank-`rank` approximation of delta: B = U_r·diag(S_r),
    A = Vh_r (PEFT's split of the SVD)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False, driver=driver)
    return Vh[:rank], U[:, :rank] * S[:rank]


def _pad(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero rows of A / columns of B up to `rank` (a ΔW of lower rank than the adapter's)."""
    missing = rank - A.shape[0]
    if missing > 0:
        A = torch.cat([A, A.new_zeros(missing, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], missing)], dim=1)
    return A, B


def _config(adapters: list[LoraAdapter], rank: int) -> dict[str, Any]:
    """The merged adapter's config: the first adapter's, with r = lora_alpha = rank (scale 1), no
    per-module patterns, and the union of the target modules (PEFT's rule)."""
    config = dict(adapters[0].config)
    targets = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, str) for t in targets):
        target = "|".join(f"({t})" for t in targets)
    else:
        target = sorted(set().union(*[set(t) for t in targets if isinstance(t, (list, tuple))])) or None
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={}, target_modules=target)
    return config


def _tensor_name(module: str, factor: str, embedding: bool) -> str:
    return f"{PREFIX}{module}.lora_embedding_{factor}" if embedding else f"{PREFIX}{module}.lora_{factor}.weight"


class MergedAdapter(dict):
    """The merged adapter: its tensors under PEFT's key names (this dict) and its config."""

    def __init__(self, tensors: dict[str, Tensor], config: dict[str, Any]):
        super().__init__(tensors)
        self.config = config

    def save(self, out_dir: PathLike) -> Path:
        """Write adapter_config.json and adapter_model.safetensors into out_dir (created; it must not
        exist or be empty), whole or not at all: into a temporary folder beside it, then renamed."""
        out = Path(out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise NeurokernError(f"output {out} exists and is not an empty folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            save_file({k: v.contiguous().cpu() for k, v in self.items()}, str(partial / WEIGHTS),
                      metadata={"format": "pt"})
            (partial / CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True, default=str))
            if out.exists():
                out.rmdir()
            partial.rename(out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return out


def _full_space(adapters: list[LoraAdapter], names: list[str], weights: list[float], method: str,
                params: dict[str, Any], rank: int, base: Optional[dict[str, Tensor]], device: torch.device,
                svd_driver: Optional[str]) -> dict[str, Tensor]:
    """The method on ΔW_t (θ_t = base + ΔW_t in float32 when a base is given, else θ0 = 0 and
    θ_t = ΔW_t exactly), tensor by tensor, each result truncated to `rank` by SVD."""
    T = len(adapters)
    for_method = dict(params)
    if method in METHODS and "weights" in METHODS[method].defaults:
        for_method["weights"] = weights
    elif any(w != 1.0 for w in weights):
        raise NeurokernError(f"method {method!r} takes no weights; got {weights}")

    def models_of(name: str) -> ModelSet:
        deltas = []
        for a in adapters:
            m = a.modules.get(name)
            if m is None:
                shape = next(x.modules[name].shape for x in adapters if name in x.modules)
                deltas.append(torch.zeros(shape, dtype=torch.float32, device=device))
                continue
            A, B = (t.to(device) for t in factors(m))
            deltas.append(delta_weight(A.float(), B.float(), m.scale, m.transposed))
        if base is not None:
            if name not in base:
                raise NeurokernError(f"base has no tensor {name!r}, which the adapters adapt")
            theta0 = base[name].to(device=device, dtype=torch.float32)
            if theta0.shape != deltas[0].shape:
                raise NeurokernError(f"tensor {name!r}: base has shape {tuple(theta0.shape)}, the adapters' ΔW "
                                     f"{tuple(deltas[0].shape)}")
        else:
            theta0 = torch.zeros_like(deltas[0])
        finetuned = [{name: theta0 + d} if base is not None else {name: d} for d in deltas]
        return load_models({name: theta0}, finetuned)

    numels = {}
    for name in names:
        rows, cols = next(a.modules[name].shape for a in adapters if name in a.modules)
        numels[name] = rows * cols
    out = {}
    for name, merged in _run_method(method, for_method, numels, models_of, T, device):
        delta = merged - base[name].to(device=device, dtype=torch.float32) if base is not None else merged
        A, B = _pad(*_truncate(delta, rank, svd_driver), rank)
        out[name] = (A, B)
    return out


def merge_adapters(adapters: Sequence[PathLike], weights: Optional[Sequence[float]] = None, *,
                   method: str = "task_arithmetic", rank: Optional[int] = None, out_dir: Optional[PathLike] = None,
                   base: Any = None, device: Optional[Union[str, torch.device]] = None,
                   svd_driver: Optional[str] = None, svd: str = "full", **params: Any) -> MergedAdapter:
    """Merge LoRA adapters (PEFT folders) into one adapter of rank `rank`.

    method "cat": the factors stacked, A = [w_t·scale_t·A_t], B = [B_t]: ΔW = Σ_t w_t·ΔW_t exactly,
    rank Σ_t r_t (`rank` must be None or that). Any other method name of neurokern.methods
    (task_arithmetic, ties, dare, dare_ties, magnitude_prune, neuromerging, or a registered one),
    with its parameters (`weights`, density, ...), runs on the ΔW_t in the full space, tensor by
    tensor (its whole-model passes over all adapted tensors first); the merged ΔW is truncated to
    `rank` (default: the largest r_t) by SVD: B = U_r·diag(S_r), A = Vh_r. svd="factored", for a
    method that is a fixed weighted sum of the task vectors (task_arithmetic, linear): the merged ΔW
    is never formed; its truncated SVD comes from the factors (_factored), equal to the full SVD's
    up to float32 rounding, and orders of magnitude faster on large modules.

    base (a state dict or nn.Module of the base model) is needed by methods that read the
    pre-trained weights (neuromerging); without it the methods see θ0 = 0 and θ_t = ΔW_t. The
    merged adapter has lora_alpha = r (scale 1) and is returned as a MergedAdapter (PEFT's key
    names; .config), and written to out_dir when given.
    """
    found = _adapters(adapters)
    names = _module_order(found)
    w = _weights(weights, len(found))
    dev = _device(device)
    ranks = [a.config["r"] for a in found] + [m.r for a in found for m in a.modules.values()]
    if method == "cat":
        total = sum(max((m.r for m in a.modules.values()), default=a.config["r"]) for a in found)
        if rank is not None and rank != total:
            raise NeurokernError(f"method 'cat' makes an adapter of rank {total} (the sum of the ranks); "
                                 f"got rank={rank} (use method 'task_arithmetic' with a rank for an SVD)")
        if params:
            raise NeurokernError(f"method 'cat' takes no parameters; got {', '.join(sorted(params))}")
        merged = _cat(found, names, w, total, dev)
        rank = total
    else:
        rank = max(ranks) if rank is None else rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise NeurokernError(f"rank must be a positive integer; got {rank!r}")
        if base is None and method == "neuromerging":
            raise NeurokernError("method 'neuromerging' reads the pre-trained weights: pass base= (a state dict or "
                                 "nn.Module of the base model)")
        base_sd = as_state_dict(base, "base") if base is not None else None
        if svd == "factored":
            merged = _factored(found, names, w, method, params, rank, base_sd is not None, dev)
        elif svd == "full":
            merged = _full_space(found, names, w, method, params, rank, base_sd, dev, svd_driver)
        else:
            raise NeurokernError(f"svd must be 'full' or 'factored'; got {svd!r}")
    return _finish(found, merged, rank, out_dir, native=method == "cat")


def _factored(adapters: list[LoraAdapter], names: list[str], weights: list[float], method: str,
              params: dict[str, Any], rank: int, has_base: bool, device: torch.device) -> dict[str, tuple[Tensor, Tensor]]:
    """svd="factored": a fixed weighted sum of the task vectors, ΔW = Σ_t c_t·s_t·B_t·A_t = L·R with
    L = [c_t·s_t·B_t] (rows × K) and R = [A_t; ...] (K × cols), K = Σ_t r_t, as the base holds ΔW
    (transposed layers: L = [c_t·s_t·A_tᵀ], R = [B_tᵀ]). With L = Q_L·R_L and Rᵀ = Q_R·R_R (QR),
    ΔW = Q_L·(R_L·R_Rᵀ)·Q_Rᵀ, so the SVD of the K × K core, U·S·Vh, gives ΔW's: B = Q_L·U_r·diag(S_r),
    A = Vh_r·Q_Rᵀ. No rows × cols matrix is formed; the factors are read and multiplied in float32."""
    spec = METHODS.get(method)
    if spec is None or spec.coefficients is None:
        raise NeurokernError(f"svd='factored' merges the factors of a fixed weighted sum of the task vectors "
                             f"(task_arithmetic, linear); method {method!r} is not one: use svd='full'")
    for_method = dict(params)
    if "weights" in spec.defaults:
        for_method["weights"] = weights
    if any(checks.varies(v) for v in for_method.values()):
        raise NeurokernError("svd='factored' takes one value per parameter (no per-tensor values); use svd='full'")
    coeffs = spec.coefficients(spec.params(for_method, len(adapters)))
    if has_base and coeffs[0] != 1.0:
        raise NeurokernError(f"method {method!r} gives the base the coefficient {coeffs[0]:g}: the merged ΔW is not "
                             "low-rank; use svd='full'")
    out = {}
    for name in names:
        left, right = [], []
        for a, c in zip(adapters, coeffs[1:]):
            m = a.modules.get(name)
            if m is None:
                continue
            A, B = (t.to(device=device, dtype=torch.float32) for t in factors(m))
            if m.transposed:
                A, B = B.T, A.T
            left.append(B * (c * m.scale))
            right.append(A)
        q_left, r_left = torch.linalg.qr(torch.cat(left, dim=1))
        q_right, r_right = torch.linalg.qr(torch.cat(right).T)
        U, S, Vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
        out[name] = _pad(Vh[:rank] @ q_right.T, (q_left @ U[:, :rank]) * S[:rank], rank)
    return out


def _cat(adapters: list[LoraAdapter], names: list[str], weights: list[float], rank: int,
         device: torch.device) -> dict[str, tuple[Tensor, Tensor]]:
    out = {}
    for name in names:
        As, Bs = [], []
        for a, w in zip(adapters, weights):
            m = a.modules.get(name)
            if m is None:
                continue
            A, B = (t.to(device) for t in factors(m))
            As.append(A * (w * m.scale))
            Bs.append(B)
        A, B = torch.cat(As), torch.cat(Bs, dim=1)
        out[name] = _pad(A, B, rank)
    return out


def _finish(adapters: list[LoraAdapter], merged: dict[str, tuple[Tensor, Tensor]], rank: int,
            out_dir: Optional[PathLike], native: bool) -> MergedAdapter:
    """Factors under PEFT's names, in the adapters' dtype. native: (A, B) as the adapters store
    them; else factors of ΔW as the base holds it, which an embedding (A is [r, num_embeddings])
    and a fan_in_fan_out layer store transposed."""
    tensors = {}
    for name, (A, B) in merged.items():
        m = next(a.modules[name] for a in adapters if name in a.modules)
        dtype = m.A.dtype
        if m.transposed and not native:  # B·A = ΔW, and the adapter stores the factors of ΔWᵀ
            A, B = B.T, A.T
        tensors[_tensor_name(m.module, "A", m.embedding)] = A.to(dtype).contiguous()
        tensors[_tensor_name(m.module, "B", m.embedding)] = B.to(dtype).contiguous()
    result = MergedAdapter(tensors, _config(adapters, rank))
    if out_dir is not None:
        result.save(out_dir)
    return result


def add_weighted_adapter(adapters: Sequence[PathLike], weights: Sequence[float], combination_type: str = "svd", *,
                         svd_rank: Optional[int] = None, density: Optional[float] = None,
                         majority_sign_method: str = "total", seed: int = 0, out_dir: Optional[PathLike] = None,
                         device: Optional[Union[str, torch.device]] = None,
                         svd_driver: Optional[str] = None, svd: str = "full") -> MergedAdapter:
    """PEFT's LoraModel.add_weighted_adapter on adapter folders, with neurokern's methods.

    combination_type: "cat"; "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd",
    "magnitude_prune_svd" (the method on ΔW_t, then an SVD to svd_rank, default the largest r);
    "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune" (PEFT's factor-wise types: the
    method on the A's with weights sign(w_t·s_t)·√|w_t·s_t| and on the B's with √|w_t·s_t|, the
    adapters' ranks all equal). majority_sign_method "total" / "frequency" is consensus "sum" /
    "count"; TIES and dare_ties elect on the unweighted vectors and divide by the number of
    agreeing ones, as PEFT does. DARE's masks come from neurokern's generator (seed), not torch's.
    svd: "full" (PEFT's SVD of the merged ΔW, bitwise PEFT's for "svd") or "factored" ("svd" only:
    the truncated SVD from the factors, merge_adapters' svd="factored").
    """
    if svd != "full" and not (combination_type == "svd" or str(combination_type).endswith("_svd")):
        raise NeurokernError(f"svd={svd!r} applies to the SVD combination types (svd, *_svd); "
                             f"{combination_type!r} merges the factors themselves")
    found = _adapters(adapters)
    w = _weights(weights, len(found))
    if len(found) == 1 and combination_type != "cat":
        combination_type = "linear"  # PEFT's rule for a single adapter
    if combination_type == "cat":
        return merge_adapters(adapters, w, method="cat", out_dir=out_dir, device=device)
    if combination_type not in COMBINATIONS:
        raise NeurokernError(f"combination_type {combination_type!r} is not one of cat, {', '.join(COMBINATIONS)}")
    method, params, full = COMBINATIONS[combination_type]
    params = dict(params)
    if method in _DENSITY:
        if density is None:
            raise NeurokernError(f"combination_type {combination_type!r} needs a density")
        params["density"] = min(float(density), 1.0)  # PEFT: a density >= 1 prunes nothing
    if method in ("ties", "dare_ties"):
        consensus = {"total": "sum", "frequency": "count"}.get(majority_sign_method)
        if consensus is None:
            raise NeurokernError(f"majority_sign_method must be 'total' or 'frequency'; got {majority_sign_method!r}")
        params["consensus"] = consensus
    if method in ("dare", "dare_ties"):
        params["seed"] = seed
    if full:
        return merge_adapters(adapters, w, method=method, rank=svd_rank, out_dir=out_dir, device=device,
                              svd_driver=svd_driver, svd=svd, **params)
    return _factor_wise(found, w, method, params, out_dir, _device(device))


def _factor_wise(adapters: list[LoraAdapter], weights: list[float], method: str, params: dict[str, Any],
                 out_dir: Optional[PathLike], device: torch.device) -> MergedAdapter:
    """PEFT's factor-wise combination: the method on the A's and on the B's of each module, the
    weight w_t·scale_t split between them as √|w_t·s_t| (its sign on A). The tensors the method
    sees are named <module>.lora_A.weight / .lora_B.weight (DARE's generator keys); an adapter
    without the module adds zero factors."""
    ranks = {max((m.r for m in a.modules.values()), default=a.config["r"]) for a in adapters}
    if len(ranks) != 1:
        raise NeurokernError(f"the factor-wise combinations need adapters of one rank; got ranks {sorted(ranks)} "
                             "(use cat or an *_svd combination)")
    merged = {}
    for name in _module_order(adapters):
        present = [a.modules.get(name) for a in adapters]
        ref = next(m for m in present if m is not None)
        stored = [factors(m) if m is not None else None for m in present]
        pair = []
        for index, (factor, info) in enumerate((("A", ref.A), ("B", ref.B))):
            key = f"{ref.module}.lora_{factor}.weight"
            stack = [f[index].to(device) if f is not None else torch.zeros(info.shape, dtype=info.dtype, device=device)
                     for f in stored]
            split = []
            for m, w in zip(present, weights):
                ws = w * m.scale if m is not None else 0.0
                root = math.sqrt(abs(ws))
                split.append(-root if index == 0 and ws < 0 else root)
            models = load_models({key: torch.zeros_like(stack[0])}, [{key: t} for t in stack])
            run = _run_method(method, {**params, "weights": split}, {key: stack[0].numel()}, lambda _: models,
                              len(adapters), device)
            pair.append(next(run)[1])
        merged[name] = tuple(pair)
    return _finish(adapters, merged, ranks.pop(), out_dir, native=True)


def load_finetuned(base: Any, adapter: PathLike) -> dict[str, Tensor]:
    """base (a state dict or nn.Module) with the adapter merged in, as PEFT's merge_and_unload
    computes it on a CPU (the factors' product in float32, times scale, in the factors' dtype,
    added to the weight in its dtype), and the adapter's whole tensors (modules_to_save) in place:
    the fine-tuned model the adapter stands for, for nk.merge. The engine reads an adapter folder
    the same way, a few rows at a time."""
    sd = dict(as_state_dict(base, "base"))
    found = read_adapter(Path(adapter))
    for name, info in found.replaced.items():
        if name not in sd:
            raise NeurokernError(f"{found.path}: replaces tensor {name!r}, which base lacks")
        value = read_tensor(info)
        if value.shape != sd[name].shape:
            raise NeurokernError(f"tensor {name!r}: {found.path} has shape {tuple(value.shape)}, base has "
                                 f"{tuple(sd[name].shape)}")
        sd[name] = value.to(device=sd[name].device, dtype=sd[name].dtype)
    for name, m in found.modules.items():
        if name not in sd:
            raise NeurokernError(f"{found.path}: adapts module {m.module!r}, but base has no tensor {name!r}")
        weight = sd[name]
        if tuple(weight.shape) != m.shape:
            raise NeurokernError(f"tensor {name!r}: {found.path} adapts it with ΔW of shape {m.shape}, base has "
                                 f"{tuple(weight.shape)}")
        A, B = (t.to(weight.device) for t in factors(m))
        sd[name] = add_delta(weight, delta_weight(A, B, m.scale, m.transposed), m.embedding)
    return sd
