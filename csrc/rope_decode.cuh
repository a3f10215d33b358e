// rope_decode: split-KV (flash-decoding) attention of n new PRE-RoPE queries on a cache of PRE-RoPE keys.
//
// One kernel body, instantiated per (element type, head_dim, rows per block) in rope_decode_{f32,f16,bf16}.cu.
//
// Grid (B * Hk, max splits, row blocks), 4 warps a block. A block serves one (sequence, kv head), one KV split, and
// ROWS packed rows of the GQA group: row g * n + t is q head kv_head * group + g, new token t (position
// seq_len - n + t). ROWS is group * n rounded up to a power of two (at most 8; 4 at head 256), so MHA decode (one row)
// does no redundant softmax or shuffle work, and each cached key is read, and rotated, once for the whole group.
//
// Memory: the split's keys and values stream through shared memory in tiles of TILE keys, STAGES - 1 tiles ahead of
// the one being computed (cp.async, 16 bytes per copy: 8 fp16/bf16 or 4 fp32 channels); a stage row is padded by 16
// bytes. See csrc/README.md for the bytes in flight this gives per SM against the HBM latency-bandwidth product.
//
// Compute: LPK lanes share a key (KPW = 32 / LPK keys per warp at once, KPB = 4 * KPW per block); each lane holds SPL
// of the head's D / 2 pair slots (slot s < half: the NeoX pair (s, s + half), rotated in registers; slot s >= half: two
// pass-through channels), scores its slots against the ROWS rotated queries (registers, pre-scaled by softmax_scale *
// log2 e), reduces the dot over its LPK lanes (log2 LPK shuffles), and updates its own online-softmax states. LPK is
// chosen per (D, ROWS) to keep SPL * ROWS <= 16 (registers) with as few shuffles as that allows. From 4 rows the
// reduction is transposed (row_owner_lane): each lane ends with one row's score, runs that row's softmax alone, and
// the key group's lanes get each row's probability by a shuffle. The softmax rescales only where a max grows.
// fp16/bf16 at 4 and 8 rows (4 at head 256) run on tensor cores instead (DecodeShape::MMA, rope_decode_mma_tiles: keys
// rotated in shared memory, mma.sync for Q K^T and P V; head 256's 78 KB a block partly in dynamic shared memory,
// DecodeShape::DYNAMIC_SMEM). At the end the key groups' (or warps') states are merged
// through shared memory. With one split the block writes the output; with more, its finished partial (o, lse),
// combined by the merge kernel.
//
// The keys' angles: tiles start at multiples of TILE. In fp16/bf16 the block computes one sincosf per tile and slot
// (a shared table) and every key's cos/sin by angle addition with a per-block step table (rope_cos_sin_step: 2.9e-7
// from fp64, where HF rounds cos/sin to the model's dtype); in fp32 each key keeps its sincosf (1.4e-7, HF's fp32).
//
// Splits from the real lengths (no host sync): the grid has the launcher's max splits (from the capacity and the SM
// count); each sequence uses min(max splits, ceil(len / split_min_keys)) of them, its length shared evenly in chunks of
// a multiple of kSplitAlign keys (decode_split_plan); blocks past the sequence's own count exit at once, and the merge
// combines the same count. The table is chosen per sequence from seqlens[b] on the device. Keys at or past seqlens[b]
// are never read, nor any at or past the capacity: a sequence whose seqlens[b] exceeds the capacity reads nothing and
// gets NaN in every element of its rows.
//
// Paged caches (PAGED, DecodeParams::block_table set): k/v are [num_blocks, block_size, Hk, D] and key j of sequence
// b lies in block block_table[b, j / block_size]. block_size is a multiple of PAGE_SPAN (TILE, half the 32-key mma
// tile, or at head 256 a warp's 8 keys; the launch refuses others) and tiles start at multiples of TILE, so a tile
// (half tile, warp's keys) lies inside one block: issue() reads its block id (one 4-byte table read per tile, half
// tile or warp's keys and thread, cached) and the 16-byte copies
// go to that block's rows, as the dense path's go to the sequence's. A block id outside [0, num_blocks) is never
// dereferenced: its copies zero-fill, and the sequence's rows get NaN (as past the capacity) through NaN accumulators
// (poison_rows), so no flag lives across the loop. Table entries past a sequence's length are never read.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "cp_async.cuh"
#include "decode_params.h"
#include "dtype.cuh"
#include "lr2_cuda.h"
#include "mma.cuh"
#include "rope_math.cuh"

