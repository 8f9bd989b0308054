"""mergekit's example configs (tests/integrations/mergekit_examples/: copies from the mergekit
repository, LGPL-3.0, with model names rewritten to local folders) through `neurokern merge
--dry-run`, on tiny models of the layer counts they name: every config that uses a supported
method is accepted as it is; every other one gets one line naming what neurokern does not do."""
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from mergekit_models import base_state, write_model  # noqa: E402

from neurokern.cli import main  # noqa: E402

EXAMPLES = Path(__file__).parent / "mergekit_examples"
LLAMA_40 = ["orca_mini_v3_13b", "Platypus2-13B", "WizardLM-13B-V1.2", "WizardMath-13B-V1.0", "Llama-2-13B-fp16",
            "Mistral-7B-v0.1", "Mistral-7B-Instruct-v0.2", "BioMistral-7B", "model_a", "model_b"]

ACCEPTED = {  # example -> what the dry run prints
    "bio-merge.yml": "method: ties",
    "gradient-slerp.yml": "method: slerp",
    "linear.yml": "method: linear",
    "orcamini-platy-44layer.yml": "tensors: 399",  # 44 layers of 9 tensors, and the 3 others
    "ties.yml": "method: ties",
    "gpt2-small.yml": "method: passthrough",
}
REFUSED = {  # example -> the line neurokern gives
    "arcee_fusion.yml": "config key 'merge_method': mergekit's 'arcee_fusion' is not implemented in neurokern",
    "cabs.yml": "config key 'merge_method': 'cabs' is not one of",
    "mega.yml": "holds 2 YAML documents (a mergekit-multi config)",
    "zipit.yml": "config: unknown key(s) 'align_weights'",
}


def gpt2_state(layers: int) -> dict[str, torch.Tensor]:
    """GPT-2's tensor names (transformer.h.N...), tiny."""
    g = torch.Generator().manual_seed(5)
    state = {"transformer.wte.weight": torch.randn(48, 16, generator=g), "transformer.wpe.weight": torch.randn(32, 16, generator=g),
             "transformer.ln_f.weight": torch.ones(16), "transformer.ln_f.bias": torch.zeros(16)}
    for i in range(layers):
        for name, shape in (("ln_1.weight", (16,)), ("attn.c_attn.weight", (16, 48)), ("attn.c_proj.weight", (16, 16)),
                            ("mlp.c_fc.weight", (16, 64)), ("mlp.c_proj.weight", (64, 16))):
            state[f"transformer.h.{i}.{name}"] = torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    for k, name in enumerate(LLAMA_40):
        write_model(root / "models" / name, base_state(layers=40, seed=k), layers=40, tokenizer=False)
    gpt2 = root / "models" / "gpt2"
    gpt2.mkdir(parents=True)
    from safetensors.torch import save_file
    save_file(gpt2_state(12), str(gpt2 / "model.safetensors"))
    (gpt2 / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 12}')
    for example in EXAMPLES.glob("*.yml"):
        shutil.copy(example, root / example.name)
    return root


def test_every_example_is_covered():
    assert {p.name for p in EXAMPLES.glob("*.yml")} == set(ACCEPTED) | set(REFUSED)


@pytest.mark.parametrize("example", sorted(ACCEPTED))
def test_supported_examples_are_accepted(workdir, capsys, monkeypatch, example):
    monkeypatch.chdir(workdir)  # mergekit reads these paths relative to the working directory
    assert main(["merge", example, "out", "--dry-run", "--device", "cpu"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert ACCEPTED[example] in printed and not (workdir / "out").exists()


@pytest.mark.parametrize("example", sorted(REFUSED))
def test_other_examples_get_one_line(workdir, capsys, monkeypatch, example):
    monkeypatch.chdir(workdir)
    assert main(["merge", example, "out", "--dry-run", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neurokern: error: ") and err.count("\n") == 1, err
    assert REFUSED[example] in err, err


# ---------------------------------------------------------------------------------------------
# neurokern's own mergekit-style examples (examples/slerp.yaml, examples/frankenmerge.yaml)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def own_examples(tmp_path_factory):
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("own-examples")
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_models.py"), str(folder / "models")], check=True)
    for name in ("slerp.yaml", "frankenmerge.yaml"):
        shutil.copy(ROOT / "examples" / name, folder / name)
    return folder


def test_slerp_example(own_examples, tmp_path):
    import neurokern as nk
    from neurokern.checkpoint import load_model

    assert main(["merge", str(own_examples / "slerp.yaml"), str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 0
    got = load_model(tmp_path / "out")
    base, task = load_model(own_examples / "models" / "base"), load_model(own_examples / "models" / "task_a")
    for name, t in (("model.layers.0.self_attn.q_proj.weight", 0.0), ("model.layers.1.self_attn.q_proj.weight", 1.0),
                    ("model.layers.0.mlp.up_proj.weight", 1.0), ("model.layers.1.mlp.up_proj.weight", 0.0),
                    ("model.norm.weight", 0.5), ("lm_head.weight", 0.5)):
        assert torch.equal(got[name], nk.merge({name: base[name]}, [{name: task[name]}], method="slerp", t=t)[name]), name
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_frankenmerge_example(own_examples, tmp_path):
    import json

    from neurokern.checkpoint import load_model

    assert main(["merge", str(own_examples / "frankenmerge.yaml"), str(tmp_path / "out"), "--device", "cpu",
                 "--quiet"]) == 0
    got = load_model(tmp_path / "out")
    a, b = load_model(own_examples / "models" / "task_a"), load_model(own_examples / "models" / "task_b")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    for name, t in got.items():
        if name.startswith("model.layers.2."):  # task_b's layer 1
            source = b[name.replace("layers.2.", "layers.1.")]
            want = (0.5 * source.float()).to(source.dtype) if "o_proj" in name else source
        elif name == "model.embed_tokens.weight":
            want = a[name]  # before the layers: the first slice's model
        elif not name.startswith("model.layers."):
            want = b[name]  # after them: the last slice's model
        else:
            want = a[name]
        assert torch.equal(t, want), name
    assert len(got) == 3 * 9 + 3
