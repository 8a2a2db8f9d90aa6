//! Ternary products with group-wise scales (one scale per 64 or 128 weights of a row: the
//! Q2_0 GGUF types, Ternary-Bonsai): the exact integer dot of every group, times the group's
//! scale, added in f32 in a fixed order, then divided by the activation row's int8 scale
//! `s` (W1.58A8 as for per-tensor scales).
//!
//! **The layout** ([`position`]): a row of a group-scaled [`TernaryMatrix`] is cut into
//! subgroups of 64 weights; 16 subgroups make a chunk (1024 weights, 256 bytes at 2 bits,
//! the code `trit + 1`, a weight), and a row whose length is not whole chunks ends with a
//! half chunk (8 subgroups, 128 bytes; past the row's end padded with zero trits). Both are
//! units of 64 bytes whose 32-bit lane `l` (bytes `4l..4l+4`) holds, in its bits `2i+1, 2i`,
//! four weights of one subgroup: in unit `u` of a chunk, byte `4l + e` holds element `16u +
//! 4i + e` of subgroup `l`; in unit `u` of a half chunk, element `32u + 16·(l/8) + 4i + e` of
//! subgroup `l mod 8`. So `vpdpbusd` (or `vpmaddubsw` + `vpmaddwd`, or `sdot`) of the codes
//! `(bytes >> 2i) & 3` with the matching activations adds each product into the lane of its
//! subgroup: a chunk's 16 subgroup dots come out in one vector, with no horizontal reduction
//! (a half chunk's in two halves of one). The activations are laid out to match once per
//! product ([`GroupActs`]). A group of 128 is two subgroups, added as integers.
//!
//! **The fixed order** (every path, scalar and SIMD, returns its bits; tested): group `g`'s
//! product `(dot_g − Σq_g) · scale_g` (an f32 multiply, then an add: never fused) goes to
//! partial sum `f mod 16`, where `f` is the index of the group's first subgroup (`g` at
//! groups of 64, `2g` at 128), in increasing `g`, each partial starting at +0; the partials
//! are then added as `q_k = p_k + p_{k+8}` and `((q0+q4) + (q2+q6)) + ((q1+q5) + (q3+q7))`,
//! and the total divided by `s`. Vector paths also add `x · 0` for the lanes of padding
//! groups and of the second subgroups of groups of 128; those are ±0 and change no partial
//! (a partial is never −0: it starts at +0, and a sum of two finite values that cancel is
//! +0). Group dots are exact integers (`|dot| ≤ 2·128·128`, exact in f32).
//!
//! Paths: AVX-512 VNNI (`avx512.rs`), AVX2 (`avx2.rs`), NEON with and without dotprod
//! (`neon.rs`), each in the row × token register tiles of the per-tensor kernels
//! (`tiles.rs`), and the scalar reference below.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

use super::ternary::AlignedBytes;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use super::tiles::{self, Tiles};
use super::{GroupScalesRow, QuantizedActivations, TernaryMatrix};
use std::ops::Range;

/// Weights of a half chunk (8 subgroups of 64); rows are whole half chunks.
pub const HALF_WEIGHTS: usize = 512;
/// Packed bytes of a half chunk.
const HALF_BYTES: usize = HALF_WEIGHTS / 4;
/// Partial sums of the fixed order (subgroups of a chunk).
const LANES: usize = 16;

/// Packed bytes of a row of `padded_cols` weights in the group layout.
pub(crate) fn row_bytes(padded_cols: usize) -> usize {
    padded_cols.div_ceil(HALF_WEIGHTS) * HALF_BYTES
}

/// Whole chunks of a row of `padded_cols` weights, and whether a half chunk follows.
fn chunks(padded_cols: usize) -> (usize, bool) {
    let halves = padded_cols.div_ceil(HALF_WEIGHTS);
    (halves / 2, halves % 2 == 1)
}

