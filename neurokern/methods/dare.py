"""DARE (Yu et al. 2024): random drop and rescale of each task vector, then a weighted sum
("dare", mergekit's dare_linear) or TIES sign election ("dare_ties")."""
from dataclasses import dataclass

from neurokern import ops, params
from neurokern.methods.method import Method, batches, columns
from neurokern.models import nonfinite, raise_if_unrepresentable


@dataclass(frozen=True)
class Params:
    density: float
    weights: list[float]
    seed: int
    rescale: str
    consensus: str
    normalize: str
    scale: float


def _resolver(name: str, consensus_choices: list[str]):
    where = f"method {name!r}"

    def resolve(p, num_tasks):
        rescale = "none" if p["rescale"] is None else p["rescale"]
        return Params(
            density=params.density(where, p["density"]),
            weights=params.weights(where, p["weights"], num_tasks),
            seed=params.integer(where, "seed", p["seed"]),
            rescale=params.choice(where, "rescale", rescale, ["density", "l1", "none"]),
            consensus=params.choice(where, "consensus", p["consensus"], consensus_choices),
            normalize=params.normalize(where, p["normalize"]),
            scale=params.number(where, "scale", p["scale"]),
        )

    return resolve


def run(models, p: Params, progress: bool, pre=None):
    out = {}
    for names in batches(models, models.names, progress, "dare"):
        base, finetuned = columns(models, names)
        keys = [k for name in names for k in ops.dare_keys(p.seed, name, models.num_tasks)]
        merged = ops.dare_multi(
            base, finetuned, p.weights, p.density, keys, rescale=p.rescale, consensus=p.consensus,
            normalize=p.normalize, scale=p.scale,
        )
        out.update(zip(names, merged))
    raise_if_unrepresentable(models, models.names, nonfinite([out[n] for n in models.names]))
    return out


_COMMON = {"density": 0.3, "weights": None, "seed": 0, "rescale": "density", "normalize": False, "scale": 1.0}
DARE = Method("dare", {**_COMMON, "consensus": "none"}, _resolver("dare", ["none"]), run)
DARE_TIES = Method("dare_ties", {**_COMMON, "consensus": "sum"}, _resolver("dare_ties", ["sum", "count"]), run)
