// apply_rope (forward and transposed, q and k in one launch) and rerotate: one kernel body, per element type.
//
// One thread per (token, pair slot): slot s < half is the NeoX pair (s, s + half), whose cos/sin the thread computes
// once (sincosf, see rope_math.cuh) and applies to every head of q then k; slot s >= half copies two pass-through
// channels. Adjacent threads take adjacent slots of a token, so a head's row is read and written coalesced.
// The table: apply_rope reads each sequence's flag from is_long[]; rerotate rotates by angle(to) - angle(from),
// scaled by a_to / a_from (the formula of the torch and triton backends).
#include <cuda_runtime.h>

#include "dtype.cuh"
#include "lr2_cuda.h"
#include "rope_math.cuh"

namespace lr2 {

namespace {

constexpr int kRopeThreads = 256;

// The sequence of token t of a varlen batch: the last b with cu_seqlens[b] <= t (empty sequences own no token).
__device__ __forceinline__ int sequence_of(const int32_t* cu_seqlens, int batch, int64_t t) {
    int lo = 0, hi = batch;  // invariant: cu[lo] <= t < cu[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (cu_seqlens[mid] <= t) lo = mid; else hi = mid;
    }
    return lo;
}

template <typename T>
__global__ void __launch_bounds__(kRopeThreads) rope_rotate_kernel(const RopeParams p) {
    const int slots = p.head_dim / 2;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t num_tokens = p.cu_seqlens ? static_cast<int64_t>(p.seq_len) : static_cast<int64_t>(p.batch) * p.seq_len;
    if (idx >= num_tokens * slots) return;
    const int64_t token = idx / slots;
    const int s = static_cast<int>(idx % slots);

    // Where the token is: (sequence, index in it, row offset used with the token stride).
    int seq, index;
    int64_t row;
    if (p.cu_seqlens) {
        seq = sequence_of(p.cu_seqlens, p.batch, token);
        index = static_cast<int>(token - p.cu_seqlens[seq]);
        row = token;  // varlen strides: (0, head, token)
    } else {
        seq = static_cast<int>(token / p.seq_len);
        index = static_cast<int>(token % p.seq_len);
        row = index;
    }

    int d1, d2;
    float c = 1.0f, sn = 0.0f;
    const bool rotates = s < p.half;
    if (rotates) {
        d1 = s;
        d2 = s + p.half;
        int position = index;
        if (p.positions) position = p.cu_seqlens ? p.positions[token] : p.positions[seq * p.stride_pos_b + index];
        if (p.rerotate) {
            float cf, sf, ct, st;
            rope_cos_sin(rope_angle(position, p.inv_freq[p.from_long * p.half + s]), 1.0f, &cf, &sf);
            rope_cos_sin(rope_angle(position, p.inv_freq[p.to_long * p.half + s]), p.scale, &ct, &st);
            rerotate_cos_sin(cf, sf, ct, st, &c, &sn);
        } else {
            const int is_long = p.is_long[seq];
            rope_cos_sin(rope_angle(position, p.inv_freq[is_long * p.half + s]),
                         is_long ? p.attention_long : p.attention_short, &c, &sn);
        }
    } else {
        d1 = 2 * p.half + 2 * (s - p.half);
        d2 = d1 + 1;
    }

#pragma unroll
    for (int which = 0; which < 2; ++which) {
        const T* x = static_cast<const T*>(p.x[which]) + seq * p.x_strides[which][0] + row * p.x_strides[which][2];
        T* y = static_cast<T*>(p.y[which]) + seq * p.y_strides[which][0] + row * p.y_strides[which][2];
        for (int h = 0; h < p.heads[which]; ++h) {
            const T* xh = x + h * p.x_strides[which][1];
            T* yh = y + h * p.y_strides[which][1];
            float y1 = to_float(xh[d1]), y2 = to_float(xh[d2]);
            if (rotates) rotate_pair(y1, y2, c, sn, p.transposed != 0, &y1, &y2);
            yh[d1] = from_float<T>(y1);
            yh[d2] = from_float<T>(y2);
        }
    }
}

template <typename T>
cudaError_t launch(const RopeParams& p, cudaStream_t stream) {
    const int64_t num_tokens = p.cu_seqlens ? static_cast<int64_t>(p.seq_len) : static_cast<int64_t>(p.batch) * p.seq_len;
    const int64_t threads = num_tokens * (p.head_dim / 2);
    if (threads == 0 || p.heads[0] + p.heads[1] == 0) return cudaSuccess;
    const int64_t blocks = (threads + kRopeThreads - 1) / kRopeThreads;
    if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    rope_rotate_kernel<T><<<static_cast<unsigned>(blocks), kRopeThreads, 0, stream>>>(p);
    return cudaGetLastError();
}

}  // namespace

const char* rope_rotate(int dtype, const RopeParams& p, void* stream) {
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    cudaError_t err;
    switch (dtype) {
        case kFloat32: err = launch<float>(p, s); break;
        case kFloat16: err = launch<__half>(p, s); break;
        case kBFloat16: err = launch<__nv_bfloat16>(p, s); break;
        default: return "rope: unsupported dtype code";
    }
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

int cuda_device_count(const char** error) {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        *error = cudaGetErrorString(err);
        cudaGetLastError();  // clear the sticky-free error state
        return 0;
    }
    *error = nullptr;
    return count;
}

}  // namespace lr2
