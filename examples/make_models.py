"""Write a small pre-trained model and three fine-tuned copies as Hugging Face-style folders
(config.json + model.safetensors), so the example configs run without downloads:

    python examples/make_models.py examples/models
    neurokern merge examples/ties.yaml merged-ties
"""
import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, FFN, VOCAB, LAYERS = 64, 176, 500, 2


def pretrained(generator: torch.Generator) -> dict[str, torch.Tensor]:
    def rand(*shape):
        return (torch.randn(shape, generator=generator) / shape[-1] ** 0.5).to(torch.bfloat16)

    state = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{name}.weight"] = rand(HIDDEN, HIDDEN)
        state[p + "mlp.gate_proj.weight"] = rand(FFN, HIDDEN)
        state[p + "mlp.up_proj.weight"] = rand(FFN, HIDDEN)
        state[p + "mlp.down_proj.weight"] = rand(HIDDEN, FFN)
        state[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        state[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    state["lm_head.weight"] = rand(VOCAB, HIDDEN)
    return state


def write(folder: Path, state: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
              "vocab_size": VOCAB, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for base/ and task_a/, task_b/, task_c/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    base = pretrained(g)
    write(args.out / "base", base)
    for task in ("task_a", "task_b", "task_c"):
        # A fine-tuned copy: the base plus a small task vector with a few large entries.
        tuned = {}
        for name, w in base.items():
            delta = 0.01 * torch.randn(w.shape, generator=g) * (torch.rand(w.shape, generator=g) < 0.3)
            tuned[name] = (w.float() + delta).to(w.dtype)
        write(args.out / task, tuned)
    print(f"wrote base and 3 fine-tuned models to {args.out}")


if __name__ == "__main__":
    main()
