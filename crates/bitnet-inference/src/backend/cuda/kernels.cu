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

// RMSNorm in two launches, with the CPU's order of additions (backend/cpu/forward.rs
// `sum_of_squares`: element i to partial sum i % 16, each in column order, then the 16 added
// in order), so the same bits. First, part[r·16 + j] = Σ_{i ≡ j (mod 16)} x[r][i]², one thread
// per (row, j). Grid: ⌈16n/block⌉.
extern "C" __global__ void rms_partials(float* part, const float* x, int n, int d) {
    int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= n * 16) {
        return;
    }
    const float* row = x + (i64)(g / 16) * d;
    float acc = 0.0f;
    for (int i = g % 16; i < d; i += 16) {
        float v = row[i];
        acc += v * v;
    }
    part[g] = acc;
}

// Then out[r][i] = w[i] · (x[r][i] · 1/sqrt(mean + eps)), mean = (Σ_j part[r·16 + j]) / d.
// Grid: (⌈d/block⌉, n).
extern "C" __global__ void rms_apply(float* out, const float* x, const float* w,
                                     const float* part, int d, float eps) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int r = blockIdx.y;
    if (i >= d) {
        return;
    }
    const float* p = part + (i64)r * 16;
    float sum = p[0];
#pragma unroll
    for (int j = 1; j < 16; j++) {
        sum += p[j];
    }
    float mean = sum / (float)d;
    float inv = 1.0f / sqrtf(mean + eps);
    out[(i64)r * d + i] = w[i] * (x[(i64)r * d + i] * inv);
}

// Per-token absmax int8 quantization, as transformers' BitNet (and kernels/quant.rs):
// s = 127 / max(max|x|, 1e-5), q = clamp(round_half_even(x·s), -128, 127), NaN → 0, rows
// zero-padded to `padded` columns; also s and Σq per row. Two launches; a max and an integer
// sum are exact in any order. First the max |x| of each piece of QUANT_PIECE columns, one
// thread per (row, piece), and Σq zeroed. Grid: ⌈n·pieces/block⌉.
#define QUANT_PIECE 64
extern "C" __global__ void absmax_partials(float* pmax, int* sums, const float* x, int n,
                                           int cols, int pieces) {
    int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= n * pieces) {
        return;
    }
    int r = g / pieces;
    int c0 = (g % pieces) * QUANT_PIECE;
    int c1 = c0 + QUANT_PIECE < cols ? c0 + QUANT_PIECE : cols;
    const float* row = x + (i64)r * cols;
    float m = 0.0f;
    for (int i = c0; i < c1; i++) {
        m = fmaxf(m, fabsf(row[i]));
    }
    pmax[g] = m;
    if (g % pieces == 0) {
        sums[r] = 0;
    }
}

// Then each element from its row's max. Grid: (⌈padded/block⌉, n).
extern "C" __global__ void quantize_apply(i8* q, float* scales, int* sums, const float* x,
                                          const float* pmax, int cols, int padded, int pieces) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int r = blockIdx.y;
    if (i >= padded) {
        return;
    }
    if (i >= cols) {
        q[(i64)r * padded + i] = 0;
        return;
    }
    float max = 0.0f;
    for (int c = 0; c < pieces; c++) {
        max = fmaxf(max, pmax[(i64)r * pieces + c]);
    }
    max = fmaxf(max, 1e-5f);
    float scale = 127.0f / max;
    float v = x[(i64)r * cols + i] * scale;
    int k = 0;
    if (v == v) {
        v = fminf(fmaxf(v, -128.0f), 127.0f);
        k = (int)rintf(v);
    }
    q[(i64)r * padded + i] = (i8)k;
    if (k != 0) {
        atomicAdd(&sums[r], k);
    }
    if (i == 0) {
        scales[r] = scale;
    }
}

