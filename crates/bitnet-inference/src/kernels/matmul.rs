//! Matrix products over a batch of activation rows, split across the thread pool by
//! output rows so each weight row is read once per batch.

use super::{DenseMatrix, QuantizedActivations, TernaryKernel, TernaryMatrix};
use rayon::prelude::*;
use std::cell::RefCell;

/// A pointer to an output buffer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(super) struct SharedOut(pub(super) *mut f32);
// SAFETY: the tasks given one `SharedOut` write disjoint index sets (distinct output rows),
// and the buffer outlives them (the pool, or rayon, returns only when every task is done).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Taking `self` makes closures capture the whole wrapper, not its raw field.
    pub(super) fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers pass indices inside the buffer (see the call sites).
        unsafe { self.0.add(i) }
    }

    /// Writes element `i`; callers pass indices inside the buffer that no other task writes.
    pub(super) unsafe fn put(self, i: usize, v: f32) {
        // SAFETY: the caller's promise above; the buffer outlives every task.
        unsafe { *self.0.add(i) = v }
    }
}

thread_local! {
    /// Integer partial results of one task; grows to the largest chunk once, then is reused.
    static DOTS: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
    /// The activations of a group-scaled product in the group kernels' layout, made by the
    /// thread that starts the product and read by its tasks; grows once, then is reused.
    static GROUP_ACTS: RefCell<super::group::GroupActs> = RefCell::new(Default::default());
}

pub(super) fn chunk_rows(rows: usize, step: usize) -> usize {
    chunk_rows_for(rows, step, super::pool::threads())
}

/// Rows per task: a multiple of the kernel's step (4 rows, the decode tile; 16 for AMX
/// tiles) of at least 8 rows, so a tiny matrix is not cut into tasks that cost more to hand
/// out than to run, and at most about `rows / (4 × threads)`. Among those, the one whose
/// busiest thread gets the fewest rows (whole rounds of tasks × rows a task), the larger on
/// ties. With 4-row steps 2B-4T's widths (640, 2560, 6912) split into exactly `4 × threads`
/// tasks; with 16-row AMX tiles that split can leave threads idle in the last round (640
/// rows at 8 threads: 20 tasks of 32 rows are 3 rounds, 96 rows on the busiest thread; 40
/// tasks of 16 rows are 5 rounds, 80 rows), so smaller tasks are taken there.
fn chunk_rows_for(rows: usize, step: usize, threads: usize) -> usize {
    let coarsest = rows.div_ceil(threads * 4).next_multiple_of(step).max(8);
    if threads == 1 {
        return coarsest;
    }
    let finest = 8usize.next_multiple_of(step).min(coarsest);
    let busiest = |c: usize| rows.div_ceil(c).div_ceil(threads) * c;
    (finest..=coarsest)
        .step_by(step)
        .min_by_key(|&c| (busiest(c), std::cmp::Reverse(c)))
        .unwrap_or(coarsest)
}

/// `out[t][r] = (Σ_k trit[r][k]·q[t][k]) / s_t · multiplier[r]` for every activation row
/// `t`; `out` is `[acts.n_rows(), w.rows()]`, row-major.
///
/// Runs on the spinning pool installed by the backend computing ([`super::pool`]), or on
/// the calling thread where none is: measured faster than rayon for decode-sized products
/// (see `benches/kernels.rs`, `threads_*`).
pub fn ternary_matmul(
    kernel: &dyn TernaryKernel,
    w: &TernaryMatrix,
    acts: &QuantizedActivations,
    out: &mut [f32],
) {
    let (rows, chunk) = check_ternary(kernel, w, acts, out);
    let out_ptr = SharedOut(out.as_mut_ptr());
    if w.group() != 0 {
        return group_matmul(w, acts, out_ptr, chunk, |n, f| super::pool::run(n, f));
    }
    super::pool::run(rows.div_ceil(chunk), &|c| {
        ternary_chunk(kernel, w, acts, out_ptr, c, chunk)
    });
}

