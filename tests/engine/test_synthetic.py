"""Generated input models (engine.synthetic) through the engine's TensorSource interface, and
merges that hash their output instead of writing it (discard_output): the same bytes as models on
disk and written shards; reads independent of how they are cut; peak host memory independent of
the model's depth under a fixed budget."""
import json
import os
import random
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from neurokern.engine import merge_models
from neurokern.engine.sources import Model, TensorSource
from neurokern.engine.synthetic import CHUNK, llama_shapes, synthetic_models
from neurokern.errors import NeurokernError

from engine_helpers import read_dir

ROOT = Path(__file__).resolve().parents[2]
POOL = 2 * CHUNK
# odd sizes: tensors that end inside a chunk, a 1-element and an empty tensor, an integer buffer
SHAPES = [("a", (3, 700_001), torch.float32), ("b", (1,), torch.float32), ("empty", (0, 4), torch.bfloat16),
          ("c", (333, 1025), torch.bfloat16), ("d", (70, 129), torch.float16), ("ids", (17,), torch.int64)]


def tensor(source: TensorSource, name: str) -> torch.Tensor:
    info = source.tensors[name]
    return torch.tensor(list(read(source, name)), dtype=torch.uint8).view(info.dtype).reshape(info.shape)


def read(source: TensorSource, name: str, pieces=None) -> bytes:
    info = source.tensors[name]
    out = torch.zeros(info.nbytes, dtype=torch.uint8)
    cuts = sorted({0, info.nbytes, *(pieces or [])})
    spans = list(zip(cuts, cuts[1:]))
    random.Random(0).shuffle(spans)
    with ThreadPoolExecutor(4) as pool:  # in any order, on any thread
        list(pool.map(lambda s: source.read_into(info, out, *s), spans))
    return out.numpy().tobytes()


def config(models, method="ties", **extra) -> dict:
    return {"merge_method": method, "base_model": str(models[0].path),
            "models": [{"model": str(m.path), "parameters": {"weight": 1.0, "density": 0.3}} for m in models[1:]],
            **extra}


def test_pieces_read_the_same_bytes_whatever_the_cut():
    models = synthetic_models(SHAPES, finetuned=2, seed=3, pool_bytes=POOL)
    again = synthetic_models(SHAPES, finetuned=2, seed=3, pool_bytes=POOL)  # a set made anew: the same bytes
    for m, other in zip(models, again):
        assert isinstance(m, TensorSource)
        for name, info in m.tensors.items():
            whole = read(m, name)
            cuts = random.Random(name).sample(range(1, max(info.nbytes, 2)), min(7, max(info.nbytes - 1, 0)))
            cuts += [CHUNK - 3, CHUNK, 2 * CHUNK + 1]  # across and at chunk boundaries
            assert read(m, name, [c for c in cuts if c < info.nbytes]) == whole
            assert read(other, name) == whole
    other_seed = synthetic_models(SHAPES, finetuned=2, seed=4, pool_bytes=POOL)
    assert read(other_seed[1], "a") != read(models[1], "a")


def test_values_look_like_a_fine_tune():
    base, tuned = synthetic_models(SHAPES, finetuned=1, seed=0, pool_bytes=POOL)
    w, f = tensor(base, "a").reshape(-1), tensor(tuned, "a").reshape(-1)
    delta = f - w
    assert torch.isfinite(f).all() and 0.018 < float(w.std()) < 0.022
    assert 0.45 < float((delta == 0).float().mean()) < 0.55  # about half of the entries untouched
    assert 0.0018 < float(delta[delta != 0].std()) < 0.0022  # the rest moved by N(0, 0.002)
    ids = [tensor(m, "ids") for m in (base, tuned)]
    assert torch.equal(ids[0], ids[1]) and bool(((ids[0] >= 0) & (ids[0] < 100)).all())
    assert base.header_digest() != tuned.header_digest()


