//! Causal attention of a tile of consecutive query tokens of one sequence over its cache, for
//! one group of query heads that share a KV head (GQA), in f32: `softmax(q·kᵀ·scale) · v`.
//!
//! Positions are taken in chunks of [`CHUNK`]. For every query row a chunk gives a partial
//! result: the max of its scores, the sum of `exp(score − max)`, and the V rows weighted by
//! those exponentials. [`fold`] merges the chunks in order (rescaling by `exp` of the change
//! of max) and [`RunningSoftmax::finish`] divides by the sum. Decode spreads the chunks of
//! one query over threads and folds them afterwards; prefill walks them in turn; both fold
//! the same partials in the same order, so they give the same bits. The chunk is a constant,
//! so results do not depend on the thread count.
//!
//! Within a chunk, each K and V row is read once for all the queries of the task: every head
//! of the group of every token of the tile. Token `j` of the tile attends to positions
//! `0..n_pos + j` (causal: the tile's tokens sit at consecutive positions).
//!
//! The arithmetic of one (query, position) does not depend on the tile: the same dot (lanes,
//! accumulators and reduction order), the same `exp` ([`super::exp`], the same bits on every
//! path), the same multiply-adds into the output in position order. A tile gives bit for bit
//! the outputs of its tokens one at a time, on every path. The q·k dots, the exponentials
//! and the V accumulation use AVX-512 or AVX2+FMA where the CPU has them (chosen at run
//! time, `x86.rs`), and NEON on aarch64 (`neon.rs`); the paths differ only by the order of
//! the float additions in the dots and sums and by fused multiply-adds.
//!
//! The cache holds f32 (exact) or f16 ([`KvElem`]). f16 rows are widened to f32 (exactly)
//! once for all the task's queries: block by block in L1 by the blocked AVX-512 kernel, a
//! chunk at a time into a per-thread scratch on the other paths. An f16 cache thus gives the
//! bits an f32 cache holding the same values would, and decode reads half the bytes per
//! cached position.

use std::cell::RefCell;
use std::ops::Range;

use super::exp::exp_nonpositive;

/// Positions a query's softmax takes at once (see the module comment). 256 positions of 128
/// floats are 128 KB of K (or V) rows: a decode chunk task is long enough to stream, and a
/// 4096-position context gives 16 chunks a KV head to spread over threads.
pub const CHUNK: usize = 256;

/// An element type of the KV cache.
pub trait KvElem: Copy + Default + Send + Sync + 'static {
    /// Rounded to nearest (f16), or as it is (f32).
    fn from_f32(v: f32) -> Self;
    /// The rows as they are, if they are f32 already.
    fn as_f32(rows: &[Self]) -> Option<&[f32]>;
    /// `dst[i] = src[i]` as f32, exactly.
    fn widen(src: &[Self], dst: &mut [f32]);
    /// [`KvElem::widen`] of a row of `16·k` elements, inlined into the AVX-512 kernel.
    ///
    /// # Safety
    /// Only inlined into functions with AVX-512F; `src.len() == dst.len()`, a multiple of 16.
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen_512(src: &[Self], dst: &mut [f32]) {
        Self::widen(src, dst)
    }
}

impl KvElem for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn as_f32(rows: &[Self]) -> Option<&[f32]> {
        Some(rows)
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvElem for half::f16 {
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen_512(src: &[Self], dst: &mut [f32]) {
        use std::arch::x86_64::*;
        debug_assert!(src.len() == dst.len() && src.len().is_multiple_of(16));
        for i in (0..src.len().min(dst.len()) / 16 * 16).step_by(16) {
            // SAFETY: 16 elements at `i` of both slices (the caller's contract); AVX-512F.
            unsafe {
                let v = _mm512_cvtph_ps(_mm256_loadu_si256(src.as_ptr().add(i).cast()));
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), v);
            }
        }
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "widen size");
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx") && is_x86_feature_detected!("f16c") {
            // SAFETY: the features were detected; sizes checked.
            return unsafe { x86::widen_f16c(src, dst) };
        }
        // `half` converts with the CPU's f16 instructions where it finds them (aarch64's
        // FP16), else one by one.
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
    }
}

