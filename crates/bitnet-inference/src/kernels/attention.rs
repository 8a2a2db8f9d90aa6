//! Causal attention of a tile of consecutive query tokens of one sequence over its cache, for
//! one group of query heads that share a KV head (GQA), in f32: `softmax(q·kᵀ·scale) · v`
//! with the max subtracted before `exp`.
//!
//! Each K and V row is read once for all the queries of the task: every head of the group of
//! every token of the tile. In prefill, a tile of tokens thus loads each cached row once
//! instead of once per token; in decode the tile is one token. Token `j` of the tile attends
//! to positions `0..n_pos + j` (causal: the tile's tokens sit at consecutive positions).
//!
//! The arithmetic of one (query, position) does not depend on the tile: the same dot (lanes,
//! accumulators and reduction order), the same scalar `exp` and sums, the same multiply-adds
//! into the output in position order. A tile gives bit for bit the outputs of its tokens one
//! at a time, on every path. The q·k dots and the V accumulation use AVX-512 or AVX2+FMA
//! where the CPU has them (chosen at run time); `exp` and the softmax sum are the scalar ones
//! on every path, so the paths differ only by the order of the float additions in the dots
//! and by fused multiply-adds.
//!
//! The cache holds f32 (exact) or f16 ([`KvElem`]). f16 rows are widened to f32 (exactly)
//! once for all the task's queries: block by block in L1 by the blocked AVX-512 kernel, the
//! whole task into a per-thread scratch on the other paths. An f16 cache thus gives the bits
//! an f32 cache holding the same values would, and decode reads half the bytes per cached
//! position.

use std::cell::RefCell;

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
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

thread_local! {
    /// The blocked kernel's widened K and V blocks.
    static WIDE: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// A whole task's keys and values, widened for the paths without the blocked kernel.
    static WIDE_TASK: RefCell<(Vec<f32>, Vec<f32>)> =
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
    fn rows(&self) -> usize {
        self.tokens * self.heads
    }
    /// Positions the last token attends to: the score rows' length.
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
}

/// Writes the outputs of the task's query heads to `out`, in the layout of `q` (the gaps
/// between the tokens' rows are left alone); `scores` is scratch and grows to
/// `tokens * heads * (n_pos + tokens - 1)` if it is shorter.
pub fn attend<T: KvElem>(task: &AttentionTask<T>, scores: &mut Vec<f32>, out: &mut [f32]) {
    if let (Some(keys), Some(values)) = (T::as_f32(task.keys), T::as_f32(task.values)) {
        return attend_f32(&task.with_rows(keys, values, task.stride), scores, out);
    }
    #[cfg(target_arch = "x86_64")]
    if x86::level() == x86::Level::Avx512 && task.head_dim.is_multiple_of(16) {
        let scores = prepare(task, scores, out);
        // SAFETY: the level was detected on this CPU; `prepare` validated the sizes.
        return unsafe { x86::attend_blocked_512(task, scores, out) };
    }
    let (d, n) = (task.head_dim, task.n_max());
    assert!(
        n > 0
            && task.stride >= d
            && task.keys.len().min(task.values.len()) >= (n - 1) * task.stride + d,
        "attention cache size"
    );
    WIDE_TASK.with_borrow_mut(|(keys, values)| {
        keys.resize(n * d, 0.0);
        values.resize(n * d, 0.0);
        for p in 0..n {
            let (src, dst) = (p * task.stride..p * task.stride + d, p * d..(p + 1) * d);
            T::widen(&task.keys[src.clone()], &mut keys[dst.clone()]);
            T::widen(&task.values[src], &mut values[dst]);
        }
        attend_f32(&task.with_rows(&keys[..], &values[..], d), scores, out)
    })
}

fn attend_f32(task: &AttentionTask, scores: &mut Vec<f32>, out: &mut [f32]) {
    let scores = prepare(task, scores, out);
    #[cfg(target_arch = "x86_64")]
    {
        match x86::level() {
            // SAFETY: the level was detected on this CPU; `prepare` validated the sizes.
            x86::Level::Avx512 => return unsafe { x86::attend_512(task, scores, out) },
            // SAFETY: as above.
            x86::Level::Avx2 => return unsafe { x86::attend_256(task, scores, out) },
            x86::Level::Scalar => {}
        }
    }
    attend_body(task, scores, out, dot_scalar, axpy_scalar)
}

