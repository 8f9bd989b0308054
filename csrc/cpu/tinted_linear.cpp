// Task-routed linear layer for batches that mix tasks: rows are grouped by task id and each group
// runs one GEMM against its task's weight (a segmented GEMM; accumulation in float32 by ATen).
#include <torch/library.h>

#include "cpu/common.h"

namespace neurokern::cpu {
namespace {

// Row indices of each task, in order of appearance.
std::vector<std::vector<int64_t>> rows_by_task(const at::Tensor& task_ids, int64_t num_tasks,
                                               const char* op) {
  TORCH_CHECK(task_ids.dim() == 1, "neurokern.", op, ": task_ids must be 1-D, got ",
              task_ids.sizes());
  TORCH_CHECK(!at::isFloatingType(task_ids.scalar_type()) && task_ids.scalar_type() != at::kBool,
              "neurokern.", op, ": task_ids must be an integer tensor, got ", task_ids.scalar_type());
  const at::Tensor ids = task_ids.to(at::kLong).contiguous();
  const int64_t* p = ids.const_data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> rows(num_tasks);
  for (int64_t b = 0; b < ids.numel(); ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] < num_tasks, "neurokern.", op, ": task_ids[", b, "] = ", p[b],
                " is out of range for ", num_tasks, " tasks");
    rows[p[b]].push_back(b);
  }
  return rows;
}

at::Tensor index_of(const std::vector<int64_t>& rows) {
  return at::from_blob(const_cast<int64_t*>(rows.data()), {static_cast<int64_t>(rows.size())},
                       at::kLong)
      .clone();
}

at::Tensor tinted_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& task_ids) {
  TORCH_CHECK(x.dim() == 2, "neurokern.tinted_linear: x must be [B, in], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.size(2) == x.size(1),
              "neurokern.tinted_linear: weight must be [T, out, in] with in = ", x.size(1), ", got ",
              weight.sizes());
  TORCH_CHECK(task_ids.size(0) == x.size(0), "neurokern.tinted_linear: ", task_ids.size(0),
              " task ids for ", x.size(0), " rows");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "neurokern.tinted_linear: weight is ",
              weight.scalar_type(), ", x is ", x.scalar_type());
  const int64_t T = weight.size(0), out_features = weight.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({T, out_features}),
                "neurokern.tinted_linear: bias must be [", T, ", ", out_features, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "neurokern.tinted_linear: bias is ",
                bias->scalar_type(), ", x is ", x.scalar_type());
  }
  const auto rows = rows_by_task(task_ids, T, "tinted_linear");
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  for (int64_t t = 0; t < T; ++t) {
    if (rows[t].empty()) continue;
    const at::Tensor idx = index_of(rows[t]);
    const at::Tensor xt = x.index_select(0, idx);
    const at::Tensor yt = bias.has_value() ? at::addmm((*bias)[t], xt, weight[t].t())
                                           : at::mm(xt, weight[t].t());
    y.index_copy_(0, idx, yt);
  }
  return y;
}

at::Tensor tinted_linear_weight_grad_cpu(const at::Tensor& grad, const at::Tensor& x,
                                         const at::Tensor& task_ids, int64_t num_tasks) {
  TORCH_CHECK(grad.dim() == 2 && x.dim() == 2 && grad.size(0) == x.size(0),
              "neurokern.tinted_linear_weight_grad: grad [B, out] and x [B, in] needed, got ",
              grad.sizes(), " and ", x.sizes());
  const auto rows = rows_by_task(task_ids, num_tasks, "tinted_linear_weight_grad");
  at::Tensor dw = at::zeros({num_tasks, grad.size(1), x.size(1)}, x.options());
  for (int64_t t = 0; t < num_tasks; ++t) {
    if (rows[t].empty()) continue;
    const at::Tensor idx = index_of(rows[t]);
    dw[t].copy_(at::mm(grad.index_select(0, idx).t(), x.index_select(0, idx)));
  }
  return dw;
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) {
  m.impl("tinted_linear", &tinted_linear_cpu);
  m.impl("tinted_linear_weight_grad", &tinted_linear_weight_grad_cpu);
}

}  // namespace neurokern::cpu
