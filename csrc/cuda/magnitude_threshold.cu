// Exact magnitude threshold on the GPU: radix select on the float32 bit pattern of |tau| in three
// digit passes (11, 11, 10 bits) with shared-memory histograms, for many selection groups at once
// (one per task over the whole list, or one per (tensor, task)). Every group's state stays on the
// device; with exact-k ties, one more pass finds the flat position of the last tie to keep.
#include <torch/library.h>

#include <limits>
#include <vector>

#include "cuda/common.cuh"

namespace neurokern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per block
constexpr int kMaxBins = 2048;

// One block's work: a chunk of one (base, fine-tuned) pair, feeding one selection group.
struct Chunk {
  const void* base;
  const void* ft;
  int64_t begin, end;  // element range inside the tensor
  int64_t position;    // flat position of element 0 of the tensor in the group's scope
  int32_t group;
};

template <typename scalar_t>
__device__ __forceinline__ uint32_t key_of(const Chunk& c, int64_t i) {
  const float mag = fabsf(to_float(static_cast<const scalar_t*>(c.ft)[i]) -
                          to_float(static_cast<const scalar_t*>(c.base)[i]));
  return __float_as_uint(mag);
}

// Histogram of digit (key >> shift) & (bins-1) over keys whose bits above shift+bits equal the
// group's prefix so far.
template <typename scalar_t>
__global__ void histogram_kernel(const Chunk* chunks, const uint32_t* prefix, const int32_t* active,
                                 int shift, int bits, uint32_t* hist) {
  __shared__ uint32_t local[kMaxBins];
  const Chunk c = chunks[blockIdx.x];
  if (!active[c.group]) return;
  const int bins = 1 << bits;
  for (int b = threadIdx.x; b < bins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const int high = shift + bits;
  const uint32_t want = prefix[c.group];
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) {
    const uint32_t key = key_of<scalar_t>(c, i);
    if (high >= 32 || (key >> high) == want) atomicAdd(&local[(key >> shift) & (bins - 1)], 1u);
  }
  __syncthreads();
  uint32_t* out = hist + static_cast<int64_t>(c.group) * kMaxBins;
  for (int b = threadIdx.x; b < bins; b += blockDim.x)
    if (local[b]) atomicAdd(&out[b], local[b]);
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

// Exact-k ties: per chunk, how many keys equal the group's threshold key.
template <typename scalar_t>
__global__ void tie_count_kernel(const Chunk* chunks, const uint32_t* key, const int32_t* exact,
                                 int64_t* counts) {
  __shared__ int64_t total;
  const Chunk c = chunks[blockIdx.x];
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  if (!exact[c.group]) return;
  int64_t mine = 0;
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) mine += key_of<scalar_t>(c, i) == key[c.group];
  atomicAdd(reinterpret_cast<unsigned long long*>(&total), static_cast<unsigned long long>(mine));
  __syncthreads();
  if (threadIdx.x == 0) counts[blockIdx.x] = total;
}

