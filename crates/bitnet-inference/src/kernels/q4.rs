//! A 4-bit lm_head (`--lm-head q4`): every 32 weights of a row share one f16 scale `d` and
//! are stored as 4-bit codes `u = q + 8`, `q` in -8..=7, the weight being `d·q` (4.5 bits a
//! weight: 28% of the bytes of f16, 56% of int8). Multiplied with the final hidden state
//! quantized per token to 12 bits, like the other quantized lm_heads.
//!
//! Quantizing: a group's scale puts its largest-magnitude weight at -8, as ggml's Q4_0 does.
//! Tried and measured worse on SmolLM2's perplexity (docs/PERFORMANCE.md): 16 unevenly
//! spaced levels (Lloyd-Max for Gaussian groups, lower squared error), and scales refitted
//! by least squares; both trade the extreme weights for the small ones.
//!
//! Layout, made for one `vpdpbusd` lane per group: a row is cut into superblocks of 512
//! columns (16 groups). Step `s` (0..8) of a superblock is one 64-byte vector whose lane `k`
//! (bytes `4k..4k+4`) holds columns `32k + 4s .. 32k + 4s + 4`, so after the 8 steps lane
//! `k` holds group `k`'s integer sum and one multiply-add by the 16 scales finishes the
//! superblock. Two steps share 64 bytes of codes (step `2p` in the low nibbles of vector `p`,
//! step `2p + 1` in the high ones), the unsigned operand of `vpdpbusd`; activations are laid
//! out the same way once per token ([`Q4Activations`]).
//!
//! Exactness: each group's integer sum is exact (`|Σ q·a| ≤ 32·8·2047 < 2^24`, so also
//! exact as f32); the float
//! part (`acc[k] = fma(d_k, sum_k, acc[k])` per superblock, then the 16 lanes added in a
//! fixed tree and divided by the activation scale) is the same on every path, so every path
//! returns the same bits.

use super::matmul::{par_rows, SharedOut};
use super::q6k::Int12Activations;
use super::DenseMatrix;
use half::f16;

/// Weights sharing one scale.
pub const Q4_GROUP: usize = 32;
/// Columns of a superblock: 16 groups, one a 32-bit lane of a 512-bit vector.
pub const Q4_SUPER: usize = 512;
const LANES: usize = Q4_SUPER / Q4_GROUP;
/// Bytes of codes in a superblock.
const SUPER_BYTES: usize = Q4_SUPER / 2;

/// Where column `c` of a row sits: (byte of the packed row, shift of its nibble).
fn code_slot(c: usize) -> (usize, u32) {
    let (sb, c) = (c / Q4_SUPER, c % Q4_SUPER);
    let (k, w) = (c / Q4_GROUP, c % Q4_GROUP);
    let (s, j) = (w / 4, w % 4);
    (
        sb * SUPER_BYTES + (s / 2) * 64 + 4 * k + j,
        4 * (s % 2) as u32,
    )
}

/// Where column `c` sits in an activation row laid out for the kernel.
fn act_slot(c: usize) -> usize {
    let (sb, c) = (c / Q4_SUPER, c % Q4_SUPER);
    let (k, w) = (c / Q4_GROUP, c % Q4_GROUP);
    sb * Q4_SUPER + (w / 4) * 64 + 4 * k + w % 4
}

/// `[rows, cols]` 4-bit weights, rows zero-padded to whole superblocks.
#[derive(Debug, Clone)]
pub struct Q4Matrix {
    rows: usize,
    cols: usize,
    padded_cols: usize,
    /// `rows × padded_cols / 2` bytes, two codes a byte in the superblock layout.
    codes: Vec<u8>,
    /// `rows × padded_cols / 32` group scales, in column order.
    scales: Vec<f16>,
}

impl Q4Matrix {
    /// Quantizes every row of `m` (in parallel).
    pub fn from_dense(m: &DenseMatrix) -> Self {
        Self::quantize(m, false)
    }

