"""CPU smoke test of the accuracy suite: two tiny tasks, a tiny random BERT, a few steps, every
method end to end (fine-tune, merge, test-time training and its ablation grid, report). The real
suite runs on a GPU (bench/accuracy/gpu_run.sh)."""
import dataclasses
import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from bench.accuracy import data as D  # noqa: E402
from bench.accuracy.families import minilm  # noqa: E402
from bench.accuracy.finetune import Recipe  # noqa: E402
from bench.accuracy.methods import METHODS  # noqa: E402
from bench.accuracy.run import load_context, run_suite  # noqa: E402
from bench.accuracy.tta import METHODS as TTA_METHODS  # noqa: E402
from bench.accuracy.tta import GRID, ablations, run_many  # noqa: E402

WORDS = {
    "colour": {"red": ["red", "crimson", "scarlet"], "blue": ["blue", "navy", "azure"]},
    "animal": {"cat": ["cat", "kitten", "tabby"], "dog": ["dog", "puppy", "hound"], "bird": ["bird", "sparrow", "crow"]},
}
FILLER = ["the", "a", "saw", "near", "big", "small", "one", "today", "there", "very"]


def _tiny_tasks(cache, seed=0):
    rng = random.Random(seed)
    for name, classes in WORDS.items():
        examples = []
        for label, keys in classes.items():
            for i in range(40):
                words = rng.sample(FILLER, 2) + [rng.choice(keys)]
                rng.shuffle(words)
                examples.append((" ".join(words), label, None))
        parts = D.split(D.dedupe(examples), seed, max_train=60, max_val=20, max_test=30)
        D.write_task(cache, name, sorted(classes), {p: [(t, lab) for t, lab, _ in rows] for p, rows in parts.items()})
    vocab = FILLER + [w for c in WORDS.values() for ws in c.values() for w in ws]
    return vocab


def _tiny_cache(tmp_path):
    vocab = _tiny_tasks(tmp_path / "cache" / "data")
    return minilm.tiny_cache(tmp_path / "cache", vocab, hidden=32, layers=2, heads=2)


def _short(steps=2):
    return {n: dataclasses.replace(t, steps=steps, batch_size=8) for n, t in TTA_METHODS.items()}