thread_local! {
    /// The blocked kernel's widened K and V blocks.
    static WIDE: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// A chunk's keys and values, widened for the paths without the blocked kernel.
    static WIDE_CHUNK: RefCell<(Vec<f32>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
    /// [`attend`]'s partial rows of one chunk and running softmax of each query row.
    static PARTIALS: RefCell<(Vec<f32>, Vec<RunningSoftmax>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

/// One (tile of tokens, KV head) task.
#[derive(Clone, Copy)]
pub struct AttentionTask<'a, T = f32> {
    /// Token `j`'s `heads` query heads, `head_dim` floats each and contiguous, start at
    /// `j * q_stride`; `q` ends with the last token's heads.
    pub q: &'a [f32],
    /// Distance between the tokens' query rows (at least `heads * head_dim` when `tokens > 1`).
    pub q_stride: usize,
    /// Consecutive tokens of one sequence (1 in decode).
    pub tokens: usize,
    /// Query heads of a token that share this KV head.
    pub heads: usize,
    /// The cache of this layer and the KV head: row `p` starts at `p * stride`.
    pub keys: &'a [T],
    pub values: &'a [T],
    pub stride: usize,
    /// The first token attends to positions `0..n_pos`, token `j` to `0..n_pos + j`.
    pub n_pos: usize,
    pub head_dim: usize,
    pub scale: f32,
}

impl<'a, T> AttentionTask<'a, T> {
    /// The same task over other rows (same positions and queries).
    #[cfg(test)]
    fn with_rows<U>(&self, keys: &'a [U], values: &'a [U], stride: usize) -> AttentionTask<'a, U> {
        AttentionTask {
            q: self.q,
            q_stride: self.q_stride,
            tokens: self.tokens,
            heads: self.heads,
            keys,
            values,
            stride,
            n_pos: self.n_pos,
            head_dim: self.head_dim,
            scale: self.scale,
        }
    }

    /// Query rows: `tokens * heads`, row `r` is head `r % heads` of token `r / heads`.
    pub fn rows(&self) -> usize {
        self.tokens * self.heads
    }
    /// Chunks of [`CHUNK`] positions the last token attends to.
    pub fn chunks(&self) -> usize {
        self.n_max().div_ceil(CHUNK)
    }
    /// Floats of the partial rows of one chunk: `rows() * (head_dim + 2)`; query row `r`'s
    /// is at `r * (head_dim + 2)` and holds `[max, sum, Σ exp(s − max)·v (head_dim floats)]`.
    pub fn partial_len(&self) -> usize {
        self.rows() * (self.head_dim + 2)
    }
    /// Positions the last token attends to.
    fn n_max(&self) -> usize {
        self.n_pos + self.tokens - 1
    }
    /// Where query row `r` starts in `q` (and in the output).
    fn q_offset(&self, r: usize) -> usize {
        r / self.heads * self.q_stride + r % self.heads * self.head_dim
    }
    /// The positions query row `r` attends to.
    fn n_of(&self, r: usize) -> usize {
        self.n_pos + r / self.heads
    }
    /// The first token that attends to position `p`.
    fn first_token(&self, p: usize) -> usize {
        (p + 1).saturating_sub(self.n_pos)
    }
    /// The positions of chunk `c`.
    fn span(&self, c: usize) -> Range<usize> {
        c * CHUNK..((c + 1) * CHUNK).min(self.n_max())
    }
    /// The cache rows of `span`: row 0 is position `span.start`.
    fn chunk_rows(&self, span: &Range<usize>) -> ChunkRows<'a, T> {
        let at = span.start * self.stride;
        ChunkRows {
            keys: &self.keys[at..],
            values: &self.values[at..],
            stride: self.stride,
        }
    }
}

/// The K and V rows of one chunk: row `i` (position `span.start + i`) at `i * stride`.
#[derive(Clone, Copy)]
pub(crate) struct ChunkRows<'a, T> {
    keys: &'a [T],
    values: &'a [T],
    stride: usize,
}

