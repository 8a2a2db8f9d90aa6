//! NEON group tiles: 16 bytes of a chunk at a time; quarter `k` of each 64-byte unit holds
//! subgroups `4k..4k+4` in its four 32-bit lanes (of a half chunk, `4·(k mod 2)..`), so each
//! (row, token) keeps four int32 accumulators a chunk (two a half chunk) and four vectors
//! of the 16 partials.
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
        full: usize,
        half: bool,
    ) -> [[f32; TA]; WR] {
        // SAFETY: the trait's contract (NEON and dotprod present, pointers valid).
        unsafe { tile_dot::<WR, TA, F16, G128>(w, s, a, init, full, half) }
    }
}

impl GroupTile for Neon {
    #[inline(always)]
    unsafe fn tile<const WR: usize, const TA: usize, const F16: bool, const G128: bool>(
        w: [*const u8; WR],
        s: [*const u8; WR],
        a: [*const u8; TA],
        init: [*const i32; TA],
        full: usize,
        half: bool,
    ) -> [[f32; TA]; WR] {
        // SAFETY: the trait's contract (NEON present, pointers valid).
        unsafe { tile_widen::<WR, TA, F16, G128>(w, s, a, init, full, half) }
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

/// The scales of subgroups `4k..4k+4` of (half) chunk `c` in the lanes of their groups'
/// first subgroups, 0 elsewhere.
///
/// # Safety
/// The scales cover the chunk in whole vectors of 8.
#[inline(always)]
unsafe fn scales_at<const F16: bool, const G128: bool>(
    s: *const u8,
    c: usize,
    k: usize,
) -> float32x4_t {
    // SAFETY: in bounds (the caller).
    unsafe {
        if G128 {
            // Groups 8c + 2k, 8c + 2k + 1 to lanes 0 and 2.
            let four = scales4::<F16>(s, 8 * c + 4 * (k / 2));
            let zero = vdupq_n_f32(0.0);
            if k.is_multiple_of(2) {
                vzip1q_f32(four, zero)
            } else {
                vzip2q_f32(four, zero)
            }
        } else {
            scales4::<F16>(s, 16 * c + 4 * k)
        }
    }
}

/// Adds the exact subgroup dots `d` (`Σ code·q − Σq` of subgroups `4k..4k+4`) times their
/// scales `sc` to the partials `acc` (at 128, subgroup pairs first: lane 2m gets 2m + 2m+1).
#[inline(always)]
fn add_groups<const G128: bool>(acc: float32x4_t, d: int32x4_t, sc: float32x4_t) -> float32x4_t {
    // SAFETY: NEON is part of every AArch64 target this module is built for.
    unsafe {
        let d = if G128 {
            vaddq_s32(d, vrev64q_s32(d))
        } else {
            d
        };
        vaddq_f32(acc, vmulq_f32(vcvtq_f32_s32(d), sc))
    }
}

/// `q = p[0..4] + p[8..12]`, `p[4..8] + p[12..16]`, then `((q0+q4) + (q2+q6)) + ((q1+q5) +
/// (q3+q7))`: the fixed order's fold.
#[inline(always)]
fn fold16(acc: [float32x4_t; 4]) -> f32 {
    // SAFETY: NEON is part of every AArch64 target this module is built for.
    let s: [f32; 4] = unsafe {
        let q0 = vaddq_f32(acc[0], acc[2]);
        let q1 = vaddq_f32(acc[1], acc[3]);
        std::mem::transmute(vaddq_f32(q0, q1))
    };
    (s[0] + s[2]) + (s[1] + s[3])
}

/// The 16-byte quarters of a chunk (`tail`: a half chunk) at byte `base` as (byte offset,
/// accumulator): quarter `k` of unit `u` holds subgroups `4k..4k+4` (of a half chunk, `4·(k
/// mod 2)..`).
fn quarters(base: usize, tail: bool) -> impl Iterator<Item = (usize, usize)> {
    let units = if tail { 2 } else { 4 };
    (0..units).flat_map(move |u| {
        (0..4).map(move |k| (base + 64 * u + 16 * k, if tail { k % 2 } else { k }))
    })
}

/// The activations that meet field `f` of the 16 bytes at byte `at` of a row.
#[inline(always)]
fn act_offset(at: usize, f: usize) -> usize {
    4 * (at - at % 64) + 64 * f + at % 64
}

macro_rules! group_tile {
    ($name:ident, $features:literal, $dots:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const WR: usize, const TA: usize, const F16: bool, const G128: bool>(
            w: [*const u8; WR],
            s: [*const u8; WR],
            a: [*const u8; TA],
            init: [*const i32; TA],
            full: usize,
            half: bool,
        ) -> [[f32; TA]; WR] {
            let mut acc = [[[vdupq_n_f32(0.0); 4]; TA]; WR];
            let steps = (0..full)
                .map(|c| (c, false))
                .chain(half.then_some((full, true)));
            for (c, tail) in steps {
                // Each (row, token) starts from the token's `−Σq` lanes.
                let n = if tail { 2 } else { 4 };
                let mut d = [[[vdupq_n_s32(0); 4]; TA]; WR];
                for (j, &init) in init.iter().enumerate() {
                    for k in 0..n {
                        // SAFETY: init holds one sum a subgroup (trait contract).
                        let start = unsafe { vld1q_s32(init.add(16 * c + 4 * k)) };
                        for d in d.iter_mut() {
                            d[j][k] = start;
                        }
                    }
                }
                for (at, k) in quarters(256 * c, tail) {
                    for i in 0..WR {
                        // SAFETY: the (half) chunk's bytes are in bounds (trait contract).
                        let codes = unsafe { codes(w[i].add(at)) };
                        for j in 0..TA {
                            // SAFETY: as above; the features are enabled here.
                            d[i][j][k] = unsafe { $dots(d[i][j][k], codes, a[j], at) };
                        }
                    }
                }
                for i in 0..WR {
                    for k in 0..n {
                        // SAFETY: the scales cover the chunk (trait contract).
                        let sc = unsafe { scales_at::<F16, G128>(s[i], c, k) };
                        for j in 0..TA {
                            acc[i][j][k] = add_groups::<G128>(acc[i][j][k], d[i][j][k], sc);
                        }
                    }
                }
            }
            acc.map(|row| row.map(fold16))
        }
    };
}

/// `d` plus the products of the four code vectors of 16 bytes at byte `at` with their
/// activations, by `sdot`.
///
/// # Safety
/// `a` is valid for the activations of those bytes; the CPU has dotprod.
#[inline(always)]
unsafe fn dot_sdot(d: int32x4_t, codes: [int8x16_t; 4], a: *const u8, at: usize) -> int32x4_t {
    let mut d = d;
    for (f, &k) in codes.iter().enumerate() {
        // SAFETY: in bounds and dotprod present (the caller).
        d = unsafe { sdot(d, k, vld1q_s8(a.add(act_offset(at, f)).cast())) };
    }
    d
}

/// [`dot_sdot`] with widening multiplies: the four fields' products added in int16 (8 a
/// lane, at most 2048 in magnitude), then pairs of lanes (bytes `4l..4l+4`) into lane `l`.
///
/// # Safety
/// `a` is valid for the activations of those bytes.
#[inline(always)]
unsafe fn dot_widen(d: int32x4_t, codes: [int8x16_t; 4], a: *const u8, at: usize) -> int32x4_t {
    // SAFETY: in bounds (the caller); NEON is baseline.
    unsafe {
        let mut p16 = vdupq_n_s16(0);
        for (f, &k) in codes.iter().enumerate() {
            let q = vld1q_s8(a.add(act_offset(at, f)).cast());
            let lo = vmull_s8(vget_low_s8(k), vget_low_s8(q));
            let hi = vmull_high_s8(k, q);
            p16 = vaddq_s16(p16, vpaddq_s16(lo, hi));
        }
        vpadalq_s16(d, p16)
    }
}

group_tile!(tile_dot, "neon,dotprod", dot_sdot);
group_tile!(tile_widen, "neon", dot_widen);
