//! Model → GGUF: writes a [`ModelWeights`] with its [`ModelConfig`] as a GGUF file whose
//! ternary linears are TQ1_0, TQ2_0 (llama.cpp) or I2_S (microsoft's bitnet.cpp), so our
//! models run in the peers too and our loader reads back exactly what it wrote.

use super::config::{Activation, ModelConfig};
use super::rope::{self, RopeScaling};
use super::weights::{Linear, LinearWeights, ModelWeights, RmsNorm};
use crate::formats::ggml::{self, GgmlType};
use crate::formats::gguf::{GgufValue, GgufWriter};
use crate::kernels::{DenseMatrix, TernaryMatrix};
use crate::{Error, Result};
use half::f16;
use std::path::Path;

/// How to store the model.
#[derive(Debug, Clone)]
pub struct GgufExport {
    /// `bitnet` (llama.cpp), `bitnet-b1.58` (ik_llama.cpp), `bitnet-25` (bitnet.cpp).
    pub architecture: String,
    /// TQ1_0, TQ2_0 or I2_S.
    pub ternary_type: GgmlType,
    /// F32, F16, Q8_0 or Q6_K for the token embedding (and the lm_head when tied). Q6_K
    /// needs a hidden size that is a multiple of 256 (an error naming the tensor otherwise;
    /// there is no silent fallback to another type).
    pub embedding_type: GgmlType,
    pub name: String,
    /// TQ1_0/TQ2_0 store one f16 scale a 256-weight block. A ternary scale with no exact
    /// f16 form is an error unless this is set; then it is rounded to the nearest f16 (ties
    /// to even), and [`GgufWritten`] says how many were and by how much. Scales outside
    /// f16's normal range (they would become infinite, zero or a subnormal that loses
    /// precision) stay errors. I2_S keeps an f32 scale and never rounds.
    pub round_scales: bool,
}

impl GgufExport {
    /// An export that refuses inexact scales (`round_scales: false`).
    pub fn new(
        architecture: impl Into<String>,
        ternary_type: GgmlType,
        embedding_type: GgmlType,
        name: impl Into<String>,
    ) -> Self {
        Self {
            architecture: architecture.into(),
            ternary_type,
            embedding_type,
            name: name.into(),
            round_scales: false,
        }
    }
}

/// What [`write_gguf`] changed on the way.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufWritten {
    /// Distinct ternary scales rounded to f16 (a per-tensor scale shared by every row counts
    /// once; per-row scales count once per distinct value in the tensor).
    pub rounded_scales: usize,
    /// Tensors with at least one rounded scale.
    pub rounded_tensors: usize,
    /// The largest `|f16(s) - s| / |s|` over the rounded scales (0 when none was).
    pub max_relative_change: f64,
}

impl GgufWritten {
    /// One line for the user: `rounded 70 scales in 70 tensors to f16 (largest relative
    /// change 2.4e-4)`.
    pub fn rounding_summary(&self) -> String {
        if self.rounded_scales == 0 {
            return "rounded no scales: every ternary scale has an exact f16 form".into();
        }
        format!(
            "rounded {} scale{} in {} tensor{} to f16 (largest relative change {:.1e})",
            self.rounded_scales,
            if self.rounded_scales == 1 { "" } else { "s" },
            self.rounded_tensors,
            if self.rounded_tensors == 1 { "" } else { "s" },
            self.max_relative_change
        )
    }
}

/// llama.cpp's `llama_ftype` for the file's main type (`general.file_type`).
fn file_type(t: GgmlType) -> u32 {
    match t {
        GgmlType::TQ1_0 => 36,
        GgmlType::TQ2_0 => 37,
        // llama.cpp's LLAMA_FTYPE_MOSTLY_Q2_0.
        GgmlType::Q2_0 | GgmlType::Q2_0_G128 => 41,
        // microsoft's fork: LLAMA_FTYPE_MOSTLY_I2_S.
        _ => 40,
    }
}

