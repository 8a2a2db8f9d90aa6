//! The x86 chunk kernels, chosen at run time by [`level`]: AVX-512 (blocked for head sizes
//! that are multiples of 16, else row-wise) and AVX2+FMA (scores 4 K rows at a time and V
//! sums in registers for head sizes that are multiples of 8, else row-wise). A blocked
//! kernel gives its row-wise loop's bits.

use super::super::exp::x86::{exp16, exp8};
use super::{
    chunk_body, exp_tail, row_max, start_partials, AttentionTask, ChunkRows, KvElem, CHUNK, WIDE,
};
use std::arch::x86_64::*;
use std::ops::Range;

pub(super) use crate::kernels::{x86_level as level, X86Level as Level};

/// Positions of V rows accumulated per pass over a query's output (in registers): 32 rows
/// of 128 floats are 16 KB, which stay in L1 while every query of the tile reads them.
const V_BLOCK: usize = 32;
const _: () = assert!(CHUNK.is_multiple_of(V_BLOCK) && CHUNK.is_multiple_of(16));

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

/// The shared chunk loop with AVX-512 dots, exponentials and axpys: one (query,
/// position) at a time.
///
/// # Safety
/// AVX-512F; `t` and the slice sizes as `prepare` validates them.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn rowwise_512<T>(
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
        // SAFETY (all closures): they run inside this function, whose features the
        // caller guarantees; slice lengths bound every access.
        |a, b| unsafe { dot_512(a, b) },
        |o, w, v| unsafe { axpy_512(o, w, v) },
        |s| exp_row_512(s),
    )
}

/// The shared chunk loop with AVX2 and FMA: one (query, position) at a time.
///
/// # Safety
/// AVX2 and FMA; `t` and the slice sizes as `prepare` validates them.
#[target_feature(enable = "avx2,fma")]
unsafe fn rowwise_256<T>(
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
        // SAFETY: as in `rowwise_512`.
        |a, b| unsafe { dot_256(a, b) },
        |o, w, v| unsafe { axpy_256(o, w, v) },
        |s| exp_row_256(s),
    )
}

/// The AVX2 chunk kernel: [`rowwise_256`]'s arithmetic for every (query, position), with
/// the scores 4 K rows at a time and the V sums in registers when `head_dim % 8 == 0`.
///
/// # Safety
/// AVX2 and FMA; `t` and the slice sizes as `prepare` validates them.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn chunk_256<T>(
    t: &AttentionTask<T>,
    span: Range<usize>,
    rows: ChunkRows<f32>,
    scores: &mut [f32],
    partial: &mut [f32],
) {
    if !t.head_dim.is_multiple_of(8) {
        // SAFETY: the caller's contract, passed on.
        return unsafe { rowwise_256(t, span, rows, scores, partial) };
    }
    scores_256(t, &span, &rows, scores);
    start_partials(t, &span, scores, partial, |s| exp_row_256(s));
    // The V sums as `blocked_512` takes them: [`V_BLOCK`] rows at a time against every query,
    // its output held in registers (64 floats at a time: AVX2 has 16 vector registers) with
    // the multiply-adds of `axpy_256` in position order, so the bits are `chunk_body`'s.
    let (d, c0, n_rows) = (t.head_dim, span.start, t.rows());
    for pb in span.clone().step_by(V_BLOCK) {
        let v = &rows.values[(pb - c0) * rows.stride..];
        for r in t.first_token(pb) * t.heads..n_rows {
            let end = t.n_of(r).min(pb + V_BLOCK);
            let w = &scores[r * CHUNK + pb - c0..r * CHUNK + end - c0];
            let o = &mut partial[r * (d + 2) + 2..][..d];
            let mut c = 0;
            // SAFETY (every call): columns `c..c + 8 M` lie inside the query's `d` output
            // floats and inside the V rows `pb..end` (validated sizes).
            unsafe {
                let (o, v) = (o.as_mut_ptr(), v.as_ptr());
                while c + 64 <= d {
                    axpy_rows_256::<8>(o.add(c), v.add(c), rows.stride, w);
                    c += 64;
                }
                if c + 32 <= d {
                    axpy_rows_256::<4>(o.add(c), v.add(c), rows.stride, w);
                    c += 32;
                }
                if c + 16 <= d {
                    axpy_rows_256::<2>(o.add(c), v.add(c), rows.stride, w);
                    c += 16;
                }
                if c + 8 <= d {
                    axpy_rows_256::<1>(o.add(c), v.add(c), rows.stride, w);
                }
            }
        }
    }
}

