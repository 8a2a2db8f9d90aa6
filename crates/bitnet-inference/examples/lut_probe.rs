//! Probe: would an *exact* lookup-table (LUT) ternary kernel, in the style of T-MAC /
//! bitnet.cpp TL1/TL2 but with no loss, beat the crate's x86 kernels on this CPU?
//!
//! `CARGO_TARGET_DIR=/work/target-lut cargo run --release -p bitnet-inference --example lut_probe [dram]`
//!
//! Four exact LUT kernels live here, each with its own weight layout (repacked once from a
//! [`TernaryMatrix`], not timed) and per-token tables (built on every call and timed). All
//! keep a group's sums `S = Σ t·q` exact: for g = 3, |S| ≤ 384 needs 10 bits, so every
//! table is split into a low-byte and a high-byte table (two lookups), and narrow
//! accumulators are widened before they can overflow (bounds at each kernel).
//!
//! Port facts measured on this CPU (`vpshufb zmm` = 1/cycle ≈ 2.75 GHz): `vpermb zmm`,
//! `vpermw zmm`, `vpshufb zmm` 1/cycle (port 5); `vpermi2b`/`vpermt2b`/`vpermi2w zmm` only
//! 0.5/cycle; `vpdpbusd zmm` ≥ 1.3/cycle; `vpaddw zmm` 2/cycle, `ymm` 3/cycle; `vpshufb ymm`
//! 2/cycle. Shuffles are the LUT's bottleneck; `vpdpbusd` is the crate's.
//!
//! **`lut-vpermb`** (AVX-512 F/BW/VBMI/VNNI; the best one). g = 3; a "set" is two groups (6
//! activations) whose 27 + 27 sums fill one 64-byte table twice over: `lo = S & 31` and
//! `hi = S >> 5` (−12..=11), `S = lo + 32·hi`. Weights: one index byte per 3 weights (2.67
//! bits a weight; the crate's is 2), 32 rows × 2 groups a 64-byte line (byte `2i + j`: row
//! `i`, group `j`). Per line = 64 lookups = **192 weight·token MACs: 1 load, 2 `vpermb`
//! (lo, hi; port 5), 2 `vpaddb` into byte accumulators, and every 8 sets 2 `vpmaddubsw` + 2
//! `vpaddw` (a row's two bytes into int16), every 32 sets 2 `vpmaddwd` + 2 `vpaddd` (int32):
//! ≈ 4.6 vector uops, ~42 MACs/uop, ≤ 96 MACs/cycle (port 5: 2 shuffles), ≈ 85 with the uops
//! spread on ports 0 and 5.** The crate's `avx512vnni`: 2 `vpdpbusd` + 2 `vpandq` + a
//! broadcast load per 128 MACs: 32 MACs/uop, ≤ 64 MACs/cycle on 2 vector ports. Tables: 12
//! uops per 6 activations per token (4 `vpdpbusd` of (q + 128) × constant trits from a
//! constant −128·Σt, packed to bytes): ~2 µs per 2560-wide token measured (≈ 13 cycles a set,
//! twice what the uop count suggests), about one 128-row tile's work.
//!
//! **`lut-tl2`** (same ISA): `lut-vpermb` with TL2's footprint, 1.67 bits a weight. The 27
//! codes of a group are a magnitude index n (0..=13) and a sign, so the tables hold both
//! signs (byte `n + 16·sign + 32j`) and the weights only a nibble and a sign bit a lookup:
//! per set and 128-row tile, two 64-byte nibble lines and four 64-bit sign words. Per 64
//! lookups = 192 MACs: **40 bytes of weights; ≈ 7.1 uops (the 4.6 above plus
//! `vpternlogd` for `(nibble & 15) | 32j`, half a `vpsrlw` for high nibbles, a masked
//! `vpaddb` of 16 for the sign), ~27 MACs/uop**: slower than `avx512vnni` in cache,
//! 17% fewer bytes from memory.
//!
//! **`lut-vbmi`** (AVX-512 F/BW/VBMI/VNNI). g = 3, four groups (12 activations) a 128-slot
//! table, `lo = S & 127`, `hi = S >> 7`; byte `4i + j` of a line = row `i`, group `j`, so
//! `vpdpbusd` adds a row's four lookups into its int32 lane (`Σ lo·1`, `Σ 128·hi`). Per 64
//! lookups = 192 MACs: 1 load + 2 `vpermi2b` + 2 `vpdpbusd`, 48 MACs/uop on paper, but
//! `vpermi2b` issues only every other cycle here: ≤ 48 MACs/cycle. Kept as a data point.
//!
//! **`lut-avx2`** (AVX2). g = 2; of the 9 sums (|S| ≤ 256, int16) the all-zero one needs no
//! slot, because `vpshufb` writes 0 for an index byte with bit 7 set. The other 8 fit one
//! 16-byte table as low bytes (slots 0-7) and high bytes (slots 8-15), so a lookup is an
//! index *pair* `(c, c + 8)` (or `(0x80, 0x80)` for zero weights) and one `vpshufb` of a
//! 16-byte table (broadcast to both lanes) returns 16 exact int16 sums: 16 rows of one
//! group. They are added in int16 (at most 64 groups: `64·256 < 32767`), then widened with
//! `vpmaddwd`. Per 16 lookups = 32 MACs: 1 load + 1 `vpshufb` + 1 `vpaddw` = **2 ALU uops,
//! 16 MACs/uop** (the crate's `avx2`: ~16 uops per 128 MACs, 8 MACs/uop). The price is the
//! layout: 2 bytes per 2 weights, 8 bits a weight (4× the crate's). Expanding a 4-bit code
//! to the pair costs ~1.5 more uops per 16 lookups and erases the gain, so it is not done.
//!
//! All are checked to equal the scalar kernel exactly (random data with −128 and 127
//! planted, all −128 / all 127 / alternating activations against all-+1 and all-−1
//! weights; 1, 2, 3, 17 and 64 tokens; odd shapes), then timed single-threaded against
//! `avx2`, `avxvnni`, `avx512vnni` (and `amx` for prefill) through `kernel_by_name`: each
//! case runs every kernel in turn, 5-7 rounds, best round kept. "no tables" rows reuse the
//! previous call's tables (as q/k/v or gate/up sharing one activation row could). With
//! `dram`, a GEMV also cycles through 128 copies of the matrix (0.5-2 GiB) to defeat the L3.

#[cfg(target_arch = "x86_64")]
mod probe {

    use bitnet_inference::kernels::{
        available_kernels, kernel_by_name, QuantizedActivations, TernaryKernel, TernaryMatrix,
    };
    use std::arch::x86_64::*;
    use std::hint::black_box;
    use std::time::Instant;

    /// One 64-byte aligned cache line: the unit of the LUT layouts and tables.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([u8; 64]);

    const ZERO_LINE: Line = Line([0; 64]);

