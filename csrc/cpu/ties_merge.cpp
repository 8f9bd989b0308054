// TIES merging, fused: trim (magnitude threshold), weight, elect a sign per element, disjoint mean.
#include <torch/library.h>

#include <atomic>

#include "cpu/election.h"
#include "cpu/ties_merge.h"

namespace neurokern::cpu {

at::Tensor ties_merge_flagged(const at::Tensor& base, at::TensorList finetuned, at::ArrayRef<double> weights,
                              const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& tie_limit,
                              int64_t offset, c10::string_view consensus_name, c10::string_view normalize_name,
                              bool elect_weighted, c10::string_view zero_sign, double scale, bool* nonfinite) {
  check_group("ties_merge", base, finetuned);
  const int64_t T = static_cast<int64_t>(finetuned.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == T, "neurokern.ties_merge: ", weights.size(),
              " weights for ", T, " fine-tuned tensors");
  TORCH_CHECK(zero_sign == "positive" || zero_sign == "majority",
              "neurokern.ties_merge: zero_sign must be \"positive\" or \"majority\", got \"",
              std::string(zero_sign), "\"");
  const Consensus consensus = parse_consensus("ties_merge", consensus_name, false);
  const Normalize normalize = parse_normalize("ties_merge", normalize_name);
  const Trim trim("ties_merge", threshold, tie_limit, offset, T);
  at::Tensor out = at::empty_like(base);
  dispatch_storage(base.scalar_type(), "ties_merge", [&](auto tag) {
    using scalar_t = decltype(tag);
    const Group<scalar_t> g(base, finetuned);
    scalar_t* o = out.data_ptr<scalar_t>();
    // Contributions d_t = w_t trim(tau_t) and voting values e_t of element i.
    auto load = [&](int64_t i, float* d, float* e) {
      for (int64_t t = 0; t < T; ++t) {
        const float tau = trim.apply(t, g.tau(t, i), i);
        d[t] = static_cast<float>(weights[t]) * tau;
        e[t] = elect_weighted ? d[t] : tau;
      }
    };
    // The same in float64 from the exact task vector (the trim decided on the float32 one), for
    // the elements whose float32 result or vote is NaN / Inf: float32 overflowed on inputs near
    // the maximum (or an input is NaN / Inf). The Triton kernels make the same choice.
    auto load_wide = [&](int64_t i, double* d, double* e) {
      for (int64_t t = 0; t < T; ++t) {
        const double tau = trim.apply(t, g.tau(t, i), g.tau64(t, i), i);
        d[t] = weights[t] * tau;
        e[t] = elect_weighted ? d[t] : tau;
      }
    };
    auto vote_overflowed = [&](const float* e) {
      return consensus == Consensus::Sum && !std::isfinite(vote(e, T, consensus));
    };
    int fallback = 1;
    if (zero_sign == "majority") {  // sign of the sum of the elected signs over the whole tensor
      const int64_t votes = at::parallel_reduce(
          0, base.numel(), kGrain, int64_t{0},
          [&](int64_t begin, int64_t end, int64_t acc) {
            std::vector<float> d(T), e(T);
            std::vector<double> dw(T), ew(T);
            for (int64_t i = begin; i < end; ++i) {
              load(i, d.data(), e.data());
              if (vote_overflowed(e.data())) {
                load_wide(i, dw.data(), ew.data());
                acc += sign_of(vote(ew.data(), T, consensus));
              } else {
                acc += sign_of(vote(e.data(), T, consensus));
              }
            }
            return acc;
          },
          std::plus<int64_t>());
      fallback = sign_of(static_cast<double>(votes));
    }
    std::atomic<bool> stored_nonfinite{false};
    at::parallel_for(0, base.numel(), kGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> d(T), e(T);
      std::vector<double> dw(T), ew(T);
      bool found = false;
      for (int64_t i = begin; i < end; ++i) {
        load(i, d.data(), e.data());
        const double merged =
            elect_and_mix(d.data(), e.data(), weights.data(), T, consensus, fallback, normalize);
        float r = g.w(i) + static_cast<float>(scale * merged);
        if (!std::isfinite(r) || vote_overflowed(e.data())) {
          load_wide(i, dw.data(), ew.data());
          r = static_cast<float>(
              g.w(i) + scale * elect_and_mix(dw.data(), ew.data(), weights.data(), T, consensus, fallback, normalize));
        }
        o[i] = static_cast<scalar_t>(r);
        // the stored value: a finite float32 r beyond bfloat16's / float16's range stores as Inf
        if (nonfinite && !std::isfinite(static_cast<float>(o[i]))) found = true;
      }
      if (found) stored_nonfinite.store(true, std::memory_order_relaxed);
    });
    if (nonfinite) *nonfinite = stored_nonfinite.load();
  });
  return out;
}

namespace {

at::Tensor ties_merge_cpu(const at::Tensor& base, at::TensorList finetuned, at::ArrayRef<double> weights,
                          const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& tie_limit,
                          int64_t offset, c10::string_view consensus_name, c10::string_view normalize_name,
                          bool elect_weighted, c10::string_view zero_sign, double scale) {
  return ties_merge_flagged(base, finetuned, weights, threshold, tie_limit, offset, consensus_name, normalize_name,
                            elect_weighted, zero_sign, scale, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) { m.impl("ties_merge", &ties_merge_cpu); }

}  // namespace neurokern::cpu
