//! NEON group tiles: 16 bytes of a chunk at a time, whose four 32-bit lanes hold subgroups
//! 0-3 (first 16 bytes of each 32-byte quarter) or 4-7 (second 16 bytes), so each (row,
//! token) keeps two int32 accumulators a chunk, one per half of the subgroups.
//!
//! * with dotprod: `sdot` adds groups of four int8 products straight into int32 lanes (codes
//!   0..=2 are valid signed bytes); no narrow accumulator exists.
//! * plain NEON: `smull`/`smull2` products, pairs added by `addp` (lane `k` then holds bytes
//!   `2k, 2k+1`), the four fields added in int16 (8 products a lane, at most `8·256 = 2048`
//!   in magnitude), then `sadalp` adds lane pairs, i.e. bytes `4l..4l+3`, into int32 lane `l`.

use super::GroupTile;
use crate::kernels::neon::sdot;
use std::arch::aarch64::*;
use std::arch::asm;

/// NEON with dotprod.
pub(super) struct NeonDot;
/// Plain NEON.
pub(super) struct Neon;

impl GroupTile for NeonDot {
    #[inline(always)]
    unsafe fn tile<const WR: usize, const TA: usize, const F16: bool, const G128: bool>(
        w: [*const u8; WR],
        s: [*const u8; WR],
        a: [*const u8; TA],
        init: [*const i32; TA],
        chunks: usize,
    ) -> [[f32; TA]; WR] {
        // SAFETY: the trait's contract (NEON and dotprod present, pointers valid).
        unsafe { tile_dot::<WR, TA, F16, G128>(w, s, a, init, chunks) }
    }
}

impl GroupTile for Neon {
    #[inline(always)]
    unsafe fn tile<const WR: usize, const TA: usize, const F16: bool, const G128: bool>(
        w: [*const u8; WR],
        s: [*const u8; WR],
        a: [*const u8; TA],
        init: [*const i32; TA],
        chunks: usize,
    ) -> [[f32; TA]; WR] {
        // SAFETY: the trait's contract (NEON present, pointers valid).
        unsafe { tile_widen::<WR, TA, F16, G128>(w, s, a, init, chunks) }
    }
}

/// The four code vectors (fields 0-3) of 16 packed bytes.
#[inline(always)]
unsafe fn codes(p: *const u8) -> [int8x16_t; 4] {
    // SAFETY: the caller passes a pointer valid for 16 bytes.
    let raw = unsafe { vld1q_u8(p) };
    let m = vdupq_n_u8(3);
    [
        vreinterpretq_s8_u8(vandq_u8(raw, m)),
        vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8::<2>(raw), m)),
        vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8::<4>(raw), m)),
        vreinterpretq_s8_u8(vshrq_n_u8::<6>(raw)),
    ]
}

/// Offset of the activations that meet field `f` of bytes `32m + 16n ..+16` of chunk `c`
/// (the module docs of `group`).
#[inline(always)]
fn act_offset(c: usize, m: usize, n: usize, f: usize) -> usize {
    c * 512 + 256 * (m / 2) + 64 * f + 32 * (m % 2) + 16 * n
}

