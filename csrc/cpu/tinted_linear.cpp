// Task-routed linear layer for batches that mix tasks: rows are grouped by task id and each group
// runs one GEMM against its task's weight (a segmented GEMM; accumulation in float32 by ATen).
#include <torch/library.h>

#include "cpu/common.h"

namespace neurokern::cpu {
namespace {

void check_ids(const at::Tensor& task_ids, const char* op) {
  TORCH_CHECK(task_ids.dim() == 1, "neurokern.", op, ": task_ids must be 1-D, got ",
              task_ids.sizes());
  TORCH_CHECK(!at::isFloatingType(task_ids.scalar_type()) && !at::isComplexType(task_ids.scalar_type()) &&
                  task_ids.scalar_type() != at::kBool,
              "neurokern.", op, ": task_ids must be an integer tensor, got ", task_ids.scalar_type());
}

// A stable counting sort of the rows by task id: (perm, bounds) as tinted_route returns them.
// Rows whose id lies outside [0, num_tasks) follow the last task's rows, in batch order.
std::tuple<at::Tensor, at::Tensor> route(const at::Tensor& task_ids, int64_t num_tasks, bool check,
                                         const char* op) {
  check_ids(task_ids, op);
  TORCH_CHECK(num_tasks >= 0, "neurokern.", op, ": num_tasks must be >= 0, got ", num_tasks);
  const at::Tensor ids = task_ids.to(at::kLong).contiguous();
  const int64_t* p = ids.const_data_ptr<int64_t>();
  const int64_t B = ids.numel();
  at::Tensor bounds = at::zeros({num_tasks + 1}, ids.options());
  int64_t* bound = bounds.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const bool in_range = p[b] >= 0 && p[b] < num_tasks;
    TORCH_CHECK(in_range || !check, "neurokern.", op, ": task_ids[", b, "] = ", p[b],
                " is out of range for ", num_tasks, " tasks");
    if (in_range) ++bound[p[b] + 1];
  }
  for (int64_t t = 0; t < num_tasks; ++t) bound[t + 1] += bound[t];
  std::vector<int64_t> next(bound, bound + num_tasks);
  int64_t outside = bound[num_tasks];
  at::Tensor perm = at::empty({B}, ids.options());
  int64_t* out = perm.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const bool in_range = p[b] >= 0 && p[b] < num_tasks;
    out[in_range ? next[p[b]]++ : outside++] = b;
  }
  return {perm, bounds};
}

std::tuple<at::Tensor, at::Tensor> tinted_route_cpu(const at::Tensor& task_ids, int64_t num_tasks) {
  return route(task_ids, num_tasks, /*check=*/false, "tinted_route");
}

// The rows of each task (an index tensor per task): perm and bounds when the caller gives them
// (trusted: tinted_route of these ids), else routed here with every id checked.
std::vector<at::Tensor> rows_by_task(const at::Tensor& task_ids, int64_t num_tasks,
                                     const std::optional<at::Tensor>& perm,
                                     const std::optional<at::Tensor>& bounds, const char* op) {
  TORCH_CHECK(perm.has_value() == bounds.has_value(), "neurokern.", op,
              ": give both perm and bounds (tinted_route's outputs) or neither");
  at::Tensor order, edges;
  if (perm.has_value()) {
    check_ids(task_ids, op);
    TORCH_CHECK(perm->dim() == 1 && perm->size(0) == task_ids.size(0) &&
                    perm->scalar_type() == at::kLong,
                "neurokern.", op, ": perm must be int64 [", task_ids.size(0), "], got ",
                perm->scalar_type(), " ", perm->sizes());
    TORCH_CHECK(bounds->dim() == 1 && bounds->size(0) == num_tasks + 1 &&
                    bounds->scalar_type() == at::kLong,
                "neurokern.", op, ": bounds must be int64 [", num_tasks + 1, "], got ",
                bounds->scalar_type(), " ", bounds->sizes());
    order = perm->contiguous();
    edges = bounds->contiguous();
  } else {
    std::tie(order, edges) = route(task_ids, num_tasks, /*check=*/true, op);
  }
  const int64_t* edge = edges.const_data_ptr<int64_t>();
  std::vector<at::Tensor> rows(num_tasks);
  for (int64_t t = 0; t < num_tasks; ++t) {
    if (edge[t + 1] > edge[t]) rows[t] = order.slice(0, edge[t], edge[t + 1]);
  }
  return rows;
}

at::Tensor tinted_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& task_ids,
                             const std::optional<at::Tensor>& perm,
                             const std::optional<at::Tensor>& bounds) {
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
  const auto rows = rows_by_task(task_ids, T, perm, bounds, "tinted_linear");
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  for (int64_t t = 0; t < T; ++t) {
    if (!rows[t].defined()) continue;
    const at::Tensor xt = x.index_select(0, rows[t]);
    const at::Tensor yt = bias.has_value() ? at::addmm((*bias)[t], xt, weight[t].t())
                                           : at::mm(xt, weight[t].t());
    y.index_copy_(0, rows[t], yt);
  }
  return y;
}

at::Tensor tinted_linear_weight_grad_cpu(const at::Tensor& grad, const at::Tensor& x,
                                         const at::Tensor& task_ids, int64_t num_tasks,
                                         const std::optional<at::Tensor>& perm,
                                         const std::optional<at::Tensor>& bounds) {
  TORCH_CHECK(grad.dim() == 2 && x.dim() == 2 && grad.size(0) == x.size(0),
              "neurokern.tinted_linear_weight_grad: grad [B, out] and x [B, in] needed, got ",
              grad.sizes(), " and ", x.sizes());
  const auto rows = rows_by_task(task_ids, num_tasks, perm, bounds, "tinted_linear_weight_grad");
  at::Tensor dw = at::zeros({num_tasks, grad.size(1), x.size(1)}, x.options());
  for (int64_t t = 0; t < num_tasks; ++t) {
    if (!rows[t].defined()) continue;
    dw[t].copy_(at::mm(grad.index_select(0, rows[t]).t(), x.index_select(0, rows[t])));
  }
  return dw;
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) {
  m.impl("tinted_route", &tinted_route_cpu);
  m.impl("tinted_linear", &tinted_linear_cpu);
  m.impl("tinted_linear_weight_grad", &tinted_linear_weight_grad_cpu);
}

}  // namespace neurokern::cpu
