//! AArch64 NEON kernels. A packed block is two 16-byte vectors; shifting them by 2·g and
//! masking gives the codes (trit + 1) of weights `32g .. 32g+32` in natural order.
//!
//! * `neon-dotprod`: `sdot` (inline `asm!`, the intrinsic is unstable) adds groups of four
//!   int8 products into int32 lanes; codes are 0..=2 so they are valid signed bytes. No
//!   narrow accumulator exists.
//! * `neon`: `smull`/`smlal2` widen products to int16 (two products a lane: at most
//!   `2·2·128 = 512` in magnitude, for any codes and int8 activations), then `sadalp` adds
//!   pairs into int32 lanes. Nothing is accumulated in int16 beyond those two products.
//!
//! Row sums are bounded by `2·128·cols`, which fits int32 for any width below 8 million.

use super::tiles::{self, Tile};
use super::{QuantizedActivations, TernaryKernel, TernaryMatrix};
use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

/// Each int32 lane of `acc` plus the products of its four signed byte pairs of `x` and `y`:
/// `sdot` (inline `asm!`, the intrinsic is unstable). Shared by every kernel that has a
/// dotprod path.
///
/// # Safety
/// Only inlined into functions compiled with dotprod, run where the CPU has it.
#[inline(always)]
pub(crate) unsafe fn sdot(acc: int32x4_t, x: int8x16_t, y: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: `sdot` only reads and writes these registers; dotprod per the contract.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {x:v}.16b, {y:v}.16b",
            acc = inout(vreg) acc,
            x = in(vreg) x,
            y = in(vreg) y,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// NEON with the dot-product extension; construct only through `available_kernels`.
pub struct NeonDotKernel(());

impl NeonDotKernel {
    pub(super) fn detect() -> Option<Self> {
        (std::arch::is_aarch64_feature_detected!("neon")
            && std::arch::is_aarch64_feature_detected!("dotprod"))
        .then_some(Self(()))
    }
}

/// Plain NEON (every AArch64 CPU has it; still checked).
pub struct NeonKernel(());

impl NeonKernel {
    pub(super) fn detect() -> Option<Self> {
        std::arch::is_aarch64_feature_detected!("neon").then_some(Self(()))
    }
}

impl TernaryKernel for NeonDotKernel {
    fn name(&self) -> &'static str {
        "neon-dotprod"
    }

    fn ternary_dot(
        &self,
        weights: &TernaryMatrix,
        rows: Range<usize>,
        acts: &QuantizedActivations,
        out: &mut [i32],
    ) {
        // SAFETY: a `NeonDotKernel` exists only where NEON and dotprod were detected.
        unsafe { tiles::run::<Dot>(weights, rows, acts, out) }
    }
}

impl TernaryKernel for NeonKernel {
    fn name(&self) -> &'static str {
        "neon"
    }

    fn ternary_dot(
        &self,
        weights: &TernaryMatrix,
        rows: Range<usize>,
        acts: &QuantizedActivations,
        out: &mut [i32],
    ) {
        // SAFETY: a `NeonKernel` exists only where NEON was detected.
        unsafe { tiles::run::<Widen>(weights, rows, acts, out) }
    }
}

struct Dot;
struct Widen;

impl Tile for Dot {
    #[inline(always)]
    unsafe fn tile<const WR: usize, const TA: usize>(
        w: [*const u8; WR],
        a: [*const i8; TA],
        blocks: usize,
    ) -> [[i32; TA]; WR] {
        // SAFETY: the trait's contract (features present, pointers valid) is passed on.
        unsafe { tile_dot(w, a, blocks) }
    }
}

impl Tile for Widen {
    #[inline(always)]
    unsafe fn tile<const WR: usize, const TA: usize>(
        w: [*const u8; WR],
        a: [*const i8; TA],
        blocks: usize,
    ) -> [[i32; TA]; WR] {
        // SAFETY: the trait's contract (NEON present, pointers valid) is passed on.
        unsafe { tile_widen(w, a, blocks) }
    }
}

/// The eight code vectors of one block: `[g * 2 + h]` holds weights `32g + 16h ..+16`.
#[inline(always)]
unsafe fn decode(p: *const u8) -> [int8x16_t; 8] {
    // SAFETY: the caller passes a pointer valid for 32 bytes.
    let (lo, hi) = unsafe { (vld1q_u8(p), vld1q_u8(p.add(16))) };
    let m = vdupq_n_u8(3);
    let s = |v: uint8x16_t| vreinterpretq_s8_u8(vandq_u8(v, m));
    [
        s(lo),
        s(hi),
        s(vshrq_n_u8::<2>(lo)),
        s(vshrq_n_u8::<2>(hi)),
        s(vshrq_n_u8::<4>(lo)),
        s(vshrq_n_u8::<4>(hi)),
        vreinterpretq_s8_u8(vshrq_n_u8::<6>(lo)),
        vreinterpretq_s8_u8(vshrq_n_u8::<6>(hi)),
    ]
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn tile_dot<const WR: usize, const TA: usize>(
    w: [*const u8; WR],
    a: [*const i8; TA],
    blocks: usize,
) -> [[i32; TA]; WR] {
    let mut acc = [[vdupq_n_s32(0); TA]; WR];
    for b in 0..blocks {
        for i in 0..WR {
            // SAFETY: w[i] is valid for `blocks * 32` bytes (Tile contract) and b < blocks.
            let c = unsafe { decode(w[i].add(b * 32)) };
            for j in 0..TA {
                let mut s = acc[i][j];
                for (k, &c) in c.iter().enumerate() {
                    // SAFETY: a[j] is valid for `blocks * 128` bytes (Tile contract).
                    let q = unsafe { vld1q_s8(a[j].add(b * 128 + 16 * k)) };
                    // SAFETY: this function is compiled with (and only run where the CPU
                    // has) dotprod.
                    s = unsafe { sdot(s, c, q) };
                }
                acc[i][j] = s;
            }
        }
    }
    let mut out = [[0i32; TA]; WR];
    for i in 0..WR {
        for j in 0..TA {
            out[i][j] = vaddvq_s32(acc[i][j]);
        }
    }
    out
}

#[target_feature(enable = "neon")]
unsafe fn tile_widen<const WR: usize, const TA: usize>(
    w: [*const u8; WR],
    a: [*const i8; TA],
    blocks: usize,
) -> [[i32; TA]; WR] {
    let mut acc = [[vdupq_n_s32(0); TA]; WR];
    for b in 0..blocks {
        for i in 0..WR {
            // SAFETY: w[i] is valid for `blocks * 32` bytes (Tile contract) and b < blocks.
            let c = unsafe { decode(w[i].add(b * 32)) };
            for j in 0..TA {
                for (k, &c) in c.iter().enumerate() {
                    // SAFETY: a[j] is valid for `blocks * 128` bytes (Tile contract).
                    let q = unsafe { vld1q_s8(a[j].add(b * 128 + 16 * k)) };
                    // Two products a lane: |p| ≤ 512 (module comment).
                    let p = vmull_s8(vget_low_s8(c), vget_low_s8(q));
                    let p = vmlal_high_s8(p, c, q);
                    acc[i][j] = vpadalq_s16(acc[i][j], p);
                }
            }
        }
    }
    let mut out = [[0i32; TA]; WR];
    for i in 0..WR {
        for j in 0..TA {
            out[i][j] = vaddvq_s32(acc[i][j]);
        }
    }
    out
}
