// Argument checks shared by the ops that take a list of tensors (CPU and CUDA kernels alike).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace neurokern {

// Number of tasks T of a list op: base holds n tensors, finetuned their T versions task-major.
inline int64_t list_tasks(const char* op, at::TensorList base, at::TensorList finetuned) {
  const int64_t n = static_cast<int64_t>(base.size());
  TORCH_CHECK(n > 0, "neurokern.", op, ": base is an empty list");
  TORCH_CHECK(finetuned.size() % n == 0, "neurokern.", op, ": ", finetuned.size(),
              " fine-tuned tensors is not a multiple of ", n, " base tensors");
  return static_cast<int64_t>(finetuned.size()) / n;
}

// weighted_sum_multi differentiates with respect to its coefficients only: a base or fine-tuned
// tensor that requires grad would get none, silently.
inline void check_models_need_no_grad(const char* op, at::TensorList base, at::TensorList finetuned) {
  for (at::TensorList list : {base, finetuned}) {
    for (const at::Tensor& t : list) {
      TORCH_CHECK_VALUE(!t.requires_grad(), "neurokern.", op,
                        " differentiates only with respect to coeffs; detach base and finetuned (they are the "
                        "models being merged)");
    }
  }
}

// The tensors of a list, each contiguous (a copy where it is not).
inline std::vector<at::Tensor> contiguous_list(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) out.push_back(t.contiguous());
  return out;
}

// The multi-tensor ops' per-tensor arguments: offsets (empty or one per tensor) and trims ([T]
// shared by every tensor, or [n, T] with row i for tensor i).
inline void check_multi_args(const char* op, int64_t n, int64_t T, at::IntArrayRef offsets,
                             const std::optional<at::Tensor>& threshold,
                             const std::optional<at::Tensor>& tie_limit) {
  TORCH_CHECK(offsets.empty() || static_cast<int64_t>(offsets.size()) == n, "neurokern.", op,
              ": offsets must be empty or hold one entry per tensor (", n, "), got ", offsets.size());
  TORCH_CHECK(threshold.has_value() == tie_limit.has_value(), "neurokern.", op,
              ": threshold and tie_limit must be given together");
  if (!threshold) return;
  for (const at::Tensor* t : {&*threshold, &*tie_limit}) {
    const bool shared = t->dim() == 1 && t->size(0) == T;
    const bool per_tensor = t->dim() == 2 && t->size(0) == n && t->size(1) == T;
    TORCH_CHECK(shared || per_tensor, "neurokern.", op, ": threshold and tie_limit must be [", T,
                "] or [", n, ", ", T, "], got ", t->sizes());
  }
}

// The optional nonfinite flags of a list op (magnitude_threshold, _weighted_sum_multi_triton):
// int32 [n], contiguous, on the inputs' device.
inline void check_nonfinite_flags(const char* op, const std::optional<at::Tensor>& flags, int64_t n,
                                  const at::Device& device) {
  if (!flags) return;
  TORCH_CHECK(flags->scalar_type() == at::kInt && flags->dim() == 1 && flags->size(0) == n &&
                  flags->is_contiguous() && flags->device() == device,
              "neurokern.", op, ": nonfinite must be a contiguous int32 tensor [", n, "] on ", device, ", got ",
              flags->scalar_type(), " ", flags->sizes(), " on ", flags->device());
}

// Row i of a [n, T] trim tensor, or the shared [T] one.
inline std::optional<at::Tensor> trim_of(const std::optional<at::Tensor>& t, int64_t i) {
  if (!t || t->dim() == 1) return t;
  return t->select(0, i);
}

// Tensor i's fine-tuned versions out of the task-major list.
inline std::vector<at::Tensor> column_of(at::TensorList finetuned, int64_t n, int64_t i) {
  std::vector<at::Tensor> out;
  for (size_t j = static_cast<size_t>(i); j < finetuned.size(); j += static_cast<size_t>(n)) {
    out.push_back(finetuned[j]);
  }
  return out;
}

}  // namespace neurokern
