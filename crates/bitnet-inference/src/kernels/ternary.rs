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
    /// Per output row: `y = dot / activation_scale * multiplier` (1 where `group` is set).
    multipliers: Vec<f32>,
    /// Group-wise scales instead: one scale per `group` consecutive weights of a row (64 or
    /// 128; 0 for none), `[rows, padded_cols / group]` padded to whole vectors of 8. Then
    /// `y = (Σ_g dot_g · scale_g) / activation_scale`, the groups added in the fixed f32
    /// order of [`super::group`]. Such matrices hold their rows in the group kernels' layout
    /// ([`super::group`]'s module docs), not the one above.
    group: usize,
    group_scales: GroupScales,
    /// Bytes of one packed row: `padded_cols / 4`, or whole 512-weight chunks in the group
    /// layout.
    row_bytes: usize,
}

/// The group-wise scales of a [`TernaryMatrix`]: f16 where every one is exactly an f16 (the
/// Q2_0 files': half the bytes to stream in decode), else f32.
#[derive(Debug, Clone, Default)]
pub enum GroupScales {
    #[default]
    None,
    F16(Vec<half::f16>),
    F32(Vec<f32>),
}

/// One row's group scales (see [`GroupScales`]).
#[derive(Debug, Clone, Copy)]
pub enum GroupScalesRow<'a> {
    F16(&'a [half::f16]),
    F32(&'a [f32]),
}

impl GroupScalesRow<'_> {
    /// Scale `g` as f32 (f16 widens exactly).
    pub fn get(&self, g: usize) -> f32 {
        match self {
            GroupScalesRow::F16(s) => s[g].to_f32(),
            GroupScalesRow::F32(s) => s[g],
        }
    }
    pub fn len(&self) -> usize {
        match self {
            GroupScalesRow::F16(s) => s.len(),
            GroupScalesRow::F32(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Group sizes [`TernaryMatrix`] takes for group-wise scales (whole halves of its 128-weight
/// blocks).
pub const GROUP_SIZES: [usize; 2] = [64, 128];

impl TernaryMatrix {
    /// Builds the matrix row by row: `fill(r, trits)` writes row `r`'s `cols` trits and
    /// returns its multiplier. Loaders decode their format straight into this, so no
    /// full-size intermediate is ever held. Rows are filled in order (for generators with
    /// sequential state); loaders use [`Self::from_rows_parallel`].
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
            pack_row(
                &trits,
                &mut packed.bytes_mut()[r * row_bytes..(r + 1) * row_bytes],
                r,
            )?;
        }
        Ok(Self {
            rows,
            cols,
            padded_cols,
            packed,
            multipliers,
            group: 0,
            group_scales: GroupScales::None,
            row_bytes,
        })
    }

    /// [`Self::from_rows`] with the rows filled and packed in parallel on rayon's current
    /// pool; `fill` may be called for rows in any order and from several threads. The result
    /// is the same as `from_rows`'s, and so is the error: that of the lowest failing row
    /// (rows after a known failure are skipped).
    pub fn from_rows_parallel(
        rows: usize,
        cols: usize,
        fill: impl Fn(usize, &mut [i8]) -> Result<f32> + Sync,
    ) -> Result<Self> {
        Self::from_rows_parallel_with(rows, cols, || (), |_, r, trits| fill(r, trits))
    }

    /// [`Self::from_rows_parallel`] with per-task scratch: `init()` makes a state (say, a row
    /// buffer) that `fill(state, r, trits)` may use for the rows of one task.
    pub fn from_rows_parallel_with<S>(
        rows: usize,
        cols: usize,
        init: impl Fn() -> S + Sync,
        fill: impl Fn(&mut S, usize, &mut [i8]) -> Result<f32> + Sync,
    ) -> Result<Self> {
        let padded_cols = cols.div_ceil(BLOCK_WEIGHTS) * BLOCK_WEIGHTS;
        Self::from_packed_rows_parallel_with(
            rows,
            cols,
            || (init(), vec![0i8; padded_cols]),
            |(state, trits), r, out| {
                trits.fill(0);
                let m = fill(state, r, &mut trits[..cols])?;
                Self::pack_row(trits, out, r)?;
                Ok(m)
            },
        )
    }

    /// Like [`Self::from_rows_parallel_with`], for formats whose rows are (nearly) this
    /// layout already: `fill(state, r, out)` writes row `r` packed, all `padded_cols / 4`
    /// bytes of it (padding included: code 1, bytes `0x55`), and returns its multiplier.
    pub fn from_packed_rows_parallel_with<S>(
        rows: usize,
        cols: usize,
        init: impl Fn() -> S + Sync,
        fill: impl Fn(&mut S, usize, &mut [u8]) -> Result<f32> + Sync,
    ) -> Result<Self> {
        use rayon::prelude::*;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Mutex;

        let padded_cols = cols.div_ceil(BLOCK_WEIGHTS) * BLOCK_WEIGHTS;
        let row_bytes = padded_cols / 4;
        let mut packed = AlignedBytes::zeroed(rows * row_bytes);
        let mut multipliers = vec![0f32; rows];
        if row_bytes == 0 {
            // No weights (and no byte chunks to split): just the multipliers.
            let mut state = init();
            for (r, m) in multipliers.iter_mut().enumerate() {
                *m = fill(&mut state, r, &mut [])?;
            }
        }
        // The lowest row known to have failed, and its error.
        let first_bad = AtomicUsize::new(usize::MAX);
        let error: Mutex<Option<(usize, Error)>> = Mutex::new(None);
        packed
            .bytes_mut()
            .par_chunks_mut((LOAD_CHUNK_ROWS * row_bytes).max(1))
            .zip(multipliers.par_chunks_mut(LOAD_CHUNK_ROWS))
            .enumerate()
            .for_each_init(&init, |state, (chunk, (out, mults))| {
                for (k, (out, mult)) in out.chunks_exact_mut(row_bytes).zip(mults).enumerate() {
                    let r = chunk * LOAD_CHUNK_ROWS + k;
                    // Rows below the final first failure are never skipped, so the lowest
                    // failing row is always found.
                    if r > first_bad.load(Ordering::Relaxed) {
                        return;
                    }
                    match fill(state, r, out) {
                        Ok(m) => *mult = m,
                        Err(e) => {
                            first_bad.fetch_min(r, Ordering::Relaxed);
                            let mut slot = error.lock().unwrap_or_else(|p| p.into_inner());
                            if slot.as_ref().is_none_or(|(at, _)| r < *at) {
                                *slot = Some((r, e));
                            }
                            return;
                        }
                    }
                }
            });
        if let Some((_, e)) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        Ok(Self {
            rows,
            cols,
            padded_cols,
            packed,
            multipliers,
            group: 0,
            group_scales: GroupScales::None,
            row_bytes,
        })
    }

    /// Gives the matrix group-wise scales: `scales` holds `cols / group` scales a row
    /// (`cols` a multiple of `group`, one of [`GROUP_SIZES`]), row after row; the row
    /// multipliers become 1 and the rows are repacked into the group kernels' layout.
    pub fn with_group_scales(mut self, group: usize, scales: &[f32]) -> Result<Self> {
        if !GROUP_SIZES.contains(&group) || !self.cols.is_multiple_of(group) {
            return Err(Error::Invalid(format!(
                "group-wise scales need groups of 64 or 128 dividing the row length {}, got {group}",
                self.cols
            )));
        }
        // Rows of scales padded with zeros to whole vectors of 8 (the AVX2 kernel's step).
        let (per_row, padded) = (
            self.cols / group,
            (self.padded_cols / group).next_multiple_of(8),
        );
        if scales.len() != self.rows * per_row {
            return Err(Error::Invalid(format!(
                "{} group scales for {} rows of {per_row} groups",
                scales.len(),
                self.rows
            )));
        }
        if let Some(s) = scales.iter().find(|s| !s.is_finite()) {
            return Err(Error::Invalid(format!("group scale {s} is not finite")));
        }
        let mut all = vec![0f32; self.rows * padded];
        for (dst, src) in all
            .chunks_exact_mut(padded)
            .zip(scales.chunks_exact(per_row))
        {
            dst[..per_row].copy_from_slice(src);
        }
        let halves: Vec<half::f16> = all.iter().map(|&s| half::f16::from_f32(s)).collect();
        self.group_scales = if halves.iter().zip(&all).all(|(h, &s)| h.to_f32() == s) {
            GroupScales::F16(halves)
        } else {
            GroupScales::F32(all)
        };
        if self.group == 0 {
            self.regroup();
        }
        self.multipliers.fill(1.0);
        self.group = group;
        Ok(self)
    }

    /// Repacks the rows from the per-tensor layout into the group kernels' layout.
    fn regroup(&mut self) {
        use rayon::prelude::*;
        let (old, new) = (self.row_bytes, super::group::row_bytes(self.padded_cols));
        let mut packed = AlignedBytes::zeroed(self.rows * new);
        if new > 0 {
            let src = self.packed.bytes();
            packed
                .bytes_mut()
                .par_chunks_mut(new)
                .enumerate()
                .for_each(|(r, dst)| super::group::regroup_row(&src[r * old..(r + 1) * old], dst));
        }
        self.packed = packed;
        self.row_bytes = new;
    }

    /// Weights a group scale covers (0: per-row multipliers).
    pub fn group(&self) -> usize {
        self.group
    }

    /// Row `r`'s group scales (`cols / group` of them, then zeros up to a multiple of 8
    /// groups; empty without groups).
    pub fn group_scales_row(&self, r: usize) -> GroupScalesRow<'_> {
        let n = self
            .padded_cols
            .checked_div(self.group)
            .map_or(0, |g| g.next_multiple_of(8));
        match &self.group_scales {
            GroupScales::F32(s) => GroupScalesRow::F32(&s[r * n..(r + 1) * n]),
            GroupScales::F16(s) => GroupScalesRow::F16(&s[r * n..(r + 1) * n]),
            GroupScales::None => GroupScalesRow::F32(&[]),
        }
    }

    /// Packs row `r`'s trits (a whole number of blocks, padding included) into `out`
    /// (`trits.len() / 4` bytes, see the layout above); the error names `r`.
    pub fn pack_row(trits: &[i8], out: &mut [u8], r: usize) -> Result<()> {
        pack_row(trits, out, r)
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
    /// Packed bytes of one row: `padded_cols / 4` of them in the layout above, or in the
    /// group kernels' layout where the matrix has group-wise scales.
    pub fn packed_row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes;
        &self.packed.bytes()[r * n..(r + 1) * n]
    }
    /// Every row's packed bytes, row after row (`rows × row_bytes`).
    pub(super) fn packed_rows(&self) -> &[u8] {
        self.packed.bytes()
    }
    pub fn multipliers(&self) -> &[f32] {
        &self.multipliers
    }
    /// Bytes of memory the packed weights and scales take.
    pub fn memory_bytes(&self) -> usize {
        let scales = match &self.group_scales {
            GroupScales::None => 0,
            GroupScales::F16(s) => s.len() * 2,
            GroupScales::F32(s) => s.len() * 4,
        };
        self.packed.len + self.multipliers.len() * 4 + scales
    }
    /// One weight, decoded (for tests and conversion).
    pub fn trit(&self, r: usize, c: usize) -> i8 {
        let row = self.packed_row(r);
        if self.group != 0 {
            let (byte, shift) = super::group::position(c, self.padded_cols);
            return ((row[byte] >> shift) & 3) as i8 - 1;
        }
        let (block, k) = (c / BLOCK_WEIGHTS, c % BLOCK_WEIGHTS);
        let byte = row[block * BLOCK_BYTES + k % 32];
        ((byte >> (2 * (k / 32))) & 3) as i8 - 1
    }
}

/// Rows a task of [`TernaryMatrix::from_rows_parallel`] fills at a time (a few hundred µs of
/// decoding for 2B-model rows: fine enough to balance, coarse enough to be cheap).
const LOAD_CHUNK_ROWS: usize = 8;

/// Packs one row's `padded_cols` trits (see [`TernaryMatrix`]'s layout) into `out`.
fn pack_row(trits: &[i8], out: &mut [u8], r: usize) -> Result<()> {
    // One vectorizable check; the element loop below only runs to name the culprit.
    if !trits.iter().all(|t| (-1..=1).contains(t)) {
        for block in trits.chunks_exact(BLOCK_WEIGHTS) {
            for j in 0..BLOCK_BYTES {
                for i in 0..4 {
                    let t = block[j + 32 * i];
                    if !(-1..=1).contains(&t) {
                        return Err(Error::Invalid(format!(
                            "ternary weight {t} at row {r} is not -1, 0 or 1"
                        )));
                    }
                }
            }
        }
    }
    for (block, bytes) in trits
        .chunks_exact(BLOCK_WEIGHTS)
        .zip(out.chunks_exact_mut(BLOCK_BYTES))
    {
        let code = |i: usize, j: usize| (block[32 * i + j] + 1) as u8;
        for (j, byte) in bytes.iter_mut().enumerate() {
            *byte = code(0, j) | code(1, j) << 2 | code(2, j) << 4 | code(3, j) << 6;
        }
    }
    Ok(())
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
    /// The rows again in the layout of matrix-tile kernels ([`Self::make_tiled`]); stale
    /// (`tiled_rows == 0`) until made for the current rows.
    tiled: AlignedBytes,
    tiled_rows: usize,
}

/// Rows a group of [`QuantizedActivations::tiled`] holds (an AMX tile's 16 columns).
pub const TILE_ROWS: usize = 16;

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
            tiled: AlignedBytes::with_capacity(0),
            tiled_rows: 0,
        }
    }

    /// Quantizes `n_rows` rows of `cols` floats (row-major in `x`), padding each to whole
    /// blocks with zeros. Reuses the buffers; allocates only if they are too small.
    pub fn quantize(&mut self, x: &[f32], n_rows: usize, cols: usize) {
        debug_assert_eq!(x.len(), n_rows * cols);
        let padded = cols.div_ceil(BLOCK_WEIGHTS) * BLOCK_WEIGHTS;
        self.n_rows = n_rows;
        self.padded_cols = padded;
        self.tiled_rows = 0;
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
        super::pool::run(chunks, &|c| {
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
            tiled: AlignedBytes::with_capacity(0),
            tiled_rows: 0,
        }
    }

    /// Builds [`Self::tiled`] for the current rows: for each pair of groups of
    /// [`TILE_ROWS`] rows (zero rows pad the last pair) and each 4 columns `4j..4j+3`, the 16
    /// rows' 4 bytes one after the other (64 bytes). That is the B operand of AMX's
    /// `tdpbusd` (K/4 rows of 16 × 4 bytes), so a tile loads straight from it. The buffer
    /// grows to the largest batch once, like the others.
    pub fn make_tiled(&mut self) {
        let (n, padded) = (self.n_rows, self.padded_cols);
        let groups = n.div_ceil(2 * TILE_ROWS) * 2;
        let group_bytes = TILE_ROWS * padded;
        self.tiled.resize(groups * group_bytes);
        let values = self.values.bytes();
        let tiled = self.tiled.bytes_mut();
        super::pool::for_each_chunk_mut(tiled, group_bytes, &|g, dst| {
            for t in 0..TILE_ROWS {
                let r = g * TILE_ROWS + t;
                if r >= n {
                    for j in 0..padded / 4 {
                        dst[j * 64 + t * 4..j * 64 + t * 4 + 4].fill(0);
                    }
                    continue;
                }
                let src = &values[r * padded..(r + 1) * padded];
                for (j, four) in src.chunks_exact(4).enumerate() {
                    dst[j * 64 + t * 4..j * 64 + t * 4 + 4].copy_from_slice(four);
                }
            }
        });
        self.tiled_rows = n;
    }

    /// The rows in the layout [`Self::make_tiled`] describes, if it was made for them.
    pub fn tiled(&self) -> Option<&[u8]> {
        (self.tiled_rows == self.n_rows && self.n_rows > 0).then(|| self.tiled.bytes())
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
pub(super) struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

impl std::fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBytes({} bytes)", self.len)
    }
}

