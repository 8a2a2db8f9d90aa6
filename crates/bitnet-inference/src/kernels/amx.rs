//! AMX kernel (Intel Sapphire Rapids and later): prefill and batches on the tile unit, whose
//! `tdpbusd` multiplies a 16 × 64 block of unsigned bytes by a 64 × 16 block of signed bytes
//! into 16 × 16 int32 sums: 16,384 multiply-adds an instruction, where AVX-512's `vpdpbusd`
//! does 64.
//!
//! The A operand is 16 weight rows of codes (`trit + 1`, one byte each), decoded from the
//! packed rows into a per-thread scratch once per call and reused for every token; the B
//! operand is 16 tokens' activations in [`QuantizedActivations::make_tiled`]'s layout, made
//! once per quantization by [`TernaryKernel::prepare`]. The integer sums are exact in int32
//! (a sum is bounded by `2·128·cols`, as for the other kernels), so results equal the scalar
//! kernel's. Fewer than [`MIN_TOKENS`] tokens (decode) go to the AVX-512 kernel.
//!
//! The tile instructions are written with `asm!` (Rust's AMX intrinsics are unstable); no
//! tile register is ever touched by compiled code, and each call configures the tiles and
//! releases them before it returns.

use super::{avx512::Avx512VnniKernel, QuantizedActivations, TernaryKernel, TernaryMatrix};
use super::{BLOCK_WEIGHTS, TILE_ROWS};
use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::ops::Range;

/// Batches below this many tokens use the AVX-512 kernel: a tile's 16 token columns would be
/// mostly padding.
pub const MIN_TOKENS: usize = 16;

/// Weight rows a step decodes and multiplies: two A tiles.
const ROW_STEP: usize = 2 * TILE_ROWS;

/// Needs AMX-TILE and AMX-INT8, the kernel's permission from Linux to use the tile state,
/// and the AVX-512 kernel (for decoding and small batches).
pub struct AmxKernel {
    small: Avx512VnniKernel,
}

impl AmxKernel {
    pub(super) fn detect() -> Option<Self> {
        let small = Avx512VnniKernel::detect()?;
        (has_amx_int8() && request_tile_permission()).then_some(Self { small })
    }
}

/// CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8 (`is_x86_feature_detected!` does
/// not take AMX names on stable Rust yet). Whether the OS enabled the state is the
/// permission request's answer.
fn has_amx_int8() -> bool {
    // Leaf 0 gives the highest leaf, so leaf 7 is only asked where it exists.
    if __cpuid(0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    edx & (1 << 24) != 0 && edx & (1 << 25) != 0
}

/// Asks Linux for the tile data state (XTILEDATA, feature 18), which a process must do once
/// before its first tile instruction; false if the kernel refuses or predates AMX.
fn request_tile_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, feature) only changes this process's permitted
    // register state; it reads no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

impl TernaryKernel for AmxKernel {
    fn name(&self) -> &'static str {
        "amx"
    }

    fn ternary_dot(
        &self,
        weights: &TernaryMatrix,
        rows: Range<usize>,
        acts: &QuantizedActivations,
        out: &mut [i32],
    ) {
        match acts.tiled() {
            Some(tiled) if acts.n_rows() >= MIN_TOKENS => {
                assert_eq!(acts.padded_cols(), weights.padded_cols(), "kernel width");
                assert!(rows.end <= weights.rows(), "kernel row range");
                assert!(
                    out.len() >= rows.len() * acts.n_rows(),
                    "kernel output size"
                );
                SCRATCH.with_borrow_mut(|scratch| {
                    // SAFETY: `detect` found AMX-TILE/INT8 and AVX-512 and obtained the tile
                    // permission; the sizes were checked above.
                    unsafe { amx_dot(weights, rows, acts, tiled, out, scratch) }
                })
            }
            _ => self.small.ternary_dot(weights, rows, acts, out),
        }
    }

    fn row_step(&self, n_tok: usize) -> usize {
        if n_tok >= MIN_TOKENS {
            TILE_ROWS
        } else {
            self.small.row_step(n_tok)
        }
    }

    fn prepare(&self, acts: &mut QuantizedActivations) {
        if acts.n_rows() >= MIN_TOKENS {
            acts.make_tiled();
        }
    }
}

thread_local! {
    /// Decoded codes of one row step (`ROW_STEP × padded_cols` bytes), reused across calls.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The 64-byte tile configuration: palette 1, all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn all_16x64() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        Self(c)
    }
}

/// `tileloadd tmm{T}, [ptr + stride]`.
macro_rules! tile_load {
    ($t:literal, $ptr:expr, $stride:expr) => {
        asm!(
            concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"),
            p = in(reg) $ptr,
            s = in(reg) $stride,
            options(nostack, readonly)
        )
    };
}

/// `tilestored [ptr + stride], tmm{T}`.
macro_rules! tile_store {
    ($t:literal, $ptr:expr, $stride:expr) => {
        asm!(
            concat!("tilestored [{p} + {s}*1], tmm", $t),
            p = in(reg) $ptr,
            s = in(reg) $stride,
            options(nostack)
        )
    };
}

/// `tdpbusd tmm{C}, tmm{A}, tmm{B}`: C += A (u8) · B (s8).
macro_rules! tile_dot {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(
            concat!("tdpbusd tmm", $c, ", tmm", $a, ", tmm", $b),
            options(nomem, nostack)
        )
    };
}