namespace lr2 {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
// Split chunks are multiples of this many keys (a multiple of every TILE, so tiles start at multiples of TILE).
constexpr int kSplitAlign = 32;
// Target bytes of one pipeline stage (keys and values of a tile).
constexpr int kStageBytes = 8192;

// The most rows a block packs: the rotated queries and their accumulators live in registers.
template <int D>
__host__ __device__ constexpr int decode_max_rows() {
    return D >= 256 ? 4 : 8;
}

// Lanes per key: the fewest (fewest shuffles per score) that keep a lane's slots SPL <= min(8, 16 / ROWS).
template <int SLOTS, int ROWS>
__host__ __device__ constexpr int decode_lanes_per_key() {
    constexpr int target = 16 / ROWS < 8 ? (16 / ROWS < 1 ? 1 : 16 / ROWS) : 8;
    for (int lanes = 1; lanes <= 32; lanes *= 2) {
        if (SLOTS % lanes == 0 && SLOTS / lanes <= target) return lanes;
    }
    int best = 1;
    for (int lanes = 1; lanes <= 32; lanes *= 2) {
        if (SLOTS % lanes == 0) best = lanes;
    }
    return best;
}

__host__ __device__ constexpr int floor_pow2(int x) {
    int p = 1;
    while (2 * p <= x) p *= 2;
    return p;
}

// The compile-time shape of one instantiation.
template <typename T, int D, int ROWS>
struct DecodeShape {
    static constexpr int SLOTS = D / 2;
    static constexpr int LPK = decode_lanes_per_key<SLOTS, ROWS>();
    static constexpr int SPL = SLOTS / LPK;  // pair slots per lane
    static constexpr int KPW = 32 / LPK;     // keys per warp at once
    // fp16/bf16 at 4 and 8 rows (GQA groups 3-8, or n > 1; head 256 packs 4): tensor cores score and accumulate the
    // rows (rope_decode_mma_tiles), a warp taking 8 keys of each tile of 32; the CUDA-core loop would issue ~121 / ~194
    // warp-instructions a key at head 128 there, ~284 at head 256 (csrc/README.md).
    static constexpr bool MMA = sizeof(T) == 2 && ROWS >= 4;
    static constexpr int MMA_KEYS = 8;  // keys a warp scores at once (the n of mma.m16n8k16)
    // Head 256 on tensor cores: each warp copies (and, paged, looks up) only its own 8 keys of the tile, the only ones
    // it reads, and has its own base angle: one block-table lookup a warp and tile (blocks of 8 keys fit, as they did
    // on the CUDA-core tiles of 8), and a step table of 8 rows (the shared memory below stays under 80 KB: 2 blocks
    // an SM on A100's 164 KB as on H100's 228 KB).
    static constexpr bool WARP_KEYS = MMA && D > 128;
    static constexpr int KPB = MMA ? kDecodeWarps * MMA_KEYS : kDecodeWarps * KPW;
    static constexpr int GROUPS = MMA ? kDecodeWarps : KPB;  // partial softmax states merged after the loop
    static constexpr int BY_BYTES = floor_pow2(kStageBytes / (2 * D * static_cast<int>(sizeof(T))));
    static constexpr int TILE = MMA ? KPB : KPB > BY_BYTES ? KPB : BY_BYTES;  // keys per stage (powers of two)
    // The per-tile base angles: one at p0 (the step table covers t < TILE), or, for the mma tiles, one per half tile
    // (t < TILE / 2: a step table half the size, which keeps the block under 48 KB of static shared memory), or one
    // per warp (WARP_KEYS: t < 8).
    static constexpr int BASES = WARP_KEYS ? kDecodeWarps : MMA ? 2 : 1;
    static constexpr int STEP_SPAN = TILE / BASES;
    // A paged cache's block_size must be a multiple of this: the keys one block-table lookup serves (the mma tiles
    // look up each half tile, so that blocks of 16 keys, vLLM's default, still fit; WARP_KEYS each warp's 8 keys).
    static constexpr int PAGE_SPAN = WARP_KEYS ? MMA_KEYS : MMA ? TILE / 2 : TILE;
    static constexpr int VEC = 16 / static_cast<int>(sizeof(T));  // channels per 16-byte copy
    static constexpr int ROW_CHUNKS = D / VEC;
    static constexpr int ROW = D + VEC;  // a stage row in elements: padded by 16 bytes (bank spread, 16-byte aligned)
    static constexpr int STAGE_ELEMS = 2 * TILE * ROW;  // keys then values
    static constexpr int STAGE_BYTES = STAGE_ELEMS * static_cast<int>(sizeof(T));
    static constexpr int STAGES = STAGE_BYTES <= 10240 ? 3 : 2;
    static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
    static constexpr int MERGE_BYTES = GROUPS * ROWS * D * 4;  // the key groups' accumulators, after the loop
    static constexpr int SMEM_BYTES = PIPE_BYTES > MERGE_BYTES ? PIPE_BYTES : MERGE_BYTES;  // the stages / merge
    static constexpr bool STEP = sizeof(T) == 2;  // angle addition where HF rounds cos/sin to fp16/bf16
    // The kernel's other shared arrays (step and base tables where STEP, the groups' m and l), bytes.
    static constexpr int TABLE_BYTES = (STEP ? (STEP_SPAN + BASES) * SLOTS * 8 : 0) + GROUPS * ROWS * 8;
    // The stages and the merge buffer in dynamic shared memory where the block needs more than the 48 KB a block may
    // declare statically (head 256 on tensor cores: 66 KB of stages + 12 KB of tables); the launch opts the kernel in
    // (cudaFuncSetAttribute) after checking the device's per-block limit.
    static constexpr bool DYNAMIC_SMEM = SMEM_BYTES + TABLE_BYTES > 48 * 1024;
    static constexpr int DYNAMIC_BYTES = DYNAMIC_SMEM ? SMEM_BYTES : 0;
    // Resident blocks per SM the registers must allow, the bytes in flight of csrc/README.md's model: 3 (<= 168
    // registers a thread) for fp16/bf16; 2 (<= 255) for fp32 (twice the bytes a stage, a sincosf per key), where a
    // lane holds more than 16 slot-rows (head 96 at 8 rows: 24), and where shared memory allows only 2 (DYNAMIC_SMEM:
    // 78 KB a block; one 32 KB tile in flight a block is already more than H200's 28.4 KB an SM).
    static constexpr int MIN_BLOCKS = STEP && !DYNAMIC_SMEM && (MMA || ROWS * SPL <= 16) ? 3 : 2;
    static_assert(SLOTS % LPK == 0 && TILE % KPB == 0 && kSplitAlign % TILE == 0, "decode tile shape");
    static_assert(D % VEC == 0 && (ROW * sizeof(T)) % 16 == 0, "16-byte rows");
};

// The rows per block the launcher picks for group * n_new rows (the Python launcher mirrors it).
template <int D>
__host__ __device__ constexpr int decode_rows_for(int rows) {
    return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : decode_max_rows<D>();
}

// A sequence's split plan: chunk (keys per split, a multiple of kSplitAlign) and used (its number of non-empty
// splits, >= 1) from its key count and the grid's max splits. Shared by the decode and merge kernels.
__host__ __device__ __forceinline__ void decode_split_plan(int kv_len, int max_splits, int min_keys, int* chunk,
                                                           int* used) {
    const int wanted = (kv_len + min_keys - 1) / (min_keys > 0 ? min_keys : 1);
    const int splits = min(max_splits, max(1, wanted));
    const int even = (kv_len + splits - 1) / splits;
    *chunk = max(kSplitAlign, (even + kSplitAlign - 1) / kSplitAlign * kSplitAlign);
    *used = max(1, (kv_len + *chunk - 1) / *chunk);
}

// The channels of pair slot s: s < half rotates the NeoX pair (s, s + half); s >= half passes (2s, 2s + 1) through
// (the channels 2 * half + 2 * (s - half) and the next). Recomputed where used: cheaper than registers per slot.
__device__ __forceinline__ int slot_d1(int s, int half) { return s < half ? s : 2 * s; }
__device__ __forceinline__ int slot_d2(int s, int half) { return s < half ? s + half : 2 * s + 1; }

// Rows of 4 and more: the transposed reduction. Its first log2(ROWS) shuffle stages halve the rows a lane carries (the
// lanes with bit LPK >> (s + 1) set keep the upper half), so each lane ends with one row's full score, computes that
// row's softmax once, and the others get its probability by one shuffle: the owner of row r within a key group.
template <int ROWS, int LPK>
__host__ __device__ constexpr int row_owner_lane(int r) {
    int lane = 0;
    for (int s = 0; (ROWS >> s) > 1; ++s) {
        if (r & ((ROWS >> s) / 2)) lane += LPK >> (s + 1);
    }
    return lane;
}

template <int LANES>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int offset = LANES / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

// The tile loop of the fp16/bf16 kernels at 4 and 8 rows (DecodeShape::MMA), on tensor cores. Warp w
// takes keys 8 w .. 8 w + 7 of each tile of 32 (rows are the m of mma.m16n8k16, padded to 16 with zero queries; keys
// are its n):
// 1. RoPE in shared memory: the warp rotates its 8 keys in place (lane: slots lane, lane + 32, ...; fp32 angle
//    addition as the CUDA-core loop, rounded back to T as HF's bf16/fp16 rotation rounds them), then __syncwarp.
// 2. Scores S = Q K^T: D / 16 mma.m16n8k16, A = the rotated queries (registers, rounded to T), B = the keys (32-bit
//    shared loads, conflict-free through the 16-byte row padding); lane (gid, tig) gets row gid's scores of keys
//    2 tig, 2 tig + 1, scaled by softmax_scale * log2 e in fp32.
// 3. The online softmax of row gid over the 8 keys: the row max by 2 shuffles, the rescale only where a max grows
//    (alpha to the accumulator's lanes by 2 shuffles), P rounded to T (as FlashAttention's P).
// 4. O^T += V^T P^T: D / 16 mma.m16n8k8, A = V^T (pairs of keys of one channel, two 16-bit shared loads each), B = P^T,
//    which is exactly the score fragment's layout (no shuffle). Accumulators: lane holds channels 16 c + gid (+ 8) of
//    rows 2 tig, 2 tig + 1: D / 4 fp32 registers (no padding rows).
// After the loop each warp's state (m, l, acc) goes to shared memory, as a key group's in the CUDA-core path.
template <typename T, int D, int ROWS, typename Issue>
__device__ __forceinline__ void rope_decode_mma_tiles(const DecodeParams& p, T* stages, float (*sm_step_cos)[D / 2],
                                                      float (*sm_step_sin)[D / 2], float (*sm_base_cos)[D / 2],
                                                      float (*sm_base_sin)[D / 2], float* sm_acc,
                                                      float (*sm_m)[ROWS], float (*sm_l)[ROWS], Issue& issue,
                                                      bool first_tiles_ok, int num_tiles, int lo, int hi, int row0,
                                                      int num_rows, int seq, int kv_head, int seq_len,
                                                      const float* inv_freq, float attention) {
    using S = DecodeShape<T, D, ROWS>;
    constexpr int TILE = S::TILE, STAGES = S::STAGES, ROW = S::ROW, CHUNKS = D / 16, SPAN = S::STEP_SPAN;
    static_assert(S::MMA && ROWS <= 8 && D % 16 == 0 && TILE == kDecodeWarps * 8, "mma decode tile");
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int gid = lane / 4, tig = lane % 4;
    const int half = p.half;
    const int key0 = warp * 8;              // this warp's first key in a tile
    const int base = key0 / SPAN;           // its base angle (p0 + base * SPAN)
    const int step0 = key0 - base * SPAN;   // its first key's step-table row

    // Row gid's rotated query, rounded to T, as A fragments (rows 8-15 zero): channels 16 c + 2 tig + {0, 1} and + 8.
    const int row = row0 + gid;
    const bool row_valid = gid < ROWS && row < num_rows;  // (4 rows: the m16 tile's rows 4-15 are zero)
    const int g = row_valid ? row / p.n_new : 0;
    const int t_new = row_valid ? row % p.n_new : 0;
    const int q_pos = row_valid ? seq_len - p.n_new + t_new : -1;  // -1: the row sees no key
    const T* q_row = static_cast<const T*>(p.q) + seq * p.q_strides[0] +
                     static_cast<int64_t>(kv_head * p.group + g) * p.q_strides[1] + t_new * p.q_strides[2];
    auto q_rotated = [&](int d) -> float {
        if (!row_valid) return 0.0f;
        if (d >= 2 * half) return to_float(q_row[d]);  // pass-through channels (partial rotary)
        const int slot = d < half ? d : d - half;
        float c, s, y1, y2;
        rope_cos_sin(rope_angle(q_pos, inv_freq[slot]), attention, &c, &s);
        rotate_pair(to_float(q_row[slot]), to_float(q_row[slot + half]), c, s, false, &y1, &y2);
        return d < half ? y1 : y2;
    };
    unsigned qa[CHUNKS][2];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int d = 16 * c + 8 * h + 2 * tig;
            qa[c][h] = pack2_rn<T>(q_rotated(d), q_rotated(d + 1));
        }
    }

    float acc[CHUNKS][4];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) acc[c][0] = acc[c][1] = acc[c][2] = acc[c][3] = 0.0f;
    // A bad block id (paged): NaN accumulators, kept by every later rescale and sum (see poison_rows).
    auto poison = [&]() {
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) acc[c][0] = acc[c][1] = acc[c][2] = acc[c][3] = NAN;
    };
    if (!first_tiles_ok) poison();
    float m = -INFINITY, l = 0.0f;  // row gid's state (m the same in its 4 lanes; l this lane's keys' share)

    for (int tile = 0; tile < num_tiles; ++tile) {
        if (tile + STAGES - 1 < num_tiles && !issue(tile + STAGES - 1)) poison();
        cp_async_commit();  // (an empty group near the end keeps the wait count uniform)
        const int p0 = lo + tile * TILE;
        for (int idx = threadIdx.x; idx < S::BASES * half; idx += kDecodeThreads) {
            const int b = idx / half, slot = idx % half;
            rope_cos_sin(rope_angle(p0 + b * SPAN, inv_freq[slot]), attention, &sm_base_cos[b][slot],
                         &sm_base_sin[b][slot]);
        }
        cp_async_wait<STAGES - 1>();
        __syncthreads();  // tile `tile` and the base angles are visible to every thread

        T* k_tile = stages + (tile % STAGES) * S::STAGE_ELEMS;
        const T* v_tile = k_tile + TILE * ROW;
        // 1. RoPE of the warp's 8 keys, in place (keys past hi are zero rows: rotated to zeros, masked below).
        for (int slot = lane; slot < half; slot += 32) {
            const float freq = inv_freq[slot];
            const float cos_base = sm_base_cos[base][slot], sin_base = sm_base_sin[base][slot];
#pragma unroll 4
            for (int k = 0; k < 8; ++k) {
                T* k_row = k_tile + (key0 + k) * ROW;
                float c, s, y1, y2;
                rope_cos_sin_step(p0 + base * SPAN, step0 + k, freq, cos_base, sin_base, sm_step_cos[step0 + k][slot],
                                  sm_step_sin[step0 + k][slot], &c, &s);
                rotate_pair(to_float(k_row[slot]), to_float(k_row[slot + half]), c, s, false, &y1, &y2);
                k_row[slot] = from_float<T>(y1);
                k_row[slot + half] = from_float<T>(y2);
            }
        }
        __syncwarp();  // the warp's rotated keys are visible to its lanes

        // 2. Scores of row gid against keys key0 + 2 tig + {0, 1}.
        float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const T* k_row = k_tile + (key0 + gid) * ROW + 2 * tig;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            const unsigned a[4] = {qa[c][0], 0u, qa[c][1], 0u};
            const unsigned b[2] = {load2(k_row + 16 * c), load2(k_row + 16 * c + 8)};
            mma_16816<T>(sc, a, b);
        }
        // 3. Online softmax of row gid (causal among the new tokens; past hi: -inf).
        const int j = p0 + key0 + 2 * tig;
        const float s0 = j < hi && j <= q_pos ? sc[0] * p.scale_log2 : -INFINITY;
        const float s1 = j + 1 < hi && j + 1 <= q_pos ? sc[1] * p.scale_log2 : -INFINITY;
        float mx = fmaxf(s0, s1);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const bool grow = mx > m;
        float alpha = 1.0f;
        if (grow) {
            alpha = exp2_shift(m, mx);  // 0 from an empty state
            l *= alpha;
            m = mx;
        }
        const float p_0 = exp2_shift(s0, m), p_1 = exp2_shift(s1, m);  // 0 for a masked key
        l += p_0 + p_1;
        if (__any_sync(0xffffffffu, grow)) {  // the accumulator's rows 2 tig, 2 tig + 1 are lanes 8 tig's, 8 tig + 4's
            const float a0 = __shfl_sync(0xffffffffu, alpha, 8 * tig);
            const float a1 = __shfl_sync(0xffffffffu, alpha, 8 * tig + 4);
#pragma unroll
            for (int c = 0; c < CHUNKS; ++c) {
                acc[c][0] *= a0;
                acc[c][1] *= a1;
                acc[c][2] *= a0;
                acc[c][3] *= a1;
            }
        }
        // 4. O^T += V^T P^T: B = P^T (keys 2 tig + {0, 1} of row gid), A = V^T (channels 16 c + gid (+ 8)).
        const unsigned pb[1] = {pack2_rn<T>(p_0, p_1)};
        const T* v0 = v_tile + (key0 + 2 * tig) * ROW + gid;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            const unsigned a[2] = {pack2(v0[16 * c], v0[16 * c + ROW]), pack2(v0[16 * c + 8], v0[16 * c + 8 + ROW])};
            mma_1688<T>(acc[c], a, pb);
        }
        __syncthreads();  // every thread is done with this stage before it is refilled
    }
    cp_async_wait<0>();
    __syncthreads();  // the stages become the merge buffer

    // Row gid's l over its 4 lanes; the warp's state into shared memory as key group `warp`.
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    float* warp_acc = sm_acc + warp * ROWS * D;
    if (2 * tig < ROWS) {
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            const int d = 16 * c + gid;
            warp_acc[(2 * tig) * D + d] = acc[c][0];
            warp_acc[(2 * tig + 1) * D + d] = acc[c][1];
            warp_acc[(2 * tig) * D + d + 8] = acc[c][2];
            warp_acc[(2 * tig + 1) * D + d + 8] = acc[c][3];
        }
    }
    if (tig == 0 && gid < ROWS) {
        sm_m[warp][gid] = m;
        sm_l[warp][gid] = l;
    }
}