/// [`super::scores_rowwise`] with [`dot_256`]'s arithmetic, 4 K rows at a time for the
/// queries that attend to all 4 ([`dots4_256`]: each query load serves 4 rows); the others
/// one position at a time.
///
/// # Safety
/// AVX2 and FMA; `t` and the slice sizes as `prepare` validates them; `head_dim % 8 == 0`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_256<T>(
    t: &AttentionTask<T>,
    span: &Range<usize>,
    rows: &ChunkRows<f32>,
    scores: &mut [f32],
) {
    let (d, c0, stride) = (t.head_dim, span.start, rows.stride);
    debug_assert!(d.is_multiple_of(8));
    for p in span.clone().step_by(4) {
        let keys = &rows.keys[(p - c0) * stride..];
        for r in t.first_token(p) * t.heads..t.rows() {
            let q = &t.q[t.q_offset(r)..][..d];
            let n = t.n_of(r).min(span.end);
            let row = &mut scores[r * CHUNK..][..n - c0];
            if n >= p + 4 {
                // SAFETY: rows `p..p + 4` of the chunk, `d` floats each, lie inside
                // `rows.keys` (validated sizes: they are before the span's end).
                let s = unsafe { dots4_256(q.as_ptr(), keys.as_ptr(), stride, d) };
                for (j, s) in s.into_iter().enumerate() {
                    row[p - c0 + j] = s * t.scale;
                }
            } else {
                for j in p..n {
                    // SAFETY: inside this function's features; slices bound the reads.
                    row[j - c0] = unsafe { dot_256(q, &keys[(j - p) * stride..][..d]) } * t.scale;
                }
            }
        }
    }
}

/// [`dot_256`] of `q` (`d` floats, `d % 8 == 0`) with the 4 rows at `k`, `k + stride`, …,
/// the same multiply-adds and reduction for each.
///
/// # Safety
/// AVX2 and FMA; `d` floats readable at `q` and at each of the 4 rows.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots4_256(q: *const f32, k: *const f32, stride: usize, d: usize) -> [f32; 4] {
    let z = _mm256_setzero_ps();
    let (mut s0, mut s1) = ([z; 4], [z; 4]);
    let mut i = 0;
    // SAFETY: every load is of elements below `d` of `q` or of one of the 4 rows.
    unsafe {
        while i + 16 <= d {
            let (q0, q1) = (_mm256_loadu_ps(q.add(i)), _mm256_loadu_ps(q.add(i + 8)));
            for j in 0..4 {
                let row = k.add(j * stride + i);
                s0[j] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(row), s0[j]);
                s1[j] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(row.add(8)), s1[j]);
            }
            i += 16;
        }
        if i + 8 <= d {
            let q0 = _mm256_loadu_ps(q.add(i));
            for (j, s) in s0.iter_mut().enumerate() {
                *s = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k.add(j * stride + i)), *s);
            }
        }
    }
    std::array::from_fn(|j| hsum_256(_mm256_add_ps(s0[j], s1[j])))
}

/// [`axpy_rows`] with 8-float vectors: `out[0..8 M] += w[p] · v_p[0..8 M]` for `p` in
/// order, with the multiply-adds of [`axpy_256`].
///
/// # Safety
/// AVX2 and FMA; `8 M` floats writable at `out` and readable at each of the `w.len()` rows.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_rows_256<const M: usize>(out: *mut f32, v: *const f32, stride: usize, w: &[f32]) {
    // SAFETY: every access is inside the ranges of the caller's contract.
    unsafe {
        let mut acc: [__m256; M] = std::array::from_fn(|c| _mm256_loadu_ps(out.add(8 * c)));
        for (p, &wp) in w.iter().enumerate() {
            let (vw, row) = (_mm256_set1_ps(wp), v.add(p * stride));
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(vw, _mm256_loadu_ps(row.add(8 * c)), *a);
            }
        }
        for (c, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(8 * c), *a);
        }
    }
}

/// The blocked chunk kernel for `head_dim % 16 == 0`, any cache element type, with the
/// arithmetic of [`rowwise_512`] for every (query, position):
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
pub(super) unsafe fn blocked_512<T, E: KvElem>(
    t: &AttentionTask<T>,
    span: Range<usize>,
    rows: ChunkRows<E>,
    scores: &mut [f32],
    partial: &mut [f32],
) {
    WIDE.with_borrow_mut(|(kbuf, vbuf)| {
        let bufs = (kbuf, vbuf);
        // SAFETY (all arms): the caller's contract, passed on.
        match t.head_dim {
            128 => unsafe { blocked_512_with::<T, E, 128>(t, span, rows, scores, partial, bufs) },
            64 => unsafe { blocked_512_with::<T, E, 64>(t, span, rows, scores, partial, bufs) },
            _ => unsafe { blocked_512_with::<T, E, 0>(t, span, rows, scores, partial, bufs) },
        }
    })
}

