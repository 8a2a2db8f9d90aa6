//! The in-memory ternary weight layout and per-token int8 activations.

use crate::{Error, Result};

/// Weights a packed block covers; rows are zero-padded to a multiple of it.
pub const BLOCK_WEIGHTS: usize = 128;
const BLOCK_BYTES: usize = BLOCK_WEIGHTS / 4;

/// A ternary matrix `[rows, cols]`, repacked once at load.
///
/// Layout: row-major; each row is `padded_cols / 128` blocks of 32 bytes. Byte `j` of a block
/// holds the codes (`trit + 1`, so 0, 1 or 2) of elements `j`, `j+32`, `j+64`, `j+96` in bits
/// 1-0, 3-2, 5-4, 7-6. Shifting a block right by 2·i and masking gives 32 consecutive codes,
/// which is what SIMD kernels want; `Σ t·q = Σ code·q − Σ q`.
#[derive(Debug, Clone)]
pub struct TernaryMatrix {
    rows: usize,
    cols: usize,
    padded_cols: usize,
    /// 64-byte aligned, so SIMD loads of a block never straddle two cache lines.
    packed: AlignedBytes,
    /// Per output row: `y = dot / activation_scale * multiplier`.
    multipliers: Vec<f32>,
}

impl TernaryMatrix {
    /// Builds the matrix row by row: `fill(r, trits)` writes row `r`'s `cols` trits and
    /// returns its multiplier. Loaders decode their format straight into this, so no
    /// full-size intermediate is ever held.
    pub fn from_rows(
        rows: usize,
        cols: usize,
        mut fill: impl FnMut(usize, &mut [i8]) -> Result<f32>,
    ) -> Result<Self> {
        let padded_cols = cols.div_ceil(BLOCK_WEIGHTS) * BLOCK_WEIGHTS;
        let row_bytes = padded_cols / 4;
        let mut packed = AlignedBytes::zeroed(rows * row_bytes);
        let mut multipliers = Vec::with_capacity(rows);
        let mut trits = vec![0i8; padded_cols];
        for r in 0..rows {
            trits.fill(0);
            multipliers.push(fill(r, &mut trits[..cols])?);
            let out = &mut packed.bytes_mut()[r * row_bytes..(r + 1) * row_bytes];
            for (block, bytes) in trits
                .chunks_exact(BLOCK_WEIGHTS)
                .zip(out.chunks_exact_mut(BLOCK_BYTES))
            {
                for (j, byte) in bytes.iter_mut().enumerate() {
                    let mut b = 0u8;
                    for i in 0..4 {
                        let t = block[j + 32 * i];
                        if !(-1..=1).contains(&t) {
                            return Err(Error::Invalid(format!(
                                "ternary weight {t} at row {r} is not -1, 0 or 1"
                            )));
                        }
                        b |= ((t + 1) as u8) << (2 * i);
                    }
                    *byte = b;
                }
            }
        }
        Ok(Self {
            rows,
            cols,
            padded_cols,
            packed,
            multipliers,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Columns rounded up to whole blocks; activation rows must have this length.
    pub fn padded_cols(&self) -> usize {
        self.padded_cols
    }
    /// Packed bytes of one row (`padded_cols / 4` of them).
    pub fn packed_row(&self, r: usize) -> &[u8] {
        let n = self.padded_cols / 4;
        &self.packed.bytes()[r * n..(r + 1) * n]
    }
    pub fn multipliers(&self) -> &[f32] {
        &self.multipliers
    }
    /// Bytes of memory the packed weights and scales take.
    pub fn memory_bytes(&self) -> usize {
        self.packed.len + self.multipliers.len() * 4
    }
    /// One weight, decoded (for tests and conversion).
    pub fn trit(&self, r: usize, c: usize) -> i8 {
        let row = self.packed_row(r);
        let (block, k) = (c / BLOCK_WEIGHTS, c % BLOCK_WEIGHTS);
        let byte = row[block * BLOCK_BYTES + k % 32];
        ((byte >> (2 * (k / 32))) & 3) as i8 - 1
    }
}

/// Batches of at least this many rows are quantized in parallel.
const PARALLEL_ROWS: usize = 16;

/// The buffers of a [`QuantizedActivations`] shared by pool tasks that write disjoint rows.
#[derive(Clone, Copy)]
struct RowsOut {
    values: *mut i8,
    scales: *mut f32,
    sums: *mut i32,
}
// SAFETY: tasks given one `RowsOut` write disjoint rows, and the buffers outlive them (the
// pool returns only when every task is done).
unsafe impl Send for RowsOut {}
unsafe impl Sync for RowsOut {}

impl RowsOut {
    /// Taking `self` makes closures capture the whole wrapper, not its raw fields.
    fn row(self, r: usize, padded: usize) -> *mut i8 {
        // SAFETY: callers pass rows inside the buffer.
        unsafe { self.values.add(r * padded) }
    }
}

/// A batch of activation rows quantized to int8, one scale per row (per token).
#[derive(Debug, Clone, Default)]
pub struct QuantizedActivations {
    n_rows: usize,
    padded_cols: usize,
    /// 64-byte aligned; rows are whole blocks of 128, so every row starts aligned too.
    values: AlignedBytes,
    scales: Vec<f32>,
    sums: Vec<i32>,
}

impl QuantizedActivations {
    /// Room for `max_rows` rows of up to `max_cols` columns, allocated once.
    pub fn with_capacity(max_rows: usize, max_cols: usize) -> Self {
        let padded = max_cols.div_ceil(BLOCK_WEIGHTS) * BLOCK_WEIGHTS;
        Self {
            n_rows: 0,
            padded_cols: 0,
            values: AlignedBytes::with_capacity(max_rows * padded),
            scales: Vec::with_capacity(max_rows),
            sums: Vec::with_capacity(max_rows),
        }
    }

    /// Quantizes `n_rows` rows of `cols` floats (row-major in `x`), padding each to whole
    /// blocks with zeros. Reuses the buffers; allocates only if they are too small.
    pub fn quantize(&mut self, x: &[f32], n_rows: usize, cols: usize) {
        debug_assert_eq!(x.len(), n_rows * cols);
        let padded = cols.div_ceil(BLOCK_WEIGHTS) * BLOCK_WEIGHTS;
        self.n_rows = n_rows;
        self.padded_cols = padded;
        self.values.resize(n_rows * padded);
        self.scales.resize(n_rows, 0.0);
        self.sums.resize(n_rows, 0);
        let values = self.values.i8s_mut();
        if n_rows < PARALLEL_ROWS {
            for r in 0..n_rows {
                let q = &mut values[r * padded..(r + 1) * padded];
                let (scale, sum) = quantize_row(&x[r * cols..(r + 1) * cols], &mut q[..cols]);
                q[cols..].fill(0);
                self.scales[r] = scale;
                self.sums[r] = sum;
            }
            return;
        }
        // Large batches (prefill): rows in parallel on the pool, in chunks of disjoint rows.
        let out = RowsOut {
            values: values.as_mut_ptr(),
            scales: self.scales.as_mut_ptr(),
            sums: self.sums.as_mut_ptr(),
        };
        let chunks = n_rows.div_ceil(PARALLEL_ROWS / 2);
        let per = n_rows.div_ceil(chunks);
        super::pool::SpinPool::current().run(chunks, &|c| {
            for r in c * per..((c + 1) * per).min(n_rows) {
                // SAFETY: row r < n_rows lies inside the buffers sized above (values
                // n_rows·padded, scales and sums n_rows), and each row belongs to one chunk.
                let (q, scale, sum) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(out.row(r, padded), padded),
                        &mut *out.scales.add(r),
                        &mut *out.sums.add(r),
                    )
                };
                let (s, total) = quantize_row(&x[r * cols..(r + 1) * cols], &mut q[..cols]);
                q[cols..].fill(0);
                *scale = s;
                *sum = total;
            }
        });
    }

    /// Rows that are already int8 (`n_rows × cols`, row-major), each with scale `scale`;
    /// for tests and benchmarks, which need activations such as −128 that `quantize` never
    /// produces.
    pub fn from_int8(q: &[i8], n_rows: usize, cols: usize, scale: f32) -> Self {
        assert_eq!(q.len(), n_rows * cols, "from_int8 size");
        let padded = cols.div_ceil(BLOCK_WEIGHTS) * BLOCK_WEIGHTS;
        let mut values = AlignedBytes::zeroed(n_rows * padded);
        let mut sums = Vec::with_capacity(n_rows);
        for r in 0..n_rows {
            let src = &q[r * cols..(r + 1) * cols];
            values.i8s_mut()[r * padded..r * padded + cols].copy_from_slice(src);
            sums.push(src.iter().map(|&v| v as i32).sum());
        }
        Self {
            n_rows,
            padded_cols: padded,
            values,
            scales: vec![scale; n_rows],
            sums,
        }
    }

    pub fn n_rows(&self) -> usize {
        self.n_rows
    }
    pub fn padded_cols(&self) -> usize {
        self.padded_cols
    }
    /// The int8 values of row `r`, `padded_cols` long.
    pub fn row(&self, r: usize) -> &[i8] {
        &self.values.i8s()[r * self.padded_cols..(r + 1) * self.padded_cols]
    }
    /// `s` of row `r`: the factor the floats were multiplied by.
    pub fn scale(&self, r: usize) -> f32 {
        self.scales[r]
    }
    /// `Σ q` of row `r`, for kernels that multiply unsigned codes.
    pub fn sum(&self, r: usize) -> i32 {
        self.sums[r]
    }
}

/// One cache line of bytes; the unit of [`AlignedBytes`].
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A byte buffer that starts on a 64-byte boundary.
#[derive(Clone, Default)]
struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

impl std::fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBytes({} bytes)", self.len)
    }
}