/// Writes `weights` to `path`. `tokenizer` is the `tokenizer.ggml.*` metadata to embed.
/// Returns what was changed on the way (scales rounded under `export.round_scales`).
pub fn write_gguf(
    config: &ModelConfig,
    weights: &ModelWeights,
    tokenizer: &[(String, GgufValue)],
    export: &GgufExport,
    path: &Path,
) -> Result<GgufWritten> {
    write_gguf_with_progress(config, weights, tokenizer, export, path, &mut |_, _| {})
}

/// [`write_gguf`], calling `progress(done, total)` as it goes: once a step for the embedding,
/// each layer, and the output layer with the file's write (`total` = layers + 2).
pub fn write_gguf_with_progress(
    config: &ModelConfig,
    weights: &ModelWeights,
    tokenizer: &[(String, GgufValue)],
    export: &GgufExport,
    path: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<GgufWritten> {
    let total = weights.layers.len() + 2;
    let arch = export.architecture.as_str();
    if !matches!(
        export.ternary_type,
        GgmlType::TQ1_0 | GgmlType::TQ2_0 | GgmlType::I2_S | GgmlType::Q2_0 | GgmlType::Q2_0_G128
    ) {
        return Err(Error::Invalid(format!(
            "{} is not a ternary GGUF type (TQ1_0, TQ2_0, I2_S, Q2_0, Q2_0_g128)",
            export.ternary_type.name()
        )));
    }
    let mut w = GgufWriter::new();
    let mut written = GgufWritten::default();
    let k = |s: &str| format!("{arch}.{s}");
    let u32v = |v: usize| GgufValue::U32(v as u32);
    w.add_metadata("general.architecture", GgufValue::String(arch.into()))
        .add_metadata("general.name", GgufValue::String(export.name.clone()))
        .add_metadata(
            "general.file_type",
            GgufValue::U32(file_type(export.ternary_type)),
        )
        .add_metadata(k("vocab_size"), u32v(config.vocab_size))
        .add_metadata(k("context_length"), u32v(config.max_context))
        .add_metadata(k("embedding_length"), u32v(config.hidden_size))
        .add_metadata(k("block_count"), u32v(config.n_layers))
        .add_metadata(k("feed_forward_length"), u32v(config.ffn_size))
        .add_metadata(k("attention.head_count"), u32v(config.n_heads))
        .add_metadata(k("attention.head_count_kv"), u32v(config.n_kv_heads))
        .add_metadata(k("attention.key_length"), u32v(config.head_dim))
        .add_metadata(k("attention.value_length"), u32v(config.head_dim))
        .add_metadata(k("rope.dimension_count"), u32v(config.head_dim))
        .add_metadata(k("rope.freq_base"), GgufValue::F32(config.rope_theta))
        .add_metadata(
            k("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(config.rms_norm_eps),
        );
    add_rope_scaling(&mut w, config, arch)?;
    if config.qk_norm != (arch == "qwen3") {
        return Err(Error::Invalid(format!(
            "architecture {arch}: {}",
            if config.qk_norm {
                "the model norms query/key heads (Qwen3); write it as architecture qwen3"
            } else {
                "qwen3 files norm query/key heads, which this model does not"
            }
        )));
    }
    if arch == "qwen3" && (config.activation != Activation::Silu || config.has_sub_norms) {
        return Err(Error::Invalid(
            "architecture qwen3 implies SiLU and no BitNet sub-norms".into(),
        ));
    }
    if arch == "bitnet" {
        // llama.cpp's `bitnet` graph assumes SiLU; say which one this model uses.
        w.add_metadata(
            k("hidden_act"),
            GgufValue::String(config.activation.name().into()),
        );
    } else if config.activation != Activation::Relu2 && arch != "llama" && arch != "qwen3" {
        return Err(Error::Invalid(format!(
            "architecture {arch} implies ReLU²; this model uses {}",
            config.activation.name()
        )));
    }
    for (key, value) in tokenizer {
        w.add_metadata(key.clone(), value.clone());
    }

    add_dense(
        &mut w,
        "token_embd.weight",
        &weights.token_embedding,
        export.embedding_type,
    )?;
    progress(1, total);
    for (i, l) in weights.layers.iter().enumerate() {
        let b = |s: &str| format!("blk.{i}.{s}");
        add_norm(&mut w, &b("attn_norm.weight"), &l.attn_norm);
        add_linear(&mut w, &b("attn_q.weight"), &l.q_proj, export, &mut written)?;
        add_linear(&mut w, &b("attn_k.weight"), &l.k_proj, export, &mut written)?;
        add_linear(&mut w, &b("attn_v.weight"), &l.v_proj, export, &mut written)?;
        if let Some(n) = &l.q_norm {
            add_norm(&mut w, &b("attn_q_norm.weight"), n);
        }
        if let Some(n) = &l.k_norm {
            add_norm(&mut w, &b("attn_k_norm.weight"), n);
        }
        if let Some(n) = &l.attn_sub_norm {
            add_norm(&mut w, &b("attn_sub_norm.weight"), n);
        }
        add_linear(
            &mut w,
            &b("attn_output.weight"),
            &l.o_proj,
            export,
            &mut written,
        )?;
        add_norm(&mut w, &b("ffn_norm.weight"), &l.ffn_norm);
        add_linear(
            &mut w,
            &b("ffn_gate.weight"),
            &l.gate_proj,
            export,
            &mut written,
        )?;
        add_linear(
            &mut w,
            &b("ffn_up.weight"),
            &l.up_proj,
            export,
            &mut written,
        )?;
        if let Some(n) = &l.ffn_sub_norm {
            add_norm(&mut w, &b("ffn_sub_norm.weight"), n);
        }
        add_linear(
            &mut w,
            &b("ffn_down.weight"),
            &l.down_proj,
            export,
            &mut written,
        )?;
        progress(i + 2, total);
    }
    add_norm(&mut w, "output_norm.weight", &weights.output_norm);
    if let Some(head) = &weights.lm_head {
        add_linear(&mut w, "output.weight", head, export, &mut written)?;
    }
    w.write(path)?;
    progress(total, total);
    Ok(written)
}

/// llama.cpp's RoPE scaling keys; Llama 3's scaling as the `rope_freqs` tensor of
/// per-dimension divisors its converter writes. Scalings llama.cpp cannot express (dynamic,
/// longrope, YaRN without truncation) are refused rather than dropped.
fn add_rope_scaling(w: &mut GgufWriter, c: &ModelConfig, arch: &str) -> Result<()> {
    let k = |s: &str| format!("{arch}.rope.scaling.{s}");
    let refuse = |what: &str| {
        Err(Error::Invalid(format!(
            "`{what}` RoPE scaling has no GGUF (llama.cpp) form; convert to a Hugging Face directory instead"
        )))
    };
    match &c.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            w.add_metadata(k("type"), GgufValue::String("linear".into()))
                .add_metadata(k("factor"), GgufValue::F32(*factor));
        }
        RopeScaling::Yarn {
            factor,
            original_context,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate: true,
        } => {
            // llama.cpp multiplies its attention factor by 1 + 0.1·ln(factor) itself.
            let attn = *attention_factor as f64 / rope::yarn_mscale(*factor as f64, 1.0);
            w.add_metadata(k("type"), GgufValue::String("yarn".into()))
                .add_metadata(k("factor"), GgufValue::F32(*factor))
                .add_metadata(
                    k("original_context_length"),
                    GgufValue::U32(*original_context as u32),
                )
                .add_metadata(k("yarn_beta_fast"), GgufValue::F32(*beta_fast))
                .add_metadata(k("yarn_beta_slow"), GgufValue::F32(*beta_slow))
                .add_metadata(k("yarn_attn_factor"), GgufValue::F32(attn as f32));
        }
        RopeScaling::Yarn { .. } => return refuse("yarn (truncate: false)"),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => {
            // llama.cpp's converter: from the f32 frequencies, in Python's f64 math.
            let (d, old) = (c.head_dim, *original_context as f64);
            let (factor, low, high) = (
                *factor as f64,
                *low_freq_factor as f64,
                *high_freq_factor as f64,
            );
            let factors: Vec<f32> = (0..d / 2)
                .map(|i| {
                    let freq = (1.0 / c.rope_theta.powf((2 * i) as f32 / d as f32)) as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < old / high {
                        1.0
                    } else if wavelen > old / low {
                        factor as f32
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                    }
                })
                .collect();
            w.add_f32("rope_freqs.weight", &[factors.len() as u64], &factors);
        }
        RopeScaling::FreqFactors(f) => {
            w.add_f32("rope_freqs.weight", &[f.len() as u64], f);
        }
        RopeScaling::Dynamic { .. } => return refuse("dynamic"),
        RopeScaling::LongRope { .. } => return refuse("longrope"),
    }
    Ok(())
}

