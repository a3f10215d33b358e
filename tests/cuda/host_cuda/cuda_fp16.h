// __half for the host emulation (tests/cuda only): IEEE binary16 bits, conversions rounded to nearest even.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct __half {
    std::uint16_t bits;
};

inline float __half2float(__half h) {
    const std::uint32_t sign = (h.bits & 0x8000u) << 16, exponent = (h.bits >> 10) & 0x1f, mantissa = h.bits & 0x3ff;
    float magnitude;
    if (exponent == 0) magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    else if (exponent == 31) magnitude = mantissa ? NAN : INFINITY;
    else magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), static_cast<int>(exponent) - 25);
    std::uint32_t out;
    std::memcpy(&out, &magnitude, 4);
    out |= sign;
    float result;
    std::memcpy(&result, &out, 4);
    return result;
}

inline __half __float2half_rn(float x) {
    // binary16 has 11 significant bits: round x to them (nearest even) in double, then pack.
    __half h{0};
    std::uint32_t xbits;
    std::memcpy(&xbits, &x, 4);
    const std::uint16_t sign = static_cast<std::uint16_t>((xbits >> 16) & 0x8000u);
    const double a = std::fabs(static_cast<double>(x));
    if (std::isnan(x)) return __half{static_cast<std::uint16_t>(sign | 0x7e00)};
    if (a >= 65520.0) return __half{static_cast<std::uint16_t>(sign | 0x7c00)};
    if (a < std::ldexp(1.0, -14)) {  // subnormal: multiples of 2^-24
        const double m = std::nearbyint(a * std::ldexp(1.0, 24));
        return __half{static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(m))};
    }
    int e;
    std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1)
    double m = std::nearbyint(std::ldexp(a, 11 - e));  // 11 significant bits
    if (m >= 2048.0) {
        m /= 2.0;
        ++e;
    }
    if (e - 1 + 15 >= 31) return __half{static_cast<std::uint16_t>(sign | 0x7c00)};
    h.bits = static_cast<std::uint16_t>(sign | ((e - 1 + 15) << 10) | (static_cast<std::uint32_t>(m) & 0x3ff));
    return h;
}
