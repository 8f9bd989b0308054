"""PEFT LoRA adapters against PEFT 0.21.2 itself: a tiny Llama built here (no download), adapters
attached and saved by PEFT with random A and B, then

- the engine's adapter source reads exactly the model PEFT's merge_and_unload makes (bitwise),
  so a merge of adapters equals nk.merge of those models (bitwise), from Python and YAML;
- neurokern's add_weighted_adapter against PEFT's for every combination type (tolerances below,
  measured on these models: most are bitwise);
- DARE against PEFT with equal masks: torch.bernoulli, PEFT's only source of randomness, is
  replaced during PEFT's call by neurokern's masks in the order PEFT draws them;
- magnitude_prune and dare_ties(elect_on="unweighted") against peft.utils.merge_utils.
"""
import copy
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from peft.utils import merge_utils  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import neurokern as nk  # noqa: E402
from neurokern.integrations import peft as nkp  # noqa: E402
from neurokern.ops import dare_keys  # noqa: E402
from neurokern.ops.reference import dare_keep  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = [0.7, -1.2, 0.5]
TARGETS = ["q_proj", "v_proj", "down_proj"]
# (lora_alpha, use_rslora) of the three rank-4 adapters
ADAPTERS = [(8, False), (4, True), (16, False)]


def tiny_llama(dtype=torch.float32):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


def attach(base, config: LoraConfig, g: torch.Generator):
    """A PEFT model with random LoRA factors (B is zero at PEFT's init)."""
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """base folder, three adapter folders (rank 4), and PEFT's model with all three loaded."""
    warnings.filterwarnings("ignore", category=UserWarning)
    root = tmp_path_factory.mktemp("peft")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    paths = []
    for i, (alpha, rslora) in enumerate(ADAPTERS):
        model = attach(base, LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS, use_rslora=rslora), g)
        model.save_pretrained(root / f"a{i}")
        paths.append(root / f"a{i}")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0]), adapter_name="a0")
    for i in (1, 2):
        peft_model.load_adapter(str(paths[i]), adapter_name=f"a{i}")
    return {"root": root, "base": base, "paths": paths, "peft": peft_model}


def merged_and_unloaded(base, path: Path) -> dict:
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    return {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}


# ------------------------------------------------------------------------------------------------
# The adapter as a fine-tuned model


def test_adapter_reads_as_merge_and_unload(setup):
    """load_finetuned and the engine's source give PEFT's merged model, bitwise."""
    base, paths = setup["base"], setup["paths"]
    for path in paths:
        ref = merged_and_unloaded(base, path)
        ours = nkp.load_finetuned(base, path)
        assert list(ours) == list(ref)
        for k in ref:
            assert torch.equal(ours[k], ref[k]), k
        changed = [k for k in ref if not torch.equal(ref[k], base.state_dict()[k])]
        assert len(changed) == 2 * len(TARGETS)  # every adapted weight moved, nothing else


def test_engine_source_reads_any_byte_range_as_merge_and_unload(setup):
    """The engine's source of an adapter (AdapterModel) gives PEFT's merged bytes read whole, in its
    own pieces, in whole rows a few at a time (read in place into the destination), and in ranges
    that cut rows or begin at an odd byte (formed aside, then copied), into a buffer at an odd
    address too."""
    from neurokern.engine.adapters import AdapterModel
    from neurokern.engine.sources import Model

    base, root = setup["base"], setup["root"]
    path = setup["paths"][1]
    ref = merged_and_unloaded(base, path)
    model = AdapterModel(path, "models[0]", Model(root / "base", "base_model"))
    derived = [info for info in model.tensors.values() if info.derive is not None]
    assert len(derived) == 2 * len(TARGETS)
    for info in derived:
        want = ref[info.name].contiguous().view(-1).view(torch.uint8)
        row = info.nbytes // info.shape[0]
        rows = [(at, min(at + 3 * row, info.nbytes)) for at in range(0, info.nbytes, 3 * row)]
        cuts = sorted({0, info.nbytes, 1, 7, info.nbytes // 3, info.nbytes // 2 + 1, info.nbytes - 3})
        for spans in ([(0, info.nbytes)], info.derive.pieces(), rows, list(zip(cuts, cuts[1:]))):
            for shift in (0, 1):
                buf = torch.full((info.nbytes + shift,), 0xAB, dtype=torch.uint8)
                out = buf[shift:]
                for begin, end in spans:
                    model.read_into(info, out, begin, end)
                assert torch.equal(out, want), (info.name, spans[:3], shift)


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"weights": WEIGHTS}),
    ("ties", {"density": 0.4, "weights": WEIGHTS}),
    ("dare_ties", {"density": 0.5, "weights": WEIGHTS, "elect_on": "unweighted", "normalize": "count",
                   "rescale": "density"}),
    ("magnitude_prune", {"density": 0.3, "weights": WEIGHTS, "trim_scope": "global"}),
    ("neuromerging", {"density": 0.2}),
])
def test_engine_merges_adapters_as_full_models(setup, tmp_path, method, params):
    """nk.merge_models over adapter folders == nk.merge over PEFT's merged models, bitwise."""
    base, paths, root = setup["base"], setup["paths"], setup["root"]
    config = {"merge_method": method, "base_model": str(root / "base"), "models": [str(p) for p in paths],
              "parameters": params}
    nk.merge_models(config, tmp_path / "out", device="cpu", memory_budget="64MiB")
    out = load_file(tmp_path / "out" / "model.safetensors")
    ref = nk.merge(base, [merged_and_unloaded(base, p) for p in paths], method=method, **params)
    assert set(out) == set(ref)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k