/// [`blocked_512`] for head size `D` (0: read it from the task), with its scratch for
/// widened K and V blocks (f16 caches: each block is widened once, in L1, for every
/// query of the task).
#[target_feature(enable = "avx512f")]
unsafe fn blocked_512_with<T, E: KvElem, const D: usize>(
    t: &AttentionTask<T>,
    span: Range<usize>,
    rows: ChunkRows<E>,
    scores: &mut [f32],
    partial: &mut [f32],
    (kbuf, vbuf): (&mut Vec<f32>, &mut Vec<f32>),
) {
    let d = if D == 0 { t.head_dim } else { D };
    debug_assert!(d == t.head_dim && d.is_multiple_of(16));
    let (n_rows, c0) = (t.rows(), span.start);
    let scale = _mm512_set1_ps(t.scale);
    for pb in span.clone().step_by(16) {
        let in_block = (span.end - pb).min(16);
        let (keys, stride) = block_f32(rows.keys, rows.stride, pb - c0, in_block, d, kbuf);
        for r in t.first_token(pb) * t.heads..n_rows {
            let n = t.n_of(r).min(span.end);
            let q = &t.q[t.q_offset(r)..][..d];
            let row = &mut scores[r * CHUNK..][..n - c0];
            if n >= pb + 16 {
                // SAFETY: the block's 16 rows of `d` floats lie inside `keys` (validated
                // sizes, or the widened block); the store is of `row[pb - c0..][..16]`.
                unsafe {
                    let s = dots16(q.as_ptr(), keys.as_ptr(), stride, d);
                    let at = row.as_mut_ptr().add(pb - c0);
                    _mm512_storeu_ps(at, _mm512_mul_ps(s, scale));
                }
            } else {
                for p in pb..n {
                    let k = &keys[(p - pb) * stride..][..d];
                    // SAFETY: inside this function's features; slices bound the reads.
                    row[p - c0] = unsafe { dot_512(q, k) } * t.scale;
                }
            }
        }
    }
    start_partials(t, &span, scores, partial, |s| exp_row_512(s));
    for pb in span.clone().step_by(V_BLOCK) {
        let in_block = (span.end - pb).min(V_BLOCK);
        let (values, stride) = block_f32(rows.values, rows.stride, pb - c0, in_block, d, vbuf);
        let mut r = t.first_token(pb) * t.heads;
        while r < n_rows {
            // At most the span's end: a row that attends past it stops at the chunk's
            // end, a multiple of `V_BLOCK` from `pb`.
            let end = t.n_of(r).min(pb + V_BLOCK);
            let w = |r: usize| &scores[r * CHUNK + pb - c0..r * CHUNK + end - c0];
            // Two heads of one token (the same positions) at once, when whole 128-float
            // steps cover the head: each V row loaded once for both, and 16 independent
            // accumulator chains. Each output's multiply-adds are those of one row.
            if d.is_multiple_of(128) && r + 1 < n_rows && !(r + 1).is_multiple_of(t.heads) {
                let (head, tail) = partial[r * (d + 2) + 2..].split_at_mut(d + 2);
                let (o1, o2) = (&mut head[..d], &mut tail[..d]);
                for c in (0..d).step_by(128) {
                    // SAFETY: columns `c..c + 128` lie inside both queries' `d` output
                    // floats and inside the block's V rows `pb..end` (validated sizes,
                    // or the widened block); `w(r)` and `w(r + 1)` have one length.
                    unsafe {
                        let v = values.as_ptr().add(c);
                        let (o1, o2) = (o1.as_mut_ptr().add(c), o2.as_mut_ptr().add(c));
                        axpy_rows2(o1, o2, v, stride, w(r), w(r + 1));
                    }
                }
                r += 2;
                continue;
            }
            let (w, o) = (w(r), &mut partial[r * (d + 2) + 2..][..d]);
            r += 1;
            let mut c = 0;
            // SAFETY (every call): columns `c..c + 16 * M` lie inside the query's `d`
            // output floats and inside the block's V rows `pb..end` (validated sizes, or
            // the widened block).
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

/// [`super::exp_row_scalar`] with 16 exponentials at a time (the same bits each; the sum
/// in 16 lanes, then [`hsum`]; a tail of under 16 one by one after it).
#[inline]
#[target_feature(enable = "avx512f")]
fn exp_row_512(s: &mut [f32]) -> (f32, f32) {
    let (n, p) = (s.len(), s.as_mut_ptr());
    let whole = n / 16 * 16;
    let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
    // SAFETY (both blocks): every access is of elements below `whole <= n`.
    unsafe {
        for i in (0..whole).step_by(16) {
            vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(p.add(i)));
        }
    }
    let mut lanes = [0f32; 16];
    // SAFETY: 16 floats written.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), vmax) };
    let max = row_max(&s[whole..], &lanes);
    let (vm, mut acc) = (_mm512_set1_ps(max), _mm512_setzero_ps());
    // SAFETY: as above.
    unsafe {
        for i in (0..whole).step_by(16) {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vm));
            _mm512_storeu_ps(p.add(i), e);
            acc = _mm512_add_ps(acc, e);
        }
    }
    (max, exp_tail(&mut s[whole..], max, hsum(acc)))
}

