"""DARE (Yu et al. 2024): random drop and rescale of each task vector, then a weighted sum
("dare", mergekit's dare_linear) or TIES sign election ("dare_ties"). dare_ties elects on the
weighted kept vectors (mergekit) or, with elect_on="unweighted", on the kept vectors themselves
(PEFT's dare_ties)."""
from dataclasses import dataclass

import torch

from neurokern import ops, params
from neurokern.errors import NeurokernError
from neurokern.methods.method import Method, batches, columns


@dataclass(frozen=True)
class Params:
    density: float
    weights: list[float]
    seed: int
    rescale: str
    consensus: str
    normalize: str
    scale: float
    elect_on: str


def _resolver(name: str, consensus_choices: list[str], elect_choices: list[str]):
    where = f"method {name!r}"

    def resolve(p, num_tasks):
        rescale = "none" if p["rescale"] is None else p["rescale"]
        density = p["density"]
        if isinstance(density, (list, tuple)):  # one per model (mergekit's per-model density): all equal
            if len(set(density)) != 1:
                raise NeurokernError(f"{where}: density takes one value for all models; got {list(density)}")
            density = density[0]
        return Params(
            density=params.density(where, density),
            weights=params.weights(where, p["weights"], num_tasks),
            seed=params.integer(where, "seed", p["seed"]),
            rescale=params.choice(where, "rescale", rescale, ["density", "l1", "none"]),
            consensus=params.choice(where, "consensus", p["consensus"], consensus_choices),
            normalize=params.normalize(where, p["normalize"]),
            scale=params.number(where, "scale", p["scale"]),
            elect_on=params.choice(where, "elect_on", p["elect_on"], elect_choices),
        )

    return resolve


def _elect_unweighted(models, name: str, p: Params):
    """One tensor of dare_ties with the election on the unweighted kept vectors: each task's kept
    vector in float32 (the dare op on a zero base, with that task's generator key, so the masks
    are the fused path's), then the TIES op on them with an unweighted election. Holds the T kept
    vectors of this one tensor."""
    base = models.base[name]
    zero = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
    keys = ops.dare_keys(p.seed, name, models.num_tasks)
    kept = [ops.dare(zero, [sd[name].float() - base.float()], [1.0], p.density, [key], rescale=p.rescale)
            for sd, key in zip(models.finetuned, keys)]
    mixed = ops.ties_merge(zero, kept, p.weights, consensus=p.consensus, normalize=p.normalize,
                           elect_weighted=False, scale=p.scale)
    return (base.float() + mixed).to(base.dtype)


def run(models, p: Params, progress: bool, pre=None):
    out = {}
    for names in batches(models, models.names, progress, "dare"):
        if p.elect_on == "unweighted":
            out.update((name, _elect_unweighted(models, name, p)) for name in names)
            continue
        base, finetuned = columns(models, names)
        keys = [k for name in names for k in ops.dare_keys(p.seed, name, models.num_tasks)]
        merged = ops.dare_multi(
            base, finetuned, p.weights, p.density, keys, rescale=p.rescale, consensus=p.consensus,
            normalize=p.normalize, scale=p.scale,
        )
        out.update(zip(names, merged))
    return out


_COMMON = {"density": 0.3, "weights": None, "seed": 0, "rescale": "density", "normalize": False, "scale": 1.0}
DARE = Method("dare", {**_COMMON, "consensus": "none", "elect_on": "weighted"},
              _resolver("dare", ["none"], ["weighted"]), run)
DARE_TIES = Method("dare_ties", {**_COMMON, "consensus": "sum", "elect_on": "weighted"},
                   _resolver("dare_ties", ["sum", "count"], ["weighted", "unweighted"]), run)
