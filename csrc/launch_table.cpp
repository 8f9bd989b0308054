// The host side of the Triton launches over lists of tensors (neurokern/ops/triton/lists.py and the
// op modules that launch on its tables) in one C++ call: the argument checks, the grouping by storage dtype,
// each group's int64 launch table and per-program owner array on the tensors' device, and the
// outputs. The same work in Python cost milliseconds a call over a model's hundreds of tensors
// (a check, an address and a list entry per tensor, nested lists turned into a tensor, an
// output allocated per tensor).
//
// Internal ops (schemas in ops.cpp), called by the Triton launchers, which run on CUDA tensors and
// on CPU tensors under TRITON_INTERPRET; never traced.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "launch_table.h"
#include "list_args.h"

namespace neurokern {
namespace {

using TensorVector = std::vector<at::Tensor>;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t address(const at::Tensor& t) {
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr()));
}

// Every launch's table in one host buffer (pinned on the way to a GPU), one copy to the device,
// each table a [rows, nt] view of it starting 16-byte aligned (as a table of its own would).
class Tables {
 public:
  // Reserves a [rows, nt] table; returns its index.
  size_t add(int64_t rows, int64_t nt) {
    shapes_.emplace_back(rows, nt);
    starts_.push_back(size_);
    size_ += (rows * nt + 1) / 2 * 2;
    return starts_.size() - 1;
  }

  int64_t* allocate(const at::Device& device) {
    if (size_ == 0) return nullptr;
    host_ = at::empty({size_},
                      at::TensorOptions().dtype(at::kLong).pinned_memory(device.is_cuda()));
    return host_.data_ptr<int64_t>();
  }

  int64_t start(size_t k) const { return starts_[k]; }

  // The tables on `device`, without a host sync.
  TensorVector upload(const at::Device& device) const {
    if (size_ == 0) return {};
    const at::Tensor all = device.is_cuda() ? host_.to(device, /*non_blocking=*/true) : host_;
    TensorVector out;
    for (size_t k = 0; k < shapes_.size(); ++k) {
      const auto [rows, nt] = shapes_[k];
      out.push_back(all.narrow(0, starts_[k], rows * nt).view({rows, nt}));
    }
    return out;
  }

 private:
  std::vector<std::pair<int64_t, int64_t>> shapes_;
  std::vector<int64_t> starts_;
  int64_t size_ = 0;
  at::Tensor host_;
};

// int32 [total]: the tensor of each program, from a table row of per-tensor program counts on the
// device (one load per program in the kernel instead of a binary search over the tensors).
at::Tensor owners(const at::Tensor& counts, int64_t total) {
  return at::repeat_interleave(counts, std::optional<int64_t>(total)).to(at::kInt);
}

// Tensors grouped by a key, in order of first appearance: (key, list positions).
template <typename Key>
using Groups = std::vector<std::pair<Key, std::vector<int64_t>>>;

template <typename Key>
void add_to_group(Groups<Key>& groups, const Key& key, int64_t i) {
  auto it = std::find_if(groups.begin(), groups.end(),
                         [&](const auto& g) { return g.first == key; });
  if (it == groups.end()) {
    groups.emplace_back(key, std::vector<int64_t>{});
    it = groups.end() - 1;
  }
  it->second.push_back(i);
}

// ---------------------------------------------------------------------------------------------
// The multi-tensor ops (ops/triton/lists.py's tables)

// How a tensor's elements map to programs of per_program units: "elements" (per_program elements
// each), "row_blocks" (one program per row and per_program-column block; 2-D, value rows C and the
// first row), "rows" (per_program rows each; 2-D, value rows R, C and the first row). A first row
// counts the rows of the tensors before it in the list.
enum class Layout { kElements, kRowBlocks, kRows };

Layout parse_layout(const std::string& layout) {
  if (layout == "elements") return Layout::kElements;
  if (layout == "row_blocks") return Layout::kRowBlocks;
  TORCH_CHECK(layout == "rows", "neurokern._launch_table: unknown layout \"", layout, "\"");
  return Layout::kRows;
}

