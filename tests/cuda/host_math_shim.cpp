// Host shim for tests/cuda/test_host_math.py (loaded with ctypes), compiled by the host compiler with
// -DLR2_HOST_EMULATION and tests/cuda/host_cuda first on the include path:
// - csrc/rope_math.cuh, the inline math every kernel calls;
// - csrc/rope_decode.cuh, the REAL decode kernel bodies and their launch, run by the emulation of
//   tests/cuda/host_cuda/lr2_host.h (each CUDA thread a fiber; shuffles, barriers and cp.async emulated).
#include <string>

#include "decode_params.h"
#include "rope_decode.cuh"
#include "rope_math.cuh"

namespace {

// csrc/rope_decode.cuh's DecodeShape<T, D, ROWS> (for the Python mirror in csrc/ptxas_report.py): LPK, SPL, TILE,
// STAGES, stage bytes, MIN_BLOCKS, PAGE_SPAN, DYNAMIC_BYTES (0: static shared memory only), and the block's shared
// memory in all (SMEM_BYTES + TABLE_BYTES) into out[9]; returns 0, or -1 for a shape that is not instantiated.
template <typename T, int D, int ROWS>
int decode_shape(int* out) {
    using S = lr2::DecodeShape<T, D, ROWS>;
    const int values[] = {S::LPK,        S::SPL,       S::TILE,          S::STAGES,
                          S::STAGE_BYTES, S::MIN_BLOCKS, S::PAGE_SPAN, S::DYNAMIC_BYTES,
                          S::SMEM_BYTES + S::TABLE_BYTES};
    for (int i = 0; i < 9; ++i) out[i] = values[i];
    return 0;
}

template <typename T, int D>
int decode_shape_rows(int rows, int* out) {
    switch (rows) {
        case 1: return decode_shape<T, D, 1>(out);
        case 2: return decode_shape<T, D, 2>(out);
        case 4: return decode_shape<T, D, 4>(out);
        case 8: return D < 256 ? decode_shape<T, D, D < 256 ? 8 : 4>(out) : -1;
        default: return -1;
    }
}

template <typename T>
int decode_shape_d(int head_dim, int rows, int* out) {
    switch (head_dim) {
        case 64: return decode_shape_rows<T, 64>(rows, out);
        case 96: return decode_shape_rows<T, 96>(rows, out);
        case 128: return decode_shape_rows<T, 128>(rows, out);
        case 256: return decode_shape_rows<T, 256>(rows, out);
        default: return -1;
    }
}

}  // namespace

