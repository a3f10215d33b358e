// Warp-level tensor-core MMA (mma.sync, sm_80+) on fp16/bf16 operands with fp32 accumulators, for the decode kernel's
// GQA-8 tiles, and the packing of two 16-bit elements into the .b32 registers the fragments are made of.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 / m16n8k8" with .f16/.bf16), lane = 4 gid + tig:
// - A (16 x K, row-major), .b32 a[i] holds two consecutive columns (the lower column in the low half):
//   m16n8k16: a0 (row gid, cols 2 tig + {0,1}), a1 (row gid + 8, same), a2 (row gid, cols 8 + 2 tig + {0,1}),
//   a3 (row gid + 8, cols 8 + ...); m16n8k8: a0, a1 as above (K = 8).
// - B (K x 8, column-major): b0 (rows 2 tig + {0,1}, col gid), b1 (rows 8 + 2 tig + {0,1}, col gid) (k16 only).
// - C/D (16 x 8 fp32): c0 (row gid, col 2 tig), c1 (row gid, col 2 tig + 1), c2 (row gid + 8, col 2 tig),
//   c3 (row gid + 8, col 2 tig + 1).
// The host emulation of tests/cuda (LR2_HOST_EMULATION) gathers the warp's fragments through its warp exchange and
// computes every lane's outputs in fp32 (products of 16-bit values are exact in fp32; the sum order may differ from
// the tensor core's, within the tests' tolerances).
#pragma once

#include <cuda_runtime.h>

#include <cstring>
#include <type_traits>

#include "dtype.cuh"

namespace lr2 {

// The 16 bits of an fp16/bf16 element.
template <typename T>
__device__ __forceinline__ unsigned short bits16(T x) {
    unsigned short bits;
    memcpy(&bits, &x, 2);
    return bits;
}

template <typename T>
__device__ __forceinline__ T from_bits16(unsigned short bits) {
    T x;
    memcpy(&x, &bits, 2);
    return x;
}

// Two elements into one .b32 register (lo in the low half).
template <typename T>
__device__ __forceinline__ unsigned pack2(T lo, T hi) {
    return static_cast<unsigned>(bits16(lo)) | (static_cast<unsigned>(bits16(hi)) << 16);
}

// Two fp32 values rounded to T (to nearest even) into one .b32 register.
template <typename T>
__device__ __forceinline__ unsigned pack2_rn(float lo, float hi) {
    return pack2(from_float<T>(lo), from_float<T>(hi));
}

// Two consecutive elements (4-byte aligned) as one .b32 register.
template <typename T>
__device__ __forceinline__ unsigned load2(const T* p) {
    return *reinterpret_cast<const unsigned*>(p);
}

#if defined(LR2_HOST_EMULATION)
namespace mma_host {
template <typename T>
inline float element(unsigned reg, int high) {
    return to_float(from_bits16<T>(static_cast<unsigned short>(high ? reg >> 16 : reg & 0xffffu)));
}

// Every lane's registers of one fragment: all[lane][i].
template <int N>
inline void gather(const unsigned (&mine)[N], unsigned (&all)[32][N]) {
    for (int i = 0; i < N; ++i) {
        const unsigned* lanes = lr2_host::warp_exchange_bits(mine[i]);
        for (int lane = 0; lane < 32; ++lane) all[lane][i] = lanes[lane];
    }
}

// D = A B + C for this lane's fragment, K = 8 * KB (KB = 1 or 2): A (16 x K) from a (KB * 2 registers), B (K x 8)
// from b (KB registers).
template <typename T, int KB>
inline void mma(float (&c)[4], const unsigned (&a)[2 * KB], const unsigned (&b)[KB]) {
    unsigned all_a[32][2 * KB], all_b[32][KB];
    gather(a, all_a);
    gather(b, all_b);
    auto a_at = [&](int row, int k) {  // lane 4 (row % 8) + (k % 8) / 2, register (row / 8) + 2 (k / 8)
        return element<T>(all_a[4 * (row % 8) + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2);
    };
    auto b_at = [&](int k, int col) { return element<T>(all_b[4 * col + (k % 8) / 2][k / 8], k % 2); };
    const int lane = static_cast<int>(threadIdx.x % 32), gid = lane / 4, tig = lane % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = gid + 8 * (i / 2), col = 2 * tig + i % 2;
        float sum = c[i];
        for (int k = 0; k < 8 * KB; ++k) sum += a_at(row, k) * b_at(k, col);
        c[i] = sum;
    }
}
}  // namespace mma_host
#endif

// c += A (16 x 16) B (16 x 8), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#if defined(LR2_HOST_EMULATION)
    mma_host::mma<T, 2>(c, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same<T, __half>::value) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#elif defined(__CUDA_ARCH__)
#error "csrc/mma.cuh: mma.sync on fp16/bf16 needs sm_80 or newer (LR2_CUDA_ARCHS)"
#endif
}

// c += A (16 x 8) B (8 x 8), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_1688(float (&c)[4], const unsigned (&a)[2], const unsigned (&b)[1]) {
#if defined(LR2_HOST_EMULATION)
    mma_host::mma<T, 1>(c, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same<T, __half>::value) {
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(b[0]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(b[0]));
    }
#elif defined(__CUDA_ARCH__)
#error "csrc/mma.cuh: mma.sync on fp16/bf16 needs sm_80 or newer (LR2_CUDA_ARCHS)"
#endif
}

}  // namespace lr2
