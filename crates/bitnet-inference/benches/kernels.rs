//! Kernel micro-benchmarks on the bitnet-b1.58-2B-4T linear shapes, for every kernel this
//! CPU runs: GEMV (one activation row, decode) and GEMM (64 rows, prefill), through
//! `ternary_matmul` on a spinning pool of `RAYON_NUM_THREADS` threads (default: one per
//! core), as a CPU backend runs it, so the threading is included.
//!
//! `cargo bench -p bitnet-inference --bench kernels`; divan prints bytes/s of packed weights
//! and items/s = integer operations (2 per weight × row: multiply and add).

use bitnet_inference::kernels::{self, QuantizedActivations, TernaryMatrix};
use divan::counter::{BytesCount, ItemsCount};
use divan::{black_box, Bencher};

fn main() {
    eprintln!(
        "threads: {}, kernels: {:?}",
        rayon::current_num_threads(),
        kernel_names()
    );
    divan::main();
}

fn kernel_names() -> Vec<&'static str> {
    kernels::available_kernels()
        .iter()
        .map(|k| k.name())
        .collect()
}

fn rng(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn setup(rows: usize, cols: usize, n: usize) -> (TernaryMatrix, QuantizedActivations) {
    let mut s = 0x1234_5678_9abc_def1u64;
    let w = TernaryMatrix::from_rows(rows, cols, |_, t| {
        for v in t.iter_mut() {
            *v = (rng(&mut s) % 3) as i8 - 1;
        }
        Ok(1.0)
    })
    .unwrap();
    let x: Vec<f32> = (0..n * cols)
        .map(|_| (rng(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect();
    let mut a = QuantizedActivations::with_capacity(n, cols);
    a.quantize(&x, n, cols);
    (w, a)
}

fn run(b: Bencher, kernel: &str, rows: usize, cols: usize, n: usize) {
    run_with(b, kernel, rows, cols, n, kernels::ternary_matmul);
}

type Matmul = fn(&dyn kernels::TernaryKernel, &TernaryMatrix, &QuantizedActivations, &mut [f32]);

/// The compute threads of a backend built with as many threads as rayon's pool has.
fn pool() -> kernels::pool::SpinPool {
    kernels::pool::SpinPool::new(rayon::current_num_threads())
}

fn run_with(b: Bencher, kernel: &str, rows: usize, cols: usize, n: usize, matmul: Matmul) {
    let k = kernels::kernel_by_name(kernel).unwrap();
    let (w, mut a) = setup(rows, cols, n);
    k.prepare(&mut a);
    let mut out = vec![0.0f32; rows * n];
    let pool = pool();
    b.counter(BytesCount::new(rows * w.padded_cols() / 4))
        .counter(ItemsCount::new(2 * rows * cols * n))
        .bench_local(|| {
            pool.install(|| matmul(k, black_box(&w), black_box(&a), &mut out));
            black_box(&out);
        });
}

macro_rules! shape {
    ($gemv:ident, $gemm:ident, $rows:expr, $cols:expr) => {
        #[divan::bench(args = kernel_names(), sample_count = 20, max_time = 2)]
        fn $gemv(b: Bencher, kernel: &str) {
            run(b, kernel, $rows, $cols, 1);
        }
        #[divan::bench(args = kernel_names(), sample_count = 5, max_time = 3)]
        fn $gemm(b: Bencher, kernel: &str) {
            run(b, kernel, $rows, $cols, 64);
        }
    };
}

shape!(gemv_2560x2560, gemm64_2560x2560, 2560, 2560);
shape!(gemv_6912x2560, gemm64_6912x2560, 6912, 2560);
shape!(gemv_2560x6912, gemm64_2560x6912, 2560, 6912);

/// A whole 512-token prompt (pp512): activations no longer fit the L2 cache.
#[divan::bench(args = kernel_names(), sample_count = 3, max_time = 3)]
fn gemm512_6912x2560(b: Bencher, kernel: &str) {
    run(b, kernel, 6912, 2560, 512);
}
#[divan::bench(args = kernel_names(), sample_count = 3, max_time = 3)]
fn gemm512_2560x6912(b: Bencher, kernel: &str) {
    run(b, kernel, 2560, 6912, 512);
}

/// The threading alone: rayon against the persistent spinning pool (what `ternary_matmul`
/// uses), with the best kernel, on decode-sized and prefill-sized products.
#[divan::bench(args = ["rayon", "spin"], sample_count = 50, max_time = 2)]
fn threads_gemv_2560x2560(b: Bencher, pool: &str) {
    run_with(b, kernel_names()[0], 2560, 2560, 1, matmul_for(pool));
}

#[divan::bench(args = ["rayon", "spin"], sample_count = 50, max_time = 2)]
fn threads_gemv_6912x2560(b: Bencher, pool: &str) {
    run_with(b, kernel_names()[0], 6912, 2560, 1, matmul_for(pool));
}

#[divan::bench(args = ["rayon", "spin"], sample_count = 50, max_time = 2)]
fn threads_gemv_640x2560(b: Bencher, pool: &str) {
    run_with(b, kernel_names()[0], 640, 2560, 1, matmul_for(pool));
}

#[divan::bench(args = ["rayon", "spin"], sample_count = 10, max_time = 2)]
fn threads_gemm64_2560x2560(b: Bencher, pool: &str) {
    run_with(b, kernel_names()[0], 2560, 2560, 64, matmul_for(pool));
}

fn matmul_for(pool: &str) -> Matmul {
    match pool {
        "rayon" => kernels::ternary_matmul_rayon,
        _ => kernels::ternary_matmul,
    }
}

/// The lm_head-sized float product (one row of 2560 against 8192 f16/bf16/f32 rows).
#[divan::bench(args = ["f32", "f16", "bf16"], sample_count = 20, max_time = 2)]
fn dense_gemv_8192x2560(b: Bencher, ty: &str) {
    use kernels::{DenseData, DenseMatrix};
    let (rows, cols) = (8192, 2560);
    let vals: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let (data, width) = match ty {
        "f16" => (
            DenseData::F16(vals.iter().map(|&v| half::f16::from_f32(v)).collect()),
            2,
        ),
        "bf16" => (
            DenseData::BF16(vals.iter().map(|&v| half::bf16::from_f32(v)).collect()),
            2,
        ),
        _ => (DenseData::F32(vals.into()), 4),
    };
    let m = DenseMatrix::new(rows, cols, data).unwrap();
    let x: Vec<f32> = (0..cols).map(|i| (i % 13) as f32 / 13.0).collect();
    let mut out = vec![0.0f32; rows];
    b.counter(BytesCount::new(rows * cols * width))
        .counter(ItemsCount::new(2 * rows * cols))
        .bench_local(|| {
            kernels::dense_matmul(black_box(&m), black_box(&x), 1, &mut out);
            black_box(&out);
        });
}

/// Decode from memory rather than cache: 24 distinct 6912×2560 matrices (106 MB of packed
/// weights, past any L3), one GEMV each per iteration, as a token's layers do.
#[divan::bench(args = kernel_names(), sample_count = 10, max_time = 3)]
fn gemv_dram_24x6912x2560(b: Bencher, kernel: &str) {
    let k = kernels::kernel_by_name(kernel).unwrap();
    let (rows, cols, count) = (6912, 2560, 24);
    let (w0, a) = setup(rows, cols, 1);
    // Distinct copies (the clones are separate allocations, so nothing is shared in cache).
    let ws: Vec<TernaryMatrix> = (0..count).map(|_| w0.clone()).collect();
    let mut out = vec![0.0f32; rows];
    let pool = pool();
    b.counter(BytesCount::new(count * rows * w0.padded_cols() / 4))
        .counter(ItemsCount::new(2 * count * rows * cols))
        .bench_local(|| {
            pool.install(|| {
                for w in &ws {
                    kernels::ternary_matmul(k, black_box(w), black_box(&a), &mut out);
                }
            });
            black_box(&out);
        });
}

/// Per-tensor against group-wise scales (one f16 scale per 64 or 128 weights, the Q2_0
/// types), with the machine's kernels: `tensor`, `g64`, `g128`.
fn run_scales(b: Bencher, scales: &str, rows: usize, cols: usize, n: usize, copies: usize) {
    let k = kernels::available_kernels()[0];
    let (w, mut a) = setup(rows, cols, n);
    let w = match scales {
        "tensor" => w,
        g => {
            let group: usize = g[1..].parse().unwrap();
            // k/1024 with k in 16..48: exact in f16, as Q2_0 files hold them.
            let s: Vec<f32> = (0..rows * cols / group)
                .map(|i| (16 + (i * 7) % 32) as f32 / 1024.0)
                .collect();
            w.with_group_scales(group, &s).unwrap()
        }
    };
    // Distinct copies (separate allocations: nothing shared in cache) for the DRAM case.
    let ws: Vec<TernaryMatrix> = (0..copies).map(|_| w.clone()).collect();
    k.prepare(&mut a);
    let mut out = vec![0.0f32; rows * n];
    let pool = pool();
    b.counter(BytesCount::new(copies * w.memory_bytes()))
        .counter(ItemsCount::new(2 * copies * rows * cols * n))
        .bench_local(|| {
            pool.install(|| {
                for w in &ws {
                    kernels::ternary_matmul(k, black_box(w), black_box(&a), &mut out)
                }
            });
            black_box(&out);
        });
}

const SCALES: [&str; 3] = ["tensor", "g64", "g128"];

#[divan::bench(args = SCALES, sample_count = 20, max_time = 2)]
fn scales_gemv_6912x2560(b: Bencher, scales: &str) {
    run_scales(b, scales, 6912, 2560, 1, 1);
}
#[divan::bench(args = SCALES, sample_count = 20, max_time = 2)]
fn scales_gemv_2560x6912(b: Bencher, scales: &str) {
    run_scales(b, scales, 2560, 6912, 1, 1);
}
#[divan::bench(args = SCALES, sample_count = 5, max_time = 3)]
fn scales_gemm64_6912x2560(b: Bencher, scales: &str) {
    run_scales(b, scales, 6912, 2560, 64, 1);
}
#[divan::bench(args = SCALES, sample_count = 5, max_time = 3)]
fn scales_gemm64_2560x6912(b: Bencher, scales: &str) {
    run_scales(b, scales, 2560, 6912, 64, 1);
}
/// Decode from memory: 24 distinct matrices, as a token's layers read them.
#[divan::bench(args = SCALES, sample_count = 10, max_time = 3)]
fn scales_gemv_dram_24x6912x2560(b: Bencher, scales: &str) {
    run_scales(b, scales, 6912, 2560, 1, 24);
}

/// Prefill attention of one layer of a 512-token prompt on the 2B-4T shapes (20 query heads,
/// 5 KV heads of 128), one thread: every KV head against tiles of `tile` consecutive tokens
/// (1 = token by token, as decode runs). items/s = query heads × positions attended.
#[divan::bench(args = [1, 4, 8, 16, 32], sample_count = 5, max_time = 3)]
fn attention_prefill512(b: Bencher, tile: usize) {
    use kernels::attention::{attend, AttentionTask};
    let (n, heads, kv_heads, d) = (512, 4, 5, 128);
    let (qd, kvd) = (heads * kv_heads * d, kv_heads * d);
    let mut s = 0x1234_5678_9abc_def1u64;
    let mut rnd = |k: usize| -> Vec<f32> {
        (0..k)
            .map(|_| (rng(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect()
    };
    let (q, keys, values) = (rnd(n * qd), rnd(n * kvd), rnd(n * kvd));
    let mut out = vec![0.0f32; n * qd];
    let mut scores = Vec::new();
    b.counter(ItemsCount::new(heads * kv_heads * n * (n + 1) / 2))
        .bench_local(|| {
            for first in (0..n).step_by(tile) {
                let tokens = tile.min(n - first);
                let last = first + tokens - 1;
                for h in 0..kv_heads {
                    let q0 = first * qd + h * heads * d;
                    let len = (tokens - 1) * qd + heads * d;
                    let task = AttentionTask {
                        q: &q[q0..q0 + len],
                        q_stride: qd,
                        tokens,
                        heads,
                        keys: &keys[h * d..last * kvd + h * d + d],
                        values: &values[h * d..last * kvd + h * d + d],
                        stride: kvd,
                        n_pos: first + 1,
                        head_dim: d,
                        scale: 1.0 / (d as f32).sqrt(),
                    };
                    attend(black_box(&task), &mut scores, &mut out[q0..q0 + len]);
                }
            }
            black_box(&out);
        });
}