def test_yaml_bf16_mixed_with_a_full_model_and_small_pieces(setup, tmp_path):
    """YAML config; a bf16 base (the fp32 factors added in float32, rounded once, as PEFT does); an
    adapter beside a full fine-tuned model; derived tensors read in pieces of one row; a resume
    after the run is byte-identical."""
    from neurokern.engine.settings import EngineSettings
    base = tiny_llama(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    full = {k: v + 0.01 for k, v in base.state_dict().items()}
    save_file(full, str(tmp_path / "full.safetensors"))
    yaml = (f"merge_method: ties\nbase_model: base\nmodels:\n  - model: {setup['paths'][0]}\n"
            "    parameters: {weight: 0.6, density: 0.5}\n  - model: full.safetensors\n"
            "    parameters: {weight: 0.4, density: 0.5}\n")
    (tmp_path / "cfg.yaml").write_text(yaml)
    nk.merge_models(tmp_path / "cfg.yaml", tmp_path / "out", device="cpu",
                    settings=EngineSettings(adapter_piece_bytes=1))  # one row per piece
    out = load_file(tmp_path / "out" / "model.safetensors")
    ref = nk.merge(base, [merged_and_unloaded(base, setup["paths"][0]), full], method="ties",
                   weights=[0.6, 0.4], density=0.5)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    assert ref["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_plan_counts_the_work_of_derived_reads(setup, tmp_path, method):
    """The host estimate of a merge of adapters is that of the same merge of full models plus the
    work of the read threads that may form derived tensors at once (DERIVED_READERS of the 16),
    which stays a few pieces however large the model; the
    method's own temporaries (Method.work_bytes: breadcrumbs' exceed the default 16 bytes per
    element) are counted beside it."""
    from neurokern.engine.adapters import read_adapter
    from neurokern.engine.executor import DERIVED_READERS
    from neurokern.engine.settings import EngineSettings
    from neurokern.methods import METHODS
    paths, base, root = setup["paths"], setup["base"], setup["root"]
    settings = EngineSettings(read_threads=16)
    full = []
    for i, p in enumerate(paths):
        save_file(merged_and_unloaded(base, p), str(tmp_path / f"full{i}.safetensors"))
        full.append(str(tmp_path / f"full{i}.safetensors"))
    plans = [nk.merge_models({"merge_method": merge_method, "base_model": str(root / "base"), "models": models},
                             tmp_path / "out", device="cpu", dry_run=True, settings=settings).plan
             for merge_method in (method, "ties") for models in ([str(p) for p in paths], full)]
    adapters, fulls, _, fulls_ties = (plan.estimate(cuda=False)["host"] for plan in plans)
    rows, cols = 16, 24  # the widest adapted weight: down_proj, [16, 24]; all its rows fit one piece
    # the rows (fp32 weights); lora_add_rows's float32 tile (all 16 rows); A [4, 24] and B's rows [16, 4], fp32
    work = rows * cols * 4 + rows * cols * 4 + 4 * (4 * 24 + 16 * 4)
    assert {m.r for a in map(read_adapter, paths) for m in a.modules.values()} == {4}
    assert adapters - fulls == DERIVED_READERS * work  # the threads forming pieces at once, of 16 readers
    method_work = METHODS[method].work_bytes(len(paths))
    assert plans[0].work_bytes == method_work and plans[0].derived_work == DERIVED_READERS * work
    assert fulls - fulls_ties == (method_work - 16) * plans[1].max_numel
    assert method == "ties" or method_work > 16


@pytest.mark.parametrize("method,models,params,ref_params", [
    ("slerp", [{"model": "a0"}], {"t": 0.3}, {"t": 0.3}),
    ("linear", [{"model": "base", "parameters": {"weight": 0.4}}, {"model": "a0", "parameters": {"weight": 0.6}},
                {"model": "a1", "parameters": {"weight": 1.0}}], {}, {"base_weight": 0.4, "weights": [0.6, 1.0]}),
    ("breadcrumbs", [{"model": "a0", "parameters": {"weight": 0.7, "density": 0.8}},
                     {"model": "a2", "parameters": {"weight": 0.5, "density": 0.8}}], {"gamma": 0.1},
     {"weights": [0.7, 0.5], "density": 0.8, "gamma": 0.1}),
])
def test_mergekit_methods_over_adapters(setup, tmp_path, method, models, params, ref_params):
    """mergekit's methods take adapter folders as fine-tuned models like any other: the engine's
    merge == nk.merge over PEFT's merged models, bitwise."""
    base, root = setup["base"], setup["root"]
    config = {"merge_method": method, "base_model": str(root / "base"), "parameters": params,
              "models": [{**m, "model": str(root / m["model"])} for m in models]}
    nk.merge_models(config, tmp_path / "out", device="cpu")
    out = load_file(tmp_path / "out" / "model.safetensors")
    finetuned = [merged_and_unloaded(base, root / m["model"]) for m in models if m["model"] != "base"]
    ref = nk.merge(base, finetuned, method=method, **ref_params)
    assert set(out) == set(ref)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k


def test_adapter_in_passthrough_or_slices_is_refused(setup, tmp_path):
    """An adapter needs the base it was trained on: as a passthrough model, a layer source of
    slices, or in a config without base_model it is refused in one line, nothing written; merged
    into its base first (what the message says), its layers stack like any model's."""
    root, adapter = setup["root"], str(setup["paths"][0])
    base = str(root / "base")
    stack = {"merge_method": "passthrough", "slices": [{"sources": [{"model": base, "layer_range": [0, 2]}]},
                                                       {"sources": [{"model": adapter, "layer_range": [1, 2]}]}]}
    merge_first = "merge it into the model it was trained on first"
    cases = [
        (stack, rf"config slices: {re.escape(adapter)} is a LoRA adapter folder \(adapter_config.json\); "
                rf"slices take layers of whole models: {merge_first}"),
        ({"merge_method": "passthrough", "models": [{"model": adapter}]},
         rf"config: {re.escape(adapter)} is a LoRA adapter folder .*the one model the config copies: {merge_first}"),
        ({"merge_method": "linear", "models": [{"model": base, "parameters": {"weight": 0.5}},
                                               {"model": adapter, "parameters": {"weight": 0.5}}]},
         rf"config: {re.escape(adapter)} is a LoRA adapter folder .*the config has no base_model"),
    ]
    for config, message in cases:
        for dry_run in (True, False):
            with pytest.raises(nk.NeurokernError, match=message) as error:
                nk.merge_models(config, tmp_path / "out", device="cpu", dry_run=dry_run)
            assert "\n" not in str(error.value)
            assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*partial*"))

    nk.merge_models({"merge_method": "task_arithmetic", "base_model": base, "models": [adapter]},
                    tmp_path / "merged", device="cpu")
    stack["slices"][1]["sources"][0]["model"] = str(tmp_path / "merged")
    nk.merge_models(stack, tmp_path / "out", device="cpu")
    out = load_file(tmp_path / "out" / "model.safetensors")
    merged = merged_and_unloaded(setup["base"], setup["paths"][0])
    plain = setup["base"].state_dict()
    assert len(out) == len(plain) + len([k for k in plain if ".layers.1." in k])
    for k, v in out.items():
        if ".layers.2." in k:
            assert torch.equal(v, merged[k.replace(".layers.2.", ".layers.1.")]), k
        elif k.startswith("model.embed_tokens"):
            assert torch.equal(v, plain[k]), k
        else:  # layers 0, 1 from the base; the norm and head from the last slice's model
            assert torch.equal(v, plain[k] if ".layers." in k else merged[k]), k
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3


def merge_cli(*args, crash=None):
    """`python -m neurokern merge ARGS`; with crash=KIND:N it ends at once at that event (tests/faults.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["NEUROKERN_MAX_UNIT_BYTES"] = "4096"  # many units: the kill lands mid-merge
    fault = [str(ROOT / "tests" / "faults.py"), "crash", crash] if crash else []
    return subprocess.run([sys.executable, *fault, "-m", "neurokern", "merge", *map(str, args), "--device", "cpu",
                           "--quiet"], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_resume_after_kill_is_byte_identical_and_sees_an_edited_adapter(setup, tmp_path):
    """A merge of adapters killed after some shards resumes to the uninterrupted bytes; an adapter
    config edited in between (lora_alpha: another ΔW) is refused as a changed input."""
    import shutil
    paths = [shutil.copytree(p, tmp_path / p.name) for p in setup["paths"]]
    yaml = (f"merge_method: ties\nbase_model: {setup['root'] / 'base'}\nout_shard_size: 4kB\nmodels:\n"
            + "".join(f"  - model: {p}\n    parameters: {{weight: 0.5, density: 0.4}}\n" for p in paths))
    (tmp_path / "cfg.yaml").write_text(yaml)
    done = merge_cli(tmp_path / "cfg.yaml", tmp_path / "whole")
    assert done.returncode == 0, done.stderr
    killed = merge_cli(tmp_path / "cfg.yaml", tmp_path / "out", crash="shards:2")
    assert killed.returncode == 137 and (tmp_path / "out.partial").is_dir()
    resumed = merge_cli(tmp_path / "cfg.yaml", tmp_path / "out", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    files = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert len(files) > 2
    for name in files:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()

    killed = merge_cli(tmp_path / "cfg.yaml", tmp_path / "out2", crash="shards:2")
    assert killed.returncode == 137
    edit = json.loads((paths[1] / "adapter_config.json").read_text())
    edit["lora_alpha"] = 3
    (paths[1] / "adapter_config.json").write_text(json.dumps(edit))
    refused = merge_cli(tmp_path / "cfg.yaml", tmp_path / "out2", "--resume")
    assert refused.returncode == 2 and re.search("different config or different inputs|inputs changed", refused.stderr), \
        refused.stderr
    assert (tmp_path / "out2.partial").is_dir()  # kept for a resume once the input is put back


def test_embedding_rank_pattern_alpha_pattern_modules_to_save(tmp_path):
    """Embedding LoRA (A is [r, vocab], ΔW = (B·A)ᵀ), per-module rank and alpha, a module saved
    whole, GPT-2's fan_in_fan_out Conv1D: all as merge_and_unload makes them."""
    base = tiny_llama()
    g = torch.Generator().manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                        rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
                        modules_to_save=["lm_head"])
    model = attach(base, config, g)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    model.save_pretrained(tmp_path / "a")
    ref = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    ours = nkp.load_finetuned(base, tmp_path / "a")
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    base.save_pretrained(tmp_path / "base")
    nk.merge_models({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
                     "models": [str(tmp_path / "a")]}, tmp_path / "out", device="cpu")
    out = load_file(tmp_path / "out" / "model.safetensors")
    for k in ref:
        assert torch.equal(out[k], ref[k]), k

    # the same float32 adapter on a bf16 base: the stored whole tensors are converted to bf16 first
    base16 = tiny_llama(torch.bfloat16)
    base16.save_pretrained(tmp_path / "base16")
    ref = merged_and_unloaded(base16, tmp_path / "a")
    nk.merge_models({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base16"),
                     "models": [str(tmp_path / "a")]}, tmp_path / "out16", device="cpu")
    out = load_file(tmp_path / "out16" / "model.safetensors")
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    assert out["lm_head.weight"].dtype == torch.bfloat16

    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50,
                                                                n_positions=8))
    model = attach(gpt, LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn"], fan_in_fan_out=True), g)
    model.save_pretrained(tmp_path / "g")
    ref = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    ours = nkp.load_finetuned(gpt, tmp_path / "g")
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("weight_dtype", DTYPES, ids=["w-f32", "w-bf16", "w-f16"])
@pytest.mark.parametrize("factor_dtype", DTYPES, ids=["f-f32", "f-bf16", "f-f16"])
def test_lora_add_rows_is_peft_merge_for_every_dtype_pair(weight_dtype, factor_dtype):
    """The readers' op (lora_add_rows) against PEFT's own merge_and_unload on a CPU, for every pair
    of weight and factor dtypes (the tests above read float32 factors), on a Linear layer, an
    Embedding and GPT-2's fan_in_fan_out Conv1D, in pieces of 1, 15, 16 and 17 rows and whole:
    bitwise."""
    from transformers.pytorch_utils import Conv1D

    from neurokern.ops import lora_add_rows

    g = torch.Generator().manual_seed(5)
    layers = {"linear": (torch.nn.Linear(37, 40), False), "embedding": (torch.nn.Embedding(45, 19), False),
              "conv1d": (Conv1D(33, 21), True)}  # Conv1D(nf, nx): weight [nx, nf], ΔW = (B·A)ᵀ
    for kind, (layer, fan_in_fan_out) in layers.items():
        rows, cols = layer.weight.shape
        with torch.no_grad():  # entries of every magnitude, so that the sum's rounding matters in every binade
            layer.weight.copy_(torch.randn(rows, cols, generator=g) * torch.logspace(-3, 2, cols))
        base = torch.nn.Sequential(layer).to(weight_dtype)
        weight = base[0].weight.detach().clone()
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=7, target_modules=["0"], fan_in_fan_out=fan_in_fan_out))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data = (0.3 * torch.randn(p.shape, generator=g)).to(factor_dtype)
        lora = model.base_model.model[0]
        if kind == "embedding":
            A, B = lora.lora_embedding_A["default"], lora.lora_embedding_B["default"]
        else:
            A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        A, B, scale = A.detach().clone(), B.detach().clone(), lora.scaling["default"]
        want = model.merge_and_unload()[0].weight.detach()
        assert want.dtype == weight_dtype and not torch.equal(want, weight)
        for n in (1, 15, 16, 17, rows):
            for first in sorted({0, 3, rows - n}):
                got = weight[first:first + n].clone()
                lora_add_rows(got, A, B, scale, kind != "linear", kind == "embedding", first)
                assert torch.equal(got.view(torch.uint8), want[first:first + n].view(torch.uint8)), (kind, first, n)


