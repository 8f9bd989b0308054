// Exact magnitude threshold on the GPU: select on the float32 bit pattern of |tau| (bit 31 is 0
// for magnitudes), for many selection groups at once (one per task over the whole list, or one per
// (tensor, task)). Each block reads a chunk of the base once for up to 4 tasks, 16 bytes per load.
//  1. sample (every kSampleEvery-th chunk): an 11-bit histogram of the top digit (bits 30..20,
//     warp-aggregated shared atomics) gives each group a window of at most two top bins holding
//     sample ranks k_s +- (6 sigma + 16); a second sample pass histograms the window's next two
//     digits, which narrows it to a key range of 21-bit prefixes and counts its sample keys; where
//     that is one prefix, a third gives the exact keys. bf16 task vectors take few distinct
//     values, so often both sample ranks hold one key: a single-key group;
//  2. one host sync sizes a candidate buffer from those counts; one pass over everything counts
//     each group's keys above its range and appends the keys inside it with their flat positions
//     (staged in shared memory) or, for a single-key group, counts its ties per chunk;
//  3. a block per group radix-selects its candidates: the k-th key exactly and, with exact-k ties,
//     the position of the last tie kept (the tied keys are all candidates); a single-key group
//     checks its count and finds that position from its per-chunk tie counts (one chunk read).
// So a select reads the weights once, plus up to three times a 1/32 sample, with one host sync.
// Groups whose window or candidates miss (a sample that does not represent the group, a range
// crowded past the buffer's bound) redo three histogram digits (11, 10, 10 bits) over all keys and,
// with exact-k ties, count ties per chunk to find the position; those passes are always launched
// and cost only their launch when no group needs them. Tensors of different storage dtypes may share a
// scope: each kernel is launched once per dtype present and its blocks skip the other dtypes' chunks.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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
// A group's slice of the candidate buffer: kCandidateSlack x its sample count scaled to the whole
// group, plus kCandidateExtra; the buffer holds at most max(kMinCandidates, elements / kCandidateShare)
// (12 bytes each).
constexpr double kCandidateSlack = 1.5;
constexpr int64_t kCandidateExtra = 1024;
constexpr int64_t kMinCandidates = int64_t{1} << 22;
constexpr int64_t kCandidateShare = 64;

enum Mode { kDense, kPrefix, kWindow };

// One block's work: a chunk of one tensor, for all tasks (grid y walks the tasks 4 at a time), so
// the base is read once per 4 tasks. Task t of the chunk feeds selection group group0 + t.
struct Chunk {
  const void* base;
  const void* const* ft;  // T pointers: task t's version of this tensor
  int64_t begin, end;     // element range inside the tensor
  int64_t position;       // flat position of element 0 of the tensor in the group's scope
  int32_t group0;
  int32_t tensor;         // the tensor's index in the list
  int16_t dtype;          // the tensor's at::ScalarType
  int16_t aligned;        // every pointer of the tensor is 16-byte aligned: vector loads
};

// The host's per-tensor record, from which expand_chunks_kernel writes the chunk tables on the
// device (a model has tens of thousands of chunks: building them on the host cost milliseconds).
struct TensorEntry {
  const void* base;
  int64_t numel;
  int64_t position;      // Chunk::position of the tensor's chunks
  int64_t first_chunk;   // its first chunk in the chunk table
  int64_t first_sample;  // its first chunk in the sample table
  int32_t group0;
  int16_t dtype, aligned;
};

// One block per tensor: its chunks, and every kSampleEvery-th of them into the sample table.
// ptrs[i * T + t] is task t's version of tensor i.
__global__ void expand_chunks_kernel(const TensorEntry* tensors, const void* const* ptrs, int T, Chunk* chunks,
                                     Chunk* sample) {
  const int64_t i = blockIdx.x;
  const TensorEntry e = tensors[i];
  const int64_t count = (e.numel + kChunk - 1) / kChunk;
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) {
    const int64_t begin = j * kChunk;
    const Chunk c{e.base, ptrs + i * T, begin, min(begin + kChunk, e.numel), e.position, e.group0,
                  static_cast<int32_t>(i), e.dtype, e.aligned};
    chunks[e.first_chunk + j] = c;
    if (j % kSampleEvery == 0) sample[e.first_sample + j / kSampleEvery] = c;
  }
}

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

// Walks the 16-byte-vector part of a chunk (all of it when its pointers are aligned, but a rest
// shorter than a block's step): visit(j, keys, i) gets the kVec keys of elements i, i + 1, ... of
// every live task slot j, all loads of a step issued before the first visit.
template <typename scalar_t, typename VisitVector>
__device__ __forceinline__ int64_t for_each_key_vector(const Chunk& c, int t0, const bool (&live)[kTasksPerBlock],
                                                       VisitVector&& visit) {
  constexpr int V = kVec<scalar_t>;
  const scalar_t* base = static_cast<const scalar_t*>(c.base);
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  const int64_t vec_end = c.begin + (c.aligned ? (c.end - c.begin) / step * step : 0);
  for (int64_t i = c.begin + threadIdx.x * V; i < vec_end; i += step) {
    // the loads stay packed until used: five 16-byte vectors, not 40 floats, in registers
    uint4 raw[kTasksPerBlock];
    float w[V];
    load_vec<scalar_t>(base + i, w);
#pragma unroll
    for (int j = 0; j < kTasksPerBlock; ++j)
      if (live[j]) raw[j] = __ldg(reinterpret_cast<const uint4*>(static_cast<const scalar_t*>(c.ft[t0 + j]) + i));
#pragma unroll
    for (int j = 0; j < kTasksPerBlock; ++j) {
      if (!live[j]) continue;  // uniform across the block
      const scalar_t* f = reinterpret_cast<const scalar_t*>(&raw[j]);
      uint32_t keys[V];
#pragma unroll
      for (int v = 0; v < V; ++v) keys[v] = __float_as_uint(fabsf(to_float(f[v]) - w[v]));
      visit(j, keys, i);
    }
  }
  return vec_end;
}

// The rest of a chunk from vec_end, one element a thread: visit(j, key, i) for every live task
// slot j, with whole warps in step (the dense pass's __match_any_sync needs them); keys of elements
// past the end are 0xFFFFFFFF (visit must ignore them; a magnitude's key has bit 31 clear, so no
// real key takes that value).
template <typename scalar_t, typename Visit>
__device__ __forceinline__ void for_each_key_rest(const Chunk& c, int t0, const bool (&live)[kTasksPerBlock],
                                                  int64_t vec_end, Visit&& visit) {
  const scalar_t* base = static_cast<const scalar_t*>(c.base);
  for (int64_t first = vec_end; first < c.end; first += blockDim.x) {
    const int64_t i = first + threadIdx.x;
    const bool in_range = i < c.end;
    const float w = in_range ? to_float(base[i]) : 0.0f;
#pragma unroll
    for (int j = 0; j < kTasksPerBlock; ++j) {
      if (!live[j]) continue;
      visit(j, in_range ? __float_as_uint(fabsf(to_float(static_cast<const scalar_t*>(c.ft[t0 + j])[i]) - w))
                        : 0xFFFFFFFFu, i);
    }
  }
}

