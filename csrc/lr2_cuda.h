// Host-side interface of the CUDA kernels: parameter structs and launch functions, with no CUDA or torch types, so
// that bindings.cpp (compiled by the host compiler) needs neither the CUDA headers nor torch's C++ ABI.
//
// Every launch function returns nullptr on success, or a static message (cudaGetErrorString's) on failure.
#pragma once

#include <cstdint>

namespace lr2 {

// Element types of the tensors a kernel reads and writes (computation is always fp32).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// rope_decode: q [B, Hq, n, D] against k/v caches of PRE-RoPE keys and values, dense [B, Hk, max_len, D] (strides
// (batch, head, token)) or paged (block_table != nullptr): [num_blocks, block_size, Hk, D] (strides (block, head,
// token-in-block)), token j of sequence b at block block_table[b, j / block_size], slot j % block_size. Strides are in
// elements; the last dim is contiguous. k and v are read in 16-byte copies: their base pointers and strides must be
// 16-byte aligned (the Python launcher checks). A sequence whose seqlens[b] exceeds the capacity gets NaN in every
// output element of its rows (a loud signal without a host sync); nothing past the capacity is read. Paged: a block
// id outside [0, num_blocks) is never dereferenced, and the sequence that meets it gets NaN rows the same way; the
// table entries past a sequence's length (ceil(seqlens[b] / block_size) and on) are never read.
//
// New fields go at the end: the dense kernels' parameter offsets (and machine code) stay as they are.
struct DecodeParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;              // [B, Hq, n, D], q's dtype
    float* o_part;          // [B * Hk, num_splits, group * n, D] fp32 (num_splits > 1 only)
    float* lse_part;        // [B * Hk, num_splits, group * n] fp32, log2 units (num_splits > 1 only)
    const int32_t* seqlens; // [B] valid positions per sequence, new tokens included
    const float* inv_freq;  // [2, half]: the short table's inverse frequencies, then the long table's
    int64_t q_strides[3];
    int64_t k_strides[3];
    int64_t v_strides[3];
    int64_t o_strides[3];
    int batch;
    int num_kv_heads;
    int group;              // q heads per kv head
    int n_new;
    int half;               // rotary_dim / 2
    int head_dim;
    int num_splits;             // the grid's splits (the most any sequence uses; see decode_split_plan)
    int split_min_keys;         // a sequence uses min(num_splits, ceil(len / split_min_keys)) splits
    int capacity;               // max_len: positions per sequence in the caches; no key at or past it is read
    int original_max_position;  // L0: a sequence uses the long table iff seqlens[b] > L0
    float scale_log2;           // softmax_scale * log2(e)
    float attention_short;
    float attention_long;
    const int32_t* block_table;  // paged: [B, capacity / block_size] block ids; dense: nullptr
    int64_t block_table_stride;  // paged: elements between two sequences' rows of block_table
    int block_size;              // paged: tokens per block, a multiple of the kernel's key tile (the launch checks)
    int num_blocks;              // paged: blocks in k and v; an id outside [0, num_blocks) gives the sequence NaN rows
    int block_size_shift;        // paged: log2(block_size) for a power of two (a key's block by a shift), else -1
};

// apply_rope (both q and k in one launch) and rerotate (one tensor): a rotation of the first 2 * half channels of
// every head, by token. Dense [B, H, L, D] (strides (b, h, t)) or varlen [T, H, D] (cu_seqlens given, strides
// (0, h, t)). Tensor 1 may have 0 heads.
struct RopeParams {
    const void* x[2];
    void* y[2];
    int heads[2];
    int64_t x_strides[2][3];
    int64_t y_strides[2][3];
    const float* inv_freq;      // [2, half]
    int half;
    int head_dim;
    const int32_t* is_long;     // [B] per-sequence table flags (apply_rope); unused by rerotate
    const int32_t* cu_seqlens;  // [B + 1] or nullptr (dense)
    const int32_t* positions;   // dense: row b at b * stride_pos_b; varlen: [T]; nullptr: 0..len-1 per sequence
    int64_t stride_pos_b;
    int batch;
    int seq_len;                // dense: L; varlen: total tokens T
    float attention_short;
    float attention_long;
    int transposed;             // rotate by -angle (the backward)
    int rerotate;               // rerotate mode: angle(to) - angle(from), scaled by `scale`
    int from_long;
    int to_long;
    float scale;                // a_to / a_from
};

// The call signatures of the bindings (csrc/bindings.cpp): bumped with every change to them, and checked by the Python
// launcher (lr2kernels/ops/cuda/launch.py: BINDINGS_VERSION), which refuses an extension built with another. 2: the
// paged rope_decode (block table arguments).
constexpr int kBindingsVersion = 2;

// Head sizes rope_decode is instantiated for.
constexpr int kDecodeHeadDims[] = {64, 96, 128, 256};

const char* rope_decode_f32(const DecodeParams& p, void* stream);
const char* rope_decode_f16(const DecodeParams& p, void* stream);
const char* rope_decode_bf16(const DecodeParams& p, void* stream);
const char* rope_rotate(int dtype, const RopeParams& p, void* stream);

// (number of CUDA devices, nullptr) or (0, the CUDA runtime's reason) without a usable driver/GPU.
int cuda_device_count(const char** error);

}  // namespace lr2
