//! The block kernels against ggml's reference decoder, the f32 dense kernels (exact mode:
//! the same bits) and the scalar path (q8 mode: the same integers and bits).

use super::*;
use crate::formats::ggml;

const TYPES: [BlockType; 3] = [BlockType::Q4_0, BlockType::Q4_1, BlockType::Q8_0];

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn ggml_type(ty: BlockType) -> ggml::GgmlType {
    match ty {
        BlockType::Q4_0 => ggml::GgmlType::Q4_0,
        BlockType::Q4_1 => ggml::GgmlType::Q4_1,
        BlockType::Q8_0 => ggml::GgmlType::Q8_0,
    }
}

/// `n` blocks of random codes with finite scales (`d` of either sign, a Q4_1 `m`).
fn random_blocks(ty: BlockType, n: usize, seed: u64) -> Vec<u8> {
    let mut r = rng(seed);
    let bb = ty.block_bytes();
    let mut v: Vec<u8> = (0..n * bb).map(|_| r() as u8).collect();
    for b in v.chunks_exact_mut(bb) {
        let d = f16::from_f32(((r() % 2001) as f32 - 1000.0) / 2e4);
        b[..2].copy_from_slice(&d.to_le_bytes());
        if ty == BlockType::Q4_1 {
            let m = f16::from_f32(((r() % 2001) as f32 - 1000.0) / 1e4);
            b[2..4].copy_from_slice(&m.to_le_bytes());
        }
    }
    v
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn decoding_equals_ggml_reference_on_every_path() {
    for ty in TYPES {
        for (seed, nb) in [(1u64, 1usize), (2, 5), (3, 48)] {
            let mut row = random_blocks(ty, nb, seed);
            if seed == 2 {
                // Extreme codes and the largest scales.
                let bb = ty.block_bytes();
                let off = bb - 16 * if ty == BlockType::Q8_0 { 2 } else { 1 };
                row[off..bb].fill(0xFF);
                row[bb + off..2 * bb].fill(0x00);
                row[2 * bb + off..3 * bb].fill(0x80);
                row[..2].copy_from_slice(&f16::MAX.to_le_bytes());
                row[bb..bb + 2].copy_from_slice(&f16::MIN.to_le_bytes());
            }
            let mut want = vec![0.0; nb * QK];
            ggml::dequantize_row(ggml_type(ty), &row, &mut want).unwrap();
            let mut ours = vec![f32::NAN; nb * QK];
            dequantize_row(ty, &row, &mut ours);
            assert_eq!(bits(&ours), bits(&want), "{ty:?}");
            let mut fast = vec![f32::NAN; nb * QK];
            dequantize_row_fast(ty, &row, &mut fast);
            assert_eq!(bits(&fast), bits(&want), "{ty:?} fast");
        }
    }
}

/// The f32 dense kernel of `path` on the dequantized row: what the old load-time
/// dequantization computed.
fn old_dot(path: ExactPath, w: &[f32], x: &[f32]) -> f32 {
    match path {
        ExactPath::Scalar => crate::kernels::dense::dot_f32(w, x),
        #[cfg(target_arch = "x86_64")]
        ExactPath::Avx2 => crate::kernels::dense::dot_f32_at(false, w, x).unwrap(),
        #[cfg(target_arch = "x86_64")]
        ExactPath::Avx512 => crate::kernels::dense::dot_f32_at(true, w, x).unwrap(),
    }
}

#[test]
fn exact_products_equal_the_f32_kernels_on_dequantized_weights_bit_for_bit() {
    // Token counts: decode tiles (1..3), panels with remainders, past a token block.
    for ty in TYPES {
        for (rows, cols, n_tok) in [
            (1, 32, 1),
            (10, 96, 1),
            (7, 576, 2),
            (13, 64, 2),
            (9, 576, 3),
            (8, 96, 4),
            (11, 160, 5),
            (6, 1536, 7),
            (5, 64, TOKEN_BLOCK + 6),
        ] {
            let mut r = rng(rows as u64 * 31 + cols as u64);
            let data = random_blocks(ty, rows * cols / QK, r());
            let x: Vec<f32> = (0..n_tok * cols)
                .map(|_| ((r() % 20001) as f32 / 10000.0 - 1.0) * 3.0)
                .collect();
            let mut w = vec![0.0; rows * cols];
            dequantize_row(ty, &data, &mut w);
            for path in ExactPath::available() {
                let mut got = vec![f32::NAN; rows * n_tok];
                matmul_exact_with(path, ty, &data, rows, cols, &x, n_tok, &mut got);
                for t in 0..n_tok {
                    for rr in 0..rows {
                        let want = old_dot(
                            path,
                            &w[rr * cols..(rr + 1) * cols],
                            &x[t * cols..(t + 1) * cols],
                        );
                        assert_eq!(
                            got[t * rows + rr].to_bits(),
                            want.to_bits(),
                            "{ty:?} {path:?} [{rows}x{cols}] x {n_tok}: ({t}, {rr})"
                        );
                    }
                }
            }
            // The default path is the one `DenseMatrix` (old F32 data) takes.
            let m = crate::kernels::DenseMatrix::new(
                rows,
                cols,
                crate::kernels::DenseData::F32(w.clone().into()),
            )
            .unwrap();
            let q = crate::kernels::DenseMatrix::new(
                rows,
                cols,
                crate::kernels::DenseData::Q32(ty, data.clone().into()),
            )
            .unwrap();
            let (mut a, mut b) = (vec![0.0; rows * n_tok], vec![0.0; rows * n_tok]);
            crate::kernels::dense_matmul(&m, &x, n_tok, &mut a);
            crate::kernels::dense_matmul(&q, &x, n_tok, &mut b);
            assert_eq!(bits(&a), bits(&b), "{ty:?} dense_matmul");
            assert_eq!(m.dot_row(0, &x[..cols]), q.dot_row(0, &x[..cols]));
            assert_eq!(
                m.dot_row_scalar(rows - 1, &x[..cols]),
                q.dot_row_scalar(rows - 1, &x[..cols])
            );
        }
    }
}

#[test]
fn q8_activations_follow_ggml() {
    let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.5) * 0.37).collect();
    let mut a = Q8Activations::default();
    a.quantize(&x, 1, 64, BlockType::Q4_0);
    // ggml's Q8_0 blocks of the same values (d = max/127 as f16, q rounded).
    let want = ggml::quantize_q8_0(&x).unwrap();
    for b in 0..2 {
        let d = f16::from_le_bytes([want[34 * b], want[34 * b + 1]]).to_f32();
        assert_eq!(a.d[b], d);
        for j in 0..32 {
            let diff = a.row(0)[32 * b + j] as i32 - want[34 * b + 2 + j] as i8 as i32;
            assert!(diff.abs() <= 1, "block {b} value {j}");
        }
        let sum: i32 = a.row(0)[32 * b..32 * (b + 1)]
            .iter()
            .map(|&q| q as i32)
            .sum();
        assert_eq!(a.c[b], (-8 * sum) as f32 * a.d[b]);
    }
    // All zeros and NaN: zero codes and scales.
    a.quantize(&[0.0; 32], 1, 32, BlockType::Q8_0);
    assert!(a.row(0).iter().all(|&q| q == 0) && a.d[0] == 0.0);
    let mut nan = vec![1.0f32; 32];
    nan[3] = f32::NAN;
    a.quantize(&nan, 1, 32, BlockType::Q4_1);
    assert_eq!(a.row(0)[3], 0);
}

