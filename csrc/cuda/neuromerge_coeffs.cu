// NeuroMerging's per-neuron T x T solve on the GPU: one thread per row, the residual Gram and its
// eigenvectors in registers (cyclic Jacobi, float64, loops unrolled for T = 1..8), then TIES on the
// coordinates U Sigma and the coefficients of the merged row (same steps as the CPU kernel).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cuda/common.cuh"

namespace neurokern::cuda {
namespace {

__device__ __forceinline__ int sign_of(double v) { return (v > 0) - (v < 0); }

// TIES over x[0..T) (stride S): elected sign (fallback when the sum is 0; 0 elects the negative
// side), mean of the agreeing values.
template <int T, int S>
__device__ __forceinline__ double disjoint_mean(const double* x, int fallback) {
  double sum = 0.0;
#pragma unroll
  for (int t = 0; t < T; ++t) sum += x[t * S];
  int s = sign_of(sum);
  if (s == 0) s = fallback;
  double acc = 0.0;
  int count = 0;
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const double v = x[t * S];
    if (s > 0 ? v > 0 : v < 0) {
      acc += v;
      ++count;
    }
  }
  return acc / (count > 0 ? count : 1);
}

// Rutishauser's rule, as the CPU kernel's jacobi_eigen: from sweep SKIP_FROM_SWEEP on, an
// off-diagonal entry too small to change either diagonal entry of its pair is set to zero instead
// of rotated (without it, the rows whose rounding stays above the stopping test ran 100 sweeps,
// and with them every row of their warp).
constexpr int SKIP_FROM_SWEEP = 3;

__device__ __forceinline__ bool negligible(double apq, double app, double aqq) {
  const double g = 100.0 * fabs(apq);
  return fabs(app) + g == fabs(app) && fabs(aqq) + g == fabs(aqq);
}

template <int T>
__device__ void jacobi(double (&A)[T][T], double (&V)[T][T]) {
#pragma unroll
  for (int p = 0; p < T; ++p)
#pragma unroll
    for (int q = 0; q < T; ++q) V[p][q] = p == q ? 1.0 : 0.0;
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0.0, all = 0.0;
#pragma unroll
    for (int p = 0; p < T; ++p)
#pragma unroll
      for (int q = 0; q < T; ++q) {
        all += A[p][q] * A[p][q];
        if (p != q) off += A[p][q] * A[p][q];
      }
    if (off <= 1e-32 * all || off == 0.0) return;
#pragma unroll
    for (int p = 0; p < T; ++p) {
#pragma unroll
      for (int q = p + 1; q < T; ++q) {
        const double apq = A[p][q];
        if (sweep >= SKIP_FROM_SWEEP && negligible(apq, A[p][p], A[q][q])) {
          A[p][q] = A[q][p] = 0.0;
        } else if (apq != 0.0) {
          const double theta = (A[q][q] - A[p][p]) / (2.0 * apq);
          const double t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
          const double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
#pragma unroll
          for (int k = 0; k < T; ++k) {
            const double akp = A[k][p], akq = A[k][q];
            A[k][p] = c * akp - s * akq;
            A[k][q] = s * akp + c * akq;
          }
#pragma unroll
          for (int k = 0; k < T; ++k) {
            const double apk = A[p][k], aqk = A[q][k];
            A[p][k] = c * apk - s * aqk;
            A[q][k] = s * apk + c * aqk;
          }
#pragma unroll
          for (int k = 0; k < T; ++k) {
            const double vkp = V[k][p], vkq = V[k][q];
            V[k][p] = c * vkp - s * vkq;
            V[k][q] = s * vkp + c * vkq;
          }
        }
      }
    }
  }
}

template <int T>
__global__ void coeffs_kernel(const double* gram, const double* dots, const double* sqnorm, int64_t R,
                              double lambda_parallel, double lambda_orthogonal, bool unit, double gamma,
                              const int* row_majority, float* out) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= R) return;
  const double q = sqnorm[r];
  double c[T], M[T][T], U[T][T];
#pragma unroll
  for (int t = 0; t < T; ++t) c[t] = q > 0.0 ? dots[r * T + t] / q : 0.0;
#pragma unroll
  for (int s = 0; s < T; ++s)
#pragma unroll
    for (int t = 0; t < T; ++t) M[s][t] = gram[(r * T + s) * T + t] - c[s] * c[t] * q;
  jacobi<T>(M, U);
  double sigma[T], total = 0.0;
#pragma unroll
  for (int j = 0; j < T; ++j) {
    sigma[j] = sqrt(fmax(M[j][j], 0.0));
    total += sigma[j] * sigma[j];
  }
  // Noise floor of the Gram: relative to the task vectors' scale (see the CPU kernel).
  double scale = 0.0;
#pragma unroll
  for (int t = 0; t < T; ++t) scale = fmax(scale, gram[(r * T + t) * T + t]);
  const double floor = 1e-6 * sqrt(scale);
  // Coordinates A = U Sigma (components at the Gram's noise floor dropped) and their votes.
  double A[T][T];
  int votes = 0;
