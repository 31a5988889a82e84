// Chooses the kernel variant once from the CPU's features; tests may force another one.
#include <atomic>
#include <cstring>

#include "ops.h"

namespace hmoe {

CpuFeatures cpu_features() {
    CpuFeatures f{};
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_cpu_init();
    f.avx2 = __builtin_cpu_supports("avx2");
    f.fma = __builtin_cpu_supports("fma");
    f.f16c = __builtin_cpu_supports("f16c");
    f.avx512f = __builtin_cpu_supports("avx512f");
    f.avx512bw = __builtin_cpu_supports("avx512bw");
    f.avx512vl = __builtin_cpu_supports("avx512vl");
    f.avx512dq = __builtin_cpu_supports("avx512dq");
    f.avx512vnni = __builtin_cpu_supports("avx512vnni");
#endif
    return f;
}

const KernelSet* variant(const char* name) {
    const CpuFeatures f = cpu_features();
    const bool avx2 = f.avx2 && f.fma && f.f16c;
    if (!std::strcmp(name, "scalar")) return kernels_scalar();
    if (!std::strcmp(name, "avx2")) return avx2 ? kernels_avx2() : nullptr;
    if (!std::strcmp(name, "avx512"))
        return avx2 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vnni ? kernels_avx512()
                                                                                          : nullptr;
    return nullptr;
}

const KernelSet* best_kernels() {
    static const KernelSet* best = [] {
        for (const char* n : {"avx512", "avx2"})
            if (const KernelSet* k = variant(n)) return k;
        return kernels_scalar();
    }();
    return best;
}

int r16_prefetch_min_tokens = 8;

static std::atomic<const KernelSet*> g_active{nullptr};

const KernelSet* active_kernels() {
    const KernelSet* k = g_active.load(std::memory_order_acquire);
    return k ? k : best_kernels();
}

void set_active_kernels(const KernelSet* k) { g_active.store(k, std::memory_order_release); }

}  // namespace hmoe