#[test]
fn q8_block_dots_equal_scalar_on_random_and_extreme_blocks() {
    let mut r = rng(9);
    for ty in TYPES {
        let bb = ty.block_bytes();
        // Rows of 1, 2 and 3 blocks (the pair and the odd-block paths).
        let mut cases: Vec<(Vec<u8>, Vec<i8>)> = (0..60)
            .map(|s| {
                let nb = 1 + s as usize % 3;
                let a = (0..32 * nb)
                    .map(|_| (r() % 255) as i8)
                    .map(|v| v.max(-127))
                    .collect();
                (random_blocks(ty, nb, s), a)
            })
            .collect();
        // Every code at its extremes against ±127.
        for fill in [0x00u8, 0xFF, 0x80, 0x7F, 0x88] {
            let mut blk = random_blocks(ty, 2, fill as u64);
            let off = bb - 16 * if ty == BlockType::Q8_0 { 2 } else { 1 };
            blk[off..bb].fill(fill);
            blk[bb + off..].fill(fill);
            for a in [127i8, -127] {
                cases.push((blk.clone(), vec![a; 64]));
                cases.push((blk.clone(), (0..64).map(|j| [a, -a][j % 2]).collect()));
            }
        }
        for (row, a) in &cases {
            let nb = a.len() / QK;
            let acts = Q8Activations {
                cols: a.len(),
                n: 1,
                ty: Some(ty),
                qs: a.clone(),
                d: (0..nb).map(|b| 0.5 + b as f32).collect(),
                c: (0..nb).map(|b| -3.0 + b as f32).collect(),
            };
            let want = row_dot_scalar(ty, row, a, &acts.d, &acts.c);
            for path in Q8Path::available() {
                let mut out = [f32::NAN];
                matmul_q8_with(path, ty, row, 1, a.len(), &acts, &mut out);
                assert_eq!(
                    out[0].to_bits(),
                    want.to_bits(),
                    "{ty:?} {path:?} {nb} blocks"
                );
            }
        }
        // The block sum with the constant term is Σ q_w·q_a of the dequantized codes.
        let (blk, a) = &cases[0];
        let mut codes = blk[..bb].to_vec();
        codes[..2].copy_from_slice(&f16::ONE.to_le_bytes());
        if ty == BlockType::Q4_1 {
            codes[2..4].copy_from_slice(&f16::ZERO.to_le_bytes());
        }
        let mut w = vec![0.0; 32];
        dequantize_row(ty, &codes, &mut w);
        let direct: i32 = w.iter().zip(a).map(|(&w, &a)| w as i32 * a as i32).sum();
        let sum: i32 = a[..32].iter().map(|&v| v as i32).sum();
        let konst = if ty == BlockType::Q4_0 { -8 * sum } else { 0 };
        assert_eq!(block_dot_scalar(ty, blk, a) + konst, direct, "{ty:?}");
    }
}

