// Argument checks shared by the ops that take a list of tensors (CPU and CUDA kernels alike).
#pragma once
#include <ATen/ATen.h>

namespace neurokern {

// Number of tasks T of a list op: base holds n tensors, finetuned their T versions task-major.
inline int64_t list_tasks(const char* op, at::TensorList base, at::TensorList finetuned) {
  const int64_t n = static_cast<int64_t>(base.size());
  TORCH_CHECK(n > 0, "neurokern.", op, ": base is an empty list");
  TORCH_CHECK(finetuned.size() % n == 0, "neurokern.", op, ": ", finetuned.size(),
              " fine-tuned tensors is not a multiple of ", n, " base tensors");
  return static_cast<int64_t>(finetuned.size()) / n;
}

}  // namespace neurokern
