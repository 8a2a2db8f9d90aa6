//! Model → GGUF: writes a [`ModelWeights`] with its [`ModelConfig`] as a GGUF file whose
//! ternary linears are TQ1_0, TQ2_0 (llama.cpp) or I2_S (microsoft's bitnet.cpp), so our
//! models run in the peers too and our loader reads back exactly what it wrote.

use super::config::{Activation, ModelConfig};
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
}

/// llama.cpp's `llama_ftype` for the file's main type (`general.file_type`).
fn file_type(t: GgmlType) -> u32 {
    match t {
        GgmlType::TQ1_0 => 36,
        GgmlType::TQ2_0 => 37,
        // microsoft's fork: LLAMA_FTYPE_MOSTLY_I2_S.
        _ => 40,
    }
}

/// Writes `weights` to `path`. `tokenizer` is the `tokenizer.ggml.*` metadata to embed.
pub fn write_gguf(
    config: &ModelConfig,
    weights: &ModelWeights,
    tokenizer: &[(String, GgufValue)],
    export: &GgufExport,
    path: &Path,
) -> Result<()> {
    let arch = export.architecture.as_str();
    if !matches!(
        export.ternary_type,
        GgmlType::TQ1_0 | GgmlType::TQ2_0 | GgmlType::I2_S
    ) {
        return Err(Error::Invalid(format!(
            "{} is not a ternary GGUF type (TQ1_0, TQ2_0, I2_S)",
            export.ternary_type.name()
        )));
    }
    let mut w = GgufWriter::new();
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
    if arch == "bitnet" {
        // llama.cpp's `bitnet` graph assumes SiLU; say which one this model uses.
        w.add_metadata(
            k("hidden_act"),
            GgufValue::String(config.activation.name().into()),
        );
    } else if config.activation != Activation::Relu2 && arch != "llama" {
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
    for (i, l) in weights.layers.iter().enumerate() {
        let b = |s: &str| format!("blk.{i}.{s}");
        add_norm(&mut w, &b("attn_norm.weight"), &l.attn_norm);
        add_linear(&mut w, &b("attn_q.weight"), &l.q_proj, export)?;
        add_linear(&mut w, &b("attn_k.weight"), &l.k_proj, export)?;
        add_linear(&mut w, &b("attn_v.weight"), &l.v_proj, export)?;
        if let Some(n) = &l.attn_sub_norm {
            add_norm(&mut w, &b("attn_sub_norm.weight"), n);
        }
        add_linear(&mut w, &b("attn_output.weight"), &l.o_proj, export)?;
        add_norm(&mut w, &b("ffn_norm.weight"), &l.ffn_norm);
        add_linear(&mut w, &b("ffn_gate.weight"), &l.gate_proj, export)?;
        add_linear(&mut w, &b("ffn_up.weight"), &l.up_proj, export)?;
        if let Some(n) = &l.ffn_sub_norm {
            add_norm(&mut w, &b("ffn_sub_norm.weight"), n);
        }
        add_linear(&mut w, &b("ffn_down.weight"), &l.down_proj, export)?;
    }
    add_norm(&mut w, "output_norm.weight", &weights.output_norm);
    if let Some(head) = &weights.lm_head {
        add_linear(&mut w, "output.weight", head, export)?;
    }
    w.write(path)
}

fn add_norm(w: &mut GgufWriter, name: &str, n: &RmsNorm) {
    w.add_f32(name, &[n.weight.len() as u64], &n.weight);
}

fn add_linear(w: &mut GgufWriter, name: &str, l: &Linear, export: &GgufExport) -> Result<()> {
    if l.input_norm.is_some() {
        return Err(Error::Invalid(format!(
            "{name}: per-linear input norms (use_rms_norm) have no GGUF form"
        )));
    }
    match &l.weights {
        LinearWeights::Ternary(m) => add_ternary(w, name, m, export.ternary_type),
        LinearWeights::Dense(m) => add_dense(w, name, m, GgmlType::F16),
    }
}

fn add_ternary(w: &mut GgufWriter, name: &str, m: &TernaryMatrix, ty: GgmlType) -> Result<()> {
    let (rows, cols) = (m.rows(), m.cols());
    let bad = |msg: String| Error::Invalid(format!("{name}: {msg}"));
    let mut trits = vec![0i8; cols];
    let bytes = if ty == GgmlType::I2_S {
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
        for r in 0..rows {
            row_trits(m, r, &mut trits);
            let d = f16::from_f32(m.multipliers()[r]);
            if d.to_f32() != m.multipliers()[r] {
                return Err(bad(format!(
                    "row {r}'s scale {} has no exact f16 form for {}",
                    m.multipliers()[r],
                    ty.name()
                )));
            }
            out.extend(ggml::pack_tq(ty, &trits, &vec![d.to_f32(); blocks])?);
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

fn row_trits(m: &TernaryMatrix, r: usize, out: &mut [i8]) {
    for (c, t) in out.iter_mut().enumerate() {
        *t = m.trit(r, c);
    }
}
