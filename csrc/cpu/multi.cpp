// The multi-tensor ops on CPU: the single-tensor op for each tensor of the list. The CPU kernels
// parallelise inside a tensor, so a call per tensor costs nothing the GPU's one launch saves.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cpu/multi.h"
#include "cpu/ties_merge.h"
#include "list_args.h"

namespace neurokern::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;

int64_t offset_of(at::IntArrayRef offsets, int64_t i) { return offsets.empty() ? 0 : offsets[i]; }

using WeightedSum = at::Tensor(const at::Tensor&, at::TensorList, const at::Tensor&, const OptTensor&,
                               const OptTensor&, int64_t, std::optional<at::ScalarType>);

// The single-tensor weighted_sum, which both list forms (per-tensor and per-row coefficients) run.
const c10::TypedOperatorHandle<WeightedSum>& weighted_sum_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("neurokern::weighted_sum", "").typed<WeightedSum>();
  return op;
}

}  // namespace

std::vector<at::Tensor> weighted_sum_multi_each(at::TensorList base_in, at::TensorList finetuned_in,
                                                const at::Tensor& coeffs, const OptTensor& threshold,
                                                const OptTensor& tie_limit, at::IntArrayRef offsets,
                                                std::optional<at::ScalarType> out_dtype) {
  const auto& op = weighted_sum_op();
  check_models_need_no_grad("weighted_sum_multi", base_in, finetuned_in);
  const std::vector<at::Tensor> base = contiguous_list(base_in), finetuned = contiguous_list(finetuned_in);
  const int64_t n = static_cast<int64_t>(base.size());
  const int64_t T = list_tasks("weighted_sum_multi", base, finetuned);
  check_multi_args("weighted_sum_multi", n, T, offsets, threshold, tie_limit);
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(0) == n && coeffs.size(1) == T + 1,
              "neurokern.weighted_sum_multi: coeffs must be [n, T+1] = [", n, ", ", T + 1,
              "] (one row per tensor), got ", coeffs.sizes());
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(op.call(base[i], column_of(finetuned, n, i), coeffs.select(0, i),
                          trim_of(threshold, i), trim_of(tie_limit, i), offset_of(offsets, i),
                          out_dtype));
  }
  return out;
}

namespace {

at::Tensor weighted_sum_multi_backward_cpu(at::TensorList grad, at::TensorList base,
                                           at::TensorList finetuned, const at::Tensor& coeffs,
                                           const OptTensor& threshold, const OptTensor& tie_limit,
                                           at::IntArrayRef offsets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("neurokern::weighted_sum_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::TensorList,
                                         const at::Tensor&, const OptTensor&, const OptTensor&,
                                         int64_t)>();
  const int64_t n = static_cast<int64_t>(base.size());
  const int64_t T = list_tasks("weighted_sum_multi_backward", base, finetuned);
  check_multi_args("weighted_sum_multi_backward", n, T, offsets, threshold, tie_limit);
  TORCH_CHECK(static_cast<int64_t>(grad.size()) == n, "neurokern.weighted_sum_multi_backward: ",
              grad.size(), " gradients for ", n, " tensors");
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(0) == n && coeffs.size(1) == T + 1,
              "neurokern.weighted_sum_multi_backward: coeffs must be [n, T+1] = [", n, ", ", T + 1,
              "], got ", coeffs.sizes());
  at::Tensor out = at::empty({n, T + 1}, coeffs.options().dtype(at::kFloat));
  for (int64_t i = 0; i < n; ++i) {
    out.select(0, i).copy_(op.call(grad[i], base[i], column_of(finetuned, n, i), coeffs.select(0, i),
                                   trim_of(threshold, i), trim_of(tie_limit, i),
                                   offset_of(offsets, i)));
  }
  return out;
}

// _ties_merge_multi_flagged: flag i from the values ties_merge stores for tensor i, in its loop.
std::vector<at::Tensor> ties_merge_multi_flagged_cpu(at::TensorList base, at::TensorList finetuned,
                                                     at::ArrayRef<double> weights, const OptTensor& threshold,
                                                     const OptTensor& tie_limit, at::IntArrayRef offsets,
                                                     c10::string_view consensus, c10::string_view normalize,
                                                     bool elect_weighted, c10::string_view zero_sign,
                                                     double scale, const OptTensor& nonfinite) {
  const int64_t n = static_cast<int64_t>(base.size());
  const int64_t T = list_tasks("ties_merge_multi", base, finetuned);
  check_multi_args("ties_merge_multi", n, T, offsets, threshold, tie_limit);
  check_nonfinite_flags("ties_merge_multi", nonfinite, n, base[0].device());
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < n; ++i) {
    bool flagged = false;
    out.push_back(ties_merge_flagged(base[i], column_of(finetuned, n, i), weights, trim_of(threshold, i),
                                     trim_of(tie_limit, i), offset_of(offsets, i), consensus, normalize,
                                     elect_weighted, zero_sign, scale, nonfinite ? &flagged : nullptr));
    if (nonfinite) nonfinite->data_ptr<int32_t>()[i] = flagged;
  }
  return out;
}

