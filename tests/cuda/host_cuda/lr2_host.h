// Host emulation of the CUDA execution model for tests/cuda (g++ only, never part of the extension): the REAL kernel
// bodies of csrc/ compiled as ordinary C++ and run block by block, each CUDA thread a fiber (ucontext) of one OS
// thread, switched only where a CUDA thread would wait for others: __syncthreads, a warp shuffle, a cp.async wait.
//
// What it checks that plain host math cannot: the kernels' indexing, masking, block/warp cooperation and pipelines.
// - __shared__ variables are function statics (one block runs at a time), so every fiber of a block sees them.
// - __shfl_xor_sync exchanges a value through a per-warp buffer behind a barrier of the warp's 32 lanes.
// - cp.async copies are queued per thread in commit groups and performed only when cp_async_wait lets them complete,
//   so a read of a stage before its wait sees the stale stage (and fails the test), as it could on a GPU.
// - Two schedules (set_mode): "late" copies with round-robin threads (every runnable thread in turn: warps in
//   lockstep), and "eager" copies (performed at issue) with greedy threads (always the lowest-numbered runnable
//   thread: warp 0 runs ahead until a __syncthreads stops it), which exposes a stage refilled while another warp
//   still reads it (a missing barrier after the compute of a tile).
// - Dynamic shared memory (LR2_LAUNCH_SMEM, LR2_DYNAMIC_SHARED) is a fresh buffer a block, filled with 0xff bytes (NaN
//   in fp16, bf16 and fp32), so a read of a byte no thread wrote shows; a kernel that takes more than the launch gave,
//   or a launch past 48 KB without the kernel's cudaFuncSetAttribute, fails.
// - 16-byte copies and loads must be 16-byte aligned (source and destination), as on a GPU; a violation, a deadlock
//   (some threads at a barrier that others never reach) or a launch with threads not a multiple of 32 is recorded in
//   lr2_host::error() and fails the test.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace lr2_host {

struct Copy {
    void* dst;
    const void* src;
    bool valid;  // false: zero-fill (cp.async with src-size 0)
};

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    bool done = false;
    const unsigned* wait_generation = nullptr;  // blocked at a barrier until *wait_generation != wait_value
    unsigned wait_value = 0;
    unsigned shuffles = 0;                    // this lane's shuffle count (the parity of its exchange buffer)
    std::vector<std::vector<Copy>> groups;    // committed cp.async groups, oldest first
    std::vector<Copy> open;                   // copies issued since the last commit
};

struct Warp {
    float vals[2][32];
    unsigned bits[2][32];
    unsigned arrived = 0, generation = 0;
};

struct Block {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    ucontext_t scheduler;
    unsigned current = 0;
    unsigned arrived = 0, generation = 0;
};

inline Block* g_block = nullptr;
inline std::function<void()> g_body;
inline std::string g_error;
inline bool g_eager = false;   // cp.async performed at issue (else at the wait that completes it)
inline bool g_greedy = false;  // resume the lowest-numbered runnable thread (else each runnable thread in turn)

// Dynamic shared memory: the emulated device's per-block opt-in limit, each kernel's cudaFuncSetAttribute value, and
// the running block's buffer.
inline int g_device = 0;               // cudaGetDevice: a new id for each emulated device
inline int g_smem_optin = 227 * 1024;  // H100/H200
inline std::map<const void*, int> g_dynamic_smem_allowed;
struct alignas(16) Bytes16 {
    unsigned char b[16];
};
inline std::vector<Bytes16> g_dynamic_smem;
inline int g_dynamic_smem_bytes = 0;

// Switch to a new emulated device (a new cudaGetDevice id) whose per-block opt-in limit is `bytes`: kernels opt in
// again (and the launch's per-device cache of that sees a device it has not configured).
inline void set_smem_optin(int bytes) {
    g_smem_optin = bytes;
    g_device = (g_device + 1) % 64;
    g_dynamic_smem_allowed.clear();
}

inline void set_mode(bool eager, bool greedy) {
    g_eager = eager;
    g_greedy = greedy;
}

inline const std::string& error() { return g_error; }
inline void clear_error() { g_error.clear(); }
inline void fail(const std::string& message) {
    if (g_error.empty()) g_error = message;
}

inline void yield() { swapcontext(&g_block->fibers[g_block->current].ctx, &g_block->scheduler); }

inline void barrier(unsigned* arrived, unsigned* generation, unsigned count) {
    if (++*arrived == count) {
        *arrived = 0;
        ++*generation;
        return;
    }
    Fiber& f = g_block->fibers[g_block->current];
    f.wait_generation = generation;
    f.wait_value = *generation;
    yield();  // resumed once the generation moved on (or never, in a deadlock)
    f.wait_generation = nullptr;
}

inline bool runnable(const Fiber& f) {
    return !f.done && (f.wait_generation == nullptr || *f.wait_generation != f.wait_value);
}

inline void entry() {
    g_body();
    g_block->fibers[g_block->current].done = true;
}

inline void sync_threads() { barrier(&g_block->arrived, &g_block->generation, blockDim.x * blockDim.y * blockDim.z); }

