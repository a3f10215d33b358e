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

inline void __syncthreads() { lr2_host::sync_threads(); }
inline float __shfl_xor_sync(unsigned, float value, int offset) { return lr2_host::shuffle_xor(value, offset); }
inline float __shfl_sync(unsigned, float value, int src_lane) { return lr2_host::shuffle_idx(value, src_lane); }
inline void __syncwarp(unsigned = 0xffffffffu) { lr2_host::warp_exchange(0.0f); }  // the warp's barrier
inline int __any_sync(unsigned, int predicate) { return lr2_host::any(predicate != 0); }
template <typename T>
inline T __ldg(const T* address) {
    return *address;  // the read-only cache path: a plain read (a bad address faults, as it would on a GPU)
}

// kernel<<<grid, block, 0, stream>>>(args...) is written LR2_LAUNCH(kernel, grid, block, stream)(args...) in csrc/.
#define LR2_LAUNCH(kernel, grid, block, stream) lr2_host::launch_with(kernel, grid, block)
namespace lr2_host {
template <typename Kernel>
struct Launcher {
    Kernel kernel;
    dim3 grid, block;
    template <typename... Args>
    void operator()(Args... args) const {
        launch(kernel, grid, block, args...);
    }
};
template <typename Kernel>
Launcher<Kernel> launch_with(Kernel kernel, dim3 grid, dim3 block) {
    return {kernel, grid, block};
}
}  // namespace lr2_host
