// Loads and stores of the element types as fp32 (the kernels compute in fp32 only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// kernel<<<grid, block, 0, stream>>>(args) as LR2_LAUNCH(kernel, grid, block, stream)(args), kernel a function
// pointer variable (a template-id's commas would split the macro's arguments), and with `smem` bytes of dynamic shared
// memory as LR2_LAUNCH_SMEM(kernel, grid, block, smem, stream)(args). In a kernel, LR2_DYNAMIC_SHARED(name, bytes)
// declares the block's dynamic shared memory as `unsigned char name[]` (16-byte aligned; `bytes`, what the kernel
// uses, is checked against the launch's by the emulation). tests/cuda's host emulation defines its own.
#if !defined(LR2_HOST_EMULATION)
#define LR2_LAUNCH(kernel, grid, block, stream) kernel<<<grid, block, 0, stream>>>
#define LR2_LAUNCH_SMEM(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define LR2_DYNAMIC_SHARED(name, bytes) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace lr2 {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

}  // namespace lr2