# ------------------------------------------------------------------------------------------------
# One adapter out of several: against PEFT's add_weighted_adapter


def peft_merge(setup, combination, **kw):
    model = setup["peft"]
    name = f"{combination}-{len(model.peft_config)}"
    model.add_weighted_adapter(["a0", "a1", "a2"], WEIGHTS, name, combination_type=combination, **kw)
    return get_peft_model_state_dict(model, adapter_name=name), model.peft_config[name]


def compare(ref: dict, ours: dict, factors_tol: float, product_tol: float) -> tuple[float, float]:
    """Largest relative error of the factors (each against its largest entry) and of B·A."""
    assert set(ref) == set(ours)
    factor_err = product_err = 0.0
    for k in ref:
        scale = ref[k].abs().max().clamp_min(1e-30)
        factor_err = max(factor_err, float((ref[k] - ours[k]).abs().max() / scale))
        if ".lora_A." in k:
            kb = k.replace(".lora_A.", ".lora_B.")
            p_ref, p_ours = ref[kb] @ ref[k], ours[kb] @ ours[k]
            product_err = max(product_err, float((p_ref - p_ours).abs().max() / p_ref.abs().max()))
    assert factor_err <= factors_tol and product_err <= product_tol, (factor_err, product_err)
    return factor_err, product_err


