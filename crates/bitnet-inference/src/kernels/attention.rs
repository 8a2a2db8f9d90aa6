//! Causal attention of one token over its cache for one group of query heads that share a
//! KV head (GQA), in f32: `softmax(q·kᵀ·scale) · v` with the max subtracted before `exp`.
//!
//! Each K and V row is read once for all query heads of the group. The q·k dots and the V
//! accumulation use AVX-512 or AVX2+FMA where the CPU has them (chosen at run time); `exp`
//! and the softmax sum are the scalar ones on every path, so the paths differ only by the
//! order of the float additions in the dots and by fused multiply-adds.

/// One (token, KV head) task.
pub struct AttentionTask<'a> {
    /// `group` query heads of `head_dim` floats each, contiguous.
    pub q: &'a [f32],
    /// The cache of this layer and the KV head: row `p` starts at `p * stride`.
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub stride: usize,
    /// Positions `0..n_pos` are attended to.
    pub n_pos: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Writes the `group` heads' outputs to `out` (`group * head_dim`, the layout of `q`);
/// `scores` is scratch and is resized to `group * n_pos`.
pub fn attend(task: &AttentionTask, scores: &mut Vec<f32>, out: &mut [f32]) {
    check(task, out);
    scores.resize(task.q.len() / task.head_dim * task.n_pos, 0.0);
    #[cfg(target_arch = "x86_64")]
    {
        match x86::level() {
            // SAFETY: the level was detected on this CPU; `check` validated the sizes.
            x86::Level::Avx512 => return unsafe { x86::attend_512(task, scores, out) },
            // SAFETY: as above.
            x86::Level::Avx2 => return unsafe { x86::attend_256(task, scores, out) },
            x86::Level::Scalar => {}
        }
    }
    attend_body(task, scores, out, dot_scalar, axpy_scalar)
}

/// The portable path (for tests and CPUs without the vector units).
pub fn attend_scalar(task: &AttentionTask, scores: &mut Vec<f32>, out: &mut [f32]) {
    check(task, out);
    scores.resize(task.q.len() / task.head_dim * task.n_pos, 0.0);
    attend_body(task, scores, out, dot_scalar, axpy_scalar)
}

fn check(t: &AttentionTask, out: &[f32]) {
    let d = t.head_dim;
    assert!(
        d > 0 && t.q.len().is_multiple_of(d),
        "attention: q of whole heads"
    );
    assert_eq!(out.len(), t.q.len(), "attention output size");
    assert!(t.n_pos > 0 && t.stride >= d, "attention positions");
    let need = (t.n_pos - 1) * t.stride + d;
    assert!(
        t.keys.len() >= need && t.values.len() >= need,
        "attention cache size"
    );
}

/// The shared loop: scores, softmax, weighted sum of V rows. `dot(a, b)` and
/// `axpy(out, w, v)` (`out += w·v`) are the only vector operations.
#[inline(always)]
fn attend_body(
    t: &AttentionTask,
    scores: &mut [f32],
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
    axpy: impl Fn(&mut [f32], f32, &[f32]),
) {
    let (d, n) = (t.head_dim, t.n_pos);
    let group = t.q.len() / d;
    for p in 0..n {
        let k = &t.keys[p * t.stride..p * t.stride + d];
        for h in 0..group {
            scores[h * n + p] = dot(&t.q[h * d..(h + 1) * d], k) * t.scale;
        }
    }
    for h in 0..group {
        let s = &mut scores[h * n..(h + 1) * n];
        let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0f32;
        for v in s.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in s.iter_mut() {
            *v /= sum;
        }
    }
    out.fill(0.0);
    for p in 0..n {
        let v = &t.values[p * t.stride..p * t.stride + d];
        for h in 0..group {
            axpy(&mut out[h * d..(h + 1) * d], scores[h * n + p], v);
        }
    }
}

