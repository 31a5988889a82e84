// The SIMD kernels compiled for AVX2. Only called after dispatch.cpp checked the CPU.
#include <cmath>
#include <cstddef>
#include <cstring>

#include "kernels.h"  // before the target pragma: shared inline helpers keep the baseline ISA

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#define HMOE_SIMD_NS avx2
#define HMOE_VNNI 0
#include "kernels_simd.inc"

namespace hmoe {
const KernelSet* kernels_avx2() {
    static const KernelSet k = avx2::make_set("avx2");
    return &k;
}
}  // namespace hmoe
#pragma GCC pop_options
#else
namespace hmoe {
const KernelSet* kernels_avx2() { return nullptr; }
}  // namespace hmoe
#endif
