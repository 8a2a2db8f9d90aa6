//! A Q6_K lm_head: ggml's Q6_K blocks (256 weights as 6-bit codes, 16 int8 sub-block scales
//! and one f16 `d`; 6.5625 bits a weight, 41% of the bytes of f16), read in place from a GGUF
//! file or quantized at load, and multiplied with activations quantized per token to 12 bits.
//!
//! Why 12 bits: int8 activations cost the int8 lm_head most of its perplexity
//! (docs/PERFORMANCE.md), and with `|a| ≤ 2047` every block's integer sum stays exact in
//! int32 for any valid block: `|q·sc| ≤ 32·128 = 4096`, `256 · 4096 · 2047 < 2^31`.
//! The float part (`d · Σ` per block, summed over the row in block order, divided by the
//! activation scale) is the same code on every path, so every path returns the same bits.

use super::matmul::{par_rows, SharedOut};
use crate::formats::mmap::Buffer;
use crate::{Error, Result};
use half::f16;

/// Weights a block holds.
pub const Q6K_BLOCK: usize = 256;
/// Bytes of one block: `ql[128]`, `qh[64]`, `scales[16]`, `d` (f16).
pub const Q6K_BLOCK_BYTES: usize = 210;
/// Largest activation magnitude (see the module comment for why 12 bits).
pub const ACT_MAX: f32 = 2047.0;

/// `[rows, cols]` weights in Q6_K blocks. Rows quantized here are zero-padded to whole
/// blocks (`padded_cols`); a GGUF Q6_K tensor always has whole blocks.
#[derive(Debug, Clone)]
pub struct Q6kMatrix {
    rows: usize,
    cols: usize,
    padded_cols: usize,
    data: Buffer<u8>,
}

impl Q6kMatrix {
    /// Wraps `data` (owned or a view of a file map) as `rows` rows of `cols` weights.
    pub fn new(rows: usize, cols: usize, data: Buffer<u8>) -> Result<Self> {
        if !cols.is_multiple_of(Q6K_BLOCK) {
            return Err(Error::Invalid(format!(
                "Q6_K matrix: {cols} columns is not a multiple of {Q6K_BLOCK}"
            )));
        }
        let want = rows
            .checked_mul(cols / Q6K_BLOCK * Q6K_BLOCK_BYTES)
            .ok_or_else(|| Error::Invalid(format!("Q6_K matrix: {rows}×{cols} overflows")))?;
        if data.len() != want {
            return Err(Error::Invalid(format!(
                "Q6_K matrix {rows}×{cols}: {} bytes, expected {want}",
                data.len()
            )));
        }
        Ok(Self {
            rows,
            cols,
            padded_cols: cols,
            data,
        })
    }