    /// [`Self::from_dense`], releasing `m`'s mapped pages as it goes (see
    /// [`DenseMatrix::in_row_blocks`]).
    pub fn from_dense_releasing(m: &DenseMatrix) -> Self {
        Self::quantize(m, true)
    }

    fn quantize(m: &DenseMatrix, release: bool) -> Self {
        use rayon::prelude::*;
        let (rows, cols) = (m.rows(), m.cols());
        let padded_cols = cols.div_ceil(Q4_SUPER) * Q4_SUPER;
        let (row_bytes, row_groups) = (padded_cols / 2, padded_cols / Q4_GROUP);
        let mut codes = vec![0u8; rows * row_bytes];
        let mut scales = vec![f16::ZERO; rows * row_groups];
        m.in_row_blocks(release, |span| {
            codes[span.start * row_bytes..span.end * row_bytes]
                .par_chunks_mut(row_bytes)
                .zip(
                    scales[span.start * row_groups..span.end * row_groups]
                        .par_chunks_mut(row_groups),
                )
                .enumerate()
                .for_each_init(
                    || vec![0.0f32; padded_cols],
                    |row, (r, (codes, scales))| {
                        m.row_to_f32(span.start + r, &mut row[..cols]);
                        quantize_row(row, codes, scales);
                    },
                );
        });
        Self {
            rows,
            cols,
            padded_cols,
            codes,
            scales,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Columns including the zero padding to whole superblocks (the activation width).
    pub fn padded_cols(&self) -> usize {
        self.padded_cols
    }
    pub fn memory_bytes(&self) -> usize {
        self.codes.len() + 2 * self.scales.len()
    }
    fn row(&self, r: usize) -> (&[u8], &[f16]) {
        let (b, g) = (self.padded_cols / 2, self.padded_cols / Q4_GROUP);
        (
            &self.codes[r * b..(r + 1) * b],
            &self.scales[r * g..(r + 1) * g],
        )
    }
    /// Group `g` (columns `32g..32g + 32`) of row `r` in column order: byte `i` holds the
    /// codes of columns `32g + 2i` (low nibble) and `32g + 2i + 1` (high nibble); and its
    /// scale. For kernels that do not read the superblock layout (the CUDA backend's).
    pub fn group_codes(&self, r: usize, g: usize) -> ([u8; Q4_GROUP / 2], f16) {
        let (codes, scales) = self.row(r);
        let mut out = [0u8; Q4_GROUP / 2];
        for (i, o) in out.iter_mut().enumerate() {
            let code = |c: usize| {
                let (byte, shift) = code_slot(g * Q4_GROUP + c);
                (codes[byte] >> shift) & 0x0F
            };
            *o = code(2 * i) | code(2 * i + 1) << 4;
        }
        (out, scales[g])
    }

    /// Row `r` as the floats it stands for, `d·q`; `out` has `cols` values.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let (codes, scales) = self.row(r);
        for (c, o) in out[..self.cols].iter_mut().enumerate() {
            let (byte, shift) = code_slot(c);
            let q = ((codes[byte] >> shift) & 0x0F) as i32 - 8;
            *o = scales[c / Q4_GROUP].to_f32() * q as f32;
        }
    }
}

/// Quantizes one zero-padded row (whole superblocks) into its codes and group scales: the
/// scale maps the group's largest-magnitude weight to -8, the one level without a positive
/// twin; codes are rounded half to even against the stored (f16) scale.
fn quantize_row(row: &[f32], codes: &mut [u8], scales: &mut [f16]) {
    for (g, (group, d_out)) in row
        .chunks_exact(Q4_GROUP)
        .zip(scales.iter_mut())
        .enumerate()
    {
        let extreme = group
            .iter()
            .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = f16::from_f32(extreme / -8.0);
        *d_out = d;
        let inv = if d.to_f32() != 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        for (j, &v) in group.iter().enumerate() {
            // Clamped first, so the no-libm rounding applies; NaN becomes 0 (`as` maps
            // NaN to 0).
            let q = super::quant::round_half_even_small((v * inv).clamp(-8.0, 7.0)) as i32 + 8;
            let (byte, shift) = code_slot(g * Q4_GROUP + j);
            codes[byte] |= (q as u8) << shift;
        }
    }
}

/// 12-bit activations in the kernel's layout, as two signed byte planes `a = 128·high + low`
/// (`high` in -16..=16, `low` in -64..=63: both fit the signed operand of `vpdpbusd`, whose
/// unsigned operand is the codes `u = q + 8`), and per group `8·Σa`, which turns `Σ u·a`
/// into `Σ q·a`.
#[derive(Debug, Clone, Default)]
pub struct Q4Activations {
    cols: usize,
    low: Vec<i8>,
    high: Vec<i8>,
    /// `[n_rows, cols / 32]`: `8 · Σ a` of each group.
    offsets: Vec<i32>,
    scales: Vec<f32>,
}

impl Q4Activations {
    /// Buffers for up to `max_rows` rows of `max_cols` values, so laying out that much
    /// allocates nothing.
    pub fn with_capacity(max_rows: usize, max_cols: usize) -> Self {
        Self {
            cols: 0,
            low: Vec::with_capacity(max_rows * max_cols),
            high: Vec::with_capacity(max_rows * max_cols),
            offsets: Vec::with_capacity(max_rows * max_cols / Q4_GROUP),
            scales: Vec::with_capacity(max_rows),
        }
    }

