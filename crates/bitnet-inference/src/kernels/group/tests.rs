use super::*;
use crate::kernels::matmul::SharedOut;
use crate::rng::Rng;

fn trit(rng: &mut Rng) -> i8 {
    (rng.next_u64() % 3) as i8 - 1
}

/// A random `rows × cols` matrix with group scales (exact in f16 when `f16`), and its trits.
fn grouped(
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    group: usize,
    f16: bool,
) -> (TernaryMatrix, Vec<i8>, Vec<f32>) {
    let trits: Vec<i8> = (0..rows * cols).map(|_| trit(rng)).collect();
    let scales: Vec<f32> = (0..rows * cols / group)
        .map(|_| {
            let k = (rng.next_u64() % 2000) as f32 - 700.0;
            // k/1024 is exact in f16; k/1000 mostly is not.
            if f16 {
                k / 1024.0
            } else {
                k / 1000.0
            }
        })
        .collect();
    let m = TernaryMatrix::from_rows(rows, cols, |r, t| {
        t.copy_from_slice(&trits[r * cols..(r + 1) * cols]);
        Ok(1.0)
    })
    .and_then(|m| m.with_group_scales(group, &scales))
    .unwrap();
    let want = if f16 { "F16" } else { "F32" };
    let got = match m.group_scales_row(0) {
        GroupScalesRow::F16(_) => "F16",
        GroupScalesRow::F32(_) => "F32",
    };
    assert_eq!(got, want, "scale storage");
    (m, trits, scales)
}

/// Random int8 activations, the extremes -128 and 127 among them.
fn activations(rng: &mut Rng, n: usize, cols: usize) -> QuantizedActivations {
    let q: Vec<i8> = (0..n * cols)
        .map(|i| match i % 17 {
            0 => -128,
            1 => 127,
            _ => rng.next_u64() as i8,
        })
        .collect();
    QuantizedActivations::from_int8(&q, n, cols, 0.75)
}

#[test]
fn the_group_layout_holds_every_weight_once_and_trits_read_back() {
    // Rows of whole chunks, and rows ending with a half chunk.
    for padded in [1024usize, 1536, 2560, 3072] {
        let bytes = row_bytes(padded);
        let mut seen = vec![false; bytes * 4];
        for k in 0..padded {
            let (b, shift) = position(k, padded);
            assert!(b < bytes && shift < 8 && shift % 2 == 0);
            assert!(!std::mem::replace(
                &mut seen[b * 4 + shift as usize / 2],
                true
            ));
            // Lane `l` of a 64-byte unit holds subgroup `l` of a chunk, `l mod 8` of a half.
            let (lane, sub) = ((b % 64) / 4, k / 64);
            let full = padded / 1024;
            if k < full * 1024 {
                assert_eq!(lane, sub % 16, "weight {k} of {padded}");
            } else {
                assert_eq!(lane % 8, sub % 8, "weight {k} of {padded}");
            }
            assert_eq!(act_position(k, padded) % 64, b % 64);
        }
        assert!(seen.iter().all(|&s| s));
    }
    let mut rng = Rng::new(3);
    for cols in [64usize, 128, 384, 512, 640, 1152, 1536, 2560] {
        for group in [64usize, 128] {
            if cols % group != 0 {
                continue;
            }
            let (m, trits, scales) = grouped(&mut rng, 3, cols, group, true);
            assert_eq!(m.packed_row(0).len(), row_bytes(m.padded_cols()));
            for r in 0..3 {
                for c in 0..cols {
                    assert_eq!(
                        m.trit(r, c),
                        trits[r * cols + c],
                        "{cols}/{group} ({r}, {c})"
                    );
                }
                for g in 0..cols / group {
                    assert_eq!(m.group_scales_row(r).get(g), scales[r * cols / group + g]);
                }
            }
        }
    }
}

/// The definition: exact integer group dots from the trits in natural order, scaled and
/// added in the fixed order of the module docs.
fn reference(trits: &[i8], q: &[i8], scales: &[f32], group: usize) -> f32 {
    let mut p = [0f32; 16];
    for (g, (t, x)) in trits.chunks(group).zip(q.chunks(group)).enumerate() {
        let dot: i32 = t.iter().zip(x).map(|(&t, &x)| t as i32 * x as i32).sum();
        p[(g * group / 64) % 16] += dot as f32 * scales[g];
    }
    let q: Vec<f32> = (0..8).map(|k| p[k] + p[k + 8]).collect();
    ((q[0] + q[4]) + (q[2] + q[6])) + ((q[1] + q[5]) + (q[3] + q[7]))
}

#[test]
fn every_group_path_gives_the_bits_of_the_definition() {
    let mut rng = Rng::new(11);
    let paths = GroupPath::available();
    eprintln!("group paths: {paths:?}");
    for (cols, group) in [
        (64, 64),
        (128, 128),
        (384, 64),
        (512, 64),
        (640, 64),
        (640, 128),
        (1024, 128),
        (1152, 128),
        (1536, 64),
        (1536, 128),
        (2048, 64),
        (2048, 128),
        (2560, 64),
        (2560, 128),
        (3072, 64),
    ] {
        for f16 in [true, false] {
            let rows = 11;
            let (m, trits, scales) = grouped(&mut rng, rows, cols, group, f16);
            for n_tok in [1usize, 2, 4, 5, 9] {
                let acts = activations(&mut rng, n_tok, cols);
                let mut ga = GroupActs::default();
                ga.prepare(&acts, group);
                let per_row = cols / group;
                let want: Vec<u32> = (0..n_tok)
                    .flat_map(|t| {
                        let (trits, scales, acts) = (&trits, &scales, &acts);
                        (0..rows).map(move |r| {
                            let v = reference(
                                &trits[r * cols..(r + 1) * cols],
                                &acts.row(t)[..cols],
                                &scales[r * per_row..(r + 1) * per_row],
                                group,
                            );
                            (v / acts.scale(t)).to_bits()
                        })
                    })
                    .collect();
                for &path in &paths {
                    let mut out = vec![f32::NAN; n_tok * rows];
                    // Two tasks' row ranges, one ending inside a tile.
                    for range in [0..5, 5..rows] {
                        // SAFETY: `out` is `[n_tok, rows]`; one range at a time.
                        unsafe { path.rows(&m, &acts, &ga, range, SharedOut(out.as_mut_ptr())) };
                    }
                    let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(
                        got, want,
                        "{path:?}: {cols} columns, groups of {group}, f16 {f16}, {n_tok} tokens"
                    );
                }
            }
        }
    }
}