// Per group (one thread): the chunk holding the need-th tie in flat order, then the exact position.
template <typename scalar_t>
__global__ void tie_find_kernel(const Chunk* chunks, const int64_t* first_chunk, const int64_t* counts,
                                const uint32_t* key, const int32_t* exact, const int64_t* remaining,
                                int64_t* tie_limit, int groups) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups || !exact[g]) return;
  int64_t need = remaining[g];
  for (int64_t j = first_chunk[g]; j < first_chunk[g + 1]; ++j) {
    if (counts[j] < need) {
      need -= counts[j];
      continue;
    }
    const Chunk c = chunks[j];
    for (int64_t i = c.begin; i < c.end; ++i) {
      if (key_of<scalar_t>(c, i) == key[g] && --need == 0) {
        tie_limit[g] = c.position + i + 1;
        return;
      }
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
  TORCH_CHECK(n > 0, "neurokern.magnitude_threshold: base is an empty list");
  TORCH_CHECK(finetuned.size() % n == 0, "neurokern.magnitude_threshold: ", finetuned.size(),
              " fine-tuned tensors is not a multiple of ", n, " base tensors");
  const int64_t T = static_cast<int64_t>(finetuned.size()) / n;
  const int64_t groups = per_tensor ? n * T : T;
  TORCH_CHECK(static_cast<int64_t>(k.size()) == groups, "neurokern.magnitude_threshold: expected ", groups,
              " values of k, got ", k.size());
  const at::ScalarType dtype = base[0].scalar_type();
  const at::Device device = base[0].device();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t t = 0; t < T; ++t) {
      const at::Tensor& f = finetuned[t * n + i];
      TORCH_CHECK(f.sizes() == base[i].sizes() && f.scalar_type() == dtype && base[i].scalar_type() == dtype,
                  "neurokern.magnitude_threshold: finetuned[", t * n + i, "] (", f.sizes(), ", ", f.scalar_type(),
                  ") does not match base[", i, "] (", base[i].sizes(), ", ", base[i].scalar_type(), ")");
      TORCH_CHECK(f.device() == device && base[i].device() == device && f.is_contiguous() && base[i].is_contiguous(),
                  "neurokern.magnitude_threshold: tensors must be contiguous and on ", device);
    }
  }
  const c10::cuda::CUDAGuard guard(device);
  // Chunk table, group-major and in flat order inside each group; totals clamp k.
  std::vector<Chunk> chunks;
  std::vector<int64_t> first_chunk(groups + 1, 0), kk(groups), totals(groups, 0);
  for (int64_t g = 0; g < groups; ++g) {
    first_chunk[g] = static_cast<int64_t>(chunks.size());
    const int64_t t = per_tensor ? g % T : g;
    const int64_t i0 = per_tensor ? g / T : 0, i1 = per_tensor ? i0 + 1 : n;
    int64_t position = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t numel = base[i].numel();
      for (int64_t b = 0; b < numel; b += kChunk)
        chunks.push_back({base[i].data_ptr(), finetuned[t * n + i].data_ptr(), b, std::min(b + kChunk, numel),
                          position, static_cast<int32_t>(g)});
      position += numel;
    }
    totals[g] = position;
    kk[g] = std::min<int64_t>(k[g], position);
  }
  first_chunk[groups] = static_cast<int64_t>(chunks.size());
  const auto opts = at::TensorOptions().device(device);
  std::vector<int32_t> active(groups);
  for (int64_t g = 0; g < groups; ++g) active[g] = kk[g] > 0;
  auto to_device = [&](const void* data, int64_t bytes) {
    at::Tensor host = at::empty({bytes}, at::kByte);
    std::memcpy(host.data_ptr(), data, bytes);
    return host.to(device, /*non_blocking=*/false);
  };
  const at::Tensor chunk_table = to_device(chunks.data(), static_cast<int64_t>(chunks.size() * sizeof(Chunk)));
  const at::Tensor active_d = to_device(active.data(), groups * sizeof(int32_t));
  const at::Tensor k_d = to_device(kk.data(), groups * sizeof(int64_t)).view(at::kLong);
  at::Tensor remaining = k_d.clone();
  at::Tensor prefix = at::zeros({groups}, opts.dtype(at::kInt));
  at::Tensor ties = at::zeros({groups}, opts.dtype(at::kInt));
  at::Tensor hist = at::zeros({groups, kMaxBins}, opts.dtype(at::kInt));
  at::Tensor threshold = at::empty(per_tensor ? std::vector<int64_t>{n, T} : std::vector<int64_t>{T}, opts.dtype(at::kFloat));
  at::Tensor tie_limit = at::empty(threshold.sizes(), opts.dtype(at::kLong));
  const auto* chunk_ptr = reinterpret_cast<const Chunk*>(chunk_table.data_ptr());
  const auto* active_ptr = reinterpret_cast<const int32_t*>(active_d.data_ptr());
  auto* prefix_ptr = reinterpret_cast<uint32_t*>(prefix.data_ptr());
  auto* hist_ptr = reinterpret_cast<uint32_t*>(hist.data_ptr());
  auto* ties_ptr = reinterpret_cast<uint32_t*>(ties.data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int num_chunks = static_cast<int>(chunks.size());
  const int group_blocks = static_cast<int>((groups + 127) / 128);
  constexpr int kShift[3] = {21, 10, 0}, kBits[3] = {11, 11, 10};
  dispatch_storage(dtype, "magnitude_threshold", [&](auto tag) {
    using scalar_t = decltype(tag);
    for (int pass = 0; pass < 3 && num_chunks > 0; ++pass) {
      histogram_kernel<scalar_t><<<num_chunks, kThreads, 0, stream>>>(chunk_ptr, prefix_ptr, active_ptr,
                                                                      kShift[pass], kBits[pass], hist_ptr);
      NK_CUDA_CHECK_LAUNCH();
      select_kernel<<<group_blocks, 128, 0, stream>>>(hist_ptr, prefix_ptr, remaining.data_ptr<int64_t>(),
                                                      active_ptr, kBits[pass], ties_ptr, static_cast<int>(groups));
      NK_CUDA_CHECK_LAUNCH();
    }
    finish_kernel<<<group_blocks, 128, 0, stream>>>(prefix_ptr, k_d.data_ptr<int64_t>(), threshold.data_ptr<float>(),
                                                    tie_limit.data_ptr<int64_t>(), static_cast<int>(groups));
    NK_CUDA_CHECK_LAUNCH();
    if (keep_ties || num_chunks == 0) return;
    // Groups that keep only part of their ties need the position of the last one kept.
    const at::Tensor exact = (active_d.view(at::kInt) != 0) & (remaining < ties.to(at::kLong));
    if (!exact.any().item<bool>()) return;
    const at::Tensor exact_i = exact.to(at::kInt);
    at::Tensor counts = at::zeros({num_chunks}, opts.dtype(at::kLong));
    const at::Tensor first_d = to_device(first_chunk.data(), (groups + 1) * sizeof(int64_t)).view(at::kLong);
    tie_count_kernel<scalar_t><<<num_chunks, kThreads, 0, stream>>>(chunk_ptr, prefix_ptr, exact_i.data_ptr<int32_t>(),
                                                                    counts.data_ptr<int64_t>());
    NK_CUDA_CHECK_LAUNCH();
    tie_find_kernel<scalar_t><<<group_blocks, 128, 0, stream>>>(
        chunk_ptr, first_d.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), prefix_ptr, exact_i.data_ptr<int32_t>(),
        remaining.data_ptr<int64_t>(), tie_limit.data_ptr<int64_t>(), static_cast<int>(groups));
    NK_CUDA_CHECK_LAUNCH();
  });
  return {threshold, tie_limit};
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CUDA, m) { m.impl("magnitude_threshold", &magnitude_threshold_cuda); }

}  // namespace neurokern::cuda
