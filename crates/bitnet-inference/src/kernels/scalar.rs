//! The portable reference kernel: every other kernel must return the same integers.

use super::{QuantizedActivations, TernaryKernel, TernaryMatrix};
use std::ops::Range;

pub struct ScalarKernel;

impl TernaryKernel for ScalarKernel {
    fn name(&self) -> &'static str {
        "scalar"
    }

    fn ternary_dot(
        &self,
        weights: &TernaryMatrix,
        rows: Range<usize>,
        acts: &QuantizedActivations,
        out: &mut [i32],
    ) {
        debug_assert_eq!(acts.padded_cols(), weights.padded_cols());
        let n = rows.len();
        for t in 0..acts.n_rows() {
            let q = acts.row(t);
            for r in rows.clone() {
                out[t * n + (r - rows.start)] = dot_codes(weights.packed_row(r), q) - acts.sum(t);
            }
        }
    }
}

/// `Σ code·q` over one packed row (codes are trit + 1).
fn dot_codes(packed: &[u8], q: &[i8]) -> i32 {
    let mut sum = 0i32;
    for (bytes, x) in packed.chunks_exact(32).zip(q.chunks_exact(128)) {
        for (j, &b) in bytes.iter().enumerate() {
            sum += (b & 3) as i32 * x[j] as i32
                + ((b >> 2) & 3) as i32 * x[j + 32] as i32
                + ((b >> 4) & 3) as i32 * x[j + 64] as i32
                + (b >> 6) as i32 * x[j + 96] as i32;
        }
    }
    sum
}
