// rope_decode: split-KV (flash-decoding) attention of n new PRE-RoPE queries on a cache of PRE-RoPE keys.
//
// One kernel body, instantiated per (element type, head_dim) in rope_decode_{f32,f16,bf16}.cu.
//
// Grid (B * Hk, num_splits, row blocks). A block serves one (sequence, kv head) and one KV split for ROWS packed
// rows of the GQA group: row g * n + t is q head kv_head * group + g, new token t (position seq_len - n + t). So each
// cached key of the split is read, and rotated, once for the whole group. Each of the NWARPS warps takes every
// NWARPS-th key of the split: its 32 lanes hold the head's channels as pair slots (slot s < half: the NeoX pair
// (s, s + half), rotated in registers; slot s >= half: two pass-through channels),
// score it against the ROWS rotated queries (held in registers, pre-scaled by softmax_scale * log2 e) with a warp
// reduction, and update their online-softmax states. At the end the warps' states are merged through shared memory.
// With one split the block writes the output; with more, its finished partial (o, lse), merged by the second kernel.
//
// The keys' angles: the loop walks tiles of key_tile<D>() positions (p0 a multiple of the tile; warp w takes offsets w,
// w + NWARPS, ...). In fp16/bf16 each lane calls sincosf once per tile and slot, and gets every key's cos/sin by angle
// addition with a per-block step table in shared memory (rope_cos_sin_step: 2.9e-7 from fp64, where HF rounds cos/sin
// to the model's dtype); in fp32 it keeps one sincosf per key (1.4e-7, as HF's fp32 path).
//
// The table is chosen per sequence from seqlens[b] on the device (no host sync). Slots past seqlens[b] are never read,
// nor any at or past the capacity: a sequence whose seqlens[b] exceeds it gets NaN rows.
#pragma once

#include <cuda_runtime.h>

#include "dtype.cuh"
#include "lr2_cuda.h"
#include "rope_math.cuh"