// base[i] and its fine-tuned versions finetuned[t * n + i]: the checks (and messages) of
// csrc/cpu/common.h's check_group and dispatch_storage, on any device.
void check_tensor(const std::string& op, at::TensorList base, at::TensorList finetuned, int64_t n,
                  int64_t T, int64_t i) {
  const at::Tensor& b = base[i];
  TORCH_CHECK(b.device() == base[0].device(), "neurokern.", op, ": base[", i, "] is on ",
              b.device(), ", base[0] on ", base[0].device());
  TORCH_CHECK(b.is_contiguous(), "neurokern.", op, ": base must be contiguous");
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& f = finetuned[t * n + i];
    TORCH_CHECK(f.sizes() == b.sizes(), "neurokern.", op, ": finetuned[", t, "] has shape ",
                f.sizes(), ", base has ", b.sizes());
    TORCH_CHECK(f.scalar_type() == b.scalar_type(), "neurokern.", op, ": finetuned[", t, "] is ",
                f.scalar_type(), ", base is ", b.scalar_type());
    TORCH_CHECK(f.device() == b.device(), "neurokern.", op, ": finetuned[", t, "] is on ",
                f.device(), ", base on ", b.device());
    TORCH_CHECK(f.is_contiguous(), "neurokern.", op, ": finetuned[", t, "] must be contiguous");
  }
  const at::ScalarType st = b.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "neurokern.", op,
              ": expected float32, bfloat16 or float16 tensors, got ", st);
}

bool is_float(at::ScalarType st) {
  return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble;
}

}  // namespace

