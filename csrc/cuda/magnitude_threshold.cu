// Exact magnitude threshold on the GPU: radix select on the float32 bit pattern of |tau| (bit 31
// is 0 for magnitudes), for many selection groups at once (one per task over the whole list, or
// one per (tensor, task)). Each block reads a chunk of the base once for up to 4 tasks, 16 bytes
// per load. Three digits: bits 30..20 (11), 19..10 (10), 9..0 (10).
//  1. sample: an 11-bit histogram of every kSampleEvery-th chunk (warp-aggregated shared-memory
//     atomics: magnitudes crowd into few bins) gives each group a window of at most two top-digit
//     bins that holds its k-th key with overwhelming probability (ranks k_s +- 6 sigma + 16);
//  2. window pass over everything: counts keys above the window (registers) and a 2x10-bit
//     histogram of the keys inside it; if the k-th key is inside, the first 21 bits are exact;
//     groups whose window missed (one host sync tells) redo digits 1 and 2 over all keys;
//  3. the last digit over the keys under the 21-bit prefix.
// So a select reads the weights twice, plus a sample. Tensors of different storage dtypes may
// share a scope: each kernel is launched once per dtype present and its blocks skip the chunks of
// other dtypes. With exact-k ties, one more pass finds the flat position of the last tie to keep
// (one host sync to know it is needed).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cuda/common.cuh"
#include "list_args.h"

namespace neurokern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;   // elements per block
constexpr int kTopBins = 2048;      // first digit: 11 bits
constexpr int kLowBins = 1024;      // later digits: 10 bits
constexpr int kTasksPerBlock = 4;   // shared histograms of up to 4 tasks: 32 KB
constexpr int kSampleEvery = 32;    // chunk j of a tensor is in the sample when j % 32 == 0

enum Mode { kDense, kPrefix, kWindow };

// One block's work: a chunk of one tensor, for all tasks (grid y walks the tasks 4 at a time), so
// the base is read once per 4 tasks. Task t of the chunk feeds selection group group0 + t.
struct Chunk {
  const void* base;
  const void* const* ft;  // T pointers: task t's version of this tensor
  int64_t begin, end;     // element range inside the tensor
  int64_t position;       // flat position of element 0 of the tensor in the group's scope
  int32_t group0;
  int16_t dtype;          // the tensor's at::ScalarType
  int16_t aligned;        // every pointer of the tensor is 16-byte aligned: vector loads
};

template <typename scalar_t>
__device__ __forceinline__ uint32_t key_of(const scalar_t* base, const void* ft, int64_t i) {
  const float mag = fabsf(to_float(static_cast<const scalar_t*>(ft)[i]) - to_float(base[i]));
  return __float_as_uint(mag);
}

template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

// vals[v] = float(p[v]) for one 16-byte load.
template <typename scalar_t>
__device__ __forceinline__ void load_vec(const scalar_t* p, float (&vals)[kVec<scalar_t>]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const scalar_t* x = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
  for (int v = 0; v < kVec<scalar_t>; ++v) vals[v] = to_float(x[v]);
}

// Walks a chunk's elements: visit(j, key) for every live task slot j of the block and every
// element, with whole warps in step (the dense pass's __match_any_sync needs them); keys of
// elements past the end are 0xFFFFFFFF (visit must ignore them).
template <typename scalar_t, typename Visit>
__device__ __forceinline__ void for_each_key(const Chunk& c, int t0, const bool (&live)[kTasksPerBlock],
                                             Visit&& visit) {
  constexpr int V = kVec<scalar_t>;
  const scalar_t* base = static_cast<const scalar_t*>(c.base);
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  const int64_t vec_end = c.begin + (c.aligned ? (c.end - c.begin) / step * step : 0);
  for (int64_t i = c.begin + threadIdx.x * V; i < vec_end; i += step) {
    float w[V], f[kTasksPerBlock][V];
    load_vec<scalar_t>(base + i, w);
#pragma unroll
    for (int j = 0; j < kTasksPerBlock; ++j)
      if (live[j]) load_vec<scalar_t>(static_cast<const scalar_t*>(c.ft[t0 + j]) + i, f[j]);
#pragma unroll
    for (int j = 0; j < kTasksPerBlock; ++j) {
      if (!live[j]) continue;  // uniform across the block
#pragma unroll
      for (int v = 0; v < V; ++v) visit(j, __float_as_uint(fabsf(f[j][v] - w[v])));
    }
  }
  for (int64_t first = vec_end; first < c.end; first += blockDim.x) {  // the rest, one element a thread
    const int64_t i = first + threadIdx.x;
    const bool in_range = i < c.end;
    const float w = in_range ? to_float(base[i]) : 0.0f;
#pragma unroll
    for (int j = 0; j < kTasksPerBlock; ++j) {
      if (!live[j]) continue;
      visit(j, in_range ? __float_as_uint(fabsf(to_float(static_cast<const scalar_t*>(c.ft[t0 + j])[i]) - w))
                        : 0xFFFFFFFFu);
    }
  }
}

