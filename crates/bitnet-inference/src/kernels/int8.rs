//! An int8 copy of a float matrix (one f32 scale per row), for the lm_head: half the bytes
//! of f16, so decode reads half as much memory per token. Rows are quantized like
//! activations (`s = 127 / max|w|`, round half to even), so `w ≈ q / s`.
//!
//! Three products: against 12-bit per-token activations (what the model uses: exact
//! integer sums, AVX-512 VNNI or NEON `sdot` on the activations' two byte planes, or AVX2 /
//! NEON on 16-bit lanes), against int8 activations (`(Σ q_w·q_a) / (s_w·s_a)`, VNNI or
//! NEON; the first version, kept for the kernel comparison in `examples/membw.rs`) and
//! against f32 activations (`(Σ q_w·x) / s_w`). All have scalar fallbacks.

use super::matmul::{par_rows, SharedOut};
use super::q6k::Int12Activations;
use super::{DenseMatrix, QuantizedActivations, BLOCK_WEIGHTS};
use rayon::prelude::*;

/// `[rows, cols]` int8, rows zero-padded to whole blocks of 128 (the activation layout).
#[derive(Debug, Clone)]
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    padded_cols: usize,
    values: Vec<i8>,
    /// Per row: `s = 127 / max|w|`; the row is `q / s`.
    scales: Vec<f32>,
    /// Per row: `Σ q`, for the unsigned-times-signed VNNI products (x86 only).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    sums: Vec<i32>,
}

impl Int8Matrix {
    /// Quantizes every row of `m` (in parallel).
    pub fn from_dense(m: &DenseMatrix) -> Self {
        Self::quantize(m, false)
    }

    /// [`Self::from_dense`], releasing `m`'s mapped pages (if it is a view into a file map)
    /// block by block as they are read: the resident set grows by the int8 copy and one
    /// block, not by all of `m`. For a matrix the int8 copy replaces; later reads of `m`
    /// still work (its pages fault back in from the file).
    pub fn from_dense_releasing(m: &DenseMatrix) -> Self {
        Self::quantize(m, true)
    }

    fn quantize(m: &DenseMatrix, release: bool) -> Self {
        let (rows, cols) = (m.rows(), m.cols());
        let padded_cols = cols.div_ceil(BLOCK_WEIGHTS) * BLOCK_WEIGHTS;
        let mut values = vec![0i8; rows * padded_cols];
        let mut scales = vec![0.0f32; rows];
        let mut sums = vec![0i32; rows];
        m.in_row_blocks(release, |span| {
            values[span.start * padded_cols..span.end * padded_cols]
                .par_chunks_mut(padded_cols)
                .zip(
                    scales[span.clone()]
                        .par_iter_mut()
                        .zip(sums[span.clone()].par_iter_mut()),
                )
                .enumerate()
                .for_each_init(
                    || vec![0.0f32; cols],
                    |row, (r, (q, (s, sum)))| {
                        m.row_to_f32(span.start + r, row);
                        (*s, *sum) = super::quant::quantize_row(row, &mut q[..cols]);
                    },
                );
        });
        Self {
            rows,
            cols,
            padded_cols,
            values,
            scales,
            sums,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Columns including the zero padding to whole 128-blocks (the activation width).
    pub fn padded_cols(&self) -> usize {
        self.padded_cols
    }
    pub fn memory_bytes(&self) -> usize {
        self.values.len() + self.rows * 8
    }
    /// The rows, each `padded_cols` values (zero-padded).
    pub fn values(&self) -> &[i8] {
        &self.values
    }
    /// Per row: `s = 127 / max|w|` (the row is `q / s`).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    fn row(&self, r: usize) -> &[i8] {
        &self.values[r * self.padded_cols..(r + 1) * self.padded_cols]
    }
    /// Row `r` as the floats it stands for, `q / s`.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let s = self.scales[r];
        for (o, &q) in out.iter_mut().zip(&self.row(r)[..self.cols]) {
            *o = q as f32 / s;
        }
    }
}