/// The portable path (for tests and CPUs without the vector units).
pub fn attend_scalar(task: &AttentionTask, scores: &mut Vec<f32>, out: &mut [f32]) {
    let scores = prepare(task, scores, out);
    attend_body(task, scores, out, dot_scalar, axpy_scalar)
}

/// Validates the sizes every path indexes by, and returns the task's part of `scores`
/// (grown if it is too short: never shrunk, so that it is filled once).
fn prepare<'s, T>(t: &AttentionTask<T>, scores: &'s mut Vec<f32>, out: &[f32]) -> &'s mut [f32] {
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
    assert_eq!(out.len(), q_len, "attention output size");
    assert!(t.n_pos > 0 && t.stride >= d, "attention positions");
    let need = (t.n_max() - 1) * t.stride + d;
    assert!(
        t.keys.len() >= need && t.values.len() >= need,
        "attention cache size"
    );
    let len = t.rows() * t.n_max();
    if scores.len() < len {
        scores.resize(len, 0.0);
    }
    &mut scores[..len]
}

/// The shared loop: scores, softmax, weighted sum of V rows. `dot(a, b)` and
/// `axpy(out, w, v)` (`out += w·v`) are the only vector operations. Each K row, then each
/// V row, is used by every query of the tile that attends to it before the next is read.
#[inline(always)]
fn attend_body(
    t: &AttentionTask,
    scores: &mut [f32],
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
    axpy: impl Fn(&mut [f32], f32, &[f32]),
) {
    let (d, heads, n_max) = (t.head_dim, t.heads, t.n_max());
    for p in 0..n_max {
        let k = &t.keys[p * t.stride..p * t.stride + d];
        for r in t.first_token(p) * heads..t.rows() {
            let q = t.q_offset(r);
            scores[r * n_max + p] = dot(&t.q[q..q + d], k) * t.scale;
        }
    }
    softmax(t, scores);
    for r in 0..t.rows() {
        let o = t.q_offset(r);
        out[o..o + d].fill(0.0);
    }
    for p in 0..n_max {
        let v = &t.values[p * t.stride..p * t.stride + d];
        for r in t.first_token(p) * heads..t.rows() {
            let o = t.q_offset(r);
            axpy(&mut out[o..o + d], scores[r * n_max + p], v);
        }
    }
}

