"""The op layer: typed Python faces of torch.ops.neurokern.*, their fake (meta) implementations
and autograd. Importing this package loads neurokern._C, which registers the schemas and the C++
kernels (the ops whose kernels are Python, key_histogram, boundary_values and nonfinite_flags,
register their CPU kernels in their face modules); `reference` states what every op means in plain
PyTorch, for the tests."""
import torch  # noqa: F401  (loads libtorch, which neurokern._C links against)

from neurokern import _C  # noqa: F401,E402  (registers torch.ops.neurokern.*)
from neurokern.ops._common import to_device
from neurokern.ops.dare import dare, dare_keys, dare_multi
from neurokern.ops.dtypes import STORAGE_DTYPES
from neurokern.ops.finite import flagged_later, nonfinite_flags, nonfinite_later
from neurokern.ops.key_histogram import HI_BINS, LO_BINS, boundary_values, key_histogram, magnitude_bits
from neurokern.ops.lora_add_rows import lora_add_rows
from neurokern.ops.magnitude_threshold import magnitude_threshold
from neurokern.ops.neuromerge_coeffs import neuromerge_coeffs
from neurokern.ops.neuron_stats import neuron_stats, neuron_stats_multi
from neurokern.ops.subspace_split import subspace_split
from neurokern.ops.ties_merge import ties_merge, ties_merge_multi
from neurokern.ops.tinted_linear import tinted_linear, tinted_route
from neurokern.ops.trim_l1 import trim_l1
from neurokern.ops.weighted_sum import weighted_sum, weighted_sum_multi, weighted_sum_rows_multi

__all__ = [
    "HI_BINS",
    "LO_BINS",
    "STORAGE_DTYPES",
    "boundary_values",
    "dare",
    "dare_keys",
    "dare_multi",
    "flagged_later",
    "key_histogram",
    "lora_add_rows",
    "magnitude_bits",
    "magnitude_threshold",
    "neuromerge_coeffs",
    "neuron_stats",
    "neuron_stats_multi",
    "nonfinite_flags",
    "nonfinite_later",
    "subspace_split",
    "ties_merge",
    "ties_merge_multi",
    "tinted_linear",
    "tinted_route",
    "to_device",
    "trim_l1",
    "weighted_sum",
    "weighted_sum_multi",
    "weighted_sum_rows_multi",
]

from neurokern.ops import triton as _triton  # noqa: E402,F401  (registers Triton kernels for CUDA)
