//! Float matrices: embeddings, the lm_head, and the linears of non-ternary models.
//! Stored in the precision of the file (f16/bf16 stay 2 bytes a weight, Q6_K blocks 6.56
//! bits), either owned or viewed straight from the memory-mapped file ([`Buffer`]); every
//! product is computed in f32 on the weights as stored.

pub use crate::formats::mmap::Buffer;
use half::{bf16, f16};

/// The values of a [`DenseMatrix`]: `DenseData::F16(vec.into())` for owned values,
/// `DenseData::F16(mapped_slice.into())` for a view into a file map.
#[derive(Debug, Clone)]
pub enum DenseData {
    F32(Buffer<f32>),
    F16(Buffer<f16>),
    BF16(Buffer<bf16>),
    /// ggml Q6_K blocks (`cols` a multiple of 256), dequantized exactly as they are read.
    Q6K(Buffer<u8>),
    /// ggml Q4_0/Q4_1/Q8_0 blocks (`cols` a multiple of 32), multiplied by
    /// [`super::qblock`] (exactly, or with Q8 activations).
    Q32(super::qblock::BlockType, Buffer<u8>),
}

impl DenseData {
    /// The element type: `f32`, `f16` or `bf16` (owned or mapped alike).
    pub fn type_name(&self) -> &'static str {
        match self {
            DenseData::F32(_) => "f32",
            DenseData::F16(_) => "f16",
            DenseData::BF16(_) => "bf16",
            DenseData::Q6K(_) => "q6_k",
            DenseData::Q32(ty, _) => ty.name(),
        }
    }

    /// Whether the values are read from the file map rather than owned.
    pub fn is_mapped(&self) -> bool {
        match self {
            DenseData::F32(v) => v.is_mapped(),
            DenseData::F16(v) => v.is_mapped(),
            DenseData::BF16(v) => v.is_mapped(),
            DenseData::Q6K(v) => v.is_mapped(),
            DenseData::Q32(_, v) => v.is_mapped(),
        }
    }

    /// Bytes of the values.
    fn byte_len(&self) -> usize {
        match self {
            DenseData::F32(v) => v.len() * 4,
            DenseData::F16(v) => v.len() * 2,
            DenseData::BF16(v) => v.len() * 2,
            DenseData::Q6K(v) => v.len(),
            DenseData::Q32(_, v) => v.len(),
        }
    }

    /// Bytes `rows · cols` values take in this type (`None` for a Q6_K row that is not whole
    /// blocks).
    fn bytes_for(&self, rows: usize, cols: usize) -> Option<usize> {
        match self {
            DenseData::F32(_) => Some(rows * cols * 4),
            DenseData::F16(_) | DenseData::BF16(_) => Some(rows * cols * 2),
            DenseData::Q6K(_) => cols
                .is_multiple_of(super::q6k::Q6K_BLOCK)
                .then(|| rows * cols / super::q6k::Q6K_BLOCK * super::q6k::Q6K_BLOCK_BYTES),
            DenseData::Q32(ty, _) => ty.row_bytes(cols).map(|rb| rows * rb),
        }
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            DenseData::F32(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_f16(&self) -> Option<&[f16]> {
        match self {
            DenseData::F16(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_bf16(&self) -> Option<&[bf16]> {
        match self {
            DenseData::BF16(v) => Some(v),
            _ => None,
        }
    }
}

/// A row-major float matrix `[rows, cols]`.
#[derive(Debug, Clone)]
pub struct DenseMatrix {
    rows: usize,
    cols: usize,
    data: DenseData,
}

impl DenseMatrix {
    /// `data` must hold exactly `rows * cols` values.
    pub fn new(rows: usize, cols: usize, data: DenseData) -> crate::Result<Self> {
        let (have, want) = (data.byte_len(), data.bytes_for(rows, cols));
        if want != Some(have) {
            return Err(crate::Error::Invalid(match want {
                Some(want) => format!(
                    "{} matrix [{rows}, {cols}] given {have} bytes, expected {want}",
                    data.type_name()
                ),
                None => format!(
                    "{} matrix [{rows}, {cols}]: rows are not whole blocks",
                    data.type_name()
                ),
            }));
        }
        Ok(Self { rows, cols, data })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn data(&self) -> &DenseData {
        &self.data
    }
    /// Bytes of the values, owned or mapped (mapped pages count in the resident set only
    /// once read).
    pub fn memory_bytes(&self) -> usize {
        self.data.byte_len()
    }

    /// Bytes of one row of blocks (Q6_K or Q32).
    fn q6k_row(&self, v: &[u8], r: usize) -> std::ops::Range<usize> {
        let n = v.len() / self.rows.max(1);
        r * n..(r + 1) * n
    }

    /// Tells the kernel the mapped pages of rows `rows` are not needed for now (they fault
    /// back in from the file when read again); nothing for owned values.
    pub fn release_rows(&self, rows: std::ops::Range<usize>) {
        let elems = rows.start * self.cols..rows.end.min(self.rows) * self.cols;
        match &self.data {
            DenseData::F32(v) => v.release(elems),
            DenseData::F16(v) => v.release(elems),
            DenseData::BF16(v) => v.release(elems),
            DenseData::Q6K(v) | DenseData::Q32(_, v) => {
                let per_row = v.len() / self.rows.max(1);
                v.release(rows.start * per_row..rows.end.min(self.rows) * per_row)
            }
        }
    }

    /// Calls `f` on consecutive spans of rows covering the matrix. With `release`, the spans
    /// are 1024 rows (about 5 MiB of f16 at 2560 columns) and each span's mapped pages are
    /// released after `f` has read them: a quantized copy that replaces this matrix then
    /// grows the resident set by itself and one span, not by the whole matrix too.
    pub fn in_row_blocks(&self, release: bool, mut f: impl FnMut(std::ops::Range<usize>)) {
        const BLOCK_ROWS: usize = 1024;
        let step = if release {
            BLOCK_ROWS
        } else {
            self.rows.max(1)
        };
        for first in (0..self.rows).step_by(step) {
            let span = first..(first + step).min(self.rows);
            f(span.clone());
            if release {
                self.release_rows(span);
            }
        }
    }

    /// Copies row `r` into `out` as f32 (the embedding lookup).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let span = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            DenseData::F32(v) => out.copy_from_slice(&v[span]),
            DenseData::F16(v) => {
                for (o, x) in out.iter_mut().zip(&v[span]) {
                    *o = x.to_f32();
                }
            }
            DenseData::BF16(v) => {
                for (o, x) in out.iter_mut().zip(&v[span]) {
                    *o = x.to_f32();
                }
            }
            DenseData::Q6K(v) => super::q6k::dequantize_row_fast(&v[self.q6k_row(v, r)], out),
            DenseData::Q32(ty, v) => {
                super::qblock::dequantize_row_fast(*ty, &v[self.q6k_row(v, r)], out)
            }
        }
    }

    /// `Σ_k W[r][k] · x[k]` in f32, with the widest vector unit this CPU has (the sum
    /// order differs from [`Self::dot_row_scalar`], so the last bits may differ).
    pub fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        let span = r * self.cols..(r + 1) * self.cols;
        assert_eq!(x.len(), self.cols, "dense dot width");
        if let DenseData::Q6K(_) | DenseData::Q32(..) = &self.data {
            // The f32 product of the exactly dequantized row (as `dense_matmul` does it).
            return DECODED_ROW.with_borrow_mut(|row| {
                row.resize(self.cols, 0.0);
                self.row_to_f32(r, row);
                dot_f32_best(row, x)
            });
        }
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(v) = x86::dot(&self.data, span.clone(), x) {
                return v;
            }
        }
        self.dot_span_scalar(span, x)
    }

    /// The portable `dot_row`.
    pub fn dot_row_scalar(&self, r: usize, x: &[f32]) -> f32 {
        assert_eq!(x.len(), self.cols, "dense dot width");
        self.dot_span_scalar(r * self.cols..(r + 1) * self.cols, x)
    }

    fn dot_span_scalar(&self, span: std::ops::Range<usize>, x: &[f32]) -> f32 {
        match &self.data {
            DenseData::F32(v) => dot_f32(&v[span], x),
            DenseData::F16(v) => dot_converted(&v[span], x, |w| w.to_f32()),
            DenseData::BF16(v) => dot_converted(&v[span], x, |w| w.to_f32()),
            DenseData::Q6K(v) => {
                let r = span.start / self.cols.max(1);
                let mut row = vec![0.0; self.cols];
                super::q6k::dequantize_row(&v[self.q6k_row(v, r)], &mut row);
                dot_f32(&row, x)
            }
            DenseData::Q32(ty, v) => {
                let r = span.start / self.cols.max(1);
                let mut row = vec![0.0; self.cols];
                super::qblock::dequantize_row(*ty, &v[self.q6k_row(v, r)], &mut row);
                dot_f32(&row, x)
            }
        }
    }
}

thread_local! {
    /// One dequantized Q6_K row (the f32 products run on it); grows to the row width once.
    pub(super) static DECODED_ROW: std::cell::RefCell<Vec<f32>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// `Σ w·x` of two f32 rows with the widest vector unit this CPU has (the F32 `dot_row`).
pub(super) fn dot_f32_best(w: &[f32], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dense dot width");
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(v) = x86::dot_f32(w, x) {
            return v;
        }
    }
    dot_f32(w, x)
}

/// Eight independent accumulators: lets the compiler vectorize, and keeps the rounding
/// error of long rows small.
pub(super) fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    dot_converted(w, x, |v| *v)
}

