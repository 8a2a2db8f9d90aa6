//! Every kernel this CPU runs must return the scalar kernel's integers exactly, on random
//! and edge inputs; the float products must agree across kernels too.

use super::*;

/// xorshift64*: deterministic inputs without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn trit(&mut self) -> i8 {
        (self.next() % 3) as i8 - 1
    }
    fn i8(&mut self) -> i8 {
        (self.next() >> 56) as u8 as i8
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn matrix(rows: usize, cols: usize, mut f: impl FnMut(usize, usize) -> i8) -> TernaryMatrix {
    TernaryMatrix::from_rows(rows, cols, |r, t| {
        for (c, v) in t.iter_mut().enumerate() {
            *v = f(r, c);
        }
        Ok(0.5 + r as f32 * 0.01)
    })
    .unwrap()
}

fn acts(n: usize, cols: usize, mut f: impl FnMut(usize, usize) -> i8) -> QuantizedActivations {
    let q: Vec<i8> = (0..n * cols).map(|i| f(i / cols, i % cols)).collect();
    QuantizedActivations::from_int8(&q, n, cols, 3.0)
}

/// The exact integers, computed from decoded trits (independent of every kernel).
fn reference(
    w: &TernaryMatrix,
    rows: std::ops::Range<usize>,
    a: &QuantizedActivations,
) -> Vec<i32> {
    let mut out = Vec::new();
    for t in 0..a.n_rows() {
        for r in rows.clone() {
            let q = a.row(t);
            out.push(
                (0..w.cols())
                    .map(|c| w.trit(r, c) as i32 * q[c] as i32)
                    .sum(),
            );
        }
    }
    out
}

fn check_all(
    w: &TernaryMatrix,
    rows: std::ops::Range<usize>,
    a: &QuantizedActivations,
    what: &str,
) {
    let want = reference(w, rows.clone(), a);
    let kernels = available_kernels();
    assert_eq!(kernels.last().unwrap().name(), "scalar");
    for k in kernels {
        // Poisoned so that an unwritten element shows.
        let mut out = vec![i32::MIN; want.len()];
        let mut prepared = a.clone();
        k.prepare(&mut prepared);
        k.ternary_dot(w, rows.clone(), &prepared, &mut out);
        assert!(
            out == want,
            "{}: {what}: rows {rows:?}, {} act rows",
            k.name(),
            a.n_rows()
        );
    }
}

const WIDTHS: [usize; 7] = [1, 100, 128, 300, 640, 6912, 8640];
const TOKENS: [usize; 8] = [1, 2, 3, 8, 17, 5, 16, 33];

#[test]
fn random_inputs_match_scalar() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for &cols in &WIDTHS {
        let rows = if cols > 1000 { 11 } else { 23 };
        let w = matrix(rows, cols, |_, _| rng.trit());
        for &n in &TOKENS {
            let a = acts(n, cols, |_, _| rng.i8());
            check_all(&w, 0..rows, &a, &format!("random, cols {cols}"));
            check_all(&w, 3..rows, &a, &format!("random, cols {cols}"));
            check_all(&w, 5..6, &a, &format!("random, cols {cols}"));
        }
    }
}

/// Prompts longer than one cache-sized token chunk of the GEMM (28 tokens at 8704 padded
/// columns), with a partial last chunk and a partial last tile.
#[test]
fn long_prompts_span_several_token_chunks() {
    let mut rng = Rng(0x5851_f42d_4c95_7f2d);
    for (cols, n) in [(8640usize, 61usize), (2560, 203)] {
        let w = matrix(7, cols, |_, _| rng.trit());
        let a = acts(n, cols, |_, _| rng.i8());
        check_all(
            &w,
            0..7,
            &a,
            &format!("long prompt, cols {cols}, {n} tokens"),
        );
    }
}

#[test]
fn edge_inputs_match_scalar() {
    let weight_kinds: [(&str, i8); 3] = [("all +1", 1), ("all -1", -1), ("all 0", 0)];
    let act_kinds: [(&str, i8); 3] = [("-128", -128), ("127", 127), ("0", 0)];
    for &cols in &[100usize, 300, 6912, 8640] {
        for &(wn, wv) in &weight_kinds {
            let w = matrix(9, cols, |_, _| wv);
            for &(an, av) in &act_kinds {
                for &n in &[1usize, 3, 8, 17] {
                    let a = acts(n, cols, |_, _| av);
                    check_all(&w, 0..9, &a, &format!("{wn} × {an}, cols {cols}"));
                    check_all(&w, 2..7, &a, &format!("{wn} × {an}, cols {cols}"));
                }
            }
        }
    }
}