# (combination, PEFT kwargs, factor tolerance, product tolerance). Bitwise where both run the same
# float32 arithmetic in the same order (cat, linear, svd, magnitude_prune: a weighted sum of the
# same products, the same LAPACK SVD of the same matrix); TIES elects and sums in float64 in
# neurokern and in float32 in PEFT (a few ulp); an SVD of inputs a few ulp apart moves its factors
# by a few ulp times the condition of the singular subspace.
DETERMINISTIC = [
    ("cat", {}, 0.0, 0.0),
    ("linear", {}, 0.0, 0.0),
    ("svd", {}, 0.0, 0.0),
    ("svd", {"svd_rank": 2}, 0.0, 0.0),
    ("magnitude_prune", {"density": 0.5}, 0.0, 0.0),
    ("magnitude_prune_svd", {"density": 0.3}, 0.0, 0.0),
    ("ties", {"density": 0.5}, 1e-6, 1e-6),
    ("ties", {"density": 0.5, "majority_sign_method": "frequency"}, 1e-6, 1e-6),
    ("ties_svd", {"density": 0.4}, 1e-4, 1e-5),
]


@pytest.mark.parametrize("combination,kw,factors_tol,product_tol", DETERMINISTIC)
def test_add_weighted_adapter_matches_peft(setup, combination, kw, factors_tol, product_tol):
    ref, ref_config = peft_merge(setup, combination, **kw)
    ours = nkp.add_weighted_adapter(setup["paths"], WEIGHTS, combination, **kw)
    compare(ref, ours, factors_tol, product_tol)
    assert ours.config["r"] == ref_config.r and ours.config["lora_alpha"] == ref_config.lora_alpha