fn add_norm(w: &mut GgufWriter, name: &str, n: &RmsNorm) {
    w.add_f32(name, &[n.weight.len() as u64], &n.weight);
}

fn add_linear(
    w: &mut GgufWriter,
    name: &str,
    l: &Linear,
    export: &GgufExport,
    written: &mut GgufWritten,
) -> Result<()> {
    if l.input_norm.is_some() {
        return Err(Error::Invalid(format!(
            "{name}: per-linear input norms (use_rms_norm) have no GGUF form"
        )));
    }
    match &l.weights {
        LinearWeights::Ternary(m) => add_ternary(w, name, m, export, written),
        LinearWeights::Dense(m) => add_dense(w, name, m, GgmlType::F16),
    }
}

fn add_ternary(
    w: &mut GgufWriter,
    name: &str,
    m: &TernaryMatrix,
    export: &GgufExport,
    written: &mut GgufWritten,
) -> Result<()> {
    let ty = export.ternary_type;
    let (rows, cols) = (m.rows(), m.cols());
    let bad = |msg: String| Error::Invalid(format!("{name}: {msg}"));
    let mut trits = vec![0i8; cols];
    if m.group() != 0 && !matches!(ty, GgmlType::Q2_0 | GgmlType::Q2_0_G128) {
        return Err(bad(format!(
            "group-wise scales (one per {}) need Q2_0; {} holds {}",
            m.group(),
            ty.name(),
            if ty == GgmlType::I2_S {
                "one scale a tensor"
            } else {
                "one scale per 256 weights"
            }
        )));
    }
    let bytes = if matches!(ty, GgmlType::Q2_0 | GgmlType::Q2_0_G128) {
        let group = ty.block_size();
        if cols % group != 0 {
            return Err(bad(format!(
                "{cols} columns are not whole groups of {group}"
            )));
        }
        if m.group() != 0 && m.group() < group {
            // A finer grouping than the file's cannot be merged without loss.
            return Err(bad(format!(
                "scales per {} weights cannot be stored as {} (one per {group})",
                m.group(),
                ty.name()
            )));
        }
        let groups = cols / group;
        let mut out = Vec::with_capacity(rows * groups * ty.block_bytes());
        let mut scales = vec![f16::ZERO; groups];
        let mut rounded = std::collections::BTreeSet::new();
        for r in 0..rows {
            row_trits(m, r, &mut trits);
            for (g, d) in scales.iter_mut().enumerate() {
                let s = match m.group() {
                    0 => m.multipliers()[r],
                    mg => m.group_scales_row(r).get(g * group / mg),
                };
                *d = f16_scale(s, export.round_scales, ty)
                    .map_err(|e| bad(format!("row {r}'s scale {s} {e}")))?;
                if d.to_f32() != s && rounded.insert(s.to_bits()) {
                    written.max_relative_change =
                        written.max_relative_change.max(relative_change(s, *d));
                }
            }
            out.extend(ggml::pack_q2_0(ty, &trits, &scales)?);
        }
        if !rounded.is_empty() {
            written.rounded_scales += rounded.len();
            written.rounded_tensors += 1;
        }
        out
    } else if ty == GgmlType::I2_S {
        // One scale for the whole tensor: every row must share it.
        let scale = m.multipliers().first().copied().unwrap_or(1.0);
        if m.multipliers().iter().any(|&s| s != scale) {
            return Err(bad(
                "I2_S holds one scale a tensor; rows have different ones".into(),
            ));
        }
        let mut all = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            row_trits(m, r, &mut trits);
            all.extend_from_slice(&trits);
        }
        ggml::pack_i2s(&all, scale)?
    } else {
        if cols % ggml::QK_K != 0 {
            return Err(bad(format!(
                "{cols} columns are not a multiple of {}",
                ggml::QK_K
            )));
        }
        let blocks = cols / ggml::QK_K;
        let mut out = Vec::with_capacity(rows * blocks * ty.block_bytes());
        // Bits of the scales rounded in this tensor: rows sharing one scale count once.
        let mut rounded = std::collections::BTreeSet::new();
        for r in 0..rows {
            row_trits(m, r, &mut trits);
            let s = m.multipliers()[r];
            let d = f16_scale(s, export.round_scales, ty)
                .map_err(|e| bad(format!("row {r}'s scale {s} {e}")))?;
            if d.to_f32() != s && rounded.insert(s.to_bits()) {
                written.max_relative_change =
                    written.max_relative_change.max(relative_change(s, d));
            }
            out.extend(ggml::pack_tq(ty, &trits, &vec![d.to_f32(); blocks])?);
        }
        if !rounded.is_empty() {
            written.rounded_scales += rounded.len();
            written.rounded_tensors += 1;
        }
        out
    };
    w.add_tensor_raw(name, &[cols as u64, rows as u64], ty.id(), bytes);
    Ok(())
}

