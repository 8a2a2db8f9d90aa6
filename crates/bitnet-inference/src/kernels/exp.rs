//! `exp(x)` for `x ≤ 0`, the softmax's exponential, in f32 without libm: scalar, AVX2 (8
//! lanes), AVX-512 (16 lanes) and NEON (4 lanes) give the same bits, so a softmax's weights do not depend
//! on the instruction set.
//!
//! The method is the classic one (Cody–Waite reduction, then a polynomial; the coefficients
//! are Cephes' `expf` minimax ones): `n = round(x·log2 e)`, `r = x − n·ln 2` in two steps
//! (`ln 2` split in a 9-bit head, so `n·head` is exact, and a tail), `e^r ≈ 1 + r + r²·P(r)`
//! on `|r| ≤ ln2 / 2`, times `2^n` made in the exponent bits. Every step is a separate
//! multiply or add (no fused multiply-add), in the same order on every path. Within 2 ulp of
//! the true value; below `ln(2^-126)` (weights under the smallest normal float, nothing next
//! to the max's weight of 1) the result is 0. NaN stays NaN.

/// Below this, `exp` is 0.
const LOW: f32 = -87.336_55;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// `1.5 · 2^23`: adding and subtracting it rounds half to even.
const ROUND: f32 = 12_582_912.0;
const LN2_HEAD: f32 = 0.693_359_4;
const LN2_TAIL: f32 = -2.121_944_4e-4;
/// `P(r)`, highest power first.
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `e^x` for `x ≤ 0` (see the module comment).
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    if x < LOW {
        return 0.0;
    }
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HEAD) - n * LN2_TAIL;
    let mut p = P[0];
    for c in &P[1..] {
        p = p * r + c;
    }
    let y = p * (r * r) + r + 1.0;
    // `n` is an integer in [-126, 0] here (NaN gives 0, and a NaN `y`).
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`exp_nonpositive`] of 16 lanes.
    ///
    /// # Safety
    /// The CPU has AVX-512F (no memory is touched).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn exp16(x: __m512) -> __m512 {
        let n = _mm512_sub_ps(
            _mm512_add_ps(
                _mm512_mul_ps(x, _mm512_set1_ps(LOG2_E)),
                _mm512_set1_ps(ROUND),
            ),
            _mm512_set1_ps(ROUND),
        );
        let r = _mm512_sub_ps(
            _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(LN2_HEAD))),
            _mm512_mul_ps(n, _mm512_set1_ps(LN2_TAIL)),
        );
        let mut p = _mm512_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(
            _mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r),
            _mm512_set1_ps(1.0),
        );
        let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvttps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        let e = _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
        let low = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(LOW));
        _mm512_mask_mov_ps(e, low, _mm512_setzero_ps())
    }

    /// [`exp_nonpositive`] of 8 lanes.
    ///
    /// # Safety
    /// The CPU has AVX2 (no memory is touched).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub fn exp8(x: __m256) -> __m256 {
        let n = _mm256_sub_ps(
            _mm256_add_ps(
                _mm256_mul_ps(x, _mm256_set1_ps(LOG2_E)),
                _mm256_set1_ps(ROUND),
            ),
            _mm256_set1_ps(ROUND),
        );
        let r = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HEAD))),
            _mm256_mul_ps(n, _mm256_set1_ps(LN2_TAIL)),
        );
        let mut p = _mm256_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r),
            _mm256_set1_ps(1.0),
        );
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvttps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let e = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
        let low = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LOW));
        _mm256_andnot_ps(low, e)
    }
}

#[cfg(target_arch = "aarch64")]
pub mod neon {
    use super::*;
    use std::arch::aarch64::*;

