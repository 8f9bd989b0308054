"""mergekit's config keys in neurokern.config: the path rule, per-layer gradients and filters, slices,
rescale as a boolean, the tokenizer keys, and errors in the YAML's own key names. (Merges with these
keys, against mergekit itself: tests/integrations/test_mergekit_parity.py.)"""
import json
import re

import pytest

from neurokern.config import load_config
from neurokern.errors import NeurokernError
from neurokern.params import PerTensor


@pytest.fixture
def folders(tmp_path):
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    return tmp_path


def test_relative_paths_follow_the_working_directory_or_the_config_folder(folders, tmp_path, monkeypatch):
    raw = {"merge_method": "ties", "base_model": "base", "models": [{"model": "a"}]}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(raw, root=folders).base_model == folders / "base"  # only in the config's folder
    monkeypatch.chdir(folders)
    assert load_config(raw, root=elsewhere).base_model == folders / "base"  # only in the working directory
    (elsewhere / "base").mkdir()
    with pytest.raises(NeurokernError, match=r"config key 'base_model': 'base' is both .* \(relative to the working "
                                             r"directory, as mergekit reads it\) and .* give an absolute path"):
        load_config(raw, root=elsewhere)
    with pytest.raises(NeurokernError, match="names a LoRA"):
        load_config({**raw, "models": [{"model": "org/model+org/adapter"}]}, root=folders)


def test_gradients_filters_and_booleans(folders):
    raw = {"merge_method": "dare_ties", "base_model": str(folders / "base"),
           "models": [{"model": str(folders / "a"), "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1}]}},
                      {"model": str(folders / "b"), "parameters": {"weight": 0.3}}],
           "parameters": {"density": [1, 0.5], "rescale": False, "lambda": 0.9}}
    cfg = load_config(raw)
    assert cfg.params["rescale"] is None and cfg.params["scale"] == 0.9
    density = cfg.params["density"]  # one per-tensor value for both models (the top-level one)
    assert isinstance(density, PerTensor)
    assert [density.at(f"model.layers.{i}.x") for i in range(4)] == [(1 - t) * 1 + t * 0.5 for t in (0, 1 / 3, 2 / 3, 1)]
    weight = cfg.params["weights"][0]
    assert weight.at("model.layers.0.mlp.up.weight") == 0.5 and weight.at("model.layers.0.attn.q.weight") == 1
    assert cfg.params["weights"][1] == 0.3
    assert load_config({**raw, "parameters": {"rescale": True}}).params["rescale"] == "l1"


def test_weights_is_one_per_model_and_weight_a_gradient(folders):
    """parameters.weights (nk.merge's name, not mergekit's) lists one weight per fine-tuned model;
    a list under mergekit's weight is a per-layer gradient; both at once is one error."""
    base, a, b = (str(folders / n) for n in ("base", "a", "b"))
    raw = {"merge_method": "ties", "base_model": base, "models": [a, b], "parameters": {"weights": [0.7, -1.2]}}
    cfg = load_config(raw)
    assert cfg.params["weights"] == [0.7, -1.2] and cfg.yaml_names["weights"] == "parameters.weights"
    gradient = load_config({**raw, "parameters": {"weight": [0.7, -1.2]}}).params["weights"]
    assert all(isinstance(w, PerTensor) for w in gradient)
    assert [gradient[0].at(f"model.layers.{i}.x") for i in (0, 3)] == [0.7, -1.2]
    both = "config: give models\\[\\*\\].parameters.weight or parameters.weights .*, not both$"
    with pytest.raises(NeurokernError, match=both):
        load_config({**raw, "parameters": {"weights": [0.7, -1.2], "weight": 1.0}})
    with pytest.raises(NeurokernError, match=both):
        load_config({**raw, "models": [{"model": a, "parameters": {"weight": 1.0}}, b]})


@pytest.mark.parametrize("method", ["ties", "neuromerging", "magnitude_prune", "slerp"])
def test_methods_of_task_vectors_need_a_base_model(folders, method):
    raw = {"merge_method": method, "models": [str(folders / "a"), str(folders / "b")]}
    with pytest.raises(NeurokernError, match=f"config: missing key 'base_model' \\(merge method '{method}' needs one\\)"):
        load_config(raw)


def test_slices_of_a_merge_keep_the_layers_in_place(folders):
    base, a = str(folders / "base"), str(folders / "a")
    ok = {"merge_method": "slerp", "base_model": base, "slices": [
        {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": a, "layer_range": [0, 2]}], "parameters": {"t": 0.2}},
        {"sources": [{"model": base, "layer_range": [2, 4]}, {"model": a, "layer_range": [2, 4]}], "parameters": {"t": 0.8}}]}
    t = load_config(ok).params["t"]
    assert [t.at(f"model.layers.{i}.w") for i in range(4)] == [0.2, 0.2, 0.8, 0.8]
    assert t.at("model.embed_tokens.weight") == 0.2 and t.at("lm_head.weight") == 0.8
    moved = json.loads(json.dumps(ok))
    moved["slices"][1]["sources"][1]["layer_range"] = [1, 3]
    with pytest.raises(NeurokernError, match=r"slices\[1\].sources: a slerp merge keeps every layer in its place"):
        load_config(moved)
    short = {**ok, "slices": ok["slices"][:1]}
    with pytest.raises(NeurokernError, match=r"the slices cover layers \[0, 2\) of 4"):
        load_config(short)


def test_passthrough_slices_make_a_stack(folders):
    raw = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(folders / "a"), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(folders / "b"), "layer_range": [2, 4]}]}]}
    cfg = load_config(raw)
    assert cfg.stack == ((folders / "a", 0), (folders / "a", 1), (folders / "a", 2), (folders / "b", 2), (folders / "b", 3))
    assert cfg.base_model == folders / "a" and cfg.last_model == folders / "b" and cfg.models == []
    assert cfg.config_updates == {"num_hidden_layers": 5}
    assert cfg.describe_stack() == f"layers 0-2 of {folders / 'a'}, layers 2-3 of {folders / 'b'}"
    two = json.loads(json.dumps(raw))
    two["slices"][0]["sources"].append({"model": str(folders / "b"), "layer_range": [0, 3]})
    with pytest.raises(NeurokernError, match=r"slices\[0\].sources: passthrough takes one source per slice; got 2"):
        load_config(two)