fn add_dense(w: &mut GgufWriter, name: &str, m: &DenseMatrix, ty: GgmlType) -> Result<()> {
    use rayon::prelude::*;
    let (rows, cols) = (m.rows(), m.cols());
    let bad = |msg: String| Error::Invalid(format!("{name}: {msg}"));
    let row_bytes = match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0 | GgmlType::Q6_K => {
            ty.row_bytes(cols).ok_or_else(|| {
                bad(format!(
                    "{cols} columns are not a multiple of the {}-weight {} block; F16 or F32 \
                     can store it (Q8_0 too if a multiple of 32)",
                    ty.block_size(),
                    ty.name()
                ))
            })?
        }
        other => {
            return Err(bad(format!(
                "cannot write float tensors as {}",
                other.name()
            )))
        }
    };
    let encode = |r: usize, out: &mut [u8]| -> Result<()> {
        let mut row = vec![0.0f32; cols];
        m.row_to_f32(r, &mut row);
        match ty {
            GgmlType::F32 => {
                for (o, v) in out.chunks_exact_mut(4).zip(&row) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            GgmlType::F16 => {
                for (o, v) in out.chunks_exact_mut(2).zip(&row) {
                    o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
                }
            }
            GgmlType::Q8_0 => out.copy_from_slice(&ggml::quantize_q8_0(&row)?),
            _ => out.copy_from_slice(
                &ggml::quantize_q6_k(&row).map_err(|e| bad(format!("row {r}: {e}")))?,
            ),
        }
        Ok(())
    };
    let mut bytes = vec![0u8; rows * row_bytes];
    if row_bytes > 0 {
        // Q6_K searches scales per sub-block: worth spreading a large vocabulary over cores.
        bytes
            .par_chunks_mut(row_bytes)
            .enumerate()
            .try_for_each(|(r, out)| encode(r, out))?;
    }
    w.add_tensor_raw(name, &[cols as u64, rows as u64], ty.id(), bytes);
    Ok(())
}