    /// [`exp_nonpositive`] of 4 lanes (NEON is part of every aarch64 CPU). Multiplies and
    /// adds stay separate instructions (`vmulq`/`vaddq`, never `vfmaq`), as in the scalar
    /// code, so every lane has the scalar bits.
    #[inline]
    pub fn exp4(x: float32x4_t) -> float32x4_t {
        // SAFETY: register-only NEON arithmetic; NEON is a baseline aarch64 feature.
        unsafe {
            let round = vdupq_n_f32(ROUND);
            let n = vsubq_f32(vaddq_f32(vmulq_f32(x, vdupq_n_f32(LOG2_E)), round), round);
            let r = vsubq_f32(
                vsubq_f32(x, vmulq_f32(n, vdupq_n_f32(LN2_HEAD))),
                vmulq_f32(n, vdupq_n_f32(LN2_TAIL)),
            );
            let mut p = vdupq_n_f32(P[0]);
            for &c in &P[1..] {
                p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(c));
            }
            let y = vaddq_f32(
                vaddq_f32(vmulq_f32(p, vmulq_f32(r, r)), r),
                vdupq_n_f32(1.0),
            );
            // Truncation as `as i32` does (`n` is integral; NaN gives 0 on both).
            let bits = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)));
            let e = vmulq_f32(y, vreinterpretq_f32_s32(bits));
            let low = vcltq_f32(x, vdupq_n_f32(LOW));
            vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(e), low))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs over the whole range: a sweep, the ends, ties of the reduction's rounding.
    fn inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (0..200_000).map(|i| -(i as f32) * 4.5e-4).collect();
        v.extend([
            0.0,
            -0.0,
            -1e-30,
            -1e-7,
            LOW,
            LOW + 1e-5,
            LOW - 1e-5,
            -88.0,
            -100.0,
        ]);
        v.extend((0..200).map(|k| -(k as f32 + 0.5) * std::f32::consts::LN_2));
        v.extend([f32::NEG_INFINITY, f32::MIN]);
        v
    }

    #[test]
    fn close_to_the_true_exponential() {
        for x in inputs() {
            let (got, want) = (exp_nonpositive(x), (x as f64).exp());
            if x < LOW {
                assert_eq!(got, 0.0, "{x}");
            } else if want >= f32::MIN_POSITIVE as f64 {
                let ulp = f32::EPSILON as f64 * want;
                assert!(
                    (got as f64 - want).abs() <= 2.0 * ulp,
                    "{x}: {got} vs {want}"
                );
            } else {
                // Subnormal results keep fewer bits.
                assert!((got as f64 - want).abs() <= 1e-44, "{x}: {got} vs {want}");
            }
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_lanes_equal_the_scalar_bits() {
        use std::arch::aarch64::*;
        let xs = inputs();
        for c in xs.chunks_exact(4) {
            let want = [0, 1, 2, 3].map(|i| exp_nonpositive(c[i]).to_bits());
            let mut got = [0f32; 4];
            // SAFETY: 4 floats read and written; NEON is a baseline aarch64 feature.
            unsafe { vst1q_f32(got.as_mut_ptr(), neon::exp4(vld1q_f32(c.as_ptr()))) };
            assert_eq!(got.map(f32::to_bits), want, "neon {c:?}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_lanes_equal_the_scalar_bits() {
        use std::arch::x86_64::*;
        let xs = inputs();
        let want: Vec<u32> = xs.iter().map(|&x| exp_nonpositive(x).to_bits()).collect();
        if is_x86_feature_detected!("avx512f") {
            for (c, w) in xs.chunks_exact(16).zip(want.chunks_exact(16)) {
                let mut got = [0f32; 16];
                // SAFETY: AVX-512F detected above; 16 floats read and written.
                unsafe {
                    _mm512_storeu_ps(got.as_mut_ptr(), x86::exp16(_mm512_loadu_ps(c.as_ptr())))
                };
                assert_eq!(got.map(f32::to_bits), w, "avx512 {c:?}");
            }
        }
        if is_x86_feature_detected!("avx2") {
            for (c, w) in xs.chunks_exact(8).zip(want.chunks_exact(8)) {
                let mut got = [0f32; 8];
                // SAFETY: AVX2 detected above; 8 floats read and written.
                unsafe {
                    _mm256_storeu_ps(got.as_mut_ptr(), x86::exp8(_mm256_loadu_ps(c.as_ptr())))
                };
                assert_eq!(got.map(f32::to_bits), w, "avx2 {c:?}");
            }
        }
    }
}
