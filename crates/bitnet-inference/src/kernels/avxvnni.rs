//! AVX-VNNI kernel (the 256-bit VEX form): `vpdpbusd` multiplies unsigned codes (trit + 1)
//! by signed int8 activations and adds groups of four products straight into int32 lanes,
//! without saturation, so no int16 stage exists that could overflow. A row sum is bounded by
//! `2·128·cols`, which fits int32 for any width below 8 million columns.

use super::avx2::hsum256;
use super::tiles::{self, Tile};
use super::{QuantizedActivations, TernaryKernel, TernaryMatrix};
use std::arch::x86_64::*;
use std::ops::Range;

/// Needs AVX2 and AVX-VNNI; construct only through `available_kernels`.
pub struct AvxVnniKernel(());

impl AvxVnniKernel {
    pub(super) fn detect() -> Option<Self> {
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni"))
            .then_some(Self(()))
    }
}

impl TernaryKernel for AvxVnniKernel {
    fn name(&self) -> &'static str {
        "avxvnni"
    }

    fn ternary_dot(
        &self,
        weights: &TernaryMatrix,
        rows: Range<usize>,
        acts: &QuantizedActivations,
        out: &mut [i32],
    ) {
        // SAFETY: an `AvxVnniKernel` exists only where AVX2 and AVX-VNNI were detected.
        unsafe { tiles::run::<AvxVnni>(weights, rows, acts, out) }
    }
}

struct AvxVnni;

impl Tile for AvxVnni {
    #[inline(always)]
    unsafe fn tile<const WR: usize, const TA: usize>(
        w: [*const u8; WR],
        a: [*const i8; TA],
        blocks: usize,
    ) -> [[i32; TA]; WR] {
        // SAFETY: the trait's contract (features present, pointers valid) is passed on.
        unsafe { tile_avxvnni(w, a, blocks) }
    }
}

/// Bytes ahead of the current block that the tile asks the cache to fetch.
const PREFETCH: usize = 2048;

#[target_feature(enable = "avx2,avxvnni")]
unsafe fn tile_avxvnni<const WR: usize, const TA: usize>(
    w: [*const u8; WR],
    a: [*const i8; TA],
    blocks: usize,
) -> [[i32; TA]; WR] {
    let mask = _mm256_set1_epi8(3);
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
                for (g, &c) in c.iter().enumerate() {
                    // SAFETY: a[j] is valid for `blocks * 128` bytes (Tile contract).
                    let q = unsafe { _mm256_loadu_si256(a[j].add(b * 128 + 32 * g).cast()) };
                    acc[i][j] = _mm256_dpbusd_avx_epi32(acc[i][j], c, q);
                }
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
