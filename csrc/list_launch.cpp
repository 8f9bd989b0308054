// weighted_sum_multi's CUDA kernel with its whole host side in C++: the checks, the launch tables
// and outputs (launch_table.cpp) and the per-launch arguments, then one call per launch of
// neurokern::_ws_multi_launch, the Triton launch itself (neurokern/ops/triton/weighted_sum.py).
//
// A launcher written in Python takes the list of tensors across the Python / C++ boundary three
// times (the op call, the Python kernel, _launch_table) and loops over it in Python for its own
// checks: on the H200 machines 1.2 ms of host time a call over a 1.1B model's 201 x 5 tensors,
// while the GPU needs 3.0 ms for the kernel, and a call's bandwidth counts both. Here the list
// crosses once, at the op call.
//
// _weighted_sum_multi_triton is the same function on any device: the CPU test suite runs it on CPU
// tensors with the Triton kernels interpreted (TRITON_INTERPRET=1). It also takes optional flags
// of outputs holding NaN / Inf, set in the kernel's own pass (task arithmetic's input check: an
// untrimmed weighted sum is non-finite wherever one of its inputs is).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cpu/multi.h"
#include "launch_table.h"
#include "list_args.h"

namespace neurokern {
namespace {

using OptTensor = std::optional<at::Tensor>;

// The Triton side's constants (neurokern/ops/triton/elementwise.py: BLOCK, MAX_TASKS), set when
// neurokern.ops.triton is imported (_triton_list_config); 0 until then.
struct TritonConfig {
  int64_t block = 0;
  int64_t max_tasks = 0;
};

TritonConfig& triton_config() {
  static TritonConfig config;
  return config;
}

void set_triton_config(int64_t block, int64_t max_tasks) {
  TORCH_CHECK(block > 0 && max_tasks > 0, "neurokern._triton_list_config: block and max_tasks must be positive");
  triton_config() = {block, max_tasks};
}

using WsMultiLaunch = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                           const OptTensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                           bool, bool, const OptTensor&);

const c10::TypedOperatorHandle<WsMultiLaunch>& ws_multi_launch() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("neurokern::_ws_multi_launch", "").typed<WsMultiLaunch>();
  return op;
}

// The output dtypes the fused kernel stores (others: the single-tensor op per tensor).
bool stored_directly(std::optional<at::ScalarType> out_dtype) {
  if (!out_dtype) return true;  // base's storage dtype
  const at::ScalarType st = *out_dtype;
  return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble;
}

// nonfinite[i] = 1 where outs[i] holds a NaN or Inf, 0 elsewhere (no host sync).
void flag_nonfinite(const std::vector<at::Tensor>& outs, const at::Tensor& nonfinite) {
  std::vector<at::Tensor> flags;
  flags.reserve(outs.size());
  for (const at::Tensor& out : outs) flags.push_back(at::isfinite(out).all().logical_not());
  nonfinite.copy_(at::stack(flags));
}

std::vector<at::Tensor> weighted_sum_multi_checked(at::TensorList base_in, at::TensorList finetuned_in,
                                                   const at::Tensor& coeffs_in, const OptTensor& threshold_in,
                                                   const OptTensor& tie_limit_in, at::IntArrayRef offsets,
                                                   std::optional<at::ScalarType> out_dtype, const OptTensor& nonfinite) {
  const char* op = "weighted_sum_multi";
  const TritonConfig config = triton_config();
  TORCH_CHECK(config.block > 0, "neurokern.", op,
              ": the Triton kernels are not loaded (neurokern.ops.triton, which needs the triton package)");
  check_models_need_no_grad(op, base_in, finetuned_in);
  const std::vector<at::Tensor> base = contiguous_list(base_in), finetuned = contiguous_list(finetuned_in);
  const int64_t n = static_cast<int64_t>(base.size());
  const int64_t T = list_tasks(op, base, finetuned);
  const bool fused = T <= config.max_tasks && stored_directly(out_dtype);
  auto [outs, grads, tables, info] =
      launch_table(op, base, finetuned, std::nullopt, offsets, fused ? config.block : 0, "elements", fused, out_dtype);
  TORCH_CHECK(coeffs_in.scalar_type() == at::kFloat && coeffs_in.dim() == 2 && coeffs_in.size(0) == n &&
                  coeffs_in.size(1) == T + 1,
              "neurokern.", op, ": coeffs must be float32 [n, T+1] = [", n, ", ", T + 1,
              "] (one row per tensor), got ", coeffs_in.scalar_type(), " ", coeffs_in.sizes());
  check_multi_args(op, n, T, offsets, threshold_in, tie_limit_in);
  const at::Device device = base[0].device();
  check_nonfinite_flags(op, nonfinite, n, device);
  if (!fused) {
    std::vector<at::Tensor> each =
        cpu::weighted_sum_multi_each(base, finetuned, coeffs_in, threshold_in, tie_limit_in, offsets, out_dtype);
    if (nonfinite) flag_nonfinite(each, *nonfinite);
    return each;
  }
  if (nonfinite) nonfinite->zero_();  // the kernel sets the flags of outputs with NaN / Inf
  const at::Tensor coeffs = coeffs_in.to(device).contiguous();
  OptTensor threshold, tie_limit;
  if (threshold_in) {
    threshold = threshold_in->to(device, at::kFloat).contiguous();
    tie_limit = tie_limit_in->to(device, at::kLong).contiguous();
  }
  const bool trim_rows = threshold && threshold->dim() == 2;  // [n, T]: row i trims tensor i
  for (size_t k = 0; k < tables.size() / 2; ++k) {
    const at::Tensor& table = tables[2 * k];
    const int64_t first = info[2 + 5 * k], nt = info[3 + 5 * k], programs = info[4 + 5 * k];
    const bool aligned = info[5 + 5 * k] != 0;
    // the rows of this launch's tensors (one row per tensor of the list), by the table's row of
    // list positions, where the launch holds only some of the tensors
    const at::Tensor positions = table.select(0, table.size(0) - 2);
    auto rows_of = [&](const at::Tensor& x) { return nt == n ? x : x.index_select(0, positions); };
    OptTensor sub_threshold = threshold, sub_tie_limit = tie_limit;
    if (trim_rows) {
      sub_threshold = rows_of(*threshold);
      sub_tie_limit = rows_of(*tie_limit);
    }
    ws_multi_launch().call(table, tables[2 * k + 1], rows_of(coeffs), sub_threshold, sub_tie_limit, base[first],
                           outs[first], nt, programs, T, trim_rows, aligned, nonfinite);
  }
  return outs;
}

// The public op (no flags: an op with a mutable argument can have no autograd formula).
std::vector<at::Tensor> weighted_sum_multi_triton(at::TensorList base, at::TensorList finetuned,
                                                  const at::Tensor& coeffs, const OptTensor& threshold,
                                                  const OptTensor& tie_limit, at::IntArrayRef offsets,
                                                  std::optional<at::ScalarType> out_dtype) {
  return weighted_sum_multi_checked(base, finetuned, coeffs, threshold, tie_limit, offsets, out_dtype, std::nullopt);
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CUDA, m) { m.impl("weighted_sum_multi", &weighted_sum_multi_triton); }

TORCH_LIBRARY_IMPL(neurokern, CompositeExplicitAutograd, m) {
  m.impl("_weighted_sum_multi_triton", &weighted_sum_multi_checked);
}

// No tensor arguments: a composite kernel is the one the dispatcher finds for such a call.
TORCH_LIBRARY_IMPL(neurokern, CompositeImplicitAutograd, m) { m.impl("_triton_list_config", &set_triton_config); }

}  // namespace neurokern