// Per block and task slot: a shared histogram of BINS bins fed by the chunk's keys.
//  kDense:  digit (key >> shift) of every key; warp-aggregated atomics.
//  kPrefix: digit (key >> shift) & 1023 of the keys whose bits above shift + 10 equal the prefix.
//  kWindow: keys whose top digit (key >> 20) lies in [lo, hi] count in bin (top - lo) * 1024 +
//           ((key >> 10) & 1023); keys above hi only add to above[group].
template <typename scalar_t, int BINS, Mode MODE>
__global__ void __launch_bounds__(kThreads) histogram_kernel(const Chunk* chunks, int32_t dtype, int T,
                                                             const uint32_t* prefix, const uint32_t* window_lo,
                                                             const uint32_t* window_hi, const int32_t* running,
                                                             int shift, uint32_t* hist,
                                                             unsigned long long* above) {
  __shared__ uint32_t count[kTasksPerBlock][BINS];
  __shared__ unsigned int above_block[kTasksPerBlock];
  const Chunk c = chunks[blockIdx.x];
  if (c.dtype != dtype) return;  // another launch's dtype (uniform across the block)
  const int t0 = blockIdx.y * kTasksPerBlock;
  const int tasks = min(kTasksPerBlock, T - t0);
  bool live[kTasksPerBlock], any = false;
  uint32_t want[kTasksPerBlock], lo[kTasksPerBlock], hi[kTasksPerBlock];
  unsigned int above_mine[kTasksPerBlock];
#pragma unroll
  for (int j = 0; j < kTasksPerBlock; ++j) {
    const int g = c.group0 + t0 + j;
    live[j] = j < tasks && running[g];
    want[j] = live[j] && MODE == kPrefix ? prefix[g] : 0;
    lo[j] = live[j] && MODE == kWindow ? window_lo[g] : 0;
    hi[j] = live[j] && MODE == kWindow ? window_hi[g] : 0;
    above_mine[j] = 0;
    any |= live[j];
  }
  if (!any) return;  // no group of the block still selects: nothing to read
  for (int b = threadIdx.x; b < kTasksPerBlock * BINS; b += blockDim.x) (&count[0][0])[b] = 0;
  if (threadIdx.x < kTasksPerBlock) above_block[threadIdx.x] = 0;
  __syncthreads();
  const unsigned lane = threadIdx.x & 31;
  for_each_key<scalar_t>(c, t0, live, [&](int j, uint32_t key) {
    if (MODE == kDense) {
      const uint32_t bin = key == 0xFFFFFFFFu ? key : (key >> shift) & (BINS - 1);
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, bin);
      if (bin != 0xFFFFFFFFu && lane == static_cast<unsigned>(__ffs(peers) - 1))
        atomicAdd(&count[j][bin], static_cast<uint32_t>(__popc(peers)));
    } else if (key != 0xFFFFFFFFu) {
      if (MODE == kPrefix) {
        if ((key >> (shift + 10)) == want[j]) atomicAdd(&count[j][(key >> shift) & (kLowBins - 1)], 1u);
      } else {
        const uint32_t top = key >> 20;
        if (top > hi[j]) ++above_mine[j];
        else if (top >= lo[j]) atomicAdd(&count[j][(top - lo[j]) * kLowBins + ((key >> 10) & (kLowBins - 1))], 1u);
      }
    }
  });
  if (MODE == kWindow) {
#pragma unroll
    for (int j = 0; j < kTasksPerBlock; ++j) {
      if (!live[j]) continue;
      unsigned int v = above_mine[j];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
      if (lane == 0 && v) atomicAdd(&above_block[j], v);
    }
  }
  __syncthreads();
  for (int j = 0; j < tasks; ++j) {
    if (!live[j]) continue;
    const int64_t g = c.group0 + t0 + j;
    for (int b = threadIdx.x; b < BINS; b += blockDim.x)
      if (count[j][b]) atomicAdd(&hist[g * kTopBins + b], count[j][b]);
    if (MODE == kWindow && threadIdx.x == 0 && above_block[j]) atomicAdd(&above[g], above_block[j]);
  }
}

