"""Model Breadcrumbs (Davari & Belilovsky 2023; mergekit's `breadcrumbs` and `breadcrumbs_ties`):
each task vector loses its largest entries by magnitude (a share gamma) and its smallest, keeping
a share density: with N entries, k = floor(density N) and n_top = floor(gamma N), the entries of
ascending-magnitude rank [N - k - n_top, N - n_top) are kept (n_top shrinks where N - k - n_top
would be negative; ties ranked by position, as a stable ascending sort ranks them; density 1
keeps everything, outliers included, as mergekit does). Then mergekit's generalized task
arithmetic (neurokern.methods.gta): no election (`breadcrumbs`) or TIES's (`breadcrumbs_ties`).
Plain PyTorch (a sort per task vector): see gta."""
import torch

from neurokern.methods import gta
from neurokern.methods.method import Method, group


def trim(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    if density >= 1:
        return delta
    count = delta.numel()
    keep = int(density * count)
    n_top = int(gamma * count)
    n_bottom = max(0, count - keep - n_top)
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(count, dtype=delta.dtype, device=delta.device)
    mask[order[n_bottom:n_bottom + keep]] = 1
    return gta.rescaled(delta, mask.reshape(delta.shape), rescale)


def _method(name: str, consensus: str) -> Method:
    where = f"method {name!r}"

    def resolve(p, num_tasks):
        return gta.resolve_common(where, p, num_tasks, "gamma", consensus)

    def run(models, p: gta.Params, progress: bool, pre=None):
        out = {}
        for tensor in models.names:
            base, finetuned = group(models, tensor)
            out[tensor] = gta.merged(base, finetuned, p,
                                     lambda i, delta: trim(delta, p.density[i], p.extra[i], p.rescale))
        return out

    defaults = {"weights": None, "density": 1.0, "gamma": 0.01, "rescale": False, "normalize": False, "scale": 1.0}
    # T float32 task vectors, their stack and votes; a sort (values, int64 indices) and a mask
    return Method(name, defaults, resolve, run, work_bytes=lambda num_tasks: 16 * num_tasks + 32, kernels=False)


BREADCRUMBS = _method("breadcrumbs", "none")
BREADCRUMBS_TIES = _method("breadcrumbs_ties", "sum")