#[test]
fn q8_products_equal_scalar_and_stay_near_the_exact_product() {
    for ty in TYPES {
        for (rows, cols, n_tok) in [
            (7, 64, 1),
            (13, 576, 3),
            (5, 160, 9),
            (4, 96, TOKEN_BLOCK + 5),
        ] {
            let mut r = rng(cols as u64 + n_tok as u64);
            let data = random_blocks(ty, rows * cols / QK, r());
            let x: Vec<f32> = (0..n_tok * cols)
                .map(|_| (r() % 20001) as f32 / 10000.0 - 1.0)
                .collect();
            let mut acts = Q8Activations::default();
            acts.quantize(&x, n_tok, cols, ty);
            let mut want = vec![0.0; rows * n_tok];
            matmul_q8_with(Q8Path::Scalar, ty, &data, rows, cols, &acts, &mut want);
            for path in Q8Path::available() {
                let mut got = vec![f32::NAN; rows * n_tok];
                matmul_q8_with(path, ty, &data, rows, cols, &acts, &mut got);
                assert_eq!(bits(&got), bits(&want), "{ty:?} {path:?}");
            }
            let mut w = vec![0.0; rows * cols];
            dequantize_row(ty, &data, &mut w);
            for t in 0..n_tok {
                for rr in 0..rows {
                    let (wr, xt) = (&w[rr * cols..(rr + 1) * cols], &x[t * cols..(t + 1) * cols]);
                    let exact: f64 = wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                    // Each activation is off by at most half a step (max|x|/254 of its
                    // block, plus the f16 rounding of d): bound by Σ|w|·max|x_block|/100.
                    let bound: f64 = wr
                        .chunks(QK)
                        .zip(xt.chunks(QK))
                        .map(|(wb, xb)| {
                            let m = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
                            wb.iter().map(|v| v.abs() as f64).sum::<f64>() * m / 100.0
                        })
                        .sum::<f64>()
                        + 1e-4;
                    let g = want[t * rows + rr] as f64;
                    assert!(
                        (g - exact).abs() <= bound,
                        "{ty:?} ({t},{rr}): {g} vs {exact}"
                    );
                }
            }
        }
    }
}

#[test]
fn wrong_sizes_are_errors() {
    use crate::kernels::{DenseData, DenseMatrix};
    for ty in TYPES {
        let bb = ty.block_bytes();
        let e =
            DenseMatrix::new(2, 64, DenseData::Q32(ty, vec![0u8; 4 * bb - 1].into())).unwrap_err();
        assert!(
            e.to_string().contains(&format!("expected {}", 4 * bb)),
            "{e}"
        );
        let e = DenseMatrix::new(2, 48, DenseData::Q32(ty, vec![0u8; 3 * bb].into())).unwrap_err();
        assert!(e.to_string().contains("whole blocks"), "{e}");
    }
}
