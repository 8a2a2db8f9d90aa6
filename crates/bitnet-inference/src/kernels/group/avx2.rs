//! AVX2 group tile: per chunk, `vpmaddubsw` of unsigned codes with the matching activations,
//! added in int16 lanes, then one `vpmaddwd` by ones gives the 8 subgroup dots of the chunk
//! in the 8 int32 lanes (the layout puts subgroup `l` in lane `l`).
//!
//! Overflow: a `vpmaddubsw` pair is at most `2·2·128 = 512` in magnitude (codes ≤ 2,
//! |q| ≤ 128); an int16 lane adds one pair from each of the chunk's 16 code vectors, at
//! most `16·512 = 8192`, far from 32767, for any codes and any int8 activations.

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
        chunks: usize,
    ) -> [[f32; TA]; WR] {
        // SAFETY: the trait's contract (AVX2 and F16C present, pointers valid) is passed on.
        unsafe { tile_avx2::<WR, TA, F16, G128>(w, s, a, init, chunks) }
    }
}

/// Bytes ahead of the current chunk that the tile asks the cache to fetch.
const PREFETCH: usize = 2048;

#[target_feature(enable = "avx2,f16c")]
unsafe fn tile_avx2<const WR: usize, const TA: usize, const F16: bool, const G128: bool>(
    w: [*const u8; WR],
    s: [*const u8; WR],
    a: [*const u8; TA],
    init: [*const i32; TA],
    chunks: usize,
) -> [[f32; TA]; WR] {
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); TA]; WR];
    for c in 0..chunks {
        let mut d16 = [[_mm256_setzero_si256(); TA]; WR];
        for m in 0..4 {
            for i in 0..WR {
                let at = c * 128 + 32 * m;
                // A hint to fetch ahead of the hardware prefetcher when weights stream from
                // memory (decode); past the end of the matrix it is a no-op: prefetches never
                // fault, and `wrapping_add` keeps the address computation defined.
                _mm_prefetch::<_MM_HINT_T0>(w[i].wrapping_add(at + PREFETCH).cast());
                // SAFETY: w[i] is valid for `chunks * 128` bytes (trait contract).
                let raw = unsafe { _mm256_loadu_si256(w[i].add(at).cast()) };
                let codes = [
                    _mm256_and_si256(raw, mask),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(raw), mask),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask),
                    _mm256_and_si256(_mm256_srli_epi16::<6>(raw), mask),
                ];
                for j in 0..TA {
                    for (f, &code) in codes.iter().enumerate() {
                        let off = c * 512 + 256 * (m / 2) + 64 * f + 32 * (m % 2);
                        // SAFETY: a[j] is valid for `chunks * 512` bytes (trait contract).
                        let q = unsafe { _mm256_loadu_si256(a[j].add(off).cast()) };
                        d16[i][j] = _mm256_add_epi16(d16[i][j], _mm256_maddubs_epi16(code, q));
                    }
                }
            }
        }
        for i in 0..WR {
            // SAFETY: scales hold 8 groups a chunk (64) or a pair of chunks (128).
            let sc = unsafe { scales8::<F16, G128>(s[i], c) };
            for j in 0..TA {
                // SAFETY: init holds 8 sums a chunk (trait contract).
                let start = unsafe { _mm256_loadu_si256(init[j].add(8 * c).cast()) };
                let d = _mm256_add_epi32(start, _mm256_madd_epi16(d16[i][j], ones));
                acc[i][j] = add_groups::<G128>(acc[i][j], d, sc);
            }
        }
    }
    let mut out = [[0f32; TA]; WR];
    for i in 0..WR {
        for j in 0..TA {
            out[i][j] = fold8(acc[i][j]);
        }
    }
    out
}

/// The 8 scales chunk `c` multiplies: groups `8c..8c+8` at 64; at 128 the chunk's 4 groups
/// in lanes 0-3 (even `c`) or 4-7 (odd), zero in the other half.
///
/// # Safety
/// `s` holds the scales (f16 if `F16`, else f32) of whole vectors of 8 groups.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn scales8<const F16: bool, const G128: bool>(s: *const u8, c: usize) -> __m256 {
    let v = if G128 { c / 2 } else { c };
    // SAFETY: vector `v` of 8 scales is inside the row (the caller).
    let sc = unsafe {
        if F16 {
            _mm256_cvtph_ps(_mm_loadu_si128(s.add(16 * v).cast()))
        } else {
            _mm256_loadu_ps(s.add(32 * v).cast())
        }
    };
    if !G128 {
        sc
    } else if c % 2 == 0 {
        _mm256_blend_ps::<0xf0>(sc, _mm256_setzero_ps())
    } else {
        _mm256_blend_ps::<0x0f>(sc, _mm256_setzero_ps())
    }
}

/// `acc + dot · sc` per lane, from a chunk's 8 exact subgroup dots `d` (`Σ code·q − Σq`,
/// the sums of groups in their first subgroup); at 128, subgroup pairs are added into groups
/// first, in both halves (`sc` is zero in the half the chunk does not own).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn add_groups<const G128: bool>(acc: __m256, d: __m256i, sc: __m256) -> __m256 {
    let d = if G128 {
        // [d0+d1, d2+d3, ., . | d4+d5, d6+d7, ., .] → groups 0-3 in both halves.
        let h = _mm256_hadd_epi32(d, d);
        _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(0, 1, 4, 5, 0, 1, 4, 5))
    } else {
        d
    };
    _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(d), sc))
}

/// `((p0+p4) + (p2+p6)) + ((p1+p5) + (p3+p7))`, the fixed order's fold.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn fold8(acc: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps::<1>(t, t)))
}