// Paged: the k/v rows of logical key q0 of sequence seq (its block from the table, q0 < that sequence's length <=
// capacity), from k_base / v_base (the kv head's origin); false when the block id lies outside [0, num_blocks): then
// block 0 stands in for the addresses, so a bad id never enters one, and the caller reads nothing through them.
// p0 / block_size: a shift for the usual powers of two (a divide costs ~20 instructions a tile; a multiply-high by a
// magic number costs a spilled register on sm_90's 2-row tiles).
template <typename T>
__device__ __forceinline__ bool paged_rows(const DecodeParams& p, int seq, int q0, const T* k_base, const T* v_base,
                                           const T*& k_src, const T*& v_src) {
    const int block_index = p.block_size_shift >= 0 ? q0 >> p.block_size_shift : q0 / p.block_size;
    const int block = __ldg(p.block_table + seq * p.block_table_stride + block_index);
    const bool ok = static_cast<unsigned>(block) < static_cast<unsigned>(p.num_blocks);
    const int64_t safe = ok ? block : 0;
    const int64_t row = q0 - block_index * p.block_size;
    k_src = k_base + safe * p.k_strides[0] + row * p.k_strides[2];
    v_src = v_base + safe * p.v_strides[0] + row * p.v_strides[2];
    return ok;
}

