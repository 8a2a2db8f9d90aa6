//! The aarch64 chunk kernel: [`chunk_body`] with NEON dots, multiply-adds and exponentials
//! (NEON is part of every aarch64 CPU, so there is nothing to detect).

use super::super::exp::neon::exp4;
use super::{chunk_body, exp_tail, row_max, AttentionTask, ChunkRows};
use std::arch::aarch64::*;
use std::ops::Range;

/// The shared chunk loop with NEON.
pub(super) fn chunk_neon<T>(
    t: &AttentionTask<T>,
    span: Range<usize>,
    rows: ChunkRows<f32>,
    scores: &mut [f32],
    partial: &mut [f32],
) {
    chunk_body(t, span, rows, scores, partial, dot, axpy, exp_row)
}

/// Four accumulators of 4 lanes (16 floats a step, independent fused multiply-add chains),
/// added in pairs, then across lanes; a tail under 4 one by one.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    // SAFETY: every load is of elements below `n` of both slices; NEON is baseline.
    let mut s = unsafe {
        let mut acc = [vdupq_n_f32(0.0); 4];
        while i + 16 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                let j = i + 4 * k;
                *acc = vfmaq_f32(*acc, vld1q_f32(pa.add(j)), vld1q_f32(pb.add(j)));
            }
            i += 16;
        }
        while i + 4 <= n {
            acc[0] = vfmaq_f32(acc[0], vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
            i += 4;
        }
        vaddvq_f32(vaddq_f32(
            vaddq_f32(acc[0], acc[1]),
            vaddq_f32(acc[2], acc[3]),
        ))
    };
    for k in i..n {
        s += a[k] * b[k];
    }
    s
}

/// `out += w · v`, 16 floats a step.
#[inline(always)]
fn axpy(out: &mut [f32], w: f32, v: &[f32]) {
    let n = out.len().min(v.len());
    let (po, pv) = (out.as_mut_ptr(), v.as_ptr());
    let mut i = 0;
    // SAFETY: every access is of elements below `n` of both slices; NEON is baseline.
    unsafe {
        let vw = vdupq_n_f32(w);
        while i + 16 <= n {
            for k in (0..16).step_by(4) {
                let o = vfmaq_f32(vld1q_f32(po.add(i + k)), vw, vld1q_f32(pv.add(i + k)));
                vst1q_f32(po.add(i + k), o);
            }
            i += 16;
        }
        while i + 4 <= n {
            vst1q_f32(
                po.add(i),
                vfmaq_f32(vld1q_f32(po.add(i)), vw, vld1q_f32(pv.add(i))),
            );
            i += 4;
        }
    }
    for k in i..n {
        out[k] += w * v[k];
    }
}

/// [`super::exp_row_scalar`] with 4 exponentials at a time (the same bits each; the sum in
/// 4 lanes, then across them; a tail under 4 one by one after it).
#[inline(always)]
fn exp_row(s: &mut [f32]) -> (f32, f32) {
    let (n, p) = (s.len(), s.as_mut_ptr());
    let whole = n / 4 * 4;
    // SAFETY (both blocks): every access is of elements below `whole <= n`; NEON is baseline.
    let lanes = unsafe {
        let mut vmax = vdupq_n_f32(f32::NEG_INFINITY);
        for i in (0..whole).step_by(4) {
            vmax = vmaxq_f32(vmax, vld1q_f32(p.add(i)));
        }
        let mut lanes = [0f32; 4];
        vst1q_f32(lanes.as_mut_ptr(), vmax);
        lanes
    };
    let max = row_max(&s[whole..], &lanes);
    // SAFETY: as above.
    let sum = unsafe {
        let (vm, mut acc) = (vdupq_n_f32(max), vdupq_n_f32(0.0));
        for i in (0..whole).step_by(4) {
            let e = exp4(vsubq_f32(vld1q_f32(p.add(i)), vm));
            vst1q_f32(p.add(i), e);
            acc = vaddq_f32(acc, e);
        }
        vaddvq_f32(acc)
    };
    (max, exp_tail(&mut s[whole..], max, sum))
}

/// The NEON path (for tests).
#[cfg(test)]
pub(super) fn paths() -> Vec<(&'static str, super::AttendFn)> {
    vec![("neon", |t, s, o| {
        super::attend_with(t, s, o, |t, span, s, p| {
            let rows = t.chunk_rows(&span);
            chunk_neon(t, span, rows, s, p)
        })
    })]
}
