// The subset of the CUDA runtime and language the csrc/ kernels use, for their host emulation (tests/cuda only).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "lr2_host.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

using std::max;
using std::min;

struct uint4 {
    unsigned x, y, z, w;
};

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
using cudaStream_t = struct CUstream_st*;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "host emulation error"; }

// Dynamic shared memory (csrc's DecodeShape::DYNAMIC_SMEM kernels): the device's per-block opt-in limit (a test may
// lower it: lr2_host::set_smem_optin) and the per-kernel attribute the launch must set before launching with more than
// 48 KB (the emulated launch fails otherwise, as a GPU's would).
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
inline cudaError_t cudaGetDevice(int* device) {
    *device = lr2_host::g_device;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
    *value = lr2_host::g_smem_optin;
    return cudaSuccess;
}
template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute, int value) {
    lr2_host::g_dynamic_smem_allowed[reinterpret_cast<const void*>(kernel)] = value;
    return cudaSuccess;
}

inline void __syncthreads() { lr2_host::sync_threads(); }
inline float __shfl_xor_sync(unsigned, float value, int offset) { return lr2_host::shuffle_xor(value, offset); }
inline float __shfl_sync(unsigned, float value, int src_lane) { return lr2_host::shuffle_idx(value, src_lane); }
inline void __syncwarp(unsigned = 0xffffffffu) { lr2_host::warp_exchange(0.0f); }  // the warp's barrier
inline int __any_sync(unsigned, int predicate) { return lr2_host::any(predicate != 0); }
template <typename T>
inline T __ldg(const T* address) {
    return *address;  // the read-only cache path: a plain read (a bad address faults, as it would on a GPU)
}

// kernel<<<grid, block, smem, stream>>>(args...) is written LR2_LAUNCH(kernel, grid, block, stream)(args...) in csrc/
// (smem 0), or LR2_LAUNCH_SMEM(kernel, grid, block, smem, stream)(args...); the kernel takes its dynamic shared memory
// with LR2_DYNAMIC_SHARED(name, bytes) (the emulation fails a kernel that uses more than the launch gave).
#define LR2_LAUNCH(kernel, grid, block, stream) lr2_host::launch_with(kernel, grid, block, 0)
#define LR2_LAUNCH_SMEM(kernel, grid, block, smem, stream) lr2_host::launch_with(kernel, grid, block, smem)
#define LR2_DYNAMIC_SHARED(name, bytes) unsigned char* name = lr2_host::dynamic_shared(bytes)
namespace lr2_host {
template <typename Kernel>
struct Launcher {
    Kernel kernel;
    dim3 grid, block;
    int smem;
    template <typename... Args>
    void operator()(Args... args) const {
        if (smem > 48 * 1024) {
            const auto allowed = g_dynamic_smem_allowed.find(reinterpret_cast<const void*>(kernel));
            if (allowed == g_dynamic_smem_allowed.end() || allowed->second < smem) {
                fail("launch: dynamic shared memory past 48 KB without cudaFuncSetAttribute("
                     "cudaFuncAttributeMaxDynamicSharedMemorySize) for the kernel");
                return;
            }
        }
        launch(kernel, grid, block, smem, args...);
    }
};
template <typename Kernel>
Launcher<Kernel> launch_with(Kernel kernel, dim3 grid, dim3 block, int smem) {
    return {kernel, grid, block, smem};
}
}  // namespace lr2_host