    /// Lays out the rows of `acts` (whose width must be whole superblocks).
    pub fn fill(&mut self, acts: &Int12Activations) {
        let (n, cols) = (acts.n_rows(), acts.cols());
        assert!(cols.is_multiple_of(Q4_SUPER), "q4 activation width {cols}");
        self.cols = cols;
        self.low.resize(n * cols, 0);
        self.high.resize(n * cols, 0);
        self.offsets.resize(n * cols / Q4_GROUP, 0);
        self.scales.clear();
        for t in 0..n {
            self.scales.push(acts.scale(t));
            let span = t * cols..(t + 1) * cols;
            let (low, high) = (&mut self.low[span.clone()], &mut self.high[span]);
            let offsets = &mut self.offsets[t * cols / Q4_GROUP..(t + 1) * cols / Q4_GROUP];
            for (g, group) in acts.row(t).chunks_exact(Q4_GROUP).enumerate() {
                offsets[g] = 8 * group.iter().map(|&a| a as i32).sum::<i32>();
                for (j, &a) in group.iter().enumerate() {
                    let h = (a as i32 + 64) >> 7;
                    let i = act_slot(g * Q4_GROUP + j);
                    high[i] = h as i8;
                    low[i] = (a as i32 - 128 * h) as i8;
                }
            }
        }
    }

    pub fn n_rows(&self) -> usize {
        self.scales.len()
    }
    fn row(&self, t: usize) -> ActRow<'_> {
        let span = t * self.cols..(t + 1) * self.cols;
        let g = self.cols / Q4_GROUP;
        ActRow {
            low: &self.low[span.clone()],
            high: &self.high[span],
            offsets: &self.offsets[t * g..(t + 1) * g],
        }
    }
}

#[derive(Clone, Copy)]
struct ActRow<'a> {
    low: &'a [i8],
    high: &'a [i8],
    offsets: &'a [i32],
}

/// The instruction sets [`q4_matmul`] can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Q4Path {
    Scalar,
    /// `vpmaddubsw` + `vpmaddwd` on 256-bit halves of a step.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// One `vpdpbusd` a step and activation plane.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// `smull` + pairwise adds, a quarter of a step at a time.
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// `sdot`, a quarter of a step at a time.
    #[cfg(target_arch = "aarch64")]
    NeonDot,
}

impl Q4Path {
    /// The best path of this CPU, or the portable one where the backend computing chose it.
    pub fn detect() -> Self {
        static AVAILABLE: std::sync::OnceLock<Vec<Q4Path>> = std::sync::OnceLock::new();
        super::best_path(AVAILABLE.get_or_init(Self::available), Q4Path::Scalar)
    }