/// Weight `k` of a row of `padded_cols` in the layout: (the offset of its unit, the lane
/// byte `4l + e` in the unit, its field `i`).
fn place(k: usize, padded_cols: usize) -> (usize, usize, usize) {
    let (full, _) = chunks(padded_cols);
    let (i, e) = ((k % 16) / 4, k % 4);
    if k < full * 2 * HALF_WEIGHTS {
        let (c, w) = (k / (2 * HALF_WEIGHTS), k % (2 * HALF_WEIGHTS));
        let (l, u) = (w / 64, (w % 64) / 16);
        (4 * c + u, 4 * l + e, i)
    } else {
        let w = k - full * 2 * HALF_WEIGHTS;
        let (sub, u, h) = (w / 64, (w % 64) / 32, (w % 32) / 16);
        (4 * full + u, 4 * (sub + 8 * h) + e, i)
    }
}

/// The byte and the bit shift of weight `k` of a row of `padded_cols` in the group layout.
pub(crate) fn position(k: usize, padded_cols: usize) -> (usize, u32) {
    let (unit, byte, i) = place(k, padded_cols);
    (64 * unit + byte, 2 * i as u32)
}

/// Where activation `k` of a row of `padded_cols` goes in [`GroupActs`]: the 64 activations
/// that meet field `i` of unit `u` lie together at `256u + 64i`, in the unit's byte order.
fn act_position(k: usize, padded_cols: usize) -> usize {
    let (unit, byte, i) = place(k, padded_cols);
    256 * unit + 64 * i + byte
}

/// Repacks one row from [`TernaryMatrix`]'s per-tensor layout (`src`, whole 128-weight
/// blocks) into the group layout (`dst`, [`row_bytes`] long; padding weights are 0).
///
/// The four bytes of lane `l` of a unit hold elements `base + 4i + e` of one subgroup: in
/// the per-tensor layout they sit in one field of one block, at bytes `j0 + 4i + e`, so each
/// lane is a 4 × 4 transpose of 2-bit fields, done on 32-bit words.
pub(crate) fn regroup_row(src: &[u8], dst: &mut [u8]) {
    dst.fill(0x55);
    let padded = src.len() * 4;
    let word = |b: usize, j: usize| {
        let at = 32 * b + j;
        u32::from_le_bytes([src[at], src[at + 1], src[at + 2], src[at + 3]])
    };
    for (unit, out) in dst.chunks_exact_mut(64).enumerate() {
        for l in 0..16 {
            // The unit's first element in lane l (i = e = 0).
            let k = first_of_lane(unit, l, padded);
            let b = k / 128;
            if b >= src.len() / 32 {
                continue;
            }
            let (field, j0) = ((k % 128) / 32, k % 32);
            let mut w = 0u32;
            for i in 0..4 {
                w |= ((word(b, j0 + 4 * i) >> (2 * field)) & 0x0303_0303) << (2 * i);
            }
            out[4 * l..4 * l + 4].copy_from_slice(&w.to_le_bytes());
        }
    }
}

/// The row element in lane `l` of `unit` with `i = e = 0` (the inverse of [`place`]).
fn first_of_lane(unit: usize, l: usize, padded_cols: usize) -> usize {
    let (full, _) = chunks(padded_cols);
    if unit < 4 * full {
        2 * HALF_WEIGHTS * (unit / 4) + 64 * l + 16 * (unit % 4)
    } else {
        let u = unit - 4 * full;
        2 * HALF_WEIGHTS * full + 64 * (l % 8) + 32 * u + 16 * (l / 8)
    }
}

/// `((q0+q4) + (q2+q6)) + ((q1+q5) + (q3+q7))` of `q_k = p_k + p_{k+8}` (the module docs).
fn fold16(p: [f32; LANES]) -> f32 {
    let q: [f32; 8] = std::array::from_fn(|k| p[k] + p[k + 8]);
    let s = [q[0] + q[4], q[1] + q[5], q[2] + q[6], q[3] + q[7]];
    (s[0] + s[2]) + (s[1] + s[3])
}

/// `Σ_g (dot_g − sums_g) · scale_g` in the fixed order, of one packed row in the group
/// layout and one int8 activation row `q` in natural order (`padded_cols` long); `sums` are
/// the activation row's group sums. The portable path and the reference of the others.
pub fn group_row_scalar(
    packed: &[u8],
    q: &[i8],
    sums: &[i32],
    scales: GroupScalesRow,
    group: usize,
) -> f32 {
    let mut p = [0f32; LANES];
    for (g, x) in q.chunks_exact(group).enumerate() {
        let mut dot = 0i32;
        for (k, &x) in (g * group..).zip(x) {
            let (b, shift) = position(k, q.len());
            dot += ((packed[b] >> shift) & 3) as i32 * x as i32;
        }
        p[(g * group / 64) % LANES] += (dot - sums[g]) as f32 * scales.get(g);
    }
    fold16(p)
}

