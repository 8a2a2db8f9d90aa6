// What kernels.cu needs from CUDA, for running it on the CPU in the unit tests (emu.rs):
// the thread indices as globals that the launcher sets before each thread's call, and the
// intrinsics the kernels use. A block's threads run as fibers on the launching
// thread, one after another, each up to its next __syncthreads(): that is a barrier's meaning,
// and `__shared__` variables (function statics) are then shared by the block. The one warp
// operation the kernels use, the int8 `mma.sync`, is emulated through barriers (below).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstddef>
#include <utility>
#include <vector>
#include <ucontext.h>

struct dim3 {
    unsigned x, y, z;
};
// Per host thread: tests launch from several threads at once.
static thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static thread_local

// The fibers of the block being run: each thread runs on its own stack until its next
// __syncthreads() or its end, then the scheduler resumes the next one. On x86-64 a switch is
// six saved registers and a stack pointer (emu_switch), without the signal-mask system call
// that swapcontext makes (that made the tests several times slower); elsewhere, ucontext.
struct emu_block {
    std::vector<char> stacks;
    std::vector<char> done;
    unsigned current = 0;
    void (*call)(void**) = nullptr;
    void** args = nullptr;
#if defined(__x86_64__)
    void* scheduler_sp = nullptr;
    std::vector<void*> sp;
#else
    ucontext_t scheduler;
    std::vector<ucontext_t> fibers;
#endif
};
static thread_local emu_block* emu_running = nullptr;
static const size_t EMU_STACK = 64 * 1024;

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack and its pointer in *save, then
// continues on the stack `load` (saved the same way, or prepared by emu_prepare).
extern "C" void emu_switch(void** save, void* load);
asm(R"(
.text
.p2align 4
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch, .-emu_switch
)");

static void emu_fiber_main() {
    emu_block* b = emu_running;
    b->call(b->args);
    b->done[b->current] = 1;
    void* finished;
    emu_switch(&finished, b->scheduler_sp);
    __builtin_unreachable();
}

static inline void emu_prepare(emu_block* b, unsigned i) {
    char* top = b->stacks.data() + EMU_STACK * (i + 1);
    top = (char*)((size_t)top & ~(size_t)15);
    // Six zero registers, then emu_fiber_main as the return address: entered as if called.
    void** sp = (void**)(top - 64);
    for (int r = 0; r < 6; r++) sp[r] = nullptr;
    sp[6] = (void*)&emu_fiber_main;
    b->sp[i] = sp;
}
static inline void emu_resume(emu_block* b, unsigned i) { emu_switch(&b->scheduler_sp, b->sp[i]); }
static inline void emu_yield(emu_block* b) { emu_switch(&b->sp[b->current], b->scheduler_sp); }
static inline void emu_alloc(emu_block* b, unsigned threads) { b->sp.resize(threads); }
#else
static void emu_fiber_main() {
    emu_block* b = emu_running;
    b->call(b->args);
    b->done[b->current] = 1;
}
static inline void emu_prepare(emu_block* b, unsigned i) {
    getcontext(&b->fibers[i]);
    b->fibers[i].uc_stack.ss_sp = b->stacks.data() + EMU_STACK * i;
    b->fibers[i].uc_stack.ss_size = EMU_STACK;
    b->fibers[i].uc_link = &b->scheduler;
    makecontext(&b->fibers[i], emu_fiber_main, 0);
}
static inline void emu_resume(emu_block* b, unsigned i) { swapcontext(&b->scheduler, &b->fibers[i]); }
static inline void emu_yield(emu_block* b) { swapcontext(&b->fibers[b->current], &b->scheduler); }
static inline void emu_alloc(emu_block* b, unsigned threads) { b->fibers.resize(threads); }
#endif

static inline void __syncthreads() {
    emu_block* b = emu_running;
    if (!b) {
        // A kernel that Kernel::uses_barriers (device.rs) does not list.
        std::fputs("emulator: __syncthreads() in a kernel run without fibers\n", stderr);
        std::abort();
    }
    emu_yield(b);
}