// Checks the lists of a multi-tensor op (the messages of the C++ kernels) and, for per_program > 0,
// lays out its launches: one per storage dtype of base (and of grad, where given) that has
// programs, over the tensors of that dtype. Table rows (nt = the launch's tensor count, each row nt
// long): first program, numel, offset, base address, output address (base's without outputs),
// the T fine-tuned addresses, the grad addresses (where given), the layout's value rows, the
// position in the list, the program count.
// offsets: one per tensor, or empty (all 0), or None (the list's flat positions: the numels of the
// tensors before it). grad: weighted_sum_multi_backward's gradients (None otherwise), returned on
// the device, contiguous, float32 unless a floating dtype. outputs: one new output per tensor
// (out_dtype or base's dtype), whose addresses fill the output row.
// Returns (outputs, grad, [table, owner] per launch, info): info holds T, the total row count of a
// 2-D layout, then per launch the list position of its first tensor, its tensor count, its program
// count, whether every address of its table is 16-byte aligned, and (2-D layouts) whether every
// row length is a multiple of 16.
LaunchTables launch_table(
    c10::string_view op_name, at::TensorList base, at::TensorList finetuned,
    std::optional<at::TensorList> grad, std::optional<at::IntArrayRef> offsets, int64_t per_program,
    c10::string_view layout_name, bool outputs, std::optional<at::ScalarType> out_dtype) {
  const std::string op(op_name);
  const Layout layout = parse_layout(std::string(layout_name));
  const int64_t T = list_tasks(op.c_str(), base, finetuned);
  const int64_t n = static_cast<int64_t>(base.size());
  for (int64_t i = 0; i < n; ++i) check_tensor(op, base, finetuned, n, T, i);
  int64_t total_rows = 0;
  if (layout != Layout::kElements) {
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(base[i].dim() == 2, "neurokern.", op, ": base[", i,
                  "] must be 2-D (rows are neurons), got ", base[i].dim(), "-D");
      total_rows += base[i].size(0);
    }
  }
  const at::Device device = base[0].device();
  TensorVector grads;
  if (grad) {
    TORCH_CHECK(static_cast<int64_t>(grad->size()) == n, "neurokern.", op, ": ", grad->size(),
                " gradients for ", n, " tensors");
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& g = (*grad)[i];
      TORCH_CHECK(g.sizes() == base[i].sizes(), "neurokern.", op, ": grad[", i, "] has shape ",
                  g.sizes(), ", base[", i, "] has ", base[i].sizes());
    }
    for (const at::Tensor& g : *grad) {
      grads.push_back((is_float(g.scalar_type()) ? g : g.to(at::kFloat)).to(device).contiguous());
    }
  }
  TORCH_CHECK(!offsets || offsets->empty() || static_cast<int64_t>(offsets->size()) == n,
              "neurokern.", op, ": offsets must be empty or hold one entry per tensor (", n,
              "), got ", offsets->size());
  std::vector<int64_t> info = {T, total_rows};
  TensorVector outs;
  if (per_program <= 0) return {outs, grads, {}, info};

  if (outputs) {
    outs.reserve(n);
    for (const at::Tensor& b : base) {
      outs.push_back(at::empty(b.sizes(), b.options().dtype(out_dtype.value_or(b.scalar_type()))));
    }
  }
  std::vector<int64_t> programs(n), firsts(n), offset(n);
  for (int64_t i = 0, first = 0, position = 0; i < n; ++i) {
    const at::Tensor& b = base[i];
    offset[i] = offsets ? (offsets->empty() ? 0 : (*offsets)[i]) : position;
    position += b.numel();
    if (layout == Layout::kElements) {
      programs[i] = cdiv(b.numel(), per_program);
    } else {
      programs[i] = layout == Layout::kRows ? cdiv(b.size(0), per_program)
                                            : b.size(0) * cdiv(b.size(1), per_program);
      firsts[i] = first;
      first += b.size(0);
    }
  }
  using Key = std::pair<at::ScalarType, at::ScalarType>;
  Groups<Key> groups;
  for (int64_t i = 0; i < n; ++i) {
    const at::ScalarType g = grads.empty() ? at::ScalarType::Undefined : grads[i].scalar_type();
    add_to_group(groups, Key(base[i].scalar_type(), g), i);
  }
  const int64_t values = layout == Layout::kElements ? 0 : layout == Layout::kRowBlocks ? 2 : 3;
  const int64_t address_rows = 2 + T + (grads.empty() ? 0 : 1);  // base, out, fine-tuned, grad
  const int64_t rows = 3 + address_rows + values + 2;
  Tables tables;
  std::vector<const std::vector<int64_t>*> launched;
  std::vector<int64_t> totals;
  for (const auto& [key, idx] : groups) {
    int64_t total = 0;
    for (int64_t i : idx) total += programs[i];
    if (total == 0) continue;
    tables.add(rows, static_cast<int64_t>(idx.size()));
    launched.push_back(&idx);
    totals.push_back(total);
  }
  int64_t* host = tables.allocate(device);
  for (size_t k = 0; k < launched.size(); ++k) {
    const std::vector<int64_t>& idx = *launched[k];
    const int64_t nt = static_cast<int64_t>(idx.size());
    int64_t* table = host + tables.start(k);
    auto row = [&](int64_t r) { return table + r * nt; };
    bool aligned = true, c16 = true;
    int64_t start = 0;
    for (int64_t j = 0; j < nt; ++j) {
      const int64_t i = idx[j];
      const at::Tensor& b = base[i];
      row(0)[j] = start;
      start += programs[i];
      row(1)[j] = b.numel();
      row(2)[j] = offset[i];
      int64_t* addr = row(3) + j;
      addr[0] = address(b);
      addr[nt] = address(outputs ? outs[i] : b);
      for (int64_t t = 0; t < T; ++t) addr[(2 + t) * nt] = address(finetuned[t * n + i]);
      if (!grads.empty()) addr[(2 + T) * nt] = address(grads[i]);
      for (int64_t r = 0; r < address_rows; ++r) aligned = aligned && addr[r * nt] % 16 == 0;
      int64_t* value = row(3 + address_rows) + j;
      if (layout == Layout::kRowBlocks) {
        value[0] = b.size(1);
        value[nt] = firsts[i];
      } else if (layout == Layout::kRows) {
        value[0] = b.size(0);
        value[nt] = b.size(1);
        value[2 * nt] = firsts[i];
      }
      c16 = c16 && (layout == Layout::kElements || b.size(1) % 16 == 0);
      row(rows - 2)[j] = i;
      row(rows - 1)[j] = programs[i];
    }
    info.insert(info.end(), {idx[0], nt, totals[k], aligned, layout != Layout::kElements && c16});
  }
  TensorVector out_tables;
  const TensorVector uploaded = tables.upload(device);
  for (size_t k = 0; k < uploaded.size(); ++k) {
    out_tables.push_back(uploaded[k]);
    out_tables.push_back(owners(uploaded[k].select(0, rows - 1), totals[k]));
  }
  return {outs, grads, out_tables, info};
}

