// The SIMD kernels compiled for AVX512 (VL/BW/DQ/VNNI). Only called after dispatch.cpp checked the CPU.
#include <cmath>
#include <cstddef>
#include <cstring>

#include "kernels.h"  // before the target pragma: shared inline helpers keep the baseline ISA

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define HMOE_SIMD_NS avx512
#define HMOE_VNNI 1
#define HMOE_W512 1
#include "kernels_simd.inc"

namespace hmoe {
const KernelSet* kernels_avx512() {
    static const KernelSet k = avx512::make_set("avx512");
    return &k;
}
}  // namespace hmoe
#pragma GCC pop_options
#else
namespace hmoe {
const KernelSet* kernels_avx512() { return nullptr; }
}  // namespace hmoe
#endif
