// Exact magnitude threshold on the GPU: radix select on the float32 bit pattern of |tau| in three
// digit passes (bits 30..20, 19..10, 9..0; bit 31 is 0 for magnitudes) with shared-memory
// histograms fed by warp-aggregated atomics (magnitudes crowd into few bins), for many selection groups at once
// (one per task over the whole list, or one per (tensor, task)); each block reads a chunk of the
// base once for up to 4 tasks. Tensors of different storage dtypes may share a scope: each kernel
// is launched once per dtype present and its blocks skip the chunks of other dtypes. Every group's state stays on the device; with exact-k ties, one
// more pass finds the flat position of the last tie to keep (one host sync to know it is needed).
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cuda/common.cuh"
#include "list_args.h"

namespace neurokern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per block
constexpr int kMaxBins = 2048;
constexpr int kTasksPerBlock = 4;  // shared histograms of up to 4 tasks: 32 KB

// One block's work: a chunk of one tensor, for all tasks (grid y walks the tasks 4 at a time), so
// the base is read once per 4 tasks. Task t of the chunk feeds selection group group0 + t.
struct Chunk {
  const void* base;
  const void* const* ft;  // T pointers: task t's version of this tensor
  int64_t begin, end;     // element range inside the tensor
  int64_t position;       // flat position of element 0 of the tensor in the group's scope
  int32_t group0;
  int32_t dtype;          // the tensor's at::ScalarType
};

template <typename scalar_t>
__device__ __forceinline__ uint32_t key_of(const scalar_t* base, const void* ft, int64_t i) {
  const float mag = fabsf(to_float(static_cast<const scalar_t*>(ft)[i]) - to_float(base[i]));
  return __float_as_uint(mag);
}

// Histogram of digit (key >> shift) & (bins-1) over keys whose bits above shift+bits equal the
// group's prefix so far.
template <typename scalar_t>
__global__ void histogram_kernel(const Chunk* chunks, int32_t dtype, int T, const uint32_t* prefix,
                                 const int32_t* active, int shift, int bits, uint32_t* hist) {
  __shared__ uint32_t local[kTasksPerBlock][kMaxBins];
  const Chunk c = chunks[blockIdx.x];
  if (c.dtype != dtype) return;  // another launch's dtype (uniform across the block)
  const int t0 = blockIdx.y * kTasksPerBlock;
  const int tasks = min(kTasksPerBlock, T - t0);
  const int bins = 1 << bits;
  for (int b = threadIdx.x; b < kTasksPerBlock * kMaxBins; b += blockDim.x) (&local[0][0])[b] = 0;
  __syncthreads();
  const int high = shift + bits;
  uint32_t want[kTasksPerBlock];
  bool live[kTasksPerBlock];
#pragma unroll
  for (int j = 0; j < kTasksPerBlock; ++j) {
    live[j] = j < tasks && active[c.group0 + t0 + j];
    want[j] = live[j] ? prefix[c.group0 + t0 + j] : 0;
  }
  const scalar_t* base = static_cast<const scalar_t*>(c.base);
  const unsigned lane = threadIdx.x & 31;
  // Uniform trip count, so that whole warps take part in __match_any_sync.
  for (int64_t first = c.begin; first < c.end; first += blockDim.x) {
    const int64_t i = first + threadIdx.x;
    const bool in_range = i < c.end;
    const float w = in_range ? to_float(base[i]) : 0.0f;
#pragma unroll
    for (int j = 0; j < kTasksPerBlock; ++j) {
      if (!live[j]) continue;  // uniform across the block
      uint32_t bin = 0xFFFFFFFFu;
      if (in_range) {
        const uint32_t key = __float_as_uint(fabsf(to_float(static_cast<const scalar_t*>(c.ft[t0 + j])[i]) - w));
        if (high >= 32 || (key >> high) == want[j]) bin = (key >> shift) & (bins - 1);
      }
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, bin);
      if (bin != 0xFFFFFFFFu && lane == static_cast<unsigned>(__ffs(peers) - 1))
        atomicAdd(&local[j][bin], static_cast<uint32_t>(__popc(peers)));
    }
  }
  __syncthreads();
  for (int j = 0; j < tasks; ++j) {
    if (!live[j]) continue;
    uint32_t* out = hist + static_cast<int64_t>(c.group0 + t0 + j) * kMaxBins;
    for (int b = threadIdx.x; b < bins; b += blockDim.x)
      if (local[j][b]) atomicAdd(&out[b], local[j][b]);
  }
}

