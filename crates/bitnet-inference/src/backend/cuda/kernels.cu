// The CUDA backend's kernels, compiled at run time by NVRTC (backend/cuda/device.rs) with
// `--fmad=false`, so that every float operation rounds as the CPU's Rust code rounds it.
//
// First versions, correct before fast: each thread computes whole outputs (an element, a row,
// a (token, head) pair) with plain loops, and no kernel uses shared memory, warp shuffles or
// barriers. That also lets the unit tests run this very source on the CPU (backend/cuda/emu.rs
// compiles it with g++ behind a small prelude and runs the threads as loops).
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

// Exact f16 → f32 (subnormals, infinities and NaN included), from the bits.
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

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float((u32)h << 16);
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

// hidden[t][i] = embedding[tokens[t]][i]. Grid: (⌈d/block⌉, n).
extern "C" __global__ void embed_rows(float* hidden, const void* emb, int ty, const int* tokens,
                                      int d) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    if (i < d) {
        hidden[(i64)t * d + i] = dense_at(emb, ty, (i64)tokens[t] * d + i);
    }
}

// out[r] = x[r] / sqrt(mean(x[r]²) + eps) · w, one thread a row, with the CPU's order of
// additions (16 interleaved partial sums added in order), so the same bits.
extern "C" __global__ void rms_norm(float* out, const float* x, const float* w, int n, int d,
                                    float eps) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) {
        return;
    }
    const float* row = x + (i64)r * d;
    float acc[16];
#pragma unroll
    for (int j = 0; j < 16; j++) {
        acc[j] = 0.0f;
    }
    for (int base = 0; base < d; base += 16) {
#pragma unroll
        for (int j = 0; j < 16; j++) {
            if (base + j < d) {
                float v = row[base + j];
                acc[j] += v * v;
            }
        }
    }
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 16; j++) {
        sum += acc[j];
    }
    float mean = sum / (float)d;
    float inv = 1.0f / sqrtf(mean + eps);
    float* o = out + (i64)r * d;
    for (int i = 0; i < d; i++) {
        o[i] = w[i] * (row[i] * inv);
    }
}

// Per-token absmax int8 quantization, as transformers' BitNet (and kernels/quant.rs):
// s = 127 / max(max|x|, 1e-5), q = clamp(round_half_even(x·s), -128, 127), NaN → 0.
// One thread a row; the row is zero-padded to `padded` columns. Writes s and Σq.
extern "C" __global__ void quantize_rows(i8* q, float* scales, int* sums, const float* x, int n,
                                         int cols, int padded) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) {
        return;
    }
    const float* row = x + (i64)r * cols;
    float max = 0.0f;
    for (int i = 0; i < cols; i++) {
        max = fmaxf(max, fabsf(row[i]));
    }
    max = fmaxf(max, 1e-5f);
    float scale = 127.0f / max;
    i8* out = q + (i64)r * padded;
    int sum = 0;
    for (int i = 0; i < cols; i++) {
        float v = row[i] * scale;
        int k = 0;
        if (v == v) {
            v = fminf(fmaxf(v, -128.0f), 127.0f);
            k = (int)rintf(v);
        }
        out[i] = (i8)k;
        sum += k;
    }
    for (int i = cols; i < padded; i++) {
        out[i] = 0;
    }
    scales[r] = scale;
    sums[r] = sum;
}

// out[t][r] = (Σ_k trit[r][k]·q[t][k]) / s_t · multiplier[r], exactly as the CPU.
//
// Weights (weights.rs, `pack_ternary`): word `kw * rows + r` holds the 16 codes
// (trit + 1) of row r, columns 16kw..16kw+15; column 16kw + 4j + b sits in bits 8b+2j..8b+2j+1,
// so `(word >> 2j) & 0x03030303` is the four codes of columns 16kw+4j..+3 as bytes, against
// the four int8 activations of one 32-bit word: one dp4a. Consecutive threads take
// consecutive rows, so a warp's weight loads are one coalesced 128-byte line.
// Σ trit·q = Σ code·q − Σ q. Grid: (⌈rows/block⌉, n).
extern "C" __global__ void ternary_matmul(float* out, const u32* w, const float* mult,
                                          const i8* q, const float* scales, const int* sums,
                                          int rows, int kwords) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    if (r >= rows) {
        return;
    }
    const int* a = (const int*)(q + (i64)t * kwords * 16);
    int acc = 0;
    for (int kw = 0; kw < kwords; kw++) {
        u32 word = w[(i64)kw * rows + r];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            acc = __dp4a((int)((word >> (2 * j)) & 0x03030303u), a[kw * 4 + j], acc);
        }
    }
    int dot = acc - sums[t];
    out[(i64)t * rows + r] = (float)dot / scales[t] * mult[r];
}

// The CPU's portable f32 dot (kernels/dense.rs `dot_converted`, kernels/attention
// `dot_scalar`): eight interleaved accumulators (element k to accumulator k % 8), added in
// order, then the tail's own sum. Same order, no FMA: the same bits.
__device__ __forceinline__ float dot8(const float* a, const float* b, int n) {
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        acc[i] = 0.0f;
    }
    int chunks = n / 8;
    for (int c = 0; c < chunks; c++) {
#pragma unroll
        for (int i = 0; i < 8; i++) {
            acc[i] += a[c * 8 + i] * b[c * 8 + i];
        }
    }
    float tail = 0.0f;
    for (int k = chunks * 8; k < n; k++) {
        tail += a[k] * b[k];
    }
    float sum = acc[0];
#pragma unroll
    for (int i = 1; i < 8; i++) {
        sum += acc[i];
    }
    return sum + tail;
}

