// NeuroMerging's per-neuron solve in Gram form (neuromerging.md, "The fast form"): from the T x T
// Gram of the trimmed task vectors, their dots with the neuron w and |w|^2, compute the
// coefficients a of   merged row = a[0] w + sum_t a[t+1] tau_t.
#include <torch/library.h>

#include <algorithm>
#include <numeric>

#include "cpu/common.h"

namespace neurokern::cpu {
namespace {

// Cyclic Jacobi eigen-solve of the symmetric n x n matrix A (row-major, destroyed): eigenvalues
// on A's diagonal, eigenvectors in V's columns. From sweep SKIP_FROM_SWEEP on, an off-diagonal
// entry too small to change either diagonal entry of its pair (|a_pp| + 100 |a_pq| == |a_pp|, and
// likewise for a_qq) is set to zero instead of rotated away (Rutishauser's rule): rounding leaves
// such entries in some rows just above the 1e-32 relative stopping test, and the sweeps then ran
// to their limit of 100.
constexpr int SKIP_FROM_SWEEP = 3;

inline bool negligible(double apq, double app, double aqq) {
  const double g = 100.0 * std::fabs(apq);
  return std::fabs(app) + g == std::fabs(app) && std::fabs(aqq) + g == std::fabs(aqq);
}

void jacobi_eigen(std::vector<double>& A, std::vector<double>& V, int64_t n) {
  std::fill(V.begin(), V.end(), 0.0);
  for (int64_t i = 0; i < n; ++i) V[i * n + i] = 1.0;
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0.0, all = 0.0;
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = 0; q < n; ++q) {
        all += A[p * n + q] * A[p * n + q];
        if (p != q) off += A[p * n + q] * A[p * n + q];
      }
    if (off <= 1e-32 * all || off == 0.0) return;
    for (int64_t p = 0; p < n; ++p) {
      for (int64_t q = p + 1; q < n; ++q) {
        const double apq = A[p * n + q];
        if (sweep >= SKIP_FROM_SWEEP && negligible(apq, A[p * n + p], A[q * n + q])) {
          A[p * n + q] = A[q * n + p] = 0.0;
          continue;
        }
        if (apq == 0.0) continue;
        // Rotation that zeroes A[p, q]: t = tan(phi), the smaller root of t^2 + 2 theta t - 1 = 0.
        const double theta = (A[q * n + q] - A[p * n + p]) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (int64_t k = 0; k < n; ++k) {
          const double akp = A[k * n + p], akq = A[k * n + q];
          A[k * n + p] = c * akp - s * akq;
          A[k * n + q] = s * akp + c * akq;
        }
        for (int64_t k = 0; k < n; ++k) {
          const double apk = A[p * n + k], aqk = A[q * n + k];
          A[p * n + k] = c * apk - s * aqk;
          A[q * n + k] = s * apk + c * aqk;
        }
        for (int64_t k = 0; k < n; ++k) {
          const double vkp = V[k * n + p], vkq = V[k * n + q];
          V[k * n + p] = c * vkp - s * vkq;
          V[k * n + q] = s * vkp + c * vkq;
        }
      }
    }
  }
}

// TIES over the values x[0..T): elected sign s (fallback when their sum is 0; a fallback of 0
// elects the negative side, as the reference's where(s > 0, x > 0, x < 0) does), disjoint mean.
inline double disjoint_mean(const double* x, int64_t T, int64_t stride, int fallback) {
  double sum = 0.0;
  for (int64_t t = 0; t < T; ++t) sum += x[t * stride];
  int s = sign_of(sum);
  if (s == 0) s = fallback;
  double acc = 0.0;
  int64_t count = 0;
  for (int64_t t = 0; t < T; ++t) {
    const double v = x[t * stride];
    if (s > 0 ? v > 0 : v < 0) {
      acc += v;
      ++count;
    }
  }
  return acc / std::max<int64_t>(count, 1);
}