// Every lane of the warp posts a value; after the warp's barrier, the warp's 32 values (one buffer per parity of the
// lane's exchange count, so a fast lane's next exchange never overwrites values a slow lane has yet to read).
inline const float* warp_exchange(float value) {
    const unsigned tid = threadIdx.x, lane = tid % 32;
    Warp& warp = g_block->warps[tid / 32];
    const unsigned parity = g_block->fibers[tid].shuffles++ & 1;
    warp.vals[parity][lane] = value;
    barrier(&warp.arrived, &warp.generation, 32);
    return warp.vals[parity];
}

// The same for a 32-bit register's bits (the mma emulation's fragments), through an integer buffer: a pair of fp16/
// bf16 values read as one fp32 is often a subnormal, which a float path may flush to zero.
inline const unsigned* warp_exchange_bits(unsigned bits) {
    const unsigned tid = threadIdx.x, lane = tid % 32;
    Warp& warp = g_block->warps[tid / 32];
    const unsigned parity = g_block->fibers[tid].shuffles++ & 1;
    warp.bits[parity][lane] = bits;
    barrier(&warp.arrived, &warp.generation, 32);
    return warp.bits[parity];
}

inline float shuffle_xor(float value, int offset) {
    return warp_exchange(value)[(threadIdx.x % 32 ^ static_cast<unsigned>(offset)) % 32];
}

inline float shuffle_idx(float value, int src_lane) { return warp_exchange(value)[static_cast<unsigned>(src_lane) % 32]; }

inline int any(bool predicate) {
    const float* all = warp_exchange(predicate ? 1.0f : 0.0f);
    for (int lane = 0; lane < 32; ++lane) {
        if (all[lane] != 0.0f) return 1;
    }
    return 0;
}

// The block's dynamic shared memory, of which the kernel uses `bytes`.
inline unsigned char* dynamic_shared(int bytes) {
    if (bytes > g_dynamic_smem_bytes) fail("dynamic shared memory: the kernel uses more bytes than the launch gave");
    return reinterpret_cast<unsigned char*>(g_dynamic_smem.data());
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

inline void cp_async_16(void* dst, const void* src, bool valid) {
    if (!aligned16(dst) || (valid && !aligned16(src))) fail("cp.async: a 16-byte copy with a misaligned address");
    if (g_eager) {
        if (valid) std::memcpy(dst, src, 16);
        else std::memset(dst, 0, 16);
        return;
    }
    g_block->fibers[threadIdx.x].open.push_back({dst, src, valid});
}

inline void cp_async_commit() {
    Fiber& f = g_block->fibers[threadIdx.x];
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}

// Complete every committed group but the newest `pending` (copies issued after the last commit stay queued).
inline void cp_async_wait(int pending) {
    Fiber& f = g_block->fibers[threadIdx.x];
    while (static_cast<int>(f.groups.size()) > pending) {
        for (const Copy& c : f.groups.front()) {
            if (c.valid) std::memcpy(c.dst, c.src, 16);
            else std::memset(c.dst, 0, 16);
        }
        f.groups.erase(f.groups.begin());
    }
}

// Run kernel(args) on every block of the grid, blocks one after another.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, int smem, Args... args) {
    const unsigned threads = block.x * block.y * block.z;
    if (block.y != 1 || block.z != 1 || threads % 32 != 0) {
        fail("launch: the emulation runs 1-D blocks of a multiple of 32 threads");
        return;
    }
    gridDim = grid;
    blockDim = block;
    g_body = [&] { kernel(args...); };
    for (unsigned z = 0; z < grid.z && g_error.empty(); ++z) {
        for (unsigned y = 0; y < grid.y && g_error.empty(); ++y) {
            for (unsigned x = 0; x < grid.x && g_error.empty(); ++x) {
                Bytes16 poison;
                std::memset(poison.b, 0xff, 16);
                g_dynamic_smem.assign((smem + 15) / 16 + 1, poison);
                g_dynamic_smem_bytes = smem;
                Block b;
                b.fibers.resize(threads);
                b.warps.resize(threads / 32);
                g_block = &b;
                blockIdx = dim3(x, y, z);
                for (Fiber& f : b.fibers) {
                    f.stack.resize(256 * 1024);
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = &b.scheduler;
                    makecontext(&f.ctx, entry, 0);
                }
                auto resume = [&](unsigned t) {
                    b.current = t;
                    threadIdx = dim3(t);
                    swapcontext(&b.scheduler, &b.fibers[t].ctx);
                };
                for (;;) {
                    bool alive = false, ran = false;
                    for (unsigned t = 0; t < threads && g_error.empty(); ++t) {
                        alive = alive || !b.fibers[t].done;
                        if (!runnable(b.fibers[t])) continue;
                        ran = true;
                        resume(t);
                        if (g_greedy) break;  // start again from thread 0
                    }
                    if (!g_error.empty() || !alive) break;
                    if (!ran) {
                        fail("deadlock: threads wait at a barrier that the others never reach");
                        break;
                    }
                }
                // A deadlocked block's fibers are abandoned with their stacks (never resumed).
                g_block = nullptr;
            }
        }
    }
}

}  // namespace lr2_host
