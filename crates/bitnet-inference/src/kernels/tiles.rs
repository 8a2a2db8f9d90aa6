//! The loop nest shared by the SIMD kernels: splits a `rows × n_tok` product into register
//! tiles of `WR` weight rows × `TA` activation rows and calls the instruction-set specific
//! tile function for each.
//!
//! Decode (one activation row) takes 4 weight rows a tile: four independent accumulators and
//! four memory streams. Prefill and batches take 2 weight rows × 4 activation rows: every
//! weight block is loaded and decoded once and used by four activation rows, and every
//! activation vector loaded serves two weight rows. Tokens go in chunks small enough for the
//! L2 cache; within a chunk, blocks of weight rows (also L2-sized) meet each group of four
//! tokens in turn, so a tile's activations come from L1 and its weights from L2.

use super::{QuantizedActivations, TernaryMatrix, BLOCK_WEIGHTS};
use std::ops::Range;

/// An instruction set's tile: raw sums `Σ code·q` (codes are trit + 1) of `WR` packed
/// weight rows with `TA` activation rows.
pub(super) trait Tile {
    /// Returns `out[i][j] = Σ_k code(w[i], k) · a[j][k]` over `blocks` blocks of 128.
    ///
    /// # Safety
    /// The CPU must have the instruction set of the implementation; every `w[i]` must be
    /// valid for reading `blocks * 32` bytes and every `a[j]` for `blocks * 128` bytes.
    unsafe fn tile<const WR: usize, const TA: usize>(
        w: [*const u8; WR],
        a: [*const i8; TA],
        blocks: usize,
    ) -> [[i32; TA]; WR];
}

/// A product computed in register tiles: `WR` weight rows × `TA` activation rows at a time.
/// [`nest`] walks a whole `rows × tokens` product through such tiles.
pub(super) trait Tiles {
    /// What a tile returns for each (row, token).
    type Out: Copy;

    /// The results of rows `r` with tokens `t`.
    ///
    /// # Safety
    /// The CPU has the implementation's instruction set; the rows and tokens are inside the
    /// product the implementation was made for.
    unsafe fn tile<const WR: usize, const TA: usize>(
        &self,
        r: [usize; WR],
        t: [usize; TA],
    ) -> [[Self::Out; TA]; WR];
}

/// The per-tensor product of [`Tile`] `T` over `weights` and `acts`.
struct Packed<'a, T> {
    weights: &'a TernaryMatrix,
    acts: &'a QuantizedActivations,
    blocks: usize,
    tile: std::marker::PhantomData<T>,
}

impl<T: Tile> Tiles for Packed<'_, T> {
    type Out = i32;

    #[inline(always)]
    unsafe fn tile<const WR: usize, const TA: usize>(
        &self,
        r: [usize; WR],
        t: [usize; TA],
    ) -> [[i32; TA]; WR] {
        // Every pointer comes from a slice `packed_row(r)` (blocks * 32 bytes) or
        // `acts.row(t)` (blocks * 128 bytes), which is exactly what `Tile::tile` reads.
        let w = r.map(|r| self.weights.packed_row(r).as_ptr());
        let a = t.map(|t| self.acts.row(t).as_ptr());
        // SAFETY: the pointers are valid for the tile's reads (see above); the caller
        // guarantees the instruction set.
        unsafe { T::tile(w, a, self.blocks) }
    }
}

/// Runs the tiles of `T` over `rows × acts`, writing `Σ trit·q` as [`super::TernaryKernel`]
/// defines it.
///
/// # Safety
/// The CPU must support the instruction set `T` uses.
pub(super) unsafe fn run<T: Tile>(
    weights: &TernaryMatrix,
    rows: Range<usize>,
    acts: &QuantizedActivations,
    out: &mut [i32],
) {
    assert_eq!(acts.padded_cols(), weights.padded_cols(), "kernel width");
    assert!(rows.end <= weights.rows(), "kernel row range");
    assert_eq!(
        weights.group(),
        0,
        "per-tensor kernel on group-scaled weights"
    );
    let n = rows.len();
    let n_tok = acts.n_rows();
    assert!(out.len() >= n * n_tok, "kernel output size");
    let blocks = weights.padded_cols() / BLOCK_WEIGHTS;
    let tiles = Packed::<T> {
        weights,
        acts,
        blocks,
        tile: std::marker::PhantomData,
    };
    let start = rows.start;
    // SAFETY: rows and tokens are inside the product (asserted above); the caller
    // guarantees the instruction set.
    unsafe {
        nest(
            &tiles,
            rows,
            n_tok,
            weights.padded_cols(),
            blocks * 32,
            |r, t, raw| out[t * n + (r - start)] = raw - acts.sum(t),
        )
    }
}

