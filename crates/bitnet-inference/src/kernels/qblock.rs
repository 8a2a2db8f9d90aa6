//! Linears in ggml's 32-weight blocks — Q4_0, Q4_1 and Q8_0 — kept as the file stores them
//! (viewed in the file map, [`super::DenseData::Q32`]) and multiplied in one of two ways
//! ([`QuantActs`]):
//!
//! - **exact** (the default): f32 activations times the exactly dequantized weights, the
//!   function the old load-time dequantization to f32 computed, with the same bits: every
//!   weight is decoded as ggml's reference does (`(q − 8)·d`, `q·d + m` with two roundings,
//!   `q·d`), and each (row, token) dot product sums in the order of the f32 kernel of the same
//!   instruction set ([`super::dense`]: two 16-lane FMA accumulators on AVX-512, two 8-lane
//!   ones on AVX2, eight scalar ones elsewhere). Decode (one token) decodes each block in
//!   registers as it is read; prefill decodes a panel of rows once into L1 and runs a
//!   register-tiled f32 GEMM over every token (the decoding is paid once per panel and block
//!   of tokens, not once per token).
//! - **q8** (llama.cpp's way): each token's activations are quantized to Q8 blocks (int8 and
//!   a scale `d = max|x|/127` per 32, f16-rounded as ggml stores it; with `s = d·Σq` for Q4_1,
//!   ggml's Q8_1), and each block's integer dot product `Σ q_w·q_a` is exact; the float part
//!   `acc += (d_w·d_a)·Σ` (`+ m_w·s_a` for Q4_1), in block order, is the same code on every
//!   path, so every path returns the same bits.

use super::matmul::{chunk_rows, SharedOut};
use crate::formats::ggml::GgmlType;
use half::f16;
use std::cell::RefCell;

/// Weights a block holds.
pub const QK: usize = 32;

/// The block types kept in their blocks.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockType {
    /// f16 `d`, 16 bytes of nibbles (low = weights 0..16, high = 16..32); `(q − 8)·d`.
    Q4_0,
    /// f16 `d`, f16 `m`, nibbles as Q4_0; `q·d + m`.
    Q4_1,
    /// f16 `d`, 32 int8; `q·d`.
    Q8_0,
}

impl BlockType {
    pub fn from_ggml(t: GgmlType) -> Option<Self> {
        match t {
            GgmlType::Q4_0 => Some(BlockType::Q4_0),
            GgmlType::Q4_1 => Some(BlockType::Q4_1),
            GgmlType::Q8_0 => Some(BlockType::Q8_0),
            _ => None,
        }
    }
    pub const fn block_bytes(self) -> usize {
        match self {
            BlockType::Q4_0 => 18,
            BlockType::Q4_1 => 20,
            BlockType::Q8_0 => 34,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            BlockType::Q4_0 => "q4_0",
            BlockType::Q4_1 => "q4_1",
            BlockType::Q8_0 => "q8_0",
        }
    }
    /// Bytes of a row of `cols` weights (`None` unless whole blocks).
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        cols.is_multiple_of(QK)
            .then(|| cols / QK * self.block_bytes())
    }
}

/// How activations meet Q4_0/Q4_1/Q8_0 weights (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum QuantActs {
    /// f32 activations, exactly dequantized weights (the default).
    #[default]
    Exact,
    /// Activations quantized to Q8 blocks per token, integer block dots (llama.cpp's way).
    Q8,
}

impl std::str::FromStr for QuantActs {
    type Err = String;
    /// The names the command line takes: `exact` (or `f32`), `q8`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exact" | "f32" => Ok(QuantActs::Exact),
            "q8" => Ok(QuantActs::Q8),
            _ => Err(format!(
                "unknown activation mode `{s}`: expected exact or q8"
            )),
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// One block decoded as ggml's reference does (`formats::ggml::dequantize_row`).
fn decode_block(ty: BlockType, b: &[u8], y: &mut [f32]) {
    match ty {
        BlockType::Q4_0 => {
            let d = f16_at(b, 0);
            for j in 0..16 {
                y[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
                y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        BlockType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for j in 0..16 {
                y[j] = (b[4 + j] & 0x0F) as f32 * d + m;
                y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
            }
        }
        BlockType::Q8_0 => {
            let d = f16_at(b, 0);
            for (o, &q) in y.iter_mut().zip(&b[2..34]) {
                *o = q as i8 as f32 * d;
            }
        }
    }
}

/// Dequantizes a row of whole blocks into `out` (`row.len() / block_bytes · 32` values).
pub fn dequantize_row(ty: BlockType, row: &[u8], out: &mut [f32]) {
    let bb = ty.block_bytes();
    assert!(
        row.len().is_multiple_of(bb) && out.len() == row.len() / bb * QK,
        "{} row of {} bytes into {} values",
        ty.name(),
        row.len(),
        out.len()
    );
    for (b, y) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
        decode_block(ty, b, y);
    }
}

/// Dequantizes with the widest vector unit (the same bits as [`dequantize_row`]).
pub fn dequantize_row_fast(ty: BlockType, row: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::dequantize_row(ty, row, out) {
            return;
        }
    }
    dequantize_row(ty, row, out)
}

/// The instruction sets of the exact kernels: those of the f32 dense kernel, whose sum order
/// they reproduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExactPath {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl ExactPath {
    /// The f32 dense kernel's choice on this CPU.
    pub fn detect() -> ExactPath {
        #[cfg(target_arch = "x86_64")]
        {
            match super::dense::f32_level() {
                Some(true) => return ExactPath::Avx512,
                Some(false) => return ExactPath::Avx2,
                None => {}
            }
        }
        ExactPath::Scalar
    }