def test_smoke_suite(tmp_path):
    torch.manual_seed(0)
    cache = _tiny_cache(tmp_path)
    recipe = Recipe(lr=5e-3, head_lr=5e-2, epochs=6, batch_size=16)
    report = run_suite("minilm", cache, tmp_path / "out", device="cpu", recipe=recipe, tta=_short(), grid=GRID,
                       workers=1, curve_every=1, lambda_grid=(0.5, 1.0), do_investigate=True, eval_batch=64,
                       verbose=False, ckpt_dir=tmp_path / "ckpt")
    methods = report["methods"]
    assert set(methods) == set(METHODS) | set(TTA_METHODS)
    for name, res in {**methods, **report["ablations"]}.items():
        assert res["status"] == "ok", (name, res.get("note"), res.get("traceback"))
        assert set(res["test"]) == {"colour", "animal"}
        assert all(0.0 <= a <= 1.0 for a in res["test"].values())
    assert set(report["ablations"]) == set(ablations(minilm.tint_layers(minilm.load_encoder(cache))))
    ft = methods["finetuned"]["test"]
    assert ft["colour"] > 0.7 and ft["animal"] > 0.6, ft  # the tiny tasks are learnable
    tinting = methods["tinting"]
    assert [p["epoch"] for p in tinting["curve"]] == [0, 1, 2] and tinting["curve"][-1]["test"] == tinting["test"]
    assert tinting["tint_drift"] > 0 and methods["adamerging"]["tint_drift"] is None
    shares = tinting["test_top_class_share"]
    assert set(shares) == {"colour", "animal"} and all(0.0 < v <= 1.0 for v in shares.values())
    frozen = report["ablations"]["lambda_frozen"]
    ta_scale = methods["task_arithmetic"]["params"]["scale"]
    assert frozen["params"]["prior"] == ta_scale and frozen["lambda_mean"] == pytest.approx(ta_scale)
    saved = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert saved["summary"]["finetuned"]["normalized"] == pytest.approx(1.0)
    md = (tmp_path / "out" / "accuracy.md").read_text()
    assert "| TIES (density 0.2, λ on val) |" in md and "Do the papers' orderings hold" in md
    assert "## Ablations" in md and "| tint last_mlp" in md
    for png in ("accuracy.png", "accuracy-curves.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report["investigation"]["task_count"]) == {"2"}
    # A second run with the same recipe and data reuses the fine-tuned encoders.
    again = run_suite("minilm", cache, tmp_path / "out2", device="cpu", recipe=recipe, tta=_short(),
                      methods=["finetuned"], workers=1, verbose=False, ckpt_dir=tmp_path / "ckpt", plot=False)
    assert again["finetune_reused"] and again["methods"]["finetuned"]["test"] == ft


def test_runs_in_worker_processes_match_one_process(tmp_path):
    """run_many spreads test-time runs over spawned processes that load the fine-tuned encoders
    from the checkpoint folder: the same results as in this process."""
    torch.manual_seed(0)
    cache = _tiny_cache(tmp_path)
    recipe = Recipe(lr=5e-3, head_lr=5e-2, epochs=2, batch_size=16)
    run_suite("minilm", cache, tmp_path / "out", device="cpu", recipe=recipe, methods=["finetuned"], workers=1,
              verbose=False, ckpt_dir=tmp_path / "ckpt", plot=False)
    args = ("minilm", str(cache), None, str(tmp_path / "ckpt"), "cpu", 64)
    ctx = load_context(*args)
    runs = {n: t for n, t in _short(3).items() if n != "tinting_conf"}
    results = {}
    for workers in (1, 2):
        got = {}
        run_many(runs, ctx, load_context, args, workers, 1, None, lambda n, r, got=got: got.__setitem__(n, r))
        results[workers] = got
    for name in runs:
        one, two = results[1][name], results[2][name]
        assert one["status"] == two["status"] == "ok", (one.get("note"), two.get("note"))
        assert one["test"] == two["test"] and one["curve"][-1]["lambda_mean"] == two["curve"][-1]["lambda_mean"]


def test_split_is_seeded_stratified_and_grouped():
    ex = [(f"text {i}", "a" if i % 4 else "b", None) for i in range(400)]
    ex += [(f"speech {g} para {j}", "c", f"g{g}") for g in range(20) for j in range(5)]
    p1 = D.split(ex, 0, max_train=1000, max_val=50, max_test=100)
    p2 = D.split(ex, 0, max_train=1000, max_val=50, max_test=100)
    assert p1 == p2
    assert sum(len(v) for v in p1.values()) == len(ex)
    texts = [set(t for t, _, _ in rows) for rows in p1.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    share = sum(lab == "b" for _, lab, _ in p1["test"]) / len(p1["test"])
    assert 0.15 < share < 0.25  # b is 100 / 500 overall
    groups = {part: {g for _, _, g in rows if g} for part, rows in p1.items()}
    assert not (groups["train"] & groups["test"] or groups["train"] & groups["val"] or groups["val"] & groups["test"])


def test_dedupe_and_baselines():
    ex = [("Good film", "pos", None), ("good  film", "pos", None), ("bad", "neg", None), ("bad", "pos", None)]
    assert D.dedupe([(D._clean(t), lab, g) for t, lab, g in ex]) == [("Good film", "pos", None)]
    train = [("great movie", "pos", None), ("great fun", "pos", None), ("dull movie", "neg", None),
             ("boring", "neg", None), ("fine", "pos", None)]
    test = [("great", "pos", None), ("dull", "neg", None), ("ok", "pos", None)]
    rule = D.best_single_token_rule(train, test)
    assert rule["token"] in ("great", "dull", "boring", "fine") and rule["train_accuracy"] >= 0.8
    assert D.majority_baseline(train, test) == ("pos", pytest.approx(2 / 3))
    assert D.naive_bayes_baseline(train, test) >= 2 / 3


def test_encoder_state_is_a_copy(tmp_path):
    """The suite loads merged weights into the base encoder to evaluate them; the base state it
    merges from must not follow (it did once: every λ of a search then scored the same)."""
    from bench.accuracy.model import encoder_state

    encoder = minilm.load_encoder(minilm.tiny_cache(tmp_path, ["a", "b", "c"], hidden=32, layers=2, heads=2))
    base = encoder_state(encoder)
    before = {k: v.clone() for k, v in base.items()}
    encoder.load_state_dict({k: v + 1 for k, v in base.items()}, strict=False)
    assert all(torch.equal(base[k], before[k]) for k in base)
    assert any(not torch.equal(v, encoder.state_dict()[k]) for k, v in base.items())


def test_ablations_only_keeps_the_runs_its_patterns_match():
    layers = {"head": "head", "last_mlp": "m", "attention_out": "a", "embedding": "e"}
    every = ablations(layers, groups=("layer", "lr"))
    kept = ablations(layers, groups=("layer", "lr"), only=["layer_*_tint0.01*", "lr_lambda0.01_*"])
    assert list(kept) == [n for n in every if n.startswith(("layer_", "lr_lambda0.01_")) and
                          (n.startswith("lr_") or "_tint0.01" in n)]
    assert "layer_last_mlp_tint0.01_conf" in kept and "layer_last_mlp_tint0.001" not in kept
    assert len(kept) == 3 * 2 + 2 * 2
    with pytest.raises(ValueError, match="matches"):
        ablations(layers, groups=("loss",), only=["layer_*"])