#[test]
fn worst_case_magnitudes_match_scalar() {
    // The largest |Σ| a row can reach: every trit the sign of its activation (±128 / 127),
    // and mixed patterns that make int16 partial sums of other layouts overflow.
    let cols = 8640;
    let w = matrix(4, cols, |r, c| match r {
        0 => -1,
        1 => 1,
        2 => {
            if c % 2 == 0 {
                -1
            } else {
                1
            }
        }
        _ => {
            if (c / 32) % 2 == 0 {
                -1
            } else {
                1
            }
        }
    });
    for n in [1, 4, 5] {
        let a = acts(n, cols, |t, c| match (t + c) % 3 {
            0 => -128,
            1 => 127,
            _ => {
                if (c / 32) % 2 == 0 {
                    127
                } else {
                    -128
                }
            }
        });
        check_all(&w, 0..4, &a, "worst case");
        let a = acts(n, cols, |_, _| -128);
        check_all(&w, 0..4, &a, "all -128");
    }
    // Maximum magnitude: Σ = 128 · cols.
    let a = acts(1, cols, |_, _| -128);
    let mut out = vec![0; 1];
    for k in available_kernels() {
        k.ternary_dot(&w, 0..1, &a, &mut out);
        assert_eq!(out[0], 128 * cols as i32, "{}", k.name());
    }
}

#[test]
fn kernel_names_resolve() {
    let names: Vec<_> = available_kernels().iter().map(|k| k.name()).collect();
    eprintln!("kernels on this CPU: {names:?}");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        assert!(names.contains(&"avx2"), "{names:?}");
    }
    #[cfg(target_arch = "aarch64")]
    assert!(names.contains(&"neon"), "{names:?}");
    for k in available_kernels() {
        assert_eq!(kernel_by_name(k.name()).unwrap().name(), k.name());
    }
    let err = kernel_by_name("no-such-kernel")
        .err()
        .expect("unknown name must fail");
    assert!(err.to_string().contains("scalar"), "{err}");
}

#[test]
fn ternary_matmul_is_identical_across_kernels() {
    let mut rng = Rng(42);
    for &(rows, cols, n) in &[
        (70usize, 300usize, 1usize),
        (37, 2560, 9),
        (16, 6912, 3),
        (75, 640, 40),
    ] {
        let w = matrix(rows, cols, |_, _| rng.trit());
        let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
        let mut a = QuantizedActivations::with_capacity(n, cols);
        a.quantize(&x, n, cols);
        let mut want = vec![0.0f32; rows * n];
        ternary_matmul(&scalar::ScalarKernel, &w, &a, &mut want);
        // Against the definition.
        let ints = reference(&w, 0..rows, &a);
        for t in 0..n {
            for r in 0..rows {
                let expect = ints[t * rows + r] as f32 / a.scale(t) * w.multipliers()[r];
                assert_eq!(want[t * rows + r], expect);
            }
        }
        for k in available_kernels() {
            let mut a = a.clone();
            k.prepare(&mut a);
            let mut out = vec![f32::NAN; rows * n];
            ternary_matmul(k, &w, &a, &mut out);
            let mut by_rayon = vec![f32::NAN; rows * n];
            ternary_matmul_rayon(k, &w, &a, &mut by_rayon);
            assert!(out
                .iter()
                .zip(&by_rayon)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            assert!(
                out.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}: {rows}×{cols}, {n} rows",
                k.name()
            );
        }
    }
}

