"""Helpers for the engine tests. Small HF-style models on disk for the engine tests: a sharded base (index + 2 files) and three
fine-tuned copies (one single-file, two sharded), bf16 with an integer buffer."""
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

HIDDEN, FFN, VOCAB, LAYERS = 32, 48, 80, 3


def base_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    def rand(*shape):
        return (0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)

    s = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            s[p + f"self_attn.{name}.weight"] = rand(HIDDEN, HIDDEN)
        s[p + "mlp.gate_proj.weight"] = rand(FFN, HIDDEN)
        s[p + "mlp.down_proj.weight"] = rand(HIDDEN, FFN)
        s[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    s["model.position_ids"] = torch.arange(16, dtype=torch.int64)
    s["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    s["lm_head.weight"] = rand(VOCAB, HIDDEN)
    return s


def write_model(folder: Path, state: dict, shards: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i * per:(i + 1) * per]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_models(root: Path, seed: int = 0, tasks: int = 3) -> Path:
    g = torch.Generator().manual_seed(seed)
    base = base_state(g)
    write_model(root / "base", base, shards=2)
    (root / "base" / "tokenizer_config.json").write_text("{}")
    for t in range(tasks):
        tuned = {}
        for name, w in base.items():
            if not w.is_floating_point():
                tuned[name] = w
                continue
            # quantised deltas: many equal magnitudes, so ties at the thresholds happen
            delta = torch.round(4 * torch.randn(w.shape, generator=g)) / 512 * (torch.rand(w.shape, generator=g) < 0.5)
            tuned[name] = (w.float() + delta).to(w.dtype)
        write_model(root / f"task_{t}", tuned, shards=1 if t == 0 else 3)
    return root


def write_config(path: Path, method: str, root: Path, params: dict = None, per_model: dict = None, extra: dict = None) -> Path:
    import yaml

    models = []
    for t in range(3):
        entry = {"model": str(root / f"task_{t}")}
        if per_model:
            entry["parameters"] = {k: (v[t] if isinstance(v, list) else v) for k, v in per_model.items()}
        models.append(entry)
    raw = {"merge_method": method, "base_model": str(root / "base"), "models": models, **(extra or {})}
    if params:
        raw["parameters"] = params
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def read_dir(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def within(seconds: float, fn, *args, **kwargs):
    """fn(*args, **kwargs) on a thread; fails the test if it has not returned after `seconds`."""
    result, error = [], []

    def target():
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 (re-raised below)
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not finish in {seconds} s (deadlock?)")
    if error:
        raise error[0]
    return result[0] if result else None


def write_matrix_models(root: Path) -> dict:
    """base and t0..t2 under root: 24 bf16 matrices of 1024 x 1024 each (48 MB a model), for
    memory-budget tests; returns the base state."""
    g = torch.Generator().manual_seed(0)
    base = {f"layer.{i}.weight": (0.02 * torch.randn(1024, 1024, generator=g)).to(torch.bfloat16) for i in range(24)}
    write_model(root / "base", base)
    for t in range(3):
        write_model(root / f"t{t}", {n: (w.float() + 0.01 * torch.randn(w.shape, generator=g)).to(w.dtype)
                                     for n, w in base.items()})
    return base
