// The CUDA backend's kernels, compiled at run time by NVRTC (backend/cuda/device.rs) with
// `--fmad=false`, so that every float operation rounds as the CPU's Rust code rounds it.
//
// The unit tests run this very source on the CPU (backend/cuda/emu.rs compiles it with g++
// behind a small prelude, emu_prelude.h, that runs a block's threads as fibers switching at
// each __syncthreads()): so kernels use shared memory and barriers but no warp shuffles, and
// every barrier is reached by all threads of a block.
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
// 127), NaN → 0, rows zero-padded to `padded` columns; also s and Σq per row. A max and an
// integer sum are exact in any order, so the block reduces them as a tree.
// The input is `x`, or act(x)·up when `up` is given (gate_act, as the CPU computes it).
// Grid: (n), block NQ_THREADS.
extern "C" __global__ void norm_quant(i8* q, float* scales, int* sums, float* normed,
                                      const float* x, const float* up, int act, const float* w,
                                      float eps, int cols, int padded) {
    __shared__ float part[16];
    __shared__ float red_f[NQ_THREADS];
    __shared__ int red_i[NQ_THREADS];
    int r = blockIdx.x;
    int tid = threadIdx.x;
    const float* xr = x + (i64)r * cols;
    const float* ur = up ? up + (i64)r * cols : (const float*)0;
    float inv = 1.0f;
    if (w) {
        if (tid < 16) {
            float acc = 0.0f;
            for (int i = tid; i < cols; i += 16) {
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
    float m = 0.0f;
    for (int i = tid; i < cols; i += NQ_THREADS) {
        float v = nq_input(xr, ur, act, i);
        if (w) {
            v = w[i] * (v * inv);
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
    float scale = 127.0f / fmaxf(max, 1e-5f);
    int qsum = 0;
    for (int i = tid; i < padded; i += NQ_THREADS) {
        int k = 0;
        if (i < cols) {
            float v = nq_input(xr, ur, act, i);
            if (w) {
                v = w[i] * (v * inv);
            }
            v = v * scale;
            if (v == v) {
                v = fminf(fmaxf(v, -128.0f), 127.0f);
                k = (int)rintf(v);
            }
        }
        q[(i64)r * padded + i] = (i8)k;
        qsum += k;
    }
    int total = block_sum(red_i, qsum);
    if (tid == 0) {
        scales[r] = scale;
        sums[r] = total;
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

__device__ __forceinline__ int dot_codes(u32 word, const int* a, int acc) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        acc = __dp4a((int)((word >> (2 * i)) & 0x03030303u), a[i], acc);
    }
    return acc;
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
#pragma unroll 2
        for (int k4 = warp; k4 < k4s; k4 += TG_WARPS) {
            u32x4 wv = w[(i64)k4 * rows + r];
#pragma unroll
            for (int t = 0; t < TG_TOKENS; t++) {
                if (t < nt) {
                    const u32x4* a4 = (const u32x4*)(qt + (i64)t * padded + (i64)k4 * 64);
                    u32x4 a0 = a4[0], a1 = a4[1], a2 = a4[2], a3 = a4[3];
                    int a[16] = {(int)a0.x, (int)a0.y, (int)a0.z, (int)a0.w,
                                 (int)a1.x, (int)a1.y, (int)a1.z, (int)a1.w,
                                 (int)a2.x, (int)a2.y, (int)a2.z, (int)a2.w,
                                 (int)a3.x, (int)a3.y, (int)a3.z, (int)a3.w};
                    int s = acc[t];
                    s = dot_codes(wv.x, a, s);
                    s = dot_codes(wv.y, a + 4, s);
                    s = dot_codes(wv.z, a + 8, s);
                    s = dot_codes(wv.w, a + 12, s);
                    acc[t] = s;
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
        int tok = t0 + t;
        float v = (float)(dot - sums[tok]) / scales[tok] * mult[row];
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
}

// out[t][r] = Σ_k W[r][k]·x[t][k] in f32 with the CPU's portable order (kernels/dense.rs
// `dot_converted`: eight interleaved accumulators, element k to accumulator k % 8, added in
// order, then the tail's own sum; no FMA: the same bits), W a chunk-major dense matrix of
// type `ty`. One thread per row and DG_TOKENS tokens: consecutive threads read consecutive
// 16-byte chunks. With `accumulate`, out += the product. Grid: (⌈rows/block⌉, ⌈n/DG_TOKENS⌉).
#define DG_TOKENS 4
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
    for (int c = 0; c < chunks; c++) {
        float wv[8];
        dense_chunk(w, ty, (i64)c * rows + r, wv);
#pragma unroll
        for (int t = 0; t < DG_TOKENS; t++) {
            if (t < nt) {
                const float* xc = xt0 + (i64)t * cols + c * 8;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    acc[t][i] += wv[i] * xc[i];
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

// The CPU's portable f32 dot (kernels/attention `dot_scalar`): eight interleaved
// accumulators (element k to accumulator k % 8), added in order, then the tail's own sum.
// Same order, no FMA: the same bits.
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

// dst[j] = src[rows[j]] for rows of d floats (the rows that want logits). Grid: (⌈d/block⌉, m).
extern "C" __global__ void gather_rows(float* dst, const float* src, const int* rows, int d) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int j = blockIdx.y;
    if (i < d) {
        dst[(i64)j * d + i] = src[(i64)rows[j] * d + i];
    }
}