/// Eight independent accumulators (as the forward pass always summed).
#[inline(always)]
fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for i in 0..8 {
            acc[i] += a[c * 8 + i] * b[c * 8 + i];
        }
    }
    let mut tail = 0.0;
    for k in chunks * 8..a.len() {
        tail += a[k] * b[k];
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn axpy_scalar(out: &mut [f32], w: f32, v: &[f32]) {
    for (o, &x) in out.iter_mut().zip(v) {
        *o += w * x;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{attend_body, AttentionTask};
    use std::arch::x86_64::*;

    #[derive(Clone, Copy, PartialEq)]
    pub(super) enum Level {
        Scalar,
        Avx2,
        Avx512,
    }

    pub(super) fn level() -> Level {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            if is_x86_feature_detected!("avx512f") {
                Level::Avx512
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Level::Avx2
            } else {
                Level::Scalar
            }
        })
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend_512(t: &AttentionTask, scores: &mut [f32], out: &mut [f32]) {
        attend_body(
            t,
            scores,
            out,
            // SAFETY (both closures): they run inside this function, whose features the
            // caller guarantees; slice lengths bound every access.
            |a, b| unsafe { dot_512(a, b) },
            |o, w, v| unsafe { axpy_512(o, w, v) },
        )
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_256(t: &AttentionTask, scores: &mut [f32], out: &mut [f32]) {
        attend_body(
            t,
            scores,
            out,
            // SAFETY: as in `attend_512`.
            |a, b| unsafe { dot_256(a, b) },
            |o, w, v| unsafe { axpy_256(o, w, v) },
        )
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dot_512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        // SAFETY: every load is of elements below `n` of both slices.
        unsafe {
            while i + 32 <= n {
                s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
                s1 = _mm512_fmadd_ps(
                    _mm512_loadu_ps(pa.add(i + 16)),
                    _mm512_loadu_ps(pb.add(i + 16)),
                    s1,
                );
                i += 32;
            }
            if i + 16 <= n {
                s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
                i += 16;
            }
        }
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
        for k in i..n {
            s += a[k] * b[k];
        }
        s
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn axpy_512(out: &mut [f32], w: f32, v: &[f32]) {
        let n = out.len().min(v.len());
        let (po, pv) = (out.as_mut_ptr(), v.as_ptr());
        let vw = _mm512_set1_ps(w);
        let mut i = 0;
        // SAFETY: every access is of elements below `n` of both slices.
        unsafe {
            while i + 16 <= n {
                let o = _mm512_fmadd_ps(vw, _mm512_loadu_ps(pv.add(i)), _mm512_loadu_ps(po.add(i)));
                _mm512_storeu_ps(po.add(i), o);
                i += 16;
            }
        }
        for k in i..n {
            out[k] += w * v[k];
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_256(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        // SAFETY: every load is of elements below `n` of both slices.
        unsafe {
            while i + 16 <= n {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
                s1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i + 8)),
                    _mm256_loadu_ps(pb.add(i + 8)),
                    s1,
                );
                i += 16;
            }
            if i + 8 <= n {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
                i += 8;
            }
        }
        let v = _mm256_add_ps(s0, s1);
        let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        let v = _mm_add_ss(v, _mm_movehdup_ps(v));
        let mut s = _mm_cvtss_f32(v);
        for k in i..n {
            s += a[k] * b[k];
        }
        s
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn axpy_256(out: &mut [f32], w: f32, v: &[f32]) {
        let n = out.len().min(v.len());
        let (po, pv) = (out.as_mut_ptr(), v.as_ptr());
        let vw = _mm256_set1_ps(w);
        let mut i = 0;
        // SAFETY: every access is of elements below `n` of both slices.
        unsafe {
            while i + 8 <= n {
                let o = _mm256_fmadd_ps(vw, _mm256_loadu_ps(pv.add(i)), _mm256_loadu_ps(po.add(i)));
                _mm256_storeu_ps(po.add(i), o);
                i += 8;
            }
        }
        for k in i..n {
            out[k] += w * v[k];
        }
    }

    /// Every SIMD path this CPU has (for tests).
    #[cfg(test)]
    pub(super) fn paths() -> Vec<(&'static str, super::AttendFn)> {
        let mut v: Vec<(&'static str, super::AttendFn)> = Vec::new();
        if is_x86_feature_detected!("avx512f") {
            v.push(("avx512", |t, s, o| {
                s.resize(t.q.len() / t.head_dim * t.n_pos, 0.0);
                // SAFETY: feature detected above; sizes as `attend` checks them.
                unsafe { attend_512(t, s, o) }
            }));
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            v.push(("avx2", |t, s, o| {
                s.resize(t.q.len() / t.head_dim * t.n_pos, 0.0);
                // SAFETY: as above.
                unsafe { attend_256(t, s, o) }
            }));
        }
        v
    }
}

#[cfg(test)]
type AttendFn = fn(&AttentionTask, &mut Vec<f32>, &mut [f32]);

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, head by head, in f64.
    fn reference(t: &AttentionTask) -> Vec<f32> {
        let d = t.head_dim;
        let mut out = vec![0.0f32; t.q.len()];
        for (h, q) in t.q.chunks_exact(d).enumerate() {
            let s: Vec<f64> = (0..t.n_pos)
                .map(|p| {
                    let k = &t.keys[p * t.stride..p * t.stride + d];
                    q.iter()
                        .zip(k)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * t.scale as f64
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for j in 0..d {
                let v: f64 = (0..t.n_pos)
                    .map(|p| e[p] / sum * t.values[p * t.stride + j] as f64)
                    .sum();
                out[h * d + j] = v as f32;
            }
        }
        out
    }

    #[test]
    fn simd_paths_agree_with_scalar_and_the_definition() {
        let mut s = 0x1234_5678_9abc_def1u64;
        let mut rnd = move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        #[allow(unused_mut)]
        let mut paths: Vec<(&str, AttendFn)> = vec![("dispatched", attend)];
        #[cfg(target_arch = "x86_64")]
        paths.extend(x86::paths());
        for (d, group, n_pos, kv_heads) in [
            (128usize, 4usize, 1usize, 5usize),
            (128, 4, 77, 5),
            (64, 1, 300, 2),
            (100, 2, 33, 3),
            (16, 3, 5, 1),
            (7, 2, 9, 2),
        ] {
            let stride = d * kv_heads;
            let q: Vec<f32> = (0..group * d).map(|_| rnd() * 3.0).collect();
            let keys: Vec<f32> = (0..n_pos * stride).map(|_| rnd() * 3.0).collect();
            let values: Vec<f32> = (0..n_pos * stride).map(|_| rnd()).collect();
            // The last KV head of the cache: rows start at an offset inside the stride.
            let off = (kv_heads - 1) * d;
            let task = AttentionTask {
                q: &q,
                keys: &keys[off..],
                values: &values[off..],
                stride,
                n_pos,
                head_dim: d,
                scale: 1.0 / (d as f32).sqrt(),
            };
            let want = reference(&task);
            let mut scores = Vec::new();
            let mut base = vec![0.0f32; q.len()];
            attend_scalar(&task, &mut scores, &mut base);
            // Relative error, with a floor of 0.1 on the magnitude: outputs are weighted
            // means of values in [-1, 1], and where they cancel to near zero the rounding
            // error stays that of the terms.
            let close = |a: &[f32], b: &[f32], tol: f32, what: &str| {
                for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (x - y).abs() <= tol * y.abs().max(0.1),
                        "{what} d={d} group={group} n={n_pos} [{i}]: {x} vs {y}"
                    );
                }
            };
            close(&base, &want, 1e-5, "scalar vs f64");
            for (name, f) in &paths {
                let mut got = vec![0.0f32; q.len()];
                f(&task, &mut scores, &mut got);
                close(&got, &base, 1e-5, name);
            }
        }
    }
}
