// __nv_bfloat16 for the host emulation (tests/cuda only): the high 16 bits of an fp32, rounded to nearest even.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    std::uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    const std::uint32_t bits = static_cast<std::uint32_t>(h.bits) << 16;
    float x;
    std::memcpy(&x, &bits, 4);
    return x;
}

inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    std::uint32_t bits;
    std::memcpy(&bits, &x, 4);
    if (std::isnan(x)) return __nv_bfloat16{static_cast<std::uint16_t>((bits >> 16) | 0x40)};
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return __nv_bfloat16{static_cast<std::uint16_t>(bits >> 16)};
}