#[inline(always)]
fn dot_converted<T>(w: &[T], x: &[f32], to_f32: impl Fn(&T) -> f32) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    let mut acc = [0.0f32; 8];
    let chunks = w.len() / 8;
    for c in 0..chunks {
        for i in 0..8 {
            acc[i] += to_f32(&w[c * 8 + i]) * x[c * 8 + i];
        }
    }
    let mut tail = 0.0f32;
    for k in chunks * 8..w.len() {
        tail += to_f32(&w[k]) * x[k];
    }
    acc.iter().sum::<f32>() + tail
}

/// The f32 kernel's instruction set: `Some(true)` for AVX-512, `Some(false)` for AVX2 (with
/// FMA and F16C), `None` for the portable loop. The exact block kernels ([`super::qblock`])
/// follow it, so that they sum in its order.
#[cfg(target_arch = "x86_64")]
pub(super) fn f32_level() -> Option<bool> {
    match x86::level() {
        x86::Level::Avx512 => Some(true),
        x86::Level::Avx2 => Some(false),
        x86::Level::Scalar => None,
    }
}

/// The f32 kernel's dot product on a given level (`true`: AVX-512, `false`: AVX2), for tests
/// that compare the block kernels with it; `None` where this CPU lacks the level.
#[cfg(all(test, target_arch = "x86_64"))]
pub(super) fn dot_f32_at(avx512: bool, w: &[f32], x: &[f32]) -> Option<f32> {
    x86::dot_f32_at(avx512, w, x)
}

