// Per task, the L1 norm of the task vector and of its trimmed part over a list of tensors (the
// sigma of NeuroMerging's default lambda = 1 / (1 - sigma)). Thresholds are [T] (one scope over
// the list) or [n, T] (each tensor trimmed on its own).
#include <torch/library.h>

#include "cpu/common.h"
#include "list_args.h"

namespace neurokern::cpu {
namespace {

at::Tensor trim_l1_cpu(at::TensorList base, at::TensorList finetuned,
                       const std::optional<at::Tensor>& threshold,
                       const std::optional<at::Tensor>& tie_limit) {
  const int64_t n = static_cast<int64_t>(base.size());
  const int64_t T = list_tasks("trim_l1", base, finetuned);
  at::Tensor out = at::zeros({T, 2}, at::kDouble);
  double* acc = out.data_ptr<double>();
  int64_t offset = 0;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> column;
    for (int64_t t = 0; t < T; ++t) column.push_back(finetuned[t * n + i]);
    check_group("trim_l1", base[i], column);
    // Thresholds [n, T] trim each tensor on its own (positions from 0); [T] trim the whole list.
    const bool per_tensor = threshold.has_value() && threshold->dim() == 2;
    const Trim trim("trim_l1", per_tensor ? std::optional<at::Tensor>(threshold->select(0, i)) : threshold,
                    per_tensor ? std::optional<at::Tensor>(tie_limit->select(0, i)) : tie_limit,
                    per_tensor ? 0 : offset, T);
    dispatch_storage(base[i].scalar_type(), "trim_l1", [&](auto tag) {
      using scalar_t = decltype(tag);
      const Group<scalar_t> g(base[i], column);
      for (int64_t t = 0; t < T; ++t) {
        using Pair = std::pair<double, double>;
        const Pair sums = at::parallel_reduce(
            0, base[i].numel(), kGrain, Pair{0.0, 0.0},
            [&](int64_t begin, int64_t end, Pair s) {
              for (int64_t j = begin; j < end; ++j) {
                const double tau = g.tau_wide(t, j);
                s.first += std::fabs(tau);
                s.second += std::fabs(trim.apply(t, g.tau(t, j), tau, j));
              }
              return s;
            },
            [](Pair a, Pair b) { return Pair{a.first + b.first, a.second + b.second}; });
        acc[2 * t] += sums.first;
        acc[2 * t + 1] += sums.second;
      }
    });
    offset += base[i].numel();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) { m.impl("trim_l1", &trim_l1_cpu); }

}  // namespace neurokern::cpu
