// The CUDA backend's kernels, compiled at run time by NVRTC (backend/cuda/device.rs) with
// `--fmad=false`, so that every float operation rounds as the CPU's Rust code rounds it.
//
// The unit tests run this very source on the CPU (backend/cuda/emu.rs compiles it with g++
// behind a small prelude, emu_prelude.h, that runs a block's threads as fibers switching at
// each __syncthreads()): so kernels use shared memory and barriers but no warp shuffles, and
// every barrier is reached by all threads of a block. The int8 mma (`mma_codes`) is the one
// warp operation; the prelude emulates it through barriers, so it too is reached by all.
//
// Only built-in types (no headers: NVRTC runs without the toolkit's include files).

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

// Element types of dense matrices (DenseType in dense.rs): f32, f16, bf16.
#define DENSE_F32 0
#define DENSE_F16 1
#define DENSE_BF16 2

// Exact f16 → f32 (subnormals, infinities and NaN included): one conversion instruction on
// the GPU, from the bits on the emulator (the same values; a NaN stays a NaN).
#ifdef __CUDACC_RTC__
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
#else
__device__ __forceinline__ float f16_to_f32(u16 h) {
    u32 sign = (u32)(h & 0x8000u) << 16;
    u32 exp = (h >> 10) & 0x1fu;
    u32 man = h & 0x3ffu;
    if (exp == 0x1fu) {
        return __uint_as_float(sign | 0x7f800000u | (man << 13));
    }
    if (exp != 0) {
        return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
    }
    // Zero or subnormal: man · 2^-24, exact in f32.
    float v = (float)man * 5.9604644775390625e-8f;
    return sign ? -v : v;
}
#endif

// f32 → f16 rounded to nearest even (overflow to infinity, subnormals kept), as the CPU's
// `half::f16::from_f32`: one conversion instruction on the GPU, from the bits on the
// emulator.
#ifdef __CUDACC_RTC__
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#else
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u32 x = __float_as_uint(f);
    u32 sign = (x >> 16) & 0x8000u;
    u32 ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {
        // Infinity, or NaN kept quiet with its top payload bits.
        return (u16)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u));
    }
    if (ax >= 0x477ff000u) {
        return (u16)(sign | 0x7c00u);  // 65520 and up round to infinity
    }
    if (ax >= 0x38800000u) {
        // Normal: drop 13 mantissa bits, ties to even; a carry moves into the exponent.
        return (u16)(sign | ((ax + 0xfffu + ((ax >> 13) & 1u) - 0x38000000u) >> 13));
    }
    if (ax < 0x33000000u) {
        return (u16)sign;  // below 2^-25 (and 2^-25 itself, a tie, to even): zero
    }
    // Subnormal: the value in units of 2^-24, ties to even.
    u32 e = ax >> 23;
    u32 m = (ax & 0x7fffffu) | 0x800000u;
    u32 shift = 126u - e;
    u32 q = m >> shift;
    u32 rem = m & ((1u << shift) - 1u);
    u32 halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (q & 1u))) {
        q++;
    }
    return (u16)(sign | q);
}
#endif

// KV cache elements: f32, or f16 (half the memory), widened exactly to f32 where read.
__device__ __forceinline__ float widen(float v) {
    return v;
}
__device__ __forceinline__ float widen(u16 v) {
    return f16_to_f32(v);
}
__device__ __forceinline__ void kv_put(float* dst, float v) {
    *dst = v;
}
__device__ __forceinline__ void kv_put(u16* dst, float v) {
    *dst = f32_to_f16(v);
}

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float((u32)h << 16);
}

// Dense matrices (weights.rs `chunk_major`) are stored in chunks of 8 columns, chunk-major:
// chunk c of row r (columns 8c..8c+7) at element (c·rows + r)·8, so that consecutive threads
// taking consecutive rows read one contiguous line; the last cols % 8 columns of every row
// follow as a row-major tail `[rows][cols % 8]`.
__device__ __forceinline__ i64 chunk_major_index(int rows, int cols, i64 r, int i) {
    int full = cols / 8 * 8;
    if (i < full) {
        return ((i64)(i / 8) * rows + r) * 8 + i % 8;
    }
    return (i64)full * rows + r * (cols - full) + (i - full);
}

// Element `i` of a dense matrix of type `ty`, as f32.
__device__ __forceinline__ float dense_at(const void* w, int ty, i64 i) {
    if (ty == DENSE_F16) {
        return f16_to_f32(((const u16*)w)[i]);
    }
    if (ty == DENSE_BF16) {
        return bf16_to_f32(((const u16*)w)[i]);
    }
    return ((const float*)w)[i];
}

// 16 bytes, loaded at once.
struct alignas(16) u32x4 {
    u32 x, y, z, w;
};

// The 8 elements of chunk `idx` (see chunk_major_index) as f32, in one or two 16-byte loads.
__device__ __forceinline__ void dense_chunk(const void* w, int ty, i64 idx, float* out) {
    if (ty == DENSE_F32) {
        const u32x4* p = (const u32x4*)w + idx * 2;
        u32x4 a = p[0];
        u32x4 b = p[1];
        out[0] = __uint_as_float(a.x);
        out[1] = __uint_as_float(a.y);
        out[2] = __uint_as_float(a.z);
        out[3] = __uint_as_float(a.w);
        out[4] = __uint_as_float(b.x);
        out[5] = __uint_as_float(b.y);
        out[6] = __uint_as_float(b.z);
        out[7] = __uint_as_float(b.w);
        return;
    }
    u32x4 a = ((const u32x4*)w)[idx];
    u32 words[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        u16 lo = (u16)(words[j] & 0xffffu);
        u16 hi = (u16)(words[j] >> 16);
        if (ty == DENSE_F16) {
            out[2 * j] = f16_to_f32(lo);
            out[2 * j + 1] = f16_to_f32(hi);
        } else {
            out[2 * j] = bf16_to_f32(lo);
            out[2 * j + 1] = bf16_to_f32(hi);
        }
    }
}

// hidden[t][i] = embedding[tokens[t]][i] (a chunk-major [vocab, d] matrix).
// Grid: (⌈d/block⌉, n).
extern "C" __global__ void embed_rows(float* hidden, const void* emb, int ty, const int* tokens,
                                      int vocab, int d) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    if (i < d) {
        hidden[(i64)t * d + i] = dense_at(emb, ty, chunk_major_index(vocab, d, tokens[t], i));
    }
}

// Activation of a gated feed-forward: 0 = relu(g)², 1 = silu(g) = g / (1 + exp(−g)).
__device__ __forceinline__ float gate_act(float g, float u, int act) {
    float a;
    if (act == 0) {
        float r = fmaxf(g, 0.0f);
        a = r * r;
    } else {
        a = g / (1.0f + expf(-g));
    }
    return a * u;
}

// Threads of a norm_quant block.
#define NQ_THREADS 256

// Element i of a norm_quant row's input: x, or act(x)·up for a gated feed-forward's output.
__device__ __forceinline__ float nq_input(const float* x, const float* up, int act, int i) {
    return up ? gate_act(x[i], up[i], act) : x[i];
}

// Reductions over a block of NQ_THREADS threads through `red` (NQ_THREADS slots) in two
// steps (32 partial results, then one): exact for a max and an integer sum, whatever the
// order. Every thread gets the result.
__device__ __forceinline__ float block_max(float* red, float v) {
    int tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    if (tid < 32) {
        float m = red[tid];
        for (int i = tid + 32; i < NQ_THREADS; i += 32) {
            m = fmaxf(m, red[i]);
        }
        red[tid] = m;
    }
    __syncthreads();
    float m = red[0];
    for (int i = 1; i < 32; i++) {
        m = fmaxf(m, red[i]);
    }
    __syncthreads();
    return m;
}