#pragma unroll
  for (int j = 0; j < T; ++j) {
    const bool active = sigma[j] > floor;
    double sum = 0.0;
#pragma unroll
    for (int t = 0; t < T; ++t) {
      A[t][j] = active ? U[t][j] * sigma[j] : 0.0;
      sum += A[t][j];
    }
    votes += sign_of(sum);
  }
  const int majority = sign_of(static_cast<double>(votes));
  double beta[T];
#pragma unroll
  for (int t = 0; t < T; ++t) beta[t] = 0.0;
#pragma unroll
  for (int j = 0; j < T; ++j) {
    // Rank cut-off without sorting: j is kept iff the variance share of the components ranked
    // before it (larger, or equal with a lower index) is below gamma.
    double before = 0.0;
#pragma unroll
    for (int i = 0; i < T; ++i)
      if (sigma[i] > sigma[j] || (sigma[i] == sigma[j] && i < j)) before += sigma[i] * sigma[i];
    const bool in_rank = total <= 0.0 || before / total < gamma;
    if (sigma[j] > floor && in_rank) {
      const double star = disjoint_mean<T, T>(&A[0][j], majority);
#pragma unroll
      for (int t = 0; t < T; ++t) beta[t] += star * U[t][j] / sigma[j];
    }
  }
  double base_coeff = 1.0;
#pragma unroll
  for (int t = 0; t < T; ++t) base_coeff -= lambda_orthogonal * beta[t] * c[t];
  if (lambda_parallel != 0.0 && q > 0.0) {
    const double c_star = disjoint_mean<T, 1>(c, *row_majority);
    base_coeff += lambda_parallel * c_star * (unit ? 1.0 / sqrt(q) : 1.0);
  }
  out[r] = static_cast<float>(base_coeff);
#pragma unroll
  for (int t = 0; t < T; ++t) out[(t + 1) * R + r] = static_cast<float>(lambda_orthogonal * beta[t]);
}

at::Tensor neuromerge_coeffs_cuda(const at::Tensor& gram, const at::Tensor& dots, const at::Tensor& sqnorm,
                                  double lambda_parallel, double lambda_orthogonal, c10::string_view parallel_basis,
                                  double gamma) {
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == gram.size(2),
              "neurokern.neuromerge_coeffs: gram must be [R, T, T], got ", gram.sizes());
  const int64_t R = gram.size(0), T = gram.size(1);
  TORCH_CHECK(dots.sizes() == at::IntArrayRef({R, T}), "neurokern.neuromerge_coeffs: dots must be [", R, ", ",
              T, "], got ", dots.sizes());
  TORCH_CHECK(sqnorm.sizes() == at::IntArrayRef({R}), "neurokern.neuromerge_coeffs: sqnorm must be [", R,
              "], got ", sqnorm.sizes());
  TORCH_CHECK(parallel_basis == "unit" || parallel_basis == "neuron",
              "neurokern.neuromerge_coeffs: parallel_basis must be \"unit\" or \"neuron\", got \"",
              std::string(parallel_basis), "\"");
  if (T > 8) {  // registers hold T <= 8; larger T run on the CPU kernel (the data is R x T x T)
    static auto cpu_op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("neurokern::neuromerge_coeffs", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                               double, c10::string_view, double)>();
    return cpu_op.call(gram.cpu(), dots.cpu(), sqnorm.cpu(), lambda_parallel, lambda_orthogonal, parallel_basis, gamma)
        .to(gram.device());
  }
  const c10::cuda::CUDAGuard guard(gram.device());
  const at::Tensor g = gram.to(at::kDouble).contiguous();
  const at::Tensor d = dots.to(at::kDouble).contiguous();
  const at::Tensor q = sqnorm.to(at::kDouble).contiguous();
  // Majority sign over the rows of sum_t c_t, for the parallel part's zero votes.
  const at::Tensor c = at::where(q.unsqueeze(1) > 0, d / q.clamp_min(1e-300).unsqueeze(1), at::zeros_like(d));
  const at::Tensor row_majority = at::sign(at::sign(c.sum(1)).sum()).to(at::kInt).reshape({1});
  at::Tensor out = at::empty({T + 1, R}, gram.options().dtype(at::kFloat));
  if (R == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int threads = 128;
  const int blocks = static_cast<int>((R + threads - 1) / threads);
  const bool unit = parallel_basis == "unit";
#define NK_LAUNCH(TT)                                                                                          \
  case TT:                                                                                                     \
    coeffs_kernel<TT><<<blocks, threads, 0, stream>>>(g.data_ptr<double>(), d.data_ptr<double>(),              \
                                                      q.data_ptr<double>(), R, lambda_parallel, lambda_orthogonal, \
                                                      unit, gamma, row_majority.data_ptr<int>(),               \
                                                      out.data_ptr<float>());                                  \
    break;
  switch (T) {
    NK_LAUNCH(1)
    NK_LAUNCH(2)
    NK_LAUNCH(3)
    NK_LAUNCH(4)
    NK_LAUNCH(5)
    NK_LAUNCH(6)
    NK_LAUNCH(7)
    NK_LAUNCH(8)
    default:
      TORCH_CHECK(false, "neurokern.neuromerge_coeffs: need at least one task");
  }
#undef NK_LAUNCH
  NK_CUDA_CHECK_LAUNCH();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CUDA, m) { m.impl("neuromerge_coeffs", &neuromerge_coeffs_cuda); }

}  // namespace neurokern::cuda
