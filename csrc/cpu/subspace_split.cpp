// Split each neuron's task vectors into the part parallel to the pre-trained neuron w and the
// orthogonal rest: c_t = <tau_t, w> / |w|^2, tau_perp_t = tau_t - c_t w (neuromerging.md, step 2).
#include <torch/library.h>

#include "cpu/common.h"

namespace neurokern::cpu {
namespace {

std::tuple<at::Tensor, std::vector<at::Tensor>> subspace_split_cpu(
    const at::Tensor& base, at::TensorList finetuned, const std::optional<at::Tensor>& threshold,
    const std::optional<at::Tensor>& tie_limit, int64_t offset) {
  check_group("subspace_split", base, finetuned);
  TORCH_CHECK(base.dim() == 2,
              "neurokern.subspace_split: base must be 2-D (rows are neurons), got ", base.dim(),
              "-D");
  const int64_t T = static_cast<int64_t>(finetuned.size());
  const int64_t R = base.size(0), C = base.size(1);
  const Trim trim("subspace_split", threshold, tie_limit, offset, T);
  at::Tensor coeff = at::empty({R, T}, at::kFloat);
  std::vector<at::Tensor> orth;
  std::vector<float*> out;
  for (int64_t t = 0; t < T; ++t) {
    orth.push_back(at::empty({R, C}, at::kFloat));
    out.push_back(orth.back().data_ptr<float>());
  }
  float* cf = coeff.data_ptr<float>();
  dispatch_storage(base.scalar_type(), "subspace_split", [&](auto tag) {
    using scalar_t = decltype(tag);
    const Group<scalar_t> g(base, finetuned);
    at::parallel_for(0, R, std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)),
                     [&](int64_t r0, int64_t r1) {
      std::vector<double> dot(T);
      for (int64_t r = r0; r < r1; ++r) {
        std::fill(dot.begin(), dot.end(), 0.0);
        double q = 0.0;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = r * C + c;
          const double w = g.w(i);
          q += w * w;
          for (int64_t t = 0; t < T; ++t) dot[t] += g.trimmed_wide(trim, t, i) * w;
        }
        for (int64_t t = 0; t < T; ++t) {
          const double ct = q > 0.0 ? dot[t] / q : 0.0;  // w = 0: all of tau is orthogonal
          cf[r * T + t] = static_cast<float>(ct);
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = r * C + c;
            out[t][i] = static_cast<float>(g.trimmed_wide(trim, t, i) - ct * g.w(i));
          }
        }
      }
    });
  });
  return {coeff, orth};
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) { m.impl("subspace_split", &subspace_split_cpu); }

}  // namespace neurokern::cpu