template <typename T, int D, int ROWS, bool PAGED>
__global__ void __launch_bounds__(kDecodeThreads, DecodeShape<T, D, ROWS>::MIN_BLOCKS)
    rope_decode_kernel(const DecodeParams p) {
    using S = DecodeShape<T, D, ROWS>;
    constexpr int SLOTS = S::SLOTS, LPK = S::LPK, SPL = S::SPL, KPW = S::KPW, KPB = S::KPB, TILE = S::TILE;
    constexpr int STAGES = S::STAGES, ROW = S::ROW, ROW_CHUNKS = S::ROW_CHUNKS, VEC = S::VEC;
    constexpr bool STEP = S::STEP;
    constexpr int STEP_ROWS = STEP ? S::STEP_SPAN : 1;
    constexpr bool TRANSPOSED = ROWS >= 4;  // (ROWS <= LPK in every instantiation)
    static_assert(!TRANSPOSED || ROWS <= LPK, "the transposed reduction needs a lane per row");
    // The stages; after the loop, the merge. Static up to 48 KB a block; past it (DYNAMIC_SMEM) dynamic, the launch
    // giving S::DYNAMIC_BYTES.
    unsigned char* sm_raw;
    if constexpr (S::DYNAMIC_SMEM) {
        LR2_DYNAMIC_SHARED(sm_dynamic, S::DYNAMIC_BYTES);
        sm_raw = sm_dynamic;
    } else {
        alignas(16) __shared__ unsigned char sm_static[S::SMEM_BYTES];
        sm_raw = sm_static;
    }
    __shared__ float sm_step_cos[STEP_ROWS][SLOTS];  // cos/sin of fl(t * inv_freq[s]), t < TILE (unscaled)
    __shared__ float sm_step_sin[STEP_ROWS][SLOTS];
    __shared__ float sm_base_cos[S::BASES][SLOTS];  // the tile's cos/sin of fl((p0 + b STEP_SPAN) inv_freq[s]), scaled
    __shared__ float sm_base_sin[S::BASES][SLOTS];
    __shared__ float sm_m[S::GROUPS][ROWS];
    __shared__ float sm_l[S::GROUPS][ROWS];
    T* stages = reinterpret_cast<T*>(sm_raw);        // [STAGES][2][TILE][ROW]
    float* sm_acc = reinterpret_cast<float*>(sm_raw);  // [KPB][ROWS][D]

    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int group_id = warp * KPW + lane / LPK;  // this lane's key within a step of KPB keys
    const int slot_lane = lane % LPK;
    const int bh = blockIdx.x;
    const int seq = bh / p.num_kv_heads;
    const int kv_head = bh % p.num_kv_heads;
    const int split = blockIdx.y;
    const int num_rows = p.group * p.n_new;
    const int row0 = blockIdx.z * ROWS;

    const int seq_len = p.seqlens[seq];
    const bool overlong = seq_len > p.capacity;
    const int kv_len = overlong ? 0 : max(0, seq_len);  // no key at or past the capacity (or the length) is read
    int chunk, used;
    decode_split_plan(kv_len, p.num_splits, p.split_min_keys, &chunk, &used);
    if (split >= used) return;  // the whole block: this sequence needs fewer splits
    const int lo = split * chunk;
    const int hi = min(lo + chunk, kv_len);
    const int num_tiles = hi > lo ? (hi - lo + TILE - 1) / TILE : 0;

    const bool is_long = seq_len > p.original_max_position;
    const float* inv_freq = p.inv_freq + (is_long ? p.half : 0);
    const float attention = is_long ? p.attention_long : p.attention_short;
    // Dense: the sequence's kv head; paged: the kv head's channels in block 0 (the block comes per tile).
    const T* k_base = static_cast<const T*>(p.k) + (PAGED ? int64_t{0} : seq * p.k_strides[0]) +
                      kv_head * p.k_strides[1];
    const T* v_base = static_cast<const T*>(p.v) + (PAGED ? int64_t{0} : seq * p.v_strides[0]) +
                      kv_head * p.v_strides[1];

    // Tile `tile` of the split into stage tile % STAGES: 16-byte copies, keys past hi zero-filled (never read).
    // Paged: the tile's block from the table (p0 < hi <= capacity: inside the sequence's row); false when its id is
    // outside [0, num_blocks): then nothing is read (zero-fill) and the caller poisons the rows (poison_rows).
    auto issue = [&](int tile) -> bool {
        T* stage = stages + (tile % STAGES) * S::STAGE_ELEMS;
        const int p0 = lo + tile * TILE;
        if constexpr (S::WARP_KEYS) {
            // Head 256 on tensor cores: warp w copies its own keys q0 .. q0 + 7 (q0 = p0 + 8 w; their k rows, then
            // their v rows: one 512-byte row a warp-wide copy), the only keys it reads (rope_decode_mma_tiles).
            // Paged: one lookup a warp (PAGE_SPAN = 8 keys), only where its keys start before hi (the table past the
            // sequence's length is never read); a bad id poisons this warp's accumulators, and through the merge of
            // the warps every row of the block.
            constexpr int KEYS = S::MMA_KEYS;
            const int warp_id = threadIdx.x / 32;
            const int q0 = p0 + warp_id * KEYS;
            const T* k_src = k_base;  // dense: key j at row j; paged: key q0 + t at row t of the warp's block
            const T* v_src = v_base;
            bool block_ok = true;
            if constexpr (PAGED) {
                if (q0 < hi) block_ok = paged_rows(p, seq, q0, k_base, v_base, k_src, v_src);
            }
            for (int c = threadIdx.x % 32; c < 2 * KEYS * ROW_CHUNKS; c += 32) {
                const int is_v = c / (KEYS * ROW_CHUNKS);
                const int key = (c / ROW_CHUNKS) % KEYS;
                const int part = c % ROW_CHUNKS;
                const bool valid = q0 + key < hi && block_ok;
                const T* base = is_v ? v_src : k_src;
                const int64_t stride = is_v ? p.v_strides[2] : p.k_strides[2];
                const T* src = valid ? base + (PAGED ? key : q0 + key) * stride + part * VEC : base;
                cp_async_16(stage + (is_v * TILE + warp_id * KEYS + key) * ROW + part * VEC, src, valid);
            }
            return block_ok;
        } else if constexpr (PAGED && S::PAGE_SPAN < TILE) {
            // The mma tiles (32 keys) on blocks of 16: each half tile looks its own block up (the second only where
            // it starts before hi: the table past the sequence's length is never read).
            static_assert(TILE == 2 * S::PAGE_SPAN, "two page lookups a tile");
            const T *k_src0 = k_base, *v_src0 = v_base, *k_src1 = k_base, *v_src1 = v_base;
            bool block_ok = true;
#pragma unroll
            for (int half_tile = 0; half_tile < 2; ++half_tile) {
                const int q0 = p0 + half_tile * S::PAGE_SPAN;
                if (half_tile == 1 && q0 >= hi) break;
                const bool ok = paged_rows(p, seq, q0, k_base, v_base, half_tile ? k_src1 : k_src0,
                                           half_tile ? v_src1 : v_src0);
                block_ok = block_ok && ok;
            }
            for (int c = threadIdx.x; c < 2 * TILE * ROW_CHUNKS; c += kDecodeThreads) {
                const int is_v = c / (TILE * ROW_CHUNKS);
                const int key = (c / ROW_CHUNKS) % TILE;
                const int part = c % ROW_CHUNKS;
                const bool valid = p0 + key < hi && block_ok;
                const bool upper = key >= S::PAGE_SPAN;
                const T* base = is_v ? (upper ? v_src1 : v_src0) : (upper ? k_src1 : k_src0);
                const int64_t stride = is_v ? p.v_strides[2] : p.k_strides[2];
                const T* src = valid ? base + (key % S::PAGE_SPAN) * stride + part * VEC : base;
                cp_async_16(stage + (is_v * TILE + key) * ROW + part * VEC, src, valid);
            }
            return block_ok;
        }
        const T* k_src = k_base;  // dense: key j at row j; paged: the tile's first key, key p0 + t at row t
        const T* v_src = v_base;
        bool block_ok = true;
        if constexpr (PAGED) block_ok = paged_rows(p, seq, p0, k_base, v_base, k_src, v_src);
        for (int c = threadIdx.x; c < 2 * TILE * ROW_CHUNKS; c += kDecodeThreads) {
            const int is_v = c / (TILE * ROW_CHUNKS);
            const int key = (c / ROW_CHUNKS) % TILE;
            const int part = c % ROW_CHUNKS;
            const int j = p0 + key;
            const bool valid = j < hi && block_ok;
            const T* base = is_v ? v_src : k_src;
            const int64_t stride = is_v ? p.v_strides[2] : p.k_strides[2];
            const T* src = valid ? base + (PAGED ? key : j) * stride + part * VEC : base;
            cp_async_16(stage + (is_v * TILE + key) * ROW + part * VEC, src, valid);
        }
        return block_ok;
    };
    bool first_tiles_ok = true;  // paged: the prologue's tiles had valid block ids
#pragma unroll
    for (int tile = 0; tile < STAGES - 1; ++tile) {
        if (tile < num_tiles) first_tiles_ok &= issue(tile);
        cp_async_commit();
    }

    if (STEP) {
        for (int idx = threadIdx.x; idx < STEP_ROWS * p.half; idx += kDecodeThreads) {
            const int t = idx / p.half, slot = idx % p.half;
            rope_cos_sin(rope_angle(t, inv_freq[slot]), 1.0f, &sm_step_cos[t][slot], &sm_step_sin[t][slot]);
        }
    }

    if constexpr (S::MMA) {
        rope_decode_mma_tiles<T, D, ROWS>(p, stages, sm_step_cos, sm_step_sin, sm_base_cos, sm_base_sin, sm_acc,
                                          sm_m, sm_l, issue, first_tiles_ok, num_tiles, lo, hi, row0, num_rows,
                                          seq, kv_head, seq_len, inv_freq, attention);
    } else {
        // This lane's pair slots: slot_lane + LPK * i, i < SPL.
        const int half = p.half;
#define LR2_SLOT(i) (slot_lane + LPK * (i))
        float slot_freq[SPL];
#pragma unroll
        for (int i = 0; i < SPL; ++i) slot_freq[i] = LR2_SLOT(i) < half ? inv_freq[LR2_SLOT(i)] : 0.0f;

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
                if (row_valid) {
                    x1 = to_float(q_row[slot_d1(LR2_SLOT(i), half)]);
                    x2 = to_float(q_row[slot_d2(LR2_SLOT(i), half)]);
                    if (LR2_SLOT(i) < half) {
                        float c, s;
                        rope_cos_sin(rope_angle(q_pos[r], slot_freq[i]), attention, &c, &s);
                        rotate_pair(x1, x2, c, s, false, &x1, &x2);
                    }
                }
                q1[r][i] = x1 * p.scale_log2;
                q2[r][i] = x2 * p.scale_log2;
            }
        }

        // A bad block id (paged): NaN in every accumulator of this thread, which every later rescale and sum keeps (NaN
        // times 0 included), so every row of the block ends NaN, and through the merge every row of the sequence. Every
        // thread issues every tile, so every thread poisons its own. No state lives across the loop for it.
        auto poison_rows = [&]() {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
#pragma unroll
                for (int i = 0; i < SPL; ++i) acc1[r][i] = acc2[r][i] = NAN;
            }
        };
        if (PAGED && !first_tiles_ok) poison_rows();

        // TRANSPOSED: this lane's own row (its softmax state is m_own, l_own; the arrays m, l stay unused).
        int r_own = 0;