def test_a_generated_model_merges_as_the_same_model_on_disk(tmp_path):
    """The engine reads a source exactly as it reads files: the bytes of the sources, saved as
    safetensors, merge to the same shards."""
    models = synthetic_models(SHAPES, finetuned=3, seed=1, pool_bytes=POOL)
    folders = []
    for m in models:
        state = {n: tensor(m, n) for n in m.tensors}
        folder = tmp_path / m.path.name
        folder.mkdir()
        save_file(state, str(folder / "model.safetensors"))
        folders.append(folder)
    # the same tensors in the order the files hold them (the output's shards follow the base's order)
    order = list(Model(folders[0], "base").tensors)
    models = synthetic_models(sorted(SHAPES, key=lambda s: order.index(s[0])), finetuned=3, seed=1, pool_bytes=POOL)
    for method in ("ties", "neuromerging"):
        on_disk = {"merge_method": method, "base_model": str(folders[0]), "models": [str(f) for f in folders[1:]],
                   "out_shard_size": "3MB"}
        merge_models(on_disk, tmp_path / f"disk-{method}", device="cpu")
        merge_models({**on_disk, "base_model": str(models[0].path), "models": [str(m.path) for m in models[1:]]},
                     tmp_path / f"gen-{method}", device="cpu", sources=models)
        disk, generated = read_dir(tmp_path / f"disk-{method}"), read_dir(tmp_path / f"gen-{method}")
        assert disk.keys() == generated.keys() and len([k for k in disk if k.endswith(".safetensors")]) >= 2
        for name in disk:
            if name not in ("neurokern_manifest.json", "neurokern_config.yml"):  # they name the inputs' paths
                assert disk[name] == generated[name], name


def test_discarded_output_is_hashed_as_it_would_be_written(tmp_path):
    models = synthetic_models(llama_shapes(64, 176, 3, 4, 2, 300), finetuned=3, pool_bytes=POOL)
    cfg = config(models, out_shard_size="100KB")
    written = merge_models(cfg, tmp_path / "written", device="cpu", sources=models)
    discarded = merge_models(cfg, tmp_path / "discarded", device="cpu", sources=models, discard_output=True)
    manifest = json.loads((tmp_path / "written" / "neurokern_manifest.json").read_text())
    assert len(discarded.shard_digests) == len(written.plan.shards) >= 3
    assert discarded.shard_digests == {f: s["sha256_tree"] for f, s in manifest["shards"].items()}
    assert not (tmp_path / "discarded").exists() and not (tmp_path / "discarded.partial").exists()
    assert written.shard_digests == {}
    with pytest.raises(NeurokernError, match="discard_output merges write nothing to resume from"):
        merge_models(cfg, tmp_path / "again", device="cpu", sources=models, discard_output=True, resume=True)


def test_a_path_no_source_names_is_still_read_from_disk(models, tmp_path):
    """sources replace only the paths they name: a source for the base next to fine-tuned models on
    disk (the base read from disk, handed over as a source)."""
    from engine_helpers import write_config

    cfg = write_config(tmp_path / "c.yaml", "ties", models, {}, {"weight": 1.0, "density": 0.3})
    base = Model(models / "base", "the base, handed over")
    merge_models(cfg, tmp_path / "plain", device="cpu")
    merge_models(cfg, tmp_path / "given", device="cpu", sources=[base])
    assert read_dir(tmp_path / "plain") == read_dir(tmp_path / "given")