// Runs `call` over the grid: each block's threads as fibers where `fibers`, else one after
// another.
static void emu_run(void (*call)(void**), void** args, bool fibers, const unsigned* grid,
                    const unsigned* block) {
    gridDim = {grid[0], grid[1], grid[2]};
    blockDim = {block[0], block[1], block[2]};
    const unsigned threads = block[0] * block[1] * block[2];
    auto set_thread = [&](unsigned i) {
        threadIdx = {i % block[0], i / block[0] % block[1], i / (block[0] * block[1])};
    };
    emu_block b;
    if (fibers) {
        b.stacks.resize(EMU_STACK * threads);
        b.done.resize(threads);
        b.call = call;
        b.args = args;
        emu_alloc(&b, threads);
    }
    for (unsigned bz = 0; bz < grid[2]; bz++)
    for (unsigned by = 0; by < grid[1]; by++)
    for (unsigned bx = 0; bx < grid[0]; bx++) {
        blockIdx = {bx, by, bz};
        if (!fibers) {
            for (unsigned i = 0; i < threads; i++) {
                set_thread(i);
                call(args);
            }
            continue;
        }
        emu_running = &b;
        for (unsigned i = 0; i < threads; i++) {
            b.done[i] = 0;
            emu_prepare(&b, i);
        }
        for (unsigned left = threads; left > 0;) {
            for (unsigned i = 0; i < threads; i++) {
                if (b.done[i]) continue;
                b.current = i;
                set_thread(i);
                emu_resume(&b, i);
                if (b.done[i]) left--;
            }
        }
        emu_running = nullptr;
    }
}

static inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

static inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; i++) {
        c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    }
    return c;
}

// mma.sync.m16n8k32.row.col.s32.u8.s8.s32 as the PTX ISA lays out its fragments, for lane
// (g = lane / 4, i = lane % 4) of a warp: A (16 × 32 unsigned bytes) register r holds row
// g + 8·(r & 1), columns 4i + 16·(r >> 1) .. +3; B (32 × 8 signed bytes) register r holds
// column g, rows 4i + 16r .. +3; C (16 × 8 int32) element e is row g + 8·(e >> 1), column
// 2i + (e & 1). Every lane posts its fragments, a barrier, every lane computes its C from its
// warp's, a barrier (so the next call's posts wait for this call's reads): the kernel's
// threads must all reach it the same number of times, as a real warp's must.
static thread_local unsigned emu_mma_a[32][32][4];
static thread_local unsigned emu_mma_b[32][32][2];
static inline void emu_mma_u8s8_m16n8k32(int* c, unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1) {
    unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    unsigned warp = tid / 32, lane = tid % 32;
    unsigned* a = emu_mma_a[warp][lane];
    a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3;
    emu_mma_b[warp][lane][0] = b0, emu_mma_b[warp][lane][1] = b1;
    __syncthreads();
    unsigned g = lane / 4, i = lane % 4;
    for (unsigned e = 0; e < 4; e++) {
        unsigned row = g + 8 * (e >> 1), col = 2 * i + (e & 1);
        int sum = 0;
        for (unsigned k = 0; k < 32; k++) {
            unsigned from_a = (row % 8) * 4 + (k % 16) / 4, reg_a = (row / 8) + 2 * (k / 16);
            unsigned from_b = col * 4 + (k % 16) / 4, reg_b = k / 16;
            unsigned char av = (unsigned char)(emu_mma_a[warp][from_a][reg_a] >> (8 * (k % 4)));
            signed char bv = (signed char)(emu_mma_b[warp][from_b][reg_b] >> (8 * (k % 4)));
            sum += (int)av * (int)bv;
        }
        c[e] += sum;
    }
    __syncthreads();
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
    bool fibers;  // uses __syncthreads: run its block's threads as fibers
};
