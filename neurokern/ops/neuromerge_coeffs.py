"""NeuroMerging's per-neuron T x T solve: statistics in, weighted-sum coefficients out."""
import torch
from torch import Tensor


def neuromerge_coeffs(
    gram: Tensor,
    dots: Tensor,
    sqnorm: Tensor,
    lambda_parallel: float,
    lambda_orthogonal: float,
    parallel_basis: str = "unit",
    gamma: float = 1.0,
) -> Tensor:
    """Coefficients a [T+1, R] (float32): merged row = a[0] * w + sum_t a[t+1] * trim(tau_t).

    Eigen-decomposes the Gram of the orthogonal residuals (= the SVD's U and Sigma), runs TIES on
    the coordinates U Sigma and maps the merged residual back onto the task vectors
    (neuromerging.md, "The fast form")."""
    return torch.ops.neurokern.neuromerge_coeffs.default(
        gram, dots, sqnorm, float(lambda_parallel), float(lambda_orthogonal), parallel_basis, float(gamma)
    )


@torch.library.register_fake("neurokern::neuromerge_coeffs")
def _(gram, dots, sqnorm, lambda_parallel, lambda_orthogonal, parallel_basis="unit", gamma=1.0):
    R, T = gram.shape[0], gram.shape[1]
    return gram.new_empty((T + 1, R), dtype=torch.float32)
