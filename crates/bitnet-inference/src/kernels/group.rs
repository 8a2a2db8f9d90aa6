//! Ternary products with group-wise scales (one scale per 64 or 128 weights of a row: the
//! Q2_0 GGUF type, Ternary-Bonsai): the exact integer dot of every group, times the group's
//! scale, added in f32 in a fixed order, then divided by the activation row's int8 scale
//! `s` (W1.58A8 as for per-tensor scales).
//!
//! The fixed order: group `g`'s product goes to partial sum `g mod 8` (in increasing `g`);
//! the 8 partials are then added as `((p0+p4) + (p2+p6)) + ((p1+p5) + (p3+p7))`. That is the
//! order an 8-lane vector accumulates in, so the AVX2 path and the scalar path give the same
//! bits (tested); other instruction sets use the scalar path. Group dots are exact integers
//! (`|dot| ≤ 128·128`, exact in f32).
//!
//! Groups are whole halves (64) or whole packed blocks (128) of [`TernaryMatrix`]'s layout:
//! a block's bytes hold elements `j, j+32, j+64, j+96` in fields 0-3, so fields 0-1 are its
//! first 64 elements and fields 2-3 the rest.

use super::{QuantizedActivations, TernaryMatrix, BLOCK_WEIGHTS};

/// Groups a vector step takes (and the partial sums of the fixed order).
const LANES: usize = 8;

/// `Σ q` of every group of activation row `t` (groups of `group`), zero-padded to a multiple
/// of 8 groups: `out.len()` is the matrix's scales a row.
pub fn group_act_sums(acts: &QuantizedActivations, t: usize, group: usize, out: &mut [i32]) {
    out.fill(0);
    for (x, o) in acts.row(t).chunks_exact(group).zip(out.iter_mut()) {
        *o = x.iter().map(|&v| v as i32).sum();
    }
}

/// The 8 partial sums added in the fixed order (see the module docs).
fn fold8(p: [f32; LANES]) -> f32 {
    let s = [p[0] + p[4], p[1] + p[5], p[2] + p[6], p[3] + p[7]];
    (s[0] + s[2]) + (s[1] + s[3])
}

/// `Σ_g dot_g · scale_g` of one packed row and one int8 activation row, in the fixed order.
/// `act_sums` and `scales` are padded to a multiple of 8 groups.
pub fn group_row_scalar(
    packed: &[u8],
    q: &[i8],
    act_sums: &[i32],
    scales: &[f32],
    group: usize,
) -> f32 {
    let mut p = [0f32; LANES];
    let per_block = BLOCK_WEIGHTS / group;
    for (b, (bytes, x)) in packed
        .chunks_exact(32)
        .zip(q.chunks_exact(BLOCK_WEIGHTS))
        .enumerate()
    {
        let (mut lo, mut hi) = (0i32, 0i32);
        for (j, &c) in bytes.iter().enumerate() {
            lo += (c & 3) as i32 * x[j] as i32 + ((c >> 2) & 3) as i32 * x[j + 32] as i32;
            hi += ((c >> 4) & 3) as i32 * x[j + 64] as i32 + (c >> 6) as i32 * x[j + 96] as i32;
        }
        let codes: &[i32] = if per_block == 2 {
            &[lo, hi]
        } else {
            &[lo + hi]
        };
        for (k, &c) in codes.iter().enumerate() {
            let g = b * per_block + k;
            p[g % LANES] += (c - act_sums[g]) as f32 * scales[g];
        }
    }
    // The vector path also adds the padding groups' 0 · 0 = +0, which changes no sum that
    // starts at +0.
    fold8(p)
}

