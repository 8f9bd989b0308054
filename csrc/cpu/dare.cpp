// DARE, fused: random drop from the counter-based generator (csrc/philox.h), rescale, then a
// weighted sum or TIES election.
#include <torch/library.h>

#include "cpu/election.h"
#include "philox.h"

namespace neurokern::cpu {
namespace {

at::Tensor dare_cpu(const at::Tensor& base, at::TensorList finetuned, at::ArrayRef<double> weights,
                    double density, at::IntArrayRef keys, c10::string_view rescale,
                    c10::string_view consensus_name, c10::string_view normalize_name,
                    double scale) {
  check_group("dare", base, finetuned);
  const int64_t T = static_cast<int64_t>(finetuned.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == T, "neurokern.dare: ", weights.size(),
              " weights for ", T, " fine-tuned tensors");
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == T, "neurokern.dare: ", keys.size(),
              " keys for ", T, " fine-tuned tensors");
  TORCH_CHECK(density > 0.0 && density <= 1.0, "neurokern.dare: density must be in (0, 1], got ",
              density);
  TORCH_CHECK(rescale == "density" || rescale == "l1" || rescale == "none",
              "neurokern.dare: rescale must be \"density\", \"l1\" or \"none\", got \"",
              std::string(rescale), "\"");
  const Consensus consensus = parse_consensus("dare", consensus_name, true);
  const Normalize normalize = parse_normalize("dare", normalize_name);
  const uint64_t keep_below = dare_threshold(density);
  auto kept = [&](int64_t t, int64_t i) {
    return dare_draw(static_cast<uint64_t>(keys[t]), i) < keep_below;
  };
  at::Tensor out = at::empty_like(base);
  dispatch_storage(base.scalar_type(), "dare", [&](auto tag) {
    using scalar_t = decltype(tag);
    const Group<scalar_t> g(base, finetuned);
    scalar_t* o = out.data_ptr<scalar_t>();
    std::vector<double> factor(T, rescale == "density" ? dare_factor(density) : 1.0);
    if (rescale == "l1") {  // mergekit: match the L1 norm of the task vector, unless either is ~0
      for (int64_t t = 0; t < T; ++t) {
        using Pair = std::pair<double, double>;
        const Pair norms = at::parallel_reduce(
            0, base.numel(), kGrain, Pair{0.0, 0.0},
            [&](int64_t begin, int64_t end, Pair s) {
              for (int64_t i = begin; i < end; ++i) {
                const double mag = std::fabs(g.tau_wide(t, i));
                s.first += mag;
                if (kept(t, i)) s.second += mag;
              }
              return s;
            },
            [](Pair a, Pair b) { return Pair{a.first + b.first, a.second + b.second}; });
        if (norms.first >= 1e-7 && norms.second >= 1e-7) factor[t] = norms.first / norms.second;
      }
    }
    at::parallel_for(0, base.numel(), kGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> d(T);
      std::vector<double> dw(T);
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t t = 0; t < T; ++t) {
          const float rescaled = kept(t, i) ? static_cast<float>(g.tau(t, i) * factor[t]) : 0.0f;
          d[t] = static_cast<float>(weights[t]) * rescaled;
        }
        const double merged =
            elect_and_mix(d.data(), d.data(), weights.data(), T, consensus, 1, normalize);
        float r = g.w(i) + static_cast<float>(scale * merged);
        // NaN / Inf result or vote: float32 overflowed (inputs near the maximum, or NaN / Inf);
        // the element again in float64 from the exact task vectors, as the Triton kernel does.
        if (!std::isfinite(r) || (consensus == Consensus::Sum && !std::isfinite(vote(d.data(), T, consensus)))) {
          for (int64_t t = 0; t < T; ++t) dw[t] = weights[t] * (kept(t, i) ? g.tau64(t, i) * factor[t] : 0.0);
          r = static_cast<float>(g.w(i) + scale * elect_and_mix(dw.data(), dw.data(), weights.data(), T, consensus,
                                                                 1, normalize));
        }
        o[i] = static_cast<scalar_t>(r);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) { m.impl("dare", &dare_cpu); }

}  // namespace neurokern::cpu
