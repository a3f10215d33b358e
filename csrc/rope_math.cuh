// The math every CUDA kernel of lr2kernels shares: RoPE angles, the rotation of one NeoX pair, and the online
// softmax (its per-score update and the merge of two partial states).
//
// Plain inline functions, usable from device code (nvcc) and from ordinary host C++ (g++): tests/cuda compiles a
// host shim over this header and checks it against lr2kernels.reference / torch fp64. Under nvcc the functions are
// __host__ __device__; under a host compiler LR2_HD expands to nothing.
//
// Softmax state convention: scores are in log2 units (score * softmax_scale * log2(e)), so every exponential is an
// exp2f. A state is (m, l, acc): m the running max score, l = sum_j 2^(s_j - m), acc = sum_j 2^(s_j - m) v_j. An empty
// state is (-inf, 0, 0). Its finished form is (o = acc / l, lse = m + log2(l)); an empty state finishes to (0, -inf).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define LR2_HD __host__ __device__ __forceinline__
#else
#define LR2_HD inline
#endif

namespace lr2 {

constexpr float kLog2e = 1.4426950408889634f;

// fp32 product and difference, each rounded on its own. nvcc contracts a * b + c into one FMA by default (one
// rounding instead of two); the angle code below needs the products rounded exactly as HF's fp32 multiply rounds them.
LR2_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;  // the host build (tests/cuda) compiles with -ffp-contract=off
#endif
}

LR2_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

// HF's angle: float32(position) * inv_freq, rounded ONCE in fp32, the same on every backend (torch, triton, this one).
LR2_HD float rope_angle(int position, float inv_freq) { return mul_rn(static_cast<float>(position), inv_freq); }

// cos/sin of an fp32 angle, times the table's attention factor.
//
// Intrinsic: sincosf (the precise libm-style function: CUDA's sincosf has a maximum error of 2 ulp over the whole fp32
// range, with a Payne-Hanek argument reduction for large arguments), NOT __sincosf: the fast hardware version reduces
// the argument with a fixed-precision multiply, so its absolute error grows with |angle| (~1e-3 rad near 1e5 rad),
// while RoPE angles reach position * inv_freq[0] = position, i.e. up to 131072 rad and more for 128K contexts. The
// kernels are never compiled with --use_fast_math (which would turn sincosf into __sincosf).
LR2_HD void rope_cos_sin(float angle, float attention, float* cos_out, float* sin_out) {
    float s, c;
#if defined(__CUDA_ARCH__)
    sincosf(angle, &s, &c);
#else
    s = std::sin(angle);
    c = std::cos(angle);
#endif
    *cos_out = c * attention;
    *sin_out = s * attention;
}

// cos/sin of HF's angle fl(p * f) at p = p0 + t by angle addition, for a loop over keys that would otherwise call
// sincosf once per key: from the scaled cos/sin of fl(p0 * f) (computed once per tile of keys, p0 a multiple of the
// tile) and the unscaled cos/sin of fl(t * f) (a per-block step table, 0 <= t < tile).
//
// HF rounds each angle once, so fl(p f) != fl(p0 f) + fl(t f): the difference delta = (fl(p f) - fl(p0 f)) - fl(t f)
// is formed exactly (both subtractions are of floats within a factor 2 of each other, or of zero: Sterbenz, because
// p0 >= t unless p0 = 0) and applied as a small rotation. |delta| <= ~1 ulp of the angle (0.06 rad at 2^20
// positions), so the Taylor series to delta^5 leaves < 1e-9.
LR2_HD void rope_cos_sin_step(int p0, int t, float inv_freq, float cos_base, float sin_base, float cos_step,
                              float sin_step, float* cos_out, float* sin_out) {
    const float delta =
        sub_rn(sub_rn(rope_angle(p0 + t, inv_freq), rope_angle(p0, inv_freq)), rope_angle(t, inv_freq));
    const float d2 = delta * delta;
    const float cos_delta = 1.0f - d2 * (0.5f - d2 * (1.0f / 24.0f));
    const float sin_delta = delta * (1.0f - d2 * ((1.0f / 6.0f) - d2 * (1.0f / 120.0f)));
    const float cos_off = cos_step * cos_delta - sin_step * sin_delta;  // cos(fl(p f) - fl(p0 f))
    const float sin_off = sin_step * cos_delta + cos_step * sin_delta;
    *cos_out = cos_base * cos_off - sin_base * sin_off;
    *sin_out = sin_base * cos_off + cos_base * sin_off;
}