// dot8 of a dense weight row (any DENSE_* type, widened exactly) with x.
__device__ __forceinline__ float dot8_dense(const void* w, int ty, i64 base, const float* x,
                                           int n) {
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        acc[i] = 0.0f;
    }
    int chunks = n / 8;
    for (int c = 0; c < chunks; c++) {
#pragma unroll
        for (int i = 0; i < 8; i++) {
            acc[i] += dense_at(w, ty, base + c * 8 + i) * x[c * 8 + i];
        }
    }
    float tail = 0.0f;
    for (int k = chunks * 8; k < n; k++) {
        tail += dense_at(w, ty, base + k) * x[k];
    }
    float sum = acc[0];
#pragma unroll
    for (int i = 1; i < 8; i++) {
        sum += acc[i];
    }
    return sum + tail;
}

// out[t][r] = Σ_k W[r][k]·x[t][k] in f32 (dot8's order), W dense of type `ty`.
// Grid: (⌈rows/block⌉, n).
extern "C" __global__ void dense_matmul(float* out, const void* w, int ty, const float* x,
                                        int rows, int cols) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    if (r >= rows) {
        return;
    }
    out[(i64)t * rows + r] = dot8_dense(w, ty, (i64)r * cols, x + (i64)t * cols, cols);
}

// NeoX rotary embedding (rotate_half: pairs i, i + d/2) of every head of every row, with the
// host's cos/sin tables `[position][d/2]`. Grid: (⌈heads·d/2 / block⌉, n).
extern "C" __global__ void rope(float* x, const float* cos_t, const float* sin_t,
                                const int* pos, int heads, int head_dim) {
    int half = head_dim / 2;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    if (i >= heads * half) {
        return;
    }
    int h = i / half;
    int k = i % half;
    float* a = x + ((i64)t * heads + h) * head_dim;
    float c = cos_t[(i64)pos[t] * half + k];
    float s = sin_t[(i64)pos[t] * half + k];
    float x0 = a[k];
    float x1 = a[k + half];
    a[k] = x0 * c - x1 * s;
    a[k + half] = x1 * c + x0 * s;
}

// Writes each row's key and value into its slot's cache at its position.
// Caches: `[slot][position][kv_dim]`. Grid: (⌈kv_dim/block⌉, n).
extern "C" __global__ void kv_store(float* kc, float* vc, const float* k, const float* v,
                                    const int* slot, const int* pos, int kv_dim, int context) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    if (i >= kv_dim) {
        return;
    }
    i64 dst = ((i64)slot[t] * context + pos[t]) * kv_dim + i;
    kc[dst] = k[(i64)t * kv_dim + i];
    vc[dst] = v[(i64)t * kv_dim + i];
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
// The largest head the attention kernel takes (checked on the host).
#define MAX_HEAD_DIM 256

// Causal GQA attention, one thread per (row, query head): softmax(q·kᵀ·scale)·v over the
// positions 0..=pos of the row's slot, with the CPU's portable arithmetic: chunks of 256
// positions, each giving its max, Σ exp(s − max) and the exp-weighted V rows, folded in
// order into a running softmax, divided by the sum at the end. Grid: (⌈heads/block⌉, n).
extern "C" __global__ void attention(float* out, const float* q, const float* kc,
                                     const float* vc, const int* slot, const int* pos,
                                     int heads, int group, int head_dim, int kv_dim,
                                     int context, float scale) {
    int h = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    if (h >= heads) {
        return;
    }
    int d = head_dim;
    const float* qv = q + ((i64)t * heads + h) * d;
    i64 base = (i64)slot[t] * context * kv_dim + (i64)(h / group) * d;
    int n_pos = pos[t] + 1;
    float* o = out + ((i64)t * heads + h) * d;
    float part[MAX_HEAD_DIM];
    for (int i = 0; i < d; i++) {
        o[i] = 0.0f;
    }
    float run_max = -__uint_as_float(0x7f800000u);
    float run_sum = 0.0f;
    for (int c0 = 0; c0 < n_pos; c0 += ATTN_CHUNK) {
        int c1 = c0 + ATTN_CHUNK < n_pos ? c0 + ATTN_CHUNK : n_pos;
        float m = -__uint_as_float(0x7f800000u);
        for (int p = c0; p < c1; p++) {
            m = fmaxf(m, dot8(qv, kc + base + (i64)p * kv_dim, d) * scale);
        }
        for (int i = 0; i < d; i++) {
            part[i] = 0.0f;
        }
        float sum = 0.0f;
        for (int p = c0; p < c1; p++) {
            float e = exp_nonpositive(dot8(qv, kc + base + (i64)p * kv_dim, d) * scale - m);
            sum += e;
            const float* vr = vc + base + (i64)p * kv_dim;
            for (int i = 0; i < d; i++) {
                part[i] += e * vr[i];
            }
        }
        float max = fmaxf(run_max, m);
        float a = exp_nonpositive(run_max - max);
        float b = exp_nonpositive(m - max);
        run_sum = run_sum * a + sum * b;
        run_max = max;
        for (int i = 0; i < d; i++) {
            o[i] = o[i] * a + part[i] * b;
        }
    }
    for (int i = 0; i < d; i++) {
        o[i] /= run_sum;
    }
}

// g = act(g) · u element-wise: act 0 = relu(g)², 1 = silu(g) = g / (1 + exp(−g)).
extern "C" __global__ void gate_act(float* g, const float* u, int total, int act) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) {
        return;
    }
    float x = g[i];
    float a;
    if (act == 0) {
        float r = fmaxf(x, 0.0f);
        a = r * r;
    } else {
        a = x / (1.0f + expf(-x));
    }
    g[i] = a * u[i];
}

// acc += x element-wise (the residual stream).
extern "C" __global__ void add_in_place(float* acc, const float* x, int total) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) {
        acc[i] += x[i];
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