namespace {

// ---------------------------------------------------------------------------------------------
// The finite check (finite.py)

// The storage dtypes the finite kernel reads (finite._NONFINITE_BITS), and the integer dtype of
// their size that it reads them as.
std::optional<at::ScalarType> finite_int_type(at::ScalarType st) {
  switch (st) {
    case at::kDouble:
      return at::kLong;
    case at::kFloat:
      return at::kInt;
    case at::kBFloat16:
    case at::kHalf:
      return at::kShort;
    case at::kFloat8_e5m2:
    case at::kFloat8_e4m3fn:
      return at::kChar;
    default:
      return std::nullopt;
  }
}

// t's elements fill numel slots from its address on (contiguous up to a permutation of its dims):
// read in place, in any order.
bool dense(const at::Tensor& t) {
  if (t.is_contiguous()) return true;
  std::vector<int64_t> perm(t.dim());
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin(), perm.end(),
                   [&](int64_t a, int64_t b) { return t.stride(a) > t.stride(b); });
  return t.permute(perm).is_contiguous();
}

// The launches of the finite check over `tensors` (one device): one per storage dtype and 16-byte
// alignment of the tensors with elements, programs of block_bytes each. Tensors that are not dense
// are read from contiguous copies. Table rows: first program, numel, address, position in the
// list, program count. Returns ([table, owner, the first tensor viewed as its integer dtype] per
// launch, the copies (alive until the launch), info: per launch the position of its first tensor,
// its tensor count, program count and alignment, and the positions of the tensors of other dtypes).
std::tuple<TensorVector, TensorVector, std::vector<int64_t>, std::vector<int64_t>> finite_table(
    at::TensorList tensors, int64_t block_bytes) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  TensorVector read(n), copies;
  std::vector<int64_t> others;
  using Key = std::pair<at::ScalarType, bool>;
  Groups<Key> groups;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == tensors[0].device(), "neurokern.nonfinite_flags: tensors[", i,
                "] is on ", t.device(), ", tensors[0] on ", tensors[0].device());
    if (!finite_int_type(t.scalar_type())) {
      others.push_back(i);
      continue;
    }
    if (t.numel() == 0) continue;
    read[i] = dense(t) ? t : copies.emplace_back(t.contiguous());
    add_to_group(groups, Key(t.scalar_type(), address(read[i]) % 16 == 0), i);
  }
  const at::Device device = n ? tensors[0].device() : at::Device(at::kCPU);
  Tables tables;
  std::vector<int64_t> info, totals;
  for (const auto& [key, idx] : groups) tables.add(5, static_cast<int64_t>(idx.size()));
  int64_t* host = tables.allocate(device);
  for (size_t k = 0; k < groups.size(); ++k) {
    const auto& [key, idx] = groups[k];
    const int64_t nt = static_cast<int64_t>(idx.size());
    const int64_t per_program = block_bytes / static_cast<int64_t>(c10::elementSize(key.first));
    int64_t* table = host + tables.start(k);
    int64_t total = 0;
    for (int64_t j = 0; j < nt; ++j) {
      const at::Tensor& t = read[idx[j]];
      const int64_t count = cdiv(t.numel(), per_program);
      table[j] = total;
      table[nt + j] = t.numel();
      table[2 * nt + j] = address(t);
      table[3 * nt + j] = idx[j];
      table[4 * nt + j] = count;
      total += count;
    }
    totals.push_back(total);
    info.insert(info.end(), {idx[0], nt, total, key.second});
  }
  TensorVector out;
  const TensorVector uploaded = tables.upload(device);
  for (size_t k = 0; k < uploaded.size(); ++k) {
    const at::Tensor& first = read[groups[k].second[0]];
    out.insert(out.end(), {uploaded[k], owners(uploaded[k].select(0, 4), totals[k]),
                           first.view(*finite_int_type(first.scalar_type()))});
  }
  return {out, copies, info, others};
}

}  // namespace

// Composite: any device, and a call without tensors (an empty list) gets the op's own message.
TORCH_LIBRARY_IMPL(neurokern, CompositeExplicitAutograd, m) {
  m.impl("_launch_table", &launch_table);
  m.impl("_finite_table", &finite_table);
}

}  // namespace neurokern
