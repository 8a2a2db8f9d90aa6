//! AVX-512 kernel (F + BW + VNNI): one 32-byte packed block is broadcast to both halves of a
//! zmm register and masked per half, which gives the codes of 64 consecutive weights in
//! natural order, each half scaled by a power of two: elements 0-63 from bits 1-0 and 3-2,
//! 64-127 from bits 5-4 and 7-6. `vpdpbusd` then multiplies them (unsigned, (trit + 1)·2^k ≤
//! 128) by 64 contiguous int8 activations and adds groups of four products into int32 lanes
//! without saturation, so no narrow accumulator exists that could overflow. A lane gains at
//! most `4·128·128` a block, so it is bounded by `512·cols`, which fits int32 for any width
//! below 4 million columns.

use super::tiles::{self, Tile};
use super::{QuantizedActivations, TernaryKernel, TernaryMatrix};
use std::arch::x86_64::*;
use std::ops::Range;

/// Needs AVX-512 F, BW and VNNI; construct only through `available_kernels`.
pub struct Avx512VnniKernel(());

impl Avx512VnniKernel {
    pub(super) fn detect() -> Option<Self> {
        (is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni"))
        .then_some(Self(()))
    }
}

impl TernaryKernel for Avx512VnniKernel {
    fn name(&self) -> &'static str {
        "avx512vnni"
    }

    fn ternary_dot(
        &self,
        weights: &TernaryMatrix,
        rows: Range<usize>,
        acts: &QuantizedActivations,
        out: &mut [i32],
    ) {
        // SAFETY: an `Avx512VnniKernel` exists only where AVX-512 F/BW/VNNI were detected.
        unsafe { tiles::run::<Avx512>(weights, rows, acts, out) }
    }
}

struct Avx512;

impl Tile for Avx512 {
    #[inline(always)]
    unsafe fn tile<const WR: usize, const TA: usize>(
        w: [*const u8; WR],
        a: [*const i8; TA],
        blocks: usize,
    ) -> [[i32; TA]; WR] {
        // SAFETY: the trait's contract (features present, pointers valid) is passed on.
        unsafe { tile_avx512(w, a, blocks) }
    }
}

/// Bytes ahead of the current block that the tile asks the cache to fetch.
const PREFETCH: usize = 2048;

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_avx512<const WR: usize, const TA: usize>(
    w: [*const u8; WR],
    a: [*const i8; TA],
    blocks: usize,
) -> [[i32; TA]; WR] {
    // Codes are masked in place, not shifted: with the block broadcast to both halves, the
    // low half keeps bits 1-0 (elements 0-31) and the high half bits 3-2 (elements 32-63, so
    // 4 × code) for `c01`; bits 5-4 and 7-6 (16× and 64×) for `c23`. Each scale lands in its
    // own lanes of its own accumulator and is divided out exactly at the end. Two `vpandq`
    // replace two `vpsrlvw` + two `vpandq` a block and row, which left the multiply port
    // waiting on shifts.
    let half = |lo: i8, hi: i8| {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_set1_epi8(lo)),
            _mm256_set1_epi8(hi),
        )
    };
    let mask01 = half(0x03, 0x0c);
    let mask23 = half(0x30, 0xc0u8 as i8);
    let mut acc01 = [[_mm512_setzero_si512(); TA]; WR];
    let mut acc23 = [[_mm512_setzero_si512(); TA]; WR];
    for b in 0..blocks {
        for i in 0..WR {
            // A hint to fetch ahead of the hardware prefetcher when weights stream from
            // memory (decode); past the end of the matrix it is a no-op: prefetches never
            // fault, and `wrapping_add` keeps the address computation defined.
            _mm_prefetch::<_MM_HINT_T0>(w[i].wrapping_add(b * 32 + PREFETCH).cast());
            // SAFETY: w[i] is valid for `blocks * 32` bytes (Tile contract) and b < blocks.
            let raw = unsafe { _mm256_loadu_si256(w[i].add(b * 32).cast()) };
            let raw = _mm512_broadcast_i64x4(raw);
            let c01 = _mm512_and_si512(raw, mask01);
            let c23 = _mm512_and_si512(raw, mask23);
            for j in 0..TA {
                // SAFETY: a[j] is valid for `blocks * 128` bytes (Tile contract).
                let (q01, q23) = unsafe {
                    let p = a[j].add(b * 128);
                    (
                        _mm512_loadu_si512(p.cast()),
                        _mm512_loadu_si512(p.add(64).cast()),
                    )
                };
                acc01[i][j] = _mm512_dpbusd_epi32(acc01[i][j], c01, q01);
                acc23[i][j] = _mm512_dpbusd_epi32(acc23[i][j], c23, q23);
            }
        }
    }
    let mut out = [[0i32; TA]; WR];
    for i in 0..WR {
        for j in 0..TA {
            out[i][j] = unscale(acc01[i][j], 0, 2) + unscale(acc23[i][j], 4, 6);
        }
    }
    out
}

/// `Σ lanes 0-7 >> lo + Σ lanes 8-15 >> hi`: the sums of codes that were `2^lo` and `2^hi`
/// times their value (exact: each lane is a multiple of its scale).
#[target_feature(enable = "avx512f")]
fn unscale(acc: __m512i, lo: u32, hi: u32) -> i32 {
    let shifts = _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set1_epi32(lo as i32)),
        _mm256_set1_epi32(hi as i32),
    );
    _mm512_reduce_add_epi32(_mm512_srav_epi32(acc, shifts))
}