    /// Quantizes every row of `m` with [`crate::formats::ggml::quantize_q6_k`] (in parallel),
    /// releasing `m`'s mapped pages block by block as it goes (as
    /// [`super::int8::Int8Matrix::from_dense_releasing`] does). A matrix already in Q6_K
    /// (a GGUF Q6_K embedding) is shared as it is, not requantized. Quantizing is slow
    /// (about 0.1 µs a weight on one core): for big vocabularies, convert the file once
    /// (`bitnet convert --embedding-type q6_k`).
    pub fn from_dense_releasing(m: &super::DenseMatrix) -> Result<Self> {
        use rayon::prelude::*;
        let (rows, cols) = (m.rows(), m.cols());
        if let super::DenseData::Q6K(v) = m.data() {
            return Self::new(rows, cols, v.clone());
        }
        let padded_cols = cols.div_ceil(Q6K_BLOCK) * Q6K_BLOCK;
        let row_bytes = padded_cols / Q6K_BLOCK * Q6K_BLOCK_BYTES;
        let mut data = vec![0u8; rows * row_bytes];
        let mut failed = None;
        m.in_row_blocks(true, |span| {
            if failed.is_some() {
                return;
            }
            failed = data[span.start * row_bytes..span.end * row_bytes]
                .par_chunks_mut(row_bytes)
                .enumerate()
                .try_for_each_init(
                    || vec![0.0f32; padded_cols],
                    |row, (r, out)| -> Result<()> {
                        m.row_to_f32(span.start + r, &mut row[..cols]);
                        let q = crate::formats::ggml::quantize_q6_k(row).map_err(|e| {
                            Error::Invalid(format!("lm_head row {}: {e}", span.start + r))
                        })?;
                        out.copy_from_slice(&q);
                        Ok(())
                    },
                )
                .err();
        });
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(Self {
            rows,
            cols,
            padded_cols,
            data: data.into(),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Columns including the zero padding to whole blocks (the activation width).
    pub fn padded_cols(&self) -> usize {
        self.padded_cols
    }
    pub fn memory_bytes(&self) -> usize {
        self.data.len()
    }
    pub fn is_mapped(&self) -> bool {
        self.data.is_mapped()
    }

    /// Row `r`'s blocks (ggml's Q6_K layout, [`Q6K_BLOCK_BYTES`] each).
    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.padded_cols / Q6K_BLOCK * Q6K_BLOCK_BYTES;
        &self.data[r * n..(r + 1) * n]
    }

    /// Row `r` as the floats it stands for (ggml's dequantization); `out` has `cols` values.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        dequantize_row(self.row(r), &mut out[..self.cols]);
    }
}

/// ggml's dequantization of one block: `d · sc[j/16] · (code_j − 32)`.
fn dequantize_block(blk: &[u8], out: &mut [f32; Q6K_BLOCK]) {
    let d = block_d(blk);
    for (j, (o, c)) in out.iter_mut().zip(block_codes(blk)).enumerate() {
        *o = (d * blk[192 + j / 16] as i8 as f32) * (c as i32 - 32) as f32;
    }
}

fn block_d(blk: &[u8]) -> f32 {
    f16::from_le_bytes([blk[208], blk[209]]).to_f32()
}

/// The 256 unsigned codes (`q + 32`) of a block, in weight order: weight `128h + 32k + l`
/// has its low nibble in `ql[64h + l + 32(k & 1)]` (the high nibble when `k ≥ 2`) and its
/// top two bits at bits `2k..2k+2` of `qh[32h + l]`.
fn block_codes(blk: &[u8]) -> [u8; Q6K_BLOCK] {
    let (ql, qh) = (&blk[..128], &blk[128..192]);
    let mut codes = [0u8; Q6K_BLOCK];
    for (e, c) in codes.iter_mut().enumerate() {
        let (h, k, l) = (e / 128, (e % 128) / 32, e % 32);
        let low = ql[64 * h + l + 32 * (k & 1)] >> if k >= 2 { 4 } else { 0 };
        *c = (low & 0x0F) | (((qh[32 * h + l] >> (2 * k)) & 3) << 4);
    }
    codes
}

/// `Σ_j sc[j/16] · (code_j − 32) · a_j` over one block; exact (module comment).
pub fn block_dot_scalar(blk: &[u8], a: &[i16]) -> i32 {
    let codes = block_codes(blk);
    let mut total = 0i32;
    for (j, (sub_codes, sub_a)) in codes.chunks_exact(16).zip(a.chunks_exact(16)).enumerate() {
        let sum: i32 = sub_codes
            .iter()
            .zip(sub_a)
            .map(|(&c, &x)| (c as i32 - 32) * x as i32)
            .sum();
        total += blk[192 + j] as i8 as i32 * sum;
    }
    total
}

/// Activations quantized per token to `[-2047, 2047]`; buffers reused between calls.
#[derive(Debug, Default, Clone)]
pub struct Int12Activations {
    cols: usize,
    values: Vec<i16>,
    scales: Vec<f32>,
    /// Each value as `256·(high − 8) + low` with `low` in 0..=255 and `high` in 0..=15, as
    /// the unsigned operands of the int8-weight kernel ([`super::int8::int8_matmul_int12`];
    /// its NEON `sdot` path makes them signed on the fly).
    low: Vec<u8>,
    high: Vec<u8>,
}

impl Int12Activations {
    /// Buffers for up to `max_rows` rows of `max_cols` (padded) values, so quantizing that
    /// much allocates nothing.
    pub fn with_capacity(max_rows: usize, max_cols: usize) -> Self {
        Self {
            cols: 0,
            values: Vec::with_capacity(max_rows * max_cols),
            scales: Vec::with_capacity(max_rows),
            low: Vec::with_capacity(max_rows * max_cols),
            high: Vec::with_capacity(max_rows * max_cols),
        }
    }

    /// Quantizes rows of `x: [n, cols]`: `s = 2047 / max|x|`, `q = round_half_even(x·s)`,
    /// each row zero-padded to `padded` values. Allocates only when `n · padded` grows past
    /// what it held.
    pub fn quantize(&mut self, x: &[f32], n: usize, cols: usize, padded: usize) {
        assert_eq!(x.len(), n * cols, "activation size");
        assert!(padded >= cols, "activation padding");
        self.cols = padded;
        self.values.resize(n * padded, 0);
        self.scales.resize(n, 0.0);
        for ((row, q), s) in x
            .chunks_exact(cols)
            .zip(self.values.chunks_exact_mut(padded))
            .zip(&mut self.scales)
        {
            let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
            *s = ACT_MAX / max;
            q[cols..].fill(0);
            for (q, &v) in q.iter_mut().zip(row) {
                // NaN becomes 0 (`as` saturates and maps NaN to 0); clamping first keeps
                // rounding errors of `v·s` inside the range.
                *q = super::quant::round_half_even_small((v * *s).clamp(-ACT_MAX, ACT_MAX)) as i16;
            }
        }
        self.low.clear();
        self.low.extend(self.values.iter().map(|&v| v as u8));
        self.high.clear();
        // v + 2048 is in 1..=4095: its high byte is 0..=15.
        self.high
            .extend(self.values.iter().map(|&v| ((v as i32 + 2048) >> 8) as u8));
    }