/// The softmax of one query row so far: the largest score and the sum of `exp(s − max)`
/// over the chunks folded into it.
#[derive(Clone, Copy, Debug)]
pub struct RunningSoftmax {
    max: f32,
    sum: f32,
}

impl RunningSoftmax {
    /// Before the first chunk: folding chunk 0 into it gives that chunk's partial exactly.
    pub const START: Self = RunningSoftmax {
        max: f32::NEG_INFINITY,
        sum: 0.0,
    };

    /// `out` (the weighted sum of V rows) divided by the sum of the weights.
    pub fn finish(self, out: &mut [f32]) {
        for o in out {
            *o /= self.sum;
        }
    }
}

/// Folds a chunk's partial row (`[max, sum, weighted V]`, see
/// [`AttentionTask::partial_len`]) into a query's running softmax and its unnormalized
/// output `out` (zeros before the first chunk): both are rescaled to the larger max.
pub fn fold(partial: &[f32], state: &mut RunningSoftmax, out: &mut [f32]) {
    let (m, s, o) = (partial[0], partial[1], &partial[2..]);
    let max = state.max.max(m);
    let (a, b) = (exp_nonpositive(state.max - max), exp_nonpositive(m - max));
    state.sum = state.sum * a + s * b;
    state.max = max;
    for (x, &y) in out.iter_mut().zip(o) {
        *x = *x * a + y * b;
    }
}

/// Writes the outputs of the task's query heads to `out`, in the layout of `q` (the gaps
/// between the tokens' rows are left alone): every chunk in turn, folded. `scores` is
/// scratch and grows to `tokens * heads * CHUNK` if it is shorter.
pub fn attend<T: KvElem>(task: &AttentionTask<T>, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_with(task, scores, out, chunk_dispatch)
}

/// Chunk `c` of the task: the partial rows (see [`AttentionTask::partial_len`]) of the query
/// rows that attend to a position in it; the others are left alone. `scores` as in
/// [`attend`].
pub fn attend_chunk<T: KvElem>(
    task: &AttentionTask<T>,
    c: usize,
    scores: &mut Vec<f32>,
    partial: &mut [f32],
) {
    assert!(
        c < task.chunks(),
        "attention chunk {c} of {}",
        task.chunks()
    );
    assert!(
        partial.len() >= task.partial_len(),
        "attention partial size"
    );
    let scores = prepare(task, scores);
    chunk_dispatch(task, task.span(c), scores, partial)
}

/// A chunk kernel: the partial rows of `span` from its cache rows.
type ChunkFn<T> = fn(&AttentionTask<T>, Range<usize>, &mut [f32], &mut [f32]);

/// [`attend`] through a given chunk kernel.
fn attend_with<T>(t: &AttentionTask<T>, scores: &mut Vec<f32>, out: &mut [f32], chunk: ChunkFn<T>) {
    let scores = prepare(t, scores);
    assert_eq!(out.len(), t.q.len(), "attention output size");
    let (d, rows) = (t.head_dim, t.rows());
    PARTIALS.with_borrow_mut(|(partial, states)| {
        partial.resize(t.partial_len(), 0.0);
        states.clear();
        states.resize(rows, RunningSoftmax::START);
        for r in 0..rows {
            out[t.q_offset(r)..][..d].fill(0.0);
        }
        for c in 0..t.chunks() {
            let span = t.span(c);
            let first = t.first_token(span.start) * t.heads;
            chunk(t, span, scores, partial);
            for r in first..rows {
                let part = &partial[r * (d + 2)..][..d + 2];
                fold(part, &mut states[r], &mut out[t.q_offset(r)..][..d]);
            }
        }
        for (r, state) in states.iter().enumerate() {
            state.finish(&mut out[t.q_offset(r)..][..d]);
        }
    })
}