def product_error(ref: dict, ours: dict) -> float:
    """Largest relative error of B·A over the modules."""
    worst = 0.0
    for k in ref:
        if ".lora_A." in k:
            kb = k.replace(".lora_A.", ".lora_B.")
            p_ref, p_ours = ref[kb] @ ref[k], ours[kb] @ ours[k]
            worst = max(worst, float((p_ref - p_ours).abs().max() / p_ref.abs().max()))
    return worst


@pytest.mark.parametrize("rank", [2, 4, 12, 20])
def test_factored_svd_equals_the_full_one(setup, rank):
    """svd="factored" (QR of the stacked factors, the SVD of a K x K core, K = 12 here) gives the
    full SVD's best rank-r factors up to float32 rounding, below, at and above K (zero-padded): ~1e-6
    of B·A, 7e-6 at rank 2, where the gap between the 2nd and 3rd singular values is smallest (a
    truncated subspace moves by the rounding over that gap)."""
    paths = setup["paths"]
    tol = 1e-5 if rank < 12 else 2e-6
    full = nkp.merge_adapters(paths, WEIGHTS, rank=rank)
    factored = nkp.merge_adapters(paths, WEIGHTS, rank=rank, svd="factored")
    assert set(full) == set(factored) and all(full[k].shape == factored[k].shape for k in full)
    assert product_error(full, factored) <= tol
    with_base = nkp.merge_adapters(paths, WEIGHTS, rank=rank, svd="factored", base=setup["base"])
    assert product_error(full, with_base) <= tol
    positive = [0.7, 1.2, 0.5]  # linear's normalize divides by their sum (WEIGHTS sum to 0)
    normalized = nkp.merge_adapters(paths, positive, method="linear", rank=rank, svd="factored", base=setup["base"])
    assert product_error(nkp.merge_adapters(paths, positive, method="linear", rank=rank), normalized) <= tol


def test_factored_svd_against_float64(setup):
    """Against ΔW = Σ w_t·s_t·B_t·A_t and its rank-3 truncation in float64: the factored SVD's B·A
    is within 2e-6 (relative to the largest entry), as the full float32 SVD's is."""
    from neurokern.engine.adapters import factors, read_adapter

    paths = setup["paths"]
    adapters = [read_adapter(p) for p in paths]
    full = nkp.merge_adapters(paths, WEIGHTS, rank=3)
    factored = nkp.merge_adapters(paths, WEIGHTS, rank=3, svd="factored")
    for key in [k for k in factored if ".lora_A." in k]:
        module = key.split("base_model.model.", 1)[1].rsplit(".lora_A.", 1)[0]
        weight = f"{module}.weight"
        delta = sum(w * a.modules[weight].scale * (lambda A, B: B.double() @ A.double())(*factors(a.modules[weight]))
                    for w, a in zip(WEIGHTS, adapters))
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        truth = (U[:, :3] * S[:3]) @ Vh[:3]
        kb = key.replace(".lora_A.", ".lora_B.")
        err = {name: float(((m[kb].double() @ m[key].double()) - truth).abs().max() / truth.abs().max())
               for name, m in (("full", full), ("factored", factored))}
        assert err["factored"] <= 2e-6 and err["full"] <= 2e-6, (key, err)


def test_factored_svd_against_peft_and_on_transposed_layers(setup, tmp_path):
    ref, _ = peft_merge(setup, "svd", svd_rank=3)
    ours = nkp.add_weighted_adapter(setup["paths"], WEIGHTS, "svd", svd_rank=3, svd="factored")
    assert set(ref) == set(ours) and product_error(ref, ours) <= 2e-6
    # an embedding (A is [r, vocab], ΔW = (B·A)ᵀ as the base holds it) and a fan_in_fan_out Conv1D
    g = torch.Generator().manual_seed(5)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50,
                                                                n_positions=8))
    folders = []
    for i in range(2):
        config = LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "wte"], fan_in_fan_out=True)
        attach(copy.deepcopy(gpt), config, g).save_pretrained(tmp_path / f"g{i}")
        folders.append(tmp_path / f"g{i}")
    full = nkp.merge_adapters(folders, [0.6, -0.9], rank=4)
    factored = nkp.merge_adapters(folders, [0.6, -0.9], rank=4, svd="factored")
    assert set(full) == set(factored) and product_error(full, factored) <= 2e-6