#pragma unroll
        for (int s = 0; (ROWS >> s) > 1; ++s) {
            if (lane & (LPK >> (s + 1))) r_own += (ROWS >> s) / 2;
        }
        int q_pos_own = -1;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) q_pos_own = r == r_own ? q_pos[r] : q_pos_own;
        float m_own = -INFINITY, l_own = 0.0f;
        const int key_lane0 = lane & ~(LPK - 1);

        for (int tile = 0; tile < num_tiles; ++tile) {
            if (tile + STAGES - 1 < num_tiles && !issue(tile + STAGES - 1)) poison_rows();
            cp_async_commit();  // (an empty group near the end keeps the wait count uniform)
            const int p0 = lo + tile * TILE;
            if (STEP) {
                for (int slot = threadIdx.x; slot < p.half; slot += kDecodeThreads)
                    rope_cos_sin(rope_angle(p0, inv_freq[slot]), attention, &sm_base_cos[0][slot],
                                 &sm_base_sin[0][slot]);
            }
            cp_async_wait<STAGES - 1>();
            __syncthreads();  // tile `tile` and the base angles are visible to every thread

            float cos_base[SPL], sin_base[SPL];
#pragma unroll
            for (int i = 0; i < SPL; ++i) {
                cos_base[i] = sin_base[i] = 0.0f;
                if (STEP && LR2_SLOT(i) < half) {
                    cos_base[i] = sm_base_cos[0][LR2_SLOT(i)];
                    sin_base[i] = sm_base_sin[0][LR2_SLOT(i)];
                }
            }
            const T* k_tile = stages + (tile % STAGES) * S::STAGE_ELEMS;
            const T* v_tile = k_tile + TILE * ROW;
#pragma unroll 1
            for (int k0 = 0; k0 < TILE; k0 += KPB) {
                const int t = k0 + group_id;
                const int j = p0 + t;
                const bool key_valid = j < hi;  // past hi: zero-filled rows, score -inf
                const T* k_row = k_tile + t * ROW;
                const T* v_row = v_tile + t * ROW;
                float k1[SPL], k2[SPL], v1[SPL], v2[SPL];
#pragma unroll
                for (int i = 0; i < SPL; ++i) {
                    const int d1 = slot_d1(LR2_SLOT(i), half), d2 = slot_d2(LR2_SLOT(i), half);
                    k1[i] = to_float(k_row[d1]);
                    k2[i] = to_float(k_row[d2]);
                    v1[i] = to_float(v_row[d1]);
                    v2[i] = to_float(v_row[d2]);
                    if (LR2_SLOT(i) < half) {
                        float c, s;
                        if (STEP) {
                            rope_cos_sin_step(p0, t, slot_freq[i], cos_base[i], sin_base[i], sm_step_cos[t][d1],
                                              sm_step_sin[t][d1], &c, &s);
                        } else {
                            rope_cos_sin(rope_angle(j, slot_freq[i]), attention, &c, &s);
                        }
                        rotate_pair(k1[i], k2[i], c, s, false, &k1[i], &k2[i]);
                    }
                }
                if constexpr (TRANSPOSED) {
                    float part[ROWS];
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        part[r] = 0.0f;
#pragma unroll
                        for (int i = 0; i < SPL; ++i) part[r] += q1[r][i] * k1[i] + q2[r][i] * k2[i];
                    }
#pragma unroll
                    for (int s = 0; (ROWS >> s) > 1; ++s) {
                        const int n = ROWS >> s, offset = LPK >> (s + 1);
                        const bool upper = (lane & offset) != 0;
#pragma unroll
                        for (int i = 0; i < n / 2; ++i) {
                            const float send = upper ? part[i] : part[i + n / 2];
                            const float keep = upper ? part[i + n / 2] : part[i];
                            part[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
                        }
                    }
                    const float dot = group_sum<LPK / ROWS>(part[0]);
                    const float score = key_valid && j <= q_pos_own ? dot : -INFINITY;  // causal among the new tokens
                    // The own row's online softmax, rescaling only where its max grows (as the untransposed branch).
                    const bool grow = score > m_own;
                    float alpha = 1.0f;
                    if (grow) {
                        alpha = exp2_shift(m_own, score);  // 0 from an empty state
                        l_own *= alpha;
                        m_own = score;
                    }
                    const float prob = exp2_shift(score, m_own);  // 0 for a masked key
                    l_own += prob;
                    if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
                        for (int r = 0; r < ROWS; ++r) {
                            const float a = __shfl_sync(0xffffffffu, alpha, key_lane0 + row_owner_lane<ROWS, LPK>(r));
#pragma unroll
                            for (int i = 0; i < SPL; ++i) {
                                acc1[r][i] *= a;
                                acc2[r][i] *= a;
                            }
                        }
                    }
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        const float pr = __shfl_sync(0xffffffffu, prob, key_lane0 + row_owner_lane<ROWS, LPK>(r));
#pragma unroll
                        for (int i = 0; i < SPL; ++i) {
                            acc1[r][i] += pr * v1[i];
                            acc2[r][i] += pr * v2[i];
                        }
                    }
                } else {
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        float dot = 0.0f;
#pragma unroll
                        for (int i = 0; i < SPL; ++i) dot += q1[r][i] * k1[i] + q2[r][i] * k2[i];
                        dot = group_sum<LPK>(dot);
                        // Causal among the new tokens.
                        const float score = key_valid && j <= q_pos[r] ? dot : -INFINITY;
                        // The online softmax with the rescale only where the max grows (rare after the first keys):
                        // the state of softmax_update (whose alpha is exactly 1 otherwise) without its per-key
                        // multiplies.
                        if (score > m[r]) {
                            const float alpha = exp2_shift(m[r], score);  // 0 from an empty state
                            l[r] *= alpha;
#pragma unroll
                            for (int i = 0; i < SPL; ++i) {
                                acc1[r][i] *= alpha;
                                acc2[r][i] *= alpha;
                            }
                            m[r] = score;
                        }
                        const float prob = exp2_shift(score, m[r]);  // 0 for a masked key
                        l[r] += prob;
#pragma unroll
                        for (int i = 0; i < SPL; ++i) {
                            acc1[r][i] += prob * v1[i];
                            acc2[r][i] += prob * v2[i];
                        }
                    }
                }
            }
            __syncthreads();  // every thread is done with this stage before it is refilled
        }
        cp_async_wait<0>();
        __syncthreads();  // the stages become the merge buffer

        // The key groups' states into shared memory, then merged per (row, channel).
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
#pragma unroll
            for (int i = 0; i < SPL; ++i) {
                sm_acc[(group_id * ROWS + r) * D + slot_d1(LR2_SLOT(i), half)] = acc1[r][i];
                sm_acc[(group_id * ROWS + r) * D + slot_d2(LR2_SLOT(i), half)] = acc2[r][i];
            }
            if constexpr (TRANSPOSED) {
                if (r == r_own && (lane & (LPK / ROWS - 1)) == 0) {  // the row's first owner lane
                    sm_m[group_id][r] = m_own;
                    sm_l[group_id][r] = l_own;
                }
            } else if (slot_lane == 0) {
                sm_m[group_id][r] = m[r];
                sm_l[group_id][r] = l[r];
            }
        }
    }
    __syncthreads();
