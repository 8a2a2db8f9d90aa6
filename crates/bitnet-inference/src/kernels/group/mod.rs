//! Ternary products with group-wise scales (one scale per 64 or 128 weights of a row: the
//! Q2_0 GGUF types, Ternary-Bonsai): the exact integer dot of every group, times the group's
//! scale, added in f32 in a fixed order, then divided by the activation row's int8 scale
//! `s` (W1.58A8 as for per-tensor scales).
//!
//! **The fixed order** (every path, scalar and SIMD, returns its bits; tested): group `g`'s
//! product `(dot_g − Σq_g) · scale_g` (an f32 multiply, then an add: never fused) goes to
//! partial sum `g mod 8`, in increasing `g`, each partial starting at +0; the 8 partials are
//! then added as `((p0+p4) + (p2+p6)) + ((p1+p5) + (p3+p7))`, and the total divided by `s`.
//! Vector paths also add `x · 0` for the lanes of padding groups and, at groups of 128, for
//! the half of the vector a chunk does not fill; those are ±0 and change no partial (a
//! partial is never −0: it starts at +0, and a sum of two finite values that cancel is
//! +0). Group dots are exact integers (`|dot| ≤ 2·128·128`, exact in f32).
//!
//! **The layout** ([`position`]): rows of a group-scaled [`TernaryMatrix`] are chunks of 512
//! weights (8 subgroups of 64; the last chunk padded with zero trits), 128 bytes each, 2 bits
//! (the code `trit + 1`) a weight. Byte `32m + 4l + e` of a chunk holds, in its bits `2i+1,
//! 2i`, element `64l + 16m + 4i + e` of the chunk. So every 32-bit lane `l` of a vector of
//! codes (`(bytes >> 2i) & 3`, for 32 or 64 bytes) holds four weights of subgroup `l mod 8`:
//! `vpdpbusd` or `vpmaddubsw` + `vpmaddwd` add a chunk's products straight into one lane per
//! subgroup, with no horizontal reduction but one add of two halves. The activations are
//! laid out to match once per product ([`GroupActs`]). Groups of 128 are two subgroups, added
//! as integers before their scale.
//!
//! Paths: AVX-512 VNNI (`avx512.rs`), AVX2 (`avx2.rs`), NEON (`neon.rs`), each in the
//! row × token register tiles of the per-tensor kernels (`tiles.rs`), and the scalar reference
//! below.

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

/// Weights of one chunk of the layout (8 subgroups of 64).
pub const CHUNK_WEIGHTS: usize = 512;
/// Packed bytes of one chunk.
const CHUNK_BYTES: usize = CHUNK_WEIGHTS / 4;
/// Partial sums of the fixed order (and groups a vector step takes).
const LANES: usize = 8;

/// Packed bytes of a row of `padded_cols` weights in the group layout.
pub(crate) fn row_bytes(padded_cols: usize) -> usize {
    padded_cols.div_ceil(CHUNK_WEIGHTS) * CHUNK_BYTES
}

/// The byte and the bit shift of weight `k` of a row in the group layout.
pub(crate) fn position(k: usize) -> (usize, u32) {
    let (c, w) = (k / CHUNK_WEIGHTS, k % CHUNK_WEIGHTS);
    let (l, k) = (w / 64, w % 64);
    let (m, i, e) = (k / 16, (k % 16) / 4, k % 4);
    (CHUNK_BYTES * c + 32 * m + 4 * l + e, 2 * i as u32)
}

/// Where activation `k` of a row goes in [`GroupActs`]: the 32 bytes that meet codes field
/// `i` of bytes `32m..32m+32` of a chunk lie at `256·(m/2) + 64i + 32·(m%2)`, so the two
/// halves of a 64-byte vector (`m` = 0, 1 or 2, 3) are contiguous too.
fn act_position(k: usize) -> usize {
    let (c, w) = (k / CHUNK_WEIGHTS, k % CHUNK_WEIGHTS);
    let (l, k) = (w / 64, w % 64);
    let (m, i, e) = (k / 16, (k % 16) / 4, k % 4);
    CHUNK_WEIGHTS * c + 256 * (m / 2) + 64 * i + 32 * (m % 2) + 4 * l + e
}