def test_slices_stack_layers_of_generated_models(tmp_path):
    """A passthrough config's slices over generated models: the stack is a TensorSource whose
    entries are read through the generated models; each output tensor holds the bytes of the layer
    it was taken from (embeddings from the first slice's model, norm and head from the last's), and
    the discarded merge hashes what the written one wrote."""
    models = synthetic_models(llama_shapes(64, 176, 3, 4, 2, 300), finetuned=1, pool_bytes=POOL)
    base, tuned = models
    cfg = {"merge_method": "passthrough", "out_shard_size": "100KB",
           "slices": [{"sources": [{"model": str(base.path), "layer_range": [0, 2]}]},
                      {"sources": [{"model": str(tuned.path), "layer_range": [1, 3]}]}]}
    written = merge_models(cfg, tmp_path / "out", device="cpu", sources=models)
    taken = [(base, 0), (base, 1), (tuned, 1), (tuned, 2)]  # output layer i: layer taken[i][1] of taken[i][0]
    expected = {"model.embed_tokens.weight": tensor(base, "model.embed_tokens.weight"),
                "model.norm.weight": tensor(tuned, "model.norm.weight"), "lm_head.weight": tensor(tuned, "lm_head.weight")}
    for out_layer, (source, layer) in enumerate(taken):
        for name in source.tensors:
            if name.startswith(f"model.layers.{layer}."):
                expected[name.replace(f".{layer}.", f".{out_layer}.", 1)] = tensor(source, name)
    from safetensors.torch import load_file
    merged = {}
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        merged.update(load_file(str(shard)))
    assert merged.keys() == expected.keys() and len(merged) == 2 + 4 * 9 + 1
    for name, value in expected.items():
        assert merged[name].dtype == value.dtype and torch.equal(merged[name], value), name
    discarded = merge_models(cfg, tmp_path / "discarded", device="cpu", sources=models, discard_output=True)
    manifest = json.loads((tmp_path / "out" / "neurokern_manifest.json").read_text())
    assert discarded.shard_digests == {f: s["sha256_tree"] for f, s in manifest["shards"].items()}
    assert len(written.plan.shards) >= 2
    with pytest.raises(NeurokernError, match=f"slices: model {tuned.path} has no layer 3 \\(its tensors hold layers 0...2\\)"):
        merge_models({**cfg, "slices": [cfg["slices"][0], {"sources": [{"model": str(tuned.path), "layer_range": [2, 4]}]}]},
                     tmp_path / "bad", device="cpu", sources=models)


PEAK = textwrap.dedent("""
    import json, sys
    from neurokern.engine import merge_models
    from neurokern.engine.synthetic import llama_shapes, synthetic_models

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    layers, budget = int(sys.argv[1]), sys.argv[2]
    models = synthetic_models(llama_shapes(512, 1408, layers, 8, 2, 1000), finetuned=3, pool_bytes=2 * 2**20)
    cfg = {"merge_method": "ties", "base_model": str(models[0].path), "out_shard_size": "40MB",
           "models": [{"model": str(m.path), "parameters": {"weight": 1.0, "density": 0.2}} for m in models[1:]]}
    import torch
    one = torch.empty(16, dtype=torch.uint8)
    for m in models:  # the pools, made before: what the merge itself adds is measured
        info = next(iter(m.tensors.values()))
        m.read_into(info, one, 0, 16)
    before = status("VmRSS:")
    try:  # VmHWM from here: the imports' own peak left out
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
    result = merge_models(cfg, "unused", device="cpu", sources=models, discard_output=True, memory_budget=budget)
    print(json.dumps({"before": before, "peak": status("VmHWM:"), "read": result.bytes_read,
                      "estimate": result.plan.estimate(False)["host"]}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_host_memory_does_not_grow_with_depth(tmp_path):
    """The same widths at 2 and 24 decoder layers under one --memory-budget: 10x the input bytes
    (550 MB against a 48 MiB budget), the same peak resident memory: the plan's per-unit estimate
    sets it, nothing is kept per layer."""
    # Two malloc arenas: with one per reader thread the peak varied by about 30 MB from process to
    # process, more than the bound below.
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="2",
               MALLOC_ARENA_MAX="2")
    runs = {}
    for layers in (2, 24):
        out = subprocess.run([sys.executable, "-c", PEAK, str(layers), "48MiB"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[layers] = json.loads(out.stdout.strip().splitlines()[-1])
    shallow, deep = runs[2], runs[24]
    assert deep["read"] > 9 * shallow["read"] and deep["read"] > 500e6
    assert deep["estimate"] == shallow["estimate"] <= 48 * 2**20
    # what the merge added to the process: the budget, and at most 16 MiB the estimate leaves out
    # (thread stacks, the allocator's arenas); run to run, the figures vary by about 10 MB
    for run in runs.values():
        assert run["peak"] - run["before"] <= 64 * 2**20, runs
    # 500 MB more input: were 5% of it kept, both the peak and the growth from the resident memory
    # before the merge would be 25 MB larger at 24 layers. Either alone varies from process to
    # process: the resident memory before the merge differed by up to 49 MB between two processes of
    # the same script with peaks apart too, and by 40 MB with equal peaks (the libraries' pages
    # resident or not when it was read, then touched again by the merge)
    growth = {layers: run["peak"] - run["before"] for layers, run in runs.items()}
    assert min(growth[24] - growth[2], deep["peak"] - shallow["peak"]) <= 20 * 2**20, runs
