//! ggml tensor types: sizes, float decoding, and ternary decoding/encoding.
//!
//! Layouts follow ggml's reference C code (`ggml-quants.c`, `dequantize_row_*` and
//! `quantize_row_*_ref`) and, for I2_S, microsoft/BitNet's fork (see docs BITNET.md):
//!
//! | type | id | block | bytes | layout of one block |
//! |---|---|---|---|---|
//! | F32 | 0 | 1 | 4 | |
//! | F16 | 1 | 1 | 2 | |
//! | Q4_0 | 2 | 32 | 18 | f16 d, 16 bytes: low nibbles = elements 0..16, high = 16..32; `(q-8)·d` |
//! | Q4_1 | 3 | 32 | 20 | f16 d, f16 m, 16 bytes as Q4_0; `q·d + m` |
//! | Q8_0 | 8 | 32 | 34 | f16 d, 32 × i8; `q·d` |
//! | Q6_K | 14 | 256 | 210 | ql[128], qh[64], i8 scales[16], f16 d; `d·scale[e/16]·(q-32)` |
//! | BF16 | 30 | 1 | 2 | |
//! | TQ1_0 | 34 | 256 | 54 | qs[48] (5 trits a byte, fixed point), qh[4] (4 trits), f16 d |
//! | TQ2_0 | 35 | 256 | 66 | qs[64] (4 codes a byte, bits 1-0 first), f16 d |
//! | I2_S | 36 | 1 (flat) | n/4 + 32 a tensor | 2-bit codes, blocks of 128 in 32 bytes, bits 7-6 first; one f32 scale at byte n/4 |
//! | Q2_0 | 42 | 64 | 18 | f16 d, qs[16]: element j in bits `2·(j%4)` of byte `j/4`; `(code − 1)·d` (code 3 = +2) |
//! | Q2_0 (g128) | 42 | 128 | 34 | the same with 128 elements, qs[32]: PrismML's llama.cpp fork |
//!
//! Q2_0's layout is llama.cpp's `block_q2_0` / `dequantize_row_q2_0` (mainline, QK2_0 = 64);
//! PrismML's fork (its Ternary-Bonsai files) uses the same id and layout with QK2_0 = 128. The
//! GGUF reader tells them apart by the tensor's byte count (see `gguf.rs`).
//!
//! Type ids 36-39 collide between upstream ggml and microsoft's fork; [`GgmlType::from_id`]
//! maps 36 to I2_S and leaves the final word to the GGUF reader, which checks the
//! architecture and the byte count (see `gguf.rs`).

use crate::{Error, Result};
use half::{bf16, f16};

/// A ggml tensor type this crate knows the size of. Only some can be decoded
/// ([`GgmlType::can_dequantize`], [`GgmlType::is_ternary`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    BF16,
    TQ1_0,
    TQ2_0,
    /// microsoft/BitNet's 2-bit ternary type (id 36 in its fork only).
    I2_S,
    /// llama.cpp's 2-bit type with an f16 scale per 64 weights (id 42).
    Q2_0,
    /// PrismML's fork's Q2_0: an f16 scale per 128 weights (id 42 there too).
    Q2_0_G128,
}

/// Weights in a K-quant / TQ super-block.
pub const QK_K: usize = 256;
/// Weights in an I2_S packing block (32 bytes).
pub const I2S_BLOCK: usize = 128;

