// The CPU ties_merge with the NaN / Inf flag of its output, for ties_merge_multi (multi.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace neurokern::cpu {

// neurokern::ties_merge on CPU tensors; where nonfinite is not null, *nonfinite is set to whether the
// output, as stored in base's dtype, holds a NaN or Inf (checked in the merge's loop, no second read).
at::Tensor ties_merge_flagged(const at::Tensor& base, at::TensorList finetuned, at::ArrayRef<double> weights,
                              const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& tie_limit,
                              int64_t offset, c10::string_view consensus, c10::string_view normalize,
                              bool elect_weighted, c10::string_view zero_sign, double scale, bool* nonfinite);

}  // namespace neurokern::cpu