#[test]
fn dense_matmul_matches_scalar_within_rounding() {
    let mut rng = Rng(7);
    for &cols in &[1usize, 7, 15, 16, 33, 100, 2560, 2561] {
        let rows = 13;
        let n = 3;
        let vals: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
        let x: Vec<f32> = (0..n * cols).map(|_| rng.f32() * 4.0).collect();
        let datas = [
            DenseData::F32(vals.clone().into()),
            DenseData::F16(vals.iter().map(|&v| half::f16::from_f32(v)).collect()),
            DenseData::BF16(vals.iter().map(|&v| half::bf16::from_f32(v)).collect()),
        ];
        for data in datas {
            let name = data.type_name();
            let m = DenseMatrix::new(rows, cols, data).unwrap();
            let mut out = vec![f32::NAN; rows * n];
            dense_matmul(&m, &x, n, &mut out);
            let mut again = vec![f32::NAN; rows * n];
            dense_matmul(&m, &x, n, &mut again);
            assert_eq!(out, again, "dense_matmul must be deterministic");
            let mut w = vec![0.0f32; cols];
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                for r in 0..rows {
                    let scalar = m.dot_row_scalar(r, xt);
                    // Bound on the rounding of any summation order: relative to Σ|w·x|.
                    m.row_to_f32(r, &mut w);
                    let mag: f64 = w
                        .iter()
                        .zip(xt)
                        .map(|(a, b)| (*a as f64 * *b as f64).abs())
                        .sum();
                    let exact: f64 = w.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let got = out[t * rows + r];
                    assert!(
                        ((got - scalar).abs() as f64) <= 1e-5 * mag.max(1e-30),
                        "{name} cols {cols}: {got} vs scalar {scalar}"
                    );
                    assert!(
                        ((got as f64) - exact).abs() <= 1e-5 * mag.max(1e-30),
                        "{name} cols {cols}"
                    );
                }
            }
        }
    }
}

#[test]
fn spin_pool_runs_every_index_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    for threads in [1, 2, 3] {
        let pool = pool::SpinPool::new(threads);
        assert_eq!(pool.threads(), threads);
        for (round, n) in [0usize, 1, 2, 5, 64, 1000]
            .into_iter()
            .cycle()
            .take(60)
            .enumerate()
        {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "round {round}, n {n}"
            );
            if round == 30 {
                // Let the workers fall asleep, then check they wake for the next job.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn spin_pool_chunks_cover_the_slice_once() {
    let pool = pool::SpinPool::new(3);
    for (len, chunk) in [(0usize, 4usize), (1, 4), (10, 3), (64, 8), (100, 128)] {
        let mut data = vec![0u32; len];
        pool.for_each_chunk_mut(&mut data, chunk, &|i, piece| {
            assert!(piece.len() == chunk || (i + 1) * chunk >= len);
            for (k, v) in piece.iter_mut().enumerate() {
                *v += (i * chunk + k) as u32 + 1;
            }
        });
        let want: Vec<u32> = (1..=len as u32).collect();
        assert_eq!(data, want, "len {len}, chunk {chunk}");
    }
}

#[test]
fn an_installed_pool_runs_the_kernel_loops_and_workers_leave_with_it() {
    use std::collections::HashSet;
    use std::sync::Mutex;
    // Without a pool, loops run on the calling thread alone.
    assert_eq!(pool::threads(), 1);
    let seen = Mutex::new(HashSet::new());
    let record = |_| {
        seen.lock().unwrap().insert(std::thread::current().id());
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    pool::run(16, &record);
    assert_eq!(seen.lock().unwrap().len(), 1);
    let p = pool::SpinPool::new(3);
    p.install(|| {
        assert_eq!(pool::threads(), 3);
        // A loop inside a task runs inline instead of waiting for the busy pool.
        pool::run(3, &|_| pool::run(4, &record));
    });
    assert_eq!(pool::threads(), 1, "the pool is uninstalled after the call");
    assert!(seen.lock().unwrap().len() > 1, "the workers took tasks");
    // Dropping the pool joins its workers (a leak would hang here instead).
    drop(p);
}

#[test]
fn a_pool_computes_with_its_own_kernel_choice() {
    let scalar = KernelChoice::around(&scalar::ScalarKernel);
    let p = pool::SpinPool::with_kernels(2, scalar);
    let names = std::sync::Mutex::new(Vec::new());
    p.install(|| {
        pool::run(8, &|_| {
            names
                .lock()
                .unwrap()
                .push(KernelChoice::current().ternary.name());
        })
    });
    assert!(names.into_inner().unwrap().iter().all(|&n| n == "scalar"));
    assert!(KernelChoice::current().portable == KernelChoice::machine().portable);
}