def test_factored_svd_refuses_what_is_not_low_rank(setup):
    paths = setup["paths"]
    with pytest.raises(nk.NeurokernError, match="svd='factored' merges the factors of a fixed weighted sum"):
        nkp.merge_adapters(paths, method="ties", density=0.5, svd="factored")
    with pytest.raises(nk.NeurokernError, match="gives the base the coefficient 2: the merged ΔW is not low-rank"):
        nkp.merge_adapters(paths, [1.0, 1.0, 1.0], method="linear", normalize=False, base_weight=-1.0,
                           base=setup["base"], svd="factored")
    with pytest.raises(nk.NeurokernError, match="svd='factored' applies to the SVD combination types"):
        nkp.add_weighted_adapter(paths, WEIGHTS, "linear", svd="factored")
    with pytest.raises(nk.NeurokernError, match="svd must be 'full' or 'factored'"):
        nkp.merge_adapters(paths, svd="fast")


class BernoulliFeed:
    """torch.bernoulli replaced: hands out the given masks in order, each checked against the shape
    and probability PEFT asks for."""

    def __init__(self, masks: list, density: float):
        self.masks, self.density = list(masks), density

    def __call__(self, probabilities, *args, **kwargs):
        mask = self.masks.pop(0)
        assert mask.shape == probabilities.shape and torch.all(probabilities == torch.tensor(self.density, dtype=probabilities.dtype))
        return mask.to(probabilities.dtype)


def neurokern_masks(setup, combination: str, density: float, seed: int) -> list:
    """neurokern's DARE masks in the order PEFT draws them: module by module (the model's order),
    for the *_svd types one per adapter of ΔW, else the A's then the B's."""
    masks = []
    adapters = [nkp.read_adapter(p) for p in setup["paths"]]
    for name in [n for n in setup["base"].state_dict() if n in adapters[0].modules]:
        m = adapters[0].modules[name]
        if combination.endswith("_svd"):
            groups = [(name, m.shape)]
        else:
            groups = [(f"{m.module}.lora_A.weight", m.A.shape), (f"{m.module}.lora_B.weight", m.B.shape)]
        for tensor, shape in groups:
            keys = dare_keys(seed, tensor, len(adapters))
            masks += [dare_keep(shape[0] * shape[1], density, key, shape) for key in keys]
    return masks


@pytest.mark.parametrize("combination,factors_tol,product_tol", [
    ("dare_linear", 1e-6, 1e-6), ("dare_ties", 1e-6, 1e-6),
    ("dare_linear_svd", 1e-4, 1e-5), ("dare_ties_svd", 1e-4, 1e-5),
])
def test_dare_matches_peft_with_the_same_masks(setup, monkeypatch, combination, factors_tol, product_tol):
    density, seed = 0.6, 5
    feed = BernoulliFeed(neurokern_masks(setup, combination, density, seed), density)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "bernoulli", feed)
        ref, _ = peft_merge(setup, combination, density=density)
    assert not feed.masks  # PEFT drew exactly the masks neurokern uses
    ours = nkp.add_weighted_adapter(setup["paths"], WEIGHTS, combination, density=density, seed=seed)
    compare(ref, ours, factors_tol, product_tol)


def test_dare_statistics_without_equal_masks(setup):
    """Where the masks differ (torch's generator against neurokern's): the kept fraction and the
    mean of the merged ΔW over seeds agree with the undropped sum (DARE is unbiased)."""
    density = 0.5
    full = nkp.add_weighted_adapter(setup["paths"], WEIGHTS, "svd", svd_rank=12)
    mean, seeds = None, 200
    for seed in range(seeds):
        one = nkp.merge_adapters(setup["paths"], WEIGHTS, method="dare", density=density, seed=seed, rank=12)
        key = next(k for k in one if "q_proj.lora_A" in k)
        product = one[key.replace("lora_A", "lora_B")] @ one[key]
        mean = product if mean is None else mean + product
    target = full[key.replace("lora_A", "lora_B")] @ full[key]
    rel = float((mean / seeds - target).norm() / target.norm())
    assert rel < 0.1, rel  # the mean of 200 draws: sd ~ 1/sqrt(200) of one draw's relative spread
    keep = dare_keep(10**5, density, dare_keys(0, "x", 1)[0]).float().mean()
    assert abs(float(keep) - density) < 0.01


# ------------------------------------------------------------------------------------------------
# neurokern's own adapter merges


def test_merge_adapters_cat_is_exact_and_loads_in_peft(setup, tmp_path):
    """cat: B·A = Σ w_t·scale_t·B_t·A_t; the written folder loads in PEFT and its merge_and_unload
    equals the engine's merge of the three adapters with task arithmetic (float32 rounding)."""
    paths, base = setup["paths"], setup["base"]
    merged = nkp.merge_adapters(paths, WEIGHTS, method="cat", out_dir=tmp_path / "cat")
    assert merged.config["r"] == 12
    adapters = [nkp.read_adapter(p) for p in paths]
    for name, m in adapters[0].modules.items():
        exact = sum(w * a.modules[name].scale * (load(a.modules[name].B) @ load(a.modules[name].A)).double()
                    for a, w in zip(adapters, WEIGHTS))
        key = f"base_model.model.{m.module}.lora_"
        got = (merged[key + "B.weight"] @ merged[key + "A.weight"]).double()
        assert float((got - exact).abs().max() / exact.abs().max()) < 1e-6
    loaded = merged_and_unloaded(base, tmp_path / "cat")
    ref = nk.merge(base, [merged_and_unloaded(base, p) for p in paths], method="task_arithmetic", weights=WEIGHTS)
    for k in ref:
        assert torch.allclose(loaded[k], ref[k], rtol=0, atol=1e-5), k
    with pytest.raises(nk.NeurokernError, match="exists and is not an empty folder"):
        merged.save(tmp_path / "cat")