/// The activations of one product in the group layout, with their group sums: made once
/// per product and shared by its tasks. Buffers grow to the largest batch once.
#[derive(Default)]
pub struct GroupActs {
    values: Option<AlignedBytes>,
    sums: Vec<i32>,
    /// One a subgroup, in order: `−Σq` of each group at its first subgroup, 0 elsewhere. The vector paths start a chunk's integer sums from it, so
    /// they end as the exact `dot_g − Σq_g`.
    init: Vec<i32>,
    /// Bytes of one row of `values` (whole chunks).
    row_len: usize,
    /// Sums of one row (groups padded to 8).
    groups: usize,
}

impl GroupActs {
    /// Lays out `acts` for matrices with groups of `group`.
    pub fn prepare(&mut self, acts: &QuantizedActivations, group: usize) {
        let (n, padded) = (acts.n_rows(), acts.padded_cols());
        self.row_len = padded.div_ceil(HALF_WEIGHTS) * HALF_WEIGHTS;
        self.groups = (padded / group).next_multiple_of(8);
        self.sums.clear();
        self.sums.resize(n * self.groups, 0);
        for t in 0..n {
            let sums = &mut self.sums[t * self.groups..(t + 1) * self.groups];
            for (x, s) in acts.row(t).chunks_exact(group).zip(sums) {
                *s = x.iter().map(|&v| v as i32).sum();
            }
        }
        // One initial sum a subgroup.
        let subgroups = self.row_len / 64;
        self.init.clear();
        self.init.resize(n * subgroups, 0);
        let subgroups_a_group = group / 64;
        for t in 0..n {
            let sums = &self.sums[t * self.groups..(t + 1) * self.groups];
            let init = &mut self.init[t * subgroups..(t + 1) * subgroups];
            for (s, v) in init.iter_mut().enumerate() {
                if s % subgroups_a_group == 0 && s / subgroups_a_group < sums.len() {
                    *v = -sums[s / subgroups_a_group];
                }
            }
        }
        let values = self
            .values
            .get_or_insert_with(|| AlignedBytes::with_capacity(0));
        values.resize(n * self.row_len);
        let row_len = self.row_len;
        let fill = |t: usize, dst: &mut [u8]| {
            let src = acts.row(t);
            dst.fill(0);
            // Four activations at a time: `act_position` keeps runs of 4 (`e`) together.
            for (k, four) in (0..).step_by(4).zip(src.chunks_exact(4)) {
                let at = act_position(k, padded);
                for (d, &s) in dst[at..at + 4].iter_mut().zip(four) {
                    *d = s as u8;
                }
            }
        };
        if n >= 16 {
            super::pool::for_each_chunk_mut(values.bytes_mut(), row_len, &fill);
        } else {
            for (t, dst) in values.bytes_mut().chunks_exact_mut(row_len).enumerate() {
                fill(t, dst);
            }
        }
    }

    /// Row `t`'s group sums (padded with zeros to 8 groups).
    pub fn sums(&self, t: usize) -> &[i32] {
        &self.sums[t * self.groups..(t + 1) * self.groups]
    }
}

/// Which implementation computes the rows, chosen once per task.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum GroupPath {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "aarch64")]
    NeonDot,
    #[cfg(target_arch = "aarch64")]
    Neon,
}

impl GroupPath {
    /// The path of the current kernel choice: AVX-512 VNNI where the per-tensor kernel is
    /// AVX-512 VNNI or AMX, AVX2 where it is AVX2 or AVX-VNNI, NEON with or without dotprod
    /// as the per-tensor kernel, scalar on the portable path.
    pub fn current() -> Self {
        Self::for_kernel(super::KernelChoice::current().ternary.name())
    }