// Per group: walk the digit's bins from the top to the one holding the remaining k-th key.
__global__ void select_kernel(uint32_t* hist, uint32_t* prefix, int64_t* remaining,
                              const int32_t* active, int bits, uint32_t* ties, int groups) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups || !active[g]) return;
  uint32_t* h = hist + static_cast<int64_t>(g) * kMaxBins;
  int64_t need = remaining[g];
  int b = (1 << bits) - 1;
  for (; b > 0 && need > h[b]; --b) need -= h[b];
  prefix[g] = (prefix[g] << bits) | static_cast<uint32_t>(b);
  remaining[g] = need;
  ties[g] = h[b];
  for (int j = 0; j < (1 << bits); ++j) h[j] = 0;
}

// Exact-k ties: per (chunk, task), how many keys equal the group's threshold key.
template <typename scalar_t>
__global__ void tie_count_kernel(const Chunk* chunks, int32_t dtype, const uint32_t* key, const int32_t* exact,
                                 int64_t* counts) {
  __shared__ unsigned long long total;
  const Chunk c = chunks[blockIdx.x];
  const int g = c.group0 + blockIdx.y;
  if (!exact[g] || c.dtype != dtype) return;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  const scalar_t* base = static_cast<const scalar_t*>(c.base);
  unsigned long long mine = 0;
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x)
    mine += key_of<scalar_t>(base, c.ft[blockIdx.y], i) == key[g];
  atomicAdd(&total, mine);
  __syncthreads();
  if (threadIdx.x == 0) counts[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = static_cast<int64_t>(total);
}

// Per group (one thread): binary search of the inclusive prefix sums of tie counts (row t, the
// group's chunk range) for the chunk holding the need-th tie; leaves the chunk and the count left.
__global__ void tie_chunk_kernel(const int64_t* cum, int64_t num_chunks, const int64_t* first_chunk,
                                 const int32_t* exact, const int64_t* remaining, int64_t* chunk_of,
                                 int64_t* need_in_chunk, int groups, int T, bool per_tensor) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups || !exact[g]) return;
  const int t = per_tensor ? g % T : g;
  const int64_t* row = cum + static_cast<int64_t>(t) * num_chunks;
  int64_t lo = per_tensor ? first_chunk[g / T] : 0, hi = per_tensor ? first_chunk[g / T + 1] : num_chunks;
  const int64_t before = lo > 0 ? row[lo - 1] : 0;
  const int64_t need = remaining[g];
  while (lo < hi) {  // first chunk j with row[j] - before >= need
    const int64_t mid = (lo + hi) / 2;
    if (row[mid] - before >= need) hi = mid; else lo = mid + 1;
  }
  chunk_of[g] = lo;
  need_in_chunk[g] = need - ((lo > 0 ? row[lo - 1] : 0) - before);
}

// Per group (one block): the exact flat position of the need-th tie inside its chunk. Each thread
// takes a contiguous run of the chunk; a block scan of their tie counts finds the run to search.
template <typename scalar_t>
__global__ void tie_position_kernel(const Chunk* chunks, int32_t dtype, const uint32_t* key, const int32_t* exact,
                                    const int64_t* chunk_of, const int64_t* need_in_chunk, int64_t* tie_limit,
                                    int T, bool per_tensor) {
  __shared__ int64_t counts[kThreads];
  const int g = blockIdx.x;
  if (!exact[g]) return;
  const int t = per_tensor ? g % T : g;
  const Chunk c = chunks[chunk_of[g]];
  if (c.dtype != dtype) return;
  const scalar_t* base = static_cast<const scalar_t*>(c.base);
  const int64_t run = (c.end - c.begin + kThreads - 1) / kThreads;
  const int64_t lo = c.begin + threadIdx.x * run, hi = min(lo + run, c.end);
  int64_t mine = 0;
  for (int64_t i = lo; i < hi; ++i) mine += key_of<scalar_t>(base, c.ft[t], i) == key[g];
  counts[threadIdx.x] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t need = need_in_chunk[g];
    int owner = 0;
    for (; owner < kThreads && counts[owner] < need; ++owner) need -= counts[owner];
    counts[0] = owner;
    counts[1] = need;
  }
  __syncthreads();
  if (threadIdx.x != counts[0]) return;
  int64_t need = counts[1];
  for (int64_t i = lo; i < hi; ++i) {
    if (key_of<scalar_t>(base, c.ft[t], i) == key[g] && --need == 0) {
      tie_limit[g] = c.position + i + 1;
      return;
    }
  }
}

__global__ void finish_kernel(const uint32_t* prefix, const int64_t* k, float* threshold, int64_t* tie_limit,
                              int groups) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  if (k[g] <= 0) {
    threshold[g] = __int_as_float(0x7f800000);  // +inf: nothing kept
    tie_limit[g] = 0;
  } else {
    threshold[g] = __uint_as_float(prefix[g]);
    tie_limit[g] = INT64_MAX;
  }
}

