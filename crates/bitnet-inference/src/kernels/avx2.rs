//! AVX2 kernel: `vpmaddubsw` of unsigned codes (trit + 1) with signed int8 activations,
//! then `vpmaddwd` by ones into int32 accumulators.
//!
//! Overflow: `vpmaddubsw` saturates int16, but one of its pairs is at most
//! `2·128 + 2·128 = 512` in magnitude (codes ≤ 2, |q| ≤ 128), so it never saturates. The
//! four products of one block (one per 32-weight group) are added in int16 before widening:
//! at most `4·512 = 2048`, far from 32767, for any codes and any int8 activations. Everything
//! after `vpmaddwd` is int32; a row sum is bounded by `2·128·cols`, which fits int32 for any
//! width below 8 million columns.

use super::tiles::{self, Tile};
use super::{QuantizedActivations, TernaryKernel, TernaryMatrix};
use std::arch::x86_64::*;
use std::ops::Range;

/// Needs AVX2; construct only through `available_kernels`, which checks the CPU.
pub struct Avx2Kernel(());

impl Avx2Kernel {
    pub(super) fn detect() -> Option<Self> {
        is_x86_feature_detected!("avx2").then_some(Self(()))
    }
}

impl TernaryKernel for Avx2Kernel {
    fn name(&self) -> &'static str {
        "avx2"
    }

    fn ternary_dot(
        &self,
        weights: &TernaryMatrix,
        rows: Range<usize>,
        acts: &QuantizedActivations,
        out: &mut [i32],
    ) {
        // SAFETY: an `Avx2Kernel` exists only where AVX2 was detected (`detect`).
        unsafe { tiles::run::<Avx2>(weights, rows, acts, out) }
    }
}

struct Avx2;

impl Tile for Avx2 {
    #[inline(always)]
    unsafe fn tile<const WR: usize, const TA: usize>(
        w: [*const u8; WR],
        a: [*const i8; TA],
        blocks: usize,
    ) -> [[i32; TA]; WR] {
        // SAFETY: the trait's contract (AVX2 present, pointers valid) is passed on.
        unsafe { tile_avx2(w, a, blocks) }
    }
}

/// Bytes ahead of the current block that the tile asks the cache to fetch.
const PREFETCH: usize = 2048;

#[target_feature(enable = "avx2")]
unsafe fn tile_avx2<const WR: usize, const TA: usize>(
    w: [*const u8; WR],
    a: [*const i8; TA],
    blocks: usize,
) -> [[i32; TA]; WR] {
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); TA]; WR];
    for b in 0..blocks {
        for i in 0..WR {
            // A hint to fetch ahead of the hardware prefetcher when weights stream from
            // memory (decode); past the end of the matrix it is a no-op: prefetches never
            // fault, and `wrapping_add` keeps the address computation defined.
            _mm_prefetch::<_MM_HINT_T0>(w[i].wrapping_add(b * 32 + PREFETCH).cast());
            // SAFETY: w[i] is valid for `blocks * 32` bytes (Tile contract) and b < blocks.
            let raw = unsafe { _mm256_loadu_si256(w[i].add(b * 32).cast()) };
            let c = [
                _mm256_and_si256(raw, mask),
                _mm256_and_si256(_mm256_srli_epi16::<2>(raw), mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask),
                _mm256_and_si256(_mm256_srli_epi16::<6>(raw), mask),
            ];
            for j in 0..TA {
                // SAFETY: a[j] is valid for `blocks * 128` bytes (Tile contract), b < blocks.
                let q = |g: usize| unsafe { _mm256_loadu_si256(a[j].add(b * 128 + 32 * g).cast()) };
                // int16 sums of at most 4 · 512 (see the module comment).
                let p01 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(c[0], q(0)),
                    _mm256_maddubs_epi16(c[1], q(1)),
                );
                let p23 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(c[2], q(2)),
                    _mm256_maddubs_epi16(c[3], q(3)),
                );
                let p = _mm256_add_epi16(p01, p23);
                acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(p, ones));
            }
        }
    }
    let mut out = [[0i32; TA]; WR];
    for i in 0..WR {
        for j in 0..TA {
            out[i][j] = hsum256(acc[i][j]);
        }
    }
    out
}

#[target_feature(enable = "avx2")]
pub(super) fn hsum256(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}