    /// Every path this CPU runs, best last.
    pub fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut v = vec![Q4Path::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                v.push(Q4Path::Avx2);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                v.push(Q4Path::Avx512Vnni);
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                v.push(Q4Path::Neon);
                if std::arch::is_aarch64_feature_detected!("dotprod") {
                    v.push(Q4Path::NeonDot);
                }
            }
        }
        v
    }

    /// The 16 lane accumulators of one row with one activation row.
    fn row_lanes(self, codes: &[u8], scales: &[f16], a: ActRow) -> [f32; LANES] {
        match self {
            Q4Path::Scalar => row_lanes_scalar(codes, scales, a),
            // SAFETY: the path's features were detected (`available`); the row and the
            // activations have the same whole number of superblocks (checked by the caller).
            #[cfg(target_arch = "x86_64")]
            Q4Path::Avx2 => unsafe { x86::row_lanes_avx2(codes, scales, a) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Q4Path::Avx512Vnni => unsafe { x86::row_lanes_avx512(codes, scales, a) },
            // SAFETY: as above.
            #[cfg(target_arch = "aarch64")]
            Q4Path::Neon => unsafe { arm::row_lanes_neon(codes, scales, a) },
            // SAFETY: as above.
            #[cfg(target_arch = "aarch64")]
            Q4Path::NeonDot => unsafe { arm::row_lanes_dot(codes, scales, a) },
        }
    }
}

/// The lanes added in a fixed order (halves, then quarters, …), the same on every path.
fn reduce_lanes(v: [f32; LANES]) -> f32 {
    let mut v = v;
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            v[i] += v[i + n];
        }
    }
    v[0]
}

fn row_lanes_scalar(codes: &[u8], scales: &[f16], a: ActRow) -> [f32; LANES] {
    let mut acc = [0.0f32; LANES];
    for (sb, codes) in codes.chunks_exact(SUPER_BYTES).enumerate() {
        let mut sums = [0i32; LANES];
        for (i, &byte) in codes.iter().enumerate() {
            let (p, lane) = (i / 64, i % 64 / 4);
            for (step, code) in [(2 * p, byte & 0x0F), (2 * p + 1, byte >> 4)] {
                let at = sb * Q4_SUPER + step * 64 + i % 64;
                sums[lane] += code as i32 * (128 * a.high[at] as i32 + a.low[at] as i32);
            }
        }
        for (k, acc) in acc.iter_mut().enumerate() {
            let g = sb * LANES + k;
            let sum = sums[k] - a.offsets[g];
            *acc = scales[g].to_f32().mul_add(sum as f32, *acc);
        }
    }
    acc
}

/// `out[t][r] = Σ_g d_g·Σ_j q·a / s_a[t]` for every row `r` and token `t`; `out` is
/// `[n_tok, rows]`. Rows are split over the spinning pool.
pub fn q4_matmul(w: &Q4Matrix, acts: &Q4Activations, out: &mut [f32]) {
    q4_matmul_with(Q4Path::detect(), w, acts, out)
}