#undef LR2_SLOT

    const int64_t part_base = (static_cast<int64_t>(bh) * p.num_splits + split) * num_rows;
    for (int idx = threadIdx.x; idx < ROWS * D; idx += kDecodeThreads) {
        const int r = idx / D;
        const int d = idx % D;
        const int row = row0 + r;
        if (row >= num_rows) continue;
        float mm = -INFINITY, ll = 0.0f, aa = 0.0f;
#pragma unroll 4
        for (int g = 0; g < S::GROUPS; ++g) {
            float m_new, w_old, w_new;
            softmax_merge_weights(mm, sm_m[g][r], &m_new, &w_old, &w_new);
            ll = ll * w_old + sm_l[g][r] * w_new;
            aa = aa * w_old + sm_acc[(g * ROWS + r) * D + d] * w_new;
            mm = m_new;
        }
        float lse, inv_l;
        softmax_finish(mm, ll, &lse, &inv_l);
        if (used == 1) {
            const int g = row / p.n_new, t = row % p.n_new;
            T* out = static_cast<T*>(p.out) + seq * p.o_strides[0] +
                     static_cast<int64_t>(kv_head * p.group + g) * p.o_strides[1] + t * p.o_strides[2];
            out[d] = from_float<T>(overlong ? NAN : aa * inv_l);  // a row that saw no key: 0
        } else {
            p.o_part[(part_base + row) * D + d] = aa * inv_l;
            if (d == 0) p.lse_part[part_base + row] = lse;
        }
    }
}