at::Tensor neuromerge_coeffs_cpu(const at::Tensor& gram, const at::Tensor& dots,
                                 const at::Tensor& sqnorm, double lambda_parallel,
                                 double lambda_orthogonal, c10::string_view parallel_basis,
                                 double gamma) {
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == gram.size(2),
              "neurokern.neuromerge_coeffs: gram must be [R, T, T], got ", gram.sizes());
  const int64_t R = gram.size(0), T = gram.size(1);
  TORCH_CHECK(dots.sizes() == at::IntArrayRef({R, T}),
              "neurokern.neuromerge_coeffs: dots must be [", R, ", ", T, "], got ", dots.sizes());
  TORCH_CHECK(sqnorm.sizes() == at::IntArrayRef({R}),
              "neurokern.neuromerge_coeffs: sqnorm must be [", R, "], got ", sqnorm.sizes());
  TORCH_CHECK(parallel_basis == "unit" || parallel_basis == "neuron",
              "neurokern.neuromerge_coeffs: parallel_basis must be \"unit\" or \"neuron\", got \"",
              std::string(parallel_basis), "\"");
  const bool unit = parallel_basis == "unit";
  const at::Tensor g64 = gram.to(at::kDouble).contiguous();
  const at::Tensor d64 = dots.to(at::kDouble).contiguous();
  const at::Tensor q64 = sqnorm.to(at::kDouble).contiguous();
  const double* Gp = g64.const_data_ptr<double>();
  const double* Dp = d64.const_data_ptr<double>();
  const double* Qp = q64.const_data_ptr<double>();
  at::Tensor out = at::empty({T + 1, R}, at::kFloat);
  float* A = out.data_ptr<float>();

  // Parallel coefficients c_t = d_t / q (0 where w = 0) and, for a zero vote, the majority sign
  // of sum_t c_t over the rows of the matrix.
  auto coeff = [&](int64_t r, int64_t t) { return Qp[r] > 0.0 ? Dp[r * T + t] / Qp[r] : 0.0; };
  int row_majority = 0;
  if (lambda_parallel != 0.0) {
    int64_t votes = 0;
    for (int64_t r = 0; r < R; ++r) {
      double sum = 0.0;
      for (int64_t t = 0; t < T; ++t) sum += coeff(r, t);
      votes += sign_of(sum);
    }
    row_majority = sign_of(static_cast<double>(votes));
  }

  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    std::vector<double> M(T * T), U(T * T), c(T), sigma(T), coords(T * T), star(T), beta(T);
    std::vector<int64_t> order(T);
    for (int64_t r = r0; r < r1; ++r) {
      const double q = Qp[r];
      for (int64_t t = 0; t < T; ++t) c[t] = coeff(r, t);
      // Gram of the orthogonal residuals: G_st = g_st - c_s c_t q.
      for (int64_t s = 0; s < T; ++s)
        for (int64_t t = 0; t < T; ++t) M[s * T + t] = Gp[r * T * T + s * T + t] - c[s] * c[t] * q;
      jacobi_eigen(M, U, T);
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(),
                [&](int64_t a, int64_t b) { return M[a * T + a] > M[b * T + b]; });
      double total = 0.0;
      for (int64_t j = 0; j < T; ++j) {
        sigma[j] = std::sqrt(std::max(M[order[j] * T + order[j]], 0.0));
        total += sigma[j] * sigma[j];
      }
      // Components at or below the numerical noise of the Gram are rank deficiency: dropped. The
      // noise scales with the task vectors (not with sigma_0, which is itself noise when every
      // task vector is parallel to w, e.g. one-column matrices).
      double scale = 0.0;
      for (int64_t t = 0; t < T; ++t) scale = std::max(scale, Gp[r * T * T + t * T + t]);
      const double floor = 1e-6 * std::sqrt(scale);
      // Rank by cumulative variance: components before the first whose cumulative share reaches
      // gamma, plus that one (the reference's (cum_var < gamma).sum() + 1).
      int64_t rank = T;
      if (total > 0.0) {
        double cum = 0.0;
        int64_t below = 0;
        for (int64_t j = 0; j < T; ++j) {
          cum += sigma[j] * sigma[j];
          below += (cum / total) < gamma;
        }
        rank = std::min(below + 1, T);
      }
      // Coordinates A = U Sigma; TIES per coordinate, majority sign over the coordinates on ties.
      int64_t votes = 0;
      for (int64_t j = 0; j < T; ++j) {
        const bool active = sigma[j] > floor;
        double sum = 0.0;
        for (int64_t t = 0; t < T; ++t) {
          coords[t * T + j] = active ? U[t * T + order[j]] * sigma[j] : 0.0;
          sum += coords[t * T + j];
        }
        votes += sign_of(sum);
      }
      const int coord_majority = sign_of(static_cast<double>(votes));
      std::fill(beta.begin(), beta.end(), 0.0);
      for (int64_t j = 0; j < rank; ++j) {
        if (!(sigma[j] > floor)) continue;
        star[j] = disjoint_mean(&coords[j], T, T, coord_majority);
        // Merged residual sum_j a*_j v_j with v_j = R^T u_j / sigma_j: beta_t = sum_j a*_j U_tj / sigma_j.
        for (int64_t t = 0; t < T; ++t) beta[t] += star[j] * U[t * T + order[j]] / sigma[j];
      }
      double base_coeff = 1.0;
      for (int64_t t = 0; t < T; ++t) base_coeff -= lambda_orthogonal * beta[t] * c[t];
      if (lambda_parallel != 0.0 && q > 0.0) {
        const double c_star = disjoint_mean(c.data(), T, 1, row_majority);
        base_coeff += lambda_parallel * c_star * (unit ? 1.0 / std::sqrt(q) : 1.0);
      }
      A[r] = static_cast<float>(base_coeff);
      for (int64_t t = 0; t < T; ++t) A[(t + 1) * R + r] = static_cast<float>(lambda_orthogonal * beta[t]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) { m.impl("neuromerge_coeffs", &neuromerge_coeffs_cpu); }

}  // namespace neurokern::cpu