/// [`q4_matmul`] on a given path (tests compare paths).
pub fn q4_matmul_with(path: Q4Path, w: &Q4Matrix, acts: &Q4Activations, out: &mut [f32]) {
    let (rows, n_tok) = (w.rows, acts.n_rows());
    assert_eq!(acts.cols, w.padded_cols, "q4 matmul width");
    assert_eq!(out.len(), rows * n_tok, "q4 matmul output size");
    assert!(
        Q4Path::available().contains(&path),
        "{path:?} not available"
    );
    let o = SharedOut(out.as_mut_ptr());
    par_rows(rows, &|r| {
        let (codes, scales) = w.row(r);
        for t in 0..n_tok {
            let v = reduce_lanes(path.row_lanes(codes, scales, acts.row(t))) / acts.scales[t];
            // SAFETY: (t, r) is inside `out` (checked) and row r is this task's alone.
            unsafe { o.put(t * rows + r, v) };
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ActRow, LANES, Q4_SUPER, SUPER_BYTES};
    use half::f16;
    use std::arch::x86_64::*;

    /// Safety: needs AVX-512F, BW and VNNI; `codes` is whole superblocks and `a`'s planes
    /// and offsets cover as many (`scales` one per group).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn row_lanes_avx512(codes: &[u8], scales: &[f16], a: ActRow) -> [f32; LANES] {
        let n_sb = codes.len() / SUPER_BYTES;
        assert!(
            a.low.len() >= n_sb * Q4_SUPER
                && a.high.len() >= n_sb * Q4_SUPER
                && a.offsets.len() >= n_sb * LANES
                && scales.len() >= n_sb * LANES
        );
        let nibble = _mm512_set1_epi8(0x0F);
        let mut acc = _mm512_setzero_ps();
        for sb in 0..n_sb {
            // SAFETY: every pointer below stays inside superblock `sb` of its slice, which
            // the assertion above covers.
            unsafe {
                let w = codes.as_ptr().add(sb * SUPER_BYTES);
                let (l, h) = (
                    a.low.as_ptr().add(sb * Q4_SUPER),
                    a.high.as_ptr().add(sb * Q4_SUPER),
                );
                let [mut l0, mut l1, mut h0, mut h1] = [_mm512_setzero_si512(); 4];
                for p in 0..4 {
                    let packed = _mm512_loadu_si512(w.add(64 * p).cast());
                    let even = _mm512_and_si512(packed, nibble);
                    let odd = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
                    let at = 128 * p;
                    l0 = _mm512_dpbusd_epi32(l0, even, _mm512_loadu_si512(l.add(at).cast()));
                    h0 = _mm512_dpbusd_epi32(h0, even, _mm512_loadu_si512(h.add(at).cast()));
                    l1 = _mm512_dpbusd_epi32(l1, odd, _mm512_loadu_si512(l.add(at + 64).cast()));
                    h1 = _mm512_dpbusd_epi32(h1, odd, _mm512_loadu_si512(h.add(at + 64).cast()));
                }
                let sum = _mm512_sub_epi32(
                    _mm512_add_epi32(
                        _mm512_slli_epi32(_mm512_add_epi32(h0, h1), 7),
                        _mm512_add_epi32(l0, l1),
                    ),
                    _mm512_loadu_si512(a.offsets.as_ptr().add(sb * LANES).cast()),
                );
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(scales.as_ptr().add(sb * LANES).cast()));
                acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sum), acc);
            }
        }
        let mut out = [0.0f32; LANES];
        // SAFETY: `out` holds 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), acc) };
        out
    }

    /// Safety: needs AVX2, FMA and F16C; sizes as for [`row_lanes_avx512`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn row_lanes_avx2(codes: &[u8], scales: &[f16], a: ActRow) -> [f32; LANES] {
        let n_sb = codes.len() / SUPER_BYTES;
        assert!(
            a.low.len() >= n_sb * Q4_SUPER
                && a.high.len() >= n_sb * Q4_SUPER
                && a.offsets.len() >= n_sb * LANES
                && scales.len() >= n_sb * LANES
        );
        let nibble = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 2];
        for sb in 0..n_sb {
            // Lanes 0..8 are bytes 0..32 of each step, lanes 8..16 bytes 32..64.
            for (half, acc) in acc.iter_mut().enumerate() {
                // SAFETY: every pointer below stays inside superblock `sb` of its slice,
                // which the assertion above covers.
                unsafe {
                    let w = codes.as_ptr().add(sb * SUPER_BYTES + 32 * half);
                    let (l, h) = (
                        a.low.as_ptr().add(sb * Q4_SUPER + 32 * half),
                        a.high.as_ptr().add(sb * Q4_SUPER + 32 * half),
                    );
                    // `vpmaddubsw` pairs stay far from the int16 limit: |2·15·64| = 1920.
                    let dot = |u: __m256i, a: *const i8| {
                        _mm256_madd_epi16(
                            _mm256_maddubs_epi16(u, _mm256_loadu_si256(a.cast())),
                            ones,
                        )
                    };
                    let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for p in 0..4 {
                        let packed = _mm256_loadu_si256(w.add(64 * p).cast());
                        let even = _mm256_and_si256(packed, nibble);
                        let odd = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
                        let at = 128 * p;
                        lo = _mm256_add_epi32(lo, dot(even, l.add(at)));
                        hi = _mm256_add_epi32(hi, dot(even, h.add(at)));
                        lo = _mm256_add_epi32(lo, dot(odd, l.add(at + 64)));
                        hi = _mm256_add_epi32(hi, dot(odd, h.add(at + 64)));
                    }
                    let g = sb * LANES + 8 * half;
                    let sum = _mm256_sub_epi32(
                        _mm256_add_epi32(_mm256_slli_epi32(hi, 7), lo),
                        _mm256_loadu_si256(a.offsets.as_ptr().add(g).cast()),
                    );
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add(g).cast()));
                    *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sum), *acc);
                }
            }
        }
        let mut out = [0.0f32; LANES];
        // SAFETY: `out` holds 16 floats, two stores of 8.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1]);
        }
        out
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::super::neon::sdot;
    use super::{ActRow, LANES, Q4_SUPER, SUPER_BYTES};
    use half::f16;
    use std::arch::aarch64::*;

    /// The same with plain NEON: products widened to int16 (`|u·a| ≤ 15·64`), adjacent
    /// pairs added twice, so each int32 lane gets its own four bytes.
    ///
    /// Safety: needs NEON.
    #[inline(always)]
    unsafe fn dot4_widen(acc: int32x4_t, u: int8x16_t, a: int8x16_t) -> int32x4_t {
        // SAFETY: register-only NEON arithmetic; callers run only where NEON is present.
        unsafe {
            let lo = vmull_s8(vget_low_s8(u), vget_low_s8(a));
            let hi = vmull_high_s8(u, a);
            vpadalq_s16(acc, vpaddq_s16(lo, hi))
        }
    }

    /// One row with one activation row, the 16 lanes as four quarters of 4.
    ///
    /// Safety: NEON (and dotprod where `dot4` uses it); sizes as for the x86 paths.
    #[inline(always)]
    unsafe fn row_lanes<const SDOT: bool>(codes: &[u8], scales: &[f16], a: ActRow) -> [f32; LANES] {
        // SAFETY (of the calls): the caller guarantees NEON, and dotprod when SDOT.
        let dot4 = |acc, u, a| unsafe {
            if SDOT {
                sdot(acc, u, a)
            } else {
                dot4_widen(acc, u, a)
            }
        };
        let n_sb = codes.len() / SUPER_BYTES;
        assert!(
            a.low.len() >= n_sb * Q4_SUPER
                && a.high.len() >= n_sb * Q4_SUPER
                && a.offsets.len() >= n_sb * LANES
                && scales.len() >= n_sb * LANES
        );
        let nibble = vdupq_n_u8(0x0F);
        let mut acc = [vdupq_n_f32(0.0); 4];
        for sb in 0..n_sb {
            let mut lo = [vdupq_n_s32(0); 4];
            let mut hi = [vdupq_n_s32(0); 4];
            // SAFETY: every pointer below stays inside superblock `sb` of its slice, which
            // the assertion above covers.
            unsafe {
                let w = codes.as_ptr().add(sb * SUPER_BYTES);
                let (l, h) = (
                    a.low.as_ptr().add(sb * Q4_SUPER),
                    a.high.as_ptr().add(sb * Q4_SUPER),
                );
                for p in 0..4 {
                    for q in 0..4 {
                        let packed = vld1q_u8(w.add(64 * p + 16 * q));
                        let even = vreinterpretq_s8_u8(vandq_u8(packed, nibble));
                        let odd = vreinterpretq_s8_u8(vshrq_n_u8::<4>(packed));
                        let at = 128 * p + 16 * q;
                        lo[q] = dot4(lo[q], even, vld1q_s8(l.add(at)));
                        hi[q] = dot4(hi[q], even, vld1q_s8(h.add(at)));
                        lo[q] = dot4(lo[q], odd, vld1q_s8(l.add(at + 64)));
                        hi[q] = dot4(hi[q], odd, vld1q_s8(h.add(at + 64)));
                    }
                }
                for q in 0..4 {
                    let g = sb * LANES + 4 * q;
                    let sum = vsubq_s32(
                        vaddq_s32(vshlq_n_s32::<7>(hi[q]), lo[q]),
                        vld1q_s32(a.offsets.as_ptr().add(g)),
                    );
                    let d: [f32; 4] = std::array::from_fn(|i| scales[g + i].to_f32());
                    acc[q] = vfmaq_f32(acc[q], vld1q_f32(d.as_ptr()), vcvtq_f32_s32(sum));
                }
            }
        }
        let mut out = [0.0f32; LANES];
        for (q, acc) in acc.iter().enumerate() {
            // SAFETY: `out` holds 16 floats, four stores of 4.
            unsafe { vst1q_f32(out.as_mut_ptr().add(4 * q), *acc) };
        }
        out
    }

    /// Safety: needs NEON; sizes as for the x86 paths.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn row_lanes_neon(codes: &[u8], scales: &[f16], a: ActRow) -> [f32; LANES] {
        // SAFETY: passed on.
        unsafe { row_lanes::<false>(codes, scales, a) }
    }

    /// Safety: needs NEON and dotprod; sizes as for the x86 paths.
    #[target_feature(enable = "neon,dotprod")]
    pub(super) unsafe fn row_lanes_dot(codes: &[u8], scales: &[f16], a: ActRow) -> [f32; LANES] {
        // SAFETY: passed on; dotprod is enabled for this function and present.
        unsafe { row_lanes::<true>(codes, scales, a) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::DenseData;

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    #[test]
    fn layout_slots_are_a_permutation() {
        let mut codes = vec![0u32; SUPER_BYTES * 2];
        let mut acts = vec![0u32; Q4_SUPER];
        for c in 0..Q4_SUPER {
            let (b, s) = code_slot(c);
            codes[b * 2 + s as usize / 4] += 1;
            acts[act_slot(c)] += 1;
        }
        assert!(codes.iter().all(|&n| n == 1) && acts.iter().all(|&n| n == 1));
        // Same group, same lane: column c's code byte and its activation byte agree.
        for c in 0..Q4_SUPER {
            let (b, s) = code_slot(c);
            assert_eq!(b % 64, act_slot(c) % 64);
            assert_eq!(2 * (b / 64) + s as usize / 4, act_slot(c) / 64);
        }
    }

    #[test]
    fn rows_round_trip_within_half_a_step() {
        let (rows, cols) = (9usize, 600usize);
        let mut rnd = rng(7);
        let mut wf: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
        wf[3] = 5.0; // an outlier sets its group's scale
        wf[64..96].fill(0.0); // an all-zero group (the third of row 0)
        for (w, v) in wf[cols + 64..cols + 96].iter_mut().zip((-8i32..8).cycle()) {
            *w = v as f32 * 0.25; // levels times a power of two: exact
        }
        let m = Q4Matrix::from_dense(
            &DenseMatrix::new(rows, cols, DenseData::F32(wf.clone().into())).unwrap(),
        );
        assert_eq!(m.padded_cols(), 1024);
        assert_eq!(m.memory_bytes(), rows * (512 + 64));
        let mut row = vec![0.0; cols];
        for r in 0..rows {
            m.row_to_f32(r, &mut row);
            let want = &wf[r * cols..(r + 1) * cols];
            for (g, (got, want)) in row.chunks(32).zip(want.chunks(32)).enumerate() {
                // Steps of max/8; the side opposite the extreme stops at 7 steps.
                let step = want.iter().fold(0f32, |a, v| a.max(v.abs())) / 8.0;
                for (a, b) in got.iter().zip(want) {
                    let bound = if b.abs() <= 7.5 * step { 0.5 } else { 1.0 } * step * 1.001;
                    assert!(
                        (a - b).abs() <= bound + 1e-7,
                        "row {r} group {g}: {a} vs {b}"
                    );
                }
            }
        }
        m.row_to_f32(0, &mut row);
        assert!(row[64..96].iter().all(|&v| v == 0.0));
        m.row_to_f32(1, &mut row);
        assert_eq!(row[64..96], wf[cols + 64..cols + 96]);
    }

    #[test]
    fn every_path_equals_the_definition_bit_for_bit() {
        for (rows, cols, n_tok) in [(1usize, 512usize, 1usize), (37, 1000, 3), (300, 2560, 2)] {
            let mut rnd = rng(rows as u64 * 31 + cols as u64);
            let wf: Vec<f32> = (0..rows * cols).map(|_| rnd() * 0.05).collect();
            let m = Q4Matrix::from_dense(
                &DenseMatrix::new(rows, cols, DenseData::F32(wf.into())).unwrap(),
            );
            let mut x: Vec<f32> = (0..n_tok * cols).map(|_| rnd()).collect();
            // Extremes: activations at ±2047 after quantization.
            x[0] = 1.0;
            x[1] = -1.0;
            let mut a12 = Int12Activations::with_capacity(n_tok, m.padded_cols());
            a12.quantize(&x, n_tok, cols, m.padded_cols());
            let mut acts = Q4Activations::default();
            acts.fill(&a12);
            // The definition: exact integer group sums, fma per lane in superblock order.
            let mut want = vec![0.0f32; rows * n_tok];
            let mut wrow = vec![0.0f32; cols];
            for r in 0..rows {
                m.row_to_f32(r, &mut wrow);
                let (_, scales) = m.row(r);
                for t in 0..n_tok {
                    let a = a12.row(t);
                    let mut lanes = [0.0f32; LANES];
                    for g in 0..m.padded_cols() / Q4_GROUP {
                        let d = scales[g].to_f32();
                        let sum: i32 = (g * 32..(g + 1) * 32)
                            .filter(|&c| c < cols)
                            .map(|c| {
                                let q = if d == 0.0 { 0.0 } else { wrow[c] / d };
                                q as i32 * a[c] as i32
                            })
                            .sum();
                        lanes[g % LANES] = d.mul_add(sum as f32, lanes[g % LANES]);
                    }
                    want[t * rows + r] = reduce_lanes(lanes) / a12.scale(t);
                }
            }
            for path in Q4Path::available() {
                let mut got = vec![f32::NAN; rows * n_tok];
                q4_matmul_with(path, &m, &acts, &mut got);
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{path:?} {rows}×{cols}"
                );
            }
        }
    }

    #[test]
    fn extreme_codes_and_activations_stay_exact() {
        // Groups at the extreme codes (-8 and 7, scale 1) against activations at ±2047: the
        // largest group sums.
        let cols = 1024;
        let wf: Vec<f32> = (0..2 * cols)
            .map(|i| if i < cols || i % 2 == 0 { -8.0 } else { 7.0 })
            .collect();
        let dense = DenseMatrix::new(2, cols, DenseData::F32(wf.clone().into())).unwrap();
        let m = Q4Matrix::from_dense(&dense);
        let mut row = vec![0.0; cols];
        m.row_to_f32(1, &mut row);
        assert_eq!(row, wf[cols..]);
        let x: Vec<f32> = (0..2 * cols)
            .map(|i| if i < cols || i % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        let mut a12 = Int12Activations::with_capacity(2, cols);
        a12.quantize(&x, 2, cols, cols);
        let mut acts = Q4Activations::default();
        acts.fill(&a12);
        let mut want = vec![0.0; 4];
        q4_matmul_with(Q4Path::Scalar, &m, &acts, &mut want);
        for (t, r) in [(0, 0), (1, 1), (0, 1), (1, 0)] {
            let exact: f64 = (0..cols)
                .map(|c| wf[r * cols + c] as f64 * x[t * cols + c] as f64)
                .sum();
            let got = want[t * 2 + r] as f64;
            assert!(
                (got - exact).abs() <= exact.abs() * 1e-6,
                "{t},{r}: {got} vs {exact}"
            );
        }
        for path in Q4Path::available() {
            let mut got = vec![0.0; 4];
            q4_matmul_with(path, &m, &acts, &mut got);
            assert_eq!(got, want, "{path:?}");
        }
    }
}