    /// Every path this CPU runs (tests), best last.
    pub fn available() -> Vec<ExactPath> {
        #[allow(unused_mut)]
        let mut v = vec![ExactPath::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                v.push(ExactPath::Avx2);
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                v.push(ExactPath::Avx512);
            }
        }
        v
    }
}

/// Token rows under which decode-style kernels (blocks decoded in registers) run; from it on,
/// panels of decoded rows are multiplied with tiles of tokens.
const PANEL_MIN_TOKENS: usize = 4;
/// Tokens a panel is multiplied with before the next panel is decoded (their rows stay in
/// L2: 64 × 1536 × 4 bytes = 384 KiB at most for SmolLM2's widest input).
const TOKEN_BLOCK: usize = 64;

thread_local! {
    /// Decoded rows of one panel (f32), reused between calls.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Checks that `data` holds `rows` whole-block rows of `cols` weights.
fn check(ty: BlockType, data: &[u8], rows: usize, cols: usize) -> usize {
    let rb = ty
        .row_bytes(cols)
        .expect("block matrices have whole-block rows (checked by DenseMatrix::new)");
    assert_eq!(data.len(), rows * rb, "{} matrix size", ty.name());
    rb
}

/// `out[t][r] = Σ_k W[r][k]·x[t][k]` with the exactly dequantized weights, the bits of the
/// f32 dense product of the dequantized matrix on the same path; `x` is `[n_tok, cols]`,
/// `out` `[n_tok, rows]`. Rows are split over the spinning pool.
pub fn matmul_exact(
    ty: BlockType,
    data: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tok: usize,
    out: &mut [f32],
) {
    matmul_exact_with(ExactPath::detect(), ty, data, rows, cols, x, n_tok, out)
}

/// [`matmul_exact`] on a given path (tests compare paths).
#[allow(clippy::too_many_arguments)]
pub fn matmul_exact_with(
    path: ExactPath,
    ty: BlockType,
    data: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tok: usize,
    out: &mut [f32],
) {
    let rb = check(ty, data, rows, cols);
    assert_eq!(x.len(), n_tok * cols, "block matmul input size");
    assert_eq!(out.len(), n_tok * rows, "block matmul output size");
    assert!(
        ExactPath::available().contains(&path),
        "{path:?} not available"
    );
    let chunk = chunk_rows(rows, 4);
    let o = SharedOut(out.as_mut_ptr());
    super::pool::SpinPool::current().run(rows.div_ceil(chunk), &|c| {
        let span = c * chunk..((c + 1) * chunk).min(rows);
        // Writes output (t, r) of this task's rows: inside `out` (checked) and no other
        // task's.
        let put = |t: usize, r: usize, v: f32| {
            debug_assert!(r < rows && t < n_tok);
            // SAFETY: (t, r) is inside `out` and row r belongs to this task alone.
            unsafe { *o.at(t * rows + r) = v }
        };
        match path {
            ExactPath::Scalar => exact_scalar(ty, data, rb, cols, span, x, n_tok, &put),
            #[cfg(target_arch = "x86_64")]
            _ => x86::exact(path, ty, data, rb, cols, span, x, n_tok, &put),
        }
    });
}

/// The portable exact product: each row decoded once, then the f32 dense kernel's scalar dot
/// with every token.
#[allow(clippy::too_many_arguments)]
fn exact_scalar(
    ty: BlockType,
    data: &[u8],
    rb: usize,
    cols: usize,
    span: std::ops::Range<usize>,
    x: &[f32],
    n_tok: usize,
    put: &dyn Fn(usize, usize, f32),
) {
    PANEL.with_borrow_mut(|row| {
        row.resize(cols, 0.0);
        for r in span {
            dequantize_row(ty, &data[r * rb..(r + 1) * rb], row);
            for t in 0..n_tok {
                put(
                    t,
                    r,
                    super::dense::dot_f32(row, &x[t * cols..(t + 1) * cols]),
                );
            }
        }
    })
}

// ---------------------------------------------------------------------------------------
// Q8 activations (llama.cpp's way)
// ---------------------------------------------------------------------------------------

/// Activations quantized per 32-block to int8 as ggml's `quantize_row_q8_0`/`q8_1` do on
/// x86 (`d = max|x| / 127`, `q = round_half_even(x · 127/max|x|)`, `d` stored as f16), with
/// the block sums Q4_0/Q4_1/Q8_0 need. Scales are stored block-major (`[block][token]`) so
/// a tile of tokens reads them contiguously.
#[derive(Debug, Default, Clone)]
pub struct Q8Activations {
    cols: usize,
    n: usize,
    qs: Vec<i8>,
    /// `[cols/32][n]`: the f16-rounded `d`.
    d: Vec<f32>,
    /// `[cols/32][n]`: ggml's Q8_1 `s = f16(d · Σq)`.
    s: Vec<f32>,
    /// `[n][cols/32]`: `Σq` of each block.
    sums: Vec<i32>,
}

impl Q8Activations {
    /// Quantizes the rows of `x: [n, cols]` (`cols` a multiple of 32).
    pub fn quantize(&mut self, x: &[f32], n: usize, cols: usize) {
        assert!(
            cols.is_multiple_of(QK) && x.len() == n * cols,
            "Q8 activations"
        );
        let nb = cols / QK;
        self.cols = cols;
        self.n = n;
        self.qs.resize(n * cols, 0);
        self.d.resize(n * nb, 0.0);
        self.s.resize(n * nb, 0.0);
        self.sums.resize(n * nb, 0);
        for t in 0..n {
            for b in 0..nb {
                let xb = &x[t * cols + b * QK..t * cols + (b + 1) * QK];
                let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                let q = &mut self.qs[t * cols + b * QK..t * cols + (b + 1) * QK];
                let mut sum = 0i32;
                for (q, &v) in q.iter_mut().zip(xb) {
                    // |v·id| ≤ 127 (up to rounding, hence the clamp); NaN becomes 0.
                    *q = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
                    sum += *q as i32;
                }
                self.d[b * n + t] = f16::from_f32(d).to_f32();
                self.s[b * n + t] = f16::from_f32(sum as f32 * d).to_f32();
                self.sums[t * nb + b] = sum;
            }
        }
    }

    pub fn n_rows(&self) -> usize {
        self.n
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Token `t`'s int8 values.
    pub fn row(&self, t: usize) -> &[i8] {
        &self.qs[t * self.cols..(t + 1) * self.cols]
    }
}

thread_local! {
    /// The activations of a Q8 product, reused between calls (the forward pass makes no
    /// allocation once they have grown).
    pub(crate) static Q8_ACTS: RefCell<Q8Activations> = RefCell::new(Q8Activations::default());
}

/// The integer block products of the q8 mode: AVX-512 VNNI (256-bit `vpdpbusd`), AVX2
/// (`vpmaddubsw`), or scalar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Q8Path {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Q8Path {
    pub fn detect() -> Q8Path {
        static PATH: std::sync::OnceLock<Q8Path> = std::sync::OnceLock::new();
        *PATH.get_or_init(|| super::best_path(Self::available(), Q8Path::Scalar))
    }

    /// Every path this CPU runs, best last.
    pub fn available() -> Vec<Q8Path> {
        #[allow(unused_mut)]
        let mut v = vec![Q8Path::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c");
            if avx2 {
                v.push(Q8Path::Avx2);
            }
            if avx2
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
            {
                v.push(Q8Path::Avx512Vnni);
            }
        }
        v
    }
}

/// `Σ_j w_j·a_j` of one block (weights as the block stores them, `a` 32 int8): the integer
/// every path must return.
pub fn block_dot_scalar(ty: BlockType, blk: &[u8], a: &[i8]) -> i32 {
    match ty {
        BlockType::Q4_0 | BlockType::Q4_1 => {
            let (qs, off) = if ty == BlockType::Q4_0 {
                (&blk[2..18], 8)
            } else {
                (&blk[4..20], 0)
            };
            (0..16)
                .map(|j| {
                    ((qs[j] & 0x0F) as i32 - off) * a[j] as i32
                        + ((qs[j] >> 4) as i32 - off) * a[j + 16] as i32
                })
                .sum()
        }
        BlockType::Q8_0 => blk[2..34]
            .iter()
            .zip(a)
            .map(|(&w, &a)| w as i8 as i32 * a as i32)
            .sum(),
    }
}

/// The float part of one block, the same on every path: `acc + (d_w·d_a)·Σ + m_w·s_a`
/// (`m_w` is 0 but for Q4_1; `0·s_a` adds nothing but a signed zero, which `acc + …`
/// absorbs the same way on every path).
#[inline(always)]
fn block_float(acc: f32, dw: f32, mw: f32, sumi: i32, d_a: f32, s_a: f32) -> f32 {
    acc + dw * d_a * sumi as f32 + mw * s_a
}

/// A block's `(d, m)` (`m` = 0 but for Q4_1).
fn block_dm(ty: BlockType, blk: &[u8]) -> (f32, f32) {
    let m = if ty == BlockType::Q4_1 {
        f16_at(blk, 2)
    } else {
        0.0
    };
    (f16_at(blk, 0), m)
}

/// `out[t][r] = Σ_b (d_w·d_a)·Σ_j q_w·q_a (+ m_w·s_a)` over the Q8 blocks of `acts`.
pub fn matmul_q8(
    ty: BlockType,
    data: &[u8],
    rows: usize,
    cols: usize,
    acts: &Q8Activations,
    out: &mut [f32],
) {
    matmul_q8_with(Q8Path::detect(), ty, data, rows, cols, acts, out)
}

/// [`matmul_q8`] on a given path (tests compare paths).
pub fn matmul_q8_with(
    path: Q8Path,
    ty: BlockType,
    data: &[u8],
    rows: usize,
    cols: usize,
    acts: &Q8Activations,
    out: &mut [f32],
) {
    let rb = check(ty, data, rows, cols);
    let n_tok = acts.n;
    assert_eq!(acts.cols, cols, "Q8 matmul width");
    assert_eq!(out.len(), n_tok * rows, "Q8 matmul output size");
    assert!(
        Q8Path::available().contains(&path),
        "{path:?} not available"
    );
    let chunk = chunk_rows(rows, 4);
    let o = SharedOut(out.as_mut_ptr());
    let nb = cols / QK;
    super::pool::SpinPool::current().run(rows.div_ceil(chunk), &|c| {
        let span = c * chunk..((c + 1) * chunk).min(rows);
        for t0 in (0..n_tok).step_by(TOKEN_BLOCK) {
            let tokens = t0..(t0 + TOKEN_BLOCK).min(n_tok);
            for r in span.clone() {
                let row = &data[r * rb..(r + 1) * rb];
                let mut t = tokens.start;
                while t < tokens.end {
                    let tile = (tokens.end - t).min(4);
                    let mut acc = [0.0f32; 4];
                    match path {
                        Q8Path::Scalar => {
                            for (k, a) in acc[..tile].iter_mut().enumerate() {
                                let q = acts.row(t + k);
                                for (b, blk) in row.chunks_exact(ty.block_bytes()).enumerate() {
                                    let sumi = block_dot_scalar(ty, blk, &q[b * QK..(b + 1) * QK]);
                                    let i = b * n_tok + t + k;
                                    let (dw, mw) = block_dm(ty, blk);
                                    *a = block_float(*a, dw, mw, sumi, acts.d[i], acts.s[i]);
                                }
                            }
                        }
                        #[cfg(target_arch = "x86_64")]
                        _ => x86::q8_row(path, ty, row, nb, acts, t, tile, &mut acc),
                    }
                    for (k, &v) in acc[..tile].iter().enumerate() {
                        // SAFETY: (t + k, r) is inside `out` (checked) and row r belongs to
                        // this task alone.
                        unsafe { *o.at((t + k) * rows + r) = v };
                    }
                    t += tile;
                }
            }
        }
    });
    let _ = nb;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{block_float, TOKEN_BLOCK};
    use super::{BlockType, ExactPath, Q8Activations, Q8Path, PANEL, PANEL_MIN_TOKENS, QK};
    use std::arch::x86_64::*;
    use std::ops::Range;

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q8_0: u8 = 2;

    fn code(ty: BlockType) -> u8 {
        match ty {
            BlockType::Q4_0 => Q4_0,
            BlockType::Q4_1 => Q4_1,
            BlockType::Q8_0 => Q8_0,
        }
    }

    /// The f16 at byte `i` of `p`, in every lane of an 16-lane f32 vector (the conversion
    /// is exact, as the scalar one is).
    ///
    /// Safety: needs AVX-512F; `p + i .. p + i + 2` is readable.
    #[inline(always)]
    unsafe fn f16_512(p: *const u8, i: usize) -> __m512 {
        // SAFETY: the caller guarantees the feature and that the two bytes are readable.
        unsafe { _mm512_cvtph_ps(_mm256_set1_epi16(p.add(i).cast::<i16>().read_unaligned())) }
    }

    /// [`f16_512`] in 8 lanes.
    ///
    /// Safety: needs F16C (and AVX); `p + i .. p + i + 2` is readable.
    #[inline(always)]
    unsafe fn f16_256(p: *const u8, i: usize) -> __m256 {
        // SAFETY: as in `f16_512`.
        unsafe { _mm256_cvtph_ps(_mm_set1_epi16(p.add(i).cast::<i16>().read_unaligned())) }
    }

    /// A block's 32 weights as two 16-lane vectors (weights 0..16, 16..32), decoded with the
    /// scalar decoder's roundings: the integer code converted exactly, times `d` (one
    /// rounding), plus `m` for Q4_1 (a second one, not fused).
    ///
    /// Safety: needs AVX-512F and BW; `p` points at a whole block of type `TY`.
    #[inline(always)]
    unsafe fn decode_512<const TY: u8>(p: *const u8) -> (__m512, __m512) {
        // SAFETY: the block's bytes are readable (caller); register arithmetic otherwise.
        unsafe {
            let d = f16_512(p, 0);
            let (lo, hi) = if TY == Q8_0 {
                (
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(2).cast())),
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(18).cast())),
                )
            } else {
                let qs = _mm_loadu_si128(p.add(if TY == Q4_0 { 2 } else { 4 }).cast());
                let m4 = _mm_set1_epi8(0x0F);
                let lo = _mm512_cvtepu8_epi32(_mm_and_si128(qs, m4));
                let hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16::<4>(qs), m4));
                if TY == Q4_0 {
                    let c8 = _mm512_set1_epi32(8);
                    (_mm512_sub_epi32(lo, c8), _mm512_sub_epi32(hi, c8))
                } else {
                    (lo, hi)
                }
            };
            let lo = _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d);
            let hi = _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d);
            if TY == Q4_1 {
                let m = f16_512(p, 2);
                (_mm512_add_ps(lo, m), _mm512_add_ps(hi, m))
            } else {
                (lo, hi)
            }
        }
    }

    /// A block's 32 weights as four 8-lane vectors, decoded as [`decode_512`] does.
    ///
    /// Safety: needs AVX2, FMA and F16C; `p` points at a whole block of type `TY`.
    #[inline(always)]
    unsafe fn decode_256<const TY: u8>(p: *const u8) -> [__m256; 4] {
        // SAFETY: the block's bytes are readable (caller); register arithmetic otherwise.
        unsafe {
            let d = f16_256(p, 0);
            let (lo, hi) = if TY == Q8_0 {
                (
                    _mm_loadu_si128(p.add(2).cast()),
                    _mm_loadu_si128(p.add(18).cast()),
                )
            } else {
                let qs = _mm_loadu_si128(p.add(if TY == Q4_0 { 2 } else { 4 }).cast());
                let m4 = _mm_set1_epi8(0x0F);
                (
                    _mm_and_si128(qs, m4),
                    _mm_and_si128(_mm_srli_epi16::<4>(qs), m4),
                )
            };
            let widen = |v: __m128i| -> __m256i {
                if TY == Q8_0 {
                    _mm256_cvtepi8_epi32(v)
                } else {
                    _mm256_cvtepu8_epi32(v)
                }
            };
            let mut ints = [
                widen(lo),
                widen(_mm_srli_si128::<8>(lo)),
                widen(hi),
                widen(_mm_srli_si128::<8>(hi)),
            ];
            if TY == Q4_0 {
                for v in &mut ints {
                    *v = _mm256_sub_epi32(*v, _mm256_set1_epi32(8));
                }
            }
            let m = if TY == Q4_1 {
                f16_256(p, 2)
            } else {
                _mm256_setzero_ps()
            };
            let mut out = [_mm256_setzero_ps(); 4];
            for (o, v) in out.iter_mut().zip(ints) {
                *o = _mm256_mul_ps(_mm256_cvtepi32_ps(v), d);
                if TY == Q4_1 {
                    *o = _mm256_add_ps(*o, m);
                }
            }
            out
        }
    }

    /// `_mm512_reduce_add_ps(a0 + a1)`: the f32 dense kernel's (`dot512`) final sum.
    #[inline(always)]
    unsafe fn finish_512(a0: __m512, a1: __m512) -> f32 {
        // SAFETY: register arithmetic; the caller runs with AVX-512F.
        unsafe { _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) }
    }

    /// The f32 dense kernel's (`dot256`) final sum of its two accumulators.
    #[inline(always)]
    unsafe fn finish_256(a0: __m256, a1: __m256) -> f32 {
        // SAFETY: register arithmetic; the caller runs with AVX2.
        unsafe {
            let v = _mm256_add_ps(a0, a1);
            let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
            let v = _mm_add_ss(v, _mm_movehdup_ps(v));
            _mm_cvtss_f32(v)
        }
    }

    /// Dequantizes a row with AVX-512 or AVX2 (the same bits as the scalar decoder); false
    /// where this CPU has neither.
    pub(super) fn dequantize_row(ty: BlockType, row: &[u8], out: &mut [f32]) -> bool {
        let bb = ty.block_bytes();
        assert!(row.len().is_multiple_of(bb) && out.len() == row.len() / bb * QK);
        let path = ExactPath::detect();
        if path == ExactPath::Scalar {
            return false;
        }
        // SAFETY: the path's features were detected; the sizes were checked above, and
        // `decode_row` reads whole blocks of `row` and writes 32 values a block of `out`.
        unsafe {
            match (path, code(ty)) {
                (ExactPath::Avx512, Q4_0) => decode_row_512::<Q4_0>(row, out),
                (ExactPath::Avx512, Q4_1) => decode_row_512::<Q4_1>(row, out),
                (ExactPath::Avx512, _) => decode_row_512::<Q8_0>(row, out),
                (_, Q4_0) => decode_row_256::<Q4_0>(row, out),
                (_, Q4_1) => decode_row_256::<Q4_1>(row, out),
                (_, _) => decode_row_256::<Q8_0>(row, out),
            }
        }
        true
    }

    /// Safety: needs AVX-512F and BW; `out` holds 32 values per whole block of `row`.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn decode_row_512<const TY: u8>(row: &[u8], out: &mut [f32]) {
        let bb = [18, 20, 34][TY as usize];
        for (blk, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
            // SAFETY: `blk` is a whole block and `o` 32 values (chunks_exact).
            unsafe {
                let (lo, hi) = decode_512::<TY>(blk.as_ptr());
                _mm512_storeu_ps(o.as_mut_ptr(), lo);
                _mm512_storeu_ps(o.as_mut_ptr().add(16), hi);
            }
        }
    }

    /// Safety: needs AVX2, FMA and F16C; `out` holds 32 values per whole block of `row`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_row_256<const TY: u8>(row: &[u8], out: &mut [f32]) {
        let bb = [18, 20, 34][TY as usize];
        for (blk, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
            // SAFETY: `blk` is a whole block and `o` 32 values (chunks_exact).
            unsafe {
                for (k, v) in decode_256::<TY>(blk.as_ptr()).into_iter().enumerate() {
                    _mm256_storeu_ps(o.as_mut_ptr().add(8 * k), v);
                }
            }
        }
    }

    /// Rows `span` of the exact product on an x86 path (see `super::matmul_exact_with`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn exact(
        path: ExactPath,
        ty: BlockType,
        data: &[u8],
        rb: usize,
        cols: usize,
        span: Range<usize>,
        x: &[f32],
        n_tok: usize,
        put: &dyn Fn(usize, usize, f32),
    ) {
        let avx512 = path == ExactPath::Avx512;
        // SAFETY (both calls): `path` came from feature detection (`ExactPath::available`
        // is asserted by the caller); `data` holds `span.end` rows of `rb` bytes and `x`
        // `n_tok` rows of `cols` values (checked by the caller).
        unsafe {
            if n_tok < PANEL_MIN_TOKENS {
                match (avx512, code(ty)) {
                    (true, Q4_0) => fused_512::<Q4_0>(data, rb, cols, span, x, n_tok, put),
                    (true, Q4_1) => fused_512::<Q4_1>(data, rb, cols, span, x, n_tok, put),
                    (true, _) => fused_512::<Q8_0>(data, rb, cols, span, x, n_tok, put),
                    (false, Q4_0) => fused_256::<Q4_0>(data, rb, cols, span, x, n_tok, put),
                    (false, Q4_1) => fused_256::<Q4_1>(data, rb, cols, span, x, n_tok, put),
                    (false, _) => fused_256::<Q8_0>(data, rb, cols, span, x, n_tok, put),
                }
            } else {
                panels(avx512, ty, data, rb, cols, span, x, n_tok, put)
            }
        }
    }

    /// Decode-sized products: each block decoded in registers once for up to 4 tokens.
    ///
    /// Safety: needs AVX-512F and BW; sizes as in [`exact`].
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn fused_512<const TY: u8>(
        data: &[u8],
        rb: usize,
        cols: usize,
        span: Range<usize>,
        x: &[f32],
        n_tok: usize,
        put: &dyn Fn(usize, usize, f32),
    ) {
        let (bb, nb) = ([18, 20, 34][TY as usize], cols / QK);
        for r in span {
            let row = data[r * rb..(r + 1) * rb].as_ptr();
            let mut t = 0;
            while t < n_tok {
                let tile = (n_tok - t).min(3);
                let xs: [*const f32; 3] =
                    std::array::from_fn(|k| x[(t + k.min(tile - 1)) * cols..].as_ptr());
                let mut a = [[_mm512_setzero_ps(); 2]; 3];
                for b in 0..nb {
                    // SAFETY: block b of row r lies inside `data` (rb = nb·bb) and values
                    // 32b..32b+32 inside each token's row of `x` (cols = 32·nb).
                    unsafe {
                        let (w0, w1) = decode_512::<TY>(row.add(b * bb));
                        for k in 0..3 {
                            if k < tile {
                                let xp = xs[k].add(b * QK);
                                a[k][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), a[k][0]);
                                a[k][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), a[k][1]);
                            }
                        }
                    }
                }
                for (k, acc) in a.iter().enumerate().take(tile) {
                    // SAFETY: register arithmetic under AVX-512F.
                    put(t + k, r, unsafe { finish_512(acc[0], acc[1]) });
                }
                t += tile;
            }
        }
    }

    /// [`fused_512`] with 8-lane vectors (the AVX2 f32 kernel's sum order: weights 0..8 and
    /// 16..24 of a block into the first accumulator, 8..16 and 24..32 into the second).
    ///
    /// Safety: needs AVX2, FMA and F16C; sizes as in [`exact`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fused_256<const TY: u8>(
        data: &[u8],
        rb: usize,
        cols: usize,
        span: Range<usize>,
        x: &[f32],
        n_tok: usize,
        put: &dyn Fn(usize, usize, f32),
    ) {
        let (bb, nb) = ([18, 20, 34][TY as usize], cols / QK);
        for r in span {
            let row = data[r * rb..(r + 1) * rb].as_ptr();
            let mut t = 0;
            while t < n_tok {
                let tile = (n_tok - t).min(2);
                let xs: [*const f32; 2] =
                    std::array::from_fn(|k| x[(t + k.min(tile - 1)) * cols..].as_ptr());
                let mut a = [[_mm256_setzero_ps(); 2]; 2];
                for b in 0..nb {
                    // SAFETY: as in `fused_512`.
                    unsafe {
                        let w = decode_256::<TY>(row.add(b * bb));
                        for k in 0..2 {
                            if k < tile {
                                let xp = xs[k].add(b * QK);
                                for (j, &wj) in w.iter().enumerate() {
                                    let x8 = _mm256_loadu_ps(xp.add(8 * j));
                                    a[k][j % 2] = _mm256_fmadd_ps(wj, x8, a[k][j % 2]);
                                }
                            }
                        }
                    }
                }
                for (k, acc) in a.iter().enumerate().take(tile) {
                    // SAFETY: register arithmetic under AVX2.
                    put(t + k, r, unsafe { finish_256(acc[0], acc[1]) });
                }
                t += tile;
            }
        }
    }

    /// Prefill-sized products: panels of `R` rows decoded once into L1 (f32), multiplied
    /// with tiles of `T` tokens, every (row, token) in its own pair of accumulators.
    ///
    /// Safety: the path's features (AVX-512F+BW when `avx512`, else AVX2+FMA+F16C) were
    /// detected; sizes as in [`exact`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn panels(
        avx512: bool,
        ty: BlockType,
        data: &[u8],
        rb: usize,
        cols: usize,
        span: Range<usize>,
        x: &[f32],
        n_tok: usize,
        put: &dyn Fn(usize, usize, f32),
    ) {
        const R: usize = 4;
        PANEL.with_borrow_mut(|panel| {
            panel.resize(R * cols, 0.0);
            for t0 in (0..n_tok).step_by(TOKEN_BLOCK) {
                let t_end = (t0 + TOKEN_BLOCK).min(n_tok);
                let mut r0 = span.start;
                while r0 < span.end {
                    let nr = (span.end - r0).min(R);
                    for i in 0..nr {
                        let row = &data[(r0 + i) * rb..(r0 + i + 1) * rb];
                        let out = &mut panel[i * cols..(i + 1) * cols];
                        // SAFETY: as in `dequantize_row` (features detected by the caller;
                        // 32 values a block).
                        unsafe {
                            match (avx512, code(ty)) {
                                (true, Q4_0) => decode_row_512::<Q4_0>(row, out),
                                (true, Q4_1) => decode_row_512::<Q4_1>(row, out),
                                (true, _) => decode_row_512::<Q8_0>(row, out),
                                (false, Q4_0) => decode_row_256::<Q4_0>(row, out),
                                (false, Q4_1) => decode_row_256::<Q4_1>(row, out),
                                (false, _) => decode_row_256::<Q8_0>(row, out),
                            }
                        }
                    }
                    let w: [&[f32]; R] =
                        std::array::from_fn(|i| &panel[i.min(nr - 1) * cols..][..cols]);
                    let mut t = t0;
                    while t < t_end {
                        let left = t_end - t;
                        // SAFETY: the panel rows and the token rows hold `cols` values each
                        // (`cols` a multiple of 32); features as the caller guarantees.
                        unsafe {
                            if avx512 {
                                let step = left.min(3);
                                if nr == R {
                                    match step {
                                        3 => tile_512::<R, 3>(w, x, cols, t, r0, put),
                                        2 => tile_512::<R, 2>(w, x, cols, t, r0, put),
                                        _ => tile_512::<R, 1>(w, x, cols, t, r0, put),
                                    }
                                } else {
                                    for (i, &wi) in w.iter().enumerate().take(nr) {
                                        let wi = [wi; R];
                                        match step {
                                            3 => tile_512::<1, 3>(wi, x, cols, t, r0 + i, put),
                                            2 => tile_512::<1, 2>(wi, x, cols, t, r0 + i, put),
                                            _ => tile_512::<1, 1>(wi, x, cols, t, r0 + i, put),
                                        }
                                    }
                                }
                                t += step;
                            } else {
                                let step = left.min(2);
                                if nr == R {
                                    match step {
                                        2 => tile_256::<R, 2>(w, x, cols, t, r0, put),
                                        _ => tile_256::<R, 1>(w, x, cols, t, r0, put),
                                    }
                                } else {
                                    for (i, &wi) in w.iter().enumerate().take(nr) {
                                        let wi = [wi; R];
                                        match step {
                                            2 => tile_256::<1, 2>(wi, x, cols, t, r0 + i, put),
                                            _ => tile_256::<1, 1>(wi, x, cols, t, r0 + i, put),
                                        }
                                    }
                                }
                                t += step;
                            }
                        }
                    }
                    r0 += nr;
                }
            }
        })
    }

    /// `RR` decoded rows (`w[0..RR]`) times tokens `t .. t + T` of `x`, outputs to rows
    /// `r0 .. r0 + RR`: the AVX-512 f32 kernel's two accumulators for each pair.
    ///
    /// Safety: needs AVX-512F and BW; `w[i]` has `cols` values, `x` rows `t..t + T` exist,
    /// `cols` is a multiple of 32.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn tile_512<const RR: usize, const T: usize>(
        w: [&[f32]; 4],
        x: &[f32],
        cols: usize,
        t: usize,
        r0: usize,
        put: &dyn Fn(usize, usize, f32),
    ) {
        let xs: [*const f32; T] = std::array::from_fn(|k| x[(t + k) * cols..][..cols].as_ptr());
        let ws: [*const f32; RR] = std::array::from_fn(|i| w[i].as_ptr());
        let mut a = [[[_mm512_setzero_ps(); 2]; T]; RR];
        let mut i = 0;
        while i < cols {
            // SAFETY: i + 32 ≤ cols, inside every row (caller).
            unsafe {
                let xv: [[__m512; 2]; T] = std::array::from_fn(|k| {
                    [
                        _mm512_loadu_ps(xs[k].add(i)),
                        _mm512_loadu_ps(xs[k].add(i + 16)),
                    ]
                });
                for r in 0..RR {
                    let w0 = _mm512_loadu_ps(ws[r].add(i));
                    let w1 = _mm512_loadu_ps(ws[r].add(i + 16));
                    for k in 0..T {
                        a[r][k][0] = _mm512_fmadd_ps(w0, xv[k][0], a[r][k][0]);
                        a[r][k][1] = _mm512_fmadd_ps(w1, xv[k][1], a[r][k][1]);
                    }
                }
            }
            i += 32;
        }
        for (r, ar) in a.iter().enumerate() {
            for (k, acc) in ar.iter().enumerate() {
                // SAFETY: register arithmetic under AVX-512F.
                put(t + k, r0 + r, unsafe { finish_512(acc[0], acc[1]) });
            }
        }
    }

    /// [`tile_512`] with the AVX2 f32 kernel's accumulators.
    ///
    /// Safety: needs AVX2 and FMA; sizes as in [`tile_512`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_256<const RR: usize, const T: usize>(
        w: [&[f32]; 4],
        x: &[f32],
        cols: usize,
        t: usize,
        r0: usize,
        put: &dyn Fn(usize, usize, f32),
    ) {
        let xs: [*const f32; T] = std::array::from_fn(|k| x[(t + k) * cols..][..cols].as_ptr());
        let ws: [*const f32; RR] = std::array::from_fn(|i| w[i].as_ptr());
        let mut a = [[[_mm256_setzero_ps(); 2]; T]; RR];
        let mut i = 0;
        while i < cols {
            // SAFETY: i + 16 ≤ cols, inside every row (caller).
            unsafe {
                let xv: [[__m256; 2]; T] = std::array::from_fn(|k| {
                    [
                        _mm256_loadu_ps(xs[k].add(i)),
                        _mm256_loadu_ps(xs[k].add(i + 8)),
                    ]
                });
                for r in 0..RR {
                    let w0 = _mm256_loadu_ps(ws[r].add(i));
                    let w1 = _mm256_loadu_ps(ws[r].add(i + 8));
                    for k in 0..T {
                        a[r][k][0] = _mm256_fmadd_ps(w0, xv[k][0], a[r][k][0]);
                        a[r][k][1] = _mm256_fmadd_ps(w1, xv[k][1], a[r][k][1]);
                    }
                }
            }
            i += 16;
        }
        for (r, ar) in a.iter().enumerate() {
            for (k, acc) in ar.iter().enumerate() {
                // SAFETY: register arithmetic under AVX2.
                put(t + k, r0 + r, unsafe { finish_256(acc[0], acc[1]) });
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // q8 mode
    // -----------------------------------------------------------------------------------

    /// `acc[k]` for tokens `t .. t + tile` (tile ≤ 4) of one row on an x86 path.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn q8_row(
        path: Q8Path,
        ty: BlockType,
        row: &[u8],
        nb: usize,
        acts: &Q8Activations,
        t: usize,
        tile: usize,
        acc: &mut [f32; 4],
    ) {
        assert!(row.len() == nb * ty.block_bytes() && acts.cols == nb * QK);
        assert!(tile <= 4 && t + tile <= acts.n);
        let vnni = path == Q8Path::Avx512Vnni;
        // SAFETY: the path came from feature detection (asserted by the caller); the row
        // holds `nb` whole blocks and every token row `nb · 32` values (asserted above).
        unsafe {
            match (vnni, code(ty)) {
                (true, Q4_0) => q8_row_vnni::<Q4_0>(row, nb, acts, t, tile, acc),
                (true, Q4_1) => q8_row_vnni::<Q4_1>(row, nb, acts, t, tile, acc),
                (true, _) => q8_row_vnni::<Q8_0>(row, nb, acts, t, tile, acc),
                (false, Q4_0) => q8_row_avx2::<Q4_0>(row, nb, acts, t, tile, acc),
                (false, Q4_1) => q8_row_avx2::<Q4_1>(row, nb, acts, t, tile, acc),
                (false, _) => q8_row_avx2::<Q8_0>(row, nb, acts, t, tile, acc),
            }
        }
    }

    /// A block's weights as 32 unsigned bytes `u` in weight order, with `u − off = w`
    /// (codes for Q4_0/Q4_1, `w + 128` for Q8_0).
    ///
    /// Safety: needs AVX2; `p` points at a whole block of type `TY`.
    #[inline(always)]
    unsafe fn codes_u8<const TY: u8>(p: *const u8) -> __m256i {
        // SAFETY: the block's bytes are readable (caller).
        unsafe {
            if TY == Q8_0 {
                _mm256_xor_si256(_mm256_loadu_si256(p.add(2).cast()), _mm256_set1_epi8(-128))
            } else {
                let qs = _mm_loadu_si128(p.add(if TY == Q4_0 { 2 } else { 4 }).cast());
                let m4 = _mm_set1_epi8(0x0F);
                _mm256_set_m128i(
                    _mm_and_si128(_mm_srli_epi16::<4>(qs), m4),
                    _mm_and_si128(qs, m4),
                )
            }
        }
    }

    /// Sum of the 8 int32 lanes.
    #[inline(always)]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        // SAFETY: register arithmetic; the caller runs with AVX2.
        unsafe {
            let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            _mm_cvtsi128_si32(s)
        }
    }

    /// Offset of the unsigned codes: `w = u − off`.
    const fn offset(ty: u8) -> i32 {
        match ty {
            Q4_0 => 8,
            Q4_1 => 0,
            _ => 128,
        }
    }

    /// Safety: needs AVX2, F16C, AVX-512 VNNI and VL; sizes as in [`q8_row`].
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,f16c,avx512vnni,avx512vl")]
    unsafe fn q8_row_vnni<const TY: u8>(
        row: &[u8],
        nb: usize,
        acts: &Q8Activations,
        t: usize,
        tile: usize,
        acc: &mut [f32; 4],
    ) {
        let bb = [18, 20, 34][TY as usize];
        let (cols, nb_a, n) = (acts.cols, nb, acts.n);
        let p = row.as_ptr();
        for b in 0..nb {
            // SAFETY: block b is inside the row; token rows t..t + tile exist, and values
            // 32b .. 32b + 32 lie inside each (caller).
            unsafe {
                let blk = p.add(b * bb);
                let u = codes_u8::<TY>(blk);
                let (dw, mw) = dm::<TY>(blk);
                for k in 0..tile {
                    let a =
                        _mm256_loadu_si256(acts.qs.as_ptr().add((t + k) * cols + b * QK).cast());
                    let dot = hsum_i32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, a));
                    let sumi = dot - offset(TY) * acts.sums[(t + k) * nb_a + b];
                    let i = b * n + t + k;
                    acc[k] = block_float(acc[k], dw, mw, sumi, acts.d[i], acts.s[i]);
                }
            }
        }
    }

    /// `vpmaddubsw` of the unsigned codes with the activations (Q4: `15·127·2` fits in
    /// int16), or of `|w|` with the activations signed by `w` (Q8_0: `128·127·2` fits).
    ///
    /// Safety: needs AVX2 and F16C; sizes as in [`q8_row`].
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn q8_row_avx2<const TY: u8>(
        row: &[u8],
        nb: usize,
        acts: &Q8Activations,
        t: usize,
        tile: usize,
        acc: &mut [f32; 4],
    ) {
        let bb = [18, 20, 34][TY as usize];
        let (cols, n) = (acts.cols, acts.n);
        let p = row.as_ptr();
        let ones = _mm256_set1_epi16(1);
        for b in 0..nb {
            // SAFETY: as in `q8_row_vnni`.
            unsafe {
                let blk = p.add(b * bb);
                let (u, w) = if TY == Q8_0 {
                    let w = _mm256_loadu_si256(blk.add(2).cast());
                    (_mm256_sign_epi8(w, w), w)
                } else {
                    (codes_u8::<TY>(blk), _mm256_setzero_si256())
                };
                let (dw, mw) = dm::<TY>(blk);
                for k in 0..tile {
                    let a =
                        _mm256_loadu_si256(acts.qs.as_ptr().add((t + k) * cols + b * QK).cast());
                    let a = if TY == Q8_0 {
                        _mm256_sign_epi8(a, w)
                    } else {
                        a
                    };
                    let dot = hsum_i32(_mm256_madd_epi16(_mm256_maddubs_epi16(u, a), ones));
                    let sumi = if TY == Q4_0 {
                        dot - 8 * acts.sums[(t + k) * nb + b]
                    } else {
                        dot
                    };
                    let i = b * n + t + k;
                    acc[k] = block_float(acc[k], dw, mw, sumi, acts.d[i], acts.s[i]);
                }
            }
        }
    }

    /// A block's `(d, m)` as `super::block_dm` gives them (F16C's conversion is exact, as
    /// the scalar one is).
    ///
    /// Safety: needs F16C; `p` points at a whole block of type `TY`.
    #[inline(always)]
    unsafe fn dm<const TY: u8>(p: *const u8) -> (f32, f32) {
        // SAFETY: the block's first 4 bytes are readable (caller).
        unsafe {
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                p.cast::<u16>().read_unaligned() as i32,
            )));
            let m = if TY == Q4_1 {
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                    p.add(2).cast::<u16>().read_unaligned() as i32,
                )))
            } else {
                0.0
            };
            (d, m)
        }
    }
}

#[cfg(test)]
mod tests;