/// [`ternary_matmul`] split by rayon instead of the spinning pool (for comparison).
pub fn ternary_matmul_rayon(
    kernel: &dyn TernaryKernel,
    w: &TernaryMatrix,
    acts: &QuantizedActivations,
    out: &mut [f32],
) {
    let (rows, chunk) = check_ternary(kernel, w, acts, out);
    let out_ptr = SharedOut(out.as_mut_ptr());
    if w.group() != 0 {
        return group_matmul(w, acts, out_ptr, chunk, |n, f| {
            (0..n).into_par_iter().for_each(f)
        });
    }
    (0..rows.div_ceil(chunk))
        .into_par_iter()
        .for_each(|c| ternary_chunk(kernel, w, acts, out_ptr, c, chunk));
}

fn check_ternary(
    kernel: &dyn TernaryKernel,
    w: &TernaryMatrix,
    acts: &QuantizedActivations,
    out: &[f32],
) -> (usize, usize) {
    let (rows, n_tok) = (w.rows(), acts.n_rows());
    assert_eq!(out.len(), rows * n_tok, "ternary_matmul output size");
    assert_eq!(acts.padded_cols(), w.padded_cols(), "ternary_matmul width");
    (rows, chunk_rows(rows, kernel.row_step(n_tok)))
}

/// [`ternary_matmul`] for a matrix with group-wise scales ([`super::group`]): the
/// activations laid out once, then tasks of `chunk` rows started by `spread(tasks, task)`.
fn group_matmul(
    w: &TernaryMatrix,
    acts: &QuantizedActivations,
    out_ptr: SharedOut,
    chunk: usize,
    spread: impl FnOnce(usize, &(dyn Fn(usize) + Sync)),
) {
    let rows = w.rows();
    let path = super::group::GroupPath::current();
    GROUP_ACTS.with_borrow_mut(|ga| {
        ga.prepare(acts, w.group());
        let ga = &*ga;
        spread(rows.div_ceil(chunk), &|c| {
            let range = c * chunk..((c + 1) * chunk).min(rows);
            // SAFETY: the output was checked to be `[n_tok, rows]` (`check_ternary`), and
            // the tasks' row ranges are disjoint.
            unsafe { path.rows(w, acts, ga, range, out_ptr) }
        });
    });
}

/// Output rows `c·chunk ..` of every activation row; `out_ptr` is the checked output.
fn ternary_chunk(
    kernel: &dyn TernaryKernel,
    w: &TernaryMatrix,
    acts: &QuantizedActivations,
    out_ptr: SharedOut,
    c: usize,
    chunk: usize,
) {
    let (rows, n_tok) = (w.rows(), acts.n_rows());
    let range = c * chunk..((c + 1) * chunk).min(rows);
    let n = range.len();
    DOTS.with_borrow_mut(|dots| {
        dots.resize(n * n_tok, 0);
        kernel.ternary_dot(w, range.clone(), acts, &mut dots[..n * n_tok]);
        let mult = &w.multipliers()[range.clone()];
        for t in 0..n_tok {
            let inv_scale = acts.scale(t);
            // SAFETY: elements (t, range) lie inside `out` (sizes checked by `check_ternary`)
            // and belong to this chunk's row range alone, so no other reference to them exists
            // while this slice lives. A slice (not per-element pointer writes) lets the
            // compiler vectorize the loop.
            let out_row =
                unsafe { std::slice::from_raw_parts_mut(out_ptr.at(t * rows + range.start), n) };
            for ((o, &d), &m) in out_row.iter_mut().zip(&dots[t * n..(t + 1) * n]).zip(mult) {
                *o = d as f32 / inv_scale * m;
            }
        }
    });
}

/// `out[t][r] = Σ_k W[r][k]·x[t][k]` in f32; `x` is `[n_tok, w.cols()]`. Q4_0/Q4_1/Q8_0
/// matrices are multiplied exactly ([`super::qblock::QuantActs::Exact`]).
pub fn dense_matmul(w: &DenseMatrix, x: &[f32], n_tok: usize, out: &mut [f32]) {
    dense_matmul_with(w, x, n_tok, out, super::qblock::QuantActs::Exact)
}