/// Each query row's scores (the first `n_of(r)` of its `n_max`) become its softmax.
#[inline(always)]
fn softmax<T>(t: &AttentionTask<T>, scores: &mut [f32]) {
    let n_max = t.n_max();
    for r in 0..t.rows() {
        let s = &mut scores[r * n_max..r * n_max + t.n_of(r)];
        let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0f32;
        for v in s.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in s.iter_mut() {
            *v /= sum;
        }
    }
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{attend_body, softmax, AttentionTask, KvElem, WIDE};
    use std::arch::x86_64::*;

    #[derive(Clone, Copy, PartialEq)]
    pub(super) enum Level {
        Scalar,
        Avx2,
        Avx512,
    }

    pub(super) fn level() -> Level {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            if is_x86_feature_detected!("avx512f") {
                Level::Avx512
            } else if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                Level::Avx2
            } else {
                Level::Scalar
            }
        })
    }

    /// Positions of V rows accumulated per pass over a query's output (in registers): 32 rows
    /// of 128 floats are 16 KB, which stay in L1 while every query of the tile reads them.
    const V_BLOCK: usize = 32;

    /// The AVX-512 path. Head sizes of whole 16-float vectors run the blocked kernel; others
    /// the shared loop.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend_512(t: &AttentionTask, scores: &mut [f32], out: &mut [f32]) {
        if t.head_dim.is_multiple_of(16) {
            // SAFETY: the caller guarantees the feature and validated the sizes.
            unsafe { attend_blocked_512(t, scores, out) }
        } else {
            // SAFETY: as above.
            unsafe { rowwise_512(t, scores, out) }
        }
    }

    /// [`blocked_512`] for any cache element type (`head_dim % 16 == 0`).
    ///
    /// # Safety
    /// AVX-512F; `t` and the slice sizes as `prepare` validates them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend_blocked_512<T: KvElem>(
        t: &AttentionTask<T>,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        // SAFETY (all arms): the caller guarantees the feature and validated the sizes.
        match t.head_dim {
            128 => unsafe { blocked_512::<T, 128>(t, scores, out) },
            64 => unsafe { blocked_512::<T, 64>(t, scores, out) },
            _ => unsafe { blocked_512::<T, 0>(t, scores, out) },
        }
    }

    /// Rows `first..first + n` of `rows` (`stride` apart, `d` used) as f32: where they are in
    /// place for f32, else widened into `buf`. Returns the first row's start and the stride.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn block_f32<'a, T: KvElem>(
        rows: &'a [T],
        stride: usize,
        first: usize,
        n: usize,
        d: usize,
        buf: &'a mut Vec<f32>,
    ) -> (&'a [f32], usize) {
        if let Some(rows) = T::as_f32(rows) {
            return (&rows[first * stride..], stride);
        }
        buf.resize(n * d, 0.0);
        for i in 0..n {
            let at = (first + i) * stride;
            // SAFETY: inlined into the AVX-512 kernel; both rows are `d` long, a multiple of
            // 16 (the blocked kernel's condition).
            unsafe { T::widen_512(&rows[at..at + d], &mut buf[i * d..(i + 1) * d]) };
        }
        (&buf[..], d)
    }

    /// The shared loop with AVX-512 dots and axpys: one (query, position) at a time.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rowwise_512(t: &AttentionTask, scores: &mut [f32], out: &mut [f32]) {
        attend_body(
            t,
            scores,
            out,
            // SAFETY (both closures): they run inside this function, whose features the
            // caller guarantees; slice lengths bound every access.
            |a, b| unsafe { dot_512(a, b) },
            |o, w, v| unsafe { axpy_512(o, w, v) },
        )
    }

    /// The blocked kernel for `head_dim % 16 == 0` (`D` is the head size, or 0 for "read it
    /// from the task"), with the arithmetic of [`rowwise_512`] for every (query, position):
    ///
    /// * scores: 16 K rows at a time (8 KB, in L1) against every query of the tile; a
    ///   query's 16 dots are [`dot_acc`] each, reduced together by [`hsum16`], which adds the
    ///   lanes in the order [`hsum`] does; a query's last partial block uses [`dot_512`];
    /// * values: [`V_BLOCK`] V rows at a time against every query, the query's output held in
    ///   registers across the rows with the multiply-adds of [`axpy_512`] in position order.
    ///
    /// # Safety
    /// AVX-512F; `t` and the slice sizes as `prepare` validates them.
    #[target_feature(enable = "avx512f")]
    unsafe fn blocked_512<T: KvElem, const D: usize>(
        t: &AttentionTask<T>,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        WIDE.with_borrow_mut(|(kbuf, vbuf)| {
            // SAFETY: the caller's contract, passed on.
            unsafe { blocked_512_with::<T, D>(t, scores, out, kbuf, vbuf) }
        })
    }

    /// [`blocked_512`] with its scratch for widened K and V blocks (f16 caches: each block
    /// is widened once, in L1, for every query of the task).
    #[target_feature(enable = "avx512f")]
    unsafe fn blocked_512_with<T: KvElem, const D: usize>(
        t: &AttentionTask<T>,
        scores: &mut [f32],
        out: &mut [f32],
        kbuf: &mut Vec<f32>,
        vbuf: &mut Vec<f32>,
    ) {
        let d = if D == 0 { t.head_dim } else { D };
        debug_assert!(d == t.head_dim && d.is_multiple_of(16));
        let (n_max, rows) = (t.n_max(), t.rows());
        let scale = _mm512_set1_ps(t.scale);
        for pb in (0..n_max).step_by(16) {
            let in_block = (n_max - pb).min(16);
            let (keys, stride) = block_f32(t.keys, t.stride, pb, in_block, d, kbuf);
            for r in t.first_token(pb) * t.heads..rows {
                let n = t.n_of(r);
                let q = &t.q[t.q_offset(r)..][..d];
                let row = &mut scores[r * n_max..r * n_max + n];
                if n >= pb + 16 {
                    // SAFETY: the block's 16 rows of `d` floats lie inside `keys` (validated
                    // sizes, or the widened block); the store is of `row[pb..pb + 16]`.
                    unsafe {
                        let s = dots16(q.as_ptr(), keys.as_ptr(), stride, d);
                        _mm512_storeu_ps(row.as_mut_ptr().add(pb), _mm512_mul_ps(s, scale));
                    }
                } else {
                    for (p, s) in row.iter_mut().enumerate().skip(pb) {
                        let k = &keys[(p - pb) * stride..(p - pb) * stride + d];
                        // SAFETY: inside this function's features; slices bound the reads.
                        *s = unsafe { dot_512(q, k) } * t.scale;
                    }
                }
            }
        }
        softmax(t, scores);
        for r in 0..rows {
            let o = t.q_offset(r);
            out[o..o + d].fill(0.0);
        }
        for pb in (0..n_max).step_by(V_BLOCK) {
            let in_block = (n_max - pb).min(V_BLOCK);
            let (values, stride) = block_f32(t.values, t.stride, pb, in_block, d, vbuf);
            for r in t.first_token(pb) * t.heads..rows {
                let end = t.n_of(r).min(pb + V_BLOCK);
                let w = &scores[r * n_max + pb..r * n_max + end];
                let o = &mut out[t.q_offset(r)..][..d];
                let mut c = 0;
                // SAFETY (every call): columns `c..c + 16 * M` lie inside the query's `d`
                // output floats and inside the block's V rows `pb..end` (below `n_max`:
                // validated sizes, or the widened block).
                unsafe {
                    let (o, v) = (o.as_mut_ptr(), values.as_ptr());
                    while c + 128 <= d {
                        axpy_rows::<8>(o.add(c), v.add(c), stride, w);
                        c += 128;
                    }
                    if c + 64 <= d {
                        axpy_rows::<4>(o.add(c), v.add(c), stride, w);
                        c += 64;
                    }
                    if c + 32 <= d {
                        axpy_rows::<2>(o.add(c), v.add(c), stride, w);
                        c += 32;
                    }
                    if c + 16 <= d {
                        axpy_rows::<1>(o.add(c), v.add(c), stride, w);
                    }
                }
            }
        }
    }

    /// The two accumulators of a dot of `n` floats, summed, over its whole 16-float vectors
    /// (`dot_512` adds the rest one by one): 32 floats a step, then one 16-float vector.
    ///
    /// # Safety
    /// AVX-512F; `n` floats readable at `a` and at `b`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dot_acc(a: *const f32, b: *const f32, n: usize) -> __m512 {
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        // SAFETY: every load is of elements below `n`.
        unsafe {
            while i + 32 <= n {
                s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i)), _mm512_loadu_ps(b.add(i)), s0);
                s1 = _mm512_fmadd_ps(
                    _mm512_loadu_ps(a.add(i + 16)),
                    _mm512_loadu_ps(b.add(i + 16)),
                    s1,
                );
                i += 32;
            }
            if i + 16 <= n {
                s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i)), _mm512_loadu_ps(b.add(i)), s0);
            }
        }
        _mm512_add_ps(s0, s1)
    }

    /// The sum of the 16 lanes as a tree: lanes `i + 8`, then `i + 4`, `i + 2`, `i + 1`
    /// (`_mm512_reduce_add_ps`'s order, written out so that [`hsum16`] can match it).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn hsum(v: __m512) -> f32 {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let a = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
        let a = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let a = _mm_add_ps(a, _mm_movehl_ps(a, a));
        let a = _mm_add_ss(a, _mm_movehdup_ps(a));
        _mm_cvtss_f32(a)
    }

    /// `[hsum(v[0]), …, hsum(v[15])]` with the same additions, done on whole vectors: each
    /// step halves the lanes of every input as [`hsum`] does and packs two inputs into one.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn hsum16(v: [__m512; 16]) -> __m512 {
        // Lanes i + 8: blocks [a0+a2, a1+a3, b0+b2, b1+b3] (a block is 4 lanes).
        let s1: [__m512; 8] = std::array::from_fn(|m| {
            let (a, b) = (v[2 * m], v[2 * m + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            )
        });
        // Lanes i + 4: block k of s2[m] holds input 4m + k.
        let s2: [__m512; 4] = std::array::from_fn(|m| {
            let (a, b) = (s1[2 * m], s1[2 * m + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            )
        });
        // Lanes i + 2: block k of s3[m] holds inputs 8m + k (lanes 0, 1), 8m + 4 + k (2, 3).
        let s3: [__m512; 2] = std::array::from_fn(|m| {
            let (a, b) = (_mm512_castps_pd(s2[2 * m]), _mm512_castps_pd(s2[2 * m + 1]));
            _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
            )
        });
        // Lanes i + 1: lane 4k + e holds input 4e + k.
        let s4 = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(s3[0], s3[1]),
            _mm512_shuffle_ps::<0xDD>(s3[0], s3[1]),
        );
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(order, s4)
    }

    /// The dots of `q` (`d` floats) with the 16 rows at `k`, `k + stride`, …: lane `i` is
    /// `hsum(dot_acc(q, row i))`, which is `dot_512` when `d % 16 == 0`.
    ///
    /// # Safety
    /// AVX-512F; `d` floats readable at `q` and at each of the 16 rows.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dots16(q: *const f32, k: *const f32, stride: usize, d: usize) -> __m512 {
        // SAFETY: row `i < 16` is readable for `d` floats (the caller's contract).
        let v = std::array::from_fn(|i| unsafe { dot_acc(q, k.add(i * stride), d) });
        hsum16(v)
    }

    /// `out[0..16 M] += w[p] · v_p[0..16 M]` for `p` in order (`v_p` at `v + p * stride`),
    /// with the multiply-adds of [`axpy_512`] and the `M` output vectors in registers.
    ///
    /// # Safety
    /// AVX-512F; `16 M` floats writable at `out` and readable at each of the `w.len()` rows.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn axpy_rows<const M: usize>(out: *mut f32, v: *const f32, stride: usize, w: &[f32]) {
        // SAFETY: every access is inside the ranges of the caller's contract.
        unsafe {
            let mut acc: [__m512; M] = std::array::from_fn(|c| _mm512_loadu_ps(out.add(16 * c)));
            for (p, &wp) in w.iter().enumerate() {
                let (vw, row) = (_mm512_set1_ps(wp), v.add(p * stride));
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(vw, _mm512_loadu_ps(row.add(16 * c)), *a);
                }
            }
            for (c, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(16 * c), *a);
            }
        }
    }

    /// f16 to f32, 8 at a time.
    ///
    /// # Safety
    /// F16C; `src` and `dst` of the same length.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn widen_f16c(src: &[half::f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        // SAFETY: every access is of elements below `n` of both slices.
        unsafe {
            while i + 8 <= n {
                let v = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(i).cast()));
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), v);
                i += 8;
            }
        }
        for k in i..n {
            dst[k] = src[k].to_f32();
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_256(t: &AttentionTask, scores: &mut [f32], out: &mut [f32]) {
        attend_body(
            t,
            scores,
            out,
            // SAFETY: as in `rowwise_512`.
            |a, b| unsafe { dot_256(a, b) },
            |o, w, v| unsafe { axpy_256(o, w, v) },
        )
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dot_512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        // SAFETY: both slices hold `n` floats.
        let mut s = hsum(unsafe { dot_acc(a.as_ptr(), b.as_ptr(), n) });
        for k in n / 16 * 16..n {
            s += a[k] * b[k];
        }
        s
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn axpy_512(out: &mut [f32], w: f32, v: &[f32]) {
        let n = out.len().min(v.len());
        let (po, pv) = (out.as_mut_ptr(), v.as_ptr());
        let vw = _mm512_set1_ps(w);
        let mut i = 0;
        // SAFETY: every access is of elements below `n` of both slices.
        unsafe {
            while i + 16 <= n {
                let o = _mm512_fmadd_ps(vw, _mm512_loadu_ps(pv.add(i)), _mm512_loadu_ps(po.add(i)));
                _mm512_storeu_ps(po.add(i), o);
                i += 16;
            }
        }
        for k in i..n {
            out[k] += w * v[k];
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_256(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        // SAFETY: every load is of elements below `n` of both slices.
        unsafe {
            while i + 16 <= n {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
                s1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i + 8)),
                    _mm256_loadu_ps(pb.add(i + 8)),
                    s1,
                );
                i += 16;
            }
            if i + 8 <= n {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
                i += 8;
            }
        }
        let v = _mm256_add_ps(s0, s1);
        let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        let v = _mm_add_ss(v, _mm_movehdup_ps(v));
        let mut s = _mm_cvtss_f32(v);
        for k in i..n {
            s += a[k] * b[k];
        }
        s
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn axpy_256(out: &mut [f32], w: f32, v: &[f32]) {
        let n = out.len().min(v.len());
        let (po, pv) = (out.as_mut_ptr(), v.as_ptr());
        let vw = _mm256_set1_ps(w);
        let mut i = 0;
        // SAFETY: every access is of elements below `n` of both slices.
        unsafe {
            while i + 8 <= n {
                let o = _mm256_fmadd_ps(vw, _mm256_loadu_ps(pv.add(i)), _mm256_loadu_ps(po.add(i)));
                _mm256_storeu_ps(po.add(i), o);
                i += 8;
            }
        }
        for k in i..n {
            out[k] += w * v[k];
        }
    }

    /// Every SIMD path this CPU has (for tests), the blocked AVX-512 kernel and the row-wise
    /// one it must match bit for bit.
    #[cfg(test)]
    pub(super) fn paths() -> Vec<(&'static str, super::AttendFn)> {
        let mut v: Vec<(&'static str, super::AttendFn)> = Vec::new();
        if is_x86_feature_detected!("avx512f") {
            v.push(("avx512", |t, s, o| {
                let s = super::prepare(t, s, o);
                // SAFETY: feature detected above; `prepare` validated the sizes.
                unsafe { attend_512(t, s, o) }
            }));
            v.push(("avx512-rowwise", |t, s, o| {
                let s = super::prepare(t, s, o);
                // SAFETY: as above.
                unsafe { rowwise_512(t, s, o) }
            }));
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            v.push(("avx2", |t, s, o| {
                let s = super::prepare(t, s, o);
                // SAFETY: as above.
                unsafe { attend_256(t, s, o) }
            }));
        }
        v
    }
}

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
    const CASES: [(usize, usize, usize, usize, usize); 13] = [
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

    /// The blocked AVX-512 kernel (16 dots reduced together, outputs in registers) adds in
    /// the order of the row-wise one, so the two agree bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn blocked_avx512_equals_rowwise_bit_for_bit() {
        let paths = x86::paths();
        let get = |name| paths.iter().find(|p| p.0 == name).map(|p| p.1);
        let (Some(blocked), Some(rowwise)) = (get("avx512"), get("avx512-rowwise")) else {
            eprintln!("no AVX-512 on this CPU: nothing to compare");
            return;
        };
        let mut scores = Vec::new();
        for (d, heads, n_pos, tokens, kv_heads) in CASES {
            let case = Case::new(d, heads, n_pos, tokens, kv_heads);
            for run in [Case::run_tile, Case::run_tokens] {
                let a = run(&case, blocked, &mut scores);
                let b = run(&case, rowwise, &mut scores);
                let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "d={d} heads={heads} n={n_pos} tokens={tokens}");
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
