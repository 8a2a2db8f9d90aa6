//! AVX-512 VNNI group tile: 64 bytes of a chunk (two 32-byte quarters) at a time; `vpdpbusd`
//! multiplies the unsigned codes (0..=2) with the matching activations and adds groups of
//! four products into the int32 lane of their subgroup (lanes `l` and `l + 8` both hold
//! subgroup `l`; their halves are added at the end of the chunk). No narrow accumulator
//! exists; a lane of a chunk is bounded by `32·256` plus its start `|Σq| ≤ 128·128`.

use super::avx2::{add_groups, fold8, scales8};
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
        chunks: usize,
    ) -> [[f32; TA]; WR] {
        // SAFETY: the trait's contract (AVX-512 F/BW/VNNI, AVX2 and F16C present, pointers
        // valid) is passed on.
        unsafe { tile_avx512::<WR, TA, F16, G128>(w, s, a, init, chunks) }
    }
}

/// Bytes ahead of the current chunk that the tile asks the cache to fetch.
const PREFETCH: usize = 2048;

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
unsafe fn tile_avx512<const WR: usize, const TA: usize, const F16: bool, const G128: bool>(
    w: [*const u8; WR],
    s: [*const u8; WR],
    a: [*const u8; TA],
    init: [*const i32; TA],
    chunks: usize,
) -> [[f32; TA]; WR] {
    let mask = _mm512_set1_epi8(3);
    let mut acc = [[_mm256_setzero_ps(); TA]; WR];
    for c in 0..chunks {
        // Each (row, token) starts the chunk from the token's `−Σq` lanes (upper half 0).
        let mut d32 = [[_mm512_setzero_si512(); TA]; WR];
        for (j, &init) in init.iter().enumerate() {
            // SAFETY: init holds 8 sums a chunk (trait contract).
            let start =
                _mm512_zextsi256_si512(unsafe { _mm256_loadu_si256(init.add(8 * c).cast()) });
            for d in d32.iter_mut() {
                d[j] = start;
            }
        }
        for h in 0..2 {
            // The codes of every row first, then each activation vector loaded once for all
            // rows.
            let mut codes = [[_mm512_setzero_si512(); 4]; WR];
            for (i, codes) in codes.iter_mut().enumerate() {
                let at = c * 128 + 64 * h;
                // A hint to fetch ahead of the hardware prefetcher when weights stream from
                // memory (decode); past the end of the matrix it is a no-op: prefetches never
                // fault, and `wrapping_add` keeps the address computation defined.
                _mm_prefetch::<_MM_HINT_T0>(w[i].wrapping_add(at + PREFETCH).cast());
                // SAFETY: w[i] is valid for `chunks * 128` bytes (trait contract).
                let raw = unsafe { _mm512_loadu_si512(w[i].add(at).cast()) };
                *codes = [
                    _mm512_and_si512(raw, mask),
                    _mm512_and_si512(_mm512_srli_epi16::<2>(raw), mask),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(raw), mask),
                    _mm512_and_si512(_mm512_srli_epi16::<6>(raw), mask),
                ];
            }
            // Fields outermost: consecutive `vpdpbusd` go to different accumulators.
            for f in 0..4 {
                for j in 0..TA {
                    // SAFETY: a[j] is valid for `chunks * 512` bytes (trait contract).
                    let q =
                        unsafe { _mm512_loadu_si512(a[j].add(c * 512 + 256 * h + 64 * f).cast()) };
                    for i in 0..WR {
                        d32[i][j] = _mm512_dpbusd_epi32(d32[i][j], codes[i][f], q);
                    }
                }
            }
        }
        for i in 0..WR {
            // SAFETY: scales hold 8 groups a chunk (64) or a pair of chunks (128).
            let sc = unsafe { scales8::<F16, G128>(s[i], c) };
            for j in 0..TA {
                // Lanes l and l + 8 both hold subgroup l.
                let d = _mm256_add_epi32(
                    _mm512_castsi512_si256(d32[i][j]),
                    _mm512_extracti64x4_epi64::<1>(d32[i][j]),
                );
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
