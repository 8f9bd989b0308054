// Rows of a LoRA-adapted weight in one pass: rows += ΔW rows, ΔW = scale·B·A (or its transpose),
// with the arithmetic and roundings of PEFT's get_delta_weight and merge on a CPU, bitwise. ΔW is
// formed a tile of rows at a time in a float32 buffer the thread keeps, small enough to stay in
// cache, and each of its rows is scaled, rounded and added into the weight's row while it is
// there. CPU only: the engine's reader threads call it on host memory (no GPU kernel).
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/common.h"

namespace neurokern::cpu {
namespace {

// A CPU BLAS may form a product of a few rows (or columns) otherwise than the whole product (MKL:
// 1 to 3 rows, or fewer than 16 columns, differ in the last bits), while blocks of a multiple of
// 16 rows give the whole product's bits: neurokern/engine/adapters.py's PRODUCT_BLOCK, which
// tests/engine/test_adapter_math.py checks on the machine it runs on. A ΔW of fewer rows is
// formed whole.
constexpr int64_t kProductBlock = 16;
// A tile's float32 bytes at most (a core's L2 holds it), unless one block of rows is more.
constexpr int64_t kTileBytes = 256 << 10;

// The element-wise loops are also built for AVX2 where GCC can pick a build when the library
// loads, as torch picks its own kernels' (AVX2 without FMA: the same roundings).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NEUROKERN_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define NEUROKERN_AVX2_CLONES
#endif

template <typename T>
inline float rounded(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// delta[c] = float(factor_t(delta[c] * scale)), in place: PEFT's (B·A)·scale in float32, then
// .to(the factors' dtype). Written to memory before add_row reads it, so that no fused
// multiply-add can join the product's rounding to the sum's.
template <typename factor_t>
NEUROKERN_AVX2_CLONES void scale_row(float* delta, int64_t cols, float scale) {
  for (int64_t c = 0; c < cols; ++c) delta[c] = rounded<factor_t>(delta[c] * scale);
}

// row[c] = weight_t(float(row[c]) + delta[c]): PEFT's in-place add, the sum formed in float32 (the
// wider of the two dtypes, or float32 for bfloat16 with float16), rounded once to the weight's
// dtype. An embedding's ΔW is rounded to the weight's dtype first (PEFT's Embedding.merge).
template <typename weight_t>
NEUROKERN_AVX2_CLONES void add_row(weight_t* row, const float* delta, int64_t cols, bool embedding) {
  if (embedding) {
    for (int64_t c = 0; c < cols; ++c)
      row[c] = static_cast<weight_t>(static_cast<float>(row[c]) + rounded<weight_t>(delta[c]));
  } else {
    for (int64_t c = 0; c < cols; ++c)
      row[c] = static_cast<weight_t>(static_cast<float>(row[c]) + delta[c]);
  }
}

// This thread's float32 buffer of at least numel elements, kept for its next call.
float* thread_buffer(at::Tensor& buffer, int64_t numel) {
  if (!buffer.defined() || buffer.numel() < numel) buffer = at::empty({numel}, at::kFloat);
  return buffer.data_ptr<float>();
}

void lora_add_rows_cpu(at::Tensor& rows, const at::Tensor& A, const at::Tensor& B, double scale,
                       bool transposed, bool embedding, int64_t first) {
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&rows), &A, &B})
    TORCH_CHECK(t->device().is_cpu(), "neurokern.lora_add_rows: CPU kernel got a tensor on ",
                t->device());
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous(),
              "neurokern.lora_add_rows: rows must be a contiguous matrix, got ", rows.sizes());
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && A.size(0) == B.size(1),
              "neurokern.lora_add_rows: A [r, in] and B [out, r] needed, got ", A.sizes(), " and ",
              B.sizes());
  TORCH_CHECK(A.scalar_type() == B.scalar_type(), "neurokern.lora_add_rows: A is ",
              A.scalar_type(), ", B is ", B.scalar_type());
  // ΔW is [B's rows, A's columns], or its transpose
  const int64_t delta_rows = transposed ? A.size(1) : B.size(0);
  const int64_t cols = transposed ? B.size(0) : A.size(1);
  const int64_t n = rows.size(0);
  TORCH_CHECK(rows.size(1) == cols, "neurokern.lora_add_rows: rows have ", rows.size(1),
              " columns, ΔW has ", cols);
  TORCH_CHECK(first >= 0 && first + n <= delta_rows, "neurokern.lora_add_rows: rows [", first,
              ", ", first + n, ") are not rows of ΔW, which has ", delta_rows);
  if (n == 0 || cols == 0) return;

  // PEFT multiplies half-precision factors in float32
  const at::Tensor A32 = A.to(at::kFloat).contiguous();
  const at::Tensor B32 = B.to(at::kFloat).contiguous();
  const float scale32 = static_cast<float>(scale);  // as torch's float32 mul_ by a Python float
  // rows per tile: a multiple of kProductBlock within kTileBytes (at least one block), or all
  const int64_t block =
      delta_rows < kProductBlock
          ? delta_rows
          : std::clamp<int64_t>(kTileBytes / (4 * cols) / kProductBlock * kProductBlock,
                                kProductBlock, delta_rows / kProductBlock * kProductBlock);
  thread_local at::Tensor product_buffer, column_buffer;
  float* product = thread_buffer(product_buffer, block * cols);
  // ΔW's rows [lo, lo + block): rows of B[lo:lo+block]·A, or columns of B·A[:, lo:lo+block]
  at::Tensor tile = product_buffer.narrow(0, 0, block * cols);
  tile = transposed ? tile.view({cols, block}) : tile.view({block, cols});
  float* column = transposed ? thread_buffer(column_buffer, cols) : nullptr;

  dispatch_storage(A.scalar_type(), "lora_add_rows", [&](auto factor_tag) {
    using factor_t = decltype(factor_tag);
    dispatch_storage(rows.scalar_type(), "lora_add_rows", [&](auto weight_tag) {
      using weight_t = decltype(weight_tag);
      weight_t* out = rows.data_ptr<weight_t>();
      for (int64_t from = first; from < first + n;) {
        const int64_t lo = std::min(from, delta_rows - block);
        const int64_t stop = std::min(first + n, lo + block);
        if (transposed) {
          at::cpu::mm_out(tile, B32, A32.narrow(1, lo, block));
        } else {
          at::cpu::mm_out(tile, B32.narrow(0, lo, block), A32);
        }
        for (int64_t i = from; i < stop; ++i) {
          float* delta = product + (i - lo) * cols;
          if (transposed) {
            for (int64_t c = 0; c < cols; ++c) column[c] = product[c * block + (i - lo)];
            delta = column;
          }
          scale_row<factor_t>(delta, cols, scale32);
          add_row<weight_t>(out + (i - first) * cols, delta, cols, embedding);
        }
        from = stop;
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) { m.impl("lora_add_rows", &lora_add_rows_cpu); }

}  // namespace neurokern::cpu