// Combine a sequence's splits: out = sum_s 2^lse_s o_s / sum_s 2^lse_s, one thread per (row, channel). A sequence
// that used one split (or is over the capacity) was written by the decode kernel.
template <typename T>
__global__ void __launch_bounds__(128) rope_decode_merge_kernel(const DecodeParams p) {
    const int bh = blockIdx.x;
    const int seq = bh / p.num_kv_heads;
    const int kv_head = bh % p.num_kv_heads;
    const int num_rows = p.group * p.n_new;
    const int seq_len = p.seqlens[seq];
    const int kv_len = seq_len > p.capacity ? 0 : max(0, seq_len);
    int chunk, used;
    decode_split_plan(kv_len, p.num_splits, p.split_min_keys, &chunk, &used);
    if (used == 1) return;
    const int64_t idx = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
    if (idx >= static_cast<int64_t>(num_rows) * p.head_dim) return;
    const int row = static_cast<int>(idx / p.head_dim);
    const int d = static_cast<int>(idx % p.head_dim);
    float m = -INFINITY, l = 0.0f, acc = 0.0f;
    for (int split = 0; split < used; ++split) {
        const int64_t part_row = (static_cast<int64_t>(bh) * p.num_splits + split) * num_rows + row;
        float alpha, weight;
        softmax_update(p.lse_part[part_row], &m, &l, &alpha, &weight);  // 0 weight for a split that saw no key
        acc = acc * alpha + weight * p.o_part[part_row * p.head_dim + d];
    }
    const int g = row / p.n_new, t = row % p.n_new;
    T* out = static_cast<T*>(p.out) + seq * p.o_strides[0] +
             static_cast<int64_t>(kv_head * p.group + g) * p.o_strides[1] + t * p.o_strides[2];
    out[d] = from_float<T>(l > 0.0f ? acc / l : 0.0f);
}