/// Repacks one row from [`TernaryMatrix`]'s per-tensor layout (`src`, whole 128-weight
/// blocks) into the group layout (`dst`, [`row_bytes`] long; padding weights are 0).
///
/// Bytes `32m + 4l .. +4` of chunk `c` (elements `64l + 16m + 4i + e`) come from block
/// `4c + l/2`, its field `2·(l%2) + m/2`, bytes `16·(m%2) + 4i + e`: a 4 × 4 transpose of
/// 2-bit fields, done on 32-bit words.
pub(crate) fn regroup_row(src: &[u8], dst: &mut [u8]) {
    dst.fill(0x55);
    let blocks = src.len() / 32;
    for (c, out) in dst.chunks_exact_mut(CHUNK_BYTES).enumerate() {
        for l in 0..8 {
            let b = 4 * c + l / 2;
            if b >= blocks {
                continue;
            }
            let block = &src[32 * b..32 * b + 32];
            for m in 0..4 {
                let field = 2 * (l % 2) + m / 2;
                let mut word = 0u32;
                for i in 0..4 {
                    let at = 16 * (m % 2) + 4 * i;
                    let w = u32::from_le_bytes([
                        block[at],
                        block[at + 1],
                        block[at + 2],
                        block[at + 3],
                    ]);
                    word |= ((w >> (2 * field)) & 0x0303_0303) << (2 * i);
                }
                out[32 * m + 4 * l..32 * m + 4 * l + 4].copy_from_slice(&word.to_le_bytes());
            }
        }
    }
}

/// The 8 partial sums added in the fixed order (see the module docs).
fn fold8(p: [f32; LANES]) -> f32 {
    let s = [p[0] + p[4], p[1] + p[5], p[2] + p[6], p[3] + p[7]];
    (s[0] + s[2]) + (s[1] + s[3])
}

/// `Σ_g (dot_g − sums_g) · scale_g` in the fixed order, of one packed row in the group
/// layout and one int8 activation row `q` in natural order (`padded_cols` long); `sums` are
/// the activation row's group sums (padded to 8 groups). The portable path and the
/// reference of the others.
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
            let (b, shift) = position(k);
            dot += ((packed[b] >> shift) & 3) as i32 * x as i32;
        }
        p[g % LANES] += (dot - sums[g]) as f32 * scales.get(g);
    }
    fold8(p)
}