/// # Safety
/// The CPU must have AMX-TILE, AMX-INT8, AVX-512 F/BW, the process the tile permission;
/// `tiled` must be `acts`'s tiled layout, and `out` at least `rows.len() × n_rows` long.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn amx_dot(
    w: &TernaryMatrix,
    rows: Range<usize>,
    acts: &QuantizedActivations,
    tiled: &[u8],
    out: &mut [i32],
    scratch: &mut Vec<u8>,
) {
    let k = w.padded_cols();
    let (n, n_tok) = (rows.len(), acts.n_rows());
    let group_bytes = TILE_ROWS * k;
    let pairs = n_tok.div_ceil(2 * TILE_ROWS);
    assert!(
        tiled.len() >= pairs * 2 * group_bytes,
        "tiled activations size"
    );
    scratch.resize(ROW_STEP * k, 0);
    let config = TileConfig::all_16x64();
    let mut sums = [[[0i32; TILE_ROWS]; TILE_ROWS]; 4];
    // SAFETY: the configuration is a valid palette-1 layout; tiles are released below.
    unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
    let mut r0 = rows.start;
    while r0 < rows.end {
        let r1 = (r0 + ROW_STEP).min(rows.end);
        // A last step of at most 16 rows uses one A tile.
        let halves = (r1 - r0).div_ceil(TILE_ROWS);
        for i in 0..halves * TILE_ROWS {
            let codes = &mut scratch[i * k..(i + 1) * k];
            if r0 + i < r1 {
                decode_codes(w.packed_row(r0 + i), codes);
            } else {
                codes.fill(0);
            }
        }
        for p in 0..pairs {
            let b = tiled[2 * p * group_bytes..].as_ptr();
            // SAFETY: `scratch` holds `halves` × 16 rows of `k` codes, `b` two groups of
            // `k / 4` rows of 64 bytes (checked above).
            unsafe {
                if halves == 2 {
                    multiply_step::<2>(scratch.as_ptr(), b, k, &mut sums);
                } else {
                    multiply_step::<1>(scratch.as_ptr(), b, k, &mut sums);
                }
            }
            // Tile (row half h, token group g): sums[2h + g][row][token].
            for (idx, tile) in sums.iter().enumerate().take(2 * halves) {
                let (h, g) = (idx / 2, idx % 2);
                for (i, row) in tile.iter().enumerate() {
                    let r = r0 + h * TILE_ROWS + i;
                    if r >= r1 {
                        break;
                    }
                    for (j, &v) in row.iter().enumerate() {
                        let t = (2 * p + g) * TILE_ROWS + j;
                        if t >= n_tok {
                            break;
                        }
                        out[t * n + (r - rows.start)] = v - acts.sum(t);
                    }
                }
            }
        }
        r0 = r1;
    }
    // SAFETY: ends the tile use begun by `ldtilecfg` above.
    unsafe { asm!("tilerelease", options(nomem, nostack)) };
}

/// The sums of `HALVES` A tiles of 16 weight rows (codes, `k` bytes a row from `a`) with two
/// B tiles of 16 tokens (from `b`, the second `16·k` bytes after the first), over all `k`
/// columns, into `sums[2h + g]` (row half h, token group g).
///
/// # Safety
/// Tiles configured as [`TileConfig::all_16x64`]; `a` valid for `16·HALVES·k` bytes and `b`
/// for `32·k`.
#[inline(always)]
unsafe fn multiply_step<const HALVES: usize>(
    a: *const u8,
    b: *const u8,
    k: usize,
    sums: &mut [[[i32; TILE_ROWS]; TILE_ROWS]; 4],
) {
    let second_group = TILE_ROWS * k;
    // SAFETY: step s reads 64 bytes of 16 rows at offset 64·s of A (rows `k` apart) and 16
    // rows of 64 bytes at offset 1024·s of each B group, inside both for s < k / 64; the
    // stores write 16 rows of 64 bytes into `sums`.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nomem, nostack)
        );
        for s in 0..k / 64 {
            tile_load!("4", a.add(64 * s), k);
            tile_load!("6", b.add(1024 * s), 64usize);
            tile_load!("7", b.add(second_group + 1024 * s), 64usize);
            tile_dot!("0", "4", "6");
            tile_dot!("1", "4", "7");
            if HALVES == 2 {
                tile_load!("5", a.add(TILE_ROWS * k + 64 * s), k);
                tile_dot!("2", "5", "6");
                tile_dot!("3", "5", "7");
            }
        }
        tile_store!("0", sums[0].as_mut_ptr(), 64usize);
        tile_store!("1", sums[1].as_mut_ptr(), 64usize);
        if HALVES == 2 {
            tile_store!("2", sums[2].as_mut_ptr(), 64usize);
            tile_store!("3", sums[3].as_mut_ptr(), 64usize);
        }
    }
}

/// One packed row's codes (`trit + 1`), one byte each, in column order.
#[target_feature(enable = "avx512f,avx512bw")]
fn decode_codes(packed: &[u8], codes: &mut [u8]) {
    assert_eq!(packed.len() * 4, codes.len(), "decode sizes");
    let mask = _mm512_set1_epi8(3);
    let shift01 = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(2));
    let shift23 = _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(6));
    for (block, out) in packed
        .chunks_exact(32)
        .zip(codes.chunks_exact_mut(BLOCK_WEIGHTS))
    {
        // SAFETY: `block` is 32 bytes and `out` 128, which is what the loads and stores touch.
        unsafe {
            let raw = _mm512_broadcast_i64x4(_mm256_loadu_si256(block.as_ptr().cast()));
            let c01 = _mm512_and_si512(_mm512_srlv_epi16(raw, shift01), mask);
            let c23 = _mm512_and_si512(_mm512_srlv_epi16(raw, shift23), mask);
            _mm512_storeu_si512(out.as_mut_ptr().cast(), c01);
            _mm512_storeu_si512(out.as_mut_ptr().add(64).cast(), c23);
        }
    }
}