// Walks a chunk's elements: visit(j, key, i) for every live task slot j of the block and every
// element i of the tensor (keys past the end as in for_each_key_rest).
template <typename scalar_t, typename Visit>
__device__ __forceinline__ void for_each_key(const Chunk& c, int t0, const bool (&live)[kTasksPerBlock],
                                             Visit&& visit) {
  const int64_t vec_end =
      for_each_key_vector<scalar_t>(c, t0, live, [&](int j, const uint32_t (&keys)[kVec<scalar_t>], int64_t i) {
#pragma unroll
        for (int v = 0; v < kVec<scalar_t>; ++v) visit(j, keys[v], i + v);
      });
  for_each_key_rest<scalar_t>(c, t0, live, vec_end, visit);
}

// Per block and task slot: a shared histogram of BINS bins fed by the chunk's keys.
//  kDense:  digit (key >> shift) of every key; warp-aggregated atomics.
//  kPrefix: digit (key >> shift) & 1023 of the keys whose bits above shift + 10 equal the prefix.
//  kWindow: keys whose top digit (key >> 20) lies in [lo, hi] count in bin (top - lo) * 1024 +
//           ((key >> 10) & 1023); keys above hi only add to above[group].
template <typename scalar_t, int BINS, Mode MODE>
__device__ __forceinline__ void histogram_chunk(const Chunk& c, uint32_t (&count)[kTasksPerBlock][BINS],
                                                unsigned int (&above_block)[kTasksPerBlock], int32_t dtype, int T,
                                                const uint32_t* prefix, const uint32_t* window_lo,
                                                const uint32_t* window_hi, const int32_t* running, int shift,
                                                uint32_t* hist, unsigned long long* above) {
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
  for_each_key<scalar_t>(c, t0, live, [&](int j, uint32_t key, int64_t) {
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

// histogram_chunk over chunks blockIdx.x, blockIdx.x + gridDim.x, ...: a grid of one block per chunk,
// or, for the passes that rarely have work (gate: a device flag, 0 when no group needs the pass), a
// grid of a few blocks per multiprocessor, which costs only its launch when the gate is closed.
template <typename scalar_t, int BINS, Mode MODE>
__global__ void __launch_bounds__(kThreads) histogram_kernel(const Chunk* chunks, int64_t num_chunks,
                                                             const int32_t* gate, int32_t dtype, int T,
                                                             const uint32_t* prefix, const uint32_t* window_lo,
                                                             const uint32_t* window_hi, const int32_t* running,
                                                             int shift, uint32_t* hist,
                                                             unsigned long long* above) {
  __shared__ uint32_t count[kTasksPerBlock][BINS];
  __shared__ unsigned int above_block[kTasksPerBlock];
  if (gate != nullptr && *gate == 0) return;
  for (int64_t ci = blockIdx.x; ci < num_chunks; ci += gridDim.x) {
    histogram_chunk<scalar_t, BINS, MODE>(chunks[ci], count, above_block, dtype, T, prefix, window_lo, window_hi,
                                          running, shift, hist, above);
    __syncthreads();  // the chunk's counts are flushed before the next chunk clears them
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

// Per group, from the sample's window histogram (2 x 10-bit digits under the window's top bins)
// and the count of sample keys above the window: the key range [key_lo, key_hi] of the 21-bit
// prefixes holding sample ranks rank_hi <= rank_lo, and how many sample keys it holds. When both
// ranks share one prefix (narrow), the prefix and their ranks inside it go to the third digit.
__global__ void candidate_window_kernel(uint32_t* hist, unsigned long long* above, const int64_t* rank_hi,
                                        const int64_t* rank_lo, const int32_t* running, const uint32_t* window_lo,
                                        const uint32_t* window_hi, uint32_t* key_lo, uint32_t* key_hi,
                                        int64_t* sample_count, uint32_t* prefix, int64_t* need_hi, int64_t* need_lo,
                                        int32_t* narrow, int groups) {
  const int g = warp_group();
  if (g >= groups || !running[g]) return;
  uint32_t* h = hist + static_cast<int64_t>(g) * kTopBins;
  const int bins = static_cast<int>(window_hi[g] - window_lo[g] + 1) * kLowBins;
  const int64_t a = static_cast<int64_t>(above[g]);
  const int64_t r_hi = rank_hi[g] - a > 1 ? rank_hi[g] - a : 1, r_lo = rank_lo[g] - a > 1 ? rank_lo[g] - a : 1;
  const Found fh = warp_find(h, bins, r_hi), fl = warp_find(h, bins, r_lo);
  if (leader()) {
    auto prefix_of = [&](int bin) { return ((window_lo[g] + bin / kLowBins) << 10) | static_cast<uint32_t>(bin % kLowBins); };
    key_hi[g] = (prefix_of(fh.bin) << 10) | 1023u;
    key_lo[g] = prefix_of(fl.bin) << 10;
    // keys in bins fl.bin..fh.bin: (all through fl.bin) - (all above fh.bin); rank - need counts
    // the keys of the bins above a rank's bin
    sample_count[g] = (r_lo - fl.need + h[fl.bin]) - (r_hi - fh.need);
    above[g] = 0;
    if (fh.bin == fl.bin) {
      prefix[g] = prefix_of(fh.bin);
      need_hi[g] = fh.need;
      need_lo[g] = fl.need;
      narrow[g] = 1;
    }
  }
  warp_clear(h, bins);
}

// Narrow groups, from the sample's last digit under their prefix: the exact keys of the two
// sample ranks as the range, how many sample keys it holds, and whether it is a single key
// (heavily tied data: bf16 task vectors take few distinct values).
__global__ void sample_keys_kernel(uint32_t* hist, const int32_t* running, const uint32_t* prefix,
                                   const int64_t* need_hi, const int64_t* need_lo, uint32_t* key_lo,
                                   uint32_t* key_hi, int64_t* sample_count, int32_t* single, int groups) {
  const int g = warp_group();
  if (g >= groups || !running[g]) return;
  uint32_t* h = hist + static_cast<int64_t>(g) * kTopBins;
  const Found fh = warp_find(h, kLowBins, need_hi[g]), fl = warp_find(h, kLowBins, need_lo[g]);
  if (leader()) {
    key_hi[g] = (prefix[g] << 10) | static_cast<uint32_t>(fh.bin);
    key_lo[g] = (prefix[g] << 10) | static_cast<uint32_t>(fl.bin);
    sample_count[g] = (need_lo[g] - fl.need + h[fl.bin]) - (need_hi[g] - fh.need);
    single[g] = fh.bin == fl.bin;
  }
  warp_clear(h, kLowBins);
}

constexpr int kStage = 1024;  // candidates a block stages per task slot before one global append

// The candidate pass over everything: per group, the keys above [key_lo, key_hi] are counted
// (registers), the keys inside it are appended with their flat positions to the group's slice of
// the candidate buffer (staged in shared memory, one global atomic per block and task). Appends
// past a group's capacity are dropped; fill[] still counts them, so the select sees the overflow.
// A single-key group only counts its ties: fill[] in total, tie_counts[t * chunks + chunk] per
// chunk (the tie position search takes it from there).
// kCheck: nonfinite[tensor] = 1 when a key of any task of the chunk is NaN or Inf; then every task
// of the chunk is read, whether its group collects or not.
template <typename scalar_t, bool kCheck>
__global__ void __launch_bounds__(kThreads, 4) collect_kernel(const Chunk* chunks, int32_t dtype, int T,
                                                           const uint32_t* key_lo, const uint32_t* key_hi,
                                                           const int32_t* running, const int32_t* single,
                                                           const int64_t* cand_offset, const int64_t* cand_cap,
                                                           unsigned long long* fill, unsigned long long* above,
                                                           uint32_t* cand_key, int64_t* cand_pos,
                                                           int64_t* tie_counts, int32_t* nonfinite) {
  __shared__ uint32_t stage_key[kTasksPerBlock][kStage];
  __shared__ uint16_t stage_index[kTasksPerBlock][kStage];  // index in the chunk: < kChunk
  __shared__ unsigned int staged[kTasksPerBlock], above_block[kTasksPerBlock], tied_block[kTasksPerBlock];
  __shared__ unsigned long long start[kTasksPerBlock];
  static_assert(kChunk <= 65536, "stage_index is 16 bits");
  const Chunk c = chunks[blockIdx.x];
  if (c.dtype != dtype) return;
  const int t0 = blockIdx.y * kTasksPerBlock;
  const int tasks = min(kTasksPerBlock, T - t0);
  bool live[kTasksPerBlock], read[kTasksPerBlock], one[kTasksPerBlock], any = false;
  uint32_t lo[kTasksPerBlock], hi[kTasksPerBlock];
  unsigned int above_mine[kTasksPerBlock], tied_mine[kTasksPerBlock];
#pragma unroll
  for (int j = 0; j < kTasksPerBlock; ++j) {
    const int g = c.group0 + t0 + j;
    live[j] = j < tasks && running[g];
    read[j] = kCheck ? j < tasks : live[j];
    one[j] = live[j] && single[g];
    lo[j] = live[j] ? key_lo[g] : 1u;
    hi[j] = live[j] ? key_hi[g] : 0u;
    above_mine[j] = tied_mine[j] = 0;
    any |= read[j];
  }
  if (!any) return;
  if (threadIdx.x < kTasksPerBlock) staged[threadIdx.x] = above_block[threadIdx.x] = tied_block[threadIdx.x] = 0;
  __syncthreads();
  // One in-range key (rare): staged in shared memory, or straight to the global buffer when the
  // chunk is crowded.
  auto append = [&](int j, uint32_t key, int64_t i) {
    const unsigned int s = atomicAdd(&staged[j], 1u);
    if (s < kStage) {
      stage_key[j][s] = key;
      stage_index[j][s] = static_cast<uint16_t>(i - c.begin);
    } else {
      const int64_t g = c.group0 + t0 + j;
      const unsigned long long at = atomicAdd(&fill[g], 1ull);
      if (at < static_cast<unsigned long long>(cand_cap[g])) {
        cand_key[cand_offset[g] + at] = key;
        cand_pos[cand_offset[g] + at] = c.position + i;
      }
    }
  };
  // Counting without branches (a fifth of the keys lie above the range, at random: branches on
  // them split the warps); a step's in-range keys of a task become a bit mask, and only a nonzero
  // mask (rare) takes the append's branch. A NaN / Inf magnitude's key is >= 0x7F800000: the check
  // keeps the largest key + 1 (one VIADDMNMX; the rest's padding 0xFFFFFFFF wraps to 0).
  uint32_t top = 0;
  const int64_t vec_end = for_each_key_vector<scalar_t>(
      c, t0, read, [&](int j, const uint32_t (&keys)[kVec<scalar_t>], int64_t i) {
        constexpr int V = kVec<scalar_t>;
        if (kCheck) {
#pragma unroll
          for (int v = 0; v < V; ++v) top = max(top, keys[v] + 1u);
          if (!live[j]) return;  // uniform across the block: read for the check only
        }
        if (one[j]) {  // uniform across the block
#pragma unroll
          for (int v = 0; v < V; ++v) {
            above_mine[j] += keys[v] > hi[j];
            tied_mine[j] += keys[v] == lo[j];
          }
          return;
        }
        const uint32_t span = hi[j] - lo[j];
        unsigned int inside = 0;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          above_mine[j] += keys[v] > hi[j];
          // lo <= key <= hi in one compare: a collecting group has lo <= hi (its sample ranks)
          inside |= static_cast<unsigned int>(keys[v] - lo[j] <= span) << v;
        }
        if (inside) {
#pragma unroll
          for (int v = 0; v < V; ++v)
            if ((inside >> v) & 1u) append(j, keys[v], i + v);
        }
      });
  for_each_key_rest<scalar_t>(c, t0, read, vec_end, [&](int j, uint32_t key, int64_t i) {
    const bool valid = key != 0xFFFFFFFFu;
    if (kCheck) {
      top = max(top, key + 1u);
      if (!live[j]) return;
    }
    above_mine[j] += valid & (key > hi[j]);
    if (one[j]) {
      tied_mine[j] += valid & (key == lo[j]);
    } else if (valid & (key >= lo[j]) & (key <= hi[j])) {
      append(j, key, i);
    }
  });
  if (kCheck && __syncthreads_or(top > 0x7F800000u) && threadIdx.x == 0) nonfinite[c.tensor] = 1;
  const unsigned lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < kTasksPerBlock; ++j) {
    if (!live[j]) continue;
    unsigned int v = above_mine[j], u = tied_mine[j];
    for (int o = 16; o > 0; o >>= 1) {
      v += __shfl_down_sync(0xFFFFFFFFu, v, o);
      u += __shfl_down_sync(0xFFFFFFFFu, u, o);
    }
    if (lane == 0 && v) atomicAdd(&above_block[j], v);
    if (lane == 0 && u) atomicAdd(&tied_block[j], u);
  }
  __syncthreads();
  if (threadIdx.x < tasks) {
    const int j = threadIdx.x;
    const int64_t g = c.group0 + t0 + j;
    if (running[g]) {
      const unsigned int n = single[g] ? tied_block[j] : min(staged[j], static_cast<unsigned int>(kStage));
      start[j] = n ? atomicAdd(&fill[g], static_cast<unsigned long long>(n)) : 0ull;
      if (above_block[j]) atomicAdd(&above[g], static_cast<unsigned long long>(above_block[j]));
      if (single[g]) tie_counts[static_cast<int64_t>(t0 + j) * gridDim.x + blockIdx.x] = tied_block[j];
    }
  }
  __syncthreads();
  for (int j = 0; j < tasks; ++j) {
    if (!live[j] || one[j]) continue;
    const int64_t g = c.group0 + t0 + j;
    const unsigned int n = min(staged[j], static_cast<unsigned int>(kStage));
    const unsigned long long cap = static_cast<unsigned long long>(cand_cap[g]);
    for (unsigned int e = threadIdx.x; e < n; e += blockDim.x) {
      const unsigned long long at = start[j] + e;
      if (at < cap) {
        cand_key[cand_offset[g] + at] = stage_key[j][e];
        cand_pos[cand_offset[g] + at] = c.position + c.begin + stage_index[j][e];
      }
    }
  }
}

constexpr int kSelectThreads = 512;

// One radix digit over a group's candidates, by one block: hist[d] counts the values v (key or
// position, as a 64-bit word) with (v >> (shift + bits)) == prefix and digit d = (v >> shift) &
// (2^bits - 1), among those that pass `take`; then warp 0 finds the bin of `rank` (from the top).
// The values are below 2^(shift + bits + prefix bits) < 2^64.
// The block's threads all get the result.
struct Digit {
  int bin;        // the digit holding rank
  int64_t need;   // rank left inside the bin
  int64_t count;  // values in the bin
};

constexpr int kSelectUnroll = 8;  // values a thread loads before binning them: loads in flight

template <typename Value, typename Take>
__device__ Digit block_digit(uint32_t* hist, int64_t n, int shift, int bits, uint64_t prefix, int64_t rank,
                             Value&& value, Take&& take) {
  __shared__ int s_bin;
  __shared__ int64_t s_need, s_count;
  for (int b = threadIdx.x; b < kTopBins; b += blockDim.x) hist[b] = 0;
  __syncthreads();
  const unsigned lane = threadIdx.x & 31;
  const int64_t tile = static_cast<int64_t>(blockDim.x) * kSelectUnroll;
  const int64_t rounds = (n + tile - 1) / tile * tile;  // whole warps in step
  for (int64_t e0 = threadIdx.x; e0 < rounds; e0 += tile) {
    uint32_t bin[kSelectUnroll];
#pragma unroll
    for (int u = 0; u < kSelectUnroll; ++u) {  // all loads first: one latency per tile, not per value
      const int64_t e = e0 + static_cast<int64_t>(u) * blockDim.x;
      bin[u] = 0xFFFFFFFFu;
      if (e < n && take(e)) {
        const uint64_t v = value(e);
        if ((v >> (shift + bits)) == prefix) bin[u] = static_cast<uint32_t>((v >> shift) & ((1ull << bits) - 1));
      }
    }
#pragma unroll
    for (int u = 0; u < kSelectUnroll; ++u) {
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, bin[u]);  // candidates crowd into few bins
      if (bin[u] != 0xFFFFFFFFu && lane == static_cast<unsigned>(__ffs(peers) - 1))
        atomicAdd(&hist[bin[u]], __popc(peers));
    }
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const Found f = warp_find(hist, max(32, 1 << bits), rank);  // bins past 2^bits stay empty
    if (threadIdx.x == 0) {
      s_bin = f.bin;
      s_need = f.need;
      s_count = hist[f.bin];
    }
  }
  __syncthreads();
  const Digit out{s_bin, s_need, s_count};
  __syncthreads();  // every thread has read the result before the next digit reuses the shared state
  return out;
}

// Per group (one block): the exact threshold from its candidates, when they hold its k-th key
// (need = k - above in 1..count, nothing dropped); else failed = 1 (the group takes the full
// digit passes). A single-key group only checks its count and, with exact-k ties and part of the
// ties kept, leaves the rank among them for the tie position search (exact = 1). Three key digits (11, 11, 10 bits); with exact-k ties and only part of the tied
// keys kept, the position of the last one kept: digits of 11 bits over pos_bits bits of the tied
// candidates' positions, the need-th smallest = the (count - need + 1)-th from the top.
__global__ void __launch_bounds__(kSelectThreads) candidate_select_kernel(
    const uint32_t* cand_key, const int64_t* cand_pos, const int64_t* cand_offset, const int64_t* cand_cap,
    const unsigned long long* fill, const unsigned long long* above, const int64_t* k, const int32_t* running,
    const int32_t* single, const uint32_t* key_lo, const uint32_t* key_hi, bool keep_ties, int pos_bits,
    float* threshold,
    int64_t* tie_limit, int32_t* failed, uint32_t* prefix, int64_t* remaining, int32_t* exact) {
  __shared__ uint32_t hist[kTopBins];
  const int g = blockIdx.x;
  if (!running[g]) return;
  const int64_t n = static_cast<int64_t>(fill[g]);
  const int64_t need0 = k[g] - static_cast<int64_t>(above[g]);
  if ((!single[g] && n > cand_cap[g]) || need0 < 1 || need0 > n) {
    if (threadIdx.x == 0) failed[g] = 1;
    return;
  }
  if (single[g]) {  // the k-th key is the group's single key; n keys tie with it
    if (threadIdx.x == 0) {
      threshold[g] = __uint_as_float(key_lo[g]);
      tie_limit[g] = INT64_MAX;
      prefix[g] = key_lo[g];
      remaining[g] = need0;
      exact[g] = !keep_ties && need0 < n;  // its position comes from the per-chunk tie counts
    }
    return;
  }
  const uint32_t* keys = cand_key + cand_offset[g];
  const int64_t* pos = cand_pos + cand_offset[g];
  auto key_of_e = [&](int64_t e) { return static_cast<uint64_t>(keys[e]); };
  auto all = [](int64_t) { return true; };
  uint64_t found = 0;  // the key's digits so far
  int64_t need = need0, ties = 0;
  const int key_shift[3] = {21, 10, 0}, key_bits[3] = {11, 11, 10};
  for (int d = 0; d < 3; ++d) {
    // Every candidate lies in [key_lo, key_hi]: where both ends share the bits down to this digit,
    // so do all candidates, and the digit needs no pass (most groups skip the first).
    const uint32_t lo = key_lo[g], hi = key_hi[g];
    const Digit f = (lo >> key_shift[d]) == (hi >> key_shift[d])
                        ? Digit{static_cast<int>((lo >> key_shift[d]) & ((1u << key_bits[d]) - 1)), need, n}
                        : block_digit(hist, n, key_shift[d], key_bits[d], found, need, key_of_e, all);
    found = (found << key_bits[d]) | static_cast<uint64_t>(f.bin);
    need = f.need;
    ties = f.count;
  }
  const uint32_t key = static_cast<uint32_t>(found);
  int64_t limit = INT64_MAX;
  if (!keep_ties && need < ties) {
    auto tied = [&](int64_t e) { return keys[e] == key; };
    auto pos_of_e = [&](int64_t e) { return static_cast<uint64_t>(pos[e]); };
    int64_t rank = ties - need + 1;
    uint64_t p = 0;
    for (int top = pos_bits; top > 0; top -= 11) {
      const int shift = max(0, top - 11), bits = top - shift;
      const Digit f = block_digit(hist, n, shift, bits, p, rank, pos_of_e, tied);
      p = (p << bits) | static_cast<uint64_t>(f.bin);
      rank = f.need;
    }
    limit = static_cast<int64_t>(p) + 1;
  }
  if (threadIdx.x == 0) {
    threshold[g] = __uint_as_float(key);
    tie_limit[g] = limit;
  }
}

// Exact-k ties: per (chunk, task), how many keys equal the group's threshold key.
template <typename scalar_t>
__device__ __forceinline__ void tie_count_chunk(const Chunk& c, int64_t ci, int64_t num_chunks,
                                                unsigned int (&total)[kTasksPerBlock], int32_t dtype, int T,
                                                const uint32_t* key, const int32_t* exact, int64_t* counts) {
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
  for_each_key<scalar_t>(c, t0, live, [&](int j, uint32_t k, int64_t) { mine[j] += k == want[j]; });
#pragma unroll
  for (int j = 0; j < kTasksPerBlock; ++j) {
    if (!live[j]) continue;
    unsigned int v = mine[j];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
    if ((threadIdx.x & 31) == 0 && v) atomicAdd(&total[j], v);
  }
  __syncthreads();
  if (threadIdx.x < tasks && live[threadIdx.x])
    counts[static_cast<int64_t>(t0 + threadIdx.x) * num_chunks + ci] = static_cast<int64_t>(total[threadIdx.x]);
}

// tie_count_chunk over a grid-stride loop of chunks, behind a gate (see histogram_kernel).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) tie_count_kernel(const Chunk* chunks, int64_t num_chunks,
                                                             const int32_t* gate, int32_t dtype, int T,
                                                             const uint32_t* key, const int32_t* exact,
                                                             int64_t* counts) {
  __shared__ unsigned int total[kTasksPerBlock];
  if (*gate == 0) return;
  for (int64_t ci = blockIdx.x; ci < num_chunks; ci += gridDim.x) {
    tie_count_chunk<scalar_t>(chunks[ci], ci, num_chunks, total, dtype, T, key, exact, counts);
    __syncthreads();  // total[] is read before the next chunk clears it
  }
}

// Per group (one block): the chunk of its row of tie counts (row t, the group's chunk range) holding
// the need-th tie, by a block-wide running scan; leaves the chunk and the count left in it.
constexpr int kScanThreads = 256;

__global__ void __launch_bounds__(kScanThreads) tie_chunk_kernel(const int64_t* counts, int64_t num_chunks,
                                                                 const int64_t* first_chunk, const int32_t* exact,
                                                                 const int64_t* remaining, int64_t* chunk_of,
                                                                 int64_t* need_in_chunk, int T, bool per_tensor) {
  __shared__ int64_t scan[kScanThreads];
  __shared__ int found;
  const int g = blockIdx.x;
  if (!exact[g]) return;
  const int t = per_tensor ? g % T : g;
  const int64_t* row = counts + static_cast<int64_t>(t) * num_chunks;
  const int64_t lo = per_tensor ? first_chunk[g / T] : 0, hi = per_tensor ? first_chunk[g / T + 1] : num_chunks;
  int64_t need = remaining[g];
  for (int64_t c0 = lo; c0 < hi; c0 += kScanThreads) {
    const int64_t c = c0 + threadIdx.x;
    scan[threadIdx.x] = c < hi ? row[c] : 0;
    if (threadIdx.x == 0) found = kScanThreads;
    __syncthreads();
    for (int o = 1; o < kScanThreads; o <<= 1) {  // inclusive scan of the tile
      const int64_t v = threadIdx.x >= o ? scan[threadIdx.x - o] : 0;
      __syncthreads();
      scan[threadIdx.x] += v;
      __syncthreads();
    }
    if (scan[threadIdx.x] >= need) atomicMin(&found, static_cast<int>(threadIdx.x));
    __syncthreads();
    if (found < kScanThreads) {  // uniform: the tile holds the need-th tie
      if (threadIdx.x == 0) {
        chunk_of[g] = c0 + found;
        need_in_chunk[g] = need - (found ? scan[found - 1] : 0);
      }
      return;
    }
    need -= scan[kScanThreads - 1];
    __syncthreads();  // every thread has read the tile before the next one overwrites it
  }
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

// Groups that keep nothing (k = 0) and, where running, the groups that took the full digits.
__global__ void finish_kernel(const uint32_t* prefix, const int64_t* k, const int32_t* running, float* threshold,
                              int64_t* tie_limit, int groups) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  if (k[g] <= 0) {
    threshold[g] = __int_as_float(0x7f800000);  // +inf: nothing kept
    tie_limit[g] = 0;
  } else if (running[g]) {
    threshold[g] = __uint_as_float(prefix[g]);
    tie_limit[g] = INT64_MAX;
  }
}

// A piece of a device buffer: its byte range and element type.
struct Part {
  int64_t at, nbytes;
  at::ScalarType dtype;
};

at::Tensor part_of(const at::Tensor& buffer, const Part& p) { return buffer.narrow(0, p.at, p.nbytes).view(p.dtype); }

// Host vectors bound for the device in one copy from pinned memory (asynchronous: a copy from
// pageable memory would wait for the stream to drain). int32 / int64 vectors come back typed,
// others as bytes.
class Upload {
 public:
  template <typename V>
  int add(const std::vector<V>& v) {
    const int64_t at = (static_cast<int64_t>(bytes_.size()) + 15) / 16 * 16;
    const int64_t nbytes = static_cast<int64_t>(v.size() * sizeof(V));
    bytes_.resize(at + nbytes);
    if (nbytes) std::memcpy(bytes_.data() + at, v.data(), nbytes);
    const at::ScalarType dtype = std::is_same_v<V, int32_t> ? at::kInt : std::is_same_v<V, int64_t> ? at::kLong : at::kByte;
    parts_.push_back({at, nbytes, dtype});
    return static_cast<int>(parts_.size()) - 1;
  }
  void send(const at::Device& device) {
    const int64_t size = static_cast<int64_t>(bytes_.size());
    at::Tensor host = at::empty({std::max<int64_t>(size, 1)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    if (size) std::memcpy(host.data_ptr(), bytes_.data(), size);
    device_ = host.to(device, /*non_blocking=*/true);
  }
  at::Tensor get(int i) const { return part_of(device_, parts_[i]); }

 private:
  std::vector<uint8_t> bytes_;
  std::vector<Part> parts_;
  at::Tensor device_;
};

// Device scratch that starts at zero: one allocation and one memset for all of it.
class Slab {
 public:
  int add(int64_t count, at::ScalarType dtype) {
    const int64_t at = (total_ + 15) / 16 * 16;
    parts_.push_back({at, count * static_cast<int64_t>(c10::elementSize(dtype)), dtype});
    total_ = at + parts_.back().nbytes;
    return static_cast<int>(parts_.size()) - 1;
  }
  void allocate(const at::TensorOptions& opts) { buffer_ = at::zeros({std::max<int64_t>(total_, 1)}, opts.dtype(at::kByte)); }
  at::Tensor get(int i) const { return part_of(buffer_, parts_[i]); }

 private:
  int64_t total_ = 0;
  std::vector<Part> parts_;
  at::Tensor buffer_;
};

std::tuple<at::Tensor, at::Tensor> magnitude_threshold_cuda(at::TensorList base, at::TensorList finetuned,
                                                            at::IntArrayRef k, bool keep_ties, bool per_tensor,
                                                            const std::optional<at::Tensor>& nonfinite) {
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
  check_nonfinite_flags("magnitude_threshold", nonfinite, n, device);
  const c10::cuda::CUDAGuard guard(device);
  if (nonfinite) nonfinite->zero_();  // the candidate pass sets the flags
  // Per-tensor records (the chunk tables are expanded from them on the device); first_chunk[i] is
  // tensor i's first chunk, in flat order.
  std::vector<const void*> ptrs(n * T);  // ptrs[i * T + t] = task t's version of tensor i
  std::vector<TensorEntry> entries(n);
  std::vector<int64_t> first_chunk(n + 1, 0), kk(groups), totals(groups, 0), sampled(groups, 0);
  int64_t position = 0, sampled_all = 0, num_samples = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t numel = base[i].numel();
    const void* base_ptr = base[i].data_ptr();
    bool aligned = reinterpret_cast<uintptr_t>(base_ptr) % 16 == 0;
    for (int64_t t = 0; t < T; ++t) {
      ptrs[i * T + t] = finetuned[t * n + i].data_ptr();
      aligned &= reinterpret_cast<uintptr_t>(ptrs[i * T + t]) % 16 == 0;
    }
    const int64_t count = (numel + kChunk - 1) / kChunk;
    const int64_t in_sample_chunks = (count + kSampleEvery - 1) / kSampleEvery;
    // every sampled chunk is whole but perhaps the tensor's last one
    const int64_t last = (in_sample_chunks - 1) * kSampleEvery;
    const int64_t in_sample = count ? (in_sample_chunks - 1) * kChunk + std::min(kChunk, numel - last * kChunk) : 0;
    entries[i] = {base_ptr, numel, per_tensor ? 0 : position, first_chunk[i], num_samples,
                  static_cast<int32_t>(per_tensor ? i * T : 0), static_cast<int16_t>(base[i].scalar_type()),
                  static_cast<int16_t>(aligned)};
    first_chunk[i + 1] = first_chunk[i] + count;
    num_samples += in_sample_chunks;
    position += numel;
    sampled_all += in_sample;
    if (per_tensor)
      for (int64_t t = 0; t < T; ++t) {
        totals[i * T + t] = numel;
        sampled[i * T + t] = in_sample;
      }
  }
  const int64_t total_chunks = first_chunk[n];
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
  const int num_chunks = static_cast<int>(total_chunks);
  // The host tables go up in one copy from pinned memory (asynchronous: a copy from pageable
  // memory would wait for the stream to drain); the scratch that starts at zero is one allocation.
  Upload up;
  const int ptrs_at = up.add(ptrs), entries_at = up.add(entries), active_at = up.add(active), k_at = up.add(kk),
            rank_hi_at = up.add(rank_hi), rank_lo_at = up.add(rank_lo), first_at = up.add(first_chunk);
  up.send(device);
  Slab zero;
  const int prefix_at = zero.add(groups, at::kInt), ties_at = zero.add(groups, at::kInt),
            hist_at = zero.add(groups * kTopBins, at::kInt), window_at = zero.add(2 * groups, at::kInt),
            above_at = zero.add(groups, at::kLong), failed_at = zero.add(groups, at::kInt),
            redo_at = zero.add(groups, at::kInt), exact_at = zero.add(groups, at::kInt),
            tie_counts_at = zero.add(T * std::max(num_chunks, 1), at::kLong),
            key_range_at = zero.add(2 * groups, at::kInt), sample_count_at = zero.add(groups, at::kLong),
            sample_need_at = zero.add(2 * groups, at::kLong), flags_at = zero.add(2 * groups, at::kInt),
            fill_at = zero.add(groups, at::kLong), chunk_of_at = zero.add(groups, at::kLong),
            need_in_chunk_at = zero.add(groups, at::kLong);
  zero.allocate(opts);
  const at::Tensor active_d = up.get(active_at), k_d = up.get(k_at), rank_hi_d = up.get(rank_hi_at),
                   rank_lo_d = up.get(rank_lo_at);
  const at::Tensor chunk_table = at::empty({std::max<int64_t>(total_chunks, 1) * static_cast<int64_t>(sizeof(Chunk))},
                                           opts.dtype(at::kByte));
  const at::Tensor sample_table = at::empty({std::max<int64_t>(num_samples, 1) * static_cast<int64_t>(sizeof(Chunk))},
                                            opts.dtype(at::kByte));
  at::Tensor remaining = k_d.clone();
  at::Tensor prefix = zero.get(prefix_at), ties = zero.get(ties_at), hist = zero.get(hist_at),
             window = zero.get(window_at).view({2, groups}), above = zero.get(above_at), failed = zero.get(failed_at);
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
  const int group_blocks = static_cast<int>((groups + 127) / 128);
  const int warp_blocks = static_cast<int>((groups + kGroupsPerBlock - 1) / kGroupsPerBlock);
  const unsigned task_blocks = static_cast<unsigned>((T + kTasksPerBlock - 1) / kTasksPerBlock);
  const dim3 grid(num_chunks, task_blocks);
  // Runs launch(scalar_t{}, dtype code) for every storage dtype of the list.
  auto for_each_dtype = [&](auto&& launch) {
    for (const at::ScalarType dtype : dtypes)
      dispatch_storage(dtype, "magnitude_threshold", [&](auto tag) { launch(tag, static_cast<int32_t>(dtype)); });
  };
  // The grid of the passes that rarely have work (behind a gate): a few blocks per multiprocessor.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  const dim3 gated_grid(static_cast<unsigned>(std::min<int64_t>(total_chunks, 8 * sms)), task_blocks);
  // One histogram pass of the given mode over a chunk table, for the groups with running[g].
  auto pass = [&](auto mode, const Chunk* table, int64_t count, dim3 blocks, const int32_t* gate,
                  const int32_t* running, int shift) {
    constexpr Mode M = decltype(mode)::value;
    for_each_dtype([&](auto tag, int32_t code) {
      using scalar_t = decltype(tag);
      histogram_kernel<scalar_t, M == kPrefix ? kLowBins : kTopBins, M><<<blocks, kThreads, 0, stream>>>(
          table, count, gate, code, static_cast<int>(T), prefix_ptr, lo_ptr, hi_ptr, running, shift, hist_ptr,
          above_ptr);
      NK_CUDA_CHECK_LAUNCH();
    });
  };
  using Dense = std::integral_constant<Mode, kDense>;
  using Prefix = std::integral_constant<Mode, kPrefix>;
  using Window = std::integral_constant<Mode, kWindow>;
  const int32_t* active_ptr = active_d.data_ptr<int32_t>();
  // k = 0 groups keep nothing; every other group is written by the candidate select or, where
  // that misses, by the full digits below. exact: groups that keep part of their ties and need the
  // position of the last one kept; tie_counts: their ties per (task, chunk).
  at::Tensor redo = zero.get(redo_at), exact = zero.get(exact_at), tie_counts = zero.get(tie_counts_at);
  if (num_chunks > 0) {
    expand_chunks_kernel<<<static_cast<unsigned>(n), 256, 0, stream>>>(
        reinterpret_cast<const TensorEntry*>(up.get(entries_at).data_ptr()),
        reinterpret_cast<const void* const*>(up.get(ptrs_at).data_ptr()), static_cast<int>(T),
        reinterpret_cast<Chunk*>(chunk_table.data_ptr()), reinterpret_cast<Chunk*>(sample_table.data_ptr()));
    NK_CUDA_CHECK_LAUNCH();
    // 1. The sample: the top digit gives a window of top bins, the window's lower two digits a
    //    range of 21-bit prefixes per group; where it is one prefix, the last digit gives the exact
    //    keys of the sample ranks (one key: a single-key group).
    const dim3 sample_grid(static_cast<unsigned>(num_samples), task_blocks);
    pass(Dense{}, sample_ptr, num_samples, sample_grid, nullptr, active_ptr, 20);
    window_kernel<<<warp_blocks, 32 * kGroupsPerBlock, 0, stream>>>(hist_ptr, rank_hi_d.data_ptr<int64_t>(), rank_lo_d.data_ptr<int64_t>(),
                                                    active_ptr, lo_ptr, hi_ptr, failed_ptr, static_cast<int>(groups));
    NK_CUDA_CHECK_LAUNCH();
    const at::Tensor windowed = active_d * (1 - failed);
    pass(Window{}, sample_ptr, num_samples, sample_grid, nullptr, windowed.data_ptr<int32_t>(), 20);
    at::Tensor key_range = zero.get(key_range_at).view({2, groups});
    at::Tensor sample_count = zero.get(sample_count_at);
    at::Tensor sample_need = zero.get(sample_need_at).view({2, groups});
    at::Tensor flags = zero.get(flags_at).view({2, groups});  // narrow, single
    auto* key_lo_ptr = reinterpret_cast<uint32_t*>(key_range[0].data_ptr());
    auto* key_hi_ptr = reinterpret_cast<uint32_t*>(key_range[1].data_ptr());
    int64_t* need_hi_ptr = sample_need[0].data_ptr<int64_t>();
    int64_t* need_lo_ptr = sample_need[1].data_ptr<int64_t>();
    int32_t* narrow_ptr = flags[0].data_ptr<int32_t>();
    int32_t* single_ptr = flags[1].data_ptr<int32_t>();
    candidate_window_kernel<<<warp_blocks, 32 * kGroupsPerBlock, 0, stream>>>(
        hist_ptr, above_ptr, rank_hi_d.data_ptr<int64_t>(), rank_lo_d.data_ptr<int64_t>(), windowed.data_ptr<int32_t>(),
        lo_ptr, hi_ptr, key_lo_ptr, key_hi_ptr, sample_count.data_ptr<int64_t>(), prefix_ptr, need_hi_ptr, need_lo_ptr,
        narrow_ptr, static_cast<int>(groups));
    NK_CUDA_CHECK_LAUNCH();
    pass(Prefix{}, sample_ptr, num_samples, sample_grid, nullptr, narrow_ptr, 0);
    sample_keys_kernel<<<warp_blocks, 32 * kGroupsPerBlock, 0, stream>>>(
        hist_ptr, narrow_ptr, prefix_ptr, need_hi_ptr, need_lo_ptr, key_lo_ptr, key_hi_ptr,
        sample_count.data_ptr<int64_t>(), single_ptr, static_cast<int>(groups));
    NK_CUDA_CHECK_LAUNCH();
    // 2. Host sync: the sample counts, scaled to the whole group with room to spare, size each
    //    range group's slice of the candidate buffer (single-key groups only count); the largest
    //    slices go to the full digits when the buffer would pass its bound.
    const at::Tensor sample_host = at::cat({windowed.to(at::kLong), sample_count, flags[1].to(at::kLong)}).cpu();
    const int64_t* windowed_host = sample_host.data_ptr<int64_t>();
    const int64_t* count_host = windowed_host + groups;
    const int64_t* single_host = windowed_host + 2 * groups;
    std::vector<int64_t> cap(groups, 0), offset(groups, 0);
    std::vector<int32_t> collecting(groups, 0);
    int64_t total_cap = 0, elements = 0;
    for (int64_t g = 0; g < groups; ++g) {
      elements += totals[g];
      if (!windowed_host[g]) continue;
      collecting[g] = 1;
      if (single_host[g]) continue;
      const double scale = static_cast<double>(totals[g]) / static_cast<double>(sampled[g]);
      const double want = std::ceil(kCandidateSlack * scale * static_cast<double>(count_host[g]));
      cap[g] = std::min<int64_t>(totals[g], static_cast<int64_t>(want) + kCandidateExtra);
      total_cap += cap[g];
    }
    const int64_t bound = std::max<int64_t>(kMinCandidates, elements / kCandidateShare);
    if (total_cap > bound) {
      std::vector<int64_t> order(groups);
      for (int64_t g = 0; g < groups; ++g) order[g] = g;
      std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cap[a] > cap[b]; });
      for (int64_t i = 0; i < groups && total_cap > bound && cap[order[i]] > 0; ++i) {
        total_cap -= cap[order[i]];
        cap[order[i]] = 0;
        collecting[order[i]] = 0;
      }
    }
    for (int64_t g = 0, at_ = 0; g < groups; ++g) {
      offset[g] = at_;
      at_ += cap[g];
    }
    int64_t max_position = 1;
    for (int64_t g = 0; g < groups; ++g) max_position = std::max(max_position, totals[g]);
    int pos_bits = 0;
    while ((int64_t{1} << pos_bits) < max_position) ++pos_bits;
    // 3. The candidate pass over everything, then the exact select (and tie position) per group.
    Upload sizes;
    const int collecting_at = sizes.add(collecting), offset_at = sizes.add(offset), cap_at = sizes.add(cap);
    sizes.send(device);
    const at::Tensor collecting_d = sizes.get(collecting_at), offset_d = sizes.get(offset_at), cap_d = sizes.get(cap_at);
    const at::Tensor cand_key = at::empty({std::max<int64_t>(total_cap, 1)}, opts.dtype(at::kInt));
    const at::Tensor cand_pos = at::empty({std::max<int64_t>(total_cap, 1)}, opts.dtype(at::kLong));
    at::Tensor fill = zero.get(fill_at);
    for_each_dtype([&](auto tag, int32_t code) {
      using scalar_t = decltype(tag);
      auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, 0, stream>>>(
            chunk_ptr, code, static_cast<int>(T), key_lo_ptr, key_hi_ptr, collecting_d.data_ptr<int32_t>(), single_ptr,
            offset_d.data_ptr<int64_t>(), cap_d.data_ptr<int64_t>(),
            reinterpret_cast<unsigned long long*>(fill.data_ptr()), above_ptr,
            reinterpret_cast<uint32_t*>(cand_key.data_ptr()), cand_pos.data_ptr<int64_t>(),
            tie_counts.data_ptr<int64_t>(), nonfinite ? nonfinite->data_ptr<int32_t>() : nullptr);
        NK_CUDA_CHECK_LAUNCH();
      };
      if (nonfinite)
        launch(collect_kernel<scalar_t, true>);
      else
        launch(collect_kernel<scalar_t, false>);
    });
    candidate_select_kernel<<<static_cast<unsigned>(groups), kSelectThreads, 0, stream>>>(
        reinterpret_cast<const uint32_t*>(cand_key.data_ptr()), cand_pos.data_ptr<int64_t>(), offset_d.data_ptr<int64_t>(),
        cap_d.data_ptr<int64_t>(), reinterpret_cast<const unsigned long long*>(fill.data_ptr()), above_ptr,
        k_d.data_ptr<int64_t>(), collecting_d.data_ptr<int32_t>(), single_ptr, key_lo_ptr, key_hi_ptr, keep_ties, pos_bits,
        threshold.data_ptr<float>(), tie_limit.data_ptr<int64_t>(), failed_ptr, prefix_ptr, remaining_ptr,
        exact.data_ptr<int32_t>());
    NK_CUDA_CHECK_LAUNCH();
    // 4. Groups whose window or candidates missed redo all three digits over every key. The
    //    passes are launched whether or not any group needs them, behind a device flag (any group
    //    to redo), so no host sync stalls the stream here.
    redo.copy_(active_d * ((failed != 0) | (collecting_d == 0)).to(at::kInt));
    exact.mul_(1 - redo);  // a single-key group that missed is redone from scratch
    prefix.mul_(1 - redo);
    remaining.copy_(at::where(redo != 0, k_d, remaining));
    const int32_t* redo_ptr = redo.data_ptr<int32_t>();
    const at::Tensor redo_any = redo.amax();
    const int32_t* gate = redo_any.data_ptr<int32_t>();
    pass(Dense{}, chunk_ptr, total_chunks, gated_grid, gate, redo_ptr, 20);
    select_kernel<<<warp_blocks, 32 * kGroupsPerBlock, 0, stream>>>(hist_ptr, prefix_ptr, remaining_ptr, redo_ptr, 11, ties_ptr,
                                                    static_cast<int>(groups));
    NK_CUDA_CHECK_LAUNCH();
    pass(Prefix{}, chunk_ptr, total_chunks, gated_grid, gate, redo_ptr, 10);
    select_kernel<<<warp_blocks, 32 * kGroupsPerBlock, 0, stream>>>(hist_ptr, prefix_ptr, remaining_ptr, redo_ptr, 10, ties_ptr,
                                                    static_cast<int>(groups));
    NK_CUDA_CHECK_LAUNCH();
    pass(Prefix{}, chunk_ptr, total_chunks, gated_grid, gate, redo_ptr, 0);
    select_kernel<<<warp_blocks, 32 * kGroupsPerBlock, 0, stream>>>(hist_ptr, prefix_ptr, remaining_ptr, redo_ptr, 10, ties_ptr,
                                                    static_cast<int>(groups));
    NK_CUDA_CHECK_LAUNCH();
  }
  finish_kernel<<<group_blocks, 128, 0, stream>>>(prefix_ptr, k_d.data_ptr<int64_t>(), redo.data_ptr<int32_t>(),
                                                  threshold.data_ptr<float>(), tie_limit.data_ptr<int64_t>(),
                                                  static_cast<int>(groups));
  NK_CUDA_CHECK_LAUNCH();
  if (keep_ties || num_chunks == 0) return {threshold, tie_limit};
  // Full-digit groups that keep only part of their ties count them per chunk here (single-key
  // groups did in the candidate pass); then the position of the last tie kept. Launched always,
  // like the redo passes: behind a gate, or with a block per group that returns at once.
  const at::Tensor exact_redo = ((redo != 0) & (remaining < ties.to(at::kLong))).to(at::kInt);
  const at::Tensor exact_redo_any = exact_redo.amax();
  exact.add_(exact_redo);
  const at::Tensor first_d = up.get(first_at);
  for_each_dtype([&](auto tag, int32_t code) {
    using scalar_t = decltype(tag);
    tie_count_kernel<scalar_t><<<gated_grid, kThreads, 0, stream>>>(
        chunk_ptr, total_chunks, exact_redo_any.data_ptr<int32_t>(), code, static_cast<int>(T), prefix_ptr,
        exact_redo.data_ptr<int32_t>(), tie_counts.data_ptr<int64_t>());
    NK_CUDA_CHECK_LAUNCH();
  });
  at::Tensor chunk_of = zero.get(chunk_of_at), need_in_chunk = zero.get(need_in_chunk_at);
  tie_chunk_kernel<<<static_cast<unsigned>(groups), kScanThreads, 0, stream>>>(
      tie_counts.data_ptr<int64_t>(), total_chunks, first_d.data_ptr<int64_t>(), exact.data_ptr<int32_t>(),
      remaining.data_ptr<int64_t>(), chunk_of.data_ptr<int64_t>(), need_in_chunk.data_ptr<int64_t>(),
      static_cast<int>(T), per_tensor);
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
