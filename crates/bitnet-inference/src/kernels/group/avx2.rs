//! AVX2 group tile: each 64-byte unit of a chunk is two 32-byte halves, subgroups 0-7 and
//! 8-15 in their 32-bit lanes; per half, `vpmaddubsw` of unsigned codes with the matching
//! activations, added in int16 lanes, then one `vpmaddwd` by ones gives the 8 subgroup dots
//! in the 8 int32 lanes. A half chunk's two halves both hold subgroups 0-7 and are added.
//!
//! Overflow: a `vpmaddubsw` pair is at most `2·2·128 = 512` in magnitude (codes ≤ 2,
//! |q| ≤ 128); an int16 lane adds one pair from each of 16 code vectors (4 units × 4
//! fields, or 2 units × 2 halves × 4 fields), at most `16·512 = 8192`, far from 32767.

use super::avx512::{half_scales, scales8};
use super::GroupTile;
use std::arch::x86_64::*;

pub(super) struct Avx2;

impl GroupTile for Avx2 {
    #[inline(always)]
    unsafe fn tile<const WR: usize, const TA: usize, const F16: bool, const G128: bool>(
        w: [*const u8; WR],
        s: [*const u8; WR],
        a: [*const u8; TA],
        init: [*const i32; TA],
        full: usize,
        half: bool,
    ) -> [[f32; TA]; WR] {
        // SAFETY: the trait's contract (AVX2 and F16C present, pointers valid) is passed on.
        unsafe { tile_avx2::<WR, TA, F16, G128>(w, s, a, init, full, half) }
    }
}

/// Bytes ahead of the current unit that the tile asks the cache to fetch.
const PREFETCH: usize = 2048;

/// The int16 products of the 32-byte halves at byte `at + 64u + 32h` of the rows `w`
/// (activations at 4× the offset) for `(u, h)` in `parts`, added to `d16`.
///
/// # Safety
/// The pointers are valid for those reads; the CPU has AVX2.
#[inline(always)]
unsafe fn products<const WR: usize, const TA: usize>(
    d16: &mut [[__m256i; TA]; WR],
    w: [*const u8; WR],
    a: [*const u8; TA],
    parts: &[usize],
) {
    let mask = _mm256_set1_epi8(3);
    for &at in parts {
        for i in 0..WR {
            // A hint to fetch ahead of the hardware prefetcher when weights stream from memory
            // (decode); past the end of the matrix it is a no-op: prefetches never fault, and
            // `wrapping_add` keeps the address computation defined.
            _mm_prefetch::<_MM_HINT_T0>(w[i].wrapping_add(at + PREFETCH).cast());
            // SAFETY: in bounds (the caller).
            let raw = unsafe { _mm256_loadu_si256(w[i].add(at).cast()) };
            let codes = [
                _mm256_and_si256(raw, mask),
                _mm256_and_si256(_mm256_srli_epi16::<2>(raw), mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask),
                _mm256_and_si256(_mm256_srli_epi16::<6>(raw), mask),
            ];
            for j in 0..TA {
                for (f, &code) in codes.iter().enumerate() {
                    // The activations of unit byte `at % 64` lie at `4·(at − at % 64) + 64f
                    // + at % 64`.
                    let off = 4 * (at - at % 64) + 64 * f + at % 64;
                    // SAFETY: in bounds (the caller).
                    let q = unsafe { _mm256_loadu_si256(a[j].add(off).cast()) };
                    d16[i][j] = _mm256_add_epi16(d16[i][j], _mm256_maddubs_epi16(code, q));
                }
            }
        }
    }
}

#[target_feature(enable = "avx2,f16c")]
unsafe fn tile_avx2<const WR: usize, const TA: usize, const F16: bool, const G128: bool>(
    w: [*const u8; WR],
    s: [*const u8; WR],
    a: [*const u8; TA],
    init: [*const i32; TA],
    full: usize,
    half: bool,
) -> [[f32; TA]; WR] {
    let ones = _mm256_set1_epi16(1);
    // Partials 0-7 and 8-15.
    let mut acc = [[[_mm256_setzero_ps(); 2]; TA]; WR];
    // (chunk, subgroup half, byte offsets of its 32-byte parts): the chunks' halves, then the
    // half chunk's.
    let steps = (0..full)
        .flat_map(|c| (0..2).map(move |h| (c, h, false)))
        .chain(half.then_some((full, 0, true)));
    for (c, h, tail) in steps {
        let base = 256 * c;
        let parts: [usize; 4] = if tail {
            [base, base + 32, base + 64, base + 96]
        } else {
            [
                base + 32 * h,
                base + 64 + 32 * h,
                base + 128 + 32 * h,
                base + 192 + 32 * h,
            ]
        };
        let mut d16 = [[_mm256_setzero_si256(); TA]; WR];
        // SAFETY: the (half) chunk's bytes are in bounds (trait contract).
        unsafe { products(&mut d16, w, a, &parts) };
        for i in 0..WR {
            // SAFETY: the scales cover the (half) chunk in whole vectors of 8.
            let sc = unsafe {
                if tail {
                    half_scales::<F16, G128>(s[i], c)
                } else if G128 {
                    // Groups 8c + 4h .. + 4 to lanes 0, 2, 4, 6.
                    let s8 = scales8::<F16>(s[i], 8 * c);
                    let idx = _mm256_add_epi32(
                        _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
                        _mm256_set1_epi32(4 * h as i32),
                    );
                    _mm256_blend_ps::<0xaa>(_mm256_permutevar8x32_ps(s8, idx), _mm256_setzero_ps())
                } else {
                    scales8::<F16>(s[i], 16 * c + 8 * h)
                }
            };
            for j in 0..TA {
                // SAFETY: init holds one sum a subgroup (trait contract).
                let start = unsafe { _mm256_loadu_si256(init[j].add(16 * c + 8 * h).cast()) };
                let mut d = _mm256_add_epi32(start, _mm256_madd_epi16(d16[i][j], ones));
                if G128 {
                    // Subgroup pairs: lane 2k gets 2k + (2k + 1).
                    d = _mm256_add_epi32(d, _mm256_shuffle_epi32::<0xb1>(d));
                }
                let x = _mm256_mul_ps(_mm256_cvtepi32_ps(d), sc);
                acc[i][j][h] = _mm256_add_ps(acc[i][j][h], x);
            }
        }
    }
    let mut out = [[0f32; TA]; WR];
    for i in 0..WR {
        for j in 0..TA {
            out[i][j] = fold8(_mm256_add_ps(acc[i][j][0], acc[i][j][1]));
        }
    }
    out
}

/// `((q0+q4) + (q2+q6)) + ((q1+q5) + (q3+q7))`, the last step of the fixed order's fold.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn fold8(acc: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps::<1>(t, t)))
}
