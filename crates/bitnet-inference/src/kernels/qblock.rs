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
#[cfg(target_arch = "x86_64")]
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
    super::pool::run(rows.div_ceil(chunk), &|c| {
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
/// the per-block term the weight type needs ([`Q8Activations::quantize`]).
#[derive(Debug, Default, Clone)]
pub struct Q8Activations {
    cols: usize,
    n: usize,
    ty: Option<BlockType>,
    qs: Vec<i8>,
    /// `[n][cols/32]`: the f16-rounded `d`.
    d: Vec<f32>,
    /// `[n][cols/32]`: the block's constant term, multiplied by the weight block's `c_w`:
    /// Q4_0 `(−8·Σq)·d` (with `c_w = d_w`: the codes are `q_w + 8`), Q4_1 ggml's Q8_1
    /// `s = f16(d·Σq)` (with `c_w = m_w`), Q8_0 none.
    c: Vec<f32>,
}

impl Q8Activations {
    /// Quantizes the rows of `x: [n, cols]` (`cols` a multiple of 32) for weights of type
    /// `ty`.
    pub fn quantize(&mut self, x: &[f32], n: usize, cols: usize, ty: BlockType) {
        assert!(
            cols.is_multiple_of(QK) && x.len() == n * cols,
            "Q8 activations"
        );
        let nb = cols / QK;
        self.cols = cols;
        self.n = n;
        self.ty = Some(ty);
        self.qs.resize(n * cols, 0);
        self.d.resize(n * nb, 0.0);
        self.c.resize(n * nb, 0.0);
        for (i, (xb, q)) in x
            .chunks_exact(QK)
            .zip(self.qs.chunks_exact_mut(QK))
            .enumerate()
        {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in q.iter_mut().zip(xb) {
                // |v·id| ≤ 127 (up to rounding, hence the clamp); NaN becomes 0.
                *q = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
                sum += *q as i32;
            }
            let d16 = f16::from_f32(d).to_f32();
            self.d[i] = d16;
            self.c[i] = match ty {
                BlockType::Q4_0 => (-8 * sum) as f32 * d16,
                BlockType::Q4_1 => f16::from_f32(sum as f32 * d).to_f32(),
                BlockType::Q8_0 => 0.0,
            };
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

/// The integer block products of the q8 mode: AVX-512 VNNI (two blocks a `vpdpbusd`),
/// AVX2 (`vpmaddubsw`), or scalar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Q8Path {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// `smull` + pairwise adds into the 4-byte lanes.
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// `sdot` (the 4-byte lanes directly).
    #[cfg(target_arch = "aarch64")]
    NeonDot,
}

impl Q8Path {
    pub fn detect() -> Q8Path {
        static AVAILABLE: std::sync::OnceLock<Vec<Q8Path>> = std::sync::OnceLock::new();
        super::best_path(AVAILABLE.get_or_init(Self::available), Q8Path::Scalar)
    }

    /// Every path this CPU runs, best last.
    pub fn available() -> Vec<Q8Path> {
        #[allow(unused_mut)]
        let mut v = vec![Q8Path::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 {
                v.push(Q8Path::Avx2);
            }
            if avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
            {
                v.push(Q8Path::Avx512Vnni);
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                v.push(Q8Path::Neon);
                if std::arch::is_aarch64_feature_detected!("dotprod") {
                    v.push(Q8Path::NeonDot);
                }
            }
        }
        v
    }
}

/// The weights of a block as the integer dot products use them: Q4 codes `u` (0..=15, the
/// weight being `(u − 8)·d` or `u·d + m`), Q8_0 values `q` (−128..=127).
fn block_ints(ty: BlockType, blk: &[u8]) -> [i32; QK] {
    let mut w = [0i32; QK];
    match ty {
        BlockType::Q4_0 | BlockType::Q4_1 => {
            let qs = &blk[ty.block_bytes() - 16..];
            for j in 0..16 {
                w[j] = (qs[j] & 0x0F) as i32;
                w[j + 16] = (qs[j] >> 4) as i32;
            }
        }
        BlockType::Q8_0 => {
            for (o, &q) in w.iter_mut().zip(&blk[2..34]) {
                *o = q as i8 as i32;
            }
        }
    }
    w
}

/// `Σ_j w_j·a_j` over one block (`w` from [`block_ints`]): the exact block sum, which with
/// the constant term gives `Σ q_w·q_a` (tests).
pub fn block_dot_scalar(ty: BlockType, blk: &[u8], a: &[i8]) -> i32 {
    block_ints(ty, blk)
        .iter()
        .zip(a)
        .map(|(&w, &a)| w * a as i32)
        .sum()
}

/// A block's `d` and `c_w` (Q4_1: `m`; Q4_0: `d`; Q8_0: 0).
fn block_dc(ty: BlockType, blk: &[u8]) -> (f32, f32) {
    let d = f16_at(blk, 0);
    match ty {
        BlockType::Q4_0 => (d, d),
        BlockType::Q4_1 => (d, f16_at(blk, 2)),
        BlockType::Q8_0 => (d, 0.0),
    }
}

/// One (row, token) of the q8 product, the arithmetic every path reproduces:
/// - 16 float lanes: blocks are taken in pairs; lane `l` of pair `p` gets the integer sum of
///   weights `4(l mod 8) .. +4` of block `2p + l/8` times the activations
///   (a `vpdpbusd` lane), converted to f32, times `d_w·d_a` (rounded), added to the lane (an
///   odd last block feeds lanes 0..8 only);
/// - the constant terms `c_w·c_a` summed in block order;
/// - the lanes summed as a tree (`l + 8`, then `+ 4`, `+ 2`, `+ 1`), then the constant sum.
fn row_dot_scalar(ty: BlockType, row: &[u8], a: &[i8], d_a: &[f32], c_a: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut konst = 0.0f32;
    for (b, blk) in row.chunks_exact(ty.block_bytes()).enumerate() {
        let w = block_ints(ty, blk);
        let (dw, cw) = block_dc(ty, blk);
        let sc = dw * d_a[b];
        let ab = &a[b * QK..(b + 1) * QK];
        for j in 0..8 {
            let s: i32 = (4 * j..4 * j + 4).map(|i| w[i] * ab[i] as i32).sum();
            let l = 8 * (b % 2) + j;
            lanes[l] += s as f32 * sc;
        }
        konst += cw * c_a[b];
    }
    let mut s8 = [0.0f32; 8];
    for l in 0..8 {
        s8[l] = lanes[l] + lanes[l + 8];
    }
    let s4: [f32; 4] = std::array::from_fn(|l| s8[l] + s8[l + 4]);
    let s2: [f32; 2] = std::array::from_fn(|l| s4[l] + s4[l + 2]);
    (s2[0] + s2[1]) + konst
}

/// `out[t][r] = Σ_b (d_w·d_a)·Σ_j w·q_a + Σ_b c_w·c_a` over the Q8 blocks of `acts`
/// (module docs; the order is [`row_dot_scalar`]'s).
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
    assert_eq!(
        acts.ty,
        Some(ty),
        "Q8 activations quantized for another weight type"
    );
    assert_eq!(out.len(), n_tok * rows, "Q8 matmul output size");
    assert!(
        Q8Path::available().contains(&path),
        "{path:?} not available"
    );
    let chunk = chunk_rows(rows, 4);
    let o = SharedOut(out.as_mut_ptr());
    let nb = cols / QK;
    super::pool::run(rows.div_ceil(chunk), &|c| {
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
                                let s = (t + k) * nb..(t + k + 1) * nb;
                                *a = row_dot_scalar(
                                    ty,
                                    row,
                                    acts.row(t + k),
                                    &acts.d[s.clone()],
                                    &acts.c[s],
                                );
                            }
                        }
                        #[cfg(target_arch = "x86_64")]
                        _ => x86::q8_row(path, ty, row, nb, acts, t, tile, &mut acc),
                        #[cfg(target_arch = "aarch64")]
                        _ => arm::q8_row(path, ty, row, nb, acts, t, tile, &mut acc),
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
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::TOKEN_BLOCK;
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
            if TY == Q8_0 {
                let lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(2).cast()));
                let hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(18).cast()));
                return (
                    _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d),
                    _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d),
                );
            }
            // Q4: the 16 values a code can stand for, computed once (the scalar decoder's
            // roundings: `(k − 8)·d`, or `k·d` then `+ m`), then looked up by `vpermps`,
            // which reads only the low 4 bits of each index: the high nibble of a byte, or
            // the neighbour's nibble that a 16-bit shift brings in, is ignored.
            let table = if TY == Q4_0 {
                let k = _mm512_setr_ps(
                    -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0,
                    6.0, 7.0,
                );
                _mm512_mul_ps(k, d)
            } else {
                let k = _mm512_setr_ps(
                    0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0,
                    15.0,
                );
                _mm512_add_ps(_mm512_mul_ps(k, d), f16_512(p, 2))
            };
            let qs = _mm_loadu_si128(p.add(if TY == Q4_0 { 2 } else { 4 }).cast());
            let lo = _mm512_cvtepu8_epi32(qs);
            let hi = _mm512_cvtepu8_epi32(_mm_srli_epi16::<4>(qs));
            (
                _mm512_permutexvar_ps(lo, table),
                _mm512_permutexvar_ps(hi, table),
            )
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

    /// Decode-sized products: each block decoded in registers once for up to 3 tokens.
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
        for r in span {
            let row = &data[r * rb..(r + 1) * rb];
            let mut t = 0;
            while t < n_tok {
                let tile = (n_tok - t).min(3);
                let xt = &x[t * cols..(t + tile) * cols];
                // SAFETY: the row holds cols/32 whole blocks and `xt` `tile` rows of `cols`
                // values; AVX-512F/BW as this function.
                unsafe {
                    match tile {
                        3 => fused_row_512::<TY, 3>(row, xt, cols, t, r, put),
                        2 => fused_row_512::<TY, 2>(row, xt, cols, t, r, put),
                        _ => fused_row_512::<TY, 1>(row, xt, cols, t, r, put),
                    }
                }
                t += tile;
            }
        }
    }

    /// One row times `T` token rows (`xt`, `T · cols` values), outputs `(t + k, r)`.
    ///
    /// Safety: needs AVX-512F and BW; `row` holds `cols / 32` whole blocks of type `TY`.
    #[inline(always)]
    unsafe fn fused_row_512<const TY: u8, const T: usize>(
        row: &[u8],
        xt: &[f32],
        cols: usize,
        t: usize,
        r: usize,
        put: &dyn Fn(usize, usize, f32),
    ) {
        let (bb, nb) = ([18, 20, 34][TY as usize], cols / QK);
        assert!(row.len() >= nb * bb && xt.len() >= T * cols);
        let (row, xt) = (row.as_ptr(), xt.as_ptr());
        let mut a = [[_mm512_setzero_ps(); 2]; T];
        for b in 0..nb {
            // SAFETY: block b lies inside the row and values 32b..32b+32 inside each token's
            // row (asserted above); the features as the caller guarantees.
            unsafe {
                let (w0, w1) = decode_512::<TY>(row.add(b * bb));
                for (k, ak) in a.iter_mut().enumerate() {
                    let xp = xt.add(k * cols + b * QK);
                    ak[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), ak[0]);
                    ak[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), ak[1]);
                }
            }
        }
        for (k, acc) in a.iter().enumerate() {
            // SAFETY: register arithmetic under AVX-512F.
            put(t + k, r, unsafe { finish_512(acc[0], acc[1]) });
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
        assert!((1..=4).contains(&tile) && t + tile <= acts.n);
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

    /// The f16 at `p` as f32 (F16C's conversion is exact, as the scalar one is).
    ///
    /// Safety: needs F16C; two bytes at `p` are readable.
    #[inline(always)]
    unsafe fn f16_1(p: *const u8) -> f32 {
        // SAFETY: the caller guarantees the feature and the bytes.
        unsafe {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                p.cast::<u16>().read_unaligned() as i32,
            )))
        }
    }

    /// A block's `(d, c_w)` as `super::block_dc` gives them.
    ///
    /// Safety: needs F16C; `p` points at a whole block of type `TY`.
    #[inline(always)]
    unsafe fn dc<const TY: u8>(p: *const u8) -> (f32, f32) {
        // SAFETY: the block's first 4 bytes are readable (caller).
        unsafe {
            let d = f16_1(p);
            match TY {
                Q4_0 => (d, d),
                Q4_1 => (d, f16_1(p.add(2))),
                _ => (d, 0.0),
            }
        }
    }

    /// A Q4 block's 32 codes in weight order (the low nibbles, then the high ones).
    ///
    /// Safety: needs AVX2; `p` points at a whole block of type `TY` (Q4_0 or Q4_1).
    #[inline(always)]
    unsafe fn q4_codes<const TY: u8>(p: *const u8) -> __m256i {
        // SAFETY: the 16 code bytes end the block (caller).
        unsafe {
            let qs = _mm_loadu_si128(p.add(if TY == Q4_0 { 2 } else { 4 }).cast());
            let m4 = _mm_set1_epi8(0x0F);
            _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16::<4>(qs), m4),
                _mm_and_si128(qs, m4),
            )
        }
    }

    /// The lane tree of `super::row_dot_scalar` over 16 lanes.
    ///
    /// Safety: needs AVX-512F.
    #[inline(always)]
    unsafe fn tree_512(v: __m512) -> f32 {
        // SAFETY: register arithmetic.
        unsafe {
            let s8 = _mm256_add_ps(
                _mm512_castps512_ps256(v),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
            );
            tree_256(s8)
        }
    }

    /// The last three levels of the lane tree, over 8 lanes.
    ///
    /// Safety: needs AVX.
    #[inline(always)]
    unsafe fn tree_256(s8: __m256) -> f32 {
        // SAFETY: register arithmetic.
        unsafe {
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)))
        }
    }

    /// Two blocks a `vpdpbusd` (16 lanes); Q8_0 as `|w|` times the activations signed by
    /// `w` (`128·127·4` fits), the Q4 codes as they are.
    ///
    /// Safety: needs AVX-512F/BW/VL/VNNI, AVX2 and F16C; sizes as in [`q8_row`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    unsafe fn q8_row_vnni<const TY: u8>(
        row: &[u8],
        nb: usize,
        acts: &Q8Activations,
        t: usize,
        tile: usize,
        acc: &mut [f32; 4],
    ) {
        let bb = [18, 20, 34][TY as usize];
        let cols = acts.cols;
        let p = row.as_ptr();
        let mut lanes = [_mm512_setzero_ps(); 4];
        let mut konst = [0.0f32; 4];
        // Lanes 0..8 take the first float of a pair, 8..16 the second.
        let pick = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut b = 0;
        while b + 2 <= nb {
            // SAFETY: blocks b, b + 1 are inside the row; values 32b .. 32b + 64 inside each
            // token row; scales b, b + 1 inside each token's `nb` (caller).
            unsafe {
                let (p0, p1) = (p.add(b * bb), p.add((b + 1) * bb));
                let (w, neg) = if TY == Q8_0 {
                    let w = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_loadu_si256(p0.add(2).cast())),
                        _mm256_loadu_si256(p1.add(2).cast()),
                    );
                    (_mm512_abs_epi8(w), _mm512_movepi8_mask(w))
                } else {
                    let w = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(q4_codes::<TY>(p0)),
                        q4_codes::<TY>(p1),
                    );
                    (w, 0)
                };
                let ((d0, c0), (d1, c1)) = (dc::<TY>(p0), dc::<TY>(p1));
                let dw = _mm_setr_ps(d0, d1, 0.0, 0.0);
                for k in 0..tile {
                    let tk = t + k;
                    let a = _mm512_loadu_si512(acts.qs.as_ptr().add(tk * cols + b * QK).cast());
                    let a = if TY == Q8_0 {
                        _mm512_mask_sub_epi8(a, neg, _mm512_setzero_si512(), a)
                    } else {
                        a
                    };
                    let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, a));
                    let da =
                        _mm_castpd_ps(_mm_load_sd(acts.d.as_ptr().add(tk * nb + b).cast::<f64>()));
                    let sc =
                        _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(_mm_mul_ps(dw, da)));
                    lanes[k] = _mm512_add_ps(lanes[k], _mm512_mul_ps(dot, sc));
                    let ca = acts.c.as_ptr().add(tk * nb + b);
                    konst[k] += c0 * *ca;
                    konst[k] += c1 * *ca.add(1);
                }
            }
            b += 2;
        }
        if b < nb {
            // SAFETY: the last block, as above (lanes 0..8 only).
            unsafe {
                let p0 = p.add(b * bb);
                let (w, neg) = if TY == Q8_0 {
                    let w = _mm256_loadu_si256(p0.add(2).cast());
                    (_mm256_abs_epi8(w), _mm256_movepi8_mask(w))
                } else {
                    (q4_codes::<TY>(p0), 0)
                };
                let (d0, c0) = dc::<TY>(p0);
                for k in 0..tile {
                    let tk = t + k;
                    let a = _mm256_loadu_si256(acts.qs.as_ptr().add(tk * cols + b * QK).cast());
                    let a = if TY == Q8_0 {
                        _mm256_mask_sub_epi8(a, neg, _mm256_setzero_si256(), a)
                    } else {
                        a
                    };
                    let dot = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a));
                    let sc = _mm256_set1_ps(d0 * *acts.d.as_ptr().add(tk * nb + b));
                    let lo =
                        _mm256_add_ps(_mm512_castps512_ps256(lanes[k]), _mm256_mul_ps(dot, sc));
                    lanes[k] = _mm512_castpd_ps(_mm512_insertf64x4::<0>(
                        _mm512_castps_pd(lanes[k]),
                        _mm256_castps_pd(lo),
                    ));
                    konst[k] += c0 * *acts.c.as_ptr().add(tk * nb + b);
                }
            }
        }
        for k in 0..tile {
            // SAFETY: register arithmetic under AVX-512F.
            acc[k] = unsafe { tree_512(lanes[k]) } + konst[k];
        }
    }

    /// One block a `vpmaddubsw` + `vpmaddwd` (8 lanes, `4j..4j+4` each, as a `vpdpbusd`
    /// lane): Q4 codes `15·127·2` and Q8_0's `|w|` with signed activations `128·127·2` fit
    /// in int16. Even blocks feed the first accumulator (lanes 0..8), odd ones the second.
    ///
    /// Safety: needs AVX2, FMA and F16C; sizes as in [`q8_row`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_row_avx2<const TY: u8>(
        row: &[u8],
        nb: usize,
        acts: &Q8Activations,
        t: usize,
        tile: usize,
        acc: &mut [f32; 4],
    ) {
        let bb = [18, 20, 34][TY as usize];
        let cols = acts.cols;
        let p = row.as_ptr();
        let ones = _mm256_set1_epi16(1);
        let mut lanes = [[_mm256_setzero_ps(); 2]; 4];
        let mut konst = [0.0f32; 4];
        for b in 0..nb {
            // SAFETY: block b is inside the row; values 32b .. 32b + 32 inside each token
            // row; scale b inside each token's `nb` (caller).
            unsafe {
                let p0 = p.add(b * bb);
                let (u, w) = if TY == Q8_0 {
                    let w = _mm256_loadu_si256(p0.add(2).cast());
                    (_mm256_sign_epi8(w, w), w)
                } else {
                    (q4_codes::<TY>(p0), _mm256_setzero_si256())
                };
                let (d0, c0) = dc::<TY>(p0);
                for k in 0..tile {
                    let tk = t + k;
                    let a = _mm256_loadu_si256(acts.qs.as_ptr().add(tk * cols + b * QK).cast());
                    let a = if TY == Q8_0 {
                        _mm256_sign_epi8(a, w)
                    } else {
                        a
                    };
                    let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), ones);
                    let sc = _mm256_set1_ps(d0 * *acts.d.as_ptr().add(tk * nb + b));
                    let l = &mut lanes[k][b % 2];
                    *l = _mm256_add_ps(*l, _mm256_mul_ps(_mm256_cvtepi32_ps(dot), sc));
                    konst[k] += c0 * *acts.c.as_ptr().add(tk * nb + b);
                }
            }
        }
        for k in 0..tile {
            // SAFETY: register arithmetic under AVX2.
            acc[k] = unsafe { tree_256(_mm256_add_ps(lanes[k][0], lanes[k][1])) } + konst[k];
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{BlockType, Q8Activations, Q8Path, QK};
    use std::arch::aarch64::*;

    /// `acc[k]` for tokens `t .. t + tile` (tile ≤ 4) of one row on a NEON path, with the
    /// lanes of `super::row_dot_scalar`: a block's 32 weights as two 16-byte vectors, each
    /// giving 4 lanes of 4-byte sums (signed: Q4 codes 0..=15, Q8_0 values), even blocks into
    /// lanes 0..8, odd ones into 8..16.
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
        assert!((1..=4).contains(&tile) && t + tile <= acts.n);
        // SAFETY: the path came from feature detection (asserted by the caller); sizes
        // asserted above.
        unsafe {
            if path == Q8Path::NeonDot {
                q8_row_dot(ty, row, nb, acts, t, tile, acc)
            } else {
                q8_row_neon(ty, row, nb, acts, t, tile, acc)
            }
        }
    }

    /// A block's weights as two signed byte vectors in weight order.
    ///
    /// Safety: needs NEON; `blk` is a whole block of type `ty`.
    #[inline(always)]
    unsafe fn weights(ty: BlockType, blk: &[u8]) -> [int8x16_t; 2] {
        debug_assert_eq!(blk.len(), ty.block_bytes());
        // SAFETY: the loads read bytes 2..34 (Q8_0) or the last 16 bytes (Q4) of the block.
        unsafe {
            if ty == BlockType::Q8_0 {
                [
                    vld1q_s8(blk.as_ptr().add(2).cast()),
                    vld1q_s8(blk.as_ptr().add(18).cast()),
                ]
            } else {
                let qs = vld1q_u8(blk.as_ptr().add(blk.len() - 16));
                [
                    vreinterpretq_s8_u8(vandq_u8(qs, vdupq_n_u8(0x0F))),
                    vreinterpretq_s8_u8(vshrq_n_u8::<4>(qs)),
                ]
            }
        }
    }

    /// Lanes `4j..4j+4` summed (four int32 lanes) with `smull` and pairwise adds.
    ///
    /// Safety: needs NEON.
    #[inline(always)]
    unsafe fn dot4_widen(w: int8x16_t, a: int8x16_t) -> int32x4_t {
        // |w·a| ≤ 128·127 fits int16; register arithmetic only.
        let lo = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(a)));
        let hi = vpaddlq_s16(vmull_high_s8(w, a));
        vpaddq_s32(lo, hi)
    }

    /// Lanes `4j..4j+4` summed with `sdot`.
    ///
    /// Safety: needs NEON and dotprod.
    #[inline(always)]
    unsafe fn dot4_sdot(w: int8x16_t, a: int8x16_t) -> int32x4_t {
        // SAFETY: the caller runs with dotprod.
        unsafe { super::super::neon::sdot(vdupq_n_s32(0), w, a) }
    }

    macro_rules! q8_row_body {
        ($ty:expr, $row:expr, $nb:expr, $acts:expr, $t:expr, $tile:expr, $acc:expr, $dot:expr) => {{
            let (ty, row, nb, acts, t, tile, acc) = ($ty, $row, $nb, $acts, $t, $tile, $acc);
            let bb = ty.block_bytes();
            let mut lanes = [[vdupq_n_f32(0.0); 4]; 4];
            let mut konst = [0.0f32; 4];
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                let (dw, cw) = super::block_dc(ty, blk);
                // SAFETY: `blk` is a whole block (chunks_exact).
                let w = unsafe { weights(ty, blk) };
                for k in 0..tile {
                    let tk = t + k;
                    let a = &acts.row(tk)[b * QK..(b + 1) * QK];
                    // SAFETY: `a` has 32 values.
                    let (a0, a1) = unsafe { (vld1q_s8(a.as_ptr()), vld1q_s8(a.as_ptr().add(16))) };
                    let sc = dw * acts.d[tk * nb + b];
                    let half = 2 * (b % 2);
                    for (h, (wv, av)) in [(w[0], a0), (w[1], a1)].into_iter().enumerate() {
                        // SAFETY: the enclosing function enables the features `$dot` needs.
                        let d = vcvtq_f32_s32(unsafe { $dot(wv, av) });
                        let l = &mut lanes[k][half + h];
                        *l = vaddq_f32(*l, vmulq_n_f32(d, sc));
                    }
                    konst[k] += cw * acts.c[tk * nb + b];
                }
            }
            for k in 0..tile {
                let [e0, e1, o0, o1] = lanes[k];
                let (s8a, s8b) = (vaddq_f32(e0, o0), vaddq_f32(e1, o1));
                let s4 = vaddq_f32(s8a, s8b);
                let s2 = vadd_f32(vget_low_f32(s4), vget_high_f32(s4));
                acc[k] = (vget_lane_f32::<0>(s2) + vget_lane_f32::<1>(s2)) + konst[k];
            }
        }};
    }

    /// Safety: needs NEON; sizes as in [`q8_row`].
    #[target_feature(enable = "neon")]
    unsafe fn q8_row_neon(
        ty: BlockType,
        row: &[u8],
        nb: usize,
        acts: &Q8Activations,
        t: usize,
        tile: usize,
        acc: &mut [f32; 4],
    ) {
        q8_row_body!(ty, row, nb, acts, t, tile, acc, dot4_widen)
    }

    /// Safety: needs NEON and dotprod; sizes as in [`q8_row`].
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn q8_row_dot(
        ty: BlockType,
        row: &[u8],
        nb: usize,
        acts: &Q8Activations,
        t: usize,
        tile: usize,
        acc: &mut [f32; 4],
    ) {
        q8_row_body!(ty, row, nb, acts, t, tile, acc, dot4_sdot)
    }
}

#[cfg(test)]
mod tests;