/// The best chunk kernel for this CPU and cache type.
fn chunk_dispatch<T: KvElem>(
    t: &AttentionTask<T>,
    span: Range<usize>,
    scores: &mut [f32],
    partial: &mut [f32],
) {
    let rows = t.chunk_rows(&span);
    if let (Some(keys), Some(values)) = (T::as_f32(rows.keys), T::as_f32(rows.values)) {
        let rows = ChunkRows {
            keys,
            values,
            stride: rows.stride,
        };
        return chunk_f32(t, span, rows, scores, partial);
    }
    #[cfg(target_arch = "x86_64")]
    if x86::level() == x86::Level::Avx512 && t.head_dim.is_multiple_of(16) {
        // SAFETY: the level was detected on this CPU; `prepare` validated the sizes.
        return unsafe { x86::blocked_512(t, span, rows, scores, partial) };
    }
    let d = t.head_dim;
    WIDE_CHUNK.with_borrow_mut(|(keys, values)| {
        let n = span.len();
        keys.resize(n * d, 0.0);
        values.resize(n * d, 0.0);
        for i in 0..n {
            let (src, dst) = (i * rows.stride..i * rows.stride + d, i * d..(i + 1) * d);
            T::widen(&rows.keys[src.clone()], &mut keys[dst.clone()]);
            T::widen(&rows.values[src], &mut values[dst]);
        }
        let wide = ChunkRows {
            keys: &keys[..],
            values: &values[..],
            stride: d,
        };
        chunk_f32(t, span, wide, scores, partial)
    })
}

/// The chunk kernel over f32 rows for this CPU.
fn chunk_f32<T>(
    t: &AttentionTask<T>,
    span: Range<usize>,
    rows: ChunkRows<f32>,
    scores: &mut [f32],
    partial: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        match x86::level() {
            // SAFETY: the level was detected on this CPU; `prepare` validated the sizes.
            x86::Level::Avx512 if t.head_dim.is_multiple_of(16) => {
                return unsafe { x86::blocked_512(t, span, rows, scores, partial) }
            }
            // SAFETY: as above.
            x86::Level::Avx512 => {
                return unsafe { x86::rowwise_512(t, span, rows, scores, partial) }
            }
            // SAFETY: as above.
            x86::Level::Avx2 => return unsafe { x86::chunk_256(t, span, rows, scores, partial) },
            x86::Level::Scalar => {}
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        neon::chunk_neon(t, span, rows, scores, partial)
    }
    #[cfg(not(target_arch = "aarch64"))]
    chunk_scalar(t, span, rows, scores, partial)
}

/// The portable chunk kernel (for tests and CPUs without the vector units).
fn chunk_scalar<T>(
    t: &AttentionTask<T>,
    span: Range<usize>,
    rows: ChunkRows<f32>,
    scores: &mut [f32],
    partial: &mut [f32],
) {
    chunk_body(
        t,
        span,
        rows,
        scores,
        partial,
        dot_scalar,
        axpy_scalar,
        exp_row_scalar,
    )
}

/// The portable path, whole task (for tests).
pub fn attend_scalar(task: &AttentionTask, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_with(task, scores, out, |t, span, scores, partial| {
        let rows = t.chunk_rows(&span);
        chunk_scalar(t, span, rows, scores, partial)
    })
}

/// Validates the sizes every path indexes by, and returns the scores scratch of one chunk,
/// `CHUNK` floats a query row (grown if it is too short: never shrunk, so that it is filled
/// once).
fn prepare<'s, T>(t: &AttentionTask<T>, scores: &'s mut Vec<f32>) -> &'s mut [f32] {
    let d = t.head_dim;
    assert!(
        d > 0 && t.heads > 0 && t.tokens > 0,
        "attention: empty task"
    );
    assert!(
        t.tokens == 1 || t.q_stride >= t.heads * d,
        "attention: query rows overlap"
    );
    let q_len = (t.tokens - 1) * t.q_stride + t.heads * d;
    assert_eq!(t.q.len(), q_len, "attention query size");
    assert!(t.n_pos > 0 && t.stride >= d, "attention positions");
    let need = (t.n_max() - 1) * t.stride + d;
    assert!(
        t.keys.len() >= need && t.values.len() >= need,
        "attention cache size"
    );
    let len = t.rows() * CHUNK;
    if scores.len() < len {
        scores.resize(len, 0.0);
    }
    &mut scores[..len]
}