/// `|f16(s) - s| / |s|`.
fn relative_change(s: f32, d: f16) -> f64 {
    ((d.to_f32() as f64 - s as f64) / s as f64).abs()
}

/// The f16 a TQ block of type `ty` stores for scale `s`: `s` itself when exact; with
/// `round`, the nearest f16 (ties to even) when that is a normal f16. Otherwise the error
/// says why; it reads after "row R's scale S ".
fn f16_scale(s: f32, round: bool, ty: GgmlType) -> std::result::Result<f16, String> {
    let ty = ty.name();
    if !s.is_finite() {
        return Err(format!("is not finite; {ty} cannot store it"));
    }
    let d = f16::from_f32(s);
    if d.to_f32() == s {
        return Ok(d);
    }
    if d.is_infinite() {
        return Err(format!(
            "is beyond f16's largest value ({}): {ty} stores its scales as f16",
            f16::MAX
        ));
    }
    let change = relative_change(s, d);
    if d.to_f32().abs() < f16::MIN_POSITIVE.to_f32() {
        // Zero or a subnormal: more than f16's 11 significant bits would be lost.
        return Err(format!(
            "is below f16's smallest normal value ({:e}) and would become {} (relative \
             change {change:.1e}): {ty} stores its scales as f16",
            f16::MIN_POSITIVE.to_f32(),
            d.to_f32()
        ));
    }
    if !round {
        return Err(format!(
            "has no exact f16 form for {ty}; pass --round-scales to round it to {} \
             (relative change {change:.1e})",
            d.to_f32()
        ));
    }
    Ok(d)
}

