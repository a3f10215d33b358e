// rope_decode instantiations for float elements (head_dim 64, 96, 128, 256): see rope_decode.cuh.
#include "rope_decode.cuh"

namespace lr2 {

const char* rope_decode_f32(const DecodeParams& p, void* stream) { return launch_rope_decode<float>(p, stream); }

}  // namespace lr2