impl AlignedBytes {
    pub(super) fn zeroed(len: usize) -> Self {
        Self {
            lines: vec![Line([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    pub(super) fn with_capacity(len: usize) -> Self {
        Self {
            lines: Vec::with_capacity(len.div_ceil(64)),
            len: 0,
        }
    }

    /// Sets the length; bytes that were not part of the buffer before are zero.
    pub(super) fn resize(&mut self, len: usize) {
        self.lines.resize(len.div_ceil(64), Line([0; 64]));
        self.len = len;
    }

    pub(super) fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is `repr(C)` around `[u8; 64]` (no padding), so the vector's
        // initialized lines are `lines.len() * 64 >= len` contiguous initialized bytes.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.len) }
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and the slice borrows `self` mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), self.len) }
    }

    pub(super) fn i8s(&self) -> &[i8] {
        // SAFETY: as in `bytes`; `i8` has the size, alignment and validity of `u8`.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<i8>(), self.len) }
    }

    pub(super) fn i8s_mut(&mut self) -> &mut [i8] {
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

    /// A splitmix64 stream: reproducible random trits without an RNG dependency.
    fn random_trits(seed: u64, n: usize) -> Vec<i8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) % 3) as i8 - 1
            })
            .collect()
    }

    #[test]
    fn parallel_fill_packs_like_the_sequential_one() {
        // Odd shapes, one row, fewer rows than a task takes, and many tasks' worth.
        for (rows, cols) in [(1, 128), (1, 300), (3, 5), (7, 384), (77, 2560), (259, 130)] {
            let w = random_trits(rows as u64 * 1000 + cols as u64, rows * cols);
            let fill = |r: usize, t: &mut [i8]| {
                t.copy_from_slice(&w[r * cols..(r + 1) * cols]);
                Ok(r as f32 * 0.5 - 1.0)
            };
            let seq = TernaryMatrix::from_rows(rows, cols, fill).unwrap();
            let par = TernaryMatrix::from_rows_parallel(rows, cols, fill).unwrap();
            assert_eq!((par.rows(), par.cols()), (rows, cols));
            assert_eq!(par.padded_cols(), seq.padded_cols());
            assert_eq!(par.packed.bytes(), seq.packed.bytes(), "{rows}x{cols}");
            assert_eq!(par.multipliers(), seq.multipliers(), "{rows}x{cols}");
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(par.trit(r, c), w[r * cols + c], "({r},{c})");
                }
            }
        }
        // Per-task scratch, and degenerate shapes.
        let par = TernaryMatrix::from_rows_parallel_with(
            50,
            200,
            || vec![0i8; 200],
            |buf, r, t| {
                buf.iter_mut().for_each(|v| *v = (r % 3) as i8 - 1);
                t.copy_from_slice(buf);
                Ok(1.0)
            },
        )
        .unwrap();
        assert!((0..50).all(|r| par.trit(r, 199) == (r % 3) as i8 - 1));
        let empty = TernaryMatrix::from_rows_parallel(0, 300, |_, _| Ok(1.0)).unwrap();
        assert_eq!((empty.rows(), empty.memory_bytes()), (0, 0));
        let no_cols = TernaryMatrix::from_rows_parallel(3, 0, |r, _| Ok(r as f32)).unwrap();
        assert_eq!(no_cols.multipliers(), &[0.0, 1.0, 2.0]);
    }

    #[test]
    fn parallel_fill_reports_the_first_failing_row() {
        // Four threads even on a small machine, so tasks really race.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        pool.install(first_failing_row_wins);
    }

    fn first_failing_row_wins() {
        let (rows, cols) = (301, 256);
        // An invalid trit in row `bad` (and in later rows, which must not win).
        for bad in [0, 123, 300] {
            let err = TernaryMatrix::from_rows_parallel(rows, cols, |r, t| {
                t.fill(1);
                if r >= bad && r % 2 == bad % 2 {
                    t[cols - 1] = -2;
                }
                Ok(1.0)
            })
            .unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("ternary weight -2 at row {bad} is not -1, 0 or 1"),
            );
        }
        // A fill error is returned as it is, the lowest row's.
        let err = TernaryMatrix::from_rows_parallel(rows, cols, |r, _| {
            if r >= 40 {
                Err(Error::Invalid(format!("cannot decode row {r}")))
            } else {
                Ok(1.0)
            }
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "cannot decode row 40");
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
