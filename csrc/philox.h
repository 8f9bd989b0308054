// Philox-4x32-10 (Salmon et al., SC'11), the counter-based generator behind DARE's drop mask.
// Host and device code share this header so that every backend draws the same mask.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define NK_HD __host__ __device__ __forceinline__
#else
#define NK_HD inline
#endif

namespace neurokern {

struct Philox4 {
  uint32_t x[4];
};

NK_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

NK_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                            uint32_t k1) {
  constexpr uint32_t kMulA = 0xD2511F53u, kMulB = 0xCD9E8D57u;
  constexpr uint32_t kWeylA = 0x9E3779B9u, kWeylB = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_a = mulhi32(kMulA, c0), lo_a = kMulA * c0;
    const uint32_t hi_b = mulhi32(kMulB, c2), lo_b = kMulB * c2;
    const uint32_t n0 = hi_b ^ c1 ^ k0, n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += kWeylA;
    k1 += kWeylB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Keep threshold on 32-bit draws: an entry survives iff draw < dare_threshold(density), with
// probability p = dare_threshold(density) / 2^32: density itself where density * 2^24 is an
// integer (those keep what the rule on 24-bit draws kept), density to within 2^-33 elsewhere; 0
// (nothing kept) below density 2^-33.
NK_HD uint64_t dare_threshold(double density) {
  const double t = density * 4294967296.0 + 0.5;
  return t >= 4294967296.0 ? uint64_t{4294967296u} : static_cast<uint64_t>(t);
}

// The "density" rescale of kept entries: 1 / p, with p the keep probability actually used, so that
// the expectation of a kept-and-rescaled entry is the entry (0 where nothing is kept).
NK_HD double dare_factor(double density) {
  const uint64_t t = dare_threshold(density);
  return t ? 4294967296.0 / static_cast<double>(t) : 0.0;
}

// Draw for element `index` of a tensor under `key`: counter (index / 4), lane index % 4.
NK_HD uint32_t dare_draw(uint64_t key, int64_t index) {
  const uint64_t block = static_cast<uint64_t>(index) >> 2;
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                                  0u, 0u, static_cast<uint32_t>(key),
                                  static_cast<uint32_t>(key >> 32));
  return r.x[index & 3];
}

}  // namespace neurokern
