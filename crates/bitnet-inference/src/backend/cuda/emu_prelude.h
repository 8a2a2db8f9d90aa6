// What kernels.cu needs from CUDA, for running it on the CPU in the unit tests (emu.rs):
// the thread indices as globals that the launcher sets before each thread's call, and the
// intrinsics the kernels use. Kernels that need barriers, shared memory or warp operations
// would not compile here (none does yet).
#include <cmath>
#include <cstring>
#include <cstddef>
#include <utility>

struct dim3 {
    unsigned x, y, z;
};
// Per host thread: tests launch from several threads at once.
static thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline

static inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; i++) {
        c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    }
    return c;
}

// Launches run one thread after another, so a plain add is atomic here.
static inline int atomicAdd(int* p, int v) {
    int old = *p;
    *p = old + v;
    return old;
}

// Calls kernel `f` with its arguments read from the addresses in `args` (one per
// parameter, as cuLaunchKernel takes them).
template <typename F, F f>
struct emu_wrap;
template <typename... A, void (*f)(A...)>
struct emu_wrap<void (*)(A...), f> {
    template <std::size_t... I>
    static void call_with(void** args, std::index_sequence<I...>) {
        f(*static_cast<A*>(args[I])...);
    }
    static void call(void** args) { call_with(args, std::index_sequence_for<A...>{}); }
};

struct emu_kernel {
    const char* name;
    void (*call)(void**);
};