/// `out[t][r] = (Σ_k q_w[r][k]·q_a[t][k]) / (s_w[r]·s_a[t])`; `out` is `[n_tok, rows]`.
pub fn int8_matmul_int8(w: &Int8Matrix, acts: &QuantizedActivations, out: &mut [f32]) {
    let (rows, n_tok) = (w.rows, acts.n_rows());
    assert_eq!(acts.padded_cols(), w.padded_cols, "int8 matmul width");
    assert_eq!(out.len(), rows * n_tok, "int8 matmul output size");
    let o = SharedOut(out.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    let vnni = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni");
    #[cfg(target_arch = "aarch64")]
    let (neon, sdot) = (
        std::arch::is_aarch64_feature_detected!("neon"),
        std::arch::is_aarch64_feature_detected!("dotprod"),
    );
    par_rows(rows, &|r| {
        let wr = w.row(r);
        for t in 0..n_tok {
            let a = acts.row(t);
            #[cfg(target_arch = "x86_64")]
            let d = if vnni {
                // SAFETY: features detected above; both rows have `padded_cols` elements,
                // a multiple of 64.
                unsafe { x86::dot_i8_vnni(wr, a, w.sums[r]) }
            } else {
                dot_i8_scalar(wr, a)
            };
            #[cfg(target_arch = "aarch64")]
            let d = if neon && sdot {
                // SAFETY: features detected above; the kernel reads only below the
                // shorter row's length.
                unsafe { arm::dot_i8_sdot(wr, a) }
            } else if neon {
                // SAFETY: as above.
                unsafe { arm::dot_i8_neon(wr, a) }
            } else {
                dot_i8_scalar(wr, a)
            };
            #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
            let d = dot_i8_scalar(wr, a);
            // SAFETY: (t, r) is inside `out` (checked) and row r is this task's alone.
            unsafe { o.put(t * rows + r, d as f32 / (w.scales[r] * acts.scale(t))) };
        }
    });
}

/// `out[t][r] = (Σ_k q_w[r][k]·a[t][k]) / (s_w[r]·s_a[t])` with 12-bit activations
/// (`|a| ≤ 2047`, [`Int12Activations`]): 16 times finer than int8 activations, which cost
/// most of the int8 lm_head's perplexity. The integer sum is exact on every path (i64 at
/// the end), so every path returns the same bits.
pub fn int8_matmul_int12(w: &Int8Matrix, acts: &Int12Activations, out: &mut [f32]) {
    int8_matmul_int12_with(Int12Path::detect(), w, acts, out)
}

/// The instruction sets [`int8_matmul_int12`] can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int12Path {
    Scalar,
    /// Weights widened to 16 bits, `vpmaddwd`.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Activations split into two unsigned bytes, two `vpdpbusd` per 64 weights.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// Weights widened to 16 bits, `smlal`.
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// Activations as two signed bytes, two `sdot` per 16 weights.
    #[cfg(target_arch = "aarch64")]
    NeonDot,
}

impl Int12Path {
    /// The best path of this CPU, or the portable one where the backend computing chose it.
    pub fn detect() -> Self {
        static AVAILABLE: std::sync::OnceLock<Vec<Int12Path>> = std::sync::OnceLock::new();
        super::best_path(AVAILABLE.get_or_init(Self::available), Int12Path::Scalar)
    }