/// The shared loop of one chunk: scores, their exponentials, weighted sum of V rows.
/// `dot(a, b)`, `axpy(out, w, v)` (`out += w·v`) and `exp_row` (see [`exp_row_scalar`]) are
/// the only vector operations. Each K row, then each V row, is used by every query of the
/// tile that attends to it before the next is read.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn chunk_body<T>(
    t: &AttentionTask<T>,
    span: Range<usize>,
    rows: ChunkRows<f32>,
    scores: &mut [f32],
    partial: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
    axpy: impl Fn(&mut [f32], f32, &[f32]),
    exp_row: impl Fn(&mut [f32]) -> (f32, f32),
) {
    let (d, heads, n_rows) = (t.head_dim, t.heads, t.rows());
    let c0 = span.start;
    scores_rowwise(t, &span, &rows, scores, dot);
    start_partials(t, &span, scores, partial, exp_row);
    for p in span.clone() {
        let v = &rows.values[(p - c0) * rows.stride..][..d];
        for r in t.first_token(p) * heads..n_rows {
            let w = scores[r * CHUNK + p - c0];
            axpy(&mut partial[r * (d + 2) + 2..][..d], w, v);
        }
    }
}

/// The scaled scores of every (query row, position of `span`) it attends to, one K row at a
/// time against every query.
#[inline(always)]
fn scores_rowwise<T>(
    t: &AttentionTask<T>,
    span: &Range<usize>,
    rows: &ChunkRows<f32>,
    scores: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    let (d, c0) = (t.head_dim, span.start);
    for p in span.clone() {
        let k = &rows.keys[(p - c0) * rows.stride..][..d];
        for r in t.first_token(p) * t.heads..t.rows() {
            let q = t.q_offset(r);
            scores[r * CHUNK + p - c0] = dot(&t.q[q..q + d], k) * t.scale;
        }
    }
}

/// For each query row that attends into `span`: its scores become `exp(s − max)`, and its
/// partial row gets `[max, sum, zeros]`.
#[inline(always)]
fn start_partials<T>(
    t: &AttentionTask<T>,
    span: &Range<usize>,
    scores: &mut [f32],
    partial: &mut [f32],
    exp_row: impl Fn(&mut [f32]) -> (f32, f32),
) {
    let d = t.head_dim;
    for r in t.first_token(span.start) * t.heads..t.rows() {
        let n = t.n_of(r).min(span.end) - span.start;
        let (max, sum) = exp_row(&mut scores[r * CHUNK..][..n]);
        let part = &mut partial[r * (d + 2)..][..d + 2];
        part[0] = max;
        part[1] = sum;
        part[2..].fill(0.0);
    }
}

/// `s ← exp(s − max)` for the row's scores; returns `(max, Σ exp)`.
fn exp_row_scalar(s: &mut [f32]) -> (f32, f32) {
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in s.iter_mut() {
        *v = exp_nonpositive(*v - max);
        sum += *v;
    }
    (max, sum)
}

