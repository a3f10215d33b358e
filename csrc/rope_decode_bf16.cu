// rope_decode instantiations for __nv_bfloat16 elements (head_dim 64, 96, 128, 256): see rope_decode.cuh.
#include "rope_decode.cuh"

namespace lr2 {

const char* rope_decode_bf16(const DecodeParams& p, void* stream) { return launch_rope_decode<__nv_bfloat16>(p, stream); }

}  // namespace lr2