@pytest.mark.parametrize("extra,message", [
    ({"tokenizer": {"source": "base", "tokens": {"<x>": {"source": "a"}}}}, "config key 'tokenizer.tokens': building a vocabulary"),
    ({"tokenizer_source": "union"}, re.escape("'union' (a merged vocabulary) is not supported")),
    ({"chat_template": "{{ x }}"}, "config key 'chat_template': '{{ x }}' is neither a template name nor a template"),
    ({"modules": {}}, "config key 'modules': per-module configs"),
    ({"merge_method": "sce"}, "config key 'merge_method': mergekit's 'sce' is not implemented in neurokern"),
])
def test_tokenizer_and_unsupported_keys(folders, extra, message):
    raw = {"merge_method": "ties", "base_model": str(folders / "base"), "models": [{"model": str(folders / "a")}], **extra}
    with pytest.raises(NeurokernError, match=message):
        load_config(raw)
    supported = {**{k: v for k, v in raw.items() if k not in extra}, "merge_method": "ties", "tokenizer": {"source": str(folders / "a")}}
    assert load_config(supported).tokenizer_source == folders / "a"  # copied from that model


def test_errors_name_the_yaml_keys(folders):
    raw = {"merge_method": "ties", "base_model": str(folders / "base"),
           "models": [{"model": str(folders / "base")}, {"model": str(folders / "a"), "parameters": {"weight": "x"}},
                      {"model": str(folders / "b"), "parameters": {"weight": 1.0}}],
           "parameters": {"lambda": "big"}}
    cfg = load_config(raw)
    assert cfg.in_yaml_terms("method 'ties': weights[0] must be a finite number; got 'x'") == \
        "config models[1].parameters.weight must be a finite number; got 'x'"
    assert cfg.in_yaml_terms("method 'ties': scale must be a finite number; got 'big'") == \
        "config parameters.lambda must be a finite number; got 'big'"
    with pytest.raises(NeurokernError, match=r"config models\[0\].parameters: unknown key\(s\) 't'"):
        load_config({"merge_method": "slerp", "base_model": str(folders / "base"),
                     "models": [{"model": str(folders / "a"), "parameters": {"t": 0.5}}]})
    with pytest.raises(NeurokernError, match="config: missing key 'base_model' \\(merge method 'slerp' needs one\\)"):
        load_config({"merge_method": "slerp", "models": [{"model": str(folders / "a")}]})
    with pytest.raises(NeurokernError, match="give the base_model a weight"):
        load_config({"merge_method": "linear", "base_model": str(folders / "base"),
                     "models": [{"model": str(folders / "a"), "parameters": {"weight": 1.0}}]})