std::vector<at::Tensor> ties_merge_multi_cpu(at::TensorList base, at::TensorList finetuned,
                                             at::ArrayRef<double> weights, const OptTensor& threshold,
                                             const OptTensor& tie_limit, at::IntArrayRef offsets,
                                             c10::string_view consensus, c10::string_view normalize,
                                             bool elect_weighted, c10::string_view zero_sign,
                                             double scale) {
  return ties_merge_multi_flagged_cpu(base, finetuned, weights, threshold, tie_limit, offsets, consensus, normalize,
                                      elect_weighted, zero_sign, scale, std::nullopt);
}

std::vector<at::Tensor> dare_multi_cpu(at::TensorList base, at::TensorList finetuned,
                                       at::ArrayRef<double> weights, double density,
                                       at::IntArrayRef keys, c10::string_view rescale,
                                       c10::string_view consensus, c10::string_view normalize,
                                       double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("neurokern::dare", "")
                       .typed<at::Tensor(const at::Tensor&, at::TensorList, at::ArrayRef<double>,
                                         double, at::IntArrayRef, c10::string_view,
                                         c10::string_view, c10::string_view, double)>();
  const int64_t n = static_cast<int64_t>(base.size());
  const int64_t T = list_tasks("dare_multi", base, finetuned);
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == n * T, "neurokern.dare_multi: keys must hold n * T = ",
              n * T, " entries (keys[i * T + t]), got ", keys.size());
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(op.call(base[i], column_of(finetuned, n, i), weights, density,
                          keys.slice(i * T, T), rescale, consensus, normalize, scale));
  }
  return out;
}

// Every base of a per-row op must be 2-D (rows are neurons); returns the total row count.
int64_t total_rows(const char* op, at::TensorList base) {
  int64_t rows = 0;
  for (size_t i = 0; i < base.size(); ++i) {
    TORCH_CHECK(base[i].dim() == 2, "neurokern.", op, ": base[", i,
                "] must be 2-D (rows are neurons), got ", base[i].dim(), "-D");
    rows += base[i].size(0);
  }
  return rows;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> neuron_stats_multi_cpu(
    at::TensorList base, at::TensorList finetuned, const OptTensor& threshold,
    const OptTensor& tie_limit, at::IntArrayRef offsets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("neurokern::neuron_stats", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, at::TensorList, const OptTensor&, const OptTensor&,
                           int64_t)>();
  const int64_t n = static_cast<int64_t>(base.size());
  const int64_t T = list_tasks("neuron_stats_multi", base, finetuned);
  check_multi_args("neuron_stats_multi", n, T, offsets, threshold, tie_limit);
  total_rows("neuron_stats_multi", base);
  std::vector<at::Tensor> gram, dots, sqnorm;
  for (int64_t i = 0; i < n; ++i) {
    auto [g, d, q] = op.call(base[i], column_of(finetuned, n, i), trim_of(threshold, i),
                             trim_of(tie_limit, i), offset_of(offsets, i));
    gram.push_back(g);
    dots.push_back(d);
    sqnorm.push_back(q);
  }
  return {at::cat(gram), at::cat(dots), at::cat(sqnorm)};
}

std::vector<at::Tensor> weighted_sum_rows_multi_cpu(at::TensorList base, at::TensorList finetuned,
                                                    const at::Tensor& coeffs, const OptTensor& threshold,
                                                    const OptTensor& tie_limit, at::IntArrayRef offsets,
                                                    std::optional<at::ScalarType> out_dtype) {
  const auto& op = weighted_sum_op();
  const int64_t n = static_cast<int64_t>(base.size());
  const int64_t T = list_tasks("weighted_sum_rows_multi", base, finetuned);
  check_multi_args("weighted_sum_rows_multi", n, T, offsets, threshold, tie_limit);
  const int64_t rows = total_rows("weighted_sum_rows_multi", base);
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat,
              "neurokern.weighted_sum_rows_multi: coeffs must be float32, got ", coeffs.scalar_type());
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(0) == T + 1 && coeffs.size(1) == rows,
              "neurokern.weighted_sum_rows_multi: coeffs must be [T+1, sum of rows] = [", T + 1, ", ",
              rows, "] (tensor i's rows at its first row in list order), got ", coeffs.sizes());
  std::vector<at::Tensor> out;
  int64_t first = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t R = base[i].size(0);
    out.push_back(op.call(base[i], column_of(finetuned, n, i), coeffs.narrow(1, first, R),
                          trim_of(threshold, i), trim_of(tie_limit, i), offset_of(offsets, i),
                          out_dtype));
    first += R;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) {
  m.impl("weighted_sum_multi", &weighted_sum_multi_each);
  m.impl("weighted_sum_multi_backward", &weighted_sum_multi_backward_cpu);
  m.impl("ties_merge_multi", &ties_merge_multi_cpu);
  m.impl("_ties_merge_multi_flagged", &ties_merge_multi_flagged_cpu);
  m.impl("dare_multi", &dare_multi_cpu);
  m.impl("neuron_stats_multi", &neuron_stats_multi_cpu);
  m.impl("weighted_sum_rows_multi", &weighted_sum_rows_multi_cpu);
}

}  // namespace neurokern::cpu