/// The max of a row from its vector lanes' maxima and its tail.
#[inline(always)]
fn row_max(tail: &[f32], lanes: &[f32]) -> f32 {
    tail.iter()
        .chain(lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// The exponentials of a row's tail (after its whole vectors), added one by one to the
/// vectors' `sum`.
#[inline(always)]
fn exp_tail(tail: &mut [f32], max: f32, mut sum: f32) -> f32 {
    for v in tail {
        *v = exp_nonpositive(*v - max);
        sum += *v;
    }
    sum
}

/// Eight independent accumulators (as the forward pass always summed).
#[inline(always)]
fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for i in 0..8 {
            acc[i] += a[c * 8 + i] * b[c * 8 + i];
        }
    }
    let mut tail = 0.0;
    for k in chunks * 8..a.len() {
        tail += a[k] * b[k];
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn axpy_scalar(out: &mut [f32], w: f32, v: &[f32]) {
    for (o, &x) in out.iter_mut().zip(v) {
        *o += w * x;
    }
}

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
type AttendFn = fn(&AttentionTask, &mut Vec<f32>, &mut [f32]);

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, query by query, in f64 (in the layout of `q`; gaps are [`UNTOUCHED`]).
    fn reference(t: &AttentionTask) -> Vec<f32> {
        let d = t.head_dim;
        let mut out = vec![UNTOUCHED; t.q.len()];
        for r in 0..t.rows() {
            let (o, n) = (t.q_offset(r), t.n_of(r));
            let q = &t.q[o..o + d];
            let s: Vec<f64> = (0..n)
                .map(|p| {
                    let k = &t.keys[p * t.stride..p * t.stride + d];
                    q.iter()
                        .zip(k)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * t.scale as f64
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for j in 0..d {
                let v: f64 = (0..n)
                    .map(|p| e[p] / sum * t.values[p * t.stride + j] as f64)
                    .sum();
                out[o + j] = v as f32;
            }
        }
        out
    }

    fn paths() -> Vec<(&'static str, AttendFn)> {
        #[allow(unused_mut)]
        let mut paths: Vec<(&str, AttendFn)> =
            vec![("scalar", attend_scalar), ("dispatched", attend)];
        #[cfg(target_arch = "x86_64")]
        paths.extend(x86::paths());
        #[cfg(target_arch = "aarch64")]
        paths.extend(neon::paths());
        paths
    }

    /// Caches and queries laid out as the forward pass has them: the task is the last KV
    /// head's group, so its rows start inside the strides and other heads lie in the gaps.
    struct Case {
        d: usize,
        heads: usize,
        n_pos: usize,
        tokens: usize,
        kv_heads: usize,
        q: Vec<f32>,
        keys: Vec<f32>,
        values: Vec<f32>,
    }

    /// Outputs start as this, so that writes to the gaps show.
    const UNTOUCHED: f32 = 1234.5;

    impl Case {
        fn new(d: usize, heads: usize, n_pos: usize, tokens: usize, kv_heads: usize) -> Self {
            let mut s = 0x1234_5678_9abc_def1u64 ^ (d * 131 + n_pos * 7 + tokens) as u64;
            let mut rnd = move || {
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32 * 2.0
                    - 1.0
            };
            let n = n_pos + tokens - 1;
            let (qd, kvd) = (kv_heads * heads * d, kv_heads * d);
            Case {
                d,
                heads,
                n_pos,
                tokens,
                kv_heads,
                q: (0..tokens * qd).map(|_| rnd() * 3.0).collect(),
                keys: (0..n * kvd).map(|_| rnd() * 3.0).collect(),
                values: (0..n * kvd).map(|_| rnd()).collect(),
            }
        }

        /// Tokens `first..first + tokens` of the case as one task, and its output's range.
        fn task(&self, first: usize, tokens: usize) -> (AttentionTask<'_>, std::ops::Range<usize>) {
            let (d, h) = (self.d, self.heads);
            let q_stride = self.kv_heads * h * d;
            let start = first * q_stride + (self.kv_heads - 1) * h * d;
            let range = start..start + (tokens - 1) * q_stride + h * d;
            let off = (self.kv_heads - 1) * d;
            let task = AttentionTask {
                q: &self.q[range.clone()],
                q_stride,
                tokens,
                heads: h,
                keys: &self.keys[off..],
                values: &self.values[off..],
                stride: self.kv_heads * d,
                n_pos: self.n_pos + first,
                head_dim: d,
                scale: 1.0 / (d as f32).sqrt(),
            };
            (task, range)
        }

        /// The whole tile through `f`, in an output the size of all query heads.
        fn run_tile(&self, f: AttendFn, scores: &mut Vec<f32>) -> Vec<f32> {
            let mut out = vec![UNTOUCHED; self.q.len()];
            let (task, range) = self.task(0, self.tokens);
            f(&task, scores, &mut out[range]);
            out
        }

        /// Token by token through `f`.
        fn run_tokens(&self, f: AttendFn, scores: &mut Vec<f32>) -> Vec<f32> {
            let mut out = vec![UNTOUCHED; self.q.len()];
            for j in 0..self.tokens {
                let (task, range) = self.task(j, 1);
                f(&task, scores, &mut out[range]);
            }
            out
        }
    }

    /// (head_dim, heads, n_pos of the first token, tokens, KV heads): 2B-4T's shapes, tiles
    /// that start at position 0 and that end inside a block of 16 or 32 positions, head sizes
    /// the blocked AVX-512 kernel specializes (128, 64), takes generically (48, 144) or leaves
    /// to the row-wise loop (100, 7).
    /// Then contexts of several chunks: a tile across a chunk's end, a context of exactly
    /// one and two chunks, decode over three.
    const CASES: [(usize, usize, usize, usize, usize); 18] = [
        (128, 4, 1, 1, 5),
        (128, 4, 77, 1, 5),
        (128, 4, 1, 16, 5),
        (128, 4, 30, 13, 5),
        (128, 4, 100, 16, 2),
        (128, 1, 33, 40, 1),
        (64, 1, 300, 3, 2),
        (64, 2, 15, 18, 2),
        (100, 2, 33, 5, 3),
        (48, 2, 17, 20, 1),
        (144, 1, 20, 6, 2),
        (16, 3, 5, 7, 1),
        (7, 2, 9, 4, 2),
        (128, 4, 250, 16, 5),
        (128, 1, 256, 1, 1),
        (64, 2, 512, 4, 2),
        (128, 4, 600, 1, 5),
        (100, 2, 255, 3, 1),
    ];

    #[test]
    fn simd_paths_agree_with_scalar_and_the_definition() {
        let mut scores = Vec::new();
        for (d, heads, n_pos, tokens, kv_heads) in CASES {
            let case = Case::new(d, heads, n_pos, tokens, kv_heads);
            let (task, range) = case.task(0, tokens);
            let want = reference(&task);
            let base = case.run_tile(attend_scalar, &mut scores);
            // Relative error, with a floor of 0.1 on the magnitude: outputs are weighted
            // means of values in [-1, 1], and where they cancel to near zero the rounding
            // error stays that of the terms.
            let close = |a: &[f32], b: &[f32], tol: f32, what: &str| {
                for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (x - y).abs() <= tol * y.abs().max(0.1),
                        "{what} d={d} heads={heads} n={n_pos} tokens={tokens} [{i}]: {x} vs {y}"
                    );
                }
            };
            close(&base[range.clone()], &want, 1e-5, "scalar vs f64");
            for (name, f) in paths() {
                close(&case.run_tile(f, &mut scores), &base, 1e-5, name);
            }
        }
    }

    /// A tile reads each K/V row once for all its tokens but must not change any token's
    /// arithmetic: on every path, the tile's outputs are its tokens' one at a time, and
    /// nothing outside the task's query rows is written.
    #[test]
    fn a_tile_equals_its_tokens_one_at_a_time_bit_for_bit() {
        let mut scores = Vec::new();
        for (d, heads, n_pos, tokens, kv_heads) in CASES {
            let case = Case::new(d, heads, n_pos, tokens, kv_heads);
            let (_, range) = case.task(0, tokens);
            let q_stride = kv_heads * heads * d;
            for (name, f) in paths() {
                let tile = case.run_tile(f, &mut scores);
                let alone = case.run_tokens(f, &mut scores);
                for (i, (&a, &b)) in tile.iter().zip(&alone).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{name} d={d} heads={heads} n={n_pos} tokens={tokens} [{i}]: {a} vs {b}"
                    );
                    let in_task = range.contains(&i) && (i - range.start) % q_stride < heads * d;
                    assert_eq!(a == UNTOUCHED, !in_task, "{name} d={d} [{i}] written: {a}");
                }
            }
        }
    }

    /// Decode spreads a query's chunks over threads: the chunks computed in any order into
    /// their own partial rows and folded in order give `attend`'s bits.
    #[test]
    fn chunks_apart_then_folded_equal_attend_bit_for_bit() {
        let mut scores = Vec::new();
        for (d, heads, n_pos, tokens, kv_heads) in CASES {
            let case = Case::new(d, heads, n_pos, tokens, kv_heads);
            let want = case.run_tokens(attend, &mut scores);
            for j in 0..tokens {
                let (task, range) = case.task(j, 1);
                let n = task.chunks();
                let mut parts = vec![f32::NAN; n * task.partial_len()];
                for c in (0..n).rev() {
                    let part = &mut parts[c * task.partial_len()..][..task.partial_len()];
                    attend_chunk(&task, c, &mut scores, part);
                }
                for h in 0..heads {
                    let (mut state, mut out) = (RunningSoftmax::START, vec![0.0; d]);
                    for c in 0..n {
                        let at = c * task.partial_len() + h * (d + 2);
                        fold(&parts[at..at + d + 2], &mut state, &mut out);
                    }
                    state.finish(&mut out);
                    let got = out.iter().map(|x| x.to_bits());
                    let o = range.start + h * d;
                    let same = got.eq(want[o..o + d].iter().map(|x| x.to_bits()));
                    assert!(same, "d={d} heads={heads} n={n_pos} token {j} head {h}");
                }
            }
        }
    }

    /// The blocked kernels (AVX-512: 16 dots reduced together; AVX2: 4 dots sharing each
    /// query load; both: outputs in registers) add in the order of their row-wise loops, so
    /// the two agree bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn blocked_kernels_equal_rowwise_bit_for_bit() {
        let paths = x86::paths();
        let get = |name| paths.iter().find(|p| p.0 == name).map(|p| p.1);
        for (blocked, rowwise) in [("avx512", "avx512-rowwise"), ("avx2", "avx2-rowwise")] {
            let (Some(blocked_fn), Some(rowwise_fn)) = (get(blocked), get(rowwise)) else {
                eprintln!("{blocked}: not on this CPU, nothing to compare");
                continue;
            };
            let mut scores = Vec::new();
            for (d, heads, n_pos, tokens, kv_heads) in CASES {
                let case = Case::new(d, heads, n_pos, tokens, kv_heads);
                for run in [Case::run_tile, Case::run_tokens] {
                    let a = run(&case, blocked_fn, &mut scores);
                    let b = run(&case, rowwise_fn, &mut scores);
                    let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(
                        same,
                        "{blocked} d={d} heads={heads} n={n_pos} tokens={tokens}"
                    );
                }
            }
        }
    }

    /// An f16 cache is widened exactly, so it gives the bits of an f32 cache holding the
    /// same (rounded) values; the task's other heads (the gaps of the stride) are not read.
    #[test]
    fn an_f16_cache_gives_the_bits_of_f32_with_its_values() {
        let mut scores = Vec::new();
        for (d, heads, n_pos, tokens, kv_heads) in CASES {
            let mut case = Case::new(d, heads, n_pos, tokens, kv_heads);
            let half = |v: &[f32]| {
                v.iter()
                    .map(|&x| half::f16::from_f32(x))
                    .collect::<Vec<_>>()
            };
            let (k16, v16) = (half(&case.keys), half(&case.values));
            case.keys = k16.iter().map(|x| x.to_f32()).collect();
            case.values = v16.iter().map(|x| x.to_f32()).collect();
            let want = case.run_tile(attend, &mut scores);
            let (task, range) = case.task(0, tokens);
            let off = (kv_heads - 1) * d;
            let task16 = task.with_rows(&k16[off..], &v16[off..], task.stride);
            let mut got = vec![UNTOUCHED; case.q.len()];
            attend(&task16, &mut scores, &mut got[range]);
            let same = got
                .iter()
                .zip(&want)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "d={d} heads={heads} n={n_pos} tokens={tokens}");
        }
    }
}
