// DecodeParams from the arguments of a rope_decode launch as its two callers receive them: the pybind11 bindings
// (csrc/bindings.cpp: addresses as integers from the Python launcher) and the host emulation's shim
// (tests/cuda/host_math_shim.cpp: pointers from ctypes). Header-only, host code only (no CUDA types), so that both
// fill the struct, and check it, the same way.
#pragma once

#include <cstdint>

#include "lr2_cuda.h"

namespace lr2 {

// Strides are (batch, head, token) triples for q and out, and for dense caches; (block, head, token-in-block) for
// paged caches (block_table != nullptr). capacity: positions per sequence (dense: max_len; paged: max_blocks *
// block_size). block_table_stride, block_size and num_blocks are ignored for a dense cache.
inline DecodeParams make_decode_params(const void* q, const void* k, const void* v, void* out, float* o_part,
                                       float* lse_part, const int32_t* seqlens, const float* inv_freq,
                                       const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides,
                                       const int64_t* o_strides, int batch, int num_kv_heads, int group, int n_new,
                                       int half, int head_dim, int num_splits, int split_min_keys, int capacity,
                                       int original_max_position, float scale_log2, float attention_short,
                                       float attention_long, const int32_t* block_table, int64_t block_table_stride,
                                       int block_size, int num_blocks) {
    DecodeParams p{};
    p.q = q;
    p.k = k;
    p.v = v;
    p.out = out;
    p.o_part = o_part;
    p.lse_part = lse_part;
    p.seqlens = seqlens;
    p.inv_freq = inv_freq;
    for (int i = 0; i < 3; ++i) {
        p.q_strides[i] = q_strides[i];
        p.k_strides[i] = k_strides[i];
        p.v_strides[i] = v_strides[i];
        p.o_strides[i] = o_strides[i];
    }
    p.batch = batch;
    p.num_kv_heads = num_kv_heads;
    p.group = group;
    p.n_new = n_new;
    p.half = half;
    p.head_dim = head_dim;
    p.num_splits = num_splits;
    p.split_min_keys = split_min_keys;
    p.capacity = capacity;
    p.original_max_position = original_max_position;
    p.scale_log2 = scale_log2;
    p.attention_short = attention_short;
    p.attention_long = attention_long;
    p.block_table = block_table;
    p.block_table_stride = block_table != nullptr ? block_table_stride : 0;
    p.block_size = block_table != nullptr ? block_size : 0;
    p.num_blocks = block_table != nullptr ? num_blocks : 0;
    p.block_size_shift = -1;  // a block size that is not a power of two: the kernel divides
    for (int shift = 0; shift < 31; ++shift) {
        if (p.block_size == 1 << shift) p.block_size_shift = shift;
    }
    return p;
}

// nullptr, or why the launch must not run (a static message). The kernel's own limits (head_dim, the paged block size
// against its key tile) are checked by launch_rope_decode (csrc/rope_decode.cuh).
inline const char* check_decode_params(const DecodeParams& p) {
    if (p.capacity < 0) return "rope_decode: capacity must be >= 0";
    if (p.num_splits < 1) return "rope_decode: num_splits must be >= 1";
    if (p.split_min_keys < 1) return "rope_decode: split_min_keys must be >= 1";
    if (p.half * 2 > p.head_dim) return "rope_decode: rotary_dim is larger than head_dim";
    if (p.block_table != nullptr) {
        if (p.block_size < 1) return "rope_decode: a paged cache's block_size must be >= 1";
        if (p.capacity % p.block_size != 0) {
            return "rope_decode: a paged cache's capacity must be max_blocks * block_size";
        }
        if (p.num_blocks < 0) return "rope_decode: num_blocks must be >= 0";
        if (p.batch > 1 && p.block_table_stride < p.capacity / p.block_size) {
            return "rope_decode: block_table's row stride is shorter than its capacity / block_size entries";
        }
    }
    return nullptr;
}

}  // namespace lr2
