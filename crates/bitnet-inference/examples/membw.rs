//! The two ceilings of this machine that bound the engine (docs/PERFORMANCE.md):
//! memory read bandwidth with 1 and N threads, and the int8 multiply-add rate of the
//! lm_head kernel on data that stays in cache; then each lm_head kernel on the 2B-4T
//! lm_head (128256 × 2560, one token, from memory) against the bandwidth it reaches.
//!
//! `cargo run --release -p bitnet-inference --example membw [MiB] [lm_head]`

use bitnet_inference::kernels::int8::{int8_matmul_int12, int8_matmul_int8, Int8Matrix};
use bitnet_inference::kernels::q4::{q4_matmul, Q4Activations, Q4Matrix};
use bitnet_inference::kernels::q6k::{q6k_matmul, Int12Activations, Q6kMatrix};
use bitnet_inference::kernels::{dense_matmul, DenseData, DenseMatrix, QuantizedActivations};
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
    // many times over, on a spinning pool of each thread count.
    let (rows, cols) = (64usize, 4096usize);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 255) as f32 - 127.0) / 127.0)
        .collect();
    let w = DenseMatrix::new(rows, cols, DenseData::F32(w.into())).unwrap();
    let m = Int8Matrix::from_dense(&w);
    let x: Vec<f32> = (0..cols).map(|i| (i % 17) as f32 - 8.0).collect();
    let mut acts = QuantizedActivations::default();
    acts.quantize(&x, 1, cols);
    let mut out = vec![0.0f32; rows];
    for threads in 1..=max_threads {
        let pool = bitnet_inference::kernels::pool::SpinPool::new(threads);
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

    // The Q6_K kernel's rate on the same in-cache shape (random codes and scales).
    let q6: Vec<u8> = (0..rows * cols / 256 * 210)
        .map(|i| {
            if i % 210 >= 208 {
                0
            } else {
                (i * 7919 % 251) as u8
            }
        })
        .collect();
    let q6m = Q6kMatrix::new(rows, cols, q6.into()).unwrap();
    let mut acts12 = Int12Activations::default();
    acts12.quantize(&x, 1, cols, cols);
    for threads in 1..=max_threads {
        let secs = timed(threads, &|| {
            for _ in 0..1000 {
                q6k_matmul(&q6m, &acts12, &mut vec![0.0; rows]);
            }
        });
        println!(
            "Q6_K × int12 multiply-adds (lm_head kernel, in cache), {threads} thread(s): {:.1} G/s",
            (rows * cols * 1000) as f64 / secs / 1e9
        );
    }
    // The 4-bit kernel's rate on the same shape.
    let q4m = Q4Matrix::from_dense(&w);
    let mut acts_q4 = Q4Activations::default();
    acts_q4.fill(&acts12);
    for threads in 1..=max_threads {
        let secs = timed(threads, &|| {
            for _ in 0..1000 {
                q4_matmul(&q4m, &acts_q4, &mut vec![0.0; rows]);
            }
        });
        println!(
            "q4 × int12 multiply-adds (lm_head kernel, in cache), {threads} thread(s): {:.1} G/s",
            (rows * cols * 1000) as f64 / secs / 1e9
        );
    }
    if std::env::args().nth(2).as_deref() == Some("lm_head") {
        lm_head_kernels(max_threads);
    }
}

/// Seconds of the best of five runs of `f` on a pool of `threads`.
fn timed(threads: usize, f: &(dyn Fn() + Sync)) -> f64 {
    let pool = bitnet_inference::kernels::pool::SpinPool::new(threads);
    pool.install(|| {
        f();
        (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    })
}

/// The lm_head products of one decoded token on the 2B-4T shape, weights read from memory.
fn lm_head_kernels(max_threads: usize) {
    let (rows, cols) = (128_256usize, 2560usize);
    let f16: Vec<half::f16> = (0..rows * cols)
        .map(|i| half::f16::from_f32(((i * 7919 % 2001) as f32 - 1000.0) / 20000.0))
        .collect();
    let dense = DenseMatrix::new(rows, cols, DenseData::F16(f16.into())).unwrap();
    let int8 = Int8Matrix::from_dense(&dense);
    let q4 = Q4Matrix::from_dense(&dense);
    // Q6_K blocks of pseudo-random bytes with a small f16 `d`: the kernels' speed does not
    // depend on the values.
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut q6: Vec<u8> = (0..rows * cols / 256 * 210)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect();
    for b in q6.chunks_exact_mut(210) {
        b[208..].copy_from_slice(&half::f16::from_f32(1e-3).to_le_bytes());
    }
    let q6_dense = DenseMatrix::new(rows, cols, DenseData::Q6K(q6.clone().into())).unwrap();
    let q6m = Q6kMatrix::new(rows, cols, q6.into()).unwrap();
    let x: Vec<f32> = (0..cols).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    let mut acts = QuantizedActivations::default();
    acts.quantize(&x, 1, cols);
    let mut acts12 = Int12Activations::default();
    acts12.quantize(&x, 1, cols, cols);
    let out = std::sync::Mutex::new(vec![0.0f32; rows]);
    for threads in 1..=max_threads {
        let report = |name: &str, bytes: usize, secs: f64| {
            println!(
                "lm_head {name:<24} {threads} thread(s): {:6.2} ms a token, {:5.1} GB/s",
                secs * 1e3,
                bytes as f64 / secs / 1e9
            )
        };
        let t = timed(threads, &|| {
            dense_matmul(&dense, &x, 1, &mut out.lock().unwrap())
        });
        report("f16 x f32", rows * cols * 2, t);
        let t = timed(threads, &|| {
            int8_matmul_int8(&int8, &acts, &mut out.lock().unwrap())
        });
        report("int8 x int8", int8.memory_bytes(), t);
        let mut acts12_8 = Int12Activations::default();
        acts12_8.quantize(&x, 1, cols, int8.padded_cols());
        let t = timed(threads, &|| {
            int8_matmul_int12(&int8, &acts12_8, &mut out.lock().unwrap())
        });
        report("int8 x int12", int8.memory_bytes(), t);
        let t = timed(threads, &|| {
            q6k_matmul(&q6m, &acts12, &mut out.lock().unwrap())
        });
        report("q6_k x int12", q6m.memory_bytes(), t);
        let mut acts_q4 = Q4Activations::default();
        acts_q4.fill(&acts12);
        let t = timed(threads, &|| {
            q4_matmul(&q4, &acts_q4, &mut out.lock().unwrap())
        });
        report("q4 x int12", q4.memory_bytes(), t);
        let t = timed(threads, &|| {
            dense_matmul(&q6_dense, &x, 1, &mut out.lock().unwrap())
        });
        report("q6_k x f32", q6m.memory_bytes(), t);
    }
}