namespace lr2 {

constexpr int kDecodeWarps = 4;

// Positions per angle-addition tile: one sincosf per tile and slot, then tile / kDecodeWarps keys per warp by angle
// addition. The step table takes 2 * tile * D / 2 floats of static shared memory (48 KB in all), so half at D = 256.
template <int D>
__host__ __device__ constexpr int key_tile() {
    return D >= 256 ? 16 : 32;
}

// Angle addition for the keys where HF's own path rounds cos/sin to the model's dtype (fp16, bf16); fp32 keeps a
// sincosf per key (see rope_cos_sin_step and tests/cuda/test_host_math.py).
template <typename T>
__host__ __device__ constexpr bool step_angles() {
    return sizeof(T) == 2;
}

// Packed rows per block: the rotated queries and their accumulators live in registers (4 * D / 32 floats per row
// and lane), so fewer rows for the largest head.
template <int D>
__host__ __device__ constexpr int decode_rows() {
    return D >= 256 ? 4 : 8;
}

// Channels (d1, d2) of pair slot s, and whether the pair rotates.
__device__ __forceinline__ void slot_channels(int s, int half, int* d1, int* d2, bool* rotates) {
    if (s < half) {
        *d1 = s;
        *d2 = s + half;
        *rotates = true;
    } else {
        *d1 = 2 * half + 2 * (s - half);
        *d2 = *d1 + 1;
        *rotates = false;
    }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

template <typename T, int D>
__global__ void __launch_bounds__(kDecodeWarps * 32) rope_decode_kernel(const DecodeParams p) {
    constexpr int ROWS = decode_rows<D>();
    constexpr int SLOTS = D / 2;
    constexpr int SPL = (SLOTS + 31) / 32;  // pair slots per lane
    constexpr bool STEP = step_angles<T>();
    constexpr int TILE = key_tile<D>();
    constexpr int STEP_ROWS = STEP ? TILE : 1;
    __shared__ float sm_acc[kDecodeWarps][ROWS][D];
    __shared__ float sm_step_cos[STEP_ROWS][SLOTS];  // cos/sin of fl(t * inv_freq[s]), t < TILE (unscaled)
    __shared__ float sm_step_sin[STEP_ROWS][SLOTS];
    __shared__ float sm_m[kDecodeWarps][ROWS];
    __shared__ float sm_l[kDecodeWarps][ROWS];

    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int bh = blockIdx.x;
    const int seq = bh / p.num_kv_heads;
    const int kv_head = bh % p.num_kv_heads;
    const int split = blockIdx.y;
    const int num_rows = p.group * p.n_new;
    const int row0 = blockIdx.z * ROWS;

    const int seq_len = p.seqlens[seq];
    const int kv_len = max(0, min(seq_len, p.capacity));  // no key at or past the capacity is read
    const bool is_long = seq_len > p.original_max_position;
    const float* inv_freq = p.inv_freq + (is_long ? p.half : 0);
    const float attention = is_long ? p.attention_long : p.attention_short;

    if (STEP) {
        for (int idx = threadIdx.x; idx < TILE * p.half; idx += blockDim.x) {
            const int t = idx / p.half, slot = idx % p.half;
            rope_cos_sin(rope_angle(t, inv_freq[slot]), 1.0f, &sm_step_cos[t][slot], &sm_step_sin[t][slot]);
        }
        __syncthreads();
    }

    // This lane's pair slots.
    int d1[SPL], d2[SPL];
    bool rotates[SPL], valid[SPL];
    float slot_freq[SPL];
#pragma unroll
    for (int i = 0; i < SPL; ++i) {
        const int s = lane + 32 * i;
        valid[i] = s < SLOTS;
        slot_channels(valid[i] ? s : 0, p.half, &d1[i], &d2[i], &rotates[i]);
        slot_freq[i] = rotates[i] ? inv_freq[d1[i]] : 0.0f;
    }

    // The block's rows: rotated, pre-scaled queries; their positions; empty softmax states.
    float q1[ROWS][SPL], q2[ROWS][SPL], acc1[ROWS][SPL], acc2[ROWS][SPL];
    float m[ROWS], l[ROWS];
    int q_pos[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = row0 + r;
        const bool row_valid = row < num_rows;
        const int g = row_valid ? row / p.n_new : 0;
        const int t = row_valid ? row % p.n_new : 0;
        q_pos[r] = row_valid ? seq_len - p.n_new + t : -1;  // -1: the row sees no key
        m[r] = -INFINITY;
        l[r] = 0.0f;
        const T* q_row = static_cast<const T*>(p.q) + seq * p.q_strides[0] +
                         static_cast<int64_t>(kv_head * p.group + g) * p.q_strides[1] + t * p.q_strides[2];
#pragma unroll
        for (int i = 0; i < SPL; ++i) {
            acc1[r][i] = 0.0f;
            acc2[r][i] = 0.0f;
            float x1 = 0.0f, x2 = 0.0f;
            if (row_valid && valid[i]) {
                x1 = to_float(q_row[d1[i]]);
                x2 = to_float(q_row[d2[i]]);
                if (rotates[i]) {
                    float c, s;
                    rope_cos_sin(rope_angle(q_pos[r], slot_freq[i]), attention, &c, &s);
                    rotate_pair(x1, x2, c, s, false, &x1, &x2);
                }
            }
            q1[r][i] = x1 * p.scale_log2;
            q2[r][i] = x2 * p.scale_log2;
        }
    }

    // This split's keys: the sequence's length shared evenly.
    const int chunk = (kv_len + p.num_splits - 1) / p.num_splits;
    const int lo = split * chunk;
    const int hi = min(lo + chunk, kv_len);
    const T* k_base = static_cast<const T*>(p.k) + seq * p.k_strides[0] + kv_head * p.k_strides[1];
    const T* v_base = static_cast<const T*>(p.v) + seq * p.v_strides[0] + kv_head * p.v_strides[1];

    for (int p0 = lo / TILE * TILE; p0 < hi; p0 += TILE) {
        float cos_base[SPL], sin_base[SPL];  // the tile's base angle fl(p0 * f), scaled (fp16/bf16 only)
#pragma unroll
        for (int i = 0; i < SPL; ++i) {
            cos_base[i] = sin_base[i] = 0.0f;
            if (STEP && valid[i] && rotates[i])
                rope_cos_sin(rope_angle(p0, slot_freq[i]), attention, &cos_base[i], &sin_base[i]);
        }
        for (int t = warp; t < TILE; t += kDecodeWarps) {
            const int j = p0 + t;
            if (j >= hi) break;
            if (j < lo) continue;  // the first tile of a split that starts inside it
            const T* k_row = k_base + j * p.k_strides[2];
            const T* v_row = v_base + j * p.v_strides[2];
            float k1[SPL], k2[SPL], v1[SPL], v2[SPL];
#pragma unroll
            for (int i = 0; i < SPL; ++i) {
                k1[i] = k2[i] = v1[i] = v2[i] = 0.0f;
                if (valid[i]) {
                    k1[i] = to_float(k_row[d1[i]]);
                    k2[i] = to_float(k_row[d2[i]]);
                    v1[i] = to_float(v_row[d1[i]]);
                    v2[i] = to_float(v_row[d2[i]]);
                    if (rotates[i]) {
                        float c, s;
                        if (STEP) {
                            rope_cos_sin_step(p0, t, slot_freq[i], cos_base[i], sin_base[i],
                                              sm_step_cos[t][d1[i]], sm_step_sin[t][d1[i]], &c, &s);
                        } else {
                            rope_cos_sin(rope_angle(j, slot_freq[i]), attention, &c, &s);
                        }
                        rotate_pair(k1[i], k2[i], c, s, false, &k1[i], &k2[i]);
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                float dot = 0.0f;
#pragma unroll
                for (int i = 0; i < SPL; ++i) dot += q1[r][i] * k1[i] + q2[r][i] * k2[i];
                dot = warp_sum(dot);
                const float score = j <= q_pos[r] ? dot : -INFINITY;  // causal among the new tokens
                float alpha, prob;
                softmax_update(score, &m[r], &l[r], &alpha, &prob);
#pragma unroll
                for (int i = 0; i < SPL; ++i) {
                    acc1[r][i] = acc1[r][i] * alpha + prob * v1[i];
                    acc2[r][i] = acc2[r][i] * alpha + prob * v2[i];
                }
            }
        }
    }

    // The warps' states into shared memory, then merged per (row, channel).
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int i = 0; i < SPL; ++i) {
            if (valid[i]) {
                sm_acc[warp][r][d1[i]] = acc1[r][i];
                sm_acc[warp][r][d2[i]] = acc2[r][i];
            }
        }
        if (lane == 0) {
            sm_m[warp][r] = m[r];
            sm_l[warp][r] = l[r];
        }
    }
    __syncthreads();

    const bool overlong = p.seqlens[seq] > p.capacity;  // NaN rows (read again here: fewer live registers)
    const int64_t part_base = (static_cast<int64_t>(bh) * p.num_splits + split) * num_rows;
    for (int idx = threadIdx.x; idx < ROWS * D; idx += blockDim.x) {
        const int r = idx / D;
        const int d = idx % D;
        const int row = row0 + r;
        if (row >= num_rows || d >= p.head_dim) continue;
        float mm = -INFINITY, ll = 0.0f, aa = 0.0f;
#pragma unroll
        for (int w = 0; w < kDecodeWarps; ++w) {
            float m_new, w_old, w_new;
            softmax_merge_weights(mm, sm_m[w][r], &m_new, &w_old, &w_new);
            ll = ll * w_old + sm_l[w][r] * w_new;
            aa = aa * w_old + sm_acc[w][r][d] * w_new;
            mm = m_new;
        }
        float lse, inv_l;
        softmax_finish(mm, ll, &lse, &inv_l);
        const float o = overlong ? NAN : aa * inv_l;  // a row that saw no key: 0
        if (p.num_splits == 1) {
            const int g = row / p.n_new, t = row % p.n_new;
            T* out = static_cast<T*>(p.out) + seq * p.o_strides[0] +
                     static_cast<int64_t>(kv_head * p.group + g) * p.o_strides[1] + t * p.o_strides[2];
            out[d] = from_float<T>(o);
        } else {
            p.o_part[(part_base + row) * p.head_dim + d] = o;
            if (d == 0) p.lse_part[part_base + row] = lse;
        }
    }
}

// Combine the splits: out = sum_s 2^lse_s o_s / sum_s 2^lse_s, one thread per (row, channel).
template <typename T>
__global__ void __launch_bounds__(128) rope_decode_merge_kernel(const DecodeParams p) {
    const int bh = blockIdx.x;
    const int seq = bh / p.num_kv_heads;
    const int kv_head = bh % p.num_kv_heads;
    const int num_rows = p.group * p.n_new;
    const bool overlong = p.seqlens[seq] > p.capacity;
    const int64_t idx = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
    if (idx >= static_cast<int64_t>(num_rows) * p.head_dim) return;
    const int row = static_cast<int>(idx / p.head_dim);
    const int d = static_cast<int>(idx % p.head_dim);
    float m = -INFINITY, l = 0.0f, acc = 0.0f;
    for (int split = 0; split < p.num_splits; ++split) {
        const int64_t part_row = (static_cast<int64_t>(bh) * p.num_splits + split) * num_rows + row;
        float alpha, weight;
        softmax_update(p.lse_part[part_row], &m, &l, &alpha, &weight);  // 0 weight for a split that saw no key
        acc = acc * alpha + weight * p.o_part[part_row * p.head_dim + d];
    }
    const int g = row / p.n_new, t = row % p.n_new;
    T* out = static_cast<T*>(p.out) + seq * p.o_strides[0] +
             static_cast<int64_t>(kv_head * p.group + g) * p.o_strides[1] + t * p.o_strides[2];
    out[d] = from_float<T>(overlong ? NAN : l > 0.0f ? acc / l : 0.0f);
}

template <typename T, int D>
cudaError_t launch_rope_decode_d(const DecodeParams& p, cudaStream_t stream) {
    constexpr int ROWS = decode_rows<D>();
    const int num_rows = p.group * p.n_new;
    const dim3 grid(p.batch * p.num_kv_heads, p.num_splits, (num_rows + ROWS - 1) / ROWS);
    const auto kernel = rope_decode_kernel<T, D>;
    LR2_LAUNCH(kernel, grid, kDecodeWarps * 32, stream)(p);
    if (p.num_splits > 1) {
        const int64_t elements = static_cast<int64_t>(num_rows) * p.head_dim;
        const dim3 merge_grid(p.batch * p.num_kv_heads, static_cast<unsigned>((elements + 127) / 128));
        const auto merge = rope_decode_merge_kernel<T>;
        LR2_LAUNCH(merge, merge_grid, 128, stream)(p);
    }
    return cudaGetLastError();
}

// The instantiations for one element type; head_dim picks the kernel.
template <typename T>
const char* launch_rope_decode(const DecodeParams& p, void* stream) {
    if (p.batch == 0 || p.num_kv_heads == 0 || p.group * p.n_new == 0) return nullptr;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    cudaError_t err;
    switch (p.head_dim) {
        case 64: err = launch_rope_decode_d<T, 64>(p, s); break;
        case 96: err = launch_rope_decode_d<T, 96>(p, s); break;
        case 128: err = launch_rope_decode_d<T, 128>(p, s); break;
        case 256: err = launch_rope_decode_d<T, 256>(p, s); break;
        default: return "rope_decode: head_dim must be 64, 96, 128 or 256 in the CUDA kernels";
    }
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace lr2