impl GgmlType {
    /// The type stored under `id`. Id 36 is I2_S (microsoft's fork; unused upstream,
    /// where 36-38 were runtime-only repacked types that never reach files).
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            36 => I2_S,
            42 => Q2_0,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            I2_S => 36,
            Q2_0 | Q2_0_G128 => 42,
        }
    }

    /// ggml's spelling, as `gguf-dump` prints it.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            I2_S => "I2_S",
            Q2_0 => "Q2_0",
            Q2_0_G128 => "Q2_0_g128",
        }
    }

    /// Elements per block (1 for plain floats and for I2_S, which is sized per tensor).
    pub fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | I2_S => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 => 32,
            Q2_0 => 64,
            Q2_0_G128 => 128,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | TQ1_0 | TQ2_0 => QK_K,
        }
    }

    /// Bytes per block. For I2_S this is nominal (2 bits a weight); use
    /// [`GgmlType::tensor_bytes`] for a tensor's size.
    pub fn block_bytes(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | BF16 => 2,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q2_K => 84,
            Q3_K => 110,
            Q4_K => 144,
            Q5_K => 176,
            Q6_K => 210,
            TQ1_0 => 54,
            TQ2_0 => 66,
            I2_S => 1,
            Q2_0 => 18,
            Q2_0_G128 => 34,
        }
    }

    pub fn is_ternary(self) -> bool {
        use GgmlType::*;
        matches!(self, TQ1_0 | TQ2_0 | I2_S | Q2_0 | Q2_0_G128)
    }

    /// Whether [`dequantize_row`] decodes this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16 | BF16 | Q4_0 | Q4_1 | Q8_0 | Q6_K | TQ1_0 | TQ2_0 | Q2_0 | Q2_0_G128
        )
    }

    /// Bytes of a row of `n` elements (`None` if `n` is not a whole number of blocks,
    /// or for I2_S, whose rows are not self-contained).
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if self == GgmlType::I2_S || !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.block_bytes())
    }

    /// Bytes a whole tensor of `n_elements` takes, `ne0` being its row length.
    /// Errors (as text) if rows are not whole blocks or the size overflows.
    pub fn tensor_bytes(self, ne0: u64, n_elements: u64) -> std::result::Result<u64, String> {
        if self == GgmlType::I2_S {
            // microsoft's ggml_nbytes: n/4 bytes of codes, then the f32 scale, padded to 32.
            if !n_elements.is_multiple_of(I2S_BLOCK as u64) {
                return Err(format!(
                    "{n_elements} elements are not a multiple of the I2_S block of {I2S_BLOCK}"
                ));
            }
            return (n_elements / 4)
                .checked_add(32)
                .ok_or_else(|| "size overflows".to_string());
        }
        let bs = self.block_size() as u64;
        if !ne0.is_multiple_of(bs) {
            return Err(format!(
                "row length {ne0} is not a multiple of the {} block size {bs}",
                self.name()
            ));
        }
        (n_elements / bs)
            .checked_mul(self.block_bytes() as u64)
            .ok_or_else(|| "size overflows".to_string())
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn check_len(ty: GgmlType, bytes: &[u8], n: usize) -> Result<()> {
    match ty.row_bytes(n) {
        Some(len) if len == bytes.len() => Ok(()),
        Some(len) => Err(Error::Invalid(format!(
            "{}: {n} elements need {len} bytes, got {}",
            ty.name(),
            bytes.len()
        ))),
        None => Err(Error::Invalid(format!(
            "{}: {n} elements are not a whole number of {}-element blocks",
            ty.name(),
            ty.block_size()
        ))),
    }
}

/// Decodes `out.len()` elements of type `ty` from `bytes` (exactly one row's worth, or
/// any whole number of blocks) into f32, with ggml's reference semantics.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    use GgmlType::*;
    check_len(ty, bytes, out.len())?;
    match ty {
        F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        Q4_0 => {
            for (y, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(18)) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                for j in 0..16 {
                    y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                    y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        Q4_1 => {
            for (y, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(20)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..20];
                for j in 0..16 {
                    y[j] = (qs[j] & 0x0F) as f32 * d + m;
                    y[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
            }
        }
        Q8_0 => {
            for (y, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (o, &q) in y.iter_mut().zip(&b[2..34]) {
                    *o = q as i8 as f32 * d;
                }
            }
        }
        Q6_K => {
            for (y, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(210)) {
                let d = f16_at(b, 208);
                // Two halves of 128 elements; each uses 64 bytes of ql, 32 of qh, 8 scales.
                for half in 0..2 {
                    let ql = &b[half * 64..half * 64 + 64];
                    let qh = &b[128 + half * 32..128 + half * 32 + 32];
                    let sc = &b[192 + half * 8..192 + half * 8 + 8];
                    let y = &mut y[half * 128..half * 128 + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |k: usize| sc[is + k] as i8 as f32;
                        y[l] = d * s(0) * q1 as f32;
                        y[l + 32] = d * s(2) * q2 as f32;
                        y[l + 64] = d * s(4) * q3 as f32;
                        y[l + 96] = d * s(6) * q4 as f32;
                    }
                }
            }
        }
        TQ1_0 | TQ2_0 => {
            let mut trits = vec![0i8; out.len()];
            let scales = ternary_row(ty, bytes, &mut trits)?;
            for ((y, t), d) in out
                .chunks_exact_mut(QK_K)
                .zip(trits.chunks_exact(QK_K))
                .zip(scales)
            {
                for (o, &v) in y.iter_mut().zip(t) {
                    *o = v as f32 * d;
                }
            }
        }
        Q2_0 | Q2_0_G128 => {
            let (group, bb) = (ty.block_size(), ty.block_bytes());
            for (y, b) in out.chunks_exact_mut(group).zip(bytes.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                for (j, o) in y.iter_mut().enumerate() {
                    *o = (((b[2 + j / 4] >> (2 * (j % 4))) & 3) as i32 - 1) as f32 * d;
                }
            }
        }
        Q5_0 | Q5_1 | Q2_K | Q3_K | Q4_K | Q5_K | I2_S => {
            return Err(Error::Invalid(format!(
                "decoding {} to floats is not supported",
                ty.name()
            )))
        }
    }
    Ok(())
}

/// Trit `n` (0 = most significant) of a TQ1_0 fixed-point byte: `((q·3ⁿ mod 256)·3) >> 8`.
#[inline]
fn tq1_trit(q: u8, n: usize) -> i8 {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    let v = q.wrapping_mul(POW3[n]);
    ((v as u16 * 3) >> 8) as i8 - 1
}

/// Decodes a row of a TQ1_0 or TQ2_0 tensor into trits (-1, 0, +1) and returns the f16
/// scale `d` of each 256-element block (value = trit · d). For I2_S, whose rows are not
/// self-contained, `bytes` must be the whole tensor (`n/4 + 32` bytes for `n` trits) and the
/// one tensor scale is returned; [`i2s_decode`] decodes any range of it.
pub fn ternary_row(ty: GgmlType, bytes: &[u8], trits: &mut [i8]) -> Result<Vec<f32>> {
    if ty == GgmlType::I2_S {
        let n = trits.len();
        if !n.is_multiple_of(I2S_BLOCK) || bytes.len() != n / 4 + 32 {
            return Err(Error::Invalid(format!(
                "I2_S: {n} elements need a multiple of {I2S_BLOCK} and {} bytes, got {}",
                n / 4 + 32,
                bytes.len()
            )));
        }
        i2s_decode(&bytes[..n / 4], 0, trits)?;
        return Ok(vec![i2s_scale(bytes, n)?]);
    }
    check_len(ty, bytes, trits.len())?;
    let mut scales = Vec::with_capacity(trits.len() / QK_K);
    match ty {
        GgmlType::TQ1_0 => {
            for (t, b) in trits.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(54)) {
                let (qs, qh) = (&b[..48], &b[48..52]);
                let mut k = 0;
                // 32 bytes × 5 trits: element m + 32n.
                for n in 0..5 {
                    for &q in &qs[..32] {
                        t[k] = tq1_trit(q, n);
                        k += 1;
                    }
                }
                // 16 bytes × 5 trits.
                for n in 0..5 {
                    for &q in &qs[32..48] {
                        t[k] = tq1_trit(q, n);
                        k += 1;
                    }
                }
                // 4 bytes × 4 trits.
                for n in 0..4 {
                    for &q in qh {
                        t[k] = tq1_trit(q, n);
                        k += 1;
                    }
                }
                scales.push(f16_at(b, 52));
            }
        }
        GgmlType::TQ2_0 => {
            for (t, b) in trits.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(66)) {
                let mut k = 0;
                for half in 0..2 {
                    let qs = &b[half * 32..half * 32 + 32];
                    for l in 0..4 {
                        for &q in qs {
                            let code = (q >> (2 * l)) & 3;
                            // Code 3 does not occur in valid files; ggml would make it +2.
                            if code == 3 {
                                return Err(Error::Invalid(
                                    "TQ2_0: 2-bit code 3 is not a ternary value".into(),
                                ));
                            }
                            t[k] = code as i8 - 1;
                            k += 1;
                        }
                    }
                }
                scales.push(f16_at(b, 64));
            }
        }
        other => {
            return Err(Error::Invalid(format!(
                "{} is not a self-contained ternary row type",
                other.name()
            )))
        }
    }
    Ok(scales)
}

/// The one f32 scale (multiplier) of an I2_S tensor of `n` elements.
pub fn i2s_scale(data: &[u8], n: usize) -> Result<f32> {
    let at = n / 4;
    let b = data.get(at..at + 4).ok_or_else(|| {
        Error::Invalid(format!(
            "I2_S: {} bytes hold no scale at byte {at} for {n} elements",
            data.len()
        ))
    })?;
    Ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Decodes `trits.len()` consecutive I2_S weights starting at flat element index `start`
/// of a tensor whose codes are `data` (byte `j` of each 32-byte block holds elements
/// `j, j+32, j+64, j+96` in bits 7-6, 5-4, 3-2, 1-0; code = trit + 1).
pub fn i2s_decode(data: &[u8], start: usize, trits: &mut [i8]) -> Result<()> {
    for (k, t) in trits.iter_mut().enumerate() {
        let e = start + k;
        let (block, pos) = (e / I2S_BLOCK, e % I2S_BLOCK);
        let byte = *data.get(block * 32 + pos % 32).ok_or_else(|| {
            Error::Invalid(format!(
                "I2_S: element {e} lies past the {} code bytes",
                data.len()
            ))
        })?;
        let code = (byte >> (6 - 2 * (pos / 32))) & 3;
        if code == 3 {
            return Err(Error::Invalid(format!(
                "I2_S: 2-bit code 3 at element {e} is not a ternary value"
            )));
        }
        *t = code as i8 - 1;
    }
    Ok(())
}

fn check_trits(trits: &[i8]) -> Result<()> {
    match trits.iter().position(|t| !(-1..=1).contains(t)) {
        Some(i) => Err(Error::Invalid(format!(
            "value {} at {i} is not -1, 0 or 1",
            trits[i]
        ))),
        None => Ok(()),
    }
}

/// Quantizes floats to Q8_0 blocks (ggml's reference: `d = max|x| / 127` as f16,
/// `q = round(x / d)` half away from zero).
pub fn quantize_q8_0(x: &[f32]) -> Result<Vec<u8>> {
    if !x.len().is_multiple_of(32) {
        return Err(Error::Invalid(format!(
            "Q8_0 needs a multiple of 32 elements, got {}",
            x.len()
        )));
    }
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for block in x.chunks_exact(32) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
    }
    Ok(out)
}

/// Quantizes floats (a whole number of 256-element super-blocks) to Q6_K blocks that ggml,
/// llama.cpp and the `gguf` Python package decode as `d · scale[j] · (q - 32)`.
///
/// Per 16-weight sub-block `j`, a real scale is searched: the largest-magnitude weight is
/// mapped to each of 13 levels between 26 and 32 (on either side of zero, since the codes
/// reach -32 but only +31), the other weights rounded to that grid, and the scale refitted by
/// least squares to those codes; the candidate with the least squared error wins. The 16 scales
/// then become int8 against one f16 `d ≈ max|scale| / 127` (that value rounded to f16, or
/// one of its two f16 neighbours, whichever errs least over the block); each sub-block takes
/// the int8 scale among `round(scale / d)` and its two neighbours that, with its weights
/// requantized, errs least. Non-finite inputs and super-blocks too large for an f16 `d`
/// (max |x| beyond about 2.6e8) are errors.
pub fn quantize_q6_k(x: &[f32]) -> Result<Vec<u8>> {
    if !x.len().is_multiple_of(QK_K) {
        return Err(Error::Invalid(format!(
            "Q6_K needs a multiple of {QK_K} elements, got {}",
            x.len()
        )));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::Invalid(format!(
            "Q6_K: value {} at {i} is not finite",
            x[i]
        )));
    }
    let mut out = Vec::with_capacity(x.len() / QK_K * 210);
    for (b, block) in x.chunks_exact(QK_K).enumerate() {
        let mut real = [0f32; 16];
        for (s, sub) in real.iter_mut().zip(block.chunks_exact(16)) {
            *s = q6_sub_scale(sub);
        }
        let smax = real.iter().fold(0f32, |m, s| m.max(s.abs()));
        let nearest = f16::from_f32(smax / 127.0);
        if !nearest.is_finite() {
            return Err(Error::Invalid(format!(
                "Q6_K: block {b} (max |x| {}) is too large for an f16 scale",
                block.iter().fold(0f32, |m, v| m.max(v.abs()))
            )));
        }
        // d and its two f16 neighbours: where d is subnormal (max |x| below ~0.25) its
        // rounding is coarse, and another d with other int8 scales may fit better.
        let mut candidates = vec![nearest];
        if smax > 0.0 {
            let bits = nearest.to_bits();
            if bits > 0 {
                candidates.push(f16::from_bits(bits - 1));
            }
            if f16::from_bits(bits + 1).is_finite() {
                candidates.push(f16::from_bits(bits + 1));
            }
        }
        let mut best = (f32::INFINITY, f16::ZERO, [0i8; 16]);
        for d in candidates {
            let d32 = d.to_f32();
            let mut scales = [0i8; 16];
            let mut total = 0f32;
            for (j, sub) in block.chunks_exact(16).enumerate() {
                let mut sub_best = (q6_requant(sub, 0.0, None), 0i8);
                if d32 != 0.0 {
                    let c = (real[j] / d32).round();
                    for sc in [c, c - 1.0, c + 1.0] {
                        let sc = sc.clamp(-128.0, 127.0) as i8;
                        let err = q6_requant(sub, d32 * sc as f32, None);
                        if err < sub_best.0 {
                            sub_best = (err, sc);
                        }
                    }
                }
                scales[j] = sub_best.1;
                total += sub_best.0;
            }
            if total < best.0 {
                best = (total, d, scales);
            }
        }
        let (_, d, scales) = best;
        let mut codes = [0u8; QK_K];
        for (j, sub) in block.chunks_exact(16).enumerate() {
            let e = d.to_f32() * scales[j] as f32;
            q6_requant(sub, e, Some(&mut codes[j * 16..j * 16 + 16]));
        }
        // Bit layout (the decoder's inverse): element `128h + 32k + l` keeps its low nibble in
        // ql[64h + l + 32(k & 1)] (high nibble when k >= 2) and its top 2 bits in
        // qh[32h + l] at bits 2k..2k+2.
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for (e, &q) in codes.iter().enumerate() {
            let (h, k, l) = (e / 128, (e % 128) / 32, e % 32);
            ql[64 * h + l + 32 * (k & 1)] |= (q & 0x0F) << if k >= 2 { 4 } else { 0 };
            qh[32 * h + l] |= (q >> 4) << (2 * k);
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend(scales.iter().map(|&s| s as u8));
        out.extend_from_slice(&d.to_le_bytes());
    }
    Ok(out)
}

/// The real scale `s` of one 16-weight sub-block (weights ≈ `s·q`, `q` in [-32, 31]) with
/// the least squared error among the candidates [`quantize_q6_k`] describes; 0 for zeros.
fn q6_sub_scale(x: &[f32]) -> f32 {
    let mut vmax = 0f32;
    for &v in x {
        if v.abs() > vmax.abs() {
            vmax = v;
        }
    }
    if vmax == 0.0 {
        return 0.0;
    }
    // The error of refitted codes is Σx² − (Σxq)²/Σq²: maximize (Σxq)²/Σq².
    let mut best = (f32::NEG_INFINITY, 0f32);
    for step in 0..13 {
        let level = 32.0 - 0.5 * step as f32;
        // -vmax/level maps the largest weight to -level (the codes' longer side) first.
        for s in [-vmax / level, vmax / level] {
            let inv = 1.0 / s;
            let (mut sxq, mut sqq) = (0f32, 0f32);
            for &v in x {
                let q = (v * inv).round().clamp(-32.0, 31.0);
                sxq += v * q;
                sqq += q * q;
            }
            // A later candidate must beat the best by more than rounding noise, so ties
            // (constant or exactly representable weights) keep the full range.
            let score = sxq * sxq / sqq;
            if sqq > 0.0 && score > best.0 * (1.0 + 1e-6) {
                best = (score, sxq / sqq);
            }
        }
    }
    best.1
}

/// Quantizes a sub-block with the scale `e` (codes `q + 32`, written to `codes` if given)
/// and returns the squared error.
fn q6_requant(x: &[f32], e: f32, mut codes: Option<&mut [u8]>) -> f32 {
    let inv = if e != 0.0 { 1.0 / e } else { 0.0 };
    let mut err = 0f32;
    for (i, &v) in x.iter().enumerate() {
        let q = (v * inv).round().clamp(-32.0, 31.0);
        let r = v - e * q;
        err += r * r;
        if let Some(c) = codes.as_deref_mut() {
            c[i] = (q as i32 + 32) as u8;
        }
    }
    err
}

/// Packs trits into I2_S with one tensor scale: `n/4` code bytes, the f32 scale, then
/// zero padding to `n/4 + 32` bytes. `n` must be a multiple of 128 (the layout cannot
/// hold a partial block in `n/4` bytes).
pub fn pack_i2s(trits: &[i8], scale: f32) -> Result<Vec<u8>> {
    check_trits(trits)?;
    let n = trits.len();
    if !n.is_multiple_of(I2S_BLOCK) {
        return Err(Error::Invalid(format!(
            "I2_S needs a multiple of {I2S_BLOCK} elements, got {n}"
        )));
    }
    let mut out = vec![0u8; n / 4];
    for (e, &t) in trits.iter().enumerate() {
        let (block, pos) = (e / I2S_BLOCK, e % I2S_BLOCK);
        out[block * 32 + pos % 32] |= ((t + 1) as u8) << (6 - 2 * (pos / 32));
    }
    out.extend_from_slice(&scale.to_le_bytes());
    out.resize(n / 4 + 32, 0);
    Ok(out)
}

/// Decodes a Q2_0 row (either group size) into trits and writes each group's f16 scale
/// (as f32) to `scales`; a code 3 (+2, legal in the format) is an error naming it, so the
/// caller can load the tensor otherwise.
pub fn q2_0_row(ty: GgmlType, bytes: &[u8], trits: &mut [i8], scales: &mut [f32]) -> Result<()> {
    check_len(ty, bytes, trits.len())?;
    let (group, bb) = (ty.block_size(), ty.block_bytes());
    for ((t, b), s) in trits
        .chunks_exact_mut(group)
        .zip(bytes.chunks_exact(bb))
        .zip(scales.iter_mut())
    {
        *s = f16_at(b, 0);
        for (j, v) in t.iter_mut().enumerate() {
            let code = (b[2 + j / 4] >> (2 * (j % 4))) & 3;
            if code == 3 {
                return Err(Error::Invalid(format!(
                    "{}: code 3 (+2) is not a ternary value",
                    ty.name()
                )));
            }
            *v = code as i8 - 1;
        }
    }
    Ok(())
}

/// Packs trits (a whole number of groups) with one f16 scale per group into Q2_0 (either
/// group size).
pub fn pack_q2_0(ty: GgmlType, trits: &[i8], scales: &[f16]) -> Result<Vec<u8>> {
    let (group, bb) = (ty.block_size(), ty.block_bytes());
    if !matches!(ty, GgmlType::Q2_0 | GgmlType::Q2_0_G128)
        || !trits.len().is_multiple_of(group)
        || trits.len() / group != scales.len()
    {
        return Err(Error::Invalid(format!(
            "{}: {} trits and {} scales are not whole groups of {group}",
            ty.name(),
            trits.len(),
            scales.len()
        )));
    }
    let mut out = vec![0u8; scales.len() * bb];
    for ((t, b), s) in trits
        .chunks_exact(group)
        .zip(out.chunks_exact_mut(bb))
        .zip(scales)
    {
        b[..2].copy_from_slice(&s.to_le_bytes());
        for (j, &v) in t.iter().enumerate() {
            if !(-1..=1).contains(&v) {
                return Err(Error::Invalid(format!("{v} is not a ternary value")));
            }
            b[2 + j / 4] |= ((v + 1) as u8) << (2 * (j % 4));
        }
    }
    Ok(out)
}

/// Packs trits (a whole number of 256-element blocks) into TQ1_0 or TQ2_0, block `i`
/// getting scale `scales[i]` (stored as f16), exactly as ggml's `quantize_row_tq*_ref`
/// lays out `round(x / d)` of a ternary-valued row.
pub fn pack_tq(ty: GgmlType, trits: &[i8], scales: &[f32]) -> Result<Vec<u8>> {
    check_trits(trits)?;
    if !trits.len().is_multiple_of(QK_K) || scales.len() != trits.len() / QK_K {
        return Err(Error::Invalid(format!(
            "{}: {} elements and {} scales do not make whole 256-element blocks",
            ty.name(),
            trits.len(),
            scales.len()
        )));
    }
    let code = |t: i8| (t + 1) as u8;
    let mut out = Vec::with_capacity(trits.len() / QK_K * ty.block_bytes());
    for (t, &d) in trits.chunks_exact(QK_K).zip(scales) {
        match ty {
            GgmlType::TQ1_0 => {
                // Five trits per byte, first trit most significant, then fixed point
                // ceil(q·256/243).
                let fix = |q: u16| (q * 256).div_ceil(243) as u8;
                for m in 0..32 {
                    let mut q = 0u16;
                    for n in 0..5 {
                        q = q * 3 + code(t[m + 32 * n]) as u16;
                    }
                    out.push(fix(q));
                }
                let t2 = &t[160..];
                for m in 0..16 {
                    let mut q = 0u16;
                    for n in 0..5 {
                        q = q * 3 + code(t2[m + 16 * n]) as u16;
                    }
                    out.push(fix(q));
                }
                let t3 = &t[240..];
                for j in 0..4 {
                    let mut q = 0u16;
                    for m in 0..4 {
                        q = q * 3 + code(t3[j + 4 * m]) as u16;
                    }
                    out.push(fix(q * 3));
                }
            }
            GgmlType::TQ2_0 => {
                for half in 0..2 {
                    let t = &t[half * 128..half * 128 + 128];
                    for m in 0..32 {
                        let mut q = 0u8;
                        for l in 0..4 {
                            q |= code(t[m + 32 * l]) << (2 * l);
                        }
                        out.push(q);
                    }
                }
            }
            other => return Err(Error::Invalid(format!("{} is not a TQ type", other.name()))),
        }
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trit_pattern(n: usize, seed: usize) -> Vec<i8> {
        (0..n)
            .map(|i| ((i * 7 + seed * 13 + i / 5) % 3) as i8 - 1)
            .collect()
    }

    #[test]
    fn ids_and_sizes_round_trip() {
        for id in 0..64 {
            if let Some(t) = GgmlType::from_id(id) {
                assert_eq!(t.id(), id);
            }
        }
        assert_eq!(GgmlType::from_id(39), None);
        assert_eq!(GgmlType::Q6_K.row_bytes(512), Some(420));
        assert_eq!(GgmlType::TQ1_0.row_bytes(256), Some(54));
        assert_eq!(GgmlType::Q4_1.row_bytes(31), None);
        assert_eq!(GgmlType::I2_S.tensor_bytes(256, 512), Ok(160));
        assert!(GgmlType::Q8_0.tensor_bytes(33, 66).is_err());
    }

    #[test]
    fn floats_decode() {
        let mut out = [0f32; 2];
        let b: Vec<u8> = [1.5f32, -2.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        dequantize_row(GgmlType::F32, &b, &mut out).unwrap();
        assert_eq!(out, [1.5, -2.25]);
        let b: Vec<u8> = [0.5f32, -3.0]
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        dequantize_row(GgmlType::F16, &b, &mut out).unwrap();
        assert_eq!(out, [0.5, -3.0]);
        let b: Vec<u8> = [0.5f32, -3.0]
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        dequantize_row(GgmlType::BF16, &b, &mut out).unwrap();
        assert_eq!(out, [0.5, -3.0]);
    }

    #[test]
    fn q4_0_q4_1_q8_0_by_hand() {
        let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend((0..16u8).map(|j| j | (15 - j) << 4));
        let mut out = [0f32; 32];
        dequantize_row(GgmlType::Q4_0, &b, &mut out).unwrap();
        assert_eq!(out[0], -4.0); // (0 - 8) * 0.5
        assert_eq!(out[15], 3.5); // (15 - 8) * 0.5
        assert_eq!(out[16], 3.5); // high nibble of byte 0 is 15
        assert_eq!(out[31], -4.0);

        let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        b.extend((0..16u8).map(|j| j | (15 - j) << 4));
        dequantize_row(GgmlType::Q4_1, &b, &mut out).unwrap();
        assert_eq!(out[1], 1.0); // 1*2 - 1
        assert_eq!(out[17], 27.0); // 14*2 - 1

        let mut b = f16::from_f32(0.25).to_le_bytes().to_vec();
        b.extend((0..32).map(|j: i32| (j - 16) as i8 as u8));
        dequantize_row(GgmlType::Q8_0, &b, &mut out).unwrap();
        assert_eq!(out[0], -4.0);
        assert_eq!(out[31], 3.75);
    }

    #[test]
    fn q6_k_places_scales_and_high_bits() {
        // One block: d = 1, scale k = k+1, every ql/qh zero except selected ones.
        let mut b = vec![0u8; 210];
        for k in 0..16 {
            b[192 + k] = (k as i8 + 1) as u8;
        }
        b[208..210].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        // Element 200 = half 1, l = 8, third quarter (q3: high nibble of ql[l], qh bits 4-5).
        b[64 + 8] = 0x50; // high nibble 5
        b[128 + 32 + 8] = 0b0010_0000; // (qh >> 4) & 3 = 2 → +32
        let mut out = [0f32; 256];
        dequantize_row(GgmlType::Q6_K, &b, &mut out).unwrap();
        // Default element: q = 0 - 32 times its scale. Element 0: scale 1.
        assert_eq!(out[0], -32.0);
        // Element 16 uses scale index 1 (value 2).
        assert_eq!(out[16], -64.0);
        // Element 200: q = 5 | 2<<4 = 37 - 32 = 5; scale index 8 + 0 + 4 = 12 (value 13).
        assert_eq!(out[200], 65.0);
    }

    #[test]
    fn tq_packing_round_trips() {
        for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
            let trits = trit_pattern(512, ty.id() as usize);
            let bytes = pack_tq(ty, &trits, &[0.5, 2.0]).unwrap();
            assert_eq!(bytes.len(), 2 * ty.block_bytes());
            let mut back = vec![0i8; 512];
            let scales = ternary_row(ty, &bytes, &mut back).unwrap();
            assert_eq!(back, trits, "{ty:?}");
            assert_eq!(scales, vec![0.5, 2.0]);
            let mut f = vec![0f32; 512];
            dequantize_row(ty, &bytes, &mut f).unwrap();
            assert_eq!(f[300], trits[300] as f32 * 2.0);
        }
    }

    #[test]
    fn tq2_0_bit_order() {
        // Element 1 of the first half lives in bits 1-0 of byte 1; element 33 in bits 3-2.
        let mut trits = vec![0i8; 256];
        trits[1] = 1;
        trits[33] = -1;
        let b = pack_tq(GgmlType::TQ2_0, &trits, &[1.0]).unwrap();
        assert_eq!(b[1], 0b01_01_00_10);
    }

    #[test]
    fn i2s_packing_round_trips_and_layout() {
        let trits = trit_pattern(384, 3);
        let bytes = pack_i2s(&trits, 0.75).unwrap();
        assert_eq!(bytes.len(), 384 / 4 + 32);
        assert_eq!(i2s_scale(&bytes, 384).unwrap(), 0.75);
        let mut back = vec![0i8; 384];
        i2s_decode(&bytes[..96], 0, &mut back).unwrap();
        assert_eq!(back, trits);
        back.fill(0);
        assert_eq!(
            ternary_row(GgmlType::I2_S, &bytes, &mut back).unwrap(),
            vec![0.75]
        );
        assert_eq!(back, trits);
        // A slice starting mid-block.
        let mut part = vec![0i8; 100];
        i2s_decode(&bytes, 150, &mut part).unwrap();
        assert_eq!(part, &trits[150..250]);
        // Byte 0 of a block: element 0 in bits 7-6, element 96 in bits 1-0.
        let mut t = vec![0i8; 128];
        t[0] = 1;
        t[96] = -1;
        let b = pack_i2s(&t, 1.0).unwrap();
        assert_eq!(b[0], 0b10_01_01_00);
    }

    /// Deterministic standard normal samples (xorshift64 and Box-Muller).
    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect()
    }

    fn q6_k_round_trip(x: &[f32]) -> Vec<f32> {
        let b = quantize_q6_k(x).unwrap();
        assert_eq!(b.len(), x.len() / 256 * 210);
        let mut y = vec![0f32; x.len()];
        dequantize_row(GgmlType::Q6_K, &b, &mut y).unwrap();
        y
    }

    fn rms(x: impl Iterator<Item = f32>) -> f32 {
        let (mut s, mut n) = (0f64, 0usize);
        for v in x {
            s += (v as f64) * (v as f64);
            n += 1;
        }
        (s / n as f64).sqrt() as f32
    }

    #[test]
    fn q6_k_zeros_and_constants_give_exact_codes() {
        // Zeros: every code 32 (q = 0): low nibbles 0, high bits 2 in every 2-bit field.
        let b = quantize_q6_k(&[0.0; 512]).unwrap();
        for blk in b.chunks_exact(210) {
            assert!(blk[..128].iter().all(|&v| v == 0));
            assert!(blk[128..192].iter().all(|&v| v == 0xAA));
            assert!(blk[192..210].iter().all(|&v| v == 0));
        }
        // A constant c: every weight at q = -32 (code 0), every scale -127 for c > 0 (+127
        // for c < 0), d = f16(|c| / (32·127)).
        for c in [1.0f32, -0.37, 1000.0] {
            let b = quantize_q6_k(&[c; 256]).unwrap();
            assert!(b[..192].iter().all(|&v| v == 0), "{c}");
            let sc = if c > 0.0 { -127i8 } else { 127 };
            assert!(b[192..208].iter().all(|&v| v as i8 == sc), "{c}");
            let d = f16::from_le_bytes([b[208], b[209]]).to_bits() as i32;
            let want = f16::from_f32(c.abs() / (32.0 * 127.0)).to_bits() as i32;
            assert!((d - want).abs() <= 1, "{c}: d bits {d:#x} vs {want:#x}");
            let y = q6_k_round_trip(&[c; 256]);
            assert!(y.iter().all(|&v| v == y[0]));
            assert!((y[0] - c).abs() <= 5e-4 * c.abs(), "{c}: {}", y[0]);
        }
        // Small constants make d subnormal in f16 (steps of 2^-24, 12% of d at c = 2e-3):
        // d's neighbours and the int8 scales' still get within 1%.
        for c in [0.01f32, -2e-3, 3e-4] {
            let y = q6_k_round_trip(&[c; 256]);
            assert!(y.iter().all(|&v| v == y[0]));
            assert!((y[0] - c).abs() <= 1e-2 * c.abs(), "{c}: {}", y[0]);
        }
    }

    #[test]
    fn q6_k_one_hot() {
        // One weight of 1 at element 200 (half 1, quarter 2, l 8 → ql[64+8] high nibble,
        // qh[32+8] bits 4-5; sub-block 12): q = -32 (code 0) with scale -127; every other
        // sub-block has scale 0 and every other weight code 32.
        let mut x = vec![0f32; 256];
        x[200] = 1.0;
        let b = quantize_q6_k(&x).unwrap();
        let sc: Vec<i8> = b[192..208].iter().map(|&v| v as i8).collect();
        for (j, &s) in sc.iter().enumerate() {
            assert_eq!(s, if j == 12 { -127 } else { 0 }, "scale {j}");
        }
        assert_eq!(b[64 + 8], 0x00);
        assert_eq!(b[128 + 32 + 8], 0b10_00_10_10);
        assert!(b[..128].iter().all(|&v| v == 0));
        for (i, &v) in b[128..192].iter().enumerate() {
            if i != 32 + 8 {
                assert_eq!(v, 0xAA, "qh[{i}]");
            }
        }
        let y = q6_k_round_trip(&x);
        assert!((y[200] - 1.0).abs() < 1e-3, "{}", y[200]);
        assert!(y.iter().enumerate().all(|(i, &v)| i == 200 || v == 0.0));
    }

    #[test]
    fn q6_k_round_trip_error() {
        // Gaussian rows: a 6-bit grid over ±max of 16 weights (~±2σ) errs by ~1.8% of σ at
        // best (step/√12); require < 2% of the row RMS, and no worse than the plain
        // scheme (scale = max|x|/32 per sub-block, kept in f32).
        for (seed, scale) in [(1u64, 1.0f32), (2, 0.02), (3, 300.0), (4, 1e-3)] {
            let x: Vec<f32> = gaussian(8 * 256, seed).iter().map(|v| v * scale).collect();
            let y = q6_k_round_trip(&x);
            let err = rms(x.iter().zip(&y).map(|(a, b)| a - b)) / rms(x.iter().copied());
            let plain: Vec<f32> = x
                .chunks_exact(16)
                .flat_map(|sub| {
                    let s = sub.iter().fold(0f32, |m, v| m.max(v.abs())) / 32.0;
                    sub.iter()
                        .map(move |v| (v / s).round().clamp(-32.0, 31.0) * s)
                })
                .collect();
            let plain_err = rms(x.iter().zip(&plain).map(|(a, b)| a - b)) / rms(x.iter().copied());
            assert!(err < 0.02, "seed {seed}: relative RMS error {err}");
            assert!(err < plain_err, "seed {seed}: {err} vs plain {plain_err}");
        }
        // A row whose sub-blocks differ by orders of magnitude keeps the small ones.
        let mut x = gaussian(256, 9);
        for (j, sub) in x.chunks_exact_mut(16).enumerate() {
            let m = 10f32.powi(j as i32 % 4 - 2);
            sub.iter_mut().for_each(|v| *v *= m);
        }
        let y = q6_k_round_trip(&x);
        for (j, (a, b)) in x.chunks_exact(16).zip(y.chunks_exact(16)).enumerate() {
            let err = rms(a.iter().zip(b).map(|(p, q)| p - q)) / rms(a.iter().copied());
            let bound = if j % 4 == 0 { 0.5 } else { 0.06 };
            assert!(err < bound, "sub-block {j}: {err}");
        }
    }

    #[test]
    fn q6_k_rejects_bad_rows() {
        let err = quantize_q6_k(&[0.0; 300]).unwrap_err();
        assert!(err.to_string().contains("multiple of 256"), "{err}");
        let mut x = vec![0.0f32; 256];
        x[7] = f32::NAN;
        assert!(quantize_q6_k(&x).unwrap_err().to_string().contains("at 7"));
        x[7] = 1e12;
        assert!(quantize_q6_k(&x)
            .unwrap_err()
            .to_string()
            .contains("too large"));
    }

    #[test]
    fn rejects_bad_input() {
        let mut out = [0f32; 32];
        let err = dequantize_row(GgmlType::Q8_0, &[0u8; 33], &mut out).unwrap_err();
        assert!(err.to_string().contains("need 34 bytes"), "{err}");
        assert!(pack_tq(GgmlType::TQ2_0, &[2i8; 256], &[1.0]).is_err());
        assert!(pack_i2s(&[0i8; 132], 1.0).is_err());
        let mut t = [0i8; 4];
        assert!(i2s_decode(&[0xFF], 0, &mut t).is_err());
    }
}