// out[t][r] = (Σ_k trit[r][k]·q[t][k]) / s_t · multiplier[r], exactly as the CPU, in three
// launches: zero the integer sums, add the pieces of K (integer atomics: exact in any order),
// scale.
//
// Weights (weights.rs, `pack_ternary`): word `kw * rows + r` holds the 16 codes
// (trit + 1) of row r, columns 16kw..16kw+15; column 16kw + 4j + b sits in bits 8b+2j..8b+2j+1,
// so `(word >> 2j) & 0x03030303` is the four codes of columns 16kw+4j..+3 as bytes, against
// the four int8 activations of one 32-bit word: one dp4a. Consecutive threads take
// consecutive rows, so a warp's weight loads are one coalesced 128-byte line.
// Σ trit·q = Σ code·q − Σ q.
extern "C" __global__ void zero_ints(int* a, int count) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) {
        a[i] = 0;
    }
}

// acc[t][r] += Σ code·q over words kw of piece z (`piece` words each).
// Grid: (⌈rows/block⌉, n, ⌈kwords/piece⌉).
extern "C" __global__ void ternary_partial(int* acc, const u32* w, const i8* q, int rows,
                                           int kwords, int piece) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    if (r >= rows) {
        return;
    }
    int k0 = blockIdx.z * piece;
    int k1 = k0 + piece < kwords ? k0 + piece : kwords;
    const int* a = (const int*)(q + (i64)t * kwords * 16);
    int sum = 0;
    for (int kw = k0; kw < k1; kw++) {
        u32 word = w[(i64)kw * rows + r];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            sum = __dp4a((int)((word >> (2 * j)) & 0x03030303u), a[kw * 4 + j], sum);
        }
    }
    atomicAdd(&acc[(i64)t * rows + r], sum);
}

// Grid: (⌈rows/block⌉, n).
extern "C" __global__ void ternary_finish(float* out, const int* acc, const float* mult,
                                          const float* scales, const int* sums, int rows) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    if (r >= rows) {
        return;
    }
    int dot = acc[(i64)t * rows + r] - sums[t];
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

// out[t][r] = Σ_k W[r][k]·x[t][k] in f32 (the CPU's dot8 order), W dense of type `ty`, in two
// launches. First part[t][r][i] = dot8's accumulator i (i < 8: columns ≡ i mod 8 of the
// whole groups of 8, in order) or its tail (i = 8), one thread each: the 8 threads of a row
// read 8 adjacent weights. Grid: (⌈9·rows/block⌉, n).
extern "C" __global__ void dense_partials(float* part, const void* w, int ty, const float* x,
                                          int rows, int cols) {
    int g = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    if (g >= rows * 9) {
        return;
    }
    int r = g / 9;
    int i = g % 9;
    const float* xt = x + (i64)t * cols;
    i64 base = (i64)r * cols;
    int chunks = cols / 8;
    float acc = 0.0f;
    if (i < 8) {
        for (int c = 0; c < chunks; c++) {
            acc += dense_at(w, ty, base + c * 8 + i) * xt[c * 8 + i];
        }
    } else {
        for (int k = chunks * 8; k < cols; k++) {
            acc += dense_at(w, ty, base + k) * xt[k];
        }
    }
    part[((i64)t * rows + r) * 9 + i] = acc;
}

// Then out[t][r] = (acc0 + acc1 + … + acc7) + tail, added in that order. Grid: (⌈rows/block⌉, n).
extern "C" __global__ void dense_finish(float* out, const float* part, int rows) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    if (r >= rows) {
        return;
    }
    const float* p = part + ((i64)t * rows + r) * 9;
    float sum = p[0];
#pragma unroll
    for (int i = 1; i < 8; i++) {
        sum += p[i];
    }
    out[(i64)t * rows + r] = sum + p[8];
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

