// Coefficient-weighted sum of the pre-trained tensor and the trimmed task vectors, and its
// gradient with respect to the coefficients (AdaMerging / Tinting: dL/da_t = <dL/dout, x_t>).
#include <torch/library.h>

#include "cpu/common.h"

namespace neurokern::cpu {
namespace {

// How coefficients map to elements: one per tensor, per row (leading dim) or per element.
struct CoeffLayout {
  int64_t per;  // elements sharing one coefficient: numel (tensor), row length (row), 1 (element)
  int64_t count;  // coefficients per input

  CoeffLayout(const char* op, const at::Tensor& coeffs, const at::Tensor& base, int64_t T) {
    TORCH_CHECK(coeffs.scalar_type() == at::kFloat, "neurokern.", op,
                ": coeffs must be float32, got ", coeffs.scalar_type());
    TORCH_CHECK(coeffs.dim() >= 1 && coeffs.size(0) == T + 1, "neurokern.", op,
                ": coeffs need a leading dimension of T+1 = ", T + 1, " (base, then each task), got ",
                coeffs.sizes());
    const int64_t n = base.numel();
    if (coeffs.dim() == 1) {
      per = std::max<int64_t>(n, 1);
      count = 1;
    } else if (coeffs.dim() == 2 && base.dim() >= 1 && coeffs.size(1) == base.size(0)) {
      count = base.size(0);
      per = count > 0 ? n / count : 1;
    } else {
      TORCH_CHECK(coeffs.sizes().slice(1) == base.sizes(), "neurokern.", op,
                  ": coeffs must be [T+1], [T+1, rows] or [T+1, *base.shape]; got ", coeffs.sizes(),
                  " for base ", base.sizes());
      per = 1;
      count = n;
    }
  }
};

at::Tensor weighted_sum_cpu(const at::Tensor& base, at::TensorList finetuned,
                            const at::Tensor& coeffs, const std::optional<at::Tensor>& threshold,
                            const std::optional<at::Tensor>& tie_limit, int64_t offset,
                            std::optional<at::ScalarType> out_dtype) {
  check_group("weighted_sum", base, finetuned);
  const int64_t T = static_cast<int64_t>(finetuned.size());
  const CoeffLayout layout("weighted_sum", coeffs, base, T);
  const Trim trim("weighted_sum", threshold, tie_limit, offset, T);
  const at::Tensor a = coeffs.contiguous();
  const float* ap = a.const_data_ptr<float>();
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(out_dtype.value_or(base.scalar_type())));
  at::Tensor acc = out.scalar_type() == at::kFloat ? out : at::empty(base.sizes(), base.options().dtype(at::kFloat));
  float* o = acc.data_ptr<float>();
  dispatch_storage(base.scalar_type(), "weighted_sum", [&](auto tag) {
    using scalar_t = decltype(tag);
    const Group<scalar_t> g(base, finetuned);
    at::parallel_for(0, base.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t j = i / layout.per;
        float v = ap[j] * g.w(i);
        for (int64_t t = 0; t < T; ++t) v += ap[(t + 1) * layout.count + j] * trim.apply(t, g.tau(t, i), i);
        if (!std::isfinite(v)) {  // float32 overflowed (inputs near the maximum, or NaN / Inf): float64
          double x = static_cast<double>(ap[j]) * g.w(i);
          for (int64_t t = 0; t < T; ++t)
            x += static_cast<double>(ap[(t + 1) * layout.count + j]) * trim.apply(t, g.tau(t, i), g.tau64(t, i), i);
          v = static_cast<float>(x);
        }
        o[i] = v;
      }
    });
  });
  if (!acc.is_same(out)) out.copy_(acc);
  return out;
}

at::Tensor weighted_sum_backward_cpu(const at::Tensor& grad, const at::Tensor& base,
                                     at::TensorList finetuned, const at::Tensor& coeffs,
                                     const std::optional<at::Tensor>& threshold,
                                     const std::optional<at::Tensor>& tie_limit, int64_t offset) {
  check_group("weighted_sum_backward", base, finetuned);
  TORCH_CHECK(grad.sizes() == base.sizes(), "neurokern.weighted_sum_backward: grad has shape ",
              grad.sizes(), ", base has ", base.sizes());
  const int64_t T = static_cast<int64_t>(finetuned.size());
  const CoeffLayout layout("weighted_sum_backward", coeffs, base, T);
  const Trim trim("weighted_sum_backward", threshold, tie_limit, offset, T);
  const at::Tensor g32 = grad.to(at::kFloat).contiguous();
  const float* gp = g32.const_data_ptr<float>();
  at::Tensor out = at::zeros(coeffs.sizes(), coeffs.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  dispatch_storage(base.scalar_type(), "weighted_sum_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const Group<scalar_t> g(base, finetuned);
    // One reduction per coefficient; groups of `per` elements are summed in float64.
    auto reduce_group = [&](int64_t begin, int64_t end, double* sums) {
      for (int64_t i = begin; i < end; ++i) {
        const double gi = gp[i];
        sums[0] += gi * g.w(i);
        for (int64_t t = 0; t < T; ++t) sums[t + 1] += gi * trim.apply(t, g.tau(t, i), i);
      }
    };
    if (layout.count == 1) {
      using Sums = std::vector<double>;
      const Sums total = at::parallel_reduce(
          0, base.numel(), kGrain, Sums(T + 1, 0.0),
          [&](int64_t begin, int64_t end, Sums s) {
            reduce_group(begin, end, s.data());
            return s;
          },
          [](Sums a, const Sums& b) {
            for (size_t t = 0; t < a.size(); ++t) a[t] += b[t];
            return a;
          });
      for (int64_t t = 0; t <= T; ++t) op[t] = static_cast<float>(total[t]);
    } else {
      // per is 0 for per-row coeffs of an empty tensor (rows of length 0): guard the division.
      at::parallel_for(0, layout.count, std::max<int64_t>(1, kGrain / std::max<int64_t>(layout.per, 1)),
                       [&](int64_t j0, int64_t j1) {
        std::vector<double> sums(T + 1);
        for (int64_t j = j0; j < j1; ++j) {
          std::fill(sums.begin(), sums.end(), 0.0);
          reduce_group(j * layout.per, (j + 1) * layout.per, sums.data());
          for (int64_t t = 0; t <= T; ++t) op[t * layout.count + j] = static_cast<float>(sums[t]);
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) {
  m.impl("weighted_sum", &weighted_sum_cpu);
  m.impl("weighted_sum_backward", &weighted_sum_backward_cpu);
}

}  // namespace neurokern::cpu
