//! The weights in the layouts the CUDA kernels read, made on the host at load.

use crate::kernels::{DenseData, DenseMatrix, TernaryMatrix};
use std::borrow::Cow;

/// Element type codes of dense matrices, as `kernels.cu` names them (`DENSE_*`).
pub(crate) const DENSE_F32: i32 = 0;
pub(crate) const DENSE_F16: i32 = 1;
pub(crate) const DENSE_BF16: i32 = 2;

/// Ternary matrices of the same width, their rows concatenated, for `ternary_gemv`: the codes
/// (trit + 1) of row `r`, columns `16kw..16kw + 15`, in word `(kw / 4 · rows + r) · 4 + kw %
/// 4`, column `16kw + 4j + b` in bits `8b + 2j`, so that `(word >> 2j) & 0x03030303` is four
/// consecutive columns' codes as bytes. A row's four words of 64 columns are one 16-byte
/// load, and those of consecutive rows are adjacent, which coalesces a warp's loads. The
/// padding columns (up to `padded_cols`, whole blocks of 128) hold code 1 (trit 0), as the
/// CPU layout does.
pub(crate) fn pack_ternary(ms: &[&TernaryMatrix]) -> Vec<u32> {
    use rayon::prelude::*;
    let rows: usize = ms.iter().map(|m| m.rows()).sum();
    let kwords = ms.first().map_or(0, |m| m.padded_cols() / 16);
    let mut out = vec![0u32; kwords * rows];
    if rows == 0 {
        return out;
    }
    if ms.iter().any(|m| m.group() != 0) {
        // Group-scaled matrices keep their own layout: read them weight by weight.
        let trits: Vec<(&TernaryMatrix, usize)> = ms
            .iter()
            .flat_map(|m| (0..m.rows()).map(move |r| (*m, r)))
            .collect();
        out.par_chunks_mut(rows * 4)
            .enumerate()
            .for_each(|(k4, group)| {
                for (words, &(m, r)) in group.chunks_exact_mut(4).zip(&trits) {
                    for (j, word) in words.iter_mut().enumerate() {
                        let mut w = 0u32;
                        for e in 0..16 {
                            let c = (k4 * 4 + j) * 16 + e;
                            let t = if c < m.cols() { m.trit(r, c) } else { 0 };
                            w |= ((t + 1) as u32) << (8 * (e % 4) + 2 * (e / 4));
                        }
                        *word = w;
                    }
                }
            });
        return out;
    }
    let row_bytes: Vec<&[u8]> = ms
        .iter()
        .flat_map(|m| (0..m.rows()).map(|r| m.packed_row(r)))
        .collect();
    out.par_chunks_mut(rows * 4)
        .enumerate()
        .for_each(|(k4, group)| {
            for (words, bytes) in group.chunks_exact_mut(4).zip(&row_bytes) {
                for (j, word) in words.iter_mut().enumerate() {
                    // The CPU layout: blocks of 128 columns in 32 bytes, byte j holding
                    // columns j, j+32, j+64, j+96 in bits 1-0, 3-2, 5-4, 7-6. Columns
                    // 16kw..16kw+15 are 16 consecutive bytes of one block at one shift.
                    let kw = k4 * 4 + j;
                    let (block, within) = (kw / 8, kw % 8 * 16);
                    let (byte0, shift) = (block * 32 + within % 32, 2 * (within / 32));
                    let mut w = 0u32;
                    for (e, &byte) in bytes[byte0..byte0 + 16].iter().enumerate() {
                        let code = ((byte >> shift) & 3) as u32;
                        w |= code << (8 * (e % 4) + 2 * (e / 4));
                    }
                    *word = w;
                }
            }
        });
    out
}

/// The group scales of group-scaled matrices of the same width and group size, their rows
/// concatenated, group-major for the GEMV's coalesced loads: the scale of group `g` of row `r`
/// at `g · rows + r`, for the `padded_cols / group` groups of a row (padding groups 0).
pub(crate) fn pack_group_scales(ms: &[&TernaryMatrix]) -> Vec<f32> {
    let rows: usize = ms.iter().map(|m| m.rows()).sum();
    let group = ms.first().map_or(0, |m| m.group());
    if group == 0 {
        return Vec::new();
    }
    let groups = ms[0].padded_cols() / group;
    let mut out = vec![0f32; groups * rows];
    let mut first = 0;
    for m in ms {
        for r in 0..m.rows() {
            let scales = m.group_scales_row(r);
            for g in 0..groups.min(scales.len()) {
                out[g * rows + first + r] = scales.get(g);
            }
        }
        first += m.rows();
    }
    out
}