// The select kernels: one warp per group, kGroupsPerBlock groups in a block of 32 * kGroupsPerBlock.
constexpr int kGroupsPerBlock = 4;

struct Found {
  int bin;        // the bin, counting from the top, where the cumulative count reaches rank
  int64_t need;   // rank minus the counts of the bins above it
  int64_t total;  // all counts of the histogram
};

// The bin of rank (>= 1; bin 0 when rank exceeds the total) in h[0..bins), bins a multiple of 32,
// largest keys in the top bin. Lane l owns bins [bins - (l+1) * per, bins - l * per).
__device__ Found warp_find(const uint32_t* h, int bins, int64_t rank) {
  const unsigned full = 0xFFFFFFFFu;
  const int lane = threadIdx.x & 31, per = bins / 32, top = bins - lane * per;
  int64_t mine = 0;
  for (int b = top - per; b < top; ++b) mine += h[b];
  int64_t incl = mine;
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t v = __shfl_up_sync(full, incl, o);
    if (lane >= o) incl += v;
  }
  const unsigned reached = __ballot_sync(full, incl >= rank);
  const int owner = reached ? __ffs(reached) - 1 : 31;
  int64_t need = rank - (incl - mine);
  int bin = top - 1;
  if (lane == owner)
    for (; bin > top - per && need > h[bin]; --bin) need -= h[bin];
  return {__shfl_sync(full, bin, owner), __shfl_sync(full, need, owner), __shfl_sync(full, incl, 31)};
}

__device__ void warp_clear(uint32_t* h, int bins) {
  __syncwarp();
  for (int b = threadIdx.x & 31; b < bins; b += 32) h[b] = 0;
}

__device__ __forceinline__ int warp_group() { return blockIdx.x * kGroupsPerBlock + threadIdx.x / 32; }
__device__ __forceinline__ bool leader() { return (threadIdx.x & 31) == 0; }

// Per group, from the sample's histogram: the window [lo, hi] of top-digit bins between the bins
// of ranks rank_hi <= rank_lo (counted from the largest). Wider than two bins: the group redoes
// the full digits (failed = 1).
__global__ void window_kernel(uint32_t* hist, const int64_t* rank_hi, const int64_t* rank_lo, const int32_t* running,
                              uint32_t* window_lo, uint32_t* window_hi, int32_t* failed, int groups) {
  const int g = warp_group();
  if (g >= groups || !running[g]) return;
  uint32_t* h = hist + static_cast<int64_t>(g) * kTopBins;
  const int hi = warp_find(h, kTopBins, rank_hi[g]).bin, lo = warp_find(h, kTopBins, rank_lo[g]).bin;
  if (leader()) {
    window_hi[g] = hi;
    window_lo[g] = hi - lo <= 1 ? lo : hi;
    failed[g] = hi - lo > 1;
  }
  warp_clear(h, kTopBins);
}

// Per group, after the window pass: the 21-bit prefix of the k-th key when it lies in the window
// (need = k - above in 1..in-window count), else failed = 1.
__global__ void window_select_kernel(uint32_t* hist, const unsigned long long* above, const int64_t* k,
                                     const int32_t* running, const uint32_t* window_lo, const uint32_t* window_hi,
                                     uint32_t* prefix, int64_t* remaining, uint32_t* ties, int32_t* failed,
                                     int groups) {
  const int g = warp_group();
  if (g >= groups || !running[g]) return;
  uint32_t* h = hist + static_cast<int64_t>(g) * kTopBins;
  const int bins = static_cast<int>(window_hi[g] - window_lo[g] + 1) * kLowBins;
  const int64_t need = k[g] - static_cast<int64_t>(above[g]);
  const Found f = warp_find(h, bins, need < 1 ? 1 : need);
  if (leader()) {
    if (need < 1 || need > f.total) {
      failed[g] = 1;
    } else {
      prefix[g] = ((window_lo[g] + f.bin / kLowBins) << 10) | static_cast<uint32_t>(f.bin % kLowBins);
      remaining[g] = f.need;
      ties[g] = h[f.bin];
    }
  }
  warp_clear(h, bins);
}

