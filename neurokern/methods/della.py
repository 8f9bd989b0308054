"""DELLA (Deep et al. 2024; mergekit's `della` and `della_linear`): each task vector's entries are
kept at random with a probability that grows with their magnitude rank within their row: with r
the ascending rank (1..n) of |delta| in a row of n entries (the rows of dimension 1, a 1-D tensor
one row; ties ranked by position), p = density - epsilon + 2 epsilon (r - 1) / (n - 1) (a row of
one entry: p = density), the kept entries rescaled to the task vector's L1 norm (mergekit's
rescale; it does not divide by p) when rescale. Then mergekit's generalized task arithmetic
(neurokern.methods.gta): TIES's election (`della`, normalised by default) or none (`della_linear`).

The random numbers come from a torch CPU generator seeded per (seed, tensor name, model index)
(ops.dare_keys), not from torch's global generator as in mergekit: the same mask on any device,
work unit and number of processes, and in every run. Plain PyTorch (a sort per row): see gta."""
import torch

from neurokern import ops
from neurokern.errors import NeurokernError
from neurokern.methods import gta
from neurokern.methods.method import Method, group


def _rows(delta: torch.Tensor) -> torch.Tensor:
    return delta.reshape(1, -1) if delta.dim() < 2 else delta


def keep_probability(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """The probability that each entry of delta is kept, delta's shape (rows of dimension 1)."""
    magnitudes = _rows(delta).abs()
    ranks = torch.sort(magnitudes, dim=1, stable=True).indices.argsort(dim=1).to(delta.dtype) + 1
    n = magnitudes.shape[1]
    rank_share = (ranks - 1) / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + rank_share * 2 * epsilon).reshape(delta.shape)


def uniforms(seed: int, name: str, num_tasks: int, shape) -> list[torch.Tensor]:
    """One float32 uniform tensor of `shape` per model, from CPU generators keyed like DARE's masks."""
    out = []
    for key in ops.dare_keys(seed, name, num_tasks):
        generator = torch.Generator().manual_seed(key % 2**64)
        out.append(torch.rand(shape, generator=generator, dtype=torch.float32))
    return out


def trim(delta: torch.Tensor, uniform: torch.Tensor, density: float, epsilon: float, rescale: bool) -> torch.Tensor:
    if density >= 1:
        return delta
    mask = (uniform.to(delta.device) < keep_probability(delta, density, epsilon)).to(delta.dtype)
    return gta.rescaled(delta, mask, rescale)


def _method(name: str, consensus: str, normalize: bool) -> Method:
    where = f"method {name!r}"

    def resolve(p, num_tasks):
        checked = gta.resolve_common(where, p, num_tasks, "epsilon", consensus)
        for i, (d, e) in enumerate(zip(checked.density, checked.extra)):
            if d < 1 and not (0 < d - e and d + e < 1):
                raise NeurokernError(f"{where}: density[{i}] +/- epsilon[{i}] must lie in (0, 1); got density {d}, "
                                     f"epsilon {e}")
        return checked

    def run(models, p: gta.Params, progress: bool, pre=None):
        out = {}
        for tensor in models.names:
            base, finetuned = group(models, tensor)
            draws = uniforms(p.seed, tensor, len(finetuned), base.shape)
            out[tensor] = gta.merged(base, finetuned, p,
                                     lambda i, delta: trim(delta, draws[i], p.density[i], p.extra[i], p.rescale))
        return out

    defaults = {"weights": None, "density": 1.0, "epsilon": 0.15, "rescale": True, "normalize": normalize,
                "scale": 1.0, "seed": 0}
    # as breadcrumbs, and T uniform draws, the keep probabilities, two argsorts (int64) per row
    return Method(name, defaults, resolve, run, work_bytes=lambda num_tasks: 20 * num_tasks + 48, kernels=False)


DELLA = _method("della", "sum", True)
DELLA_LINEAR = _method("della_linear", "none", False)