/// Four f16 values widened to f32 (`fcvtl`, in every AArch64 NEON unit; written in `asm!`
/// because the intrinsic is unstable).
#[inline(always)]
unsafe fn widen_f16(h: uint16x4_t) -> float32x4_t {
    let out: float32x4_t;
    // SAFETY: `fcvtl` only reads and writes these registers.
    unsafe {
        asm!(
            "fcvtl {o:v}.4s, {i:v}.4h",
            o = out(vreg) out,
            i = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    out
}

/// The four scales at `k` (f16 if `F16`, else f32).
///
/// # Safety
/// `s` holds at least `k + 4` scales.
#[inline(always)]
unsafe fn scales4<const F16: bool>(s: *const u8, k: usize) -> float32x4_t {
    // SAFETY: in bounds (the caller).
    unsafe {
        if F16 {
            widen_f16(vld1_u16(s.cast::<u16>().add(k)))
        } else {
            vld1q_f32(s.cast::<f32>().add(k))
        }
    }
}

/// Adds chunk `c`'s products to the partials `acc` (`[0]`: partials 0-3, `[1]`: 4-7) from its
/// exact subgroup dots `d` (`[0]`: subgroups 0-3, `[1]`: 4-7; `Σ code·q − Σq`, the sums of
/// groups in their first subgroup), in the fixed order: at 64 group `8c + l` is subgroup
/// `l`; at 128 the chunk's groups `4c..4c+4` are subgroup pairs and go to partials 0-3 (even
/// `c`) or 4-7 (odd).
///
/// # Safety
/// `s` holds whole vectors of 8 scales covering chunk `c`.
#[inline(always)]
unsafe fn add_groups<const F16: bool, const G128: bool>(
    acc: &mut [float32x4_t; 2],
    d: [int32x4_t; 2],
    s: *const u8,
    c: usize,
) {
    // SAFETY: in bounds (the caller).
    unsafe {
        if G128 {
            let g = vcvtq_f32_s32(vpaddq_s32(d[0], d[1]));
            let h = c % 2;
            acc[h] = vaddq_f32(acc[h], vmulq_f32(g, scales4::<F16>(s, 4 * c)));
        } else {
            for (h, (acc, d)) in acc.iter_mut().zip(d).enumerate() {
                let x = vcvtq_f32_s32(d);
                *acc = vaddq_f32(*acc, vmulq_f32(x, scales4::<F16>(s, 8 * c + 4 * h)));
            }
        }
    }
}

/// `((p0+p4) + (p2+p6)) + ((p1+p5) + (p3+p7))`, the fixed order's fold.
#[inline(always)]
fn fold8(acc: [float32x4_t; 2]) -> f32 {
    // SAFETY: NEON is part of every AArch64 target this module is built for.
    let s: [f32; 4] = unsafe { std::mem::transmute(vaddq_f32(acc[0], acc[1])) };
    (s[0] + s[2]) + (s[1] + s[3])
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn tile_dot<const WR: usize, const TA: usize, const F16: bool, const G128: bool>(
    w: [*const u8; WR],
    s: [*const u8; WR],
    a: [*const u8; TA],
    init: [*const i32; TA],
    chunks: usize,
) -> [[f32; TA]; WR] {
    let mut acc = [[[vdupq_n_f32(0.0); 2]; TA]; WR];
    for c in 0..chunks {
        // Each (row, token) starts the chunk from the token's `−Σq` lanes.
        let mut d = [[[vdupq_n_s32(0); 2]; TA]; WR];
        for (j, &init) in init.iter().enumerate() {
            // SAFETY: init holds 8 sums a chunk (trait contract).
            let start = unsafe { [vld1q_s32(init.add(8 * c)), vld1q_s32(init.add(8 * c + 4))] };
            for d in d.iter_mut() {
                d[j] = start;
            }
        }
        for m in 0..4 {
            for n in 0..2 {
                for i in 0..WR {
                    // SAFETY: w[i] is valid for `chunks * 128` bytes (trait contract).
                    let k = unsafe { codes(w[i].add(c * 128 + 32 * m + 16 * n)) };
                    for j in 0..TA {
                        let mut v = d[i][j][n];
                        for (f, &k) in k.iter().enumerate() {
                            // SAFETY: a[j] is valid for `chunks * 512` bytes (trait contract);
                            // dotprod is enabled here and present (the caller).
                            v = unsafe {
                                let q = vld1q_s8(a[j].add(act_offset(c, m, n, f)).cast());
                                sdot(v, k, q)
                            };
                        }
                        d[i][j][n] = v;
                    }
                }
            }
        }
        for i in 0..WR {
            for j in 0..TA {
                // SAFETY: the scales cover chunk c (trait contract).
                unsafe { add_groups::<F16, G128>(&mut acc[i][j], d[i][j], s[i], c) };
            }
        }
    }
    acc.map(|row| row.map(fold8))
}

#[target_feature(enable = "neon")]
unsafe fn tile_widen<const WR: usize, const TA: usize, const F16: bool, const G128: bool>(
    w: [*const u8; WR],
    s: [*const u8; WR],
    a: [*const u8; TA],
    init: [*const i32; TA],
    chunks: usize,
) -> [[f32; TA]; WR] {
    let mut acc = [[[vdupq_n_f32(0.0); 2]; TA]; WR];
    for c in 0..chunks {
        // Each (row, token) starts the chunk from the token's `−Σq` lanes.
        let mut d = [[[vdupq_n_s32(0); 2]; TA]; WR];
        for (j, &init) in init.iter().enumerate() {
            // SAFETY: init holds 8 sums a chunk (trait contract).
            let start = unsafe { [vld1q_s32(init.add(8 * c)), vld1q_s32(init.add(8 * c + 4))] };
            for d in d.iter_mut() {
                d[j] = start;
            }
        }
        for m in 0..4 {
            for n in 0..2 {
                for i in 0..WR {
                    // SAFETY: w[i] is valid for `chunks * 128` bytes (trait contract).
                    let k = unsafe { codes(w[i].add(c * 128 + 32 * m + 16 * n)) };
                    for j in 0..TA {
                        let mut p16 = vdupq_n_s16(0);
                        for (f, &k) in k.iter().enumerate() {
                            // SAFETY: a[j] is valid for `chunks * 512` bytes (trait contract).
                            let q = unsafe { vld1q_s8(a[j].add(act_offset(c, m, n, f)).cast()) };
                            let lo = vmull_s8(vget_low_s8(k), vget_low_s8(q));
                            let hi = vmull_high_s8(k, q);
                            p16 = vaddq_s16(p16, vpaddq_s16(lo, hi));
                        }
                        d[i][j][n] = vpadalq_s16(d[i][j][n], p16);
                    }
                }
            }
        }
        for i in 0..WR {
            for j in 0..TA {
                // SAFETY: the scales cover chunk c (trait contract).
                unsafe { add_groups::<F16, G128>(&mut acc[i][j], d[i][j], s[i], c) };
            }
        }
    }
    acc.map(|row| row.map(fold8))
}