/// Calls `put(r, t, result)` for every row of `rows` and token below `n_tok`, computed in
/// the tiles of `tiles`. `act_bytes` and `row_bytes` are the bytes of one token's
/// activations and of one weight row, which size the cache blocking.
///
/// # Safety
/// As [`Tiles::tile`] for every row of `rows` and token below `n_tok`.
#[inline(always)]
pub(super) unsafe fn nest<K: Tiles>(
    tiles: &K,
    rows: Range<usize>,
    n_tok: usize,
    act_bytes: usize,
    row_bytes: usize,
    mut put: impl FnMut(usize, usize, K::Out),
) {
    if n_tok == 1 {
        let mut r = rows.start;
        while r + 4 <= rows.end {
            // SAFETY: inside the product; the caller guarantees the instruction set.
            let d = unsafe { tiles.tile::<4, 1>([r, r + 1, r + 2, r + 3], [0]) };
            for (i, d) in d.iter().enumerate() {
                put(r + i, 0, d[0]);
            }
            r += 4;
        }
        while r < rows.end {
            // SAFETY: as above.
            let d = unsafe { tiles.tile::<1, 1>([r], [0]) };
            put(r, 0, d[0][0]);
            r += 1;
        }
        return;
    }

    // Tokens in chunks whose activations stay in the L2 cache while every weight row of
    // the range passes over them; without it a 512-token prompt re-streams megabytes of
    // activations from L3 for every pair of weight rows (measured 1.8× slower).
    let chunk = (L2_ACTIVATION_BYTES / act_bytes.max(1)).clamp(4, 256) / 4 * 4;
    let mut t0 = 0;
    while t0 < n_tok {
        let t1 = (t0 + chunk).min(n_tok);
        // SAFETY: as above.
        unsafe { gemm_tokens(tiles, &mut put, rows.clone(), t0..t1, row_bytes) };
        t0 = t1;
    }
}

/// Activation bytes a GEMM token chunk may take: half of a 512 KiB L2 cache (Zen 4 has 1 MiB,
/// recent Intel cores 1.25–2 MiB), leaving room for the weights passing through.
const L2_ACTIVATION_BYTES: usize = 256 * 1024;

/// Packed weight bytes of the rows that pass over one group of four tokens: small enough to
/// stay in L2 next to the token chunk, large enough that the loop overhead is nothing.
const L2_WEIGHT_BYTES: usize = 128 * 1024;

/// The 2 weight rows × 4 tokens tiles of `rows × toks`. Rows go in blocks of
/// [`L2_WEIGHT_BYTES`]; within a block, each group of four tokens (10–28 KB of activations,
/// held in L1) meets every row pair of the block. A tile then reads 64 bytes of weights a
/// block from L2 and its 512 bytes of activations from L1; the other way round (a row pair
/// meeting every token group) moved the 512 bytes from L2, which bounded the tile
/// (measured 1.2-1.3× slower).
///
/// # Safety
/// As [`nest`].
#[inline(always)]
unsafe fn gemm_tokens<K: Tiles>(
    tiles: &K,
    put: &mut impl FnMut(usize, usize, K::Out),
    rows: Range<usize>,
    toks: Range<usize>,
    row_bytes: usize,
) {
    let block_rows = (L2_WEIGHT_BYTES / row_bytes.max(1)).max(2) / 2 * 2;
    let mut r0 = rows.start;
    while r0 < rows.end {
        let r1 = (r0 + block_rows).min(rows.end);
        let mut t = toks.start;
        while t + 4 <= toks.end {
            let a = [t, t + 1, t + 2, t + 3];
            let mut r = r0;
            while r + 2 <= r1 {
                // SAFETY: inside the product; the caller guarantees the instruction set.
                let d = unsafe { tiles.tile::<2, 4>([r, r + 1], a) };
                for (i, d) in d.iter().enumerate() {
                    for (j, &v) in d.iter().enumerate() {
                        put(r + i, t + j, v);
                    }
                }
                r += 2;
            }
            if r < r1 {
                // SAFETY: as above.
                let d = unsafe { tiles.tile::<1, 4>([r], a) };
                for (j, &v) in d[0].iter().enumerate() {
                    put(r, t + j, v);
                }
            }
            t += 4;
        }
        while t < toks.end {
            let mut r = r0;
            while r + 2 <= r1 {
                // SAFETY: as above.
                let d = unsafe { tiles.tile::<2, 1>([r, r + 1], [t]) };
                put(r, t, d[0][0]);
                put(r + 1, t, d[1][0]);
                r += 2;
            }
            if r < r1 {
                // SAFETY: as above.
                let d = unsafe { tiles.tile::<1, 1>([r], [t]) };
                put(r, t, d[0][0]);
            }
            t += 1;
        }
        r0 = r1;
    }
}