    /// Row `t` as the `(low, high)` bytes of `v + 2048` (see the fields).
    pub fn split_row(&self, t: usize) -> (&[u8], &[u8]) {
        let span = t * self.cols..(t + 1) * self.cols;
        (&self.low[span.clone()], &self.high[span])
    }

    pub fn n_rows(&self) -> usize {
        self.scales.len()
    }
    /// Values a row holds (the padded width).
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn row(&self, t: usize) -> &[i16] {
        &self.values[t * self.cols..(t + 1) * self.cols]
    }
    pub fn scale(&self, t: usize) -> f32 {
        self.scales[t]
    }
}

/// The block product this CPU runs: the widest of AVX-512BW, AVX2, NEON, scalar, or scalar
/// when `BITNET_KERNEL=scalar` asks for the portable path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// Codes times sub-block scale with `smull`, then `smlal` with the activations.
    #[cfg(target_arch = "aarch64")]
    Neon,
}

impl Path {
    pub fn detect() -> Path {
        static AVAILABLE: std::sync::OnceLock<Vec<Path>> = std::sync::OnceLock::new();
        super::best_path(AVAILABLE.get_or_init(Self::available), Path::Scalar)
    }

    /// All paths this CPU can run (for tests and benchmarks), best last.
    pub fn available() -> Vec<Path> {
        #[allow(unused_mut)]
        let mut v = vec![Path::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                v.push(Path::Avx2);
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                v.push(Path::Avx512);
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                v.push(Path::Neon);
            }
        }
        v
    }

    /// [`block_dot_scalar`] on this path; `blk` is one block and `a` 256 values.
    fn block_dot(self, blk: &[u8], a: &[i16]) -> i32 {
        assert!(blk.len() == Q6K_BLOCK_BYTES && a.len() == Q6K_BLOCK);
        match self {
            Path::Scalar => block_dot_scalar(blk, a),
            // SAFETY: the feature was detected (`detect`/`available`); `blk` is 210 bytes
            // and `a` 256 values (asserted).
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => unsafe { x86::block_dot_avx2(blk, a) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => unsafe { x86::block_dot_avx512(blk, a) },
            // SAFETY: as above.
            #[cfg(target_arch = "aarch64")]
            Path::Neon => unsafe { arm::block_dot_neon(blk, a) },
        }
    }

    /// `Σ_b d_b · dot_b` of one row with one activation row (before the activation scale).
    fn row_dot(self, row: &[u8], a: &[i16]) -> f32 {
        let mut acc = 0.0f32;
        for (blk, a) in row
            .chunks_exact(Q6K_BLOCK_BYTES)
            .zip(a.chunks_exact(Q6K_BLOCK))
        {
            acc += block_d(blk) * self.block_dot(blk, a) as f32;
        }
        acc
    }
}

/// Dequantizes a row of whole blocks into `out` (`row.len() / 210 · 256` values) with the
/// widest vector unit this CPU has. Every weight `(d·sc)·q` is exact in f32 (`d` has 11
/// significant bits, `sc` 8 and `q` 5), so every path gives the same bits as
/// [`dequantize_row`]: the float lm_head product of a Q6_K matrix is the f32 product of
/// these rows (`DenseMatrix`).
pub fn dequantize_row_fast(row: &[u8], out: &mut [f32]) {
    dequantize_row_with(Path::detect(), row, out)
}

/// [`dequantize_row_fast`] on a given path (tests compare paths).
pub fn dequantize_row_with(path: Path, row: &[u8], out: &mut [f32]) {
    assert!(
        row.len().is_multiple_of(Q6K_BLOCK_BYTES)
            && out.len() == row.len() / Q6K_BLOCK_BYTES * Q6K_BLOCK,
        "Q6_K row of {} bytes into {} values",
        row.len(),
        out.len()
    );
    match path {
        Path::Scalar => dequantize_row(row, out),
        // SAFETY: `Path` values other than Scalar come from feature detection (`detect`,
        // `available`); the sizes were checked above.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { x86::dequantize_row_avx2(row, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => unsafe { x86::dequantize_row_avx512(row, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "aarch64")]
        Path::Neon => unsafe { arm::dequantize_row_neon(row, out) },
    }
}