extern "C" {

// angles[i, j] = rope_angle(pos[i], inv_freq[j]); cos/sin of them times `attention`.
void lr2_angles(const int* pos, int n, const float* inv_freq, int half, float attention, float* angle, float* c,
                float* s) {
    for (int i = 0; i < n; ++i) {
        for (int j = 0; j < half; ++j) {
            const float a = lr2::rope_angle(pos[i], inv_freq[j]);
            angle[i * half + j] = a;
            lr2::rope_cos_sin(a, attention, &c[i * half + j], &s[i * half + j]);
        }
    }
}

// The same cos/sin by angle addition over tiles of `tile` positions (rope_cos_sin_step), as the decode kernel's loop.
void lr2_angles_by_steps(const int* pos, int n, const float* inv_freq, int half, float attention, int tile, float* c,
                         float* s) {
    for (int i = 0; i < n; ++i) {
        const int p0 = pos[i] / tile * tile, t = pos[i] - p0;
        for (int j = 0; j < half; ++j) {
            float cos_base, sin_base, cos_step, sin_step;
            lr2::rope_cos_sin(lr2::rope_angle(p0, inv_freq[j]), attention, &cos_base, &sin_base);
            lr2::rope_cos_sin(lr2::rope_angle(t, inv_freq[j]), 1.0f, &cos_step, &sin_step);
            lr2::rope_cos_sin_step(p0, t, inv_freq[j], cos_base, sin_base, cos_step, sin_step, &c[i * half + j],
                                   &s[i * half + j]);
        }
    }
}

// x [n, 2 * half] rotated pair-wise (NeoX halves) with cos/sin [n, half].
void lr2_rotate(const float* x, int n, int half, const float* c, const float* s, int transposed, float* y) {
    for (int i = 0; i < n; ++i) {
        for (int j = 0; j < half; ++j) {
            const int k = i * half + j;
            lr2::rotate_pair(x[i * 2 * half + j], x[i * 2 * half + j + half], c[k], s[k], transposed != 0,
                             &y[i * 2 * half + j], &y[i * 2 * half + j + half]);
        }
    }
}

void lr2_rerotate_cos_sin(float cf, float sf, float ct, float st, float* c, float* s) {
    lr2::rerotate_cos_sin(cf, sf, ct, st, c, s);
}

// The online-softmax state (m, l, acc [d]) of scores [n] (log2 units, -inf masked) and values [n, d].
void lr2_softmax_state(const float* scores, const float* v, int n, int d, float* m, float* l, float* acc) {
    *m = -INFINITY;
    *l = 0.0f;
    for (int c = 0; c < d; ++c) acc[c] = 0.0f;
    for (int i = 0; i < n; ++i) {
        float alpha, p;
        lr2::softmax_update(scores[i], m, l, &alpha, &p);
        for (int c = 0; c < d; ++c) acc[c] = acc[c] * alpha + p * v[i * d + c];
    }
}

// Merge of two states, then finished: out [d] = acc / l, lse = m + log2(l).
void lr2_merge_finish(float m_a, float l_a, const float* acc_a, float m_b, float l_b, const float* acc_b, int d,
                      float* out, float* lse) {
    float m, w_a, w_b, inv_l;
    lr2::softmax_merge_weights(m_a, m_b, &m, &w_a, &w_b);
    const float l = l_a * w_a + l_b * w_b;
    lr2::softmax_finish(m, l, lse, &inv_l);
    for (int c = 0; c < d; ++c) out[c] = (acc_a[c] * w_a + acc_b[c] * w_b) * inv_l;
}

// Finish one state: o [d], lse.
void lr2_finish(float m, float l, const float* acc, int d, float* out, float* lse) {
    float inv_l;
    lr2::softmax_finish(m, l, lse, &inv_l);
    for (int c = 0; c < d; ++c) out[c] = acc[c] * inv_l;
}

// The split combine of the merge kernel: finished partials (o [s, d], lse [s]) -> out [d].
void lr2_combine(const float* o, const float* lse, int splits, int d, float* out) {
    float m = -INFINITY, l = 0.0f;
    for (int c = 0; c < d; ++c) out[c] = 0.0f;
    for (int s = 0; s < splits; ++s) {
        float alpha, w;
        lr2::softmax_update(lse[s], &m, &l, &alpha, &w);
        for (int c = 0; c < d; ++c) out[c] = out[c] * alpha + w * o[s * d + c];
    }
    for (int c = 0; c < d; ++c) out[c] = l > 0.0f ? out[c] / l : 0.0f;
}

int lr2_decode_shape(int element_bytes, int head_dim, int rows, int* out) {
    if (element_bytes == 4) return decode_shape_d<float>(head_dim, rows, out);
    return decode_shape_d<__half>(head_dim, rows, out);
}

// The emulation's schedule (tests/cuda/host_cuda/lr2_host.h): cp.async at issue or at its wait; greedy or round-robin.
void lr2_host_mode(int eager, int greedy) { lr2_host::set_mode(eager != 0, greedy != 0); }

// The emulated device's per-block shared memory opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes.
void lr2_host_smem_optin(int bytes) { lr2_host::set_smem_optin(bytes); }

// rope_decode through the kernels' own launch (csrc/rope_decode.cuh): dtype 0 fp32, 1 fp16, 2 bf16. Strides are
// (batch, head, token) triples, (block, head, token-in-block) for a paged cache (block_table not null). The
// parameters are filled by csrc/decode_params.h, as the bindings fill them. Returns "" on success, else the launch's
// or the emulation's error.
const char* lr2_rope_decode(int dtype, const void* q, const void* k, const void* v, void* out, float* o_part,
                            float* lse_part, const int32_t* seqlens, const float* inv_freq, const int64_t* q_strides,
                            const int64_t* k_strides, const int64_t* v_strides, const int64_t* o_strides, int batch,
                            int num_kv_heads, int group, int n_new, int half, int head_dim, int num_splits,
                            int split_min_keys, int capacity, int original_max_position, float scale_log2,
                            float attention_short, float attention_long, const int32_t* block_table,
                            int64_t block_table_stride, int block_size, int num_blocks) {
    static std::string message;
    const lr2::DecodeParams p = lr2::make_decode_params(
        q, k, v, out, o_part, lse_part, seqlens, inv_freq, q_strides, k_strides, v_strides, o_strides, batch,
        num_kv_heads, group, n_new, half, head_dim, num_splits, split_min_keys, capacity, original_max_position,
        scale_log2, attention_short, attention_long, block_table, block_table_stride, block_size, num_blocks);
    lr2_host::clear_error();
    const char* error = nullptr;
    switch (dtype) {
        case 0: error = lr2::launch_rope_decode<float>(p, nullptr); break;
        case 1: error = lr2::launch_rope_decode<__half>(p, nullptr); break;
        case 2: error = lr2::launch_rope_decode<__nv_bfloat16>(p, nullptr); break;
        default: error = "dtype code must be 0, 1 or 2";
    }
    message = error != nullptr ? error : lr2_host::error();
    return message.c_str();
}
}