def load(info):
    from neurokern.engine.adapters import read_tensor
    return read_tensor(info)


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "trim_scope": "global"}),
    ("dare_ties", {"density": 0.5, "seed": 3}),
    ("neuromerging", {"density": 0.3}),
])
def test_merge_adapters_in_full_space_then_svd(setup, method, params):
    """Any method on the ΔW_t (its whole-model passes over all adapted tensors), then the best
    rank-r approximation: against nk.merge on the whole set of ΔW_t at once and an SVD."""
    paths, base = setup["paths"], setup["base"]
    adapters = [nkp.read_adapter(p) for p in paths]
    names = list(adapters[0].modules)
    deltas = [{n: a.modules[n].scale * (load(a.modules[n].B) @ load(a.modules[n].A)) for n in names}
              for a in adapters]
    kw = {"base": base} if method == "neuromerging" else {}
    if method == "neuromerging":
        sd = base.state_dict()
        theta0 = {n: sd[n] for n in names}
        finetuned = [{n: theta0[n] + d[n] for n in names} for d in deltas]
    else:
        theta0 = {n: torch.zeros_like(deltas[0][n]) for n in names}
        finetuned = deltas
    weights = None if method == "neuromerging" else WEIGHTS
    ref = nk.merge(theta0, finetuned, method=method, **({"weights": weights} if weights else {}), **params)
    ours = nkp.merge_adapters(paths, weights, method=method, rank=3, **kw, **params)
    for n in names:
        module = adapters[0].modules[n].module
        delta = ref[n] - theta0[n]
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        got = ours[f"base_model.model.{module}.lora_B.weight"] @ ours[f"base_model.model.{module}.lora_A.weight"]
        assert float((got - best).abs().max() / best.abs().max()) < 1e-5, n


# ------------------------------------------------------------------------------------------------
# The two PEFT variants as neurokern methods, against merge_utils


def test_magnitude_prune_and_unweighted_election_match_merge_utils():
    g = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(33, 17, generator=g), "b": torch.randn(5, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    w = torch.tensor(WEIGHTS)
    for k in base:
        taus = [f[k] - base[k] for f in fts]
        ours = nk.merge(base, fts, "magnitude_prune", density=0.3, weights=WEIGHTS)[k]
        ref = base[k] + merge_utils.magnitude_prune(taus, w, 0.3)
        assert torch.allclose(ours, ref, rtol=0, atol=1e-6)
        ours = nk.merge(base, fts, "dare_ties", density=1.0, weights=WEIGHTS, elect_on="unweighted",
                        normalize="count")[k]
        ref = base[k] + merge_utils.dare_ties(taus, w, 1.0)
        assert torch.allclose(ours, ref, rtol=0, atol=1e-6)
    # the default (mergekit's) election on weighted vectors differs where the weights flip a vote
    weighted = nk.merge(base, fts, "dare_ties", density=1.0, weights=WEIGHTS, normalize="count")["w"]
    assert not torch.allclose(weighted, base["w"] + merge_utils.dare_ties([f["w"] - base["w"] for f in fts], w, 1.0))


def test_magnitude_prune_exact_ties_and_degenerate():
    """Ties in magnitude: exact_k keeps the first by position, keep keeps them all; an all-zero task
    vector contributes nothing; one model and density 1 is task arithmetic."""
    base = {"w": torch.zeros(2, 4)}
    ft = {"w": torch.tensor([[1.0, -2.0, 2.0, 0.5], [2.0, 0.1, -0.2, 0.0]])}
    zero = {"w": torch.zeros(2, 4)}
    out = nk.merge(base, [ft, zero], "magnitude_prune", density=0.25)["w"]  # k = 2 of three tied 2's
    assert out.tolist() == [[0.0, -2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    out = nk.merge(base, [ft, zero], "magnitude_prune", density=0.25, ties="keep")["w"]
    assert out.tolist() == [[0.0, -2.0, 2.0, 0.0], [2.0, 0.0, 0.0, 0.0]]
    out = nk.merge(base, [ft], "magnitude_prune", density=1.0, weights=[0.5])["w"]
    assert torch.equal(out, 0.5 * ft["w"])
    with pytest.raises(nk.NeurokernError, match="density"):
        nk.merge(base, [ft], "magnitude_prune", density=0.0)
    with pytest.raises(nk.NeurokernError, match="elect_on"):
        nk.merge(base, [ft], "dare", elect_on="unweighted")


# ------------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing written


def edit_config(src: Path, dst: Path, **changes) -> Path:
    import shutil
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes,message", [
    ({"use_dora": True}, "use_dora is true"),
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"r": 8}, "expected rank 8"),
    ({"r": 0}, "r is 0; expected a positive integer"),
    ({"rank_pattern": {"q_proj": "x"}}, "rank_pattern"),
])
def test_bad_adapter_config(setup, tmp_path, changes, message):
    bad = edit_config(setup["paths"][0], tmp_path / "bad", **changes)
    config = {"merge_method": "task_arithmetic", "base_model": str(setup["root"] / "base"), "models": [str(bad)]}
    with pytest.raises(nk.NeurokernError, match=message):
        nk.merge_models(config, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    with pytest.raises(nk.NeurokernError, match=message):
        nkp.merge_adapters([bad])


def test_adapter_of_another_model(setup, tmp_path):
    """An adapter whose module the base lacks, or whose ΔW has another shape: named."""
    g = torch.Generator().manual_seed(4)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=20, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1))
    attach(other, LoraConfig(r=2, target_modules=["down_proj"]), g).save_pretrained(tmp_path / "other")
    config = {"merge_method": "task_arithmetic", "base_model": str(setup["root"] / "base"),
              "models": [str(tmp_path / "other")]}
    with pytest.raises(nk.NeurokernError, match=r"down_proj.*ΔW of shape \(16, 20\).*\(16, 24\)"):
        nk.merge_models(config, tmp_path / "out", device="cpu")
    with pytest.raises(nk.NeurokernError, match="ΔW of shape"):
        nkp.merge_adapters([setup["paths"][0], tmp_path / "other"])
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=24, vocab_size=50))
    attach(bert, LoraConfig(r=2, target_modules=["query"]), g).save_pretrained(tmp_path / "bert")
    config["models"] = [str(tmp_path / "bert")]
    with pytest.raises(nk.NeurokernError, match="has no tensor 'encoder.layer.0.attention.self.query.weight'"):
        nk.merge_models(config, tmp_path / "out", device="cpu")


