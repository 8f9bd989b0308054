// Per-neuron projection statistics: one streaming pass over the T+1 rows of each neuron.
#include <torch/library.h>

#include "cpu/common.h"

namespace neurokern::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> neuron_stats_cpu(
    const at::Tensor& base, at::TensorList finetuned, const std::optional<at::Tensor>& threshold,
    const std::optional<at::Tensor>& tie_limit, int64_t offset) {
  check_group("neuron_stats", base, finetuned);
  TORCH_CHECK(base.dim() == 2, "neurokern.neuron_stats: base must be 2-D (rows are neurons), got ",
              base.dim(), "-D");
  const int64_t T = static_cast<int64_t>(finetuned.size());
  const int64_t R = base.size(0), C = base.size(1);
  const Trim trim("neuron_stats", threshold, tie_limit, offset, T);
  at::Tensor gram = at::empty({R, T, T}, at::kDouble);
  at::Tensor dots = at::empty({R, T}, at::kDouble);
  at::Tensor sqnorm = at::empty({R}, at::kDouble);
  double* G = gram.data_ptr<double>();
  double* D = dots.data_ptr<double>();
  double* Q = sqnorm.data_ptr<double>();
  dispatch_storage(base.scalar_type(), "neuron_stats", [&](auto tag) {
    using scalar_t = decltype(tag);
    const Group<scalar_t> g(base, finetuned);
    at::parallel_for(0, R, std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)),
                     [&](int64_t r0, int64_t r1) {
      std::vector<double> tau(T);
      for (int64_t r = r0; r < r1; ++r) {
        double* gr = G + r * T * T;
        double* dr = D + r * T;
        std::fill(gr, gr + T * T, 0.0);
        std::fill(dr, dr + T, 0.0);
        double q = 0.0;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = r * C + c;
          const double w = g.w(i);
          q += w * w;
          for (int64_t t = 0; t < T; ++t) tau[t] = g.trimmed_wide(trim, t, i);
          for (int64_t s = 0; s < T; ++s) {
            dr[s] += tau[s] * w;
            for (int64_t t = s; t < T; ++t) gr[s * T + t] += tau[s] * tau[t];
          }
        }
        for (int64_t s = 0; s < T; ++s)
          for (int64_t t = 0; t < s; ++t) gr[s * T + t] = gr[t * T + s];
        Q[r] = q;
      }
    });
  });
  return {gram, dots, sqnorm};
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) { m.impl("neuron_stats", &neuron_stats_cpu); }

}  // namespace neurokern::cpu
