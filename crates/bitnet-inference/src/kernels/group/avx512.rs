//! AVX-512 VNNI group tile: a chunk is four 64-byte units whose 32-bit lane `l` holds
//! subgroup `l`; `vpdpbusd` multiplies the unsigned codes (0..=2) with the matching
//! activations and adds groups of four products into that lane, so after the chunk each
//! lane is one subgroup's exact dot, scaled and added into the 16 partials of the fixed
//! order with one convert, multiply and add. A half chunk's lanes `l` and `l + 8` both hold
//! subgroup `l`; they are added first. No narrow accumulator exists; a lane is bounded by
//! `64·256` plus its start `|Σq| ≤ 128·128`.

use super::avx2::fold8;
use super::GroupTile;
use std::arch::x86_64::*;

pub(super) struct Avx512;

impl GroupTile for Avx512 {
    #[inline(always)]
    unsafe fn tile<const WR: usize, const TA: usize, const F16: bool, const G128: bool>(
        w: [*const u8; WR],
        s: [*const u8; WR],
        a: [*const u8; TA],
        init: [*const i32; TA],
        full: usize,
        half: bool,
    ) -> [[f32; TA]; WR] {
        // SAFETY: the trait's contract (AVX-512 F/BW/VNNI, AVX2 and F16C present, pointers
        // valid) is passed on.
        unsafe { tile_avx512::<WR, TA, F16, G128>(w, s, a, init, full, half) }
    }
}

/// Bytes ahead of the current unit that the tile asks the cache to fetch.
const PREFETCH: usize = 2048;

