"""Running mergekit 0.1.5 (its Python API, on the CPU) and neurokern on one config, for the tests."""
import copy
from pathlib import Path

import torch
import yaml

from neurokern.checkpoint import load_model
from neurokern.cli import main


def run_mergekit(config: dict, out: Path, seed=None) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(device="cpu", copy_tokenizer=True, quiet=True, write_model_card=False, random_seed=seed)
    run_merge(MergeConfiguration.model_validate(copy.deepcopy(config)), str(out), options=options)
    return load_model(out)


def run_neurokern(config: dict, out: Path, where: Path) -> dict[str, torch.Tensor]:
    path = where / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    code = main(["merge", str(path), str(out), "--device", "cpu", "--quiet"])
    assert code == 0
    return load_model(out)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest |a - b| over every tensor (the two must hold the same names), and where."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    worst, at = 0.0, ""
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        d = (a[name].double() - b[name].double()).abs().max().item() if a[name].numel() else 0.0
        if d > worst:
            worst, at = d, name
    return worst, at


def ulps(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    """The largest distance in units in the last place (float32 or bfloat16 bit patterns)."""
    worst = 0
    for name in a:
        x, y = a[name], b[name]
        bits = torch.int32 if x.dtype == torch.float32 else torch.int16
        xi, yi = x.contiguous().view(bits).long(), y.contiguous().view(bits).long()
        # sign-magnitude to a monotone integer line
        lim = 1 << (31 if bits == torch.int32 else 15)
        xi = torch.where(xi < 0, -(xi + lim), xi)
        yi = torch.where(yi < 0, -(yi + lim), yi)
        if x.numel():
            worst = max(worst, int((xi - yi).abs().max()))
    return worst
