// Helpers shared by the CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace neurokern::cuda {

// Calls f(scalar_t{}) with the CUDA storage type of the dtypes the ops accept.
template <typename F>
void dispatch_storage(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(__nv_bfloat16{});
      break;
    case at::kHalf:
      f(__half{});
      break;
    default:
      TORCH_CHECK(false, "neurokern.", op, ": expected float32, bfloat16 or float16 tensors, got ", st);
  }
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

#define NK_CUDA_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()

}  // namespace neurokern::cuda
