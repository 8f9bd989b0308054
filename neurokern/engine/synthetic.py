"""Models generated on the fly: a TensorSource (engine/sources.py) whose tensors no disk holds, for
benchmarks at sizes no disk holds (bench/large_merge.py: 70B widths) and for `neurokern warmup`
(the kernels of a config's shapes, compiled without reading its models).

The bytes. A tensor's data is cut into CHUNK-byte chunks; chunk j of tensor `name` is a copy of
CHUNK bytes of its model's pool for the tensor's dtype, taken at an offset that a hash of
(name, j) picks, the same offset in every model of the set. The base's pool holds N(0, 0.02)
values; fine-tuned model m's pool is the base's pool plus a task vector of its own (N(0, 0.002) on
about half of the entries, from a generator seeded by (seed, m)), rounded to the dtype. So a
fine-tuned tensor minus the base's is a small sparse delta, as after a fine-tune, and every byte is
a function of (seed, model, tensor name, byte offset) alone: any piece reads the same whatever the
pieces a reader cuts, in any order, on any thread. A piece costs a memory copy (numpy, without the
GIL): generating runs at memory bandwidth, not at a disk's. Integer tensors (buffers) hold the same
small values in every model.

    models = synthetic_models(llama_shapes(hidden=8192, ffn=28672, layers=80, heads=64, kv_heads=8,
                                           vocab=128256), finetuned=3, root="/synthetic/llama-70b")
    merge_models({"merge_method": "ties", "base_model": str(models[0].path),
                  "models": [str(m.path) for m in models[1:]]}, "out", sources=models,
                 discard_output=True)
"""
import hashlib
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from neurokern.engine.sources import NAMES, TensorInfo
from neurokern.errors import NeurokernError

CHUNK = 2**20  # bytes copied from one pool offset
POOL_BYTES = 64 * 2**20  # default pool per model and dtype (its offsets: POOL_BYTES // 16)
ALIGN = 4096  # the tensors' byte offsets in a model's (virtual) byte stream
FORMAT = 1  # changes whenever the bytes a seed gives change


class _Pools:
    """The pools of one model set: (model index, dtype) -> bytes, each made when first read."""

    def __init__(self, seed: int, pool_bytes: int):
        if pool_bytes < CHUNK or pool_bytes % 16:
            raise NeurokernError(f"synthetic pool of {pool_bytes} bytes: expected a multiple of 16 of at least {CHUNK}")
        self.seed, self.pool_bytes = seed, pool_bytes
        self.lock = threading.Lock()
        self.made: dict[tuple[int, torch.dtype], np.ndarray] = {}

    def get(self, model: int, dtype: torch.dtype) -> np.ndarray:
        key = (model, dtype)
        pool = self.made.get(key)
        if pool is None:
            with self.lock:
                pool = self.made.get(key)
                if pool is None:
                    pool = self.made[key] = self._make(model, dtype)
        return pool

    def _make(self, model: int, dtype: torch.dtype) -> np.ndarray:
        # one chunk beyond the last offset: a chunk read at any offset stays inside
        n = (self.pool_bytes + CHUNK) // dtype.itemsize
        if dtype.is_floating_point:
            values = 0.02 * torch.randn(n, generator=torch.Generator().manual_seed(self.seed))
            if model:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + model)
                delta = 0.002 * torch.randn(n, generator=g)
                values += delta * (torch.rand(n, generator=g) < 0.5)
        elif dtype == torch.bool:
            values = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(self.seed))
        else:
            values = torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(self.seed))
        return values.to(dtype).view(torch.uint8).numpy()


class SyntheticModel:
    """One generated model of a set (synthetic_models): a TensorSource."""

    def __init__(self, path: Path, label: str, shapes: list[tuple[str, tuple[int, ...], torch.dtype]], index: int,
                 pools: _Pools):
        self.path, self.label, self.index, self._pools = Path(path), label, index, pools
        self.files: list[Path] = []
        self.tensors: dict[str, TensorInfo] = {}
        at = 0
        for name, shape, dtype in shapes:
            if dtype not in NAMES:
                raise NeurokernError(f"synthetic tensor {name!r}: dtype {dtype} has no safetensors name")
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * dtype.itemsize
            self.tensors[name] = TensorInfo(name, dtype, tuple(shape), self.path / name, at, nbytes)
            at += nbytes + (-nbytes % ALIGN)

    def _offset(self, name: str, chunk: int) -> int:
        h = hashlib.blake2b(f"{name}\0{chunk}".encode(), digest_size=8, key=b"neurokern-synthetic")
        return int.from_bytes(h.digest(), "little") % (self._pools.pool_bytes // 16) * 16

    def read_into(self, info: TensorInfo, out: torch.Tensor, begin: int = 0, end: Optional[int] = None) -> None:
        end = info.nbytes if end is None else end
        pool = self._pools.get(self.index, info.dtype)
        dest = out.numpy()
        at = begin
        while at < end:
            chunk = at // CHUNK
            stop = min(end, (chunk + 1) * CHUNK)
            source = self._offset(info.name, chunk) + at - chunk * CHUNK
            dest[at:stop] = pool[source:source + stop - at]  # numpy copies without the GIL
            at = stop

    def work_bytes(self) -> int:
        return 0  # a piece is a copy into its destination

    def header_digest(self) -> list:
        return ["synthetic", FORMAT, self._pools.seed, self.index, self._pools.pool_bytes, CHUNK,
                [[i.name, NAMES[i.dtype], list(i.shape)] for i in self.tensors.values()]]


def synthetic_models(shapes: list[tuple[str, tuple[int, ...], torch.dtype]], finetuned: int, seed: int = 0,
                     root: str = "/synthetic/model", pool_bytes: int = POOL_BYTES,
                     paths: Optional[list] = None) -> list[SyntheticModel]:
    """A base and `finetuned` fine-tuned models of the given tensors (name, shape, dtype), in that
    order; their paths ROOT/base, ROOT/task_1, ..., or `paths` (nothing is made or opened there: a
    config names these paths, and merge_models(sources=...) reads them from the models). Memory:
    one pool of pool_bytes per model and dtype, made when first read."""
    pools = _Pools(seed, pool_bytes)
    labels = ["base"] + [f"task_{m}" for m in range(1, finetuned + 1)]
    paths = [Path(p) for p in paths] if paths is not None else [Path(root) / label for label in labels]
    if len(paths) != finetuned + 1:
        raise NeurokernError(f"synthetic_models: {len(paths)} paths for {finetuned + 1} models")
    return [SyntheticModel(path, f"synthetic {label}", shapes, m, pools)
            for m, (label, path) in enumerate(zip(labels, paths))]


def llama_shapes(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int,
                 dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """A LlamaForCausalLM's tensors in the order Hugging Face saves them (untied embeddings).
    Llama-3-70B: hidden 8192, ffn 28672, layers 80, heads 64, kv_heads 8, vocab 128256."""
    kv = hidden * kv_heads // heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (ffn, hidden)), (p + "mlp.up_proj.weight", (ffn, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, ffn)), (p + "input_layernorm.weight", (hidden,)),
                   (p + "post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return [(name, shape, dtype) for name, shape in shapes]