def test_non_finite_adapter_factor_is_named(setup, tmp_path):
    """A NaN in a factor: every way in (the engine, merge_adapters' cat and full space,
    add_weighted_adapter's factor-wise types) names the factor and file, never a NaN merge."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(setup["paths"][1], bad)
    file = bad / "adapter_model.safetensors"
    state = load_file(file)
    name = next(k for k in state if "lora_B" in k)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(file), metadata={"format": "pt"})
    paths = [setup["paths"][0], bad]
    message = rf"tensor {name!r} of .*adapter_model.safetensors has non-finite values"
    config = {"merge_method": "task_arithmetic", "base_model": str(setup["root"] / "base"), "models": [str(bad)]}
    with pytest.raises(nk.NeurokernError, match=message):
        nk.merge_models(config, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    for method in ("cat", "ties"):
        with pytest.raises(nk.NeurokernError, match=message):
            nkp.merge_adapters(paths, method=method, **({"density": 0.5} if method == "ties" else {}))
    with pytest.raises(nk.NeurokernError, match=message):
        nkp.add_weighted_adapter(paths, [1.0, 1.0], "linear")


def test_bad_merge_requests(setup, tmp_path):
    paths = setup["paths"]
    with pytest.raises(nk.NeurokernError, match="base_model .* is a LoRA adapter folder"):
        nk.merge_models({"merge_method": "task_arithmetic", "base_model": str(paths[0]), "models": [str(paths[1])]},
                        tmp_path / "out", device="cpu")
    with pytest.raises(nk.NeurokernError, match="rank 12"):
        nkp.merge_adapters(paths, method="cat", rank=4)
    with pytest.raises(nk.NeurokernError, match="pass base="):
        nkp.merge_adapters(paths, method="neuromerging")
    with pytest.raises(nk.NeurokernError, match="weights has 2 entries for 3 adapters"):
        nkp.merge_adapters(paths, [1.0, 2.0])
    with pytest.raises(nk.NeurokernError, match="needs a density"):
        nkp.add_weighted_adapter(paths, WEIGHTS, "ties")
    with pytest.raises(nk.NeurokernError, match="combination_type 'nope'"):
        nkp.add_weighted_adapter(paths, WEIGHTS, "nope")
    with pytest.raises(nk.NeurokernError, match="unknown method"):
        nkp.merge_adapters(paths, method="nope")
    with pytest.raises(nk.NeurokernError, match="device 'bogus' is not a device name"):
        nkp.merge_adapters(paths, device="bogus")


# ------------------------------------------------------------------------------------------------
# The benchmark script


def test_bench_small(tmp_path):
    """bench/peft_merge.py --small on the CPU: it runs, writes its JSON, and its own check of the
    two merges against each other passes."""
    out = tmp_path / "results"
    subprocess.run([sys.executable, str(ROOT / "bench" / "peft_merge.py"), "--small", "--device", "cpu",
                    "--out", str(out)], check=True, cwd=ROOT, timeout=600)
    (result,) = out.glob("peft-merge-*.json")
    data = json.loads(result.read_text())
    assert data["shape"] == "small" and data["adapters"] == 4
    assert [row["combination"] for row in data["runs"]] == ["cat", "linear", "ties", "dare_ties", "svd", "svd:factored",
                                                            "ties_svd", "dare_ties_svd"]
    for row in data["runs"]:
        assert row["neurokern"]["seconds"] > 0 and row["peft"]["seconds"] > 0
        if row["random_masks_differ"]:
            continue
        # PEFT writes "cat" into a bf16 adapter (the model's dtype): bf16's rounding, 2^-8
        limit = 4e-3 if row["dtypes"]["peft"] != row["dtypes"]["neurokern"] else 1e-4
        assert row["max_rel_diff"] < limit, row
