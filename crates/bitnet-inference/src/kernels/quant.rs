//! Per-token absmax int8 quantization of activations, vectorized with run-time dispatch.
//!
//! Every path returns exactly what [`quantize_row_scalar`] returns. The rounding is
//! round-half-to-even without a libm call: values are clamped to `[-128, 127]` first (the
//! bounds are integers, so clamping before rounding equals clamping after), which keeps them
//! far below 2^22, where adding and subtracting `1.5·2^23` rounds to an integer with the
//! FPU's default ties-to-even mode. The SIMD paths use the hardware's round-to-nearest-even
//! instruction instead (exact for every input).

/// `1.5·2^23`: for `|v| < 2^22`, `(v + MAGIC) - MAGIC` is `v` rounded half to even.
const MAGIC: f32 = 12_582_912.0;

/// Round half to even of `v`, exact for `|v| < 2^22` (callers clamp first).
#[inline(always)]
pub fn round_half_even_small(v: f32) -> f32 {
    (v + MAGIC) - MAGIC
}

/// The quantized value of one float: `clamp(round_half_even(v), -128, 127)`; NaN gives 0
/// (as `f32::round_ties_even(NaN) as i8` does).
#[inline(always)]
fn quantize_one(v: f32) -> i8 {
    if v.is_nan() {
        return 0;
    }
    round_half_even_small(v.clamp(-128.0, 127.0)) as i8
}

/// Portable per-token absmax quantization exactly as transformers' BitNet does it in f32:
/// `s = 127 / max(max|x|, 1e-5)`, `q = clamp(round_half_even(x·s), -128, 127)`.
/// Returns `(s, Σq)`.
pub fn quantize_row_scalar(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let max = x.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-5);
    let scale = 127.0f32 / max;
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        let r = quantize_one(v * scale);
        sum += r as i32;
        *o = r;
    }
    (scale, sum)
}

/// [`quantize_row_scalar`] with the widest vector unit this CPU has; bit-identical.
pub fn quantize_row(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    assert_eq!(x.len(), q.len(), "quantize_row lengths");
    #[cfg(target_arch = "x86_64")]
    {
        match x86::level() {
            // SAFETY: the level was detected on this CPU; the slices have equal lengths.
            x86::Level::Avx512 => return unsafe { x86::quantize_512(x, q) },
            // SAFETY: as above.
            x86::Level::Avx2 => return unsafe { x86::quantize_256(x, q) },
            x86::Level::Scalar => {}
        }
    }
    quantize_row_scalar(x, q)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::quantize_one;
    use std::arch::x86_64::*;

    pub(super) use crate::kernels::{x86_level as level, X86Level as Level};

    /// Max of `|x|` ignoring NaN, as the scalar fold does (`f32::max` ignores NaN; `vmaxps`
    /// returns its second operand when either is NaN, so the accumulator goes second).
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn absmax_512(x: &[f32]) -> f32 {
        let n = x.len();
        let p = x.as_ptr();
        let sign = _mm512_set1_epi32(0x7fff_ffff);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n elements of `x`.
            let v = unsafe { _mm512_loadu_ps(p.add(i)) };
            let a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), sign));
            acc = _mm512_max_ps(a, acc);
            i += 16;
        }
        let mut m = _mm512_reduce_max_ps(acc);
        for &v in &x[i..] {
            m = m.max(v.abs());
        }
        m
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_512(x: &[f32], q: &mut [i8]) -> (f32, i32) {
        // SAFETY: same CPU features.
        let max = unsafe { absmax_512(x) }.max(1e-5);
        let scale = 127.0f32 / max;
        let n = x.len();
        let (px, pq) = (x.as_ptr(), q.as_mut_ptr());
        let vs = _mm512_set1_ps(scale);
        let (lo, hi) = (_mm512_set1_ps(-128.0), _mm512_set1_ps(127.0));
        let mut sum = _mm512_setzero_si512();
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n elements of `x` and of `q` (equal lengths).
            unsafe {
                let v = _mm512_mul_ps(_mm512_loadu_ps(px.add(i)), vs);
                // NaN lanes become 0 (ordered-compare mask), like the scalar path.
                let ord = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v);
                let v = _mm512_maskz_mov_ps(ord, v);
                let v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
                let r =
                    _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                let r = _mm512_cvtps_epi32(r);
                sum = _mm512_add_epi32(sum, r);
                _mm_storeu_si128(pq.add(i).cast(), _mm512_cvtepi32_epi8(r));
            }
            i += 16;
        }
        let mut s = _mm512_reduce_add_epi32(sum);
        for (o, &v) in q[i..].iter_mut().zip(&x[i..]) {
            let r = quantize_one(v * scale);
            s += r as i32;
            *o = r;
        }
        (scale, s)
    }

    #[target_feature(enable = "avx2")]
    unsafe fn absmax_256(x: &[f32]) -> f32 {
        let n = x.len();
        let p = x.as_ptr();
        let sign = _mm256_set1_epi32(0x7fff_ffff);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n elements of `x`.
            let v = unsafe { _mm256_loadu_ps(p.add(i)) };
            let a = _mm256_and_ps(v, _mm256_castsi256_ps(sign));
            acc = _mm256_max_ps(a, acc);
            i += 8;
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        let mut m = lanes.iter().fold(0.0f32, |m, &v| m.max(v));
        for &v in &x[i..] {
            m = m.max(v.abs());
        }
        m
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_256(x: &[f32], q: &mut [i8]) -> (f32, i32) {
        // SAFETY: same CPU features.
        let max = unsafe { absmax_256(x) }.max(1e-5);
        let scale = 127.0f32 / max;
        let n = x.len();
        let (px, pq) = (x.as_ptr(), q.as_mut_ptr());
        let vs = _mm256_set1_ps(scale);
        let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
        let mut sum = _mm256_setzero_si256();
        // `packs` interleaves 128-bit lanes; this puts the 32-bit groups back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let conv = |v: __m256| {
            let v = _mm256_mul_ps(v, vs);
            let v = _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
            let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
            _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(v))
        };
        let mut i = 0;
        while i + 32 <= n {
            // SAFETY: i + 32 <= n elements of `x` and of `q` (equal lengths).
            unsafe {
                let a = conv(_mm256_loadu_ps(px.add(i)));
                let b = conv(_mm256_loadu_ps(px.add(i + 8)));
                let c = conv(_mm256_loadu_ps(px.add(i + 16)));
                let d = conv(_mm256_loadu_ps(px.add(i + 24)));
                sum = _mm256_add_epi32(
                    sum,
                    _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d)),
                );
                let ab = _mm256_packs_epi32(a, b);
                let cd = _mm256_packs_epi32(c, d);
                let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
                _mm256_storeu_si256(pq.add(i).cast(), bytes);
            }
            i += 32;
        }
        let mut lanes = [0i32; 8];
        // SAFETY: `lanes` holds 8 ints.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), sum) };
        let mut s: i32 = lanes.iter().sum();
        for (o, &v) in q[i..].iter_mut().zip(&x[i..]) {
            let r = quantize_one(v * scale);
            s += r as i32;
            *o = r;
        }
        (scale, s)
    }

    /// Both SIMD paths, where this CPU has them (for tests).
    #[cfg(test)]
    pub(super) fn paths() -> Vec<(&'static str, super::QuantizeFn)> {
        let mut v: Vec<(&'static str, super::QuantizeFn)> = Vec::new();
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            // SAFETY: features detected just above.
            v.push(("avx512", |x, q| unsafe { quantize_512(x, q) }));
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: feature detected just above.
            v.push(("avx2", |x, q| unsafe { quantize_256(x, q) }));
        }
        v
    }
}