    /// Every path this CPU runs, best last.
    pub fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut v = vec![Int12Path::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                v.push(Int12Path::Avx2);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                v.push(Int12Path::Avx512Vnni);
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                v.push(Int12Path::Neon);
                if std::arch::is_aarch64_feature_detected!("dotprod") {
                    v.push(Int12Path::NeonDot);
                }
            }
        }
        v
    }

    /// `Σ_k w[r][k]·a[t][k]`, exact; `acts` must be `w.padded_cols` wide.
    fn dot(self, w: &Int8Matrix, r: usize, acts: &Int12Activations, t: usize) -> i64 {
        debug_assert_eq!(acts.cols(), w.padded_cols);
        match self {
            Int12Path::Scalar => dot_i8_i16_scalar(w.row(r), acts.row(t)),
            // SAFETY: the path's features were detected (`available`, and callers only
            // take paths from it); both rows have `padded_cols` elements, a multiple of
            // 128, and the kernels read only below the shorter row's length.
            #[cfg(target_arch = "x86_64")]
            Int12Path::Avx2 => unsafe { x86::dot_i8_i16_avx2(w.row(r), acts.row(t)) },
            #[cfg(target_arch = "x86_64")]
            Int12Path::Avx512Vnni => {
                let (low, high) = acts.split_row(t);
                // SAFETY: as above.
                let (sl, sh) = unsafe { x86::dot_i8_split_vnni(w.row(r), low, high) };
                // Σ w·a = Σ w·low + 256·(Σ w·high − 8·Σ w).
                sl as i64 + 256 * (sh as i64 - 8 * w.sums[r] as i64)
            }
            // SAFETY: as above.
            #[cfg(target_arch = "aarch64")]
            Int12Path::Neon => unsafe { arm::dot_i8_i16_neon(w.row(r), acts.row(t)) },
            #[cfg(target_arch = "aarch64")]
            Int12Path::NeonDot => {
                let (low, high) = acts.split_row(t);
                // SAFETY: as above, for the three rows.
                unsafe { arm::dot_i8_split_sdot(w.row(r), low, high) }
            }
        }
    }
}

/// [`int8_matmul_int12`] on a given path (tests compare paths).
pub fn int8_matmul_int12_with(
    path: Int12Path,
    w: &Int8Matrix,
    acts: &Int12Activations,
    out: &mut [f32],
) {
    let (rows, n_tok) = (w.rows, acts.n_rows());
    assert_eq!(acts.cols(), w.padded_cols, "int8 × int12 matmul width");
    assert_eq!(out.len(), rows * n_tok, "int8 × int12 matmul output size");
    assert!(
        Int12Path::available().contains(&path),
        "{path:?} not available"
    );
    let o = SharedOut(out.as_mut_ptr());
    par_rows(rows, &|r| {
        for t in 0..n_tok {
            let d = path.dot(w, r, acts, t);
            // SAFETY: (t, r) is inside `out` (checked) and row r is this task's alone.
            unsafe { o.put(t * rows + r, d as f32 / (w.scales[r] * acts.scale(t))) };
        }
    });
}

fn dot_i8_i16_scalar(w: &[i8], a: &[i16]) -> i64 {
    w.iter().zip(a).map(|(&x, &y)| x as i64 * y as i64).sum()
}

