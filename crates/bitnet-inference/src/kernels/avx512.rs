//! AVX-512 kernel (F + BW + VNNI): one 32-byte packed block is broadcast to both halves of a
//! zmm register and shifted by a per-half amount (`vpsrlvw`), which gives the codes of 64
//! consecutive weights in natural order: elements 0-63 from shifts 0/2, 64-127 from 4/6.
//! `vpdpbusd` then multiplies them (unsigned, trit + 1) by 64 contiguous int8 activations
//! and adds groups of four products into int32 lanes without saturation, so no narrow
//! accumulator exists that could overflow. A row sum is bounded by `2·128·cols`, which fits
//! int32 for any width below 8 million columns.

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
    let mask = _mm512_set1_epi8(3);
    // Per 16-bit lane: the low 256 bits shift by the first amount, the high by the second.
    let shift01 = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(2));
    let shift23 = _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(6));
    let mut acc = [[_mm512_setzero_si512(); TA]; WR];
    for b in 0..blocks {
        for i in 0..WR {
            // A hint to fetch ahead of the hardware prefetcher when weights stream from
            // memory (decode); past the end of the matrix it is a no-op: prefetches never
            // fault, and `wrapping_add` keeps the address computation defined.
            _mm_prefetch::<_MM_HINT_T0>(w[i].wrapping_add(b * 32 + PREFETCH).cast());
            // SAFETY: w[i] is valid for `blocks * 32` bytes (Tile contract) and b < blocks.
            let raw = unsafe { _mm256_loadu_si256(w[i].add(b * 32).cast()) };
            let raw = _mm512_broadcast_i64x4(raw);
            let c01 = _mm512_and_si512(_mm512_srlv_epi16(raw, shift01), mask);
            let c23 = _mm512_and_si512(_mm512_srlv_epi16(raw, shift23), mask);
            for j in 0..TA {
                // SAFETY: a[j] is valid for `blocks * 128` bytes (Tile contract).
                let (q01, q23) = unsafe {
                    let p = a[j].add(b * 128);
                    (
                        _mm512_loadu_si512(p.cast()),
                        _mm512_loadu_si512(p.add(64).cast()),
                    )
                };
                acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], c01, q01);
                acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], c23, q23);
            }
        }
    }
    let mut out = [[0i32; TA]; WR];
    for i in 0..WR {
        for j in 0..TA {
            out[i][j] = _mm512_reduce_add_epi32(acc[i][j]);
        }
    }
    out
}
