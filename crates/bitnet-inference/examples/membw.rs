//! The two ceilings of this machine that bound the engine (docs/PERFORMANCE.md):
//! memory read bandwidth with 1 and N threads, and the int8 multiply-add rate of the
//! lm_head kernel on data that stays in cache.
//!
//! `cargo run --release -p bitnet-inference --example membw [MiB]`

use bitnet_inference::kernels::int8::{int8_matmul_int8, Int8Matrix};
use bitnet_inference::kernels::{DenseData, DenseMatrix, QuantizedActivations};
use std::time::Instant;

/// Sums a slice of u64 with four independent accumulators (loads dominate).
fn read_sum(v: &[u64]) -> u64 {
    let mut acc = [0u64; 4];
    for c in v.chunks_exact(4) {
        for i in 0..4 {
            acc[i] = acc[i].wrapping_add(c[i]);
        }
    }
    acc.iter().fold(0, |a, &b| a.wrapping_add(b))
}

fn bandwidth(buf: &[u64], threads: usize) -> f64 {
    let per = buf.len().div_ceil(threads);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(per)
                .map(|c| s.spawn(move || read_sum(c)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (buf.len() * 8) as f64 / best / 1e9
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let buf: Vec<u64> = (0..mib * 1024 * 1024 / 8).map(|i| i as u64).collect();
    let max_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for threads in 1..=max_threads {
        println!(
            "read bandwidth, {threads} thread(s), {mib} MiB: {:.1} GB/s",
            bandwidth(&buf, threads)
        );
    }

    // int8 dot-product rate: 64 rows × 4096 columns (256 KiB, cache resident), one token,
    // many times over, on the rayon/spin pool of the current thread count.
    let (rows, cols) = (64usize, 4096usize);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 255) as f32 - 127.0) / 127.0)
        .collect();
    let m =
        Int8Matrix::from_dense(&DenseMatrix::new(rows, cols, DenseData::F32(w.into())).unwrap());
    let x: Vec<f32> = (0..cols).map(|i| (i % 17) as f32 - 8.0).collect();
    let mut acts = QuantizedActivations::default();
    acts.quantize(&x, 1, cols);
    let mut out = vec![0.0f32; rows];
    for threads in 1..=max_threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let reps = 4000;
        let secs = pool.install(|| {
            int8_matmul_int8(&m, &acts, &mut out);
            let t = Instant::now();
            for _ in 0..reps {
                int8_matmul_int8(&m, &acts, &mut out);
            }
            t.elapsed().as_secs_f64()
        });
        println!(
            "int8 multiply-adds (lm_head kernel, in cache), {threads} thread(s): {:.1} G/s",
            (rows * cols * reps) as f64 / secs / 1e9
        );
    }
}
