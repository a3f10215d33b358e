// pybind11 bindings of lr2kernels._cuda: raw pointers, shapes, strides and the CUDA stream as integers (no torch C++
// ABI). The Python side (lr2kernels/ops/cuda) checks the tensors and passes data_ptr(), sizes, stride() and
// torch.cuda.current_stream().cuda_stream. A launch error raises RuntimeError with the CUDA runtime's message.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "decode_params.h"
#include "lr2_cuda.h"

// The digest of the csrc/ sources this module was built from (lr2kernels/ops/cuda/build.py: sources_digest), passed
// by setup.py and the build on first use; the launcher refuses a module whose digest is not its sources'.
#ifndef LR2_SOURCES_DIGEST
#define LR2_SOURCES_DIGEST ""
#endif

namespace py = pybind11;
using Strides = std::array<int64_t, 3>;

namespace {

template <typename P>
P* ptr(std::uintptr_t address) {
    return reinterpret_cast<P*>(address);
}

void copy3(int64_t* dst, const Strides& src) {
    for (int i = 0; i < 3; ++i) dst[i] = src[i];
}

void check(const char* error, const char* op) {
    if (error != nullptr) throw std::runtime_error(std::string("lr2kernels._cuda.") + op + ": " + error);
}

void rope_decode(int dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                 std::uintptr_t o_part, std::uintptr_t lse_part, std::uintptr_t seqlens, std::uintptr_t inv_freq,
                 const Strides& q_strides, const Strides& k_strides, const Strides& v_strides,
                 const Strides& o_strides, int batch, int num_kv_heads, int group, int n_new, int half,
                 int head_dim, int num_splits, int split_min_keys, int capacity, int original_max_position,
                 float scale_log2, float attention_short, float attention_long, std::uintptr_t block_table,
                 int64_t block_table_stride, int block_size, int num_blocks, std::uintptr_t stream) {
    const lr2::DecodeParams p = lr2::make_decode_params(
        ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(out), ptr<float>(o_part),
        ptr<float>(lse_part), ptr<const int32_t>(seqlens), ptr<const float>(inv_freq), q_strides.data(),
        k_strides.data(), v_strides.data(), o_strides.data(), batch, num_kv_heads, group, n_new, half, head_dim,
        num_splits, split_min_keys, capacity, original_max_position, scale_log2, attention_short, attention_long,
        ptr<const int32_t>(block_table), block_table_stride, block_size, num_blocks);
    if (const char* invalid = lr2::check_decode_params(p)) throw std::invalid_argument(invalid);
    void* s = ptr<void>(stream);
    switch (dtype) {
        case lr2::kFloat32: check(lr2::rope_decode_f32(p, s), "rope_decode"); break;
        case lr2::kFloat16: check(lr2::rope_decode_f16(p, s), "rope_decode"); break;
        case lr2::kBFloat16: check(lr2::rope_decode_bf16(p, s), "rope_decode"); break;
        default: throw std::invalid_argument("rope_decode: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
    }
}

void rope_rotate(int dtype, std::uintptr_t x0, std::uintptr_t y0, int heads0, const Strides& x0_strides,
                 const Strides& y0_strides, std::uintptr_t x1, std::uintptr_t y1, int heads1,
                 const Strides& x1_strides, const Strides& y1_strides, std::uintptr_t inv_freq, int half, int head_dim,
                 std::uintptr_t is_long, std::uintptr_t cu_seqlens, std::uintptr_t positions, int64_t stride_pos_b,
                 int batch, int seq_len, float attention_short, float attention_long, bool transposed, bool rerotate,
                 bool from_long, bool to_long, float scale, std::uintptr_t stream) {
    lr2::RopeParams p{};
    p.x[0] = ptr<const void>(x0);
    p.y[0] = ptr<void>(y0);
    p.heads[0] = heads0;
    copy3(p.x_strides[0], x0_strides);
    copy3(p.y_strides[0], y0_strides);
    p.x[1] = ptr<const void>(x1);
    p.y[1] = ptr<void>(y1);
    p.heads[1] = heads1;
    copy3(p.x_strides[1], x1_strides);
    copy3(p.y_strides[1], y1_strides);
    p.inv_freq = ptr<const float>(inv_freq);
    p.half = half;
    p.head_dim = head_dim;
    p.is_long = ptr<const int32_t>(is_long);
    p.cu_seqlens = ptr<const int32_t>(cu_seqlens);
    p.positions = ptr<const int32_t>(positions);
    p.stride_pos_b = stride_pos_b;
    p.batch = batch;
    p.seq_len = seq_len;
    p.attention_short = attention_short;
    p.attention_long = attention_long;
    p.transposed = transposed;
    p.rerotate = rerotate;
    p.from_long = from_long;
    p.to_long = to_long;
    p.scale = scale;
    if (head_dim % 2 != 0 || half * 2 > head_dim) throw std::invalid_argument("rope: bad head_dim / rotary_dim");
    if (!rerotate && is_long == 0) throw std::invalid_argument("rope: apply_rope needs is_long");
    check(lr2::rope_rotate(dtype, p, ptr<void>(stream)), "rope_rotate");
}

py::tuple device_count() {
    const char* error = nullptr;
    const int count = lr2::cuda_device_count(&error);
    return py::make_tuple(count, error ? py::str(error) : py::str(""));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "lr2kernels CUDA kernels (raw pointers + strides + stream; see csrc/README.md)";
    m.def("device_count", &device_count,
          "(CUDA devices visible to the CUDA runtime, '' or the runtime's reason when there are none)");
    m.def("rope_decode", &rope_decode,
          "Split-KV rope_decode on a PRE-RoPE cache, dense or paged (block_table 0: dense; see csrc/lr2_cuda.h)");
    m.def("rope_rotate", &rope_rotate, "apply_rope / its transpose / rerotate (see csrc/lr2_cuda.h)");
    py::list dims;
    for (int d : lr2::kDecodeHeadDims) dims.append(d);
    m.attr("DECODE_HEAD_DIMS") = py::tuple(dims);
    m.attr("DTYPES") = py::make_tuple("float32", "float16", "bfloat16");
    m.attr("BINDINGS_VERSION") = lr2::kBindingsVersion;
    m.attr("SOURCES_DIGEST") = LR2_SOURCES_DIGEST;
}