/// [`group_row_scalar`] with AVX2.
///
/// # Safety
/// The CPU has AVX2; `packed` is whole blocks, `q` as many weights, `act_sums` and `scales`
/// one entry a group padded to a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub unsafe fn group_row_avx2(
    packed: &[u8],
    q: &[i8],
    act_sums: &[i32],
    scales: &[f32],
    group: usize,
) -> f32 {
    use std::arch::x86_64::*;
    let blocks = packed.len() / 32;
    let per_block = BLOCK_WEIGHTS / group;
    let padded = (blocks * per_block).next_multiple_of(LANES);
    assert!(
        q.len() >= blocks * BLOCK_WEIGHTS && act_sums.len() >= padded && scales.len() >= padded
    );
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    // `vpmaddubsw` pairs are at most 2·2·128 = 512 in magnitude: no int16 saturation in
    // sums of up to four of them.
    // The int16 products of block b's two halves (zero past the last block).
    let halves16 = |b: usize| {
        if b >= blocks {
            return (_mm256_setzero_si256(), _mm256_setzero_si256());
        }
        // SAFETY: b < blocks: 32 bytes of `packed` and 128 of `q` at b are in bounds.
        unsafe {
            let raw = _mm256_loadu_si256(packed.as_ptr().add(b * 32).cast());
            let x = |g: usize| _mm256_loadu_si256(q.as_ptr().add(b * 128 + 32 * g).cast());
            let c0 = _mm256_and_si256(raw, mask);
            let c1 = _mm256_and_si256(_mm256_srli_epi16::<2>(raw), mask);
            let c2 = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask);
            let c3 = _mm256_and_si256(_mm256_srli_epi16::<6>(raw), mask);
            let lo = _mm256_add_epi16(
                _mm256_maddubs_epi16(c0, x(0)),
                _mm256_maddubs_epi16(c1, x(1)),
            );
            let hi = _mm256_add_epi16(
                _mm256_maddubs_epi16(c2, x(2)),
                _mm256_maddubs_epi16(c3, x(3)),
            );
            (lo, hi)
        }
    };
    let mut acc = _mm256_setzero_ps();
    for chunk in 0..padded / LANES {
        // Eight groups' partial-sum vectors.
        let mut v = [_mm256_setzero_si256(); LANES];
        if per_block == 2 {
            for k in 0..4 {
                let (lo, hi) = halves16(chunk * 4 + k);
                v[2 * k] = _mm256_madd_epi16(lo, ones);
                v[2 * k + 1] = _mm256_madd_epi16(hi, ones);
            }
        } else {
            for (k, v) in v.iter_mut().enumerate() {
                // A whole block is one group: its four int16 products added before widening
                // (at most 4 · 512 = 2048, no saturation).
                let (lo, hi) = halves16(chunk * 8 + k);
                *v = _mm256_madd_epi16(_mm256_add_epi16(lo, hi), ones);
            }
        }
        // Exact integer group dots [V0 .. V7] (three levels of horizontal adds).
        let h0123 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        let h4567 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
        let dots = _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(h0123, h4567),
            _mm256_permute2x128_si256::<0x31>(h0123, h4567),
        );
        // SAFETY: chunk · 8 + 8 ≤ padded ≤ the lengths asserted above.
        let (sums, sc) = unsafe {
            (
                _mm256_loadu_si256(act_sums.as_ptr().add(chunk * LANES).cast()),
                _mm256_loadu_ps(scales.as_ptr().add(chunk * LANES)),
            )
        };
        let d = _mm256_cvtepi32_ps(_mm256_sub_epi32(dots, sums));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(d, sc));
    }
    // ((p0+p4) + (p2+p6)) + ((p1+p5) + (p3+p7)), as `fold8`.
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps::<1>(t, t)))
}

/// Which implementation computes the rows, chosen once per task.
#[derive(Clone, Copy)]
pub enum GroupPath {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl GroupPath {
    /// AVX2 where the CPU has it and the portable path is not forced.
    pub fn current() -> Self {
        #[cfg(target_arch = "x86_64")]
        if !super::KernelChoice::current().portable && is_x86_feature_detected!("avx2") {
            return GroupPath::Avx2;
        }
        GroupPath::Scalar
    }

    /// Row `r`'s output for activation row `t`, whose group sums are `act_sums`.
    pub fn output(
        self,
        w: &TernaryMatrix,
        r: usize,
        acts: &QuantizedActivations,
        t: usize,
        act_sums: &[i32],
    ) -> f32 {
        let (packed, q, scales) = (w.packed_row(r), acts.row(t), w.group_scales_row(r));
        let total = match self {
            GroupPath::Scalar => group_row_scalar(packed, q, act_sums, scales, w.group()),
            // SAFETY: `Avx2` is chosen only where AVX2 was detected; a packed row is whole
            // blocks, the activation row as wide (checked by the caller), and the scales and
            // sums padded to 8 groups (`with_group_scales`, `group_act_sums`).
            #[cfg(target_arch = "x86_64")]
            GroupPath::Avx2 => unsafe { group_row_avx2(packed, q, act_sums, scales, w.group()) },
        };
        total / acts.scale(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn avx2_group_rows_equal_the_scalar_ones_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        {
            if !is_x86_feature_detected!("avx2") {
                eprintln!("SKIP: no AVX2");
                return;
            }
            let mut rng = Rng::new(9);
            for group in [64usize, 128] {
                for blocks in [1usize, 2, 3, 4, 7, 20, 21] {
                    let packed: Vec<u8> = (0..blocks * 32)
                        .map(|_| {
                            (0..4).fold(0u8, |b, i| b | ((rng.next_u64() % 3) as u8) << (2 * i))
                        })
                        .collect();
                    // Extremes included: -128 and 127.
                    let q: Vec<i8> = (0..blocks * 128)
                        .map(|i| match i % 17 {
                            0 => -128,
                            1 => 127,
                            _ => rng.next_u64() as i8,
                        })
                        .collect();
                    let groups = blocks * 128 / group;
                    let padded = groups.next_multiple_of(8);
                    let mut sums = vec![0i32; padded];
                    for (g, s) in q.chunks_exact(group).zip(sums.iter_mut()) {
                        *s = g.iter().map(|&v| v as i32).sum();
                    }
                    let mut scales = vec![0f32; padded];
                    for s in &mut scales[..groups] {
                        *s = (rng.next_u64() % 1000) as f32 / 997.0 - 0.3;
                    }
                    let a = group_row_scalar(&packed, &q, &sums, &scales, group);
                    // SAFETY: AVX2 detected above; sizes as the function needs.
                    let b = unsafe { group_row_avx2(&packed, &q, &sums, &scales, group) };
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "group {group}, {blocks} blocks: {a} vs {b}"
                    );
                }
            }
        }
    }
}