/// A quantization path, for tests.
#[cfg(test)]
type QuantizeFn = fn(&[f32], &mut [i8]) -> (f32, i32);

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: the definition with the standard library's rounding.
    fn reference(x: &[f32], q: &mut [i8]) -> (f32, i32) {
        let max = x.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-5);
        let scale = 127.0f32 / max;
        let mut sum = 0;
        for (o, &v) in q.iter_mut().zip(x) {
            let r = (v * scale).round_ties_even().clamp(-128.0, 127.0) as i8;
            sum += r as i32;
            *o = r;
        }
        (scale, sum)
    }

    fn paths() -> Vec<(&'static str, super::QuantizeFn)> {
        #[allow(unused_mut)]
        let mut v: Vec<(&'static str, super::QuantizeFn)> = vec![
            ("scalar", quantize_row_scalar),
            ("dispatched", quantize_row),
        ];
        #[cfg(target_arch = "x86_64")]
        v.extend(x86::paths());
        v
    }

    fn check(x: &[f32]) {
        let mut want = vec![0i8; x.len()];
        let w = reference(x, &mut want);
        for (name, f) in paths() {
            let mut got = vec![0i8; x.len()];
            let g = f(x, &mut got);
            assert_eq!(
                g.0.to_bits(),
                w.0.to_bits(),
                "{name}: scale, len {}",
                x.len()
            );
            assert_eq!(g.1, w.1, "{name}: sum, len {}", x.len());
            assert_eq!(got, want, "{name}: values, len {}", x.len());
        }
    }

    #[test]
    fn magic_rounding_is_round_half_even() {
        let mut v = -130.0f32;
        while v <= 130.0 {
            for x in [
                v,
                v + 0.5,
                v - 0.5,
                v + 0.25,
                v + 0.75,
                v + 0.4999999,
                v + 0.5000001,
            ] {
                // Compared as values: −0.5 gives +0 here and −0 in libm, the same integer.
                assert_eq!(round_half_even_small(x), x.round_ties_even(), "{x}");
            }
            v += 1.0;
        }
        for x in [4194303.5f32, -4194303.5, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5] {
            assert_eq!(round_half_even_small(x), x.round_ties_even(), "{x}");
        }
    }

    #[test]
    fn every_path_matches_round_ties_even() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            s.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        for len in [1usize, 7, 15, 16, 17, 31, 32, 33, 64, 100, 2560, 6912] {
            for _ in 0..20 {
                let x: Vec<f32> = (0..len)
                    .map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 3.0)
                    .collect();
                check(&x);
            }
        }
        // Exact ties: with max|x| = 127 the scale is 1, so k + 0.5 is an exact tie.
        let mut x: Vec<f32> = (-127..127).map(|k| k as f32 + 0.5).collect();
        x.push(127.0);
        check(&x);
        x.push(-127.0);
        check(&x);
        // Ties at other scales: max 254 gives s = 0.5, so odd integers land on .5.
        let x: Vec<f32> = (-254..=254).map(|k| k as f32).collect();
        check(&x);
        // The clamps: −max·s is −127; a value a hair past it cannot reach −128, but the
        // rounding of 127/max·x can give exactly ±127.
        let x = [1.0f32, -1.0, 0.999_999_9, -0.999_999_9, 0.0, -0.0];
        check(&x);
        // All zeros (the 1e-5 floor), tiny values, and NaN (gives 0, and is skipped by max).
        check(&[0.0; 40]);
        check(&[1e-7; 33]);
        let mut x: Vec<f32> = (0..50).map(|i| i as f32 * 0.1 - 2.0).collect();
        x[3] = f32::NAN;
        x[20] = f32::NAN;
        x[49] = f32::NAN;
        check(&x);
    }
}