/// The subgroup dots of `units` 64-byte units at byte `at` of the rows `w` (activations at
/// `4·at`), added to `d`.
///
/// # Safety
/// The pointers are valid for those reads; the CPU has AVX-512 F/BW/VNNI.
#[inline(always)]
unsafe fn dots<const WR: usize, const TA: usize>(
    d: &mut [[__m512i; TA]; WR],
    w: [*const u8; WR],
    a: [*const u8; TA],
    at: usize,
    units: usize,
) {
    let mask = _mm512_set1_epi8(3);
    for u in 0..units {
        let at = at + 64 * u;
        // The codes of every row first, then each activation vector loaded once for all rows.
        let mut codes = [[_mm512_setzero_si512(); 4]; WR];
        for (i, codes) in codes.iter_mut().enumerate() {
            // A hint to fetch ahead of the hardware prefetcher when weights stream from memory
            // (decode); past the end of the matrix it is a no-op: prefetches never fault, and
            // `wrapping_add` keeps the address computation defined.
            _mm_prefetch::<_MM_HINT_T0>(w[i].wrapping_add(at + PREFETCH).cast());
            // SAFETY: in bounds (the caller).
            let raw = unsafe { _mm512_loadu_si512(w[i].add(at).cast()) };
            *codes = [
                _mm512_and_si512(raw, mask),
                _mm512_and_si512(_mm512_srli_epi16::<2>(raw), mask),
                _mm512_and_si512(_mm512_srli_epi16::<4>(raw), mask),
                _mm512_and_si512(_mm512_srli_epi16::<6>(raw), mask),
            ];
        }
        // Fields outermost: consecutive `vpdpbusd` go to different accumulators.
        #[allow(clippy::needless_range_loop)]
        for f in 0..4 {
            for j in 0..TA {
                // SAFETY: in bounds (the caller).
                let q = unsafe { _mm512_loadu_si512(a[j].add(4 * at + 64 * f).cast()) };
                for i in 0..WR {
                    d[i][j] = _mm512_dpbusd_epi32(d[i][j], codes[i][f], q);
                }
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
unsafe fn tile_avx512<const WR: usize, const TA: usize, const F16: bool, const G128: bool>(
    w: [*const u8; WR],
    s: [*const u8; WR],
    a: [*const u8; TA],
    init: [*const i32; TA],
    full: usize,
    half: bool,
) -> [[f32; TA]; WR] {
    let mut acc = [[_mm512_setzero_ps(); TA]; WR];
    for c in 0..full {
        // Each (row, token) starts from the token's `−Σq` lanes.
        let mut d = [[_mm512_setzero_si512(); TA]; WR];
        for (j, &init) in init.iter().enumerate() {
            // SAFETY: init holds one sum a subgroup (trait contract).
            let start = unsafe { _mm512_loadu_si512(init.add(16 * c).cast()) };
            for d in d.iter_mut() {
                d[j] = start;
            }
        }
        // SAFETY: a chunk's bytes are in bounds (trait contract).
        unsafe { dots(&mut d, w, a, 256 * c, 4) };
        for i in 0..WR {
            // The chunk's scales in the lanes of the groups' first subgroups, 0 elsewhere.
            // SAFETY: the scales cover the chunk in whole vectors of 8 (trait contract).
            let sc = unsafe {
                if G128 {
                    let s8 = scales8::<F16>(s[i], 8 * c);
                    _mm512_maskz_expand_ps(0x5555, _mm512_castps256_ps512(s8))
                } else if F16 {
                    _mm512_cvtph_ps(_mm256_loadu_si256(s[i].add(32 * c).cast()))
                } else {
                    _mm512_loadu_ps(s[i].add(64 * c).cast())
                }
            };
            for j in 0..TA {
                let mut dj = d[i][j];
                if G128 {
                    // Subgroup pairs: lane 2k gets 2k + (2k + 1).
                    dj = _mm512_add_epi32(dj, _mm512_shuffle_epi32::<0xb1>(dj));
                }
                let x = _mm512_cvtepi32_ps(dj);
                acc[i][j] = _mm512_add_ps(acc[i][j], _mm512_mul_ps(x, sc));
            }
        }
    }
    if half {
        let c = full;
        let mut d = [[_mm512_setzero_si512(); TA]; WR];
        for (j, &init) in init.iter().enumerate() {
            // SAFETY: init holds one sum a subgroup (trait contract); the upper half is 0.
            let start =
                _mm512_zextsi256_si512(unsafe { _mm256_loadu_si256(init.add(16 * c).cast()) });
            for d in d.iter_mut() {
                d[j] = start;
            }
        }
        // SAFETY: the half chunk's bytes are in bounds (trait contract).
        unsafe { dots(&mut d, w, a, 256 * c, 2) };
        for i in 0..WR {
            // SAFETY: the scales cover the half chunk in whole vectors of 8 (trait contract).
            let sc = unsafe { half_scales::<F16, G128>(s[i], c) };
            for j in 0..TA {
                // Lanes l and l + 8 both hold subgroup l.
                let mut dj = _mm256_add_epi32(
                    _mm512_castsi512_si256(d[i][j]),
                    _mm512_extracti64x4_epi64::<1>(d[i][j]),
                );
                if G128 {
                    dj = _mm256_add_epi32(dj, _mm256_shuffle_epi32::<0xb1>(dj));
                }
                let x = _mm256_mul_ps(_mm256_cvtepi32_ps(dj), sc);
                // Partials 0-7 only.
                acc[i][j] =
                    _mm512_mask_add_ps(acc[i][j], 0x00ff, acc[i][j], _mm512_castps256_ps512(x));
            }
        }
    }
    let mut out = [[0f32; TA]; WR];
    for i in 0..WR {
        for j in 0..TA {
            let q = _mm256_add_ps(
                _mm512_castps512_ps256(acc[i][j]),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[i][j]))),
            );
            out[i][j] = fold8(q);
        }
    }
    out
}

/// The 8 scales from `k` (f16 if `F16`, else f32).
///
/// # Safety
/// `s` holds at least `k + 8` scales.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn scales8<const F16: bool>(s: *const u8, k: usize) -> __m256 {
    // SAFETY: in bounds (the caller).
    unsafe {
        if F16 {
            _mm256_cvtph_ps(_mm_loadu_si128(s.add(2 * k).cast()))
        } else {
            _mm256_loadu_ps(s.add(4 * k).cast())
        }
    }
}

/// The scales of the half chunk `c` (8 subgroups) in the lanes of its groups' first
/// subgroups, 0 elsewhere.
///
/// # Safety
/// The scales cover the half chunk in whole vectors of 8.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn half_scales<const F16: bool, const G128: bool>(
    s: *const u8,
    c: usize,
) -> __m256 {
    // SAFETY: in bounds (the caller).
    unsafe {
        if G128 {
            // Groups 8c..8c+4 to lanes 0, 2, 4, 6.
            let s8 = scales8::<F16>(s, 8 * c);
            let spread = _mm256_permutevar8x32_ps(s8, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
            _mm256_blend_ps::<0xaa>(spread, _mm256_setzero_ps())
        } else {
            scales8::<F16>(s, 16 * c)
        }
    }
}