// Causal GQA attention with the CPU's portable arithmetic (kernels/attention): positions in
// chunks of 256, each giving its max, Σ exp(s − max) and the exp-weighted V rows, folded in
// order into a running softmax, divided by the sum at the end. Three launches over a group of
// rows, each thread computing values the CPU computes one by one, in its order:
//
// 1. scores[t][h][p] = (q[t][h] · k[p]) · scale for p ≤ pos[t] (dot8's order), one thread per
//    (head, position). Grid: (⌈heads·span/block⌉, n), span = the largest pos + 1.
extern "C" __global__ void attn_scores(float* scores, const float* q, const float* kc,
                                       const int* slot, const int* pos, int heads, int group,
                                       int head_dim, int kv_dim, int context, int span,
                                       float scale) {
    int g = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    if (g >= heads * span) {
        return;
    }
    int h = g / span;
    int p = g % span;
    if (p > pos[t]) {
        return;
    }
    const float* qv = q + ((i64)t * heads + h) * head_dim;
    const float* kr =
        kc + ((i64)slot[t] * context + p) * kv_dim + (i64)(h / group) * head_dim;
    scores[((i64)t * heads + h) * context + p] = dot8(qv, kr, head_dim) * scale;
}

// 2. Per (row, head, chunk): its max and Σ exp(s − max) in position order.
//    stats[((t·heads + h)·chunks + c)·2 + {0, 1}]. Grid: (⌈heads·chunks/block⌉, n).
extern "C" __global__ void attn_chunk_stats(float* stats, const float* scores, const int* pos,
                                            int heads, int context, int chunks) {
    int g = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    if (g >= heads * chunks) {
        return;
    }
    int h = g / chunks;
    int c = g % chunks;
    int c0 = c * ATTN_CHUNK;
    int n_pos = pos[t] + 1;
    if (c0 >= n_pos) {
        return;
    }
    int c1 = c0 + ATTN_CHUNK < n_pos ? c0 + ATTN_CHUNK : n_pos;
    const float* sc = scores + ((i64)t * heads + h) * context;
    float m = -__uint_as_float(0x7f800000u);
    for (int p = c0; p < c1; p++) {
        m = fmaxf(m, sc[p]);
    }
    float sum = 0.0f;
    for (int p = c0; p < c1; p++) {
        sum += exp_nonpositive(sc[p] - m);
    }
    float* st = stats + (((i64)t * heads + h) * chunks + c) * 2;
    st[0] = m;
    st[1] = sum;
}

// 3. Per (row, head, dimension i): each chunk's Σ exp(s − max)·v[p][i] in position order,
//    folded chunk after chunk (rescaled to the larger max), divided by the sum.
//    Grid: (⌈heads·head_dim/block⌉, n).
extern "C" __global__ void attn_output(float* out, const float* scores, const float* stats,
                                       const float* vc, const int* slot, const int* pos,
                                       int heads, int group, int head_dim, int kv_dim,
                                       int context, int chunks) {
    int g = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    if (g >= heads * head_dim) {
        return;
    }
    int h = g / head_dim;
    int i = g % head_dim;
    int n_pos = pos[t] + 1;
    const float* sc = scores + ((i64)t * heads + h) * context;
    const float* st = stats + ((i64)t * heads + h) * chunks * 2;
    const float* vcol = vc + (i64)slot[t] * context * kv_dim + (i64)(h / group) * head_dim + i;
    float run_max = -__uint_as_float(0x7f800000u);
    float run_sum = 0.0f;
    float o = 0.0f;
    for (int c = 0; c * ATTN_CHUNK < n_pos; c++) {
        int c0 = c * ATTN_CHUNK;
        int c1 = c0 + ATTN_CHUNK < n_pos ? c0 + ATTN_CHUNK : n_pos;
        float m = st[2 * c];
        float sum = st[2 * c + 1];
        float part = 0.0f;
        for (int p = c0; p < c1; p++) {
            part += exp_nonpositive(sc[p] - m) * vcol[(i64)p * kv_dim];
        }
        float max = fmaxf(run_max, m);
        float a = exp_nonpositive(run_max - max);
        float b = exp_nonpositive(m - max);
        run_sum = run_sum * a + sum * b;
        run_max = max;
        o = o * a + part * b;
    }
    out[((i64)t * heads + h) * head_dim + i] = o / run_sum;
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