/// Dequantizes a row of whole blocks into `out` (`out.len()` values).
pub fn dequantize_row(row: &[u8], out: &mut [f32]) {
    let mut block = [0.0f32; Q6K_BLOCK];
    for (blk, o) in row
        .chunks_exact(Q6K_BLOCK_BYTES)
        .zip(out.chunks_mut(Q6K_BLOCK))
    {
        dequantize_block(blk, &mut block);
        o.copy_from_slice(&block[..o.len()]);
    }
}

/// `out[t][r] = (Σ_b d_b · Σ_j sc·q·a) / s_a[t]` for every row `r` and token `t`;
/// `out` is `[n_tok, rows]`. Rows are split over the spinning pool.
pub fn q6k_matmul(w: &Q6kMatrix, acts: &Int12Activations, out: &mut [f32]) {
    q6k_matmul_with(Path::detect(), w, acts, out)
}

/// [`q6k_matmul`] on a given path (tests compare paths).
pub fn q6k_matmul_with(path: Path, w: &Q6kMatrix, acts: &Int12Activations, out: &mut [f32]) {
    let (rows, n_tok) = (w.rows, acts.n_rows());
    assert_eq!(acts.cols, w.padded_cols, "Q6_K matmul width");
    assert_eq!(out.len(), rows * n_tok, "Q6_K matmul output size");
    assert!(Path::available().contains(&path), "{path:?} not available");
    let o = SharedOut(out.as_mut_ptr());
    par_rows(rows, &|r| {
        let wr = w.row(r);
        for t in 0..n_tok {
            let v = path.row_dot(wr, acts.row(t)) / acts.scale(t);
            // SAFETY: (t, r) is inside `out` (checked) and row r is this task's alone.
            unsafe { o.put(t * rows + r, v) };
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The 256 codes (`q + 32`) of a block in weight order, 64 to a vector.
    ///
    /// Safety: needs AVX-512F and BW; `blk` has at least 208 bytes.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn codes_512(blk: &[u8]) -> [__m512i; 4] {
        let m4 = _mm512_set1_epi8(0x0F);
        let m3 = _mm512_set1_epi8(0x03);
        // Shift counts for the top bits: 16-bit lanes of the low 256 bits shift by 0 (k = 0),
        // the high ones by 2 (k = 1); +4 for k = 2, 3 (the high nibbles).
        let shift_lo = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
        let shift_hi = _mm512_add_epi16(shift_lo, _mm512_set1_epi16(4));
        let mut out = [_mm512_setzero_si512(); 4];
        for h in 0..2 {
            // SAFETY: bytes 64h..64h+64 and 128+32h..+32 are inside the first 208 bytes.
            let (ql, qh) = unsafe {
                (
                    _mm512_loadu_si512(blk.as_ptr().add(64 * h).cast()),
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(
                        blk.as_ptr().add(128 + 32 * h).cast(),
                    )),
                )
            };
            let top_lo =
                _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, shift_lo), m3), 4);
            let top_hi =
                _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, shift_hi), m3), 4);
            out[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, m4), top_lo);
            out[2 * h + 1] =
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4), top_hi);
        }
        out
    }

    /// The 256 codes of a block in weight order, 32 to a vector.
    ///
    /// Safety: needs AVX2; `blk` has at least 208 bytes.
    #[target_feature(enable = "avx2")]
    unsafe fn codes_256(blk: &[u8]) -> [__m256i; 8] {
        let m4 = _mm256_set1_epi8(0x0F);
        let m3 = _mm256_set1_epi8(0x03);
        let mut out = [_mm256_setzero_si256(); 8];
        for h in 0..2 {
            // SAFETY: bytes 64h..64h+64 and 128+32h..+32 are inside the first 208 bytes.
            let (ql0, ql1, qh) = unsafe {
                (
                    _mm256_loadu_si256(blk.as_ptr().add(64 * h).cast()),
                    _mm256_loadu_si256(blk.as_ptr().add(64 * h + 32).cast()),
                    _mm256_loadu_si256(blk.as_ptr().add(128 + 32 * h).cast()),
                )
            };
            let top = |bits: __m256i| _mm256_slli_epi16(_mm256_and_si256(bits, m3), 4);
            out[4 * h] = _mm256_or_si256(_mm256_and_si256(ql0, m4), top(qh));
            out[4 * h + 1] =
                _mm256_or_si256(_mm256_and_si256(ql1, m4), top(_mm256_srli_epi16(qh, 2)));
            out[4 * h + 2] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                top(_mm256_srli_epi16(qh, 4)),
            );
            out[4 * h + 3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                top(_mm256_srli_epi16(qh, 6)),
            );
        }
        out
    }

    /// [`super::block_dot_scalar`] with 512-bit vectors: the codes of 32 weights are widened
    /// to 16 bits, centred, multiplied by their sub-block scale (`|q·sc| ≤ 4096` fits 16
    /// bits) and multiply-added with the activations into 32-bit lanes.
    ///
    /// Safety: needs AVX-512F and BW; `blk` has 210 bytes and `a` 256 values.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn block_dot_avx512(blk: &[u8], a: &[i16]) -> i32 {
        debug_assert!(blk.len() >= 210 && a.len() >= 256);
        let c32 = _mm512_set1_epi8(32);
        // SAFETY: the caller guarantees the features and sizes; the scale load reads bytes
        // 192..208 and the activation loads values below 256.
        unsafe {
            // Centred while still bytes (codes 0..63 → −32..31), 64 at a time.
            let codes = codes_512(blk).map(|c| _mm512_sub_epi8(c, c32));
            let scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.as_ptr().add(192).cast()));
            let scales = _mm512_broadcast_i64x4(scales);
            let mut acc = _mm512_setzero_si512();
            for group in 0..8 {
                // Weights 32·group .. +32: sub-blocks 2·group and 2·group + 1.
                let c = codes[group / 2];
                let c = if group % 2 == 0 {
                    _mm512_castsi512_si256(c)
                } else {
                    _mm512_extracti64x4_epi64(c, 1)
                };
                let q = _mm512_cvtepi8_epi16(c);
                let s0 = 2 * group as i16;
                let idx = _mm512_inserti64x4(_mm512_set1_epi16(s0), _mm256_set1_epi16(s0 + 1), 1);
                let qs = _mm512_mullo_epi16(q, _mm512_permutexvar_epi16(idx, scales));
                let av = _mm512_loadu_si512(a.as_ptr().add(32 * group).cast());
                acc = _mm512_add_epi32(acc, _mm512_madd_epi16(qs, av));
            }
            _mm512_reduce_add_epi32(acc)
        }
    }

    /// [`block_dot_avx512`] with 256-bit vectors: one 16-weight sub-block a step, its
    /// scale broadcast.
    ///
    /// Safety: needs AVX2; `blk` has 210 bytes and `a` 256 values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn block_dot_avx2(blk: &[u8], a: &[i16]) -> i32 {
        debug_assert!(blk.len() >= 210 && a.len() >= 256);
        let c32 = _mm256_set1_epi16(32);
        // SAFETY: the caller guarantees the feature and sizes; activation loads read
        // values below 256.
        unsafe {
            let codes = codes_256(blk);
            let mut acc = _mm256_setzero_si256();
            for sub in 0..16 {
                let c = codes[sub / 2];
                let c = if sub % 2 == 0 {
                    _mm256_castsi256_si128(c)
                } else {
                    _mm256_extracti128_si256(c, 1)
                };
                let q = _mm256_sub_epi16(_mm256_cvtepu8_epi16(c), c32);
                let sc = _mm256_set1_epi16(blk[192 + sub] as i8 as i16);
                let av = _mm256_loadu_si256(a.as_ptr().add(16 * sub).cast());
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_mullo_epi16(q, sc), av));
            }
            let s = _mm_add_epi32(
                _mm256_castsi256_si128(acc),
                _mm256_extracti128_si256(acc, 1),
            );
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            _mm_cvtsi128_si32(s)
        }
    }

    /// [`super::dequantize_row`] with 16 lanes: codes widened to 32 bits, centred, converted
    /// and multiplied by `d·sc` (both exact in f32, so the product is too).
    ///
    /// Safety: needs AVX-512F and BW; `out` has `row.len() / 210 · 256` values.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn dequantize_row_avx512(row: &[u8], out: &mut [f32]) {
        let c32 = _mm512_set1_epi32(32);
        for (blk, o) in row.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
            let d = super::block_d(blk);
            // SAFETY: the caller guarantees the features; `blk` has 210 bytes and `o` 256
            // values (chunks_exact), every load and store is inside them.
            unsafe {
                let codes = codes_512(blk);
                for sub in 0..16 {
                    let z = codes[sub / 4];
                    let c = match sub % 4 {
                        0 => _mm512_extracti32x4_epi32::<0>(z),
                        1 => _mm512_extracti32x4_epi32::<1>(z),
                        2 => _mm512_extracti32x4_epi32::<2>(z),
                        _ => _mm512_extracti32x4_epi32::<3>(z),
                    };
                    let q = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(c), c32));
                    let w = _mm512_mul_ps(_mm512_set1_ps(d * blk[192 + sub] as i8 as f32), q);
                    _mm512_storeu_ps(o.as_mut_ptr().add(16 * sub), w);
                }
            }
        }
    }

    /// [`dequantize_row_avx512`] with 8 lanes.
    ///
    /// Safety: needs AVX2; `out` has `row.len() / 210 · 256` values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequantize_row_avx2(row: &[u8], out: &mut [f32]) {
        let c32 = _mm256_set1_epi32(32);
        for (blk, o) in row.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
            let d = super::block_d(blk);
            // SAFETY: as in `dequantize_row_avx512`.
            unsafe {
                let codes = codes_256(blk);
                for sub in 0..16 {
                    let c = codes[sub / 2];
                    let c = if sub % 2 == 0 {
                        _mm256_castsi256_si128(c)
                    } else {
                        _mm256_extracti128_si256(c, 1)
                    };
                    let sc = _mm256_set1_ps(d * blk[192 + sub] as i8 as f32);
                    let lo = _mm256_cvtepu8_epi32(c);
                    let hi = _mm256_cvtepu8_epi32(_mm_srli_si128(c, 8));
                    let p = o.as_mut_ptr().add(16 * sub);
                    _mm256_storeu_ps(
                        p,
                        _mm256_mul_ps(sc, _mm256_cvtepi32_ps(_mm256_sub_epi32(lo, c32))),
                    );
                    _mm256_storeu_ps(
                        p.add(8),
                        _mm256_mul_ps(sc, _mm256_cvtepi32_ps(_mm256_sub_epi32(hi, c32))),
                    );
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    /// The 256 codes (`q + 32`) of a block in weight order, one 16-weight sub-block a
    /// vector (layout at [`super::block_codes`]).
    ///
    /// Safety: needs NEON; `blk` has at least 192 bytes.
    #[inline(always)]
    unsafe fn codes(blk: &[u8]) -> [uint8x16_t; 16] {
        let (m4, top) = (vdupq_n_u8(0x0F), vdupq_n_u8(0x30));
        let p = blk.as_ptr();
        let mut out = [vdupq_n_u8(0); 16];
        for h in 0..2 {
            for v in 0..2 {
                // SAFETY: ql bytes 64h + 16v (+ 32) .. +16 and qh bytes 128 + 32h + 16v .. +16
                // are all below 192.
                let (ql0, ql1, qh) = unsafe {
                    (
                        vld1q_u8(p.add(64 * h + 16 * v)),
                        vld1q_u8(p.add(64 * h + 32 + 16 * v)),
                        vld1q_u8(p.add(128 + 32 * h + 16 * v)),
                    )
                };
                // Weights 128h + 32k + 16v .. +16 (sub-block 8h + 2k + v); qh bits 2k, 2k+1
                // moved to bits 4, 5.
                let j = 8 * h + v;
                // SAFETY: register-only NEON arithmetic; callers run only where NEON is.
                unsafe {
                    out[j] = vorrq_u8(vandq_u8(ql0, m4), vandq_u8(vshlq_n_u8::<4>(qh), top));
                    out[j + 2] = vorrq_u8(vandq_u8(ql1, m4), vandq_u8(vshlq_n_u8::<2>(qh), top));
                    out[j + 4] = vorrq_u8(vshrq_n_u8::<4>(ql0), vandq_u8(qh, top));
                    out[j + 6] = vorrq_u8(vshrq_n_u8::<4>(ql1), vandq_u8(vshrq_n_u8::<2>(qh), top));
                }
            }
        }
        out
    }

    /// [`super::block_dot_scalar`]: per sub-block, the centred codes times the scale with
    /// `smull` (`|q·sc| ≤ 32·128 = 4096`, 16 bits), then `smlal` with the activations into
    /// four int32 accumulators. Every partial sum is a sum of some of the block's 256
    /// products, so it stays under the block bound `256·4096·2047 < 2^31`.
    ///
    /// Safety: needs NEON; `blk` has 210 bytes and `a` 256 values.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn block_dot_neon(blk: &[u8], a: &[i16]) -> i32 {
        debug_assert!(blk.len() >= 210 && a.len() >= 256);
        let c32 = vdupq_n_s8(32);
        // SAFETY: `blk` has at least 192 bytes (caller).
        let codes = unsafe { codes(blk) };
        let mut acc = [vdupq_n_s32(0); 4];
        for (j, &c) in codes.iter().enumerate() {
            let q = vsubq_s8(vreinterpretq_s8_u8(c), c32);
            let sc = vdupq_n_s8(blk[192 + j] as i8);
            let (lo, hi) = (
                vmull_s8(vget_low_s8(q), vget_low_s8(sc)),
                vmull_high_s8(q, sc),
            );
            // SAFETY: values 16j .. 16j + 16 are below 256, inside `a` (caller).
            let (a0, a1) = unsafe {
                (
                    vld1q_s16(a.as_ptr().add(16 * j)),
                    vld1q_s16(a.as_ptr().add(16 * j + 8)),
                )
            };
            acc[0] = vmlal_s16(acc[0], vget_low_s16(lo), vget_low_s16(a0));
            acc[1] = vmlal_high_s16(acc[1], lo, a0);
            acc[2] = vmlal_s16(acc[2], vget_low_s16(hi), vget_low_s16(a1));
            acc[3] = vmlal_high_s16(acc[3], hi, a1);
        }
        vaddvq_s32(vaddq_s32(
            vaddq_s32(acc[0], acc[1]),
            vaddq_s32(acc[2], acc[3]),
        ))
    }

    /// [`super::dequantize_row`]: centred codes widened to 32 bits, converted and
    /// multiplied by `d·sc`, the same two roundings (both exact) as the scalar path.
    ///
    /// Safety: needs NEON.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dequantize_row_neon(row: &[u8], out: &mut [f32]) {
        let c32 = vdupq_n_s8(32);
        for (blk, o) in row.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
            let d = super::block_d(blk);
            // SAFETY: `blk` has 210 bytes (chunks_exact).
            let codes = unsafe { codes(blk) };
            for (j, &c) in codes.iter().enumerate() {
                let q = vsubq_s8(vreinterpretq_s8_u8(c), c32);
                let (lo, hi) = (vmovl_s8(vget_low_s8(q)), vmovl_high_s8(q));
                let quads = [
                    vmovl_s16(vget_low_s16(lo)),
                    vmovl_high_s16(lo),
                    vmovl_s16(vget_low_s16(hi)),
                    vmovl_high_s16(hi),
                ];
                let s = d * blk[192 + j] as i8 as f32;
                for (k, v) in quads.into_iter().enumerate() {
                    // SAFETY: values 16j + 4k .. +4 are below 256, inside `o`
                    // (chunks_exact_mut).
                    unsafe {
                        vst1q_f32(
                            o.as_mut_ptr().add(16 * j + 4 * k),
                            vmulq_n_f32(vcvtq_f32_s32(v), s),
                        )
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::ggml::{dequantize_row, quantize_q6_k, GgmlType};

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            s.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    /// Blocks of random bytes (any code, any int8 scale) with a finite `d`.
    fn random_blocks(n: usize, seed: u64) -> Vec<u8> {
        let mut r = rng(seed);
        let mut v: Vec<u8> = (0..n * Q6K_BLOCK_BYTES).map(|_| r() as u8).collect();
        for b in v.chunks_exact_mut(Q6K_BLOCK_BYTES) {
            let d = f16::from_f32((r() % 1000) as f32 / 1e5);
            b[208..].copy_from_slice(&d.to_le_bytes());
        }
        v
    }

    #[test]
    fn codes_and_rows_match_ggml_dequantization() {
        let data = random_blocks(3, 7);
        let m = Q6kMatrix::new(1, 768, data.clone().into()).unwrap();
        let mut ours = vec![0.0; 768];
        m.row_to_f32(0, &mut ours);
        let mut reference = vec![0.0; 768];
        dequantize_row(GgmlType::Q6_K, &data, &mut reference).unwrap();
        assert_eq!(ours, reference);
    }

    #[test]
    fn every_path_equals_scalar_on_random_and_extreme_blocks() {
        let mut r = rng(11);
        let mut cases: Vec<(Vec<u8>, Vec<i16>)> = Vec::new();
        for seed in 0..40 {
            let blk = random_blocks(1, seed);
            let a: Vec<i16> = (0..256).map(|_| (r() % 4095) as i16 - 2047).collect();
            cases.push((blk, a));
        }
        // The extremes the int32 bound is proven for: every code −32, every scale −128,
        // activations all −2047 (and +2047): |sum| = 256·4096·2047.
        let mut worst = vec![0u8; Q6K_BLOCK_BYTES];
        worst[192..208].fill(0x80);
        cases.push((worst.clone(), vec![-2047; 256]));
        cases.push((worst.clone(), vec![2047; 256]));
        let mut top = vec![0xFFu8; Q6K_BLOCK_BYTES]; // codes 63, scales −1
        top[192..208].fill(0x7F);
        cases.push((top.clone(), vec![2047; 256]));
        // Codes 63 at scale −128 and codes 0 at 127, against alternating activations.
        top[192..208].fill(0x80);
        cases.push((top, (0..256).map(|j| [2047, -2047][j % 2]).collect()));
        let mut scales_127 = worst.clone();
        scales_127[192..208].fill(0x7F);
        cases.push((
            scales_127,
            (0..256).map(|j| [-2047, 2047][j % 3 / 2]).collect(),
        ));
        // Random blocks against extreme activations, and every 12-bit value.
        for seed in 100..110 {
            let a = (0..256)
                .map(|_| [-2047, 2047][(r() % 2) as usize])
                .collect();
            cases.push((random_blocks(1, seed), a));
        }
        for start in (0..4095).step_by(256) {
            let a = (0..256)
                .map(|j| ((start + j) % 4095) as i16 - 2047)
                .collect();
            cases.push((random_blocks(1, start as u64), a));
        }
        for (blk, a) in &cases {
            let want = block_dot_scalar(blk, a);
            for path in Path::available() {
                assert_eq!(path.block_dot(blk, a), want, "{path:?}");
            }
        }
        assert_eq!(
            block_dot_scalar(&worst, &[-2047; 256]),
            256 * 4096 * -2047,
            "the bound's extreme is exact"
        );
    }

    #[test]
    fn matmul_matches_the_dequantized_product_and_paths_agree() {
        for (rows, cols, n_tok) in [(1, 256, 1), (300, 512, 3), (7, 4096, 2)] {
            matmul_case(rows, cols, n_tok);
        }
    }

    fn matmul_case(rows: usize, cols: usize, n_tok: usize) {
        let mut r = rng(5 + cols as u64);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| ((r() % 20001) as f32 / 10000.0 - 1.0) * 0.05)
            .collect();
        let data: Vec<u8> = w
            .chunks_exact(cols)
            .flat_map(|row| quantize_q6_k(row).unwrap())
            .collect();
        let m = Q6kMatrix::new(rows, cols, data.into()).unwrap();
        let x: Vec<f32> = (0..n_tok * cols)
            .map(|_| (r() % 20001) as f32 / 10000.0 - 1.0)
            .collect();
        let mut acts = Int12Activations::default();
        acts.quantize(&x, n_tok, cols, cols);
        let mut want = vec![0.0; rows * n_tok];
        q6k_matmul_with(Path::Scalar, &m, &acts, &mut want);
        for path in Path::available() {
            let mut got = vec![0.0; rows * n_tok];
            q6k_matmul_with(path, &m, &acts, &mut got);
            assert_eq!(got, want, "{path:?}");
        }
        // Against f64 products of the dequantized weights and the float activations: the
        // only extra error is the 12-bit activation rounding.
        let mut row = vec![0.0; cols];
        for rr in 0..rows {
            m.row_to_f32(rr, &mut row);
            for t in 0..n_tok {
                let xt = &x[t * cols..(t + 1) * cols];
                let exact: f64 = row.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                let bound: f64 = row.iter().map(|&a| a.abs() as f64).sum::<f64>() / 2047.0;
                let g = want[t * rows + rr] as f64;
                assert!((g - exact).abs() <= bound, "({t},{rr}): {g} vs {exact}");
            }
        }
    }

    #[test]
    fn vector_dequantization_equals_scalar_bit_for_bit() {
        for (seed, blocks) in [(1u64, 1usize), (2, 3), (3, 10), (4, 2)] {
            let mut row = random_blocks(blocks, seed);
            if seed == 4 {
                // Extremes: codes 0 at scale −128, codes 63 at scale 127, largest f16 `d`.
                row[..192].fill(0);
                row[192..208].fill(0x80);
                row[210..402].fill(0xFF);
                row[402..418].fill(0x7F);
                for b in row.chunks_exact_mut(Q6K_BLOCK_BYTES) {
                    b[208..].copy_from_slice(&f16::MAX.to_le_bytes());
                }
            }
            let mut want = vec![0.0; blocks * 256];
            super::dequantize_row(&row, &mut want);
            for path in Path::available() {
                let mut got = vec![f32::NAN; blocks * 256];
                dequantize_row_with(path, &row, &mut got);
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{path:?}"
                );
            }
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(Q6kMatrix::new(2, 300, vec![0u8; 420].into()).is_err());
        let e = Q6kMatrix::new(2, 256, vec![0u8; 419].into()).unwrap_err();
        assert!(e.to_string().contains("expected 420"), "{e}");
    }

    #[test]
    fn nan_and_zero_activations_quantize_to_zero() {
        let mut acts = Int12Activations::default();
        acts.quantize(&[0.0, f32::NAN, 0.0, 0.0], 2, 2, 2);
        assert_eq!(acts.row(0), &[0, 0]);
        assert_eq!(acts.row(1), &[0, 0]);
    }
}