/// A row-major `[rows, cols]` matrix of `elem`-byte values in the kernels' chunk-major
/// layout (`chunk_major_index` in kernels.cu): chunk `c` (columns `8c..8c + 7`) of row `r`
/// at element `(c · rows + r) · 8`, then the last `cols % 8` columns of every row as a
/// row-major tail.
pub(crate) fn chunk_major(bytes: &[u8], elem: usize, rows: usize, cols: usize) -> Vec<u8> {
    use rayon::prelude::*;
    let chunks = cols / 8;
    let (chunk_bytes, row_bytes) = (8 * elem, cols * elem);
    let tail = (cols - chunks * 8) * elem;
    let mut out = vec![0u8; bytes.len()];
    let (body, tails) = out.split_at_mut(chunks * rows * chunk_bytes);
    if chunk_bytes * rows > 0 {
        body.par_chunks_mut(rows * chunk_bytes)
            .enumerate()
            .for_each(|(c, dst)| {
                for (r, d) in dst.chunks_exact_mut(chunk_bytes).enumerate() {
                    let at = r * row_bytes + c * chunk_bytes;
                    d.copy_from_slice(&bytes[at..at + chunk_bytes]);
                }
            });
    }
    if tail > 0 {
        for (r, d) in tails.chunks_exact_mut(tail).enumerate() {
            let at = r * row_bytes + chunks * chunk_bytes;
            d.copy_from_slice(&bytes[at..at + tail]);
        }
    }
    out
}

/// A dense matrix's values as the kernels read them: the file's f32, f16 or bf16 as they
/// are (borrowed, no copy), and ggml blocks (Q4_0, Q4_1, Q8_0, Q6_K) dequantized exactly to
/// f32 as the CPU's exact path reads them.
pub(crate) fn dense_values(m: &DenseMatrix) -> (i32, Cow<'_, [u8]>) {
    match m.data() {
        DenseData::F32(v) => (DENSE_F32, Cow::Borrowed(bytemuck::cast_slice(&v[..]))),
        DenseData::F16(v) => (DENSE_F16, Cow::Borrowed(bytemuck::cast_slice(&v[..]))),
        DenseData::BF16(v) => (DENSE_BF16, Cow::Borrowed(bytemuck::cast_slice(&v[..]))),
        DenseData::Q6K(_) | DenseData::Q32(..) => {
            let cols = m.cols();
            let mut f = vec![0f32; m.rows() * cols];
            for (r, row) in f.chunks_exact_mut(cols.max(1)).enumerate() {
                m.row_to_f32(r, row);
            }
            (DENSE_F32, Cow::Owned(bytemuck::cast_slice(&f).to_vec()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every weight comes back from the GPU layout as the CPU layout holds it, padding
    /// columns included (code 1).
    #[test]
    fn ternary_words_decode_to_the_cpu_trits() {
        let (rows, cols) = (5, 300);
        let trit = |r: usize, c: usize| ((r * 7 + c * 13 + c / 5) % 3) as i8 - 1;
        let m = TernaryMatrix::from_rows(rows, cols, |r, t| {
            for (c, v) in t.iter_mut().enumerate() {
                *v = trit(r, c);
            }
            Ok(1.0)
        })
        .unwrap();
        let words = pack_ternary(&[&m]);
        let kwords = m.padded_cols() / 16;
        assert_eq!(words.len(), kwords * rows);
        for r in 0..rows {
            for c in 0..m.padded_cols() {
                let (kw, e) = (c / 16, c % 16);
                let (j, b) = (e / 4, e % 4);
                let code = (words[(kw / 4 * rows + r) * 4 + kw % 4] >> (8 * b + 2 * j)) & 3;
                let want = if c < cols { trit(r, c) } else { 0 };
                assert_eq!(code as i8 - 1, want, "row {r} column {c}");
            }
        }
    }

    #[test]
    fn quantized_dense_matrices_become_their_exact_f32() {
        use crate::kernels::qblock::BlockType;
        // One Q8_0 block: f16 scale 0.5, then 32 int8 values.
        let mut block = vec![0u8; 34];
        block[..2].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
        for (i, b) in block[2..].iter_mut().enumerate() {
            *b = (i as i8 - 16) as u8;
        }
        let m = DenseMatrix::new(1, 32, DenseData::Q32(BlockType::Q8_0, block.into())).unwrap();
        let (ty, bytes) = dense_values(&m);
        assert_eq!(ty, DENSE_F32);
        let f: &[f32] = bytemuck::cast_slice(&bytes);
        for (i, &v) in f.iter().enumerate() {
            assert_eq!(v, (i as f32 - 16.0) * 0.5);
        }
    }
}