__device__ __forceinline__ int block_sum(int* red, int v) {
    int tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    if (tid < 32) {
        int s = red[tid];
        for (int i = tid + 32; i < NQ_THREADS; i += 32) {
            s += red[i];
        }
        red[tid] = s;
    }
    __syncthreads();
    int s = red[0];
    for (int i = 1; i < 32; i++) {
        s += red[i];
    }
    return s;
}

// One row per block: optionally RMSNorm (weight `w`, with the CPU's order of additions:
// backend/cpu/forward.rs `sum_of_squares`, element i to partial sum i % 16, each in column
// order, then the 16 added in order, so the same bits), optionally writing the float result
// to `normed`, then optionally the per-token absmax int8 quantization of transformers' BitNet
// (and kernels/quant.rs): s = 127 / max(max|v|, 1e-5), q = clamp(round_half_even(v·s), -128,
// 127), NaN → 0, rows zero-padded to `padded` columns; also s and Σq per row. With `bits`
// 12, the 12-bit quantization of the quantized lm_heads instead (kernels/q6k.rs
// `Int12Activations`): s = 2047 / max(max|v|, 1e-30), q = round_half_even(clamp(v·s, ±2047))
// as i16. A max and an integer sum are exact in any order, so the block reduces them as a
// tree.
// The input is `x`, or act(x)·up when `up` is given (gate_act, as the CPU computes it).
// Grid: (n), block NQ_THREADS.
// Columns of a row that norm_quant keeps in shared memory (the rest it reads again).
#define NQ_CACHE 8192

extern "C" __global__ void norm_quant(void* q, float* scales, int* sums, float* normed,
                                      const float* x, const float* up, int act, const float* w,
                                      float eps, int cols, int padded, int bits) {
    __shared__ float row[NQ_CACHE];
    __shared__ float part[16];
    __shared__ float red_f[NQ_THREADS];
    __shared__ int red_i[NQ_THREADS];
    int r = blockIdx.x;
    int tid = threadIdx.x;
    const float* xr = x + (i64)r * cols;
    const float* ur = up ? up + (i64)r * cols : (const float*)0;
    // The input row, loaded (and gated) once by all threads: the 16 sums of squares below
    // are sequential, and read it from shared memory.
    int cached = cols < NQ_CACHE ? cols : NQ_CACHE;
    for (int i = tid; i < cached; i += NQ_THREADS) {
        row[i] = nq_input(xr, ur, act, i);
    }
    __syncthreads();
    float inv = 1.0f;
    if (w) {
        if (tid < 16) {
            float acc = 0.0f;
            int i = tid;
#pragma unroll 8
            for (; i < cached; i += 16) {
                float v = row[i];
                acc += v * v;
            }
            for (; i < cols; i += 16) {
                float v = nq_input(xr, ur, act, i);
                acc += v * v;
            }
            part[tid] = acc;
        }
        __syncthreads();
        float sum = part[0];
        for (int j = 1; j < 16; j++) {
            sum += part[j];
        }
        float mean = sum / (float)cols;
        inv = 1.0f / sqrtf(mean + eps);
    }
    // Normalized in place (each thread its own columns, which it reads again below).
    float m = 0.0f;
    for (int i = tid; i < cols; i += NQ_THREADS) {
        float v = i < cached ? row[i] : nq_input(xr, ur, act, i);
        if (w) {
            v = w[i] * (v * inv);
        }
        if (i < cached) {
            row[i] = v;
        }
        if (normed) {
            normed[(i64)r * cols + i] = v;
        }
        m = fmaxf(m, fabsf(v));
    }
    if (!q) {
        return;
    }
    float max = block_max(red_f, m);
    float limit = bits == 12 ? 2047.0f : 127.0f;
    float scale = bits == 12 ? 2047.0f / fmaxf(max, 1e-30f) : 127.0f / fmaxf(max, 1e-5f);
    int qsum = 0;
    for (int i = tid; i < padded; i += NQ_THREADS) {
        int k = 0;
        if (i < cols) {
            float v;
            if (i < cached) {
                v = row[i];
            } else {
                v = nq_input(xr, ur, act, i);
                if (w) {
                    v = w[i] * (v * inv);
                }
            }
            v = v * scale;
            if (v == v) {
                v = fminf(fmaxf(v, bits == 12 ? -limit : -128.0f), limit);
                k = (int)rintf(v);
            }
        }
        if (bits == 12) {
            ((short*)q)[(i64)r * padded + i] = (short)k;
        } else {
            ((i8*)q)[(i64)r * padded + i] = (i8)k;
        }
        qsum += k;
    }
    int total = block_sum(red_i, qsum);
    if (tid == 0) {
        scales[r] = scale;
        sums[r] = total;
    }
}

// The int8 lm_head (kernels/int8.rs `int8_matmul_int12`): out[t][r] = (Σ_k w[r][k]·a[t][k])
// / (s_w[r]·s_a[t]), the sum exact (i64), w the int8 rows in chunk-major order (8 columns
// a chunk, consecutive rows adjacent: weights.rs `chunk_major`), a the 12-bit activations
// from norm_quant. One thread per row and LG_TOKENS tokens. Grid: (⌈rows/block⌉,
// ⌈n/LG_TOKENS⌉).
#define LG_TOKENS 4
extern "C" __global__ void int8_logits(float* out, const i8* w, const float* w_scales,
                                       const short* a, const float* a_scales, int rows,
                                       int padded, int n) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    int t0 = blockIdx.y * LG_TOKENS;
    if (r >= rows) {
        return;
    }
    int nt = n - t0 < LG_TOKENS ? n - t0 : LG_TOKENS;
    i64 acc[LG_TOKENS];
#pragma unroll
    for (int t = 0; t < LG_TOKENS; t++) {
        acc[t] = 0;
    }
    for (int c = 0; c < padded / 8; c++) {
        // 8 weights in one load.
        unsigned long long wv = *(const unsigned long long*)(w + ((i64)c * rows + r) * 8);
#pragma unroll
        for (int t = 0; t < LG_TOKENS; t++) {
            if (t < nt) {
                const short* at = a + (i64)(t0 + t) * padded + c * 8;
                int part = 0;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    part += (int)(i8)(wv >> (8 * i)) * (int)at[i];
                }
                acc[t] += part;
            }
        }
    }
    for (int t = 0; t < nt; t++) {
        out[(i64)(t0 + t) * rows + r] = (float)acc[t] / (w_scales[r] * a_scales[t0 + t]);
    }
}

// The 4-bit lm_head (kernels/q4.rs): per 32-column group g an f16 scale d_g and codes
// u = q + 8; out[t][r] = (Σ lanes) / s_a[t], where lane k (of 16) accumulates
// fma(d_g, Σ_j q_j·a_j, lane) for the groups g = 16·sb + k of superblocks sb in order, and
// the lanes are added as halves, quarters, ... (the CPU's fixed order: the same bits).
// Codes per (group, row) chunk-major: 16 bytes at (g·rows + r)·16, column 32g + 2i in the
// low nibble of byte i, 32g + 2i + 1 in the high one; scales at g·rows + r. Grid as
// int8_logits.
__device__ __forceinline__ float reduce16(float* v) {
#pragma unroll
    for (int n = 8; n >= 1; n /= 2) {
#pragma unroll
        for (int i = 0; i < n; i++) {
            v[i] += v[i + n];
        }
    }
    return v[0];
}

