"""Tiny Llama-shaped models on disk for the mergekit tests: a base and fine-tuned versions of it,
each a folder mergekit accepts (config.json from transformers' LlamaConfig, model.safetensors, a
small word-level tokenizer), built from fixed seeds, no download."""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LAYERS = 4


def llama_config(layers: int = LAYERS):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                       tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def base_state(layers: int = LAYERS, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors of a LlamaForCausalLM of llama_config(layers), random (seeded), float32."""
    cfg = llama_config(layers)
    g = torch.Generator().manual_seed(seed)
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    state = {"model.embed_tokens.weight": torch.randn(v, h, generator=g), "model.norm.weight": 1 + 0.1 * torch.randn(h, generator=g),
             "lm_head.weight": torch.randn(v, h, generator=g) / 4}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
                  "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
                  "mlp.down_proj.weight": (h, i)}
        for name, shape in shapes.items():
            state[p + name] = torch.randn(shape, generator=g) / 4
        state[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        state[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    return state


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{k}": k for k in range(3, vocab_size)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def write_model(folder: Path, state: dict[str, torch.Tensor], layers: int = LAYERS, dtype=torch.float32,
                tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(layers)
    cfg.save_pretrained(folder)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer:
        write_tokenizer(folder, cfg.vocab_size)
    return folder


def make_family(root: Path, count: int = 3, dtype=torch.float32, layers: int = LAYERS, scale: float = 0.05,
                seed: int = 0) -> dict[str, Path]:
    """base and task_0..task_{count-1}: the base plus seeded noise of `scale` (whole tensors)."""
    base = base_state(layers, seed)
    out = {"base": write_model(root / "base", base, layers, dtype)}
    for t in range(count):
        g = torch.Generator().manual_seed(1000 * (seed + 1) + t)
        tuned = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
        out[f"task_{t}"] = write_model(root / f"task_{t}", tuned, layers, dtype)
    return out


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