fn row_trits(m: &TernaryMatrix, r: usize, out: &mut [i8]) {
    for (c, t) in out.iter_mut().enumerate() {
        *t = m.trit(r, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TQ2: GgmlType = GgmlType::TQ2_0;

    #[test]
    fn exact_scales_pass_unchanged_with_or_without_rounding() {
        for s in [
            1.0f32,
            0.5,
            -0.25,
            0.0,
            65504.0,
            2f32.powi(-14),
            2f32.powi(-24),
        ] {
            for round in [false, true] {
                assert_eq!(f16_scale(s, round, TQ2).unwrap().to_f32(), s, "{s}");
            }
        }
    }

    #[test]
    fn inexact_scales_need_the_flag_and_round_to_nearest_even() {
        let s = 0.05839416f32;
        let e = f16_scale(s, false, TQ2).unwrap_err();
        assert!(e.contains("no exact f16 form for TQ2_0"), "{e}");
        assert!(e.contains("pass --round-scales"), "{e}");
        let d = f16_scale(s, true, TQ2).unwrap();
        // The nearest f16, not a truncation: within half an f16 ulp (2^-11 relative).
        assert!(relative_change(s, d) <= 2f64.powi(-11), "{d}");
        let below = f16::from_bits(d.to_bits() - 1).to_f32();
        let above = f16::from_bits(d.to_bits() + 1).to_f32();
        assert!(below < s && s < above, "{below} {s} {above}");
        assert!((d.to_f32() - s).abs() <= (below - s).abs());
        assert!((d.to_f32() - s).abs() <= (above - s).abs());
        // Ties go to the even mantissa: 1 + 2^-11 → 1, 1 + 3·2^-11 → 1 + 2^-9.
        let tie = |k: f32| {
            f16_scale(1.0 + k * 2f32.powi(-11), true, TQ2)
                .unwrap()
                .to_f32()
        };
        assert_eq!(tie(1.0), 1.0);
        assert_eq!(tie(3.0), 1.0 + 2f32.powi(-9));
        // Negative scales round symmetrically.
        assert_eq!(f16_scale(-s, true, TQ2).unwrap().to_f32(), -d.to_f32());
    }

    #[test]
    fn out_of_range_scales_stay_errors_even_when_rounding() {
        let tq1 = GgmlType::TQ1_0;
        let e = f16_scale(1e6, true, tq1).unwrap_err();
        assert!(
            e.contains("beyond f16's largest value") && e.contains("TQ1_0"),
            "{e}"
        );
        // Would flush to zero, or to a subnormal with a few bits left.
        for s in [1e-9f32, 1e-6] {
            let e = f16_scale(s, true, TQ2).unwrap_err();
            assert!(e.contains("below f16's smallest normal value"), "{s}: {e}");
        }
        for s in [f32::NAN, f32::INFINITY] {
            assert!(f16_scale(s, true, TQ2).unwrap_err().contains("not finite"));
        }
    }

    #[test]
    fn summary_line_counts_and_reports_the_largest_change() {
        let w = GgufWritten {
            rounded_scales: 70,
            rounded_tensors: 70,
            max_relative_change: 2.4e-4,
        };
        assert_eq!(
            w.rounding_summary(),
            "rounded 70 scales in 70 tensors to f16 (largest relative change 2.4e-4)"
        );
        assert!(GgufWritten::default()
            .rounding_summary()
            .contains("every ternary scale has an exact f16 form"));
    }
}