impl AlignedBytes {
    fn zeroed(len: usize) -> Self {
        Self {
            lines: vec![Line([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    fn with_capacity(len: usize) -> Self {
        Self {
            lines: Vec::with_capacity(len.div_ceil(64)),
            len: 0,
        }
    }

    /// Sets the length; bytes that were not part of the buffer before are zero.
    fn resize(&mut self, len: usize) {
        self.lines.resize(len.div_ceil(64), Line([0; 64]));
        self.len = len;
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is `repr(C)` around `[u8; 64]` (no padding), so the vector's
        // initialized lines are `lines.len() * 64 >= len` contiguous initialized bytes.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and the slice borrows `self` mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), self.len) }
    }

    fn i8s(&self) -> &[i8] {
        // SAFETY: as in `bytes`; `i8` has the size, alignment and validity of `u8`.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<i8>(), self.len) }
    }

    fn i8s_mut(&mut self) -> &mut [i8] {
        // SAFETY: as in `i8s`, and the slice borrows `self` mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<i8>(), self.len) }
    }
}

/// Per-token absmax quantization exactly as transformers' BitNet does it in f32:
/// `s = 127 / max(max|x|, 1e-5)`, `q = clamp(round_half_even(x·s), -128, 127)`.
/// Returns `(s, Σq)`. Vectorized where the CPU allows (see [`super::quant`]).
pub fn quantize_row(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    super::quant::quantize_row(x, q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_and_decodes_every_position() {
        let (rows, cols) = (3, 300);
        let trit = |r: usize, c: usize| ((r * 7 + c * 13) % 3) as i8 - 1;
        let m = TernaryMatrix::from_rows(rows, cols, |r, t| {
            for (c, v) in t.iter_mut().enumerate() {
                *v = trit(r, c);
            }
            Ok(r as f32)
        })
        .unwrap();
        assert_eq!(m.padded_cols(), 384);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(m.trit(r, c), trit(r, c), "({r},{c})");
            }
            for c in cols..384 {
                assert_eq!(m.trit(r, c), 0);
            }
        }
        assert_eq!(m.multipliers(), &[0.0, 1.0, 2.0]);
    }

    #[test]
    fn rejects_non_ternary_values() {
        let err = TernaryMatrix::from_rows(1, 4, |_, t| {
            t[2] = 2;
            Ok(1.0)
        })
        .unwrap_err();
        assert!(err.to_string().contains("not -1, 0 or 1"), "{err}");
    }

    #[test]
    fn quantizes_like_transformers() {
        let x = [0.5f32, -1.0, 0.25, 0.0];
        let mut q = [0i8; 4];
        let (s, sum) = quantize_row(&x, &mut q);
        assert_eq!(s, 127.0);
        // 63.5 rounds to even (64), 31.75 to 32.
        assert_eq!(q, [64, -127, 32, 0]);
        assert_eq!(sum, 64 - 127 + 32);
        // All zeros: the max is floored at 1e-5, values stay 0.
        let (s, _) = quantize_row(&[0.0; 4], &mut q);
        assert_eq!(s, 127.0 / 1e-5);
        assert_eq!(q, [0; 4]);
    }
}