extern "C" __global__ void q4_logits(float* out, const u32x4* codes, const u16* scales,
                                     const short* a, const float* a_scales, int rows,
                                     int padded, int n) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    int t0 = blockIdx.y * LG_TOKENS;
    if (r >= rows) {
        return;
    }
    int nt = n - t0 < LG_TOKENS ? n - t0 : LG_TOKENS;
    float lanes[LG_TOKENS][16];
#pragma unroll
    for (int t = 0; t < LG_TOKENS; t++)
#pragma unroll
        for (int k = 0; k < 16; k++) lanes[t][k] = 0.0f;
    int groups = padded / 32;
    for (int g0 = 0; g0 < groups; g0 += 16) {
#pragma unroll
        for (int k = 0; k < 16; k++) {
            int g = g0 + k;
            u32x4 c = codes[(i64)g * rows + r];
            float d = f16_to_f32(scales[(i64)g * rows + r]);
            u32 words[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
            for (int t = 0; t < LG_TOKENS; t++) {
                if (t < nt) {
                    const short* at = a + (i64)(t0 + t) * padded + g * 32;
                    int sum = 0;
#pragma unroll
                    for (int b = 0; b < 16; b++) {
                        u32 byte = (words[b / 4] >> (8 * (b % 4))) & 0xffu;
                        sum += ((int)(byte & 15u) - 8) * (int)at[2 * b] +
                               ((int)(byte >> 4) - 8) * (int)at[2 * b + 1];
                    }
                    lanes[t][k] = fmaf(d, (float)sum, lanes[t][k]);
                }
            }
        }
    }
    for (int t = 0; t < nt; t++) {
        out[(i64)(t0 + t) * rows + r] = reduce16(lanes[t]) / a_scales[t0 + t];
    }
}

// The Q6_K lm_head (kernels/q6k.rs): ggml's 210-byte blocks of 256 weights (ql[128],
// qh[64], 16 int8 sub-block scales, f16 d), block b of row r at (b·rows + r)·210;
// out[t][r] = (Σ_b d_b·dot_b, added block after block) / s_a[t], dot_b = Σ_j sc_j·Σ
// (code − 32)·a over sub-block j (exact integers; the CPU's i32). Grid as int8_logits.
extern "C" __global__ void q6k_logits(float* out, const u8* blocks, const short* a,
                                      const float* a_scales, int rows, int padded, int n) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    int t0 = blockIdx.y * LG_TOKENS;
    if (r >= rows) {
        return;
    }
    int nt = n - t0 < LG_TOKENS ? n - t0 : LG_TOKENS;
    float acc[LG_TOKENS];
#pragma unroll
    for (int t = 0; t < LG_TOKENS; t++) acc[t] = 0.0f;
    for (int b = 0; b < padded / 256; b++) {
        const u8* blk = blocks + ((i64)b * rows + r) * 210;
        float d = f16_to_f32((u16)(blk[208] | (blk[209] << 8)));
        int dot[LG_TOKENS];
#pragma unroll
        for (int t = 0; t < LG_TOKENS; t++) dot[t] = 0;
        for (int j = 0; j < 16; j++) {
            int sub[LG_TOKENS];
#pragma unroll
            for (int t = 0; t < LG_TOKENS; t++) sub[t] = 0;
            for (int i = 0; i < 16; i++) {
                int e = j * 16 + i;
                int h = e / 128, k = (e % 128) / 32, l = e % 32;
                int low = (blk[64 * h + l + 32 * (k & 1)] >> (k >= 2 ? 4 : 0)) & 15;
                int code = low | (((blk[128 + 32 * h + l] >> (2 * k)) & 3) << 4);
#pragma unroll
                for (int t = 0; t < LG_TOKENS; t++) {
                    if (t < nt) {
                        sub[t] += (code - 32) * (int)a[(i64)(t0 + t) * padded + b * 256 + e];
                    }
                }
            }
            int sc = (int)(i8)blk[192 + j];
#pragma unroll
            for (int t = 0; t < LG_TOKENS; t++) dot[t] += sc * sub[t];
        }
#pragma unroll
        for (int t = 0; t < LG_TOKENS; t++) acc[t] = acc[t] + d * (float)dot[t];
    }
    for (int t = 0; t < nt; t++) {
        out[(i64)(t0 + t) * rows + r] = acc[t] / a_scales[t0 + t];
    }
}

// Ternary products, out[t][r] = (Σ_k trit[r][k]·q[t][k]) / s_t · multiplier[r], exactly as
// the CPU (the integer sum is exact in any order).
//
// Weights (weights.rs `pack_ternary`): 16-byte group `k4 · rows + r` holds the codes
// (trit + 1) of row r, columns 64k4..64k4+63, as four words of 16 columns; in word j, column
// 16j + 4i + b sits in bits 8b+2i..8b+2i+1, so `(word >> 2i) & 0x03030303` is the four codes of
// columns 16j+4i..+3 as bytes, against the four int8 activations of one 32-bit word: one
// dp4a. Σ trit·q = Σ code·q − Σ q.
//
// A block of TG_WARPS warps takes TG_ROWS = 32 consecutive rows (a lane each, so a warp's
// weight loads are one contiguous 512-byte line) and TG_TOKENS tokens; its warps split K,
// then add their integer sums through shared memory. The rows may be several linears'
// (segments: rows [0, rows0) → out0, [rows0, rows0 + rows1) → out1, the rest → out2, each
// `[n][its rows]`), which share one input; with `accumulate`, out += the product (the
// residual stream: the same bits as adding afterwards). Grid: (⌈rows/32⌉, ⌈n/TG_TOKENS⌉),
// block 32·TG_WARPS.
#define TG_ROWS 32
#define TG_WARPS 8
#define TG_TOKENS 8
#define TG_UNROLL 4

__device__ __forceinline__ int dot_codes(u32 word, const int* a, int acc) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        acc = __dp4a((int)((word >> (2 * i)) & 0x03030303u), a[i], acc);
    }
    return acc;
}

// The epilogue of every ternary product: Σ code·q of (row, tok) to its float, stored in
// (or added to) the row's segment (see above). One function, so that every kernel gives the
// same bits.
// Stores (or adds) v as output (row, tok) of the row's segment (see above).
__device__ __forceinline__ void store_segment(float* out0, float* out1, float* out2, int rows0,
                                              int rows1, int rows, int accumulate, int row,
                                              int tok, float v) {
    float* o;
    if (row < rows0) {
        o = out0 + (i64)tok * rows0 + row;
    } else if (row < rows0 + rows1) {
        o = out1 + (i64)tok * rows1 + (row - rows0);
    } else {
        int rows2 = rows - rows0 - rows1;
        o = out2 + (i64)tok * rows2 + (row - rows0 - rows1);
    }
    *o = accumulate ? *o + v : v;
}

__device__ __forceinline__ void store_product(float* out0, float* out1, float* out2, int rows0,
                                              int rows1, int rows, int accumulate, int row,
                                              int tok, int dot, const float* mult,
                                              const float* scales, const int* sums) {
    float v = (float)(dot - sums[tok]) / scales[tok] * mult[row];
    store_segment(out0, out1, out2, rows0, rows1, rows, accumulate, row, tok, v);
}