    fn line_bytes_mut(v: &mut [Line]) -> &mut [u8] {
        // SAFETY: `Line` is `repr(C)` around `[u8; 64]` with no padding, so `v` is
        // `v.len() * 64` initialized contiguous bytes, borrowed mutably for the slice's life.
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 64) }
    }

    /// splitmix64: reproducible random data without an RNG dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn trit(&mut self) -> i8 {
            (self.next() % 3) as i8 - 1
        }
        fn int8(&mut self) -> i8 {
            self.next() as u8 as i8
        }
    }

    /// Trits of a `rows × cols` matrix: `t(r, c)` (0 past `cols`).
    fn matrix(rows: usize, cols: usize, t: impl Fn(usize, usize) -> i8) -> TernaryMatrix {
        TernaryMatrix::from_rows(rows, cols, |r, out| {
            for (c, v) in out.iter_mut().enumerate() {
                *v = t(r, c);
            }
            Ok(1.0)
        })
        .expect("valid trits")
    }

    fn random_matrix(rows: usize, cols: usize, seed: u64) -> TernaryMatrix {
        let mut rng = Rng(seed);
        let trits: Vec<i8> = (0..rows * cols).map(|_| rng.trit()).collect();
        matrix(rows, cols, |r, c| trits[r * cols + c])
    }

    fn random_acts(n: usize, cols: usize, seed: u64) -> QuantizedActivations {
        let mut rng = Rng(seed);
        let q: Vec<i8> = (0..n * cols).map(|_| rng.int8()).collect();
        QuantizedActivations::from_int8(&q, n, cols, 1.0)
    }

    /// A trit of `m`, 0 in the padding (and past it).
    fn trit_or_zero(m: &TernaryMatrix, r: usize, c: usize) -> i8 {
        if r < m.rows() && c < m.padded_cols() {
            m.trit(r, c)
        } else {
            0
        }
    }

    // ---------------------------------------------------------------------------------------
    // lut-vbmi: g = 3, 4 groups a 128-slot table, vpermi2b + vpdpbusd.

    /// Activations of one table set (four groups of three).
    const SET: usize = 12;
    /// 16-row blocks of a tile (one zmm accumulator each): 128 rows.
    const V_BLOCKS: usize = 8;
    const V_TILE: usize = 16 * V_BLOCKS;
    /// Table sets a GEMM pass takes (index lines of a tile stay in L1 across the tokens).
    const V_SET_CHUNK: usize = 32;
    /// Tokens whose tables are built and held (in L2) at once.
    const TOKEN_CHUNK: usize = 16;

    struct VbmiLut {
        rows: usize,
        padded_cols: usize,
        sets: usize,
        tiles: usize,
        /// `[tile][set][block]` lines; byte `4i + j` of a line is `32j + code` of row
        /// `tile·128 + block·16 + i`, group `j` of the set.
        idx: Vec<Line>,
    }

    impl VbmiLut {
        fn new(m: &TernaryMatrix) -> Self {
            let sets = m.padded_cols().div_ceil(SET);
            let tiles = m.rows().div_ceil(V_TILE);
            let mut idx = vec![ZERO_LINE; tiles * sets * V_BLOCKS];
            for tile in 0..tiles {
                for s in 0..sets {
                    for b in 0..V_BLOCKS {
                        let line = &mut idx[(tile * sets + s) * V_BLOCKS + b].0;
                        for i in 0..16 {
                            let r = tile * V_TILE + b * 16 + i;
                            for j in 0..4 {
                                let code: usize = (0..3)
                                    .map(|k| {
                                        let t = trit_or_zero(m, r, s * SET + 3 * j + k);
                                        (t + 1) as usize * [1, 3, 9][k]
                                    })
                                    .sum();
                                line[4 * i + j] = (32 * j + code) as u8;
                            }
                        }
                    }
                }
            }
            Self {
                rows: m.rows(),
                padded_cols: m.padded_cols(),
                sets,
                tiles,
                idx,
            }
        }

        fn bytes(&self) -> usize {
            self.idx.len() * 64
        }
    }

    fn has_vbmi() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vbmi")
            && is_x86_feature_detected!("avx512vnni")
    }

    /// Builds the tables of one token: 4 lines a set (lo of groups 0-1, lo of 2-3, hi of 0-1,
    /// hi of 2-3). `q` holds at least `sets * 12` activations (zeros past the row).
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    fn vbmi_tables(q: &[i8], sets: usize, out: &mut [Line]) {
        assert!(q.len() >= sets * SET && out.len() >= sets * 4);
        // T_m[code] = trit m of `code` (lanes 27-31 unused: 0).
        let mut t = [[0i16; 32]; 3];
        for (m, row) in t.iter_mut().enumerate() {
            for (code, v) in row.iter_mut().take(27).enumerate() {
                *v = (code / [1, 3, 9][m] % 3) as i16 - 1;
            }
        }
        // SAFETY: each `t[m]` is 64 readable bytes; unaligned loads.
        let tv = t.map(|row| unsafe { _mm512_loadu_si512(row.as_ptr().cast()) });
        // Bytes 0, 2, .., 62 of `a` then of `b`: the low bytes of 32 + 32 int16 lanes.
        let mut ev = [0u8; 64];
        for (k, e) in ev.iter_mut().enumerate() {
            *e = if k < 32 { 2 * k } else { 64 + 2 * (k - 32) } as u8;
        }
        // SAFETY: `ev` is 64 readable bytes.
        let evens = unsafe { _mm512_loadu_si512(ev.as_ptr().cast()) };
        let low7 = _mm512_set1_epi8(0x7f);
        for s in 0..sets {
            let g = &q[s * SET..s * SET + SET];
            // S_j[code] = Σ_m T_m[code] · q[3j + m], exact in int16 (|S| ≤ 384).
            let sum = |j: usize| {
                let b = |m: usize| _mm512_set1_epi16(g[3 * j + m] as i16);
                _mm512_add_epi16(
                    _mm512_add_epi16(
                        _mm512_mullo_epi16(tv[0], b(0)),
                        _mm512_mullo_epi16(tv[1], b(1)),
                    ),
                    _mm512_mullo_epi16(tv[2], b(2)),
                )
            };
            let sj = [sum(0), sum(1), sum(2), sum(3)];
            let hi = sj.map(|v| _mm512_srai_epi16::<7>(v));
            let lines = [
                _mm512_and_si512(_mm512_permutex2var_epi8(sj[0], evens, sj[1]), low7),
                _mm512_and_si512(_mm512_permutex2var_epi8(sj[2], evens, sj[3]), low7),
                _mm512_permutex2var_epi8(hi[0], evens, hi[1]),
                _mm512_permutex2var_epi8(hi[2], evens, hi[3]),
            ];
            for (k, v) in lines.into_iter().enumerate() {
                // SAFETY: out[4s + k] exists (asserted above) and is a 64-byte aligned line.
                unsafe { _mm512_store_si512((&mut out[4 * s + k] as *mut Line).cast(), v) };
            }
        }
    }

    /// `acc[b] += Σ` over `nsets` sets of one tile's index lines (`idx`, `nsets * 8` lines) with
    /// one token's tables (`tab`, `nsets * 4` lines).
    ///
    /// # Safety
    /// AVX-512 F/BW/VBMI/VNNI must be present; `idx` and `tab` must be valid for those reads.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni")]
    unsafe fn vbmi_tile(
        idx: *const Line,
        tab: *const Line,
        nsets: usize,
        mut acc: [__m512i; V_BLOCKS],
    ) -> [__m512i; V_BLOCKS] {
        let ones = _mm512_set1_epi8(1);
        let c128 = _mm512_set1_epi8(-128); // read as the unsigned 128 by vpdpbusd
        for s in 0..nsets {
            // SAFETY: s < nsets, so lines 4s..4s+4 of `tab` are in bounds (caller).
            let (tl0, tl1, th0, th1) = unsafe {
                let t = tab.add(4 * s).cast::<__m512i>();
                (
                    _mm512_load_si512(t),
                    _mm512_load_si512(t.add(1)),
                    _mm512_load_si512(t.add(2)),
                    _mm512_load_si512(t.add(3)),
                )
            };
            for (b, a) in acc.iter_mut().enumerate() {
                let p = idx.wrapping_add(s * V_BLOCKS + b);
                // A hint only: never faults, even past the end.
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(32).cast());
                // SAFETY: line s·8 + b < nsets·8 is in bounds (caller).
                let x = unsafe { _mm512_load_si512(p.cast()) };
                let lo = _mm512_permutex2var_epi8(tl0, x, tl1);
                let hi = _mm512_permutex2var_epi8(th0, x, th1);
                *a = _mm512_dpbusd_epi32(*a, lo, ones);
                *a = _mm512_dpbusd_epi32(*a, c128, hi);
            }
        }
        acc
    }

    /// Scratch of the LUT kernels: per-token tables and zero-padded activations.
    #[derive(Default)]
    struct Scratch {
        tables: Vec<Line>,
        table_bytes: Vec<u8>,
        q: Vec<i8>,
        qu: Vec<u8>,
        acc: Vec<Line>,
        partial: Vec<i32>,
        /// Keep the tables of the previous call (same activations): what a layer gets when
        /// several matrices (q/k/v, gate/up) share one activation row. Only for a diagnostic.
        reuse: bool,
    }

    /// `out[t·rows + r] = Σ_k trit[r][k]·q[t][k]` for every token of `acts`, tables included.
    fn vbmi_matmul(lut: &VbmiLut, acts: &QuantizedActivations, out: &mut [i32], sc: &mut Scratch) {
        assert!(has_vbmi(), "lut-vbmi needs AVX-512 VBMI and VNNI");
        assert_eq!(acts.padded_cols(), lut.padded_cols);
        let n = acts.n_rows();
        let (sets, rows) = (lut.sets, lut.rows);
        assert!(out.len() >= n * rows);
        let width = sets * SET;
        let per_tok = sets * 4;
        // SAFETY: AVX-512 F was asserted above.
        let zero = [unsafe { _mm512_setzero_si512() }; V_BLOCKS];
        let mut lanes = [0i32; V_TILE];
        let store = |acc: &[__m512i; V_BLOCKS], lanes: &mut [i32; V_TILE]| {
            for (b, a) in acc.iter().enumerate() {
                // SAFETY: lanes[16b..16b+16] is 64 writable bytes; unaligned store.
                unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().add(16 * b).cast(), *a) };
            }
        };
        for t0 in (0..n).step_by(TOKEN_CHUNK) {
            let tn = TOKEN_CHUNK.min(n - t0);
            sc.tables.resize(tn * per_tok, ZERO_LINE);
            sc.q.resize(width, 0);
            for k in (0..tn).filter(|_| !sc.reuse) {
                let row = acts.row(t0 + k);
                sc.q[..row.len()].copy_from_slice(row);
                sc.q[row.len()..].fill(0);
                // SAFETY: has_vbmi() was asserted above.
                unsafe { vbmi_tables(&sc.q, sets, &mut sc.tables[k * per_tok..]) };
            }
            if tn == 1 {
                // Decode: every tile meets all the sets in one pass.
                for tile in 0..lut.tiles {
                    // SAFETY: features asserted; the tile's lines are tile·sets·8 .. +sets·8 of
                    // `idx`, and the token's tables its sets·4 lines.
                    let acc = unsafe {
                        vbmi_tile(
                            lut.idx.as_ptr().add(tile * sets * V_BLOCKS),
                            sc.tables.as_ptr(),
                            sets,
                            zero,
                        )
                    };
                    store(&acc, &mut lanes);
                    let r0 = tile * V_TILE;
                    let m = V_TILE.min(rows - r0);
                    out[t0 * rows + r0..t0 * rows + r0 + m].copy_from_slice(&lanes[..m]);
                }
                continue;
            }
            // Prefill: chunks of sets, so a tile's index lines stay in L1 across the tokens;
            // partial sums in `partial[token][padded row]`.
            let prow = lut.tiles * V_TILE;
            sc.partial.clear();
            sc.partial.resize(tn * prow, 0);
            for s0 in (0..sets).step_by(V_SET_CHUNK) {
                let ns = V_SET_CHUNK.min(sets - s0);
                for tile in 0..lut.tiles {
                    for k in 0..tn {
                        let part = &mut sc.partial[k * prow + tile * V_TILE..][..V_TILE];
                        let mut acc = zero;
                        for (b, a) in acc.iter_mut().enumerate() {
                            // SAFETY: part[16b..16b+16] is 64 readable bytes.
                            *a = unsafe { _mm512_loadu_si512(part.as_ptr().add(16 * b).cast()) };
                        }
                        // SAFETY: features asserted; lines (tile·sets + s0)·8 .. +ns·8 of `idx`
                        // and s0·4 .. +ns·4 of token k's tables are in bounds.
                        let acc = unsafe {
                            vbmi_tile(
                                lut.idx.as_ptr().add((tile * sets + s0) * V_BLOCKS),
                                sc.tables.as_ptr().add(k * per_tok + s0 * 4),
                                ns,
                                acc,
                            )
                        };
                        store(&acc, &mut lanes);
                        part.copy_from_slice(&lanes);
                    }
                }
            }
            for k in 0..tn {
                out[(t0 + k) * rows..(t0 + k + 1) * rows]
                    .copy_from_slice(&sc.partial[k * prow..k * prow + rows]);
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // lut-vpermb: g = 3, 2 groups a 64-slot table, vpermb + vpmaddubsw/vpaddb.

    /// Activations of one vpermb table set (two groups of three).
    const PSET: usize = 6;
    /// 32-row blocks of a tile: 128 rows.
    const P_BLOCKS: usize = 4;
    const P_TILE: usize = 32 * P_BLOCKS;
    /// Sets added in byte accumulators before they go to int16 ones, and sets added in those
    /// before int32 (see [`pb_tile`]).
    const P_NARROW: usize = 8;
    const P_WIDEN: usize = 32;
    const P_SET_CHUNK: usize = 64;

    /// Where the tables keep code `c` of group `j`: [`pb_tables`]' `k`-th `vpdpbusd` result
    /// (`k = 2j + c / 16`) has code `c` in dword `d = c % 16 = 4L + x`, which its packs leave at
    /// byte `16L + 8(k / 2) + 4(k % 2) + x`.
    fn pb_slot(j: usize, c: usize) -> u8 {
        let (l, x) = (c % 16 / 4, c % 4);
        (16 * l + 8 * j + 4 * (c / 16) + x) as u8
    }

    struct PermbLut {
        rows: usize,
        padded_cols: usize,
        sets: usize,
        tiles: usize,
        /// `[tile][set][block]` lines; byte `2i + j` is `pb_slot(j, code)` of row
        /// `tile·128 + block·32 + i`, group `j` of the set.
        idx: Vec<Line>,
    }

    impl PermbLut {
        fn new(m: &TernaryMatrix) -> Self {
            let sets = m.padded_cols().div_ceil(PSET);
            let tiles = m.rows().div_ceil(P_TILE);
            let mut idx = vec![ZERO_LINE; tiles * sets * P_BLOCKS];
            for tile in 0..tiles {
                for s in 0..sets {
                    for b in 0..P_BLOCKS {
                        let line = &mut idx[(tile * sets + s) * P_BLOCKS + b].0;
                        for i in 0..32 {
                            let r = tile * P_TILE + b * 32 + i;
                            for j in 0..2 {
                                let code: usize = (0..3)
                                    .map(|k| {
                                        let t = trit_or_zero(m, r, s * PSET + 3 * j + k);
                                        (t + 1) as usize * [1, 3, 9][k]
                                    })
                                    .sum();
                                line[2 * i + j] = pb_slot(j, code);
                            }
                        }
                    }
                }
            }
            Self {
                rows: m.rows(),
                padded_cols: m.padded_cols(),
                sets,
                tiles,
                idx,
            }
        }

        fn bytes(&self) -> usize {
            self.idx.len() * 64
        }
    }

    /// Builds the tables of one token: 2 lines a set, `lo = S & 31` then `hi = S >> 5` of the
    /// sums `S = Σ t·q` (−384..=381), at [`pb_slot`]. `qu` holds the activations plus 128 (as
    /// unsigned bytes; 128 past the row), at least `sets * 6 + 1` of them.
    ///
    /// Per set: 2 dword broadcast loads (a group's 3 activations and one more, which meets a zero
    /// trit), 4 `vpdpbusd` (activations + 128 × constant trits, from the constant `−128·Σt`: the
    /// 64 exact sums in int32), 2 `vpackssdw`, 2 `vpand`, 2 `vpsraw`, `vpackuswb` +
    /// `vpacksswb`: 12 uops.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn pb_tables(qu: &[u8], sets: usize, out: &mut [Line]) {
        assert!(qu.len() > sets * PSET && out.len() >= sets * 2);
        // Dword d of trits[k]: code 16(k % 2) + d of group k / 2 as (t0, t1, t2, 0); bias[k]:
        // its −128·(t0 + t1 + t2).
        let mut trits = [[0i8; 64]; 4];
        let mut bias = [[0i32; 16]; 4];
        for k in 0..4 {
            for d in 0..16 {
                let c = 16 * (k % 2) + d;
                if c < 27 {
                    let t = [(c % 3) as i8 - 1, (c / 3 % 3) as i8 - 1, (c / 9) as i8 - 1];
                    trits[k][4 * d..4 * d + 3].copy_from_slice(&t);
                    bias[k][d] = -128 * t.iter().map(|&v| v as i32).sum::<i32>();
                }
            }
        }
        // SAFETY: each row of `trits` and `bias` is 64 readable bytes; unaligned loads.
        let (tv, bv) = unsafe {
            (
                trits.map(|row| _mm512_loadu_si512(row.as_ptr().cast())),
                bias.map(|row| _mm512_loadu_si512(row.as_ptr().cast())),
            )
        };
        let low5 = _mm512_set1_epi16(31);
        for s in 0..sets {
            let dword = |at: usize| {
                let b: [u8; 4] = qu[at..at + 4].try_into().expect("4 bytes");
                _mm512_set1_epi32(i32::from_le_bytes(b))
            };
            let (b0, b1) = (dword(s * PSET), dword(s * PSET + 3));
            // Σ (q + 128)·t − 128·Σ t = Σ t·q, exact (|·| ≤ 384).
            let d = [
                _mm512_dpbusd_epi32(bv[0], b0, tv[0]),
                _mm512_dpbusd_epi32(bv[1], b0, tv[1]),
                _mm512_dpbusd_epi32(bv[2], b1, tv[2]),
                _mm512_dpbusd_epi32(bv[3], b1, tv[3]),
            ];
            // |S| ≤ 384: the word packs never saturate, nor do lo (0..=31) and hi (−12..=11).
            let w01 = _mm512_packs_epi32(d[0], d[1]);
            let w23 = _mm512_packs_epi32(d[2], d[3]);
            let lo = _mm512_packus_epi16(_mm512_and_si512(w01, low5), _mm512_and_si512(w23, low5));
            let hi = _mm512_packs_epi16(_mm512_srai_epi16::<5>(w01), _mm512_srai_epi16::<5>(w23));
            // SAFETY: out[2s], out[2s + 1] exist (asserted above) and are 64-byte aligned lines.
            unsafe {
                _mm512_store_si512((&mut out[2 * s] as *mut Line).cast(), lo);
                _mm512_store_si512((&mut out[2 * s + 1] as *mut Line).cast(), hi);
            }
        }
    }

    /// `acc += Σ` over `nsets` sets of one tile's index lines (`idx`, `nsets * 4` lines) with
    /// one token's tables (`tab`, `nsets * 2` lines); `acc[b][0]` holds block `b`'s even rows,
    /// `acc[b][1]` its odd ones.
    ///
    /// Exactness (S = lo + 32·hi, lo in 0..=31, hi in −12..=11): `vpaddb` adds at most
    /// [`P_NARROW`] = 8 lookups per byte, so a lo byte stays in 0..=248 (unsigned) and a hi byte
    /// in −96..=88. Then `vpmaddubsw(lo, 1) + vpmaddubsw(32, hi)` adds a row's two bytes (groups
    /// A and B): |·| ≤ 2·248 + 32·2·96 = 6640, and at most 4 such rounds ([`P_WIDEN`] = 32 sets)
    /// go into an int16 word: ≤ 26560 < 32767. `vpmaddwd` by (1, 0) / (0, 1) then sign-extends
    /// even / odd rows into int32.
    ///
    /// # Safety
    /// AVX-512 F/BW/VBMI must be present; `idx` and `tab` must be valid for those reads.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn pb_tile(
        idx: *const Line,
        tab: *const Line,
        nsets: usize,
        mut acc: [[__m512i; 2]; P_BLOCKS],
    ) -> [[__m512i; 2]; P_BLOCKS] {
        let ones = _mm512_set1_epi8(1);
        let c32 = _mm512_set1_epi8(32);
        let even = _mm512_set1_epi32(1);
        let odd = _mm512_set1_epi32(1 << 16);
        let mut s = 0;
        while s < nsets {
            let wide_end = (s + P_WIDEN).min(nsets);
            let mut w16 = [_mm512_setzero_si512(); P_BLOCKS];
            while s < wide_end {
                let end = (s + P_NARROW).min(wide_end);
                let mut lo8 = [_mm512_setzero_si512(); P_BLOCKS];
                let mut hi8 = [_mm512_setzero_si512(); P_BLOCKS];
                while s < end {
                    // SAFETY: s < nsets: lines 2s, 2s + 1 of `tab` are in bounds (caller).
                    let (tl, th) = unsafe {
                        let t = tab.add(2 * s).cast::<__m512i>();
                        (_mm512_load_si512(t), _mm512_load_si512(t.add(1)))
                    };
                    for b in 0..P_BLOCKS {
                        let p = idx.wrapping_add(s * P_BLOCKS + b);
                        // A hint only: never faults, even past the end.
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(32).cast());
                        // SAFETY: line 4s + b < 4·nsets is in bounds (caller).
                        let x = unsafe { _mm512_load_si512(p.cast()) };
                        lo8[b] = _mm512_add_epi8(lo8[b], _mm512_permutexvar_epi8(x, tl));
                        hi8[b] = _mm512_add_epi8(hi8[b], _mm512_permutexvar_epi8(x, th));
                    }
                    s += 1;
                }
                for b in 0..P_BLOCKS {
                    let lo = _mm512_maddubs_epi16(lo8[b], ones);
                    let hi = _mm512_maddubs_epi16(c32, hi8[b]);
                    w16[b] = _mm512_add_epi16(w16[b], _mm512_add_epi16(lo, hi));
                }
            }
            for b in 0..P_BLOCKS {
                acc[b][0] = _mm512_add_epi32(acc[b][0], _mm512_madd_epi16(w16[b], even));
                acc[b][1] = _mm512_add_epi32(acc[b][1], _mm512_madd_epi16(w16[b], odd));
            }
        }
        acc
    }

    /// Writes a tile's row sums from its accumulators (`acc`, 8 lines: lane `i` of line
    /// `2b + parity` is row `32b + 2i + parity`) to `out` (the tile's rows, up to 128).
    fn pb_rows(acc: &[Line], out: &mut [i32]) {
        for (l, line) in acc.iter().enumerate() {
            let (b, parity) = (l / 2, l % 2);
            for (i, lane) in line.0.chunks_exact(4).enumerate() {
                if let Some(o) = out.get_mut(32 * b + 2 * i + parity) {
                    *o = i32::from_le_bytes([lane[0], lane[1], lane[2], lane[3]]);
                }
            }
        }
    }

    /// `out[t·rows + r] = Σ_k trit[r][k]·q[t][k]` for every token of `acts`, tables included.
    fn pb_matmul(lut: &PermbLut, acts: &QuantizedActivations, out: &mut [i32], sc: &mut Scratch) {
        assert!(has_vbmi(), "lut-vpermb needs AVX-512 VBMI and VNNI");
        assert_eq!(acts.padded_cols(), lut.padded_cols);
        let n = acts.n_rows();
        let (sets, rows) = (lut.sets, lut.rows);
        assert!(out.len() >= n * rows);
        let per_tok = sets * 2;
        let tile_lines = 2 * P_BLOCKS;
        for t0 in (0..n).step_by(TOKEN_CHUNK) {
            let tn = TOKEN_CHUNK.min(n - t0);
            sc.tables.resize(tn * per_tok, ZERO_LINE);
            for k in (0..tn).filter(|_| !sc.reuse) {
                let row = acts.row(t0 + k);
                sc.qu.clear();
                sc.qu.extend(row.iter().map(|&v| (v as u8) ^ 0x80));
                sc.qu.resize(sets * PSET + 8, 0x80);
                // SAFETY: has_vbmi() asserted AVX-512 F/BW/VNNI.
                unsafe { pb_tables(&sc.qu, sets, &mut sc.tables[k * per_tok..]) };
            }
            // Accumulators of every (token, tile): `[token][tile]` groups of 8 lines.
            sc.acc.clear();
            sc.acc.resize(tn * lut.tiles * tile_lines, ZERO_LINE);
            // One token: each tile meets every set in one pass. More: chunks of sets, so a
            // tile's index lines stay in L1 while every token of the chunk passes over them.
            let chunk = if tn == 1 { sets } else { P_SET_CHUNK };
            for s0 in (0..sets).step_by(chunk) {
                let ns = chunk.min(sets - s0);
                for tile in 0..lut.tiles {
                    for k in 0..tn {
                        let a = &mut sc.acc[(k * lut.tiles + tile) * tile_lines..][..tile_lines];
                        // SAFETY: features asserted; lines (tile·sets + s0)·4 .. +ns·4 of `idx`,
                        // s0·2 .. +ns·2 of token k's tables and the 8 lines of `a` are in bounds.
                        unsafe {
                            let p = a.as_mut_ptr().cast::<__m512i>();
                            let mut acc = [[_mm512_setzero_si512(); 2]; P_BLOCKS];
                            for (b, pair) in acc.iter_mut().enumerate() {
                                *pair = [
                                    _mm512_load_si512(p.add(2 * b)),
                                    _mm512_load_si512(p.add(2 * b + 1)),
                                ];
                            }
                            let acc = pb_tile(
                                lut.idx.as_ptr().add((tile * sets + s0) * P_BLOCKS),
                                sc.tables.as_ptr().add(k * per_tok + s0 * 2),
                                ns,
                                acc,
                            );
                            for (b, pair) in acc.iter().enumerate() {
                                _mm512_store_si512(p.add(2 * b), pair[0]);
                                _mm512_store_si512(p.add(2 * b + 1), pair[1]);
                            }
                        };
                    }
                }
            }
            for k in 0..tn {
                let o = &mut out[(t0 + k) * rows..(t0 + k + 1) * rows];
                for (tile, o) in o.chunks_mut(P_TILE).enumerate() {
                    pb_rows(
                        &sc.acc[(k * lut.tiles + tile) * tile_lines..][..tile_lines],
                        o,
                    );
                }
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // lut-tl2: lut-vpermb with a sign-folded 5-bit index stored as a nibble + a sign bit
    // (1.67 bits a weight, TL2's footprint).

    /// A tile's data per set: nibble lines (blocks 0|1 and 2|3) and one sign word per block.
    struct Tl2Lut {
        rows: usize,
        padded_cols: usize,
        sets: usize,
        tiles: usize,
        /// `[tile][set][2]` lines: low nibble of byte `p` = block `2h`'s lookup `p`, high nibble
        /// block `2h + 1`'s; lookup `2i + j` = row `i`, group `j`.
        nib: Vec<Line>,
        /// `[tile][set][block]`: bit `p` = sign of lookup `p`.
        sign: Vec<u64>,
    }

    /// The magnitude index `n` (0..=13) and sign of a group's code `c` (0..=26; 13 is zero,
    /// `26 − c` the negation).
    fn tl2_split(c: usize) -> (u8, bool) {
        if c >= 13 {
            ((c - 13) as u8, false)
        } else {
            ((13 - c) as u8, true)
        }
    }

    impl Tl2Lut {
        fn new(m: &TernaryMatrix) -> Self {
            let sets = m.padded_cols().div_ceil(PSET);
            let tiles = m.rows().div_ceil(P_TILE);
            let mut nib = vec![ZERO_LINE; tiles * sets * 2];
            let mut sign = vec![0u64; tiles * sets * P_BLOCKS];
            for tile in 0..tiles {
                for s in 0..sets {
                    for b in 0..P_BLOCKS {
                        for p in 0..64 {
                            let (i, j) = (p / 2, p % 2);
                            let r = tile * P_TILE + b * 32 + i;
                            let code: usize = (0..3)
                                .map(|k| {
                                    let t = trit_or_zero(m, r, s * PSET + 3 * j + k);
                                    (t + 1) as usize * [1, 3, 9][k]
                                })
                                .sum();
                            let (n, neg) = tl2_split(code);
                            nib[(tile * sets + s) * 2 + b / 2].0[p] |= n << (4 * (b % 2));
                            sign[(tile * sets + s) * P_BLOCKS + b] |= (neg as u64) << p;
                        }
                    }
                }
            }
            Self {
                rows: m.rows(),
                padded_cols: m.padded_cols(),
                sets,
                tiles,
                nib,
                sign,
            }
        }

        fn bytes(&self) -> usize {
            self.nib.len() * 64 + self.sign.len() * 8
        }
    }

    /// Builds the tables of one token: 2 lines a set (`lo = S & 31`, `hi = S >> 5`), byte
    /// `n + 16·sign + 32j` holding the sum of group `j`'s code with magnitude index `n` and that
    /// sign ([`tl2_split`]). `qu` as for [`pb_tables`]. The `k`-th `vpdpbusd` computes `n` in
    /// `4k..4k+4` for all four (sign, group) pairs, one per 128-bit lane (the activations of
    /// group 0 in lanes 0-1, group 1 in lanes 2-3), and the packs put dword `4L + x` of it at byte
    /// `16L + n`. 13 uops a set.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn tl2_tables(qu: &[u8], sets: usize, out: &mut [Line]) {
        assert!(qu.len() > sets * PSET && out.len() >= sets * 2);
        let mut trits = [[0i8; 64]; 4];
        let mut bias = [[0i32; 16]; 4];
        for k in 0..4 {
            for d in 0..16 {
                let (lane, n) = (d / 4, 4 * k + d % 4);
                if n <= 13 {
                    let c = if lane % 2 == 0 { 13 + n } else { 13 - n };
                    let t = [(c % 3) as i8 - 1, (c / 3 % 3) as i8 - 1, (c / 9) as i8 - 1];
                    trits[k][4 * d..4 * d + 3].copy_from_slice(&t);
                    bias[k][d] = -128 * t.iter().map(|&v| v as i32).sum::<i32>();
                }
            }
        }
        // SAFETY: each row of `trits` and `bias` is 64 readable bytes; unaligned loads.
        let (tv, bv) = unsafe {
            (
                trits.map(|row| _mm512_loadu_si512(row.as_ptr().cast())),
                bias.map(|row| _mm512_loadu_si512(row.as_ptr().cast())),
            )
        };
        let low5 = _mm512_set1_epi16(31);
        for s in 0..sets {
            let dword = |at: usize| {
                let b: [u8; 4] = qu[at..at + 4].try_into().expect("4 bytes");
                _mm512_set1_epi32(i32::from_le_bytes(b))
            };
            // Group 0's activations in lanes 0-1 (dwords 0-7), group 1's in lanes 2-3.
            let b = _mm512_mask_blend_epi32(0xff00, dword(s * PSET), dword(s * PSET + 3));
            // Σ (q + 128)·t − 128·Σ t = Σ t·q, exact (|·| ≤ 384).
            let d = [0, 1, 2, 3].map(|k| _mm512_dpbusd_epi32(bv[k], b, tv[k]));
            let w01 = _mm512_packs_epi32(d[0], d[1]);
            let w23 = _mm512_packs_epi32(d[2], d[3]);
            let lo = _mm512_packus_epi16(_mm512_and_si512(w01, low5), _mm512_and_si512(w23, low5));
            let hi = _mm512_packs_epi16(_mm512_srai_epi16::<5>(w01), _mm512_srai_epi16::<5>(w23));
            // SAFETY: out[2s], out[2s + 1] exist (asserted above) and are 64-byte aligned lines.
            unsafe {
                _mm512_store_si512((&mut out[2 * s] as *mut Line).cast(), lo);
                _mm512_store_si512((&mut out[2 * s + 1] as *mut Line).cast(), hi);
            }
        }
    }

    /// [`pb_tile`] on the 1.67-bit layout: per set, the four index vectors are rebuilt from two
    /// nibble lines and four sign words: `(nibble & 15) | 32j` (one `vpternlogd`, after a
    /// `vpsrlw` for high nibbles) and `+ 16` where the sign bit is set (one masked `vpaddb`).
    /// Same accumulation and bounds as [`pb_tile`].
    ///
    /// # Safety
    /// AVX-512 F/BW/VBMI must be present; `nib`, `sign` and `tab` must be valid for `nsets`
    /// sets (2 lines, 4 words, 2 lines a set).
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn tl2_tile(
        nib: *const Line,
        sign: *const u64,
        tab: *const Line,
        nsets: usize,
        mut acc: [[__m512i; 2]; P_BLOCKS],
    ) -> [[__m512i; 2]; P_BLOCKS] {
        let ones = _mm512_set1_epi8(1);
        let c32 = _mm512_set1_epi8(32);
        let c16 = _mm512_set1_epi8(16);
        let low4 = _mm512_set1_epi8(15);
        let group = _mm512_set1_epi16(32 << 8); // 32 in odd bytes (group 1)
        let even = _mm512_set1_epi32(1);
        let odd = _mm512_set1_epi32(1 << 16);
        let mut s = 0;
        while s < nsets {
            let wide_end = (s + P_WIDEN).min(nsets);
            let mut w16 = [_mm512_setzero_si512(); P_BLOCKS];
            while s < wide_end {
                let end = (s + P_NARROW).min(wide_end);
                let mut lo8 = [_mm512_setzero_si512(); P_BLOCKS];
                let mut hi8 = [_mm512_setzero_si512(); P_BLOCKS];
                while s < end {
                    // SAFETY: s < nsets: lines 2s, 2s + 1 of `tab` and `nib`, words 4s..4s+4 of
                    // `sign` are in bounds (caller).
                    let (tl, th, n01, n23, sg) = unsafe {
                        let t = tab.add(2 * s).cast::<__m512i>();
                        let n = nib.add(2 * s).cast::<__m512i>();
                        _mm_prefetch::<_MM_HINT_T0>(nib.wrapping_add(2 * s + 16).cast());
                        _mm_prefetch::<_MM_HINT_T0>(sign.wrapping_add(4 * s + 64).cast());
                        (
                            _mm512_load_si512(t),
                            _mm512_load_si512(t.add(1)),
                            _mm512_load_si512(n),
                            _mm512_load_si512(n.add(1)),
                            std::ptr::read_unaligned(sign.add(4 * s).cast::<[u64; 4]>()),
                        )
                    };
                    let nibbles = [
                        n01,
                        _mm512_srli_epi16::<4>(n01),
                        n23,
                        _mm512_srli_epi16::<4>(n23),
                    ];
                    for b in 0..P_BLOCKS {
                        // (nibble & 15) | 32j
                        let x = _mm512_ternarylogic_epi32::<0xEA>(nibbles[b], low4, group);
                        let x = _mm512_mask_add_epi8(x, sg[b], x, c16);
                        lo8[b] = _mm512_add_epi8(lo8[b], _mm512_permutexvar_epi8(x, tl));
                        hi8[b] = _mm512_add_epi8(hi8[b], _mm512_permutexvar_epi8(x, th));
                    }
                    s += 1;
                }
                for b in 0..P_BLOCKS {
                    let lo = _mm512_maddubs_epi16(lo8[b], ones);
                    let hi = _mm512_maddubs_epi16(c32, hi8[b]);
                    w16[b] = _mm512_add_epi16(w16[b], _mm512_add_epi16(lo, hi));
                }
            }
            for b in 0..P_BLOCKS {
                acc[b][0] = _mm512_add_epi32(acc[b][0], _mm512_madd_epi16(w16[b], even));
                acc[b][1] = _mm512_add_epi32(acc[b][1], _mm512_madd_epi16(w16[b], odd));
            }
        }
        acc
    }

    /// `out[t·rows + r] = Σ_k trit[r][k]·q[t][k]` for every token of `acts`, tables included.
    fn tl2_matmul(lut: &Tl2Lut, acts: &QuantizedActivations, out: &mut [i32], sc: &mut Scratch) {
        assert!(has_vbmi(), "lut-tl2 needs AVX-512 VBMI and VNNI");
        assert_eq!(acts.padded_cols(), lut.padded_cols);
        let n = acts.n_rows();
        let (sets, rows) = (lut.sets, lut.rows);
        assert!(out.len() >= n * rows);
        let per_tok = sets * 2;
        let tile_lines = 2 * P_BLOCKS;
        for t0 in (0..n).step_by(TOKEN_CHUNK) {
            let tn = TOKEN_CHUNK.min(n - t0);
            sc.tables.resize(tn * per_tok, ZERO_LINE);
            for k in (0..tn).filter(|_| !sc.reuse) {
                let row = acts.row(t0 + k);
                sc.qu.clear();
                sc.qu.extend(row.iter().map(|&v| (v as u8) ^ 0x80));
                sc.qu.resize(sets * PSET + 8, 0x80);
                // SAFETY: has_vbmi() asserted AVX-512 F/BW/VNNI.
                unsafe { tl2_tables(&sc.qu, sets, &mut sc.tables[k * per_tok..]) };
            }
            sc.acc.clear();
            sc.acc.resize(tn * lut.tiles * tile_lines, ZERO_LINE);
            let chunk = if tn == 1 { sets } else { P_SET_CHUNK };
            for s0 in (0..sets).step_by(chunk) {
                let ns = chunk.min(sets - s0);
                for tile in 0..lut.tiles {
                    for k in 0..tn {
                        let a = &mut sc.acc[(k * lut.tiles + tile) * tile_lines..][..tile_lines];
                        let at = tile * sets + s0;
                        // SAFETY: features asserted; sets s0..s0+ns of the tile (lines at·2.., words
                        // at·4..), of token k's tables, and the 8 lines of `a` are in bounds.
                        unsafe {
                            let p = a.as_mut_ptr().cast::<__m512i>();
                            let mut acc = [[_mm512_setzero_si512(); 2]; P_BLOCKS];
                            for (b, pair) in acc.iter_mut().enumerate() {
                                *pair = [
                                    _mm512_load_si512(p.add(2 * b)),
                                    _mm512_load_si512(p.add(2 * b + 1)),
                                ];
                            }
                            let acc = tl2_tile(
                                lut.nib.as_ptr().add(at * 2),
                                lut.sign.as_ptr().add(at * P_BLOCKS),
                                sc.tables.as_ptr().add(k * per_tok + s0 * 2),
                                ns,
                                acc,
                            );
                            for (b, pair) in acc.iter().enumerate() {
                                _mm512_store_si512(p.add(2 * b), pair[0]);
                                _mm512_store_si512(p.add(2 * b + 1), pair[1]);
                            }
                        };
                    }
                }
            }
            for k in 0..tn {
                let o = &mut out[(t0 + k) * rows..(t0 + k + 1) * rows];
                for (tile, o) in o.chunks_mut(P_TILE).enumerate() {
                    pb_rows(
                        &sc.acc[(k * lut.tiles + tile) * tile_lines..][..tile_lines],
                        o,
                    );
                }
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // lut-avx2: g = 2, one 16-byte table of lo/hi bytes a group, vpshufb + vpaddw.

    /// 16-row blocks of an AVX2 tile (four int16 and four int32 accumulators): 64 rows.
    const A_BLOCKS: usize = 4;
    const A_TILE: usize = 16 * A_BLOCKS;
    /// Groups added in int16 before widening: 64 · 256 = 16384 ≤ 32767.
    const A_WIDEN: usize = 64;
    /// Groups a GEMM pass takes (a tile's 8 KiB of index lines per 64 groups stay in L1).
    const A_GROUP_CHUNK: usize = 128;

    struct Avx2Lut {
        rows: usize,
        padded_cols: usize,
        groups: usize,
        tiles: usize,
        /// `[tile][group]` pairs of lines: 4 blocks × 32 bytes, byte `2i`, `2i + 1` of a block is
        /// the index pair of row `block·16 + i`.
        idx: Vec<Line>,
    }

    /// Slot of the nonzero pair `(t0, t1)`: its base-3 code `(t0+1) + 3(t1+1)` without the
    /// zero pair's 4.
    fn pair_slot(t0: i8, t1: i8) -> Option<u8> {
        let code = (t0 + 1) as u8 + 3 * (t1 + 1) as u8;
        match code {
            4 => None,
            c if c < 4 => Some(c),
            c => Some(c - 1),
        }
    }

    impl Avx2Lut {
        fn new(m: &TernaryMatrix) -> Self {
            let groups = m.padded_cols() / 2;
            let tiles = m.rows().div_ceil(A_TILE);
            let mut idx = vec![ZERO_LINE; tiles * groups * 2];
            let bytes = line_bytes_mut(&mut idx);
            for tile in 0..tiles {
                for k in 0..groups {
                    let at = (tile * groups + k) * 128;
                    for b in 0..A_BLOCKS {
                        for i in 0..16 {
                            let r = tile * A_TILE + b * 16 + i;
                            let t0 = trit_or_zero(m, r, 2 * k);
                            let t1 = trit_or_zero(m, r, 2 * k + 1);
                            let pair = match pair_slot(t0, t1) {
                                Some(c) => [c, c + 8],
                                None => [0x80, 0x80],
                            };
                            bytes[at + 32 * b + 2 * i..][..2].copy_from_slice(&pair);
                        }
                    }
                }
            }
            Self {
                rows: m.rows(),
                padded_cols: m.padded_cols(),
                groups,
                tiles,
                idx,
            }
        }

        fn bytes(&self) -> usize {
            self.idx.len() * 64
        }
    }

    /// The 16-byte tables of one token, group `k` at bytes `16k..16k+16`: low bytes of the 8
    /// nonzero sums (slot order of [`pair_slot`]), then their high bytes. `q` is `padded_cols`
    /// long (a multiple of 32).
    #[target_feature(enable = "avx2")]
    fn avx2_tables(q: &[i8], out: &mut [u8]) {
        assert!(q.len().is_multiple_of(32) && out.len() >= q.len() * 8);
        // Per lane: words 0..8 → low bytes then high bytes.
        let split = _mm256_setr_epi8(
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3,
            5, 7, 9, 11, 13, 15,
        );
        for (c, chunk) in q.chunks_exact(32).enumerate() {
            // SAFETY: `chunk` is 32 readable bytes.
            let x = unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) };
            // Words of 16 groups (q[2g], q[2g+1]): the even and odd activations, sign-extended.
            let e = _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(x));
            let o = _mm256_srai_epi16::<8>(x);
            let z = _mm256_setzero_si256();
            let neg = |v| _mm256_sub_epi16(z, v);
            // Sums of the slots: (t0, t1) in base-3 order, (0, 0) left out.
            let v = [
                _mm256_sub_epi16(neg(e), o), // (-1,-1)
                neg(o),                      // ( 0,-1)
                _mm256_sub_epi16(e, o),      // ( 1,-1)
                neg(e),                      // (-1, 0)
                e,                           // ( 1, 0)
                _mm256_sub_epi16(o, e),      // (-1, 1)
                o,                           // ( 0, 1)
                _mm256_add_epi16(e, o),      // ( 1, 1)
            ];
            // Transpose 8 vectors × 8 words per lane: group g's 8 sums in one 128-bit lane.
            let a = |i: usize, hi: bool| {
                if hi {
                    _mm256_unpackhi_epi16(v[i], v[i + 1])
                } else {
                    _mm256_unpacklo_epi16(v[i], v[i + 1])
                }
            };
            let (a01l, a01h, a23l, a23h) = (a(0, false), a(0, true), a(2, false), a(2, true));
            let (a45l, a45h, a67l, a67h) = (a(4, false), a(4, true), a(6, false), a(6, true));
            let b = [
                (
                    _mm256_unpacklo_epi32(a01l, a23l),
                    _mm256_unpacklo_epi32(a45l, a67l),
                ), // groups 0, 1
                (
                    _mm256_unpackhi_epi32(a01l, a23l),
                    _mm256_unpackhi_epi32(a45l, a67l),
                ), // 2, 3
                (
                    _mm256_unpacklo_epi32(a01h, a23h),
                    _mm256_unpacklo_epi32(a45h, a67h),
                ), // 4, 5
                (
                    _mm256_unpackhi_epi32(a01h, a23h),
                    _mm256_unpackhi_epi32(a45h, a67h),
                ), // 6, 7
            ];
            let base = c * 16;
            for (p, (x0123, x4567)) in b.into_iter().enumerate() {
                for (h, w) in [
                    _mm256_unpacklo_epi64(x0123, x4567),
                    _mm256_unpackhi_epi64(x0123, x4567),
                ]
                .into_iter()
                .enumerate()
                {
                    let t = _mm256_shuffle_epi8(w, split);
                    let g = base + 2 * p + h; // lane 0: group g; lane 1: group g + 8
                    let (lo, hi) = (&mut out[16 * g..16 * g + 16], 16 * (g + 8));
                    // SAFETY: `lo` is 16 writable bytes, and so is out[hi..hi+16]: g + 8 <
                    // base + 16 ≤ q.len() / 2 groups, and out holds 16 bytes a group.
                    unsafe {
                        _mm_storeu_si128(lo.as_mut_ptr().cast(), _mm256_castsi256_si128(t));
                        _mm_storeu_si128(
                            out[hi..hi + 16].as_mut_ptr().cast(),
                            _mm256_extracti128_si256::<1>(t),
                        );
                    }
                }
            }
        }
    }

    /// `acc[b] += Σ` over `ng` groups of one tile (index lines at `idx`, 2 a group) with one
    /// token's tables (`tab`, 16 bytes a group). `acc[b][0]` gets the even rows of block `b`,
    /// `acc[b][1]` the odd ones (see [`avx2_rows`]).
    ///
    /// # Safety
    /// AVX2 must be present; `idx` and `tab` must be valid for those reads.
    #[target_feature(enable = "avx2")]
    unsafe fn avx2_tile(
        idx: *const Line,
        tab: *const u8,
        ng: usize,
        mut acc: [[__m256i; 2]; A_BLOCKS],
    ) -> [[__m256i; 2]; A_BLOCKS] {
        // vpmaddwd by (1, 0) / (0, 1) sign-extends the even / odd int16 words (rows) to int32.
        let even = _mm256_set1_epi32(1);
        let odd = _mm256_set1_epi32(1 << 16);
        let mut k = 0;
        while k < ng {
            let end = (k + A_WIDEN).min(ng);
            let mut a16 = [_mm256_setzero_si256(); A_BLOCKS];
            while k < end {
                // SAFETY: group k < ng: its 16 table bytes and its two index lines are in bounds.
                let table =
                    unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(tab.add(16 * k).cast())) };
                let p = idx.wrapping_add(2 * k).cast::<__m256i>();
                // Hints only: never fault, even past the end.
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64).cast());
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(66).cast());
                for (b, a) in a16.iter_mut().enumerate() {
                    // SAFETY: as above; block b is bytes 32b..32b+32 of the group's 128 bytes.
                    let x = unsafe { _mm256_load_si256(p.add(b)) };
                    // Exact int16 sums (|S| ≤ 256), at most A_WIDEN of them: no overflow.
                    *a = _mm256_add_epi16(*a, _mm256_shuffle_epi8(table, x));
                }
                k += 1;
            }
            for (a, w) in acc.iter_mut().zip(a16) {
                a[0] = _mm256_add_epi32(a[0], _mm256_madd_epi16(w, even));
                a[1] = _mm256_add_epi32(a[1], _mm256_madd_epi16(w, odd));
            }
        }
        acc
    }

    /// The 64 row sums of a tile from [`avx2_tile`]'s accumulators: int32 lane `l` of block `b`
    /// (`h = l / 4`, `m = l % 4`) is row `16b + 8h + 2m` (even) or that plus one (odd).
    #[target_feature(enable = "avx2")]
    fn avx2_rows(acc: &[[__m256i; 2]; A_BLOCKS]) -> [i32; A_TILE] {
        let mut rows = [0i32; A_TILE];
        for (b, a) in acc.iter().enumerate() {
            for (parity, v) in a.iter().enumerate() {
                let mut l = [0i32; 8];
                // SAFETY: `l` is 32 writable bytes; unaligned store.
                unsafe { _mm256_storeu_si256(l.as_mut_ptr().cast(), *v) };
                for (i, x) in l.into_iter().enumerate() {
                    rows[16 * b + 8 * (i / 4) + 2 * (i % 4) + parity] = x;
                }
            }
        }
        rows
    }

    /// `out[t·rows + r] = Σ_k trit[r][k]·q[t][k]` for every token of `acts`, tables included.
    fn avx2_matmul(lut: &Avx2Lut, acts: &QuantizedActivations, out: &mut [i32], sc: &mut Scratch) {
        assert!(is_x86_feature_detected!("avx2"));
        assert_eq!(acts.padded_cols(), lut.padded_cols);
        let n = acts.n_rows();
        let (groups, rows) = (lut.groups, lut.rows);
        assert!(out.len() >= n * rows);
        let per_tok = groups * 16;
        // SAFETY: AVX2 was asserted above.
        let zero = [[unsafe { _mm256_setzero_si256() }; 2]; A_BLOCKS];
        for t0 in (0..n).step_by(TOKEN_CHUNK) {
            let tn = TOKEN_CHUNK.min(n - t0);
            sc.table_bytes.resize(tn * per_tok, 0);
            let tables = &mut sc.table_bytes;
            for k in (0..tn).filter(|_| !sc.reuse) {
                // SAFETY: AVX2 was asserted above.
                unsafe { avx2_tables(acts.row(t0 + k), &mut tables[k * per_tok..]) };
            }
            if tn == 1 {
                for tile in 0..lut.tiles {
                    // SAFETY: AVX2 asserted; the tile's lines are tile·groups·2 .. +groups·2 of
                    // `idx`, and the token's tables groups·16 bytes.
                    let acc = unsafe {
                        avx2_tile(
                            lut.idx.as_ptr().add(tile * groups * 2),
                            tables.as_ptr(),
                            groups,
                            zero,
                        )
                    };
                    // SAFETY: AVX2 asserted.
                    let sums = unsafe { avx2_rows(&acc) };
                    let r0 = tile * A_TILE;
                    let m = A_TILE.min(rows - r0);
                    out[t0 * rows + r0..t0 * rows + r0 + m].copy_from_slice(&sums[..m]);
                }
                continue;
            }
            let prow = lut.tiles * A_TILE;
            sc.partial.clear();
            sc.partial.resize(tn * prow, 0);
            for g0 in (0..groups).step_by(A_GROUP_CHUNK) {
                let ng = A_GROUP_CHUNK.min(groups - g0);
                for tile in 0..lut.tiles {
                    for k in 0..tn {
                        // SAFETY: AVX2 asserted; lines (tile·groups + g0)·2 .. +ng·2 of `idx` and
                        // bytes (k·groups + g0)·16 .. +ng·16 of `tables` are in bounds.
                        let acc = unsafe {
                            avx2_tile(
                                lut.idx.as_ptr().add((tile * groups + g0) * 2),
                                tables.as_ptr().add(k * per_tok + g0 * 16),
                                ng,
                                zero,
                            )
                        };
                        // SAFETY: AVX2 asserted.
                        let sums = unsafe { avx2_rows(&acc) };
                        let part = &mut sc.partial[k * prow + tile * A_TILE..][..A_TILE];
                        for (p, s) in part.iter_mut().zip(sums) {
                            *p += s;
                        }
                    }
                }
            }
            for k in 0..tn {
                out[(t0 + k) * rows..(t0 + k + 1) * rows]
                    .copy_from_slice(&sc.partial[k * prow..k * prow + rows]);
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // The comparison.

    /// A kernel under test, with the layout it needs of one matrix.
    enum Kernel<'a> {
        Crate(&'static dyn TernaryKernel),
        Vbmi(&'a VbmiLut),
        Permb(&'a PermbLut),
        Tl2(&'a Tl2Lut),
        Avx2(&'a Avx2Lut),
    }

    impl Kernel<'_> {
        fn name(&self) -> &'static str {
            match self {
                Kernel::Crate(k) => k.name(),
                Kernel::Vbmi(_) => "lut-vbmi",
                Kernel::Permb(_) => "lut-vpermb",
                Kernel::Tl2(_) => "lut-tl2",
                Kernel::Avx2(_) => "lut-avx2",
            }
        }

        fn run(
            &self,
            m: &TernaryMatrix,
            acts: &QuantizedActivations,
            out: &mut [i32],
            sc: &mut Scratch,
        ) {
            match self {
                Kernel::Crate(k) => k.ternary_dot(m, 0..m.rows(), acts, out),
                Kernel::Vbmi(l) => vbmi_matmul(l, acts, out, sc),
                Kernel::Permb(l) => pb_matmul(l, acts, out, sc),
                Kernel::Tl2(l) => tl2_matmul(l, acts, out, sc),
                Kernel::Avx2(l) => avx2_matmul(l, acts, out, sc),
            }
        }
    }

    /// Checks both LUT kernels against the scalar kernel on `m` for `n` tokens of `acts`.
    fn check(m: &TernaryMatrix, acts: &QuantizedActivations, what: &str) {
        let scalar = kernel_by_name("scalar").expect("scalar kernel");
        let n = acts.n_rows();
        let mut want = vec![0i32; n * m.rows()];
        scalar.ternary_dot(m, 0..m.rows(), acts, &mut want);
        let mut sc = Scratch::default();
        let mut got = vec![0i32; n * m.rows()];
        if has_vbmi() {
            got.fill(i32::MIN);
            vbmi_matmul(&VbmiLut::new(m), acts, &mut got, &mut sc);
            assert!(got == want, "lut-vbmi differs from scalar: {what}");
            got.fill(i32::MIN);
            pb_matmul(&PermbLut::new(m), acts, &mut got, &mut sc);
            assert!(got == want, "lut-vpermb differs from scalar: {what}");
            got.fill(i32::MIN);
            tl2_matmul(&Tl2Lut::new(m), acts, &mut got, &mut sc);
            assert!(got == want, "lut-tl2 differs from scalar: {what}");
        }
        got.fill(i32::MIN);
        avx2_matmul(&Avx2Lut::new(m), acts, &mut got, &mut sc);
        assert!(got == want, "lut-avx2 differs from scalar: {what}");
    }

    fn checks() {
        let t = Instant::now();
        // Random weights; activations random with the extremes planted, and all extremes.
        for (i, &(rows, cols)) in [
            (2560, 2560),
            (6912, 2560),
            (2560, 6912),
            (100, 300),
            (17, 5),
        ]
        .iter()
        .enumerate()
        {
            let m = random_matrix(rows, cols, 7 + i as u64);
            for n in [1, 3, 17] {
                let mut rng = Rng(99 + n as u64);
                let q: Vec<i8> = (0..n * cols)
                    .map(|k| match k % 97 {
                        0 => -128,
                        1 => 127,
                        _ => rng.int8(),
                    })
                    .collect();
                let acts = QuantizedActivations::from_int8(&q, n, cols, 1.0);
                check(&m, &acts, &format!("{rows}x{cols}, {n} tokens"));
            }
        }
        let m = random_matrix(2560, 2560, 5);
        check(&m, &random_acts(64, 2560, 6), "2560x2560, 64 tokens");
        // Largest sums: all-±1 weights against all −128 / all 127 / alternating activations.
        for (rows, cols) in [(2560, 6912), (6912, 2560)] {
            for w in [1i8, -1] {
                let m = matrix(rows, cols, |_, _| w);
                for a in [-128i8, 127] {
                    let acts = QuantizedActivations::from_int8(&vec![a; 2 * cols], 2, cols, 1.0);
                    check(&m, &acts, &format!("{rows}x{cols} all {w} × all {a}"));
                }
                let q: Vec<i8> = (0..cols)
                    .map(|c| if c % 2 == 0 { -128 } else { 127 })
                    .collect();
                let acts = QuantizedActivations::from_int8(&q, 1, cols, 1.0);
                check(&m, &acts, &format!("{rows}x{cols} all {w} × ±"));
            }
        }
        println!(
            "exactness: lut-vbmi, lut-vpermb, lut-tl2{} and lut-avx2 equal the scalar kernel on every test \
             ({:.1} s)",
            if has_vbmi() {
                ""
            } else {
                " (skipped: no VBMI)"
            },
            t.elapsed().as_secs_f64()
        );
    }

    /// Seconds per call, the best of `rounds` rounds of `reps` calls, kernels alternating; call
    /// `i` of kernel `k` runs `sets[k][i % len]` (a kernel and its matrix).
    fn race(
        sets: &[Vec<(&Kernel, &TernaryMatrix)>],
        acts: &QuantizedActivations,
        reps: usize,
        rounds: usize,
        reuse_tables: bool,
    ) -> Vec<f64> {
        let rows = sets[0][0].1.rows();
        let mut out = vec![0i32; acts.n_rows() * rows];
        let mut sc = Scratch::default();
        let mut best = vec![f64::MAX; sets.len()];
        for _ in 0..rounds {
            for (k, set) in sets.iter().enumerate() {
                let (kern, m) = set[0];
                kern.run(m, acts, &mut out, &mut sc); // warm-up (and the tables, if reused)
                sc.reuse = reuse_tables;
                let t = Instant::now();
                for i in 0..reps {
                    let (kern, m) = set[i % set.len()];
                    kern.run(m, acts, &mut out, &mut sc);
                    black_box(&mut out);
                }
                best[k] = best[k].min(t.elapsed().as_secs_f64() / reps as f64);
                sc.reuse = false;
            }
        }
        best
    }

    pub fn main() {
        let dram = std::env::args().any(|a| a == "dram");
        let names: Vec<_> = available_kernels().iter().map(|k| k.name()).collect();
        println!("crate kernels on this CPU: {}", names.join(", "));
        checks();
        let m = random_matrix(6912, 2560, 1);
        println!(
            "weight bytes of 6912x2560: crate {:.1} MiB, lut-vbmi {:.1} MiB, lut-vpermb {:.1} MiB, \
             lut-tl2 {:.1} MiB, lut-avx2 {:.1} MiB",
            m.memory_bytes() as f64 / 1048576.0,
            VbmiLut::new(&m).bytes() as f64 / 1048576.0,
            PermbLut::new(&m).bytes() as f64 / 1048576.0,
            Tl2Lut::new(&m).bytes() as f64 / 1048576.0,
            Avx2Lut::new(&m).bytes() as f64 / 1048576.0
        );
        drop(m);

        let crate_kernels: Vec<&'static dyn TernaryKernel> = ["avx2", "avxvnni", "avx512vnni"]
            .iter()
            .filter_map(|n| kernel_by_name(n).ok())
            .collect();
        let amx = kernel_by_name("amx").ok();
        const COLS: [&str; 8] = [
            "avx2",
            "avxvnni",
            "avx512vnni",
            "amx",
            "lut-avx2",
            "lut-vbmi",
            "lut-vpermb",
            "lut-tl2",
        ];
        println!(
            "\n{:<30}{}   LUT/best-avx",
            "case (G MAC/s)",
            COLS.map(|c| format!("{c:>11}")).concat()
        );
        let report = |case: &str, kernels: &[Kernel], secs: &[f64], macs: f64| {
            let col = |name: &str| {
                kernels
                    .iter()
                    .position(|k| k.name() == name)
                    .map(|i| macs / secs[i] / 1e9)
            };
            let cells =
                COLS.map(|n| col(n).map_or(format!("{:>11}", "-"), |v| format!("{v:>11.1}")));
            let best = |names: &[&str]| names.iter().filter_map(|n| col(n)).fold(0.0, f64::max);
            let ratio = best(&COLS[4..]) / best(&COLS[..3]);
            println!("{case:<30}{}   {ratio:.2}x", cells.concat());
        };

        // (a) GEMV, one token.
        for (case, rows, cols, reps, reuse) in [
            ("GEMV 1024x2560 (L2)", 1024, 2560, 400, false),
            ("GEMV 512x2560 (L2)", 512, 2560, 800, false),
            ("GEMV 2560x2560 (L3)", 2560, 2560, 100, false),
            ("GEMV 6912x2560 (L3)", 6912, 2560, 40, false),
            ("GEMV 2560x6912 (L3)", 2560, 6912, 40, false),
            ("GEMV 1024x2560 L2, no tables", 1024, 2560, 400, true),
            ("GEMV 2560x2560 L3, no tables", 2560, 2560, 100, true),
        ] {
            let m = random_matrix(rows, cols, rows as u64 + cols as u64);
            let (vl, pl, al) = (VbmiLut::new(&m), PermbLut::new(&m), Avx2Lut::new(&m));
            let tl = Tl2Lut::new(&m);
            let mut kernels: Vec<Kernel> =
                crate_kernels.iter().map(|&k| Kernel::Crate(k)).collect();
            kernels.push(Kernel::Avx2(&al));
            if has_vbmi() {
                kernels.push(Kernel::Vbmi(&vl));
                kernels.push(Kernel::Permb(&pl));
                kernels.push(Kernel::Tl2(&tl));
            }
            let sets: Vec<Vec<(&Kernel, &TernaryMatrix)>> =
                kernels.iter().map(|k| vec![(k, &m)]).collect();
            let secs = race(&sets, &random_acts(1, cols, 3), reps, 7, reuse);
            report(case, &kernels, &secs, (rows * cols) as f64);
        }

        // (a') GEMV cycling through copies of the matrix: a working set past the L3 cache.
        if dram {
            let (rows, cols, copies) = (6912, 2560, 128);
            let m = random_matrix(rows, cols, 11);
            let mats: Vec<TernaryMatrix> = (0..copies).map(|_| m.clone()).collect();
            let vl = VbmiLut::new(&m);
            let pl = PermbLut::new(&m);
            let tl = Tl2Lut::new(&m);
            let al = Avx2Lut::new(&m);
            let vls: Vec<VbmiLut> = (0..copies)
                .map(|_| VbmiLut {
                    idx: vl.idx.clone(),
                    ..vl
                })
                .collect();
            let pls: Vec<PermbLut> = (0..copies)
                .map(|_| PermbLut {
                    idx: pl.idx.clone(),
                    ..pl
                })
                .collect();
            let tls: Vec<Tl2Lut> = (0..copies)
                .map(|_| Tl2Lut {
                    nib: tl.nib.clone(),
                    sign: tl.sign.clone(),
                    ..tl
                })
                .collect();
            let als: Vec<Avx2Lut> = (0..copies)
                .map(|_| Avx2Lut {
                    idx: al.idx.clone(),
                    ..al
                })
                .collect();
            let mut kernels: Vec<Vec<Kernel>> = crate_kernels
                .iter()
                .map(|&k| (0..copies).map(|_| Kernel::Crate(k)).collect())
                .collect();
            kernels.push(als.iter().map(Kernel::Avx2).collect());
            kernels.push(vls.iter().map(Kernel::Vbmi).collect());
            kernels.push(pls.iter().map(Kernel::Permb).collect());
            kernels.push(tls.iter().map(Kernel::Tl2).collect());
            let sets: Vec<Vec<(&Kernel, &TernaryMatrix)>> = kernels
                .iter()
                .map(|ks| ks.iter().zip(&mats).collect())
                .collect();
            let secs = race(&sets, &random_acts(1, cols, 3), copies, 5, false);
            let firsts: Vec<Kernel> = kernels.into_iter().map(|mut k| k.swap_remove(0)).collect();
            report(
                "GEMV 6912x2560 x128 (DRAM)",
                &firsts,
                &secs,
                (rows * cols) as f64,
            );
        }

        // (b) GEMM, 64 tokens (prefill).
        for (rows, cols) in [(2560, 2560), (6912, 2560), (2560, 6912)] {
            let m = random_matrix(rows, cols, rows as u64 * 3 + cols as u64);
            let (vl, pl, al) = (VbmiLut::new(&m), PermbLut::new(&m), Avx2Lut::new(&m));
            let mut kernels: Vec<Kernel> =
                crate_kernels.iter().map(|&k| Kernel::Crate(k)).collect();
            if let Some(k) = amx {
                kernels.push(Kernel::Crate(k));
            }
            let tl = Tl2Lut::new(&m);
            kernels.push(Kernel::Avx2(&al));
            if has_vbmi() {
                kernels.push(Kernel::Vbmi(&vl));
                kernels.push(Kernel::Permb(&pl));
                kernels.push(Kernel::Tl2(&tl));
            }
            let mut acts = random_acts(64, cols, 4);
            // The layout AMX wants, made once per quantization in the engine (not timed).
            if let Some(k) = amx {
                k.prepare(&mut acts);
            }
            let sets: Vec<Vec<(&Kernel, &TernaryMatrix)>> =
                kernels.iter().map(|k| vec![(k, &m)]).collect();
            let secs = race(&sets, &acts, 4, 5, false);
            report(
                &format!("GEMM 64 tok {rows}x{cols}"),
                &kernels,
                &secs,
                (rows * cols * 64) as f64,
            );
        }

        // Table building alone, per token of 2560 activations (inside every LUT figure above):
        // one 128-row tile with its tables built, minus the same with them reused.
        let acts = random_acts(1, 2560, 8);
        let m = random_matrix(128, 2560, 9);
        let (vl, pl, al) = (VbmiLut::new(&m), PermbLut::new(&m), Avx2Lut::new(&m));
        let tl = Tl2Lut::new(&m);
        let mut out = vec![0i32; 128];
        let mut line = String::from("\ntables of one 2560-wide token (µs; one 128-row tile):");
        let mut kernels = vec![Kernel::Avx2(&al)];
        if has_vbmi() {
            kernels.push(Kernel::Vbmi(&vl));
            kernels.push(Kernel::Permb(&pl));
            kernels.push(Kernel::Tl2(&tl));
        }
        for k in &kernels {
            let mut best = [f64::MAX; 2];
            let mut sc = Scratch::default();
            for _ in 0..20 {
                for (reuse, b) in best.iter_mut().enumerate() {
                    k.run(&m, &acts, &mut out, &mut sc);
                    sc.reuse = reuse == 1;
                    let t = Instant::now();
                    for _ in 0..100 {
                        k.run(&m, &acts, &mut out, &mut sc);
                        black_box(&mut out);
                    }
                    *b = b.min(t.elapsed().as_secs_f64() / 100.0);
                    sc.reuse = false;
                }
            }
            line += &format!(
                " {} {:.2} (tile {:.2})",
                k.name(),
                (best[0] - best[1]) * 1e6,
                best[1] * 1e6
            );
        }
        println!("{line}");
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    probe::main();
    #[cfg(not(target_arch = "x86_64"))]
    eprintln!("lut_probe measures x86 kernels; nothing to do on this architecture");
}