// A kernel that keeps its stages in dynamic shared memory (DecodeShape::DYNAMIC_SMEM) is opted in to them on the
// current device before its first launch there (cudaFuncSetAttribute(kMaxDynamicSharedMemorySize), once a device:
// `configured` holds a bit per device), after checking its static + dynamic bytes against the device's per-block
// opt-in limit. nullptr, or why it cannot run here (a message valid until this thread's next call).
template <typename Kernel>
const char* opt_in_dynamic_smem(Kernel kernel, int static_bytes, int dynamic_bytes, const char* what,
                                std::atomic<unsigned long long>& configured) {
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return cudaGetErrorString(err);
    const unsigned long long bit = device < 64 ? 1ull << device : 0ull;
    if (bit != 0 && (configured.load(std::memory_order_relaxed) & bit) != 0) return nullptr;
    int limit = 0;
    err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return cudaGetErrorString(err);
    if (static_bytes + dynamic_bytes > limit) {
        thread_local std::string message;
        message = std::string("rope_decode: the ") + what + " kernel needs " +
                  std::to_string(static_bytes + dynamic_bytes) + " bytes of shared memory a block (" +
                  std::to_string(static_bytes) + " static + " + std::to_string(dynamic_bytes) +
                  " dynamic), more than this GPU's opt-in limit of " + std::to_string(limit) + " bytes on device " +
                  std::to_string(device) + " (cudaDevAttrMaxSharedMemoryPerBlockOptin); use backend='triton'";
        return message.c_str();
    }
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_bytes);
    if (err != cudaSuccess) return cudaGetErrorString(err);
    configured.fetch_or(bit, std::memory_order_relaxed);
    return nullptr;
}

// nullptr after launching the decode kernel (and the merge where splits > 1), or why it did not launch.
template <typename T, int D, int ROWS, bool PAGED>
const char* launch_rope_decode_kernels(const DecodeParams& p, cudaStream_t stream) {
    using S = DecodeShape<T, D, ROWS>;
    const int num_rows = p.group * p.n_new;
    const dim3 grid(p.batch * p.num_kv_heads, p.num_splits, (num_rows + ROWS - 1) / ROWS);
    const auto kernel = rope_decode_kernel<T, D, ROWS, PAGED>;
    if constexpr (S::DYNAMIC_SMEM) {
        static std::atomic<unsigned long long> configured{0};  // one per instantiation: devices opted in
        if (const char* refused = opt_in_dynamic_smem(kernel, S::TABLE_BYTES, S::DYNAMIC_BYTES,
                                                      "fp16/bf16 tensor-core (head_dim 256, 4 rows a block)",
                                                      configured)) {
            return refused;
        }
        LR2_LAUNCH_SMEM(kernel, grid, kDecodeThreads, S::DYNAMIC_BYTES, stream)(p);
    } else {
        LR2_LAUNCH(kernel, grid, kDecodeThreads, stream)(p);
    }
    if (p.num_splits > 1) {
        const int64_t elements = static_cast<int64_t>(num_rows) * p.head_dim;
        const dim3 merge_grid(p.batch * p.num_kv_heads, static_cast<unsigned>((elements + 127) / 128));
        const auto merge = rope_decode_merge_kernel<T>;
        LR2_LAUNCH(merge, merge_grid, 128, stream)(p);
    }
    return nullptr;
}

// The message of a paged launch whose block_size the kernel cannot take (the Python launcher raises a ValueError
// first, from its mirror lr2kernels.ops.cuda.launch.decode_key_tile).
constexpr const char* kBadBlockSize =
    "rope_decode: a paged cache's block_size must be a multiple of the kernel's key tile (8 to 32 keys by dtype, "
    "head_dim and rows per block: lr2kernels.ops.cuda.launch.decode_key_tile; every multiple of 32 fits)";

template <typename T, int D, int ROWS>
cudaError_t launch_rope_decode_rows(const DecodeParams& p, cudaStream_t stream, const char** refused) {
    if (p.block_table == nullptr) {
        *refused = launch_rope_decode_kernels<T, D, ROWS, false>(p, stream);
    } else if (p.block_size <= 0 || p.block_size % DecodeShape<T, D, ROWS>::PAGE_SPAN != 0) {
        *refused = kBadBlockSize;
    } else {
        *refused = launch_rope_decode_kernels<T, D, ROWS, true>(p, stream);
    }
    return *refused != nullptr ? cudaSuccess : cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_rope_decode_d(const DecodeParams& p, cudaStream_t stream, const char** refused) {
    switch (decode_rows_for<D>(p.group * p.n_new)) {
        case 1: return launch_rope_decode_rows<T, D, 1>(p, stream, refused);
        case 2: return launch_rope_decode_rows<T, D, 2>(p, stream, refused);
        case 4: return launch_rope_decode_rows<T, D, 4>(p, stream, refused);
        default: return launch_rope_decode_rows<T, D, decode_max_rows<D>()>(p, stream, refused);
    }
}

// The instantiations for one element type; head_dim picks the kernel.
template <typename T>
const char* launch_rope_decode(const DecodeParams& p, void* stream) {
    if (const char* invalid = check_decode_params(p)) return invalid;
    if (p.batch == 0 || p.num_kv_heads == 0 || p.group * p.n_new == 0) return nullptr;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    const char* refused = nullptr;
    cudaError_t err;
    switch (p.head_dim) {
        case 64: err = launch_rope_decode_d<T, 64>(p, s, &refused); break;
        case 96: err = launch_rope_decode_d<T, 96>(p, s, &refused); break;
        case 128: err = launch_rope_decode_d<T, 128>(p, s, &refused); break;
        case 256: err = launch_rope_decode_d<T, 256>(p, s, &refused); break;
        default: return "rope_decode: head_dim must be 64, 96, 128 or 256 in the CUDA kernels";
    }
    if (refused != nullptr) return refused;
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace lr2
