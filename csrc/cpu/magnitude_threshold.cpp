// Exact magnitude threshold by radix select on the float32 bit pattern of |tau| (monotone for
// non-negative floats): a 65536-bin histogram of the high 16 bits, then one of the low 16 bits
// inside the bin that holds the k-th largest key. Two reads of the data, no sort, no copy; the
// tensors of a scope may mix storage dtypes (float32 keys either way). With
// exact-k ties a third read finds the flat position of the last tied entry to keep.
#include <torch/library.h>

#include <cstring>
#include <mutex>

#include "cpu/common.h"
#include "list_args.h"

namespace neurokern::cpu {
namespace {

constexpr int kBins = 1 << 16;

struct Segment {
  at::Tensor base, ft;
  int64_t offset;  // flat position of this tensor's first entry in the scope
};

template <typename scalar_t>
inline uint32_t key_at(const scalar_t* b, const scalar_t* f, int64_t i) {
  const float mag = std::fabs(static_cast<float>(f[i]) - static_cast<float>(b[i]));
  uint32_t key;
  std::memcpy(&key, &mag, sizeof(key));
  return key;
}

// Histogram of keys (or of the low half of keys whose high half is `hi`, when hi >= 0).
void histogram(const std::vector<Segment>& segs, int64_t hi, std::vector<int64_t>& hist) {
  std::fill(hist.begin(), hist.end(), 0);
  std::mutex merge;
  for (const auto& s : segs) {
    dispatch_storage(s.base.scalar_type(), "magnitude_threshold", [&](auto tag) {
      using scalar_t = decltype(tag);
      const auto* b = s.base.const_data_ptr<scalar_t>();
      const auto* f = s.ft.const_data_ptr<scalar_t>();
      at::parallel_for(0, s.base.numel(), kGrain, [&](int64_t begin, int64_t end) {
        std::vector<int64_t> local(kBins, 0);
        for (int64_t i = begin; i < end; ++i) {
          const uint32_t key = key_at(b, f, i);
          if (hi < 0) {
            ++local[key >> 16];
          } else if (static_cast<int64_t>(key >> 16) == hi) {
            ++local[key & 0xFFFFu];
          }
        }
        std::lock_guard<std::mutex> lock(merge);
        for (int j = 0; j < kBins; ++j) hist[j] += local[j];
      });
    });
  }
}

// From the top bin down: the bin holding the k-th largest, and how many keys lie above it.
inline int select_bin(const std::vector<int64_t>& hist, int64_t k, int64_t& above) {
  for (int j = kBins - 1; j >= 0; --j) {
    if (above + hist[j] >= k) return j;
    above += hist[j];
  }
  TORCH_CHECK(false, "neurokern.magnitude_threshold: internal error, k exceeds the entry count");
}

// Flat position just past the `need`-th entry (in scope order) whose key equals `key`.
int64_t tie_position(const std::vector<Segment>& segs, uint32_t key, int64_t need) {
  for (const auto& s : segs) {
    int64_t found = -1;
    dispatch_storage(s.base.scalar_type(), "magnitude_threshold", [&](auto tag) {
      using scalar_t = decltype(tag);
      const auto* b = s.base.const_data_ptr<scalar_t>();
      const auto* f = s.ft.const_data_ptr<scalar_t>();
      const int64_t n = s.base.numel();
      const int64_t here = at::parallel_reduce(
          0, n, kGrain, int64_t{0},
          [&](int64_t begin, int64_t end, int64_t acc) {
            for (int64_t i = begin; i < end; ++i) acc += key_at(b, f, i) == key;
            return acc;
          },
          std::plus<int64_t>());
      if (here < need) {
        need -= here;
        return;
      }
      for (int64_t i = 0; i < n && found < 0; ++i) {
        if (key_at(b, f, i) == key && --need == 0) found = s.offset + i + 1;
      }
    });
    if (found >= 0) return found;
  }
  TORCH_CHECK(false, "neurokern.magnitude_threshold: internal error, tie not found");
}

void select_one(const std::vector<Segment>& segs, int64_t total, int64_t k, bool keep_ties,
                float& threshold, int64_t& tie_limit) {
  k = std::min(k, total);
  if (k <= 0) {
    threshold = std::numeric_limits<float>::infinity();
    tie_limit = 0;
    return;
  }
  std::vector<int64_t> hist(kBins);
  int64_t above = 0;
  histogram(segs, -1, hist);
  const int hi = select_bin(hist, k, above);
  histogram(segs, hi, hist);
  const int lo = select_bin(hist, k, above);
  const uint32_t key = (static_cast<uint32_t>(hi) << 16) | static_cast<uint32_t>(lo);
  std::memcpy(&threshold, &key, sizeof(threshold));
  const int64_t need = k - above;  // tied entries to keep, 1 ... hist[lo]
  tie_limit = (keep_ties || need == hist[lo]) ? std::numeric_limits<int64_t>::max()
                                              : tie_position(segs, key, need);
}

// 1 where a task vector entry of base / ft is NaN or Inf (one read; the select may skip a group).
bool nonfinite_pair(const at::Tensor& base, const at::Tensor& ft) {
  bool bad = false;
  dispatch_storage(base.scalar_type(), "magnitude_threshold", [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* b = base.const_data_ptr<scalar_t>();
    const auto* f = ft.const_data_ptr<scalar_t>();
    bad = at::parallel_reduce(
        0, base.numel(), kGrain, false,
        [&](int64_t begin, int64_t end, bool acc) {
          for (int64_t i = begin; i < end && !acc; ++i) acc = key_at(b, f, i) >= 0x7F800000u;
          return acc;
        },
        [](bool a, bool b) { return a || b; });
  });
  return bad;
}

std::tuple<at::Tensor, at::Tensor> magnitude_threshold_cpu(at::TensorList base,
                                                           at::TensorList finetuned,
                                                           at::IntArrayRef k, bool keep_ties,
                                                           bool per_tensor,
                                                           const std::optional<at::Tensor>& nonfinite) {
  const int64_t n = static_cast<int64_t>(base.size());
  const int64_t T = list_tasks("magnitude_threshold", base, finetuned);
  TORCH_CHECK(static_cast<int64_t>(k.size()) == (per_tensor ? n * T : T),
              "neurokern.magnitude_threshold: expected ", per_tensor ? n * T : T,
              " values of k, got ", k.size());
  for (int64_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> column;
    for (int64_t t = 0; t < T; ++t) column.push_back(finetuned[t * n + i]);
    check_group("magnitude_threshold", base[i], column);
    dispatch_storage(base[i].scalar_type(), "magnitude_threshold", [](auto) {});
  }
  check_nonfinite_flags("magnitude_threshold", nonfinite, n, base[0].device());
  if (nonfinite) {
    int32_t* flag = nonfinite->data_ptr<int32_t>();
    for (int64_t i = 0; i < n; ++i) {
      flag[i] = 0;
      for (int64_t t = 0; t < T && !flag[i]; ++t) flag[i] = nonfinite_pair(base[i], finetuned[t * n + i]);
    }
  }
  const auto out_shape = per_tensor ? std::vector<int64_t>{n, T} : std::vector<int64_t>{T};
  at::Tensor threshold = at::empty(out_shape, at::kFloat);
  at::Tensor tie_limit = at::empty(out_shape, at::kLong);
  float* th = threshold.data_ptr<float>();
  int64_t* tl = tie_limit.data_ptr<int64_t>();
  // Tensors of different storage dtypes mix in one scope: the keys are float32 magnitudes.
  for (int64_t t = 0; t < T; ++t) {
    if (per_tensor) {
      for (int64_t i = 0; i < n; ++i) {
        const std::vector<Segment> one{{base[i], finetuned[t * n + i], 0}};
        select_one(one, base[i].numel(), k[i * T + t], keep_ties, th[i * T + t], tl[i * T + t]);
      }
    } else {
      std::vector<Segment> segs;
      int64_t total = 0;
      for (int64_t i = 0; i < n; ++i) {
        segs.push_back({base[i], finetuned[t * n + i], total});
        total += base[i].numel();
      }
      select_one(segs, total, k[t], keep_ties, th[t], tl[t]);
    }
  }
  return {threshold, tie_limit};
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) {
  m.impl("magnitude_threshold", &magnitude_threshold_cpu);
}

}  // namespace neurokern::cpu