std::tuple<at::Tensor, at::Tensor> magnitude_threshold_cuda(at::TensorList base, at::TensorList finetuned,
                                                            at::IntArrayRef k, bool keep_ties,
                                                            bool per_tensor) {
  const int64_t n = static_cast<int64_t>(base.size());
  const int64_t T = list_tasks("magnitude_threshold", base, finetuned);
  const int64_t groups = per_tensor ? n * T : T;
  TORCH_CHECK(static_cast<int64_t>(k.size()) == groups, "neurokern.magnitude_threshold: expected ", groups,
              " values of k, got ", k.size());
  const at::Device device = base[0].device();
  std::vector<at::ScalarType> dtypes;  // the storage dtypes present, in order of appearance
  for (int64_t i = 0; i < n; ++i) {
    const at::ScalarType dtype = base[i].scalar_type();
    dispatch_storage(dtype, "magnitude_threshold", [](auto) {});
    if (std::find(dtypes.begin(), dtypes.end(), dtype) == dtypes.end()) dtypes.push_back(dtype);
    for (int64_t t = 0; t < T; ++t) {
      const at::Tensor& f = finetuned[t * n + i];
      TORCH_CHECK(f.sizes() == base[i].sizes() && f.scalar_type() == dtype,
                  "neurokern.magnitude_threshold: finetuned[", t * n + i, "] (", f.sizes(), ", ", f.scalar_type(),
                  ") does not match base[", i, "] (", base[i].sizes(), ", ", base[i].scalar_type(), ")");
      TORCH_CHECK(f.device() == device && base[i].device() == device && f.is_contiguous() && base[i].is_contiguous(),
                  "neurokern.magnitude_threshold: tensors must be contiguous and on ", device);
    }
  }
  const c10::cuda::CUDAGuard guard(device);
  auto to_device = [&](const void* data, int64_t bytes) {
    at::Tensor host = at::empty({std::max<int64_t>(bytes, 1)}, at::kByte);
    if (bytes) std::memcpy(host.data_ptr(), data, bytes);
    return host.to(device);
  };
  // Pointer table: ptrs[i * T + t] = task t's version of tensor i.
  std::vector<const void*> ptrs(n * T);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t t = 0; t < T; ++t) ptrs[i * T + t] = finetuned[t * n + i].data_ptr();
  const at::Tensor ptr_table = to_device(ptrs.data(), static_cast<int64_t>(ptrs.size() * sizeof(void*)));
  const auto* ptr_dev = reinterpret_cast<const void* const*>(ptr_table.data_ptr());
  // Chunk table in flat order (tensor by tensor); first_chunk[i] is tensor i's first chunk.
  std::vector<Chunk> chunks;
  std::vector<int64_t> first_chunk(n + 1, 0), kk(groups), totals(groups, 0);
  int64_t position = 0;
  for (int64_t i = 0; i < n; ++i) {
    first_chunk[i] = static_cast<int64_t>(chunks.size());
    const int64_t numel = base[i].numel();
    for (int64_t b = 0; b < numel; b += kChunk)
      chunks.push_back({base[i].data_ptr(), ptr_dev + i * T, b, std::min(b + kChunk, numel),
                        per_tensor ? 0 : position, static_cast<int32_t>(per_tensor ? i * T : 0),
                        static_cast<int32_t>(base[i].scalar_type())});
    position += numel;
    if (per_tensor)
      for (int64_t t = 0; t < T; ++t) totals[i * T + t] = numel;
  }
  first_chunk[n] = static_cast<int64_t>(chunks.size());
  if (!per_tensor) std::fill(totals.begin(), totals.end(), position);
  std::vector<int32_t> active(groups);
  for (int64_t g = 0; g < groups; ++g) {
    kk[g] = std::min<int64_t>(k[g], totals[g]);
    active[g] = kk[g] > 0;
  }
  const auto opts = at::TensorOptions().device(device);
  const at::Tensor chunk_table = to_device(chunks.data(), static_cast<int64_t>(chunks.size() * sizeof(Chunk)));
  const at::Tensor active_d = to_device(active.data(), groups * sizeof(int32_t)).narrow(0, 0, groups * 4).view(at::kInt);
  const at::Tensor k_d = to_device(kk.data(), groups * sizeof(int64_t)).narrow(0, 0, groups * 8).view(at::kLong);
  at::Tensor remaining = k_d.clone();
  at::Tensor prefix = at::zeros({groups}, opts.dtype(at::kInt));
  at::Tensor ties = at::zeros({groups}, opts.dtype(at::kInt));
  at::Tensor hist = at::zeros({groups, kMaxBins}, opts.dtype(at::kInt));
  at::Tensor threshold = at::empty(per_tensor ? std::vector<int64_t>{n, T} : std::vector<int64_t>{T}, opts.dtype(at::kFloat));
  at::Tensor tie_limit = at::empty(threshold.sizes(), opts.dtype(at::kLong));
  const auto* chunk_ptr = reinterpret_cast<const Chunk*>(chunk_table.data_ptr());
  const auto* active_ptr = active_d.data_ptr<int32_t>();
  auto* prefix_ptr = reinterpret_cast<uint32_t*>(prefix.data_ptr());
  auto* hist_ptr = reinterpret_cast<uint32_t*>(hist.data_ptr());
  auto* ties_ptr = reinterpret_cast<uint32_t*>(ties.data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int num_chunks = static_cast<int>(chunks.size());
  const int group_blocks = static_cast<int>((groups + 127) / 128);
  const dim3 grid(num_chunks, static_cast<unsigned>((T + kTasksPerBlock - 1) / kTasksPerBlock));
  constexpr int kShift[3] = {20, 10, 0}, kBits[3] = {11, 10, 10};
  // Runs launch(scalar_t{}, dtype code) for every storage dtype of the list.
  auto for_each_dtype = [&](auto&& launch) {
    for (const at::ScalarType dtype : dtypes)
      dispatch_storage(dtype, "magnitude_threshold", [&](auto tag) { launch(tag, static_cast<int32_t>(dtype)); });
  };
  for (int pass = 0; pass < 3 && num_chunks > 0; ++pass) {
    for_each_dtype([&](auto tag, int32_t code) {
      using scalar_t = decltype(tag);
      histogram_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(chunk_ptr, code, static_cast<int>(T), prefix_ptr,
                                                                active_ptr, kShift[pass], kBits[pass], hist_ptr);
      NK_CUDA_CHECK_LAUNCH();
    });
    select_kernel<<<group_blocks, 128, 0, stream>>>(hist_ptr, prefix_ptr, remaining.data_ptr<int64_t>(),
                                                    active_ptr, kBits[pass], ties_ptr, static_cast<int>(groups));
    NK_CUDA_CHECK_LAUNCH();
  }
  finish_kernel<<<group_blocks, 128, 0, stream>>>(prefix_ptr, k_d.data_ptr<int64_t>(), threshold.data_ptr<float>(),
                                                  tie_limit.data_ptr<int64_t>(), static_cast<int>(groups));
  NK_CUDA_CHECK_LAUNCH();
  if (keep_ties || num_chunks == 0) return {threshold, tie_limit};
  // Groups that keep only part of their ties need the position of the last one kept.
  const at::Tensor exact = ((active_d != 0) & (remaining < ties.to(at::kLong))).to(at::kInt);
  if (!exact.any().item<bool>()) return {threshold, tie_limit};
  at::Tensor counts = at::zeros({T * num_chunks}, opts.dtype(at::kLong));
  const at::Tensor first_d = to_device(first_chunk.data(), (n + 1) * sizeof(int64_t)).narrow(0, 0, (n + 1) * 8).view(at::kLong);
  for_each_dtype([&](auto tag, int32_t code) {
    using scalar_t = decltype(tag);
    tie_count_kernel<scalar_t><<<dim3(num_chunks, static_cast<unsigned>(T)), kThreads, 0, stream>>>(
        chunk_ptr, code, prefix_ptr, exact.data_ptr<int32_t>(), counts.data_ptr<int64_t>());
    NK_CUDA_CHECK_LAUNCH();
  });
  const at::Tensor cum = counts.view({T, num_chunks}).cumsum(1);
  at::Tensor chunk_of = at::zeros({groups}, opts.dtype(at::kLong));
  at::Tensor need_in_chunk = at::zeros({groups}, opts.dtype(at::kLong));
  tie_chunk_kernel<<<group_blocks, 128, 0, stream>>>(
      cum.data_ptr<int64_t>(), num_chunks, first_d.data_ptr<int64_t>(), exact.data_ptr<int32_t>(),
      remaining.data_ptr<int64_t>(), chunk_of.data_ptr<int64_t>(), need_in_chunk.data_ptr<int64_t>(),
      static_cast<int>(groups), static_cast<int>(T), per_tensor);
  NK_CUDA_CHECK_LAUNCH();
  for_each_dtype([&](auto tag, int32_t code) {
    using scalar_t = decltype(tag);
    tie_position_kernel<scalar_t><<<static_cast<unsigned>(groups), kThreads, 0, stream>>>(
        chunk_ptr, code, prefix_ptr, exact.data_ptr<int32_t>(), chunk_of.data_ptr<int64_t>(),
        need_in_chunk.data_ptr<int64_t>(), tie_limit.data_ptr<int64_t>(), static_cast<int>(T), per_tensor);
    NK_CUDA_CHECK_LAUNCH();
  });
  return {threshold, tie_limit};
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CUDA, m) { m.impl("magnitude_threshold", &magnitude_threshold_cuda); }

}  // namespace neurokern::cuda