/// The activations of one product in the group layout, with their group sums: made once
/// per product and shared by its tasks. Buffers grow to the largest batch once.
#[derive(Default)]
pub struct GroupActs {
    values: Option<AlignedBytes>,
    sums: Vec<i32>,
    /// Per chunk, 8 lanes in subgroup order: `−Σq` of each group in the lane of its first
    /// subgroup, 0 elsewhere. The vector paths start a chunk's integer sums from it, so
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
        self.row_len = padded.div_ceil(CHUNK_WEIGHTS) * CHUNK_WEIGHTS;
        self.groups = (padded / group).next_multiple_of(LANES);
        self.sums.clear();
        self.sums.resize(n * self.groups, 0);
        for t in 0..n {
            let sums = &mut self.sums[t * self.groups..(t + 1) * self.groups];
            for (x, s) in acts.row(t).chunks_exact(group).zip(sums) {
                *s = x.iter().map(|&v| v as i32).sum();
            }
        }
        let chunks = self.row_len / CHUNK_WEIGHTS;
        self.init.clear();
        self.init.resize(n * chunks * LANES, 0);
        let subgroups_a_group = group / 64;
        for t in 0..n {
            let sums = &self.sums[t * self.groups..(t + 1) * self.groups];
            let init = &mut self.init[t * chunks * LANES..(t + 1) * chunks * LANES];
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
                let at = act_position(k);
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

    /// Row `t`'s activations in the group layout.
    fn row(&self, t: usize) -> &[u8] {
        let values = self.values.as_ref().map_or(&[][..], |v| v.bytes());
        &values[t * self.row_len..(t + 1) * self.row_len]
    }

    /// Row `t`'s group sums (padded with zeros to 8 groups).
    pub fn sums(&self, t: usize) -> &[i32] {
        &self.sums[t * self.groups..(t + 1) * self.groups]
    }

    /// Row `t`'s initial subgroup sums, 8 a chunk (see the field).
    fn init(&self, t: usize) -> &[i32] {
        let n = self.row_len / CHUNK_WEIGHTS * LANES;
        &self.init[t * n..(t + 1) * n]
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
    /// row `w[i]` (group layout, `chunks` chunks), its scales `s[i]` (f16 if `F16`, else f32;
    /// `chunks` × 8 of them at groups of 64, half as many at 128 (`G128`), padded to 8) and
    /// activation row `a[j]` (group layout), whose chunks' integer sums start from `init[j]`
    /// (8 a chunk, [`GroupActs`]).
    ///
    /// # Safety
    /// The CPU has the instruction set; every pointer is valid for those reads.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const WR: usize, const TA: usize, const F16: bool, const G128: bool>(
        w: [*const u8; WR],
        s: [*const u8; WR],
        a: [*const u8; TA],
        init: [*const i32; TA],
        chunks: usize,
    ) -> [[f32; TA]; WR];
}

/// The group product of one matrix with one batch, in the tiles of `T`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
struct Product<'a, T, const F16: bool, const G128: bool> {
    w: &'a TernaryMatrix,
    ga: &'a GroupActs,
    chunks: usize,
    tile: std::marker::PhantomData<T>,
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
impl<T: GroupTile, const F16: bool, const G128: bool> Tiles for Product<'_, T, F16, G128> {
    type Out = f32;

    #[inline(always)]
    unsafe fn tile<const WR: usize, const TA: usize>(
        &self,
        r: [usize; WR],
        t: [usize; TA],
    ) -> [[f32; TA]; WR] {
        let w = r.map(|r| self.w.packed_row(r).as_ptr());
        let s = r.map(|r| match self.w.group_scales_row(r) {
            GroupScalesRow::F16(s) => s.as_ptr().cast::<u8>(),
            GroupScalesRow::F32(s) => s.as_ptr().cast::<u8>(),
        });
        let a = t.map(|t| self.ga.row(t).as_ptr());
        let init = t.map(|t| self.ga.init(t).as_ptr());
        // SAFETY: a packed row is `chunks` chunks, an activation row as long, the initial
        // sums 8 a chunk, and the scales 8 groups a chunk (64) or a pair of chunks (128),
        // checked in `run`; the caller guarantees the instruction set.
        unsafe { T::tile::<WR, TA, F16, G128>(w, s, a, init, self.chunks) }
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
    let chunks = w.padded_cols().div_ceil(CHUNK_WEIGHTS);
    let f16 = matches!(w.group_scales_row(0), GroupScalesRow::F16(_));
    let g128 = w.group() == 128;
    // What the tiles read: whole chunks of weights and activations, 8 scales and sums a
    // chunk (64) or a pair of chunks (128).
    assert_eq!(w.packed_row(0).len(), chunks * CHUNK_BYTES);
    assert_eq!(ga.row_len, chunks * CHUNK_WEIGHTS);
    let per_chunk = if g128 { chunks.div_ceil(2) } else { chunks } * LANES;
    assert!(w.group_scales_row(0).len() >= per_chunk);
    assert_eq!(ga.init.len(), acts.n_rows() * chunks * LANES);
    let (n_tok, act, row) = (acts.n_rows(), ga.row_len, chunks * CHUNK_BYTES);
    macro_rules! go {
        ($f16:literal, $g128:literal) => {{
            let p = Product::<T, $f16, $g128> {
                w,
                ga,
                chunks,
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