extern "C" __global__ void ternary_gemv(float* out0, float* out1, float* out2, int rows0,
                                        int rows1, int accumulate, const u32x4* w,
                                        const float* mult, const i8* q, const float* scales,
                                        const int* sums, int rows, int k4s, int padded, int n) {
    __shared__ int part[TG_WARPS][TG_TOKENS][TG_ROWS];
    int lane = threadIdx.x % TG_ROWS;
    int warp = threadIdx.x / TG_ROWS;
    int r = blockIdx.x * TG_ROWS + lane;
    int t0 = blockIdx.y * TG_TOKENS;
    int nt = n - t0 < TG_TOKENS ? n - t0 : TG_TOKENS;
    int acc[TG_TOKENS];
#pragma unroll
    for (int t = 0; t < TG_TOKENS; t++) {
        acc[t] = 0;
    }
    if (r < rows) {
        const i8* qt = q + (i64)t0 * padded;
        // TG_UNROLL weight loads in flight before their products: decode is a stream of
        // weights, and one load at a time per thread leaves most of the bandwidth unused.
        for (int k0 = warp; k0 < k4s; k0 += TG_WARPS * TG_UNROLL) {
            u32x4 wv[TG_UNROLL];
#pragma unroll
            for (int u = 0; u < TG_UNROLL; u++) {
                int k4 = k0 + u * TG_WARPS;
                if (k4 < k4s) {
                    wv[u] = w[(i64)k4 * rows + r];
                }
            }
#pragma unroll
            for (int u = 0; u < TG_UNROLL; u++) {
                int k4 = k0 + u * TG_WARPS;
                if (k4 >= k4s) {
                    break;
                }
#pragma unroll
                for (int t = 0; t < TG_TOKENS; t++) {
                    if (t < nt) {
                        const u32x4* a4 =
                            (const u32x4*)(qt + (i64)t * padded + (i64)k4 * 64);
                        u32x4 a0 = a4[0], a1 = a4[1], a2 = a4[2], a3 = a4[3];
                        int a[16] = {(int)a0.x, (int)a0.y, (int)a0.z, (int)a0.w,
                                     (int)a1.x, (int)a1.y, (int)a1.z, (int)a1.w,
                                     (int)a2.x, (int)a2.y, (int)a2.z, (int)a2.w,
                                     (int)a3.x, (int)a3.y, (int)a3.z, (int)a3.w};
                        int s = acc[t];
                        s = dot_codes(wv[u].x, a, s);
                        s = dot_codes(wv[u].y, a + 4, s);
                        s = dot_codes(wv[u].z, a + 8, s);
                        s = dot_codes(wv[u].w, a + 12, s);
                        acc[t] = s;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TG_TOKENS; t++) {
        part[warp][t][lane] = acc[t];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < TG_TOKENS * TG_ROWS; idx += TG_WARPS * TG_ROWS) {
        int t = idx / TG_ROWS;
        int l = idx % TG_ROWS;
        int row = blockIdx.x * TG_ROWS + l;
        if (t >= nt || row >= rows) {
            continue;
        }
        int dot = 0;
        for (int k = 0; k < TG_WARPS; k++) {
            dot += part[k][t][l];
        }
        store_product(out0, out1, out2, rows0, rows1, rows, accumulate, row, t0 + t,
                      dot, mult, scales, sums);
    }
}

// Ternary products with group-wise scales (kernels/group.rs, Q2_0): one f32 scale per group
// of 64 or 128 columns (`gk` = 1 or 2 packed 64-column steps), scale of group g of row r at
// gscales[g·rows + r]. The CPU's fixed order (kernels/group): group g's product (Σ code·q −
// Σ q)_g · scale_g (a multiply, then an add) goes, in increasing g, to partial P_f, f = (index
// of its first 64-column subgroup) mod 16 (g mod 16 at 64, 2g mod 16 at 128); then q_k = P_k
// + P_{k+8} and out[t][r] = (((q0+q4)+(q2+q6))+((q1+q5)+(q3+q7))) / s_t. Warp j takes the
// groups g ≡ j (mod 8): at 64 those of P_j (even g / 8) and P_{j+8} (odd), kept apart and
// added as q_j; at 128 those of P_{2j mod 16}, and the fold of the warps' sums is the CPU's
// (the odd q are 0). So the bits are the CPU's. Same grid, block and output segments as
// ternary_gemv.
extern "C" __global__ void ternary_gemv_grouped(float* out0, float* out1, float* out2,
                                                int rows0, int rows1, int accumulate,
                                                const u32x4* w, const float* gscales,
                                                const i8* q, const float* scales, int rows,
                                                int k4s, int padded, int n, int gk) {
    __shared__ float part[TG_WARPS][TG_TOKENS][TG_ROWS];
    int lane = threadIdx.x % TG_ROWS;
    int warp = threadIdx.x / TG_ROWS;
    int r = blockIdx.x * TG_ROWS + lane;
    int t0 = blockIdx.y * TG_TOKENS;
    int nt = n - t0 < TG_TOKENS ? n - t0 : TG_TOKENS;
    // pa: groups with g / TG_WARPS even (all of them at 128), pb: odd.
    float pa[TG_TOKENS], pb[TG_TOKENS];
#pragma unroll
    for (int t = 0; t < TG_TOKENS; t++) {
        pa[t] = 0.0f;
        pb[t] = 0.0f;
    }
    if (r < rows) {
        const i8* qt = q + (i64)t0 * padded;
        int groups = k4s / gk;
        for (int g = warp; g < groups; g += TG_WARPS) {
            float sc = gscales[(i64)g * rows + r];
            int dot[TG_TOKENS];
#pragma unroll
            for (int t = 0; t < TG_TOKENS; t++) {
                dot[t] = 0;
            }
            for (int j = 0; j < gk; j++) {
                int k4 = g * gk + j;
                u32x4 wv = w[(i64)k4 * rows + r];
#pragma unroll
                for (int t = 0; t < TG_TOKENS; t++) {
                    if (t < nt) {
                        const u32x4* a4 =
                            (const u32x4*)(qt + (i64)t * padded + (i64)k4 * 64);
                        u32x4 a0 = a4[0], a1 = a4[1], a2 = a4[2], a3 = a4[3];
                        int a[16] = {(int)a0.x, (int)a0.y, (int)a0.z, (int)a0.w,
                                     (int)a1.x, (int)a1.y, (int)a1.z, (int)a1.w,
                                     (int)a2.x, (int)a2.y, (int)a2.z, (int)a2.w,
                                     (int)a3.x, (int)a3.y, (int)a3.z, (int)a3.w};
                        int s = dot[t];
                        s = dot_codes(wv.x, a, s);
                        s = dot_codes(wv.y, a + 4, s);
                        s = dot_codes(wv.z, a + 8, s);
                        s = dot_codes(wv.w, a + 12, s);
                        // − Σ q of these 64 columns: the codes are trit + 1.
#pragma unroll
                        for (int i = 0; i < 16; i++) {
                            s = __dp4a(a[i], (int)0xffffffffu, s);
                        }
                        dot[t] = s;
                    }
                }
            }
            bool odd = gk == 1 && (g / TG_WARPS) % 2 == 1;
#pragma unroll
            for (int t = 0; t < TG_TOKENS; t++) {
                float v = (float)dot[t] * sc;
                if (odd) {
                    pb[t] = pb[t] + v;
                } else {
                    pa[t] = pa[t] + v;
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TG_TOKENS; t++) {
        // q_j (pb is +0 at 128, which changes no sum: pa is never −0).
        part[warp][t][lane] = pa[t] + pb[t];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < TG_TOKENS * TG_ROWS; idx += TG_WARPS * TG_ROWS) {
        int t = idx / TG_ROWS;
        int l = idx % TG_ROWS;
        int row = blockIdx.x * TG_ROWS + l;
        if (t >= nt || row >= rows) {
            continue;
        }
        float s0 = part[0][t][l] + part[4][t][l], s1 = part[1][t][l] + part[5][t][l];
        float s2 = part[2][t][l] + part[6][t][l], s3 = part[3][t][l] + part[7][t][l];
        float v = ((s0 + s2) + (s1 + s3)) / scales[t0 + t];
        store_segment(out0, out1, out2, rows0, rows1, rows, accumulate, row, t0 + t, v);
    }
}

// The same products on the int8 tensor cores, for many tokens at once (prefill, large
// batches): `mma.sync` m16n8k32 multiplies 16 rows' unsigned codes by 8 tokens' int8
// activations into exact int32 sums (sm_80 and newer; the emulator computes the same
// integers from the same fragments). A block of TM_WARPS warps takes TM_ROWS rows × TM_TOKENS
// tokens, each warp 32 rows × 32 tokens (2 × 4 mma tiles), and walks K 64 columns at a
// time: a 64-row weight tile is one contiguous kilobyte of the packed layout, staged in
// shared memory with the tokens' 64 bytes each while the next step's loads are in flight.
// The fragments come straight from the packed words: thread (g = lane / 4, i = lane % 4)
// needs columns 4i..4i+3 and 16+4i..16+4i+3 of a 32-column slice, which are
// `(word >> 2i) & 0x03030303` of the slice's two words. Same epilogue as ternary_gemv: the
// same bits. Grid: (⌈rows/TM_ROWS⌉, ⌈n/TM_TOKENS⌉), block 32·TM_WARPS.
#define TM_ROWS 64
#define TM_TOKENS 64
#define TM_WARPS 4
// Words a staged token row takes: its 16, plus 4 so that the 8 tokens of a fragment load
// fall in different shared-memory banks.
#define TM_XSTRIDE 20

#ifdef __CUDACC_RTC__
// c += A·B for A: 16 × 32 unsigned bytes (a0..a3), B: 32 × 8 signed bytes (b0, b1), in the
// PTX ISA's m16n8k32 fragment layout.
__device__ __forceinline__ void mma_codes(int* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                          u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    // Older GPUs have no int8 mma; the host never launches ternary_gemm there.
    __trap();
#endif
}
#else
#define mma_codes emu_mma_u8s8_m16n8k32
#endif

extern "C" __global__ void ternary_gemm(float* out0, float* out1, float* out2, int rows0,
                                        int rows1, int accumulate, const u32x4* w,
                                        const float* mult, const i8* q, const float* scales,
                                        const int* sums, int rows, int k4s, int padded, int n) {
    __shared__ u32x4 wtile[TM_ROWS];
    __shared__ u32x4 xtile[TM_TOKENS * TM_XSTRIDE / 4];
    int tid = threadIdx.x;
    int warp = tid / 32, lane = tid % 32;
    int g = lane / 4, i4 = lane % 4;
    int wrow = (warp / 2) * 32, wtok = (warp % 2) * 32;
    int r0 = blockIdx.x * TM_ROWS, t0 = blockIdx.y * TM_TOKENS;
    int acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[i][j][c] = 0;
    // What this thread loads each step: weight row `tid` (the first TM_ROWS threads) and
    // two 16-byte quarters of token rows (quarter p % 4 of token p / 4, p = tid, tid + 128).
    const u32x4 zero = {0u, 0u, 0u, 0u};
    u32x4 wnext = zero, xnext[2] = {zero, zero};
    int wr = r0 + tid;
    bool wload = tid < TM_ROWS && wr < rows;
    int xtok[2], xquarter[2];
    bool xload[2];
#pragma unroll
    for (int u = 0; u < 2; u++) {
        int p = tid + u * 32 * TM_WARPS;
        xtok[u] = p / 4;
        xquarter[u] = p % 4;
        xload[u] = t0 + xtok[u] < n;
    }
    if (k4s > 0) {
        if (wload) wnext = w[wr];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            if (xload[u]) {
                xnext[u] = ((const u32x4*)(q + (i64)(t0 + xtok[u]) * padded))[xquarter[u]];
            }
        }
    }
    for (int k4 = 0; k4 < k4s; k4++) {
        if (tid < TM_ROWS) wtile[tid] = wnext;
#pragma unroll
        for (int u = 0; u < 2; u++) {
            xtile[xtok[u] * (TM_XSTRIDE / 4) + xquarter[u]] = xnext[u];
        }
        __syncthreads();
        // The next step's loads, in flight during this step's products.
        if (k4 + 1 < k4s) {
            if (wload) wnext = w[(i64)(k4 + 1) * rows + wr];
#pragma unroll
            for (int u = 0; u < 2; u++) {
                if (xload[u]) {
                    xnext[u] = ((const u32x4*)(q + (i64)(t0 + xtok[u]) * padded +
                                                (i64)(k4 + 1) * 64))[xquarter[u]];
                }
            }
        }
        const u32* xs = (const u32*)xtile;
#pragma unroll
        for (int s = 0; s < 2; s++) {
            u32 a[2][4];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                u32x4 lo = wtile[wrow + i * 16 + g];
                u32x4 hi = wtile[wrow + i * 16 + g + 8];
                u32 shift = 2 * i4;
                a[i][0] = ((s == 0 ? lo.x : lo.z) >> shift) & 0x03030303u;
                a[i][1] = ((s == 0 ? hi.x : hi.z) >> shift) & 0x03030303u;
                a[i][2] = ((s == 0 ? lo.y : lo.w) >> shift) & 0x03030303u;
                a[i][3] = ((s == 0 ? hi.y : hi.w) >> shift) & 0x03030303u;
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const u32* xr = xs + (wtok + j * 8 + g) * TM_XSTRIDE + s * 8 + i4;
                u32 b0 = xr[0], b1 = xr[4];
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    mma_codes(acc[i][j], a[i][0], a[i][1], a[i][2], a[i][3], b0, b1);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                int row = r0 + wrow + i * 16 + g + (c >= 2 ? 8 : 0);
                int tok = t0 + wtok + j * 8 + 2 * i4 + (c & 1);
                if (row < rows && tok < n) {
                    store_product(out0, out1, out2, rows0, rows1, rows, accumulate, row, tok,
                                  acc[i][j][c], mult, scales, sums);
                }
            }
}

// out[t][r] = Σ_k W[r][k]·x[t][k] in f32 with the CPU's portable order (kernels/dense.rs
// `dot_converted`: eight interleaved accumulators, element k to accumulator k % 8, added in
// order, then the tail's own sum; no FMA: the same bits), W a chunk-major dense matrix of
// type `ty`. One thread per row and DG_TOKENS tokens: consecutive threads read consecutive
// 16-byte chunks. With `accumulate`, out += the product. Grid: (⌈rows/block⌉, ⌈n/DG_TOKENS⌉).
#define DG_TOKENS 4
#define DG_UNROLL 4
extern "C" __global__ void dense_gemv(float* out, const void* w, int ty, const float* x,
                                      int rows, int cols, int n, int accumulate) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    int t0 = blockIdx.y * DG_TOKENS;
    if (r >= rows) {
        return;
    }
    int nt = n - t0 < DG_TOKENS ? n - t0 : DG_TOKENS;
    int chunks = cols / 8;
    float acc[DG_TOKENS][8];
#pragma unroll
    for (int t = 0; t < DG_TOKENS; t++) {
#pragma unroll
        for (int i = 0; i < 8; i++) {
            acc[t][i] = 0.0f;
        }
    }
    const float* xt0 = x + (i64)t0 * cols;
    // DG_UNROLL chunks' loads in flight before their products (see ternary_gemv).
    for (int c0 = 0; c0 < chunks; c0 += DG_UNROLL) {
        float wv[DG_UNROLL][8];
#pragma unroll
        for (int u = 0; u < DG_UNROLL; u++) {
            if (c0 + u < chunks) {
                dense_chunk(w, ty, (i64)(c0 + u) * rows + r, wv[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < DG_UNROLL; u++) {
            int c = c0 + u;
            if (c >= chunks) {
                break;
            }
#pragma unroll
            for (int t = 0; t < DG_TOKENS; t++) {
                if (t < nt) {
                    const float* xc = xt0 + (i64)t * cols + c * 8;
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        acc[t][i] += wv[u][i] * xc[i];
                    }
                }
            }
        }
    }
    int full = chunks * 8;
    int tail_n = cols - full;
    for (int t = 0; t < nt; t++) {
        const float* xr = xt0 + (i64)t * cols;
        float tail = 0.0f;
        for (int k = 0; k < tail_n; k++) {
            tail += dense_at(w, ty, (i64)full * rows + (i64)r * tail_n + k) * xr[full + k];
        }
        float sum = acc[t][0];
#pragma unroll
        for (int i = 1; i < 8; i++) {
            sum += acc[t][i];
        }
        float v = sum + tail;
        float* o = out + (i64)(t0 + t) * rows + r;
        *o = accumulate ? *o + v : v;
    }
}

// llama.cpp's way for Q4_0/Q4_1/Q8_0 linears (`--quant-acts q8`, kernels/qblock.rs): each
// token's activations quantized per 32-block (d = max|x|/127 rounded to f16, q =
// round_half_even(x·127/max|x|) clamped to ±127, NaN → 0) with the block's constant term c
// (Q4_0: (−8·Σq)·d; Q4_1: f16(Σq·d), ggml's Q8_1 s; Q8_0: 0). One thread per (token, block).
// Grid: (⌈n·cols/32 / block⌉).
#define Q8_Q4_0 0
#define Q8_Q4_1 1
#define Q8_Q8_0 2
extern "C" __global__ void q8_quant(i8* qs, float* d_out, float* c_out, const float* x, int n,
                                    int cols, int ty) {
    int nb = cols / 32;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * nb) {
        return;
    }
    const float* xb = x + (i64)i * 32;
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) {
        amax = fmaxf(amax, fabsf(xb[j]));
    }
    float d = amax / 127.0f;
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    for (int j = 0; j < 32; j++) {
        float v = rintf(xb[j] * id);
        int q = 0;
        if (v == v) {
            q = (int)fminf(fmaxf(v, -127.0f), 127.0f);
        }
        qs[(i64)i * 32 + j] = (i8)q;
        sum += q;
    }
    float d16 = f16_to_f32(f32_to_f16(d));
    d_out[i] = d16;
    c_out[i] = ty == Q8_Q4_0   ? (float)(-8 * sum) * d16
               : ty == Q8_Q4_1 ? f16_to_f32(f32_to_f16((float)sum * d))
                               : 0.0f;
}

// out[t][r] (+)= the q8 product of a row of ggml blocks (block b of row r at
// (b·rows + r)·block_bytes) and token t, in the CPU's order (qblock.rs `row_dot_scalar`): 16
// float lanes, lane 8·(b % 2) + j adding (Σ of weights 4j..4j+3 times the activations) ·
// (d_w·d_a); the constant terms c_w·c_a added in block order; the lanes added as a tree, then
// the constant sum. Weights: Q4 codes u (0..15), Q8_0 values. One thread per row and
// LG_TOKENS tokens. Grid: (⌈rows/block⌉, ⌈n/LG_TOKENS⌉).
extern "C" __global__ void q8_linear(float* out, const u8* blocks, int ty, const i8* qs,
                                     const float* d_a, const float* c_a, int rows, int cols,
                                     int n, int accumulate) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    int t0 = blockIdx.y * LG_TOKENS;
    if (r >= rows) {
        return;
    }
    int nt = n - t0 < LG_TOKENS ? n - t0 : LG_TOKENS;
    int bb = ty == Q8_Q4_0 ? 18 : ty == Q8_Q4_1 ? 20 : 34;
    int nb = cols / 32;
    float lanes[LG_TOKENS][16];
    float konst[LG_TOKENS];
#pragma unroll
    for (int t = 0; t < LG_TOKENS; t++) {
        konst[t] = 0.0f;
#pragma unroll
        for (int l = 0; l < 16; l++) lanes[t][l] = 0.0f;
    }
    for (int b = 0; b < nb; b++) {
        const u8* blk = blocks + ((i64)b * rows + r) * bb;
        int w[32];
        if (ty == Q8_Q8_0) {
            for (int j = 0; j < 32; j++) w[j] = (int)(i8)blk[2 + j];
        } else {
            const u8* q = blk + bb - 16;
            for (int j = 0; j < 16; j++) {
                w[j] = q[j] & 15;
                w[j + 16] = q[j] >> 4;
            }
        }
        float dw = f16_to_f32((u16)(blk[0] | (blk[1] << 8)));
        float cw = ty == Q8_Q4_0 ? dw : ty == Q8_Q4_1 ? f16_to_f32((u16)(blk[2] | (blk[3] << 8))) : 0.0f;
#pragma unroll
        for (int t = 0; t < LG_TOKENS; t++) {
            if (t < nt) {
                i64 at = (i64)(t0 + t) * nb + b;
                const i8* a = qs + at * 32;
                float sc = dw * d_a[at];
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    int s = 0;
                    for (int i = 4 * j; i < 4 * j + 4; i++) {
                        s += w[i] * (int)a[i];
                    }
                    int l = 8 * (b % 2) + j;
                    lanes[t][l] = lanes[t][l] + (float)s * sc;
                }
                konst[t] = konst[t] + cw * c_a[at];
            }
        }
    }
    for (int t = 0; t < nt; t++) {
        float* v = lanes[t];
        float s8[8], s4[4];
        for (int l = 0; l < 8; l++) s8[l] = v[l] + v[l + 8];
        for (int l = 0; l < 4; l++) s4[l] = s8[l] + s8[l + 4];
        float total = ((s4[0] + s4[2]) + (s4[1] + s4[3])) + konst[t];
        float* o = out + (i64)(t0 + t) * rows + r;
        *o = accumulate ? *o + total : total;
    }
}

// dense_gemv's products for many tokens at once (prefill of float models, large batches'
// lm_head): a block of 256 threads takes DM_ROWS rows × DM_TOKENS tokens, each thread 2 rows
// × 4 tokens with the same 8 accumulators per output, K walked DM_CHUNKS chunks of 8 at a
// time through shared memory (weights widened to f32 once per block, not once per 4
// tokens). Every output adds its products in dense_gemv's order: the same bits. Grid:
// (⌈rows/DM_ROWS⌉, ⌈n/DM_TOKENS⌉), block 256.
#define DM_ROWS 64
#define DM_TOKENS 32
#define DM_CHUNKS 4
extern "C" __global__ void dense_gemm(float* out, const void* w, int ty, const float* x,
                                      int rows, int cols, int n, int accumulate) {
    // +1: a warp's 32 rows fall in 32 different banks.
    __shared__ float ws[DM_CHUNKS][DM_ROWS][9];
    __shared__ float xs[DM_TOKENS][DM_CHUNKS * 8];
    int tid = threadIdx.x;
    int r0 = blockIdx.x * DM_ROWS, t0 = blockIdx.y * DM_TOKENS;
    int rr = tid % 32, tq = (tid / 32) * 4;
    float acc[2][4][8];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int i = 0; i < 8; i++) acc[a][j][i] = 0.0f;
    int chunks = cols / 8;
    for (int c0 = 0; c0 < chunks; c0 += DM_CHUNKS) {
        {
            int c = c0 + tid / DM_ROWS, r = r0 + tid % DM_ROWS;
            float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            if (c < chunks && r < rows) {
                dense_chunk(w, ty, (i64)c * rows + r, v);
            }
#pragma unroll
            for (int i = 0; i < 8; i++) {
                ws[tid / DM_ROWS][tid % DM_ROWS][i] = v[i];
            }
        }
        for (int e = tid; e < DM_TOKENS * DM_CHUNKS * 8; e += 256) {
            int t = e / (DM_CHUNKS * 8), k = e % (DM_CHUNKS * 8);
            int col = c0 * 8 + k;
            xs[t][k] = t0 + t < n && col < chunks * 8 ? x[(i64)(t0 + t) * cols + col] : 0.0f;
        }
        __syncthreads();
        int cn = chunks - c0 < DM_CHUNKS ? chunks - c0 : DM_CHUNKS;
        for (int c = 0; c < cn; c++) {
#pragma unroll
            for (int i = 0; i < 8; i++) {
                float w0 = ws[c][rr][i], w1 = ws[c][rr + 32][i];
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    float xv = xs[tq + j][c * 8 + i];
                    acc[0][j][i] += w0 * xv;
                    acc[1][j][i] += w1 * xv;
                }
            }
        }
        __syncthreads();
    }
    int full = chunks * 8, tail_n = cols - full;
    for (int a = 0; a < 2; a++) {
        int row = r0 + rr + 32 * a;
        if (row >= rows) {
            continue;
        }
        for (int j = 0; j < 4; j++) {
            int tok = t0 + tq + j;
            if (tok >= n) {
                continue;
            }
            const float* xr = x + (i64)tok * cols;
            float tail = 0.0f;
            for (int k = 0; k < tail_n; k++) {
                tail += dense_at(w, ty, (i64)full * rows + (i64)row * tail_n + k) * xr[full + k];
            }
            float sum = acc[a][j][0];
#pragma unroll
            for (int i = 1; i < 8; i++) {
                sum += acc[a][j][i];
            }
            float v = sum + tail;
            float* o = out + (i64)tok * rows + row;
            *o = accumulate ? *o + v : v;
        }
    }
}

// The CPU's portable f32 dot (kernels/attention `dot_scalar`): eight interleaved
// accumulators (element k to accumulator k % 8), added in order, then the tail's own sum.
// Same order, no FMA: the same bits.
template <typename T>
__device__ __forceinline__ float dot8(const float* a, const T* b, int n) {
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        acc[i] = 0.0f;
    }
    int chunks = n / 8;
    for (int c = 0; c < chunks; c++) {
#pragma unroll
        for (int i = 0; i < 8; i++) {
            acc[i] += a[c * 8 + i] * widen(b[c * 8 + i]);
        }
    }
    float tail = 0.0f;
    for (int k = chunks * 8; k < n; k++) {
        tail += a[k] * widen(b[k]);
    }
    float sum = acc[0];
#pragma unroll
    for (int i = 1; i < 8; i++) {
        sum += acc[i];
    }
    return sum + tail;
}

// NeoX rotary embedding (rotate_half: pairs i, i + d/2, with the cos and sin the host
// computed for this call's rows, backend/rope.rs: row t's d/2 cosines at cos_t + t·d and its
// sines at sin_t + t·d, as the metadata interleaves them) of every query head in place and
// every key head, the rotated keys and the values written into the row's slot of the caches
// (`[slot][position][kv_dim]`) at its position. One thread per query pair, key pair or value
// element of a row.
// Grid: (⌈(q_heads + kv_heads)·d/2 + kv_dim) / block⌉, n).
// Qwen3's per-head RMSNorm of q and k, in place, before RoPE (backend/cpu/forward.rs
// `rms_norm_heads`: the sum of squares in the CPU's order, element i to partial i % 16, the
// 16 added in order; v = w·(v·inv)). One block of 32 threads per (head, row): heads
// 0..q_heads of q, then kv_heads of k. Grid: (q_heads + kv_heads, n).
extern "C" __global__ void head_norms(float* q, float* k, const float* q_w, const float* k_w,
                                      float eps, int q_heads, int kv_heads, int head_dim) {
    __shared__ float part[16];
    int h = blockIdx.x, t = blockIdx.y, tid = threadIdx.x;
    bool is_q = h < q_heads;
    float* x = is_q ? q + ((i64)t * q_heads + h) * head_dim
                    : k + ((i64)t * kv_heads + (h - q_heads)) * head_dim;
    const float* w = is_q ? q_w : k_w;
    if (tid < 16) {
        float acc = 0.0f;
        for (int i = tid; i < head_dim; i += 16) {
            acc += x[i] * x[i];
        }
        part[tid] = acc;
    }
    __syncthreads();
    float sum = part[0];
    for (int j = 1; j < 16; j++) {
        sum += part[j];
    }
    float inv = 1.0f / sqrtf(sum / (float)head_dim + eps);
    for (int i = tid; i < head_dim; i += 32) {
        x[i] = w[i] * (x[i] * inv);
    }
}

// With `kv_half`, the caches hold f16 (rounded to nearest even, as the CPU stores them).
template <typename T>
__device__ __forceinline__ void rotate(const float* src, T* dst0, T* dst1, const float* cos_t,
                                       const float* sin_t, int t, int half, int k) {
    float c = cos_t[(i64)t * 2 * half + k];
    float s = sin_t[(i64)t * 2 * half + k];
    float x0 = src[k];
    float x1 = src[k + half];
    kv_put(dst0, x0 * c - x1 * s);
    kv_put(dst1, x1 * c + x0 * s);
}

template <typename T>
__device__ __forceinline__ void rope_store_row(float* q, const float* k, const float* v, T* kc,
                                               T* vc, const float* cos_t, const float* sin_t,
                                               const int* slot, const int* pos, int q_heads,
                                               int kv_heads, int head_dim, int context) {
    int half = head_dim / 2;
    int kv_dim = kv_heads * head_dim;
    int g = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    int p = pos[t];
    i64 cache_row = ((i64)slot[t] * context + p) * kv_dim;
    if (g < q_heads * half) {
        float* a = q + ((i64)t * q_heads + g / half) * head_dim;
        rotate(a, a + g % half, a + g % half + half, cos_t, sin_t, t, half, g % half);
        return;
    }
    g -= q_heads * half;
    if (g < kv_heads * half) {
        int h = g / half;
        const float* a = k + (i64)t * kv_dim + h * head_dim;
        T* dst = kc + cache_row + h * head_dim;
        rotate(a, dst + g % half, dst + g % half + half, cos_t, sin_t, t, half, g % half);
        return;
    }
    g -= kv_heads * half;
    if (g < kv_dim) {
        kv_put(vc + cache_row + g, v[(i64)t * kv_dim + g]);
    }
}

extern "C" __global__ void rope_store(float* q, const float* k, const float* v, void* kc,
                                      void* vc, const float* cos_t, const float* sin_t,
                                      const int* slot, const int* pos, int q_heads,
                                      int kv_heads, int head_dim, int context, int kv_half) {
    if (kv_half) {
        rope_store_row(q, k, v, (u16*)kc, (u16*)vc, cos_t, sin_t, slot, pos, q_heads, kv_heads,
                       head_dim, context);
    } else {
        rope_store_row(q, k, v, (float*)kc, (float*)vc, cos_t, sin_t, slot, pos, q_heads,
                       kv_heads, head_dim, context);
    }
}

// e^x for x ≤ 0 exactly as the CPU's softmax computes it (kernels/exp.rs: Cody–Waite
// reduction, Cephes' polynomial, every step a separate multiply or add): the same bits.
__device__ __forceinline__ float exp_nonpositive(float x) {
    if (x < -87.33655f) {
        return 0.0f;
    }
    float n = (x * 1.44269504088896340736f + 12582912.0f) - 12582912.0f;
    float r = (x - n * 0.6933594f) - n * -2.1219444e-4f;
    float p = 1.9875691e-4f;
    p = p * r + 1.3981999e-3f;
    p = p * r + 8.333452e-3f;
    p = p * r + 4.1665796e-2f;
    p = p * r + 0.16666665f;
    p = p * r + 0.5f;
    float y = p * (r * r) + r + 1.0f;
    return y * __uint_as_float((u32)((int)n + 127) << 23);
}

// Positions a softmax takes at once, as the CPU's (kernels/attention CHUNK).
#define ATTN_CHUNK 256

// Causal GQA attention with the CPU's portable arithmetic (kernels/attention): positions in
// chunks of 256, each giving its max, Σ exp(s − max) and the exp-weighted V rows, folded in
// order into a running softmax, divided by the sum at the end. Split over the KV length
// (flash-decoding): `attention_chunks` computes every chunk of every row on its own block,
// `attention_merge` folds a row's chunks in order. Each value is computed as the CPU does,
// so the result has the CPU's bits.
#define ATT_THREADS 128
// Query heads a chunk block takes: heads of one GQA group read each K and V row once.
#define ATTN_HEADS 8

// Per (row t, head h, chunk c), 2 + head_dim floats at ((t·heads + h)·chunks + c)·(2 + d):
// the chunk's max, its Σ exp(s − max), and Σ_p exp(s_p − max)·v[p][i] for each dimension i.
__device__ __forceinline__ i64 attn_part(int t, int h, int c, int heads, int chunks, int d) {
    return (((i64)t * heads + h) * chunks + c) * (2 + d);
}

// One block per (KV head and up to ATTN_HEADS of its query heads, row, chunk); blocks of
// chunks past a row's position end at once. Between barriers, as the CPU:
// 1. e[j][p] = (q_j · k[p]) · scale (dot8's order), a (head, position) per thread;
// 2. each head's max over the chunk, then e[j][p] ← exp(e[j][p] − max), then Σ e in
//    position order (a head per thread);
// 3. per dimension i, Σ_p e[j][p]·v[p][i] in position order for every head j, a dimension
//    per thread (consecutive threads read consecutive floats of a V row, once for all the
//    block's heads).
// Grid: (kv_heads · ⌈group/ATTN_HEADS⌉, rows, ⌈context/256⌉), block ATT_THREADS.
template <typename T>
__device__ __forceinline__ void attention_chunk(float* parts, const float* q, const T* kc,
                                                const T* vc, const int* slot, const int* pos,
                                                int heads, int group, int head_dim, int kv_dim,
                                                int context, float scale,
                                                float (*e)[ATTN_CHUNK], float* max_of) {
    int subs = (group + ATTN_HEADS - 1) / ATTN_HEADS;
    int kvh = blockIdx.x / subs;
    int h0 = kvh * group + (blockIdx.x % subs) * ATTN_HEADS;
    int hn = (kvh + 1) * group - h0 < ATTN_HEADS ? (kvh + 1) * group - h0 : ATTN_HEADS;
    int t = blockIdx.y, c = blockIdx.z, tid = threadIdx.x;
    int n_pos = pos[t] + 1;
    int c0 = c * ATTN_CHUNK;
    if (c0 >= n_pos) {
        return;  // the whole block: no barrier is left waiting
    }
    int len = n_pos - c0 < ATTN_CHUNK ? n_pos - c0 : ATTN_CHUNK;
    int chunks = (context + ATTN_CHUNK - 1) / ATTN_CHUNK;
    i64 kv_off = (i64)slot[t] * context * kv_dim + (i64)kvh * head_dim + (i64)c0 * kv_dim;
    const float* qt = q + ((i64)t * heads + h0) * head_dim;
    for (int idx = tid; idx < hn * len; idx += ATT_THREADS) {
        int j = idx / len, p = idx % len;
        e[j][p] = dot8(qt + (i64)j * head_dim, kc + kv_off + (i64)p * kv_dim, head_dim) * scale;
    }
    __syncthreads();
    if (tid < hn) {
        float m = -__uint_as_float(0x7f800000u);
        for (int p = 0; p < len; p++) {
            m = fmaxf(m, e[tid][p]);
        }
        max_of[tid] = m;
    }
    __syncthreads();
    for (int idx = tid; idx < hn * len; idx += ATT_THREADS) {
        int j = idx / len, p = idx % len;
        e[j][p] = exp_nonpositive(e[j][p] - max_of[j]);
    }
    __syncthreads();
    if (tid < hn) {
        float sum = 0.0f;
        for (int p = 0; p < len; p++) {
            sum += e[tid][p];
        }
        float* out = parts + attn_part(t, h0 + tid, c, heads, chunks, head_dim);
        out[0] = max_of[tid];
        out[1] = sum;
    }
    for (int i = tid; i < head_dim; i += ATT_THREADS) {
        float acc[ATTN_HEADS];
#pragma unroll
        for (int j = 0; j < ATTN_HEADS; j++) {
            acc[j] = 0.0f;
        }
        const T* vcol = vc + kv_off + i;
        for (int p = 0; p < len; p++) {
            float v = widen(vcol[(i64)p * kv_dim]);
#pragma unroll
            for (int j = 0; j < ATTN_HEADS; j++) {
                if (j < hn) {
                    acc[j] += e[j][p] * v;
                }
            }
        }
        for (int j = 0; j < hn; j++) {
            parts[attn_part(t, h0 + j, c, heads, chunks, head_dim) + 2 + i] = acc[j];
        }
    }
}

extern "C" __global__ void attention_chunks(float* parts, const float* q, const void* kc,
                                            const void* vc, const int* slot, const int* pos,
                                            int heads, int group, int head_dim, int kv_dim,
                                            int context, float scale, int kv_half) {
    __shared__ float e[ATTN_HEADS][ATTN_CHUNK];
    __shared__ float max_of[ATTN_HEADS];
    if (kv_half) {
        attention_chunk(parts, q, (const u16*)kc, (const u16*)vc, slot, pos, heads, group,
                        head_dim, kv_dim, context, scale, e, max_of);
    } else {
        attention_chunk(parts, q, (const float*)kc, (const float*)vc, slot, pos, heads, group,
                        head_dim, kv_dim, context, scale, e, max_of);
    }
}

// A row's chunks folded in order into the running softmax (rescaled to the larger max),
// divided by the sum: out[t][h]. Grid: (heads, rows), block ATT_THREADS.
extern "C" __global__ void attention_merge(float* out, const float* parts, const int* pos,
                                           int heads, int head_dim, int context) {
    int h = blockIdx.x, t = blockIdx.y;
    int n_chunks = (pos[t] + ATTN_CHUNK) / ATTN_CHUNK;
    int chunks = (context + ATTN_CHUNK - 1) / ATTN_CHUNK;
    const float* pt = parts + attn_part(t, h, 0, heads, chunks, head_dim);
    for (int i = threadIdx.x; i < head_dim; i += ATT_THREADS) {
        float run_max = -__uint_as_float(0x7f800000u);
        float run_sum = 0.0f;
        float o = 0.0f;
        for (int c = 0; c < n_chunks; c++) {
            const float* part = pt + (i64)c * (2 + head_dim);
            float m = part[0];
            float max = fmaxf(run_max, m);
            float a = exp_nonpositive(run_max - max);
            float b = exp_nonpositive(m - max);
            run_sum = run_sum * a + part[1] * b;
            run_max = max;
            o = o * a + part[2 + i] * b;
        }
        out[((i64)t * heads + h) * head_dim + i] = o / run_sum;
    }
}

// dst[j] = src[rows[j]] for rows of d floats (the rows that want logits). Grid: (⌈d/block⌉, m).
extern "C" __global__ void gather_rows(float* dst, const float* src, const int* rows, int d) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int j = blockIdx.y;
    if (i < d) {
        dst[(i64)j * d + i] = src[(i64)rows[j] * d + i];
    }
}