/// [`exp_row_512`] with 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp_row_256(s: &mut [f32]) -> (f32, f32) {
    let (n, p) = (s.len(), s.as_mut_ptr());
    let whole = n / 8 * 8;
    let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
    // SAFETY (both blocks): every access is of elements below `whole <= n`.
    unsafe {
        for i in (0..whole).step_by(8) {
            vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(i)));
        }
    }
    let mut lanes = [0f32; 8];
    // SAFETY: 8 floats written.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), vmax) };
    let max = row_max(&s[whole..], &lanes);
    let (vm, mut acc) = (_mm256_set1_ps(max), _mm256_setzero_ps());
    // SAFETY: as above.
    unsafe {
        for i in (0..whole).step_by(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm));
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
        }
    }
    (max, exp_tail(&mut s[whole..], max, hsum_256(acc)))
}

/// The sum of 8 lanes: halves, then pairs.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum_256(v: __m256) -> f32 {
    let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    let v = _mm_add_ss(v, _mm_movehdup_ps(v));
    _mm_cvtss_f32(v)
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

/// [`axpy_rows`]`::<8>` for two outputs over the same rows, with weights `w1` and `w2`
/// of one length: each output gets the multiply-adds it would get alone.
///
/// # Safety
/// AVX-512F; 128 floats writable at `o1` and at `o2` (apart) and readable at each of the
/// `w1.len()` rows.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn axpy_rows2(
    o1: *mut f32,
    o2: *mut f32,
    v: *const f32,
    stride: usize,
    w1: &[f32],
    w2: &[f32],
) {
    debug_assert_eq!(w1.len(), w2.len());
    // SAFETY: every access is inside the ranges of the caller's contract.
    unsafe {
        let mut a: [__m512; 8] = std::array::from_fn(|c| _mm512_loadu_ps(o1.add(16 * c)));
        let mut b: [__m512; 8] = std::array::from_fn(|c| _mm512_loadu_ps(o2.add(16 * c)));
        for (p, (&x, &y)) in w1.iter().zip(w2).enumerate() {
            let (vx, vy, row) = (_mm512_set1_ps(x), _mm512_set1_ps(y), v.add(p * stride));
            for c in 0..8 {
                let vr = _mm512_loadu_ps(row.add(16 * c));
                a[c] = _mm512_fmadd_ps(vx, vr, a[c]);
                b[c] = _mm512_fmadd_ps(vy, vr, b[c]);
            }
        }
        for c in 0..8 {
            _mm512_storeu_ps(o1.add(16 * c), a[c]);
            _mm512_storeu_ps(o2.add(16 * c), b[c]);
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
    let mut s = hsum_256(_mm256_add_ps(s0, s1));
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
    use super::attend_with;
    let mut v: Vec<(&'static str, super::AttendFn)> = Vec::new();
    if is_x86_feature_detected!("avx512f") {
        v.push(("avx512", |t, s, o| {
            attend_with(t, s, o, |t, span, s, p| {
                let rows = t.chunk_rows(&span);
                // SAFETY: feature detected above; `attend_with` validated the sizes.
                unsafe {
                    if t.head_dim.is_multiple_of(16) {
                        blocked_512(t, span, rows, s, p)
                    } else {
                        rowwise_512(t, span, rows, s, p)
                    }
                }
            })
        }));
        v.push(("avx512-rowwise", |t, s, o| {
            attend_with(t, s, o, |t, span, s, p| {
                let rows = t.chunk_rows(&span);
                // SAFETY: as above.
                unsafe { rowwise_512(t, span, rows, s, p) }
            })
        }));
    }
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        v.push(("avx2", |t, s, o| {
            attend_with(t, s, o, |t, span, s, p| {
                let rows = t.chunk_rows(&span);
                // SAFETY: as above.
                unsafe { chunk_256(t, span, rows, s, p) }
            })
        }));
        v.push(("avx2-rowwise", |t, s, o| {
            attend_with(t, s, o, |t, span, s, p| {
                let rows = t.chunk_rows(&span);
                // SAFETY: as above.
                unsafe { rowwise_256(t, span, rows, s, p) }
            })
        }));
    }
    v
}