/// [`dense_matmul`], with Q4_0/Q4_1/Q8_0 matrices multiplied as `acts` says (other types
/// are always exact).
pub fn dense_matmul_with(
    w: &DenseMatrix,
    x: &[f32],
    n_tok: usize,
    out: &mut [f32],
    acts: super::qblock::QuantActs,
) {
    let (rows, cols) = (w.rows(), w.cols());
    assert_eq!(x.len(), n_tok * cols, "dense_matmul input size");
    assert_eq!(out.len(), n_tok * rows, "dense_matmul output size");
    if let super::DenseData::Q32(ty, data) = w.data() {
        use super::qblock::{self, QuantActs};
        match acts {
            QuantActs::Exact => qblock::matmul_exact(*ty, data, rows, cols, x, n_tok, out),
            QuantActs::Q8 => qblock::Q8_ACTS.with_borrow_mut(|a| {
                a.quantize(x, n_tok, cols, *ty);
                qblock::matmul_q8(*ty, data, rows, cols, a, out)
            }),
        }
        return;
    }
    let chunk = chunk_rows(rows, 4);
    let out_ptr = SharedOut(out.as_mut_ptr());
    if let super::DenseData::Q6K(_) = w.data() {
        // Each row dequantized once (exactly) for all tokens; `dot_row` does the same.
        super::pool::run(rows.div_ceil(chunk), &|c| {
            super::dense::DECODED_ROW.with_borrow_mut(|row| {
                row.resize(cols, 0.0);
                for r in c * chunk..((c + 1) * chunk).min(rows) {
                    w.row_to_f32(r, row);
                    for t in 0..n_tok {
                        let v = super::dense::dot_f32_best(row, &x[t * cols..(t + 1) * cols]);
                        // SAFETY: (t, r) is inside `out` and row r belongs to this task alone.
                        unsafe { *out_ptr.at(t * rows + r) = v };
                    }
                }
            })
        });
        return;
    }
    super::pool::run(rows.div_ceil(chunk), &|c| {
        for r in c * chunk..((c + 1) * chunk).min(rows) {
            for t in 0..n_tok {
                let v = w.dot_row(r, &x[t * cols..(t + 1) * cols]);
                // SAFETY: (t, r) is inside `out` and row r belongs to this task alone.
                unsafe { *out_ptr.at(t * rows + r) = v };
            }
        }
    });
}

/// Splits `rows` output rows over the spinning pool; `f(r)` computes every token of row `r`.
pub(super) fn par_rows(rows: usize, f: &(dyn Fn(usize) + Sync)) {
    let chunk = 256;
    super::pool::run(rows.div_ceil(chunk), &|c| {
        for r in c * chunk..((c + 1) * chunk).min(rows) {
            f(r);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::chunk_rows_for;

    #[test]
    fn tasks_fill_every_thread() {
        for threads in 1..=16 {
            for rows in [1, 7, 640, 2560, 6912, 128256] {
                for step in [4, 16] {
                    let c = chunk_rows_for(rows, step, threads);
                    assert!(
                        c >= 8 && c.is_multiple_of(step),
                        "{rows} rows, step {step}: {c}"
                    );
                    // Never a busier thread than the coarsest split (4 tasks a thread).
                    let busiest = |c: usize| rows.div_ceil(c).div_ceil(threads) * c;
                    let coarsest = rows.div_ceil(threads * 4).next_multiple_of(step).max(8);
                    assert!(c <= coarsest && busiest(c) <= busiest(coarsest));
                }
            }
        }
        // Decode steps: 2B-4T's widths in exactly 4 tasks a thread, as before.
        for threads in [2, 4, 8, 16] {
            for rows in [2560usize, 6912] {
                assert_eq!(rows.div_ceil(chunk_rows_for(rows, 4, threads)), 4 * threads);
            }
        }
        // AMX tiles: 640 rows at 8 threads in 40 tasks (5 rounds), not 20 (3 rounds of 32);
        // 2560 at 16 threads in 80 tasks of 32 rows (5 rounds), not 54 of 48 (4 rounds).
        assert_eq!(chunk_rows_for(640, 16, 8), 16);
        assert_eq!(chunk_rows_for(2560, 16, 16), 32);
    }
}