    /// The path that goes with the per-tensor kernel `name`, where this CPU has it.
    pub fn for_kernel(name: &str) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni");
            return match name {
                "scalar" => GroupPath::Scalar,
                "avx2" | "avxvnni" if avx2 => GroupPath::Avx2,
                _ if avx512 => GroupPath::Avx512,
                _ if avx2 => GroupPath::Avx2,
                _ => GroupPath::Scalar,
            };
        }
        #[cfg(target_arch = "aarch64")]
        {
            let neon = std::arch::is_aarch64_feature_detected!("neon");
            let dot = neon && std::arch::is_aarch64_feature_detected!("dotprod");
            return match name {
                "scalar" => GroupPath::Scalar,
                "neon" if neon => GroupPath::Neon,
                _ if dot => GroupPath::NeonDot,
                _ if neon => GroupPath::Neon,
                _ => GroupPath::Scalar,
            };
        }
        #[allow(unreachable_code)]
        {
            let _ = name;
            GroupPath::Scalar
        }
    }

    /// Every path this CPU can run (for tests).
    pub fn available() -> Vec<Self> {
        let mut all = vec![GroupPath::Scalar];
        for name in ["avx2", "avx512vnni", "neon", "neon-dotprod"] {
            let p = Self::for_kernel(name);
            if !all.contains(&p) {
                all.push(p);
            }
        }
        all
    }

    /// `out[t · w.rows() + r] = Σ_g (dot_g − Σq_g)·scale_g / s_t` for the rows `range` of
    /// `w` and every activation row `t` of `acts`, whose group layout is `ga`.
    ///
    /// # Safety
    /// `out` is valid for writes at those indices, and no other thread writes them.
    pub(super) unsafe fn rows(
        self,
        w: &TernaryMatrix,
        acts: &QuantizedActivations,
        ga: &GroupActs,
        range: Range<usize>,
        out: super::matmul::SharedOut,
    ) {
        assert_eq!(acts.padded_cols(), w.padded_cols(), "group kernel width");
        assert!(w.group() != 0 && range.end <= w.rows(), "group kernel rows");
        let rows = w.rows();
        let n_tok = acts.n_rows();
        assert!(ga.sums.len() >= n_tok * ga.groups && ga.groups == w.group_scales_row(0).len());
        // SAFETY: (t, r) is inside `out` and row r belongs to this task alone (the caller).
        let put = |r: usize, t: usize, v: f32| unsafe { out.put(t * rows + r, v / acts.scale(t)) };
        match self {
            GroupPath::Scalar => {
                for r in range {
                    for t in 0..n_tok {
                        let (packed, scales) = (w.packed_row(r), w.group_scales_row(r));
                        put(
                            r,
                            t,
                            group_row_scalar(packed, acts.row(t), ga.sums(t), scales, w.group()),
                        );
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2` is chosen only where AVX2 and F16C were detected.
            GroupPath::Avx2 => unsafe { run::<avx2::Avx2>(w, acts, ga, range, put) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx512` is chosen only where AVX-512 F/BW/VNNI and F16C were detected.
            GroupPath::Avx512 => unsafe { run::<avx512::Avx512>(w, acts, ga, range, put) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `NeonDot` is chosen only where NEON and dotprod were detected.
            GroupPath::NeonDot => unsafe { run::<neon::NeonDot>(w, acts, ga, range, put) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `Neon` is chosen only where NEON was detected.
            GroupPath::Neon => unsafe { run::<neon::Neon>(w, acts, ga, range, put) },
        }
    }
}

/// An instruction set's tile of the group product.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
trait GroupTile {
    /// `out[i][j]` = the fixed-order sum (module docs, before the division by `s`) of packed
    /// row `w[i]` (group layout: `full` chunks, then a half chunk if `half`), its scales
    /// `s[i]` (f16 if `F16`, else f32; one a group of 64, or of 128 if `G128`, padded to
    /// whole vectors of 8) and activation row `a[j]` (group layout), whose subgroups'
    /// integer sums start from `init[j]` (one a subgroup, [`GroupActs`]).
    ///
    /// # Safety
    /// The CPU has the instruction set; every pointer is valid for those reads.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const WR: usize, const TA: usize, const F16: bool, const G128: bool>(
        w: [*const u8; WR],
        s: [*const u8; WR],
        a: [*const u8; TA],
        init: [*const i32; TA],
        full: usize,
        half: bool,
    ) -> [[f32; TA]; WR];
}

/// The group product of one matrix with one batch, in the tiles of `T`: base pointers and
/// row strides (bytes; `init` in sums) of the packed rows, the scales, the activation rows
/// and their initial sums, so that a tile's pointers cost a multiply-add each.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
struct Product<T, const F16: bool, const G128: bool> {
    w: (*const u8, usize),
    s: (*const u8, usize),
    a: (*const u8, usize),
    init: (*const i32, usize),
    full: usize,
    half: bool,
    tile: std::marker::PhantomData<T>,
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
impl<T: GroupTile, const F16: bool, const G128: bool> Tiles for Product<T, F16, G128> {
    type Out = f32;

    #[inline(always)]
    unsafe fn tile<const WR: usize, const TA: usize>(
        &self,
        r: [usize; WR],
        t: [usize; TA],
    ) -> [[f32; TA]; WR] {
        // `wrapping_add` keeps the arithmetic defined; rows and tokens are inside the
        // buffers (the contract of `Tiles::tile`, checked in `run`), so the pointers are in
        // bounds.
        let w = r.map(|r| self.w.0.wrapping_add(r * self.w.1));
        let s = r.map(|r| self.s.0.wrapping_add(r * self.s.1));
        let a = t.map(|t| self.a.0.wrapping_add(t * self.a.1));
        let init = t.map(|t| self.init.0.wrapping_add(t * self.init.1));
        // SAFETY: the packed rows, activation rows, initial sums and scales are as long as
        // the tile reads (checked in `run`); the caller guarantees the instruction set.
        unsafe { T::tile::<WR, TA, F16, G128>(w, s, a, init, self.full, self.half) }
    }
}

/// The rows `range` of `w` against every activation row, in the tiles of `T`.
///
/// # Safety
/// The CPU has `T`'s instruction set.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
unsafe fn run<T: GroupTile>(
    w: &TernaryMatrix,
    acts: &QuantizedActivations,
    ga: &GroupActs,
    range: Range<usize>,
    put: impl FnMut(usize, usize, f32),
) {
    let (full, half) = chunks(w.padded_cols());
    let halves = 2 * full + half as usize;
    let f16 = matches!(w.group_scales_row(0), GroupScalesRow::F16(_));
    let g128 = w.group() == 128;
    // What the tiles read: the packed rows, activation rows and initial sums of whole
    // (half) chunks, and whole vectors of 8 scales covering them.
    assert_eq!(w.packed_row(0).len(), halves * HALF_BYTES);
    assert_eq!(ga.row_len, halves * HALF_WEIGHTS);
    assert_eq!(ga.init.len(), acts.n_rows() * halves * 8);
    let groups = if g128 { halves * 4 } else { halves * 8 };
    assert!(w.group_scales_row(0).len() >= groups.next_multiple_of(8));
    let (n_tok, act, row) = (acts.n_rows(), ga.row_len, halves * HALF_BYTES);
    let packed = w.packed_rows();
    assert!(packed.len() == w.rows() * row && range.end <= w.rows());
    let (scales, scale_stride) = match w.group_scales_row(0) {
        GroupScalesRow::F16(s) => (s.as_ptr().cast::<u8>(), 2 * s.len()),
        GroupScalesRow::F32(s) => (s.as_ptr().cast::<u8>(), 4 * s.len()),
    };
    let values = ga.values.as_ref().map_or(&[][..], |v| v.bytes());
    assert!(values.len() >= n_tok * act && ga.init.len() >= n_tok * halves * 8);
    macro_rules! go {
        ($f16:literal, $g128:literal) => {{
            let p = Product::<T, $f16, $g128> {
                w: (packed.as_ptr(), row),
                s: (scales, scale_stride),
                a: (values.as_ptr(), act),
                init: (ga.init.as_ptr(), halves * 8),
                full,
                half,
                tile: std::marker::PhantomData,
            };
            // SAFETY: rows and tokens are inside the product; the caller guarantees the
            // instruction set.
            unsafe { tiles::nest(&p, range, n_tok, act, row, put) }
        }};
    }
    match (f16, g128) {
        (true, false) => go!(true, false),
        (true, true) => go!(true, true),
        (false, false) => go!(false, false),
        (false, true) => go!(false, true),
    }
}

#[cfg(test)]
mod tests;
