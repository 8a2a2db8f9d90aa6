//! Float matrices: embeddings, the lm_head, and the linears of non-ternary models.
//! Stored in the precision of the file (f16/bf16 stay 2 bytes a weight); every product
//! is computed in f32.

use half::{bf16, f16};

#[derive(Debug, Clone)]
pub enum DenseData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl DenseData {
    pub fn type_name(&self) -> &'static str {
        match self {
            DenseData::F32(_) => "f32",
            DenseData::F16(_) => "f16",
            DenseData::BF16(_) => "bf16",
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
        let len = match &data {
            DenseData::F32(v) => v.len(),
            DenseData::F16(v) => v.len(),
            DenseData::BF16(v) => v.len(),
        };
        if len != rows * cols {
            return Err(crate::Error::Invalid(format!(
                "dense matrix [{rows}, {cols}] given {len} values"
            )));
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
    pub fn memory_bytes(&self) -> usize {
        let width = match self.data {
            DenseData::F32(_) => 4,
            DenseData::F16(_) | DenseData::BF16(_) => 2,
        };
        self.rows * self.cols * width
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
        }
    }

    /// `Σ_k W[r][k] · x[k]` in f32.
    pub fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        let span = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            DenseData::F32(v) => dot_f32(&v[span], x),
            DenseData::F16(v) => dot_converted(&v[span], x, |w| w.to_f32()),
            DenseData::BF16(v) => dot_converted(&v[span], x, |w| w.to_f32()),
        }
    }
}

/// Eight independent accumulators: lets the compiler vectorize, and keeps the rounding
/// error of long rows small.
fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
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
