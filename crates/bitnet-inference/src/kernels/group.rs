//! Ternary products with group-wise scales (one scale per 64 or 128 weights of a row: the
//! Q2_0 GGUF type, Ternary-Bonsai): the exact integer dot of every group, then
//! `y = (Σ_g dot_g · scale_g) / s` with the groups added in order in f32, where `s` is the
//! activation row's int8 scale (W1.58A8 as for per-tensor scales).
//!
//! The integer dots come per half block (64 weights: fields 0-1 or 2-3 of a packed block's
//! bytes, see [`TernaryMatrix`]); groups of 128 add their two halves (exact). The AVX2 path
//! must give the scalar path's integers (tested); other instruction sets use the scalar path.

use super::{QuantizedActivations, TernaryMatrix, BLOCK_WEIGHTS};

/// Weights of a half block, the finest group.
pub const HALF: usize = 64;

/// `Σ code·q` of every half block of a packed row (codes are trit + 1); `out` has
/// `packed.len() / 16` entries.
pub fn half_code_dots_scalar(packed: &[u8], q: &[i8], out: &mut [i32]) {
    for ((bytes, x), o) in packed
        .chunks_exact(32)
        .zip(q.chunks_exact(BLOCK_WEIGHTS))
        .zip(out.chunks_exact_mut(2))
    {
        let (mut lo, mut hi) = (0i32, 0i32);
        for (j, &b) in bytes.iter().enumerate() {
            lo += (b & 3) as i32 * x[j] as i32 + ((b >> 2) & 3) as i32 * x[j + 32] as i32;
            hi += ((b >> 4) & 3) as i32 * x[j + 64] as i32 + (b >> 6) as i32 * x[j + 96] as i32;
        }
        o[0] = lo;
        o[1] = hi;
    }
}

/// [`half_code_dots_scalar`] with AVX2.
///
/// # Safety
/// The CPU has AVX2; `packed` is whole blocks, `q` at least as many weights, `out` two
/// entries a block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub unsafe fn half_code_dots_avx2(packed: &[u8], q: &[i8], out: &mut [i32]) {
    use std::arch::x86_64::*;
    let blocks = packed.len() / 32;
    debug_assert!(q.len() >= blocks * BLOCK_WEIGHTS && out.len() >= 2 * blocks);
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    // The two halves of block b as 8 int32 partial sums each. `vpmaddubsw` pairs are at
    // most 2·2·128 = 512 in magnitude and two are added: no int16 saturation.
    let halves = |b: usize| {
        // SAFETY: b < blocks: 32 bytes of `packed` and 128 of `q` at b are in bounds.
        unsafe {
            let raw = _mm256_loadu_si256(packed.as_ptr().add(b * 32).cast());
            let x = |g: usize| _mm256_loadu_si256(q.as_ptr().add(b * 128 + 32 * g).cast());
            let c = |shift: i32| match shift {
                0 => _mm256_and_si256(raw, mask),
                2 => _mm256_and_si256(_mm256_srli_epi16::<2>(raw), mask),
                4 => _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask),
                _ => _mm256_and_si256(_mm256_srli_epi16::<6>(raw), mask),
            };
            let lo = _mm256_add_epi16(
                _mm256_maddubs_epi16(c(0), x(0)),
                _mm256_maddubs_epi16(c(2), x(1)),
            );
            let hi = _mm256_add_epi16(
                _mm256_maddubs_epi16(c(4), x(2)),
                _mm256_maddubs_epi16(c(6), x(3)),
            );
            (_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones))
        }
    };
    let mut b = 0;
    while b < blocks {
        let (a0, a1) = halves(b);
        let (c0, c1) = if b + 1 < blocks {
            halves(b + 1)
        } else {
            (_mm256_setzero_si256(), _mm256_setzero_si256())
        };
        // [A0 A1 C0 C1] in each 128-bit lane after two horizontal adds; then the lanes.
        let s = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(c0, c1));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let mut four = [0i32; 4];
        // SAFETY: `four` holds 16 bytes.
        unsafe { _mm_storeu_si128(four.as_mut_ptr().cast(), s) };
        let n = if b + 1 < blocks { 4 } else { 2 };
        out[2 * b..2 * b + n].copy_from_slice(&four[..n]);
        b += 2;
    }
}

/// Whether the AVX2 path is used (not where the portable path is forced).
fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !super::KernelChoice::current().portable && is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `Σ code·q` of every half block of row `r` against activation row `t`.
pub fn half_code_dots(
    w: &TernaryMatrix,
    r: usize,
    acts: &QuantizedActivations,
    t: usize,
    out: &mut [i32],
) {
    let (packed, q) = (w.packed_row(r), acts.row(t));
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: AVX2 was detected; a packed row is whole blocks, an activation row the
        // same padded width (checked by the caller), `out` two entries a block.
        unsafe { half_code_dots_avx2(packed, q, out) };
        return;
    }
    half_code_dots_scalar(packed, q, out)
}

/// `Σ q` of every half block of activation row `t`.
pub fn half_sums(acts: &QuantizedActivations, t: usize, out: &mut [i32]) {
    for (x, o) in acts.row(t).chunks_exact(HALF).zip(out.iter_mut()) {
        *o = x.iter().map(|&v| v as i32).sum();
    }
}

/// Row `r`'s output for activation row `t`, given its half-block code dots and the
/// activation's half-block sums: the exact group dots, scaled and added in group order.
pub fn group_output(
    w: &TernaryMatrix,
    r: usize,
    code_dots: &[i32],
    act_sums: &[i32],
    inv_scale: f32,
) -> f32 {
    let halves_per_group = w.group() / HALF;
    let mut acc = 0f32;
    for (g, &scale) in w.group_scales_row(r).iter().enumerate() {
        let h = g * halves_per_group..(g + 1) * halves_per_group;
        let dot: i32 = code_dots[h.clone()].iter().sum::<i32>() - act_sums[h].iter().sum::<i32>();
        acc += dot as f32 * scale;
    }
    acc / inv_scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn avx2_half_dots_equal_the_scalar_ones() {
        #[cfg(target_arch = "x86_64")]
        {
            if !is_x86_feature_detected!("avx2") {
                eprintln!("SKIP: no AVX2");
                return;
            }
            let mut rng = Rng::new(9);
            for blocks in [1usize, 2, 3, 7, 20] {
                let packed: Vec<u8> = (0..blocks * 32)
                    .map(|_| (0..4).fold(0u8, |b, i| b | ((rng.next_u64() % 3) as u8) << (2 * i)))
                    .collect();
                // Extremes included: -128 and 127.
                let q: Vec<i8> = (0..blocks * 128)
                    .map(|i| match i % 17 {
                        0 => -128,
                        1 => 127,
                        _ => rng.next_u64() as i8,
                    })
                    .collect();
                let (mut a, mut b) = (vec![0; 2 * blocks], vec![0; 2 * blocks]);
                half_code_dots_scalar(&packed, &q, &mut a);
                // SAFETY: AVX2 detected above; sizes as the function needs.
                unsafe { half_code_dots_avx2(&packed, &q, &mut b) };
                assert_eq!(a, b, "{blocks} blocks");
            }
        }
    }
}
