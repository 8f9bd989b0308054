// The multi-tensor ops as the single-tensor op called for each tensor of the list (multi.cpp): the
// CPU kernels, and the GPU kernels' path where their one fused launch does not apply.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace neurokern::cpu {

// weighted_sum_multi on any device: checks, then neurokern::weighted_sum for each tensor.
std::vector<at::Tensor> weighted_sum_multi_each(at::TensorList base, at::TensorList finetuned,
                                                const at::Tensor& coeffs, const std::optional<at::Tensor>& threshold,
                                                const std::optional<at::Tensor>& tie_limit, at::IntArrayRef offsets,
                                                std::optional<at::ScalarType> out_dtype);

}  // namespace neurokern::cpu
