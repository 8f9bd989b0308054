// Sign election and disjoint mean, element by element: the part TIES, DARE-TIES and NeuroMerging's
// point parameters share (classic-methods.md names the variants).
#pragma once
#include "cpu/common.h"

namespace neurokern::cpu {

enum class Consensus { None, Sum, Count };
enum class Normalize { None, Weights, Count };

inline Consensus parse_consensus(const char* op, c10::string_view s, bool allow_none) {
  if (s == "sum") return Consensus::Sum;
  if (s == "count") return Consensus::Count;
  TORCH_CHECK(allow_none && s == "none", "neurokern.", op, ": consensus must be ",
              allow_none ? "\"none\", " : "", "\"sum\" or \"count\", got \"", std::string(s), "\"");
  return Consensus::None;
}

inline Normalize parse_normalize(const char* op, c10::string_view s) {
  if (s == "weights") return Normalize::Weights;
  if (s == "count") return Normalize::Count;
  TORCH_CHECK(s == "none", "neurokern.", op,
              ": normalize must be \"weights\", \"count\" or \"none\", got \"", std::string(s), "\"");
  return Normalize::None;
}

// The vote of one element: sum of the values (Sum) or of their signs (Count). V: float, or double
// for the float64 recomputation of elements whose float32 values overflowed.
template <typename V>
inline double vote(const V* e, int64_t T, Consensus consensus) {
  double v = 0.0;
  for (int64_t t = 0; t < T; ++t) v += consensus == Consensus::Sum ? e[t] : sign_of(e[t]);
  return v;
}

// Merged delta of one element. d: contributions (weighted), e: values that vote, w: weights.
// fallback: the sign elected when the vote is 0; 0 elects the negative side (the TIES reference's
// where(sign > 0, x > 0, x < 0)).
template <typename V>
inline double elect_and_mix(const V* d, const V* e, const double* w, int64_t T,
                            Consensus consensus, int fallback, Normalize normalize) {
  double sum = 0.0, divisor = 1.0;
  if (consensus == Consensus::None) {
    double wsum = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      sum += d[t];
      wsum += w[t];
    }
    if (normalize == Normalize::Weights) divisor = std::fabs(wsum) < 1e-8 ? 1.0 : wsum;
    if (normalize == Normalize::Count) divisor = std::max<int64_t>(T, 1);
    return sum / divisor;
  }
  int s = sign_of(vote(e, T, consensus));
  if (s == 0) s = fallback;
  double wsum = 0.0;
  int64_t count = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (s > 0 ? e[t] > 0 : e[t] < 0) {
      sum += d[t];
      wsum += w[t];
      ++count;
    }
  }
  if (normalize == Normalize::Weights) divisor = wsum == 0.0 ? 1.0 : wsum;
  if (normalize == Normalize::Count) divisor = std::max<int64_t>(count, 1);
  return sum / divisor;
}

}  // namespace neurokern::cpu
