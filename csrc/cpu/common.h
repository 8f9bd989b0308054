// Helpers shared by the CPU kernels: storage-dtype dispatch, argument checks at the C++ boundary,
// and the trim rule every op applies when it reads a task vector.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace neurokern::cpu {

// Calls f(scalar_t{}) for the storage dtypes the ops accept.
template <typename F>
void dispatch_storage(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(at::BFloat16{});
      break;
    case at::kHalf:
      f(at::Half{});
      break;
    default:
      TORCH_CHECK(false, "neurokern.", op, ": expected float32, bfloat16 or float16 tensors, got ",
                  st);
  }
}

// base and its T fine-tuned versions: same shape, dtype, device, contiguous.
inline void check_group(const char* op, const at::Tensor& base, at::TensorList finetuned) {
  TORCH_CHECK(base.device().is_cpu(), "neurokern.", op, ": CPU kernel got a tensor on ",
              base.device());
  TORCH_CHECK(base.is_contiguous(), "neurokern.", op, ": base must be contiguous");
  for (size_t t = 0; t < finetuned.size(); ++t) {
    const at::Tensor& f = finetuned[t];
    TORCH_CHECK(f.sizes() == base.sizes(), "neurokern.", op, ": finetuned[", t, "] has shape ",
                f.sizes(), ", base has ", base.sizes());
    TORCH_CHECK(f.scalar_type() == base.scalar_type(), "neurokern.", op, ": finetuned[", t,
                "] is ", f.scalar_type(), ", base is ", base.scalar_type());
    TORCH_CHECK(f.device() == base.device(), "neurokern.", op, ": finetuned[", t, "] is on ",
                f.device(), ", base on ", base.device());
    TORCH_CHECK(f.is_contiguous(), "neurokern.", op, ": finetuned[", t, "] must be contiguous");
  }
}

// The trim rule of csrc/ops.cpp, read from optional (threshold, tie_limit) tensors.
struct Trim {
  std::vector<float> thr;
  std::vector<int64_t> lim;
  int64_t offset = 0;
  bool active = false;

  Trim(const char* op, const std::optional<at::Tensor>& threshold,
       const std::optional<at::Tensor>& tie_limit, int64_t offset_, int64_t num_tasks)
      : offset(offset_) {
    TORCH_CHECK(threshold.has_value() == tie_limit.has_value(), "neurokern.", op,
                ": threshold and tie_limit must be given together");
    if (!threshold.has_value()) return;
    const at::Tensor th = threshold->to(at::kCPU).to(at::kFloat).contiguous();
    const at::Tensor tl = tie_limit->to(at::kCPU).to(at::kLong).contiguous();
    TORCH_CHECK(th.numel() == num_tasks && tl.numel() == num_tasks, "neurokern.", op,
                ": threshold and tie_limit need one entry per task (", num_tasks, "), got ",
                th.numel(), " and ", tl.numel());
    thr.assign(th.data_ptr<float>(), th.data_ptr<float>() + num_tasks);
    lim.assign(tl.data_ptr<int64_t>(), tl.data_ptr<int64_t>() + num_tasks);
    active = true;
  }

  // Whether the trim keeps the float32 task vector entry tau; `pos` is the index inside the tensor.
  inline bool keeps(size_t t, float tau, int64_t pos) const {
    if (!active) return true;
    const float mag = std::fabs(tau);
    return mag > thr[t] || (mag == thr[t] && pos + offset < lim[t]);
  }
  // Task vector entry after trimming.
  inline float apply(size_t t, float tau, int64_t pos) const { return keeps(t, tau, pos) ? tau : 0.0f; }
  // `value` (the float64 task vector entry that tau rounds) where the trim keeps tau, else 0.
  inline double apply(size_t t, float tau, double value, int64_t pos) const {
    return keeps(t, tau, pos) ? value : 0.0;
  }
};

// Typed read-only views of base and the fine-tuned tensors.
template <typename scalar_t>
struct Group {
  const scalar_t* base;
  std::vector<const scalar_t*> ft;

  Group(const at::Tensor& b, at::TensorList finetuned) : base(b.const_data_ptr<scalar_t>()) {
    for (const auto& f : finetuned) ft.push_back(f.const_data_ptr<scalar_t>());
  }
  inline float w(int64_t i) const { return static_cast<float>(base[i]); }
  inline float tau(size_t t, int64_t i) const {
    return static_cast<float>(ft[t][i]) - static_cast<float>(base[i]);
  }
  // float64 task vector entry: exact for finite inputs, where the float32 one overflows (|tau| >
  // 3.4e38: inputs near the float32 / bfloat16 maximum).
  inline double tau64(size_t t, int64_t i) const {
    return static_cast<double>(static_cast<float>(ft[t][i])) - static_cast<double>(static_cast<float>(base[i]));
  }
  // tau as the float64 reductions read it: the float32 tau, or where that is not finite, tau64.
  inline double tau_wide(size_t t, int64_t i) const {
    const float x = tau(t, i);
    return std::isfinite(x) ? static_cast<double>(x) : tau64(t, i);
  }
  // trim(tau_wide); the trim decides on the float32 tau (+inf ranks above every finite magnitude).
  inline double trimmed_wide(const Trim& trim, size_t t, int64_t i) const {
    return trim.apply(t, tau(t, i), tau_wide(t, i), i);
  }
};

inline int sign_of(double v) { return (v > 0) - (v < 0); }

// Grain for element-wise loops: big enough that small tensors run on one thread.
constexpr int64_t kGrain = 1 << 15;

}  // namespace neurokern::cpu