// RoPE on one NeoX pair (x1 = channel j, x2 = channel j + rotary_dim / 2), cos/sin already scaled:
//   forward:    (x1 c - x2 s, x2 c + x1 s)         (HF's x * cos + rotate_half(x) * sin)
//   transposed: (x1 c + x2 s, x2 c - x1 s)         (rotation by -angle: the backward of the forward)
LR2_HD void rotate_pair(float x1, float x2, float c, float s, bool transposed, float* y1, float* y2) {
    if (transposed) {
        *y1 = x1 * c + x2 * s;
        *y2 = x2 * c - x1 * s;
    } else {
        *y1 = x1 * c - x2 * s;
        *y2 = x2 * c + x1 * s;
    }
}

// cos/sin of the re-rotation that moves a key rotated with table f (scaled by a_f) to table t (scaled by a_t):
// a_t R(theta_t) = (a_t / a_f) R(theta_t - theta_f) a_f R(theta_f). cos_f/sin_f unscaled, cos_t/sin_t scaled by
// a_t / a_f; cos(t - f) = cos t cos f + sin t sin f, sin(t - f) = sin t cos f - cos t sin f.
LR2_HD void rerotate_cos_sin(float cos_f, float sin_f, float cos_t, float sin_t, float* c, float* s) {
    *c = cos_t * cos_f + sin_t * sin_f;
    *s = sin_t * cos_f - cos_t * sin_f;
}

// exp2(x - m) that is 0 when x is -inf (including -inf - -inf, which would be NaN).
LR2_HD float exp2_shift(float x, float m) { return x == -INFINITY ? 0.0f : exp2f(x - m); }

// One score into a state: m, l updated in place; the caller then does acc = acc * alpha + p * v.
// A masked score is -inf: alpha = 1, p = 0 (the state does not change).
LR2_HD void softmax_update(float score, float* m, float* l, float* alpha, float* p) {
    const float m_new = fmaxf(*m, score);
    *alpha = exp2_shift(*m, m_new);
    *p = exp2_shift(score, m_new);
    if (m_new == -INFINITY) *alpha = 1.0f;  // still empty
    *l = *l * *alpha + *p;
    *m = m_new;
}

// Merge of two unnormalised states (m_a, l_a, acc_a), (m_b, l_b, acc_b): the weights w_a, w_b such that the merged
// state is (m, l_a w_a + l_b w_b, acc_a w_a + acc_b w_b). Either (or both) may be empty.
LR2_HD void softmax_merge_weights(float m_a, float m_b, float* m, float* w_a, float* w_b) {
    *m = fmaxf(m_a, m_b);
    *w_a = exp2_shift(m_a, *m);
    *w_b = exp2_shift(m_b, *m);
}

// The finished form of a state: lse = m + log2(l) (log2 units), and 1 / l to normalise acc (0 for an empty state,
// whose output is 0, never NaN).
LR2_HD void softmax_finish(float m, float l, float* lse, float* inv_l) {
    if (l > 0.0f) {
        *lse = m + log2f(l);
        *inv_l = 1.0f / l;
    } else {
        *lse = -INFINITY;
        *inv_l = 0.0f;
    }
}

// Merge of FINISHED partial states (o_s, lse_s) (flash-decoding's combine): keep a running (m, l) over the lse values
// with softmax_update(lse_s, ...) and acc = acc * alpha + p * o_s; out = acc / l. This is softmax_update with a
// partial's lse in place of a score: sum_s 2^lse_s o_s / sum_s 2^lse_s.

}  // namespace lr2