/// AVX-512 and AVX2+FMA+F16C dot products of f32/f16/bf16 rows with f32 vectors.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::DenseData;
    use half::{bf16, f16};
    use std::arch::x86_64::*;
    use std::ops::Range;

    pub(super) use crate::kernels::{x86_level as level, X86Level as Level};

    /// `Σ w·x` of f32 rows; `None` where this CPU has neither vector unit.
    pub(super) fn dot_f32(w: &[f32], x: &[f32]) -> Option<f32> {
        debug_assert_eq!(w.len(), x.len());
        let n = w.len().min(x.len());
        // SAFETY: both pointers have `n` elements; each function runs only at the level
        // `level()` detected on this CPU.
        match level() {
            Level::Scalar => None,
            Level::Avx512 => Some(unsafe { f32_512(w.as_ptr(), x.as_ptr(), n) }),
            Level::Avx2 => Some(unsafe { f32_256(w.as_ptr(), x.as_ptr(), n) }),
        }
    }

    #[cfg(test)]
    pub(super) fn dot_f32_at(avx512: bool, w: &[f32], x: &[f32]) -> Option<f32> {
        assert_eq!(w.len(), x.len());
        // SAFETY: both slices have `w.len()` elements; each function runs only where its
        // features were detected.
        if avx512 {
            (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"))
                .then(|| unsafe { f32_512(w.as_ptr(), x.as_ptr(), w.len()) })
        } else {
            (is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c"))
            .then(|| unsafe { f32_256(w.as_ptr(), x.as_ptr(), w.len()) })
        }
    }

    /// `None` where this CPU has neither vector unit.
    pub(super) fn dot(data: &DenseData, span: Range<usize>, x: &[f32]) -> Option<f32> {
        debug_assert_eq!(span.len(), x.len());
        let n = x.len();
        let lvl = level();
        if lvl == Level::Scalar {
            return None;
        }
        // SAFETY (all arms): the slices have `n` elements each (span.len() == x.len()), and
        // the functions run only at the level `level()` detected on this CPU.
        Some(unsafe {
            match (data, lvl) {
                (DenseData::F32(v), Level::Avx512) => f32_512(v[span].as_ptr(), x.as_ptr(), n),
                (DenseData::F32(v), _) => f32_256(v[span].as_ptr(), x.as_ptr(), n),
                (DenseData::F16(v), Level::Avx512) => f16_512(v[span].as_ptr(), x.as_ptr(), n),
                (DenseData::F16(v), _) => f16_256(v[span].as_ptr(), x.as_ptr(), n),
                (DenseData::BF16(v), Level::Avx512) => bf16_512(v[span].as_ptr(), x.as_ptr(), n),
                (DenseData::BF16(v), _) => bf16_256(v[span].as_ptr(), x.as_ptr(), n),
                // Handled by the caller (`dot_row`) with the block kernels.
                (DenseData::Q6K(_) | DenseData::Q32(..), _) => return None,
            }
        })
    }

    /// Sixteen-wide loads of row elements as f32, two accumulators × 16 lanes, and a scalar
    /// tail. `$load(ptr, i)` returns 16 f32 from element `i`.
    macro_rules! dot512 {
        ($name:ident, $t:ty, $load:expr, $scalar:expr) => {
            #[target_feature(enable = "avx512f,avx512bw")]
            unsafe fn $name(w: *const $t, x: *const f32, n: usize) -> f32 {
                let mut a0 = _mm512_setzero_ps();
                let mut a1 = _mm512_setzero_ps();
                let mut i = 0;
                // SAFETY: every load reads elements below `n` of `w` and `x` (loop bounds),
                // which the caller guarantees are valid.
                unsafe {
                    while i + 32 <= n {
                        a0 = _mm512_fmadd_ps($load(w, i), _mm512_loadu_ps(x.add(i)), a0);
                        a1 = _mm512_fmadd_ps($load(w, i + 16), _mm512_loadu_ps(x.add(i + 16)), a1);
                        i += 32;
                    }
                    if i + 16 <= n {
                        a0 = _mm512_fmadd_ps($load(w, i), _mm512_loadu_ps(x.add(i)), a0);
                        i += 16;
                    }
                    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
                    while i < n {
                        s += $scalar(&*w.add(i)) * *x.add(i);
                        i += 1;
                    }
                    s
                }
            }
        };
    }

    /// The 8-wide AVX2 + FMA + F16C form of `dot512`.
    macro_rules! dot256 {
        ($name:ident, $t:ty, $load:expr, $scalar:expr) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $name(w: *const $t, x: *const f32, n: usize) -> f32 {
                let mut a0 = _mm256_setzero_ps();
                let mut a1 = _mm256_setzero_ps();
                let mut i = 0;
                // SAFETY: every load reads elements below `n` of `w` and `x` (loop bounds),
                // which the caller guarantees are valid.
                unsafe {
                    while i + 16 <= n {
                        a0 = _mm256_fmadd_ps($load(w, i), _mm256_loadu_ps(x.add(i)), a0);
                        a1 = _mm256_fmadd_ps($load(w, i + 8), _mm256_loadu_ps(x.add(i + 8)), a1);
                        i += 16;
                    }
                    if i + 8 <= n {
                        a0 = _mm256_fmadd_ps($load(w, i), _mm256_loadu_ps(x.add(i)), a0);
                        i += 8;
                    }
                    let v = _mm256_add_ps(a0, a1);
                    let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
                    let v = _mm_add_ss(v, _mm_movehdup_ps(v));
                    let mut s = _mm_cvtss_f32(v);
                    while i < n {
                        s += $scalar(&*w.add(i)) * *x.add(i);
                        i += 1;
                    }
                    s
                }
            }
        };
    }

    dot512!(
        f32_512,
        f32,
        |w: *const f32, i| _mm512_loadu_ps(w.add(i)),
        |v: &f32| *v
    );
    dot512!(
        f16_512,
        f16,
        |w: *const f16, i| _mm512_cvtph_ps(_mm256_loadu_si256(w.add(i).cast())),
        |v: &f16| v.to_f32()
    );
    dot512!(
        bf16_512,
        bf16,
        |w: *const bf16, i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(w.add(i).cast())
        ))),
        |v: &bf16| v.to_f32()
    );
    dot256!(
        f32_256,
        f32,
        |w: *const f32, i| _mm256_loadu_ps(w.add(i)),
        |v: &f32| *v
    );
    dot256!(
        f16_256,
        f16,
        |w: *const f16, i| _mm256_cvtph_ps(_mm_loadu_si128(w.add(i).cast())),
        |v: &f16| v.to_f32()
    );
    dot256!(
        bf16_256,
        bf16,
        |w: *const bf16, i| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
            _mm_loadu_si128(w.add(i).cast())
        ))),
        |v: &bf16| v.to_f32()
    );
}