// Per group: the digit's bin holding the remaining k-th key, appended to the prefix.
__global__ void select_kernel(uint32_t* hist, uint32_t* prefix, int64_t* remaining, const int32_t* running,
                              int bits, uint32_t* ties, int groups) {
  const int g = warp_group();
  if (g >= groups || !running[g]) return;
  uint32_t* h = hist + static_cast<int64_t>(g) * kTopBins;
  const Found f = warp_find(h, 1 << bits, remaining[g]);
  if (leader()) {
    prefix[g] = (prefix[g] << bits) | static_cast<uint32_t>(f.bin);
    remaining[g] = f.need;
    ties[g] = h[f.bin];
  }
  warp_clear(h, 1 << bits);
}

// Exact-k ties: per (chunk, task), how many keys equal the group's threshold key.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) tie_count_kernel(const Chunk* chunks, int32_t dtype, int T,
                                                             const uint32_t* key, const int32_t* exact,
                                                             int64_t* counts) {
  __shared__ unsigned int total[kTasksPerBlock];
  const Chunk c = chunks[blockIdx.x];
  if (c.dtype != dtype) return;
  const int t0 = blockIdx.y * kTasksPerBlock;
  const int tasks = min(kTasksPerBlock, T - t0);
  bool live[kTasksPerBlock], any = false;
  uint32_t want[kTasksPerBlock];
  unsigned int mine[kTasksPerBlock];
#pragma unroll
  for (int j = 0; j < kTasksPerBlock; ++j) {
    live[j] = j < tasks && exact[c.group0 + t0 + j];
    want[j] = live[j] ? key[c.group0 + t0 + j] : 0;
    mine[j] = 0;
    any |= live[j];
  }
  if (!any) return;
  if (threadIdx.x < kTasksPerBlock) total[threadIdx.x] = 0;
  __syncthreads();
  for_each_key<scalar_t>(c, t0, live, [&](int j, uint32_t k) { mine[j] += k == want[j]; });
#pragma unroll
  for (int j = 0; j < kTasksPerBlock; ++j) {
    if (!live[j]) continue;
    unsigned int v = mine[j];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
    if ((threadIdx.x & 31) == 0 && v) atomicAdd(&total[j], v);
  }
  __syncthreads();
  if (threadIdx.x < tasks && live[threadIdx.x])
    counts[static_cast<int64_t>(t0 + threadIdx.x) * gridDim.x + blockIdx.x] = static_cast<int64_t>(total[threadIdx.x]);
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
  std::vector<Chunk> chunks, sample;  // sample: every kSampleEvery-th chunk of each tensor
  std::vector<int64_t> first_chunk(n + 1, 0), kk(groups), totals(groups, 0), sampled(groups, 0);
  int64_t position = 0, sampled_all = 0;
  for (int64_t i = 0; i < n; ++i) {
    first_chunk[i] = static_cast<int64_t>(chunks.size());
    const int64_t numel = base[i].numel();
    bool aligned = reinterpret_cast<uintptr_t>(base[i].data_ptr()) % 16 == 0;
    for (int64_t t = 0; t < T; ++t) aligned &= reinterpret_cast<uintptr_t>(ptrs[i * T + t]) % 16 == 0;
    int64_t in_sample = 0;
    for (int64_t b = 0, j = 0; b < numel; b += kChunk, ++j) {
      chunks.push_back({base[i].data_ptr(), ptr_dev + i * T, b, std::min(b + kChunk, numel),
                        per_tensor ? 0 : position, static_cast<int32_t>(per_tensor ? i * T : 0),
                        static_cast<int16_t>(base[i].scalar_type()), static_cast<int16_t>(aligned)});
      if (j % kSampleEvery == 0) {
        sample.push_back(chunks.back());
        in_sample += chunks.back().end - b;
      }
    }
    position += numel;
    sampled_all += in_sample;
    if (per_tensor)
      for (int64_t t = 0; t < T; ++t) {
        totals[i * T + t] = numel;
        sampled[i * T + t] = in_sample;
      }
  }
  first_chunk[n] = static_cast<int64_t>(chunks.size());
  if (!per_tensor) {
    std::fill(totals.begin(), totals.end(), position);
    std::fill(sampled.begin(), sampled.end(), sampled_all);
  }
  // Sample ranks bracketing each group's k-th key: k_s +- (6 sigma + 16), exact when all is sampled.
  std::vector<int32_t> active(groups);
  std::vector<int64_t> rank_hi(groups, 1), rank_lo(groups, 1);
  for (int64_t g = 0; g < groups; ++g) {
    kk[g] = std::min<int64_t>(k[g], totals[g]);
    active[g] = kk[g] > 0;
    if (!active[g]) continue;
    if (sampled[g] == totals[g]) {
      rank_hi[g] = rank_lo[g] = kk[g];
      continue;
    }
    const double ks = static_cast<double>(kk[g]) * static_cast<double>(sampled[g]) / static_cast<double>(totals[g]);
    const double margin = 6.0 * std::sqrt(ks * std::max(0.0, 1.0 - ks / static_cast<double>(sampled[g]))) + 16.0;
    rank_hi[g] = std::max<int64_t>(1, static_cast<int64_t>(std::floor(ks - margin)));
    rank_lo[g] = std::min<int64_t>(sampled[g], std::max<int64_t>(1, static_cast<int64_t>(std::ceil(ks + margin))));
  }
  const auto opts = at::TensorOptions().device(device);
  auto ints = [&](const auto& v) {  // a host vector of int32 / int64 as a device tensor
    using T_ = typename std::decay_t<decltype(v)>::value_type;
    const int64_t len = static_cast<int64_t>(v.size());
    return to_device(v.data(), len * static_cast<int64_t>(sizeof(T_)))
        .narrow(0, 0, len * static_cast<int64_t>(sizeof(T_)))
        .view(sizeof(T_) == 4 ? at::kInt : at::kLong);
  };
  const at::Tensor chunk_table = to_device(chunks.data(), static_cast<int64_t>(chunks.size() * sizeof(Chunk)));
  const at::Tensor sample_table = to_device(sample.data(), static_cast<int64_t>(sample.size() * sizeof(Chunk)));
  const at::Tensor active_d = ints(active), k_d = ints(kk), rank_hi_d = ints(rank_hi), rank_lo_d = ints(rank_lo);
  at::Tensor remaining = k_d.clone();
  at::Tensor prefix = at::zeros({groups}, opts.dtype(at::kInt));
  at::Tensor ties = at::zeros({groups}, opts.dtype(at::kInt));
  at::Tensor hist = at::zeros({groups, kTopBins}, opts.dtype(at::kInt));
  at::Tensor window = at::zeros({2, groups}, opts.dtype(at::kInt));
  at::Tensor above = at::zeros({groups}, opts.dtype(at::kLong));
  at::Tensor failed = at::zeros({groups}, opts.dtype(at::kInt));
  at::Tensor threshold = at::empty(per_tensor ? std::vector<int64_t>{n, T} : std::vector<int64_t>{T}, opts.dtype(at::kFloat));
  at::Tensor tie_limit = at::empty(threshold.sizes(), opts.dtype(at::kLong));
  const auto* chunk_ptr = reinterpret_cast<const Chunk*>(chunk_table.data_ptr());
  const auto* sample_ptr = reinterpret_cast<const Chunk*>(sample_table.data_ptr());
  auto* prefix_ptr = reinterpret_cast<uint32_t*>(prefix.data_ptr());
  auto* hist_ptr = reinterpret_cast<uint32_t*>(hist.data_ptr());
  auto* ties_ptr = reinterpret_cast<uint32_t*>(ties.data_ptr());
  auto* lo_ptr = reinterpret_cast<uint32_t*>(window[0].data_ptr());
  auto* hi_ptr = reinterpret_cast<uint32_t*>(window[1].data_ptr());
  auto* above_ptr = reinterpret_cast<unsigned long long*>(above.data_ptr());
  auto* failed_ptr = failed.data_ptr<int32_t>();
  int64_t* remaining_ptr = remaining.data_ptr<int64_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int num_chunks = static_cast<int>(chunks.size());
  const int group_blocks = static_cast<int>((groups + 127) / 128);
  const int warp_blocks = static_cast<int>((groups + kGroupsPerBlock - 1) / kGroupsPerBlock);
  const unsigned task_blocks = static_cast<unsigned>((T + kTasksPerBlock - 1) / kTasksPerBlock);
  const dim3 grid(num_chunks, task_blocks);
  // Runs launch(scalar_t{}, dtype code) for every storage dtype of the list.
  auto for_each_dtype = [&](auto&& launch) {
    for (const at::ScalarType dtype : dtypes)
      dispatch_storage(dtype, "magnitude_threshold", [&](auto tag) { launch(tag, static_cast<int32_t>(dtype)); });
  };
  // One histogram pass of the given mode over the chunk table, for the groups with running[g].
  auto pass = [&](auto mode, const Chunk* table, dim3 blocks, const int32_t* running, int shift) {
    constexpr Mode M = decltype(mode)::value;
    for_each_dtype([&](auto tag, int32_t code) {
      using scalar_t = decltype(tag);
      histogram_kernel<scalar_t, M == kPrefix ? kLowBins : kTopBins, M><<<blocks, kThreads, 0, stream>>>(
          table, code, static_cast<int>(T), prefix_ptr, lo_ptr, hi_ptr, running, shift, hist_ptr, above_ptr);
      NK_CUDA_CHECK_LAUNCH();
    });
  };
  using Dense = std::integral_constant<Mode, kDense>;
  using Prefix = std::integral_constant<Mode, kPrefix>;
  using Window = std::integral_constant<Mode, kWindow>;
  const int32_t* active_ptr = active_d.data_ptr<int32_t>();
  if (num_chunks > 0) {
    pass(Dense{}, sample_ptr, dim3(static_cast<unsigned>(sample.size()), task_blocks), active_ptr, 20);
    window_kernel<<<warp_blocks, 32 * kGroupsPerBlock, 0, stream>>>(hist_ptr, rank_hi_d.data_ptr<int64_t>(), rank_lo_d.data_ptr<int64_t>(),
                                                    active_ptr, lo_ptr, hi_ptr, failed_ptr, static_cast<int>(groups));
    NK_CUDA_CHECK_LAUNCH();
    const at::Tensor windowed = active_d * (1 - failed);  // groups that take the window pass
    pass(Window{}, chunk_ptr, grid, windowed.data_ptr<int32_t>(), 20);
    window_select_kernel<<<warp_blocks, 32 * kGroupsPerBlock, 0, stream>>>(hist_ptr, above_ptr, k_d.data_ptr<int64_t>(),
                                                           windowed.data_ptr<int32_t>(), lo_ptr, hi_ptr, prefix_ptr,
                                                           remaining_ptr, ties_ptr, failed_ptr, static_cast<int>(groups));
    NK_CUDA_CHECK_LAUNCH();
    const at::Tensor redo = active_d * failed;
    if (redo.any().item<bool>()) {  // the digits 1 and 2 over every key, for the groups that missed
      const int32_t* redo_ptr = redo.data_ptr<int32_t>();
      prefix.mul_(1 - redo);
      remaining.copy_(at::where(redo != 0, k_d, remaining));
      pass(Dense{}, chunk_ptr, grid, redo_ptr, 20);
      select_kernel<<<warp_blocks, 32 * kGroupsPerBlock, 0, stream>>>(hist_ptr, prefix_ptr, remaining_ptr, redo_ptr, 11, ties_ptr,
                                                      static_cast<int>(groups));
      NK_CUDA_CHECK_LAUNCH();
      pass(Prefix{}, chunk_ptr, grid, redo_ptr, 10);
      select_kernel<<<warp_blocks, 32 * kGroupsPerBlock, 0, stream>>>(hist_ptr, prefix_ptr, remaining_ptr, redo_ptr, 10, ties_ptr,
                                                      static_cast<int>(groups));
      NK_CUDA_CHECK_LAUNCH();
    }
    pass(Prefix{}, chunk_ptr, grid, active_ptr, 0);
    select_kernel<<<warp_blocks, 32 * kGroupsPerBlock, 0, stream>>>(hist_ptr, prefix_ptr, remaining_ptr, active_ptr, 10, ties_ptr,
                                                    static_cast<int>(groups));
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
    tie_count_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(chunk_ptr, code, static_cast<int>(T), prefix_ptr,
                                                              exact.data_ptr<int32_t>(), counts.data_ptr<int64_t>());
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
