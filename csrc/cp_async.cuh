// 16-byte asynchronous copies global -> shared memory (cp.async, sm_80+) in commit groups, for the kernels' tile
// pipelines: issue tile i + STAGES - 1, commit, wait until tile i has landed (cp_async_wait<STAGES - 1>), compute it.
//
// Below sm_80 the copy is a synchronous 16-byte load and store (the wait then has nothing to wait for). The host
// emulation of tests/cuda (LR2_HOST_EMULATION) queues the copies and performs them only at the wait that lets them
// complete, so a tile read before its wait is caught there.
#pragma once

#include <cuda_runtime.h>

namespace lr2 {

// Copy 16 bytes from global `src` to shared `dst` (both 16-byte aligned); !valid: zero-fill dst and read nothing
// (src is then never dereferenced).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#if defined(LR2_HOST_EMULATION)
    lr2_host::cp_async_16(dst, src, valid);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    const int src_bytes = valid ? 16 : 0;  // src-size 0: the 16 bytes are zero-filled, nothing is read
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(src), "r"(src_bytes));
#else
    uint4 value{0u, 0u, 0u, 0u};
    if (valid) value = *static_cast<const uint4*>(src);
    *static_cast<uint4*>(dst) = value;
#endif
}

// Close the group of the copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(LR2_HOST_EMULATION)
    lr2_host::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most PENDING of this thread's committed groups are still in flight (the others have landed). Other
// threads' copies are visible only after a __syncthreads that follows their wait.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
#if defined(LR2_HOST_EMULATION)
    lr2_host::cp_async_wait(PENDING);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
#endif
}

}  // namespace lr2