/// `out[t][r] = (Σ_k q_w[r][k]·x[t][k]) / s_w[r]`; `x` is `[n_tok, cols]`, `out`
/// `[n_tok, rows]`.
pub fn int8_matmul_f32(w: &Int8Matrix, x: &[f32], n_tok: usize, out: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    assert_eq!(x.len(), n_tok * cols, "int8 matmul input size");
    assert_eq!(out.len(), rows * n_tok, "int8 matmul output size");
    let o = SharedOut(out.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    let avx512 = is_x86_feature_detected!("avx512f");
    par_rows(rows, &|r| {
        let wr = &w.row(r)[..cols];
        for t in 0..n_tok {
            let xt = &x[t * cols..(t + 1) * cols];
            #[cfg(target_arch = "x86_64")]
            let d = if avx512 {
                // SAFETY: feature detected above; equal lengths.
                unsafe { x86::dot_i8_f32_512(wr, xt) }
            } else {
                dot_i8_f32_scalar(wr, xt)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let d = dot_i8_f32_scalar(wr, xt);
            // SAFETY: (t, r) is inside `out` (checked) and row r is this task's alone.
            unsafe { o.put(t * rows + r, d / w.scales[r]) };
        }
    });
}

fn dot_i8_scalar(w: &[i8], a: &[i8]) -> i32 {
    w.iter().zip(a).map(|(&x, &y)| x as i32 * y as i32).sum()
}

fn dot_i8_f32_scalar(w: &[i8], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = w.len() / 8;
    for c in 0..chunks {
        for i in 0..8 {
            acc[i] += w[c * 8 + i] as f32 * x[c * 8 + i];
        }
    }
    let mut tail = 0.0;
    for k in chunks * 8..w.len() {
        tail += w[k] as f32 * x[k];
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `Σ w·a` of two int8 rows whose length is a multiple of 64: `vpdpbusd` multiplies
    /// unsigned by signed bytes, so the activations are shifted to `a + 128` (xor of the
    /// sign bit) and `128·Σw` is subtracted. Exact: `|Σ| ≤ 255·128·len` fits int32 for any
    /// row shorter than 65 000 columns.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dot_i8_vnni(w: &[i8], a: &[i8], w_sum: i32) -> i32 {
        let n = w.len().min(a.len());
        debug_assert_eq!(n % 64, 0);
        let flip = _mm512_set1_epi8(-128);
        let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let (pw, pa) = (w.as_ptr(), a.as_ptr());
        let mut i = 0;
        // SAFETY: every load is of bytes below `n` of both slices.
        unsafe {
            while i + 128 <= n {
                let a0 = _mm512_xor_si512(_mm512_loadu_si512(pa.add(i).cast()), flip);
                let a1 = _mm512_xor_si512(_mm512_loadu_si512(pa.add(i + 64).cast()), flip);
                s0 = _mm512_dpbusd_epi32(s0, a0, _mm512_loadu_si512(pw.add(i).cast()));
                s1 = _mm512_dpbusd_epi32(s1, a1, _mm512_loadu_si512(pw.add(i + 64).cast()));
                i += 128;
            }
            if i + 64 <= n {
                let a0 = _mm512_xor_si512(_mm512_loadu_si512(pa.add(i).cast()), flip);
                s0 = _mm512_dpbusd_epi32(s0, a0, _mm512_loadu_si512(pw.add(i).cast()));
            }
        }
        _mm512_reduce_add_epi32(_mm512_add_epi32(s0, s1)) - 128 * w_sum
    }

    /// `(Σ w·low, Σ w·high)` of an int8 row with the two unsigned byte planes of 12-bit
    /// activations (`Int12Activations::split_row`), `vpdpbusd` on each. Exact: the sums are
    /// at most `255·128·len` and `15·128·len`, inside int32 for rows under 65 000 columns.
    ///
    /// Safety: needs AVX-512F, BW and VNNI; the three rows have the same length, a
    /// multiple of 64.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dot_i8_split_vnni(w: &[i8], low: &[u8], high: &[u8]) -> (i32, i32) {
        let n = w.len().min(low.len()).min(high.len());
        debug_assert_eq!(n % 64, 0);
        let (mut sl, mut sh) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let (pw, pl, ph) = (w.as_ptr(), low.as_ptr(), high.as_ptr());
        let mut i = 0;
        // SAFETY: every load is of bytes below `n` of the three slices.
        unsafe {
            while i + 64 <= n {
                let wv = _mm512_loadu_si512(pw.add(i).cast());
                sl = _mm512_dpbusd_epi32(sl, _mm512_loadu_si512(pl.add(i).cast()), wv);
                sh = _mm512_dpbusd_epi32(sh, _mm512_loadu_si512(ph.add(i).cast()), wv);
                i += 64;
            }
        }
        (_mm512_reduce_add_epi32(sl), _mm512_reduce_add_epi32(sh))
    }

    /// `Σ w·a` of an int8 row with 12-bit activations: weights widened to 16 bits,
    /// `vpmaddwd`, int32 lanes flushed to i64 every 4096 columns (`|Σ|` ≤ 4096·128·2047
    /// < 2^31 between flushes).
    ///
    /// Safety: needs AVX2; both rows have the same length, a multiple of 16.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_i8_i16_avx2(w: &[i8], a: &[i16]) -> i64 {
        let n = w.len().min(a.len());
        debug_assert_eq!(n % 16, 0);
        let (pw, pa) = (w.as_ptr(), a.as_ptr());
        let mut total = 0i64;
        let mut start = 0;
        while start < n {
            let end = (start + 4096).min(n);
            let mut acc = _mm256_setzero_si256();
            let mut i = start;
            // SAFETY: every load is of elements below `n` of both slices.
            unsafe {
                while i + 16 <= end {
                    let wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(pw.add(i).cast()));
                    let av = _mm256_loadu_si256(pa.add(i).cast());
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(wv, av));
                    i += 16;
                }
            }
            let mut lanes = [0i32; 8];
            // SAFETY: `lanes` is 32 bytes.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), acc) };
            total += lanes.iter().map(|&v| v as i64).sum::<i64>();
            start = end;
        }
        total
    }

    /// `Σ w·x`: int8 widened to f32, fused multiply-adds into two accumulators.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_i8_f32_512(w: &[i8], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        // SAFETY: every load is of elements below `n` of both slices.
        unsafe {
            while i + 32 <= n {
                let w0 =
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(pw.add(i).cast())));
                let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    pw.add(i + 16).cast(),
                )));
                s0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(px.add(i)), s0);
                s1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(px.add(i + 16)), s1);
                i += 32;
            }
        }
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
        for k in i..n {
            s += w[k] as f32 * x[k];
        }
        s
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::super::neon::sdot;
    use std::arch::aarch64::*;

    /// Columns between flushes of the int32 lanes into an i64 (bounds at each kernel).
    const CHUNK: usize = 4096;

    /// `Σ w·a` of an int8 row with 12-bit activations: weights widened to 16 bits, `smlal`
    /// into four int32 accumulators, flushed to i64 every 4096 columns (a lane then holds
    /// 256 products, `|Σ| ≤ 256·128·2047 < 2^26`). A tail under 16 columns is scalar.
    ///
    /// Safety: needs NEON.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot_i8_i16_neon(w: &[i8], a: &[i16]) -> i64 {
        let n = w.len().min(a.len());
        let (pw, pa) = (w.as_ptr(), a.as_ptr());
        let mut total = 0i64;
        let mut i = 0;
        while i + 16 <= n {
            let end = (i + CHUNK).min(n);
            let mut acc = [vdupq_n_s32(0); 4];
            while i + 16 <= end {
                // SAFETY: elements i..i+16 are below `n` in both slices.
                let (wv, a0, a1) = unsafe {
                    (
                        vld1q_s8(pw.add(i)),
                        vld1q_s16(pa.add(i)),
                        vld1q_s16(pa.add(i + 8)),
                    )
                };
                let (w0, w1) = (vmovl_s8(vget_low_s8(wv)), vmovl_high_s8(wv));
                acc[0] = vmlal_s16(acc[0], vget_low_s16(w0), vget_low_s16(a0));
                acc[1] = vmlal_high_s16(acc[1], w0, a0);
                acc[2] = vmlal_s16(acc[2], vget_low_s16(w1), vget_low_s16(a1));
                acc[3] = vmlal_high_s16(acc[3], w1, a1);
                i += 16;
            }
            total += acc.iter().map(|&v| vaddlvq_s32(v)).sum::<i64>();
        }
        total + super::dot_i8_i16_scalar(&w[i..n], &a[i..n])
    }

    /// `Σ w·a` from the activations' byte planes `a = 256·(high − 8) + low`
    /// (`Int12Activations::split_row`) with `sdot`, which takes signed bytes: `low` is
    /// read as signed (`low − 256` when `low ≥ 128`) and the borrow moved to the high
    /// plane, `a = 256·h + low_s` with `h = high − 8 + [low ≥ 128]` in -8..=8. Lanes are
    /// flushed to i64 every 4096 columns (a lane then holds 512 products of each plane,
    /// `|Σ w·low_s| ≤ 512·128·128 = 2^23`). A tail under 16 columns is scalar.
    ///
    /// Safety: needs NEON and dotprod.
    #[target_feature(enable = "neon,dotprod")]
    pub(super) unsafe fn dot_i8_split_sdot(w: &[i8], low: &[u8], high: &[u8]) -> i64 {
        let n = w.len().min(low.len()).min(high.len());
        let (pw, pl, ph) = (w.as_ptr(), low.as_ptr(), high.as_ptr());
        let eight = vdupq_n_s8(8);
        let mut total = 0i64;
        let mut i = 0;
        while i + 16 <= n {
            let end = (i + CHUNK).min(n);
            // Two pairs of accumulators, for alternate 16-column steps: independent chains.
            let (mut sl, mut sh) = ([vdupq_n_s32(0); 2], [vdupq_n_s32(0); 2]);
            let mut step = |i: usize, u: usize| {
                // SAFETY: callers pass i + 16 ≤ n: bytes i..i+16 are in the three slices.
                let (wv, l, hv) = unsafe {
                    (
                        vld1q_s8(pw.add(i)),
                        vreinterpretq_s8_u8(vld1q_u8(pl.add(i))),
                        vreinterpretq_s8_u8(vld1q_u8(ph.add(i))),
                    )
                };
                // h = high − (8 + (low_s >> 7)), the shift being −1 where low_s < 0.
                let h = vsubq_s8(hv, vsraq_n_s8::<7>(eight, l));
                // SAFETY: dotprod is enabled for this function and present.
                unsafe {
                    sl[u] = sdot(sl[u], wv, l);
                    sh[u] = sdot(sh[u], wv, h);
                }
            };
            while i + 32 <= end {
                step(i, 0);
                step(i + 16, 1);
                i += 32;
            }
            if i + 16 <= end {
                step(i, 0);
                i += 16;
            }
            let lanes = |v: [int32x4_t; 2]| vaddlvq_s32(v[0]) + vaddlvq_s32(v[1]);
            total += lanes(sl) + 256 * lanes(sh);
        }
        for k in i..n {
            total += w[k] as i64 * (256 * (high[k] as i64 - 8) + low[k] as i64);
        }
        total
    }

    /// `Σ w·a` of two int8 rows: products widened to 16 bits (`|w·a| ≤ 2^14`), adjacent
    /// pairs accumulated into int32 lanes. Every partial sum is a sum of some of the
    /// products, so it fits int32 wherever the scalar sum does (rows under 2^17 columns).
    /// A tail under 16 columns is scalar.
    ///
    /// Safety: needs NEON.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot_i8_neon(w: &[i8], a: &[i8]) -> i32 {
        let n = w.len().min(a.len());
        let mut acc = [vdupq_n_s32(0); 2];
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: bytes i..i+16 are below `n` in both slices.
            let (wv, av) = unsafe { (vld1q_s8(w.as_ptr().add(i)), vld1q_s8(a.as_ptr().add(i))) };
            acc[0] = vpadalq_s16(acc[0], vmull_s8(vget_low_s8(wv), vget_low_s8(av)));
            acc[1] = vpadalq_s16(acc[1], vmull_high_s8(wv, av));
            i += 16;
        }
        vaddvq_s32(vaddq_s32(acc[0], acc[1])) + super::dot_i8_scalar(&w[i..n], &a[i..n])
    }

    /// [`dot_i8_neon`] with `sdot`; the same int32 bounds.
    ///
    /// Safety: needs NEON and dotprod.
    #[target_feature(enable = "neon,dotprod")]
    pub(super) unsafe fn dot_i8_sdot(w: &[i8], a: &[i8]) -> i32 {
        let n = w.len().min(a.len());
        let mut acc = [vdupq_n_s32(0); 2];
        let mut step = |i: usize, u: usize| {
            // SAFETY: callers pass i + 16 ≤ n: bytes i..i+16 are in both slices; dotprod is
            // enabled for this function and present.
            unsafe {
                let (wv, av) = (vld1q_s8(w.as_ptr().add(i)), vld1q_s8(a.as_ptr().add(i)));
                acc[u] = sdot(acc[u], wv, av);
            }
        };
        let mut i = 0;
        while i + 32 <= n {
            step(i, 0);
            step(i + 16, 1);
            i += 32;
        }
        if i + 16 <= n {
            step(i, 0);
            i += 16;
        }
        vaddvq_s32(vaddq_s32(acc[0], acc[1])) + super::dot_i8_scalar(&w[i..n], &a[i..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::DenseData;

    #[test]
    fn products_match_the_definition() {
        let (rows, cols, n_tok) = (37usize, 300usize, 3usize);
        let mut s = 0x51u64;
        let mut rnd = move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let wf: Vec<f32> = (0..rows * cols).map(|_| rnd() * 0.1).collect();
        let dense = DenseMatrix::new(rows, cols, DenseData::F32(wf.clone().into())).unwrap();
        let m = Int8Matrix::from_dense(&dense);
        let x: Vec<f32> = (0..n_tok * cols).map(|_| rnd()).collect();
        // Dequantized rows are within half a step of the floats.
        let mut row = vec![0.0; cols];
        for r in 0..rows {
            m.row_to_f32(r, &mut row);
            let max = wf[r * cols..(r + 1) * cols]
                .iter()
                .fold(0f32, |a, v| a.max(v.abs()));
            for (a, b) in row.iter().zip(&wf[r * cols..(r + 1) * cols]) {
                assert!((a - b).abs() <= max / 127.0 * 0.5 + 1e-7);
            }
        }
        let mut acts = QuantizedActivations::default();
        acts.quantize(&x, n_tok, cols);
        let mut got_i = vec![0.0; rows * n_tok];
        int8_matmul_int8(&m, &acts, &mut got_i);
        let mut got_f = vec![0.0; rows * n_tok];
        int8_matmul_f32(&m, &x, n_tok, &mut got_f);
        for t in 0..n_tok {
            let a = acts.row(t);
            for r in 0..rows {
                let wr = m.row(r);
                let exact: i64 = (0..cols).map(|k| wr[k] as i64 * a[k] as i64).sum();
                let want_i = exact as f32 / (m.scales[r] * acts.scale(t));
                assert_eq!(got_i[t * rows + r], want_i, "int8 ({t},{r})");
                let want_f: f64 = (0..cols)
                    .map(|k| wr[k] as f64 * x[t * cols + k] as f64)
                    .sum::<f64>()
                    / m.scales[r] as f64;
                let g = got_f[t * rows + r] as f64;
                assert!(
                    (g - want_f).abs() <= 1e-5 * want_f.abs().max(1.0),
                    "f32 ({t},{r})"
                );
            }
        }
    }

    #[test]
    fn int12_paths_give_the_exact_integer_products() {
        let (rows, cols, n_tok) = (29usize, 300usize, 3usize);
        let mut s = 0x77u64;
        let mut rnd = move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let mut wf: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
        // Extremes: a row at ±max (int8 ±127) everywhere, a zero row.
        for (k, v) in wf[..cols].iter_mut().enumerate() {
            *v = if k % 2 == 0 { 1.0 } else { -1.0 };
        }
        wf[cols..2 * cols].fill(0.0);
        let dense = DenseMatrix::new(rows, cols, DenseData::F32(wf.into())).unwrap();
        let m = Int8Matrix::from_dense(&dense);
        let mut x: Vec<f32> = (0..n_tok * cols).map(|_| rnd()).collect();
        // A token whose activations sit at ±2047 after quantization.
        for (k, v) in x[..cols].iter_mut().enumerate() {
            *v = if k % 3 == 0 { -1.0 } else { 1.0 };
        }
        let mut acts = Int12Activations::default();
        acts.quantize(&x, n_tok, cols, m.padded_cols);
        let mut want = vec![0.0; rows * n_tok];
        for t in 0..n_tok {
            for r in 0..rows {
                let exact = dot_i8_i16_scalar(m.row(r), acts.row(t));
                want[t * rows + r] = exact as f32 / (m.scales[r] * acts.scale(t));
            }
        }
        for path in Int12Path::available() {
            let mut got = vec![0.0; rows * n_tok];
            int8_matmul_int12_with(path, &m, &acts, &mut got);
            assert_eq!(got, want, "{path:?}");
        }
        assert_eq!(acts.row(0)[0], -2047);
        assert_eq!(acts.row(0)[1], 2047);
    }

    /// Every int8 value, spread along a row.
    fn int8_sweep(n: usize, mul: usize) -> Vec<i8> {
        (0..n).map(|k| ((k * mul + 11) % 256) as u8 as i8).collect()
    }

    /// 12-bit activations with scale 1: `x` holds integers in -2047..=2047 and ±2047.
    fn int12_of(x: &[f32], n_tok: usize, cols: usize) -> Int12Activations {
        let mut acts = Int12Activations::default();
        acts.quantize(x, n_tok, cols, cols);
        for t in 0..n_tok {
            assert_eq!(acts.scale(t), 1.0);
        }
        acts
    }

    #[test]
    fn int12_paths_are_exact_at_the_extremes() {
        // One 128-block, past one 4096-column flush of the int32 lanes, and a wide row
        // whose extreme sum (16384·128·2047) needs more than 32 bits.
        for cols in [128usize, 4096 + 384, 16384] {
            let rows = [
                vec![-128i8; cols],
                vec![127; cols],
                (0..cols)
                    .map(|k| if k % 2 == 0 { -128 } else { 127 })
                    .collect(),
                int8_sweep(cols, 37),
            ];
            let m = Int8Matrix {
                rows: rows.len(),
                cols,
                padded_cols: cols,
                values: rows.concat(),
                scales: vec![1.0; rows.len()],
                sums: rows
                    .iter()
                    .map(|r| r.iter().map(|&v| v as i32).sum())
                    .collect(),
            };
            // Tokens: all -2047, all 2047, alternating, every 12-bit value.
            let mut x = vec![-2047.0f32; cols];
            x.extend(std::iter::repeat_n(2047.0, cols));
            x.extend((0..cols).map(|k| if k % 3 == 0 { -2047.0 } else { 2047.0 }));
            x.extend((0..cols).map(|k| ((k * 13) % 4095) as f32 - 2047.0));
            let acts = int12_of(&x, 4, cols);
            assert_eq!(
                dot_i8_i16_scalar(m.row(0), acts.row(0)),
                cols as i64 * 128 * 2047
            );
            for path in Int12Path::available() {
                for r in 0..rows.len() {
                    for t in 0..4 {
                        assert_eq!(
                            path.dot(&m, r, &acts, t),
                            dot_i8_i16_scalar(m.row(r), acts.row(t)),
                            "{path:?} {cols} columns, row {r}, token {t}"
                        );
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_kernels_take_any_length() {
        let neon = std::arch::is_aarch64_feature_detected!("neon");
        let sdot = neon && std::arch::is_aarch64_feature_detected!("dotprod");
        for n in [1usize, 15, 16, 17, 31, 32, 33, 48, 100, 4096 + 47] {
            let (w, a8) = (int8_sweep(n, 37), int8_sweep(n, 101));
            let x: Vec<f32> = (0..n).map(|k| ((k * 13) % 4095) as f32 - 2047.0).collect();
            let acts = int12_of(&x, 1, n);
            let (low, high) = acts.split_row(0);
            let want12 = dot_i8_i16_scalar(&w, acts.row(0));
            let want8 = dot_i8_scalar(&w, &a8);
            let worst8 = dot_i8_scalar(&vec![-128; n], &vec![-128; n]);
            if neon {
                // SAFETY: NEON detected; the kernels take any lengths.
                unsafe {
                    assert_eq!(arm::dot_i8_i16_neon(&w, acts.row(0)), want12, "{n}");
                    assert_eq!(arm::dot_i8_neon(&w, &a8), want8, "{n}");
                    assert_eq!(arm::dot_i8_neon(&vec![-128; n], &vec![-128; n]), worst8);
                }
            }
            if sdot {
                // SAFETY: NEON and dotprod detected; the kernels take any lengths.
                unsafe {
                    assert_eq!(arm::dot_i8_split_sdot(&w, low, high), want12, "{n}");
                    assert_eq!(arm::dot_i8_sdot(&w, &a8), want8, "{n}");
                    assert_eq!(arm::dot_i8_sdot(&vec![-128; n], &vec![-128; n]), worst8);
                }
            }
        }
    }

    #[test]
    fn releasing_blocks_gives_the_same_matrix() {
        // More rows than one release block, and a partial last block.
        let (rows, cols) = (2 * 1024 + 77, 40);
        let wf: Vec<half::f16> = (0..rows * cols)
            .map(|i| half::f16::from_f32(((i * 7919) % 2001) as f32 / 1000.0 - 1.0))
            .collect();
        let dense = DenseMatrix::new(rows, cols, DenseData::F16(wf.into())).unwrap();
        let a = Int8Matrix::from_dense(&dense);
        let b = Int8Matrix::from_dense_releasing(&dense);
        assert_eq!(a.values, b.values);
        assert_eq!(a.scales, b.scales);
        assert_eq!(a.sums, b.sums);
    }
}
