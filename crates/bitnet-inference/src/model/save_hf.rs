//! Model → Hugging Face directory: writes a [`ModelWeights`] with its [`ModelConfig`] as a
//! `config.json` + `model.safetensors` pair that transformers loads as `BitNetForCausalLM`
//! (models with BitNet sub-norms) or `LlamaForCausalLM` (ternary Llama-architecture models),
//! both with `quantization_config = {quant_method: bitnet, linear_class: bitlinear,
//! quantization_mode: offline}`; the layout of microsoft/bitnet-b1.58-2B-4T.
//!
//! - Ternary linears: `uint8 [out/4, in]`, bits `2i..2i+1` of packed row `r` hold row
//!   `r + i·out/4` as `trit + 1`, and a one-element `weight_scale` with
//!   `y = dot / (s · weight_scale)`. The multiplier must be the same for every row; the scale is
//!   stored as bf16 when a bf16 value `w` gives `1/w == multiplier` exactly in f32 (so the
//!   loader reads back the same multiplier), else as f32 when an f32 value does (models
//!   ternarized from float masters have arbitrary f32 scales), else it is an error.
//! - Float tensors keep the embedding's in-memory type (bf16, f16, f32); an f32 tensor (and
//!   every norm) is written as bf16 when each value is exact in bf16, else f32.
//! - Per-linear input norms (`use_rms_norm`) and float linears inside the blocks are errors:
//!   the file could not say how transformers should run them.
//!
//! The directory is written under a temporary name beside `out` and renamed when complete.

use super::config::{GenerationDefaults, ModelConfig};
use super::rope::RopeScaling;
use super::weights::{Linear, LinearWeights, ModelWeights, RmsNorm};
use crate::kernels::{DenseData, DenseMatrix, TernaryMatrix};
use crate::{Error, Result};
use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One tensor to write: name, dtype, shape, little-endian bytes.
struct Tensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Writes the model as a Hugging Face directory at `out`, which must not exist yet.
/// `files` are extra files copied in verbatim (`tokenizer.json`, `tokenizer_config.json`,
/// `generation_config.json`, ...); `generation` gives `config.json`'s BOS/EOS ids.
pub fn write_hf_dir(
    config: &ModelConfig,
    weights: &ModelWeights,
    generation: &GenerationDefaults,
    files: &[(String, Vec<u8>)],
    out: &Path,
) -> Result<()> {
    if out.exists() {
        return Err(Error::Invalid(format!(
            "{}: already exists; choose a new directory for the converted model",
            out.display()
        )));
    }
    let tensors = collect_tensors(config, weights)?;
    let all_bf16 = tensors
        .iter()
        .all(|t| matches!(t.dtype, Dtype::BF16 | Dtype::U8));
    let config_json = config_json(config, weights, generation, all_bf16)?;

    let tmp = partial_path(out);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    let res = write_files(&tmp, &config_json, &tensors, files);
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        Error::io(out, e)
    })
}

/// `.NAME.partial` beside `out`: where the directory is written before its rename.
pub fn partial_path(out: &Path) -> PathBuf {
    out.with_file_name(format!(
        ".{}.partial",
        out.file_name().unwrap_or_default().to_string_lossy()
    ))
}

fn write_files(
    dir: &Path,
    config_json: &Value,
    tensors: &[Tensor],
    files: &[(String, Vec<u8>)],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = dir.join("config.json");
    let text = serde_json::to_string_pretty(config_json)
        .map_err(|e| Error::Invalid(format!("config.json: {e}")))?;
    std::fs::write(&cfg, text + "\n").map_err(|e| Error::io(&cfg, e))?;
    let st = dir.join("model.safetensors");
    let views = tensors
        .iter()
        .map(|t| {
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| Error::Invalid(format!("{}: {e}", t.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &st).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => Error::io(&st, io),
        other => Error::format(&st, other.to_string()),
    })?;
    // safetensors writes through a private temporary file (mode 0600); give the weights the
    // permissions every other file here gets (0666 less the umask, as config.json has).
    let mode = std::fs::metadata(&cfg)
        .map_err(|e| Error::io(&cfg, e))?
        .permissions();
    std::fs::set_permissions(&st, mode).map_err(|e| Error::io(&st, e))?;
    for (name, bytes) in files {
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(Error::Invalid(format!("{name}: not a plain file name")));
        }
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// An f32 as the JSON number with the shortest decimal that reads back as the same f32.
fn num(x: f32) -> Value {
    let v: f64 = format!("{x}").parse().unwrap_or(x as f64);
    json!(v)
}

/// transformers' `rope_parameters` for the model's RoPE, and the `max_position_embeddings`
/// that reads back as its context (`dynamic` takes it as the original context).
fn rope_json(c: &ModelConfig) -> Result<(Value, usize)> {
    let theta = num(c.rope_theta);
    let list = |f: &[f32]| Value::Array(f.iter().map(|&x| num(x)).collect());
    Ok(match &c.rope_scaling {
        RopeScaling::None => (
            json!({"rope_type": "default", "rope_theta": theta}),
            c.max_context,
        ),
        RopeScaling::Linear { factor } => (
            json!({"rope_type": "linear", "rope_theta": theta, "factor": num(*factor)}),
            c.max_context,
        ),
        RopeScaling::Dynamic {
            factor,
            original_context,
        } => (
            json!({"rope_type": "dynamic", "rope_theta": theta, "factor": num(*factor)}),
            *original_context,
        ),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => (
            json!({"rope_type": "llama3", "rope_theta": theta, "factor": num(*factor),
                   "low_freq_factor": num(*low_freq_factor),
                   "high_freq_factor": num(*high_freq_factor),
                   "original_max_position_embeddings": original_context}),
            c.max_context,
        ),
        RopeScaling::Yarn {
            factor,
            original_context,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        } => (
            json!({"rope_type": "yarn", "rope_theta": theta, "factor": num(*factor),
                   "original_max_position_embeddings": original_context,
                   "beta_fast": num(*beta_fast), "beta_slow": num(*beta_slow),
                   "attention_factor": num(*attention_factor), "truncate": truncate}),
            c.max_context,
        ),
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_context,
            attention_factor,
        } => (
            json!({"rope_type": "longrope", "rope_theta": theta,
                   "short_factor": list(short_factor), "long_factor": list(long_factor),
                   "original_max_position_embeddings": original_context,
                   "attention_factor": num(*attention_factor)}),
            c.max_context,
        ),
        RopeScaling::FreqFactors(_) => {
            return Err(Error::Invalid(
                "the model's RoPE has llama.cpp per-dimension factors (rope_freqs), which a \
                 transformers config cannot express"
                    .into(),
            ))
        }
    })
}

fn config_json(
    c: &ModelConfig,
    w: &ModelWeights,
    g: &GenerationDefaults,
    all_bf16: bool,
) -> Result<Value> {
    let (rope_parameters, max_position) = rope_json(c)?;
    let (arch, model_type) = if c.qk_norm {
        ("Qwen3ForCausalLM", "qwen3")
    } else if c.has_sub_norms {
        ("BitNetForCausalLM", "bitnet")
    } else {
        ("LlamaForCausalLM", "llama")
    };
    let mut quant = json!({
        "quant_method": "bitnet",
        "linear_class": "bitlinear",
        "quantization_mode": "offline",
    });
    if matches!(
        w.lm_head.as_ref().map(|l| &l.weights),
        Some(LinearWeights::Ternary(_))
    ) {
        // The default skips lm_head; a ternary one must be converted too.
        quant["modules_to_not_convert"] = json!([]);
    }
    let mut v = json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.ffn_size,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": c.activation.name(),
        "max_position_embeddings": max_position,
        "rms_norm_eps": num(c.rms_norm_eps),
        "rope_theta": num(c.rope_theta),
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": w.lm_head.is_none(),
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": if all_bf16 { "bfloat16" } else { "float32" },
        "quantization_config": quant,
    });
    if let Some(b) = g.bos_token_id {
        v["bos_token_id"] = json!(b);
    }
    match g.eos_token_ids.as_slice() {
        [] => {}
        [one] => v["eos_token_id"] = json!(one),
        many => v["eos_token_id"] = json!(many),
    }
    Ok(v)
}

fn collect_tensors(c: &ModelConfig, w: &ModelWeights) -> Result<Vec<Tensor>> {
    let mut out = Vec::new();
    out.push(dense("model.embed_tokens.weight", &w.token_embedding));
    if w.layers.len() != c.n_layers {
        return Err(Error::Invalid(format!(
            "the model has {} layers, its config says {}",
            w.layers.len(),
            c.n_layers
        )));
    }
    for (i, l) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.push(norm(
            &format!("{p}.input_layernorm.weight"),
            &l.attn_norm,
            c,
        )?);
        out.push(norm(
            &format!("{p}.post_attention_layernorm.weight"),
            &l.ffn_norm,
            c,
        )?);
        for (name, lin) in [
            ("self_attn.q_proj", &l.q_proj),
            ("self_attn.k_proj", &l.k_proj),
            ("self_attn.v_proj", &l.v_proj),
            ("self_attn.o_proj", &l.o_proj),
            ("mlp.gate_proj", &l.gate_proj),
            ("mlp.up_proj", &l.up_proj),
            ("mlp.down_proj", &l.down_proj),
        ] {
            let module = format!("{p}.{name}");
            match &lin.weights {
                LinearWeights::Ternary(m) => ternary(&mut out, &module, lin, m)?,
                LinearWeights::Dense(_) => {
                    return Err(Error::Invalid(format!(
                        "{module}: a float linear inside a block; the HF packed format holds \
                         ternary linears only"
                    )))
                }
            }
        }
        let subs = [
            ("self_attn.attn_sub_norm", &l.attn_sub_norm, c.has_sub_norms),
            ("mlp.ffn_sub_norm", &l.ffn_sub_norm, c.has_sub_norms),
            ("self_attn.q_norm", &l.q_norm, c.qk_norm),
            ("self_attn.k_norm", &l.k_norm, c.qk_norm),
        ];
        for (name, sub, wanted) in subs {
            match (sub, wanted) {
                (Some(n), true) => out.push(norm(&format!("{p}.{name}.weight"), n, c)?),
                (None, false) => {}
                _ => {
                    return Err(Error::Invalid(format!(
                        "{p}.{name}: present in some layers and not in others (the config \
                         says {wanted}); transformers has no such model"
                    )))
                }
            }
        }
    }
    out.push(norm("model.norm.weight", &w.output_norm, c)?);
    if let Some(head) = &w.lm_head {
        match &head.weights {
            LinearWeights::Ternary(m) => ternary(&mut out, "lm_head", head, m)?,
            LinearWeights::Dense(m) => {
                no_input_norm("lm_head", head)?;
                out.push(dense("lm_head.weight", m));
            }
        }
    }
    Ok(out)
}

fn no_input_norm(module: &str, l: &Linear) -> Result<()> {
    if l.input_norm.is_some() {
        return Err(Error::Invalid(format!(
            "{module}: per-linear input norms (quantization_config.use_rms_norm) are not \
             supported by the HF packed (bitlinear) format"
        )));
    }
    Ok(())
}

fn f32_tensor(name: &str, shape: Vec<usize>, values: &[f32]) -> Tensor {
    let exact = values
        .iter()
        .all(|&v| bf16::from_f32(v).to_f32().to_bits() == v.to_bits());
    let (dtype, bytes) = if exact {
        (
            Dtype::BF16,
            values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        )
    } else {
        (
            Dtype::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    };
    Tensor {
        name: name.to_string(),
        dtype,
        shape,
        bytes,
    }
}

fn dense(name: &str, m: &DenseMatrix) -> Tensor {
    let shape = vec![m.rows(), m.cols()];
    let (dtype, bytes) = match m.data() {
        DenseData::BF16(v) => (
            Dtype::BF16,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        DenseData::F16(v) => (Dtype::F16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        DenseData::F32(v) => return f32_tensor(name, shape, v),
        // Q6_K/Q4_0/Q4_1/Q8_0 weights are exact in f32 (not in bf16/f16).
        DenseData::Q6K(_) | DenseData::Q32(..) => {
            let mut v = vec![0f32; m.rows() * m.cols()];
            for (r, row) in v.chunks_exact_mut(m.cols().max(1)).enumerate() {
                m.row_to_f32(r, row);
            }
            return f32_tensor(name, shape, &v);
        }
    };
    Tensor {
        name: name.to_string(),
        dtype,
        shape,
        bytes,
    }
}

fn norm(name: &str, n: &RmsNorm, c: &ModelConfig) -> Result<Tensor> {
    if n.eps.to_bits() != c.rms_norm_eps.to_bits() {
        return Err(Error::Invalid(format!(
            "{name}: ε {} differs from the model's rms_norm_eps {}; config.json has one ε",
            n.eps, c.rms_norm_eps
        )));
    }
    Ok(f32_tensor(name, vec![n.weight.len()], &n.weight))
}

/// The stored `weight_scale` whose reciprocal, as the loader computes it (`1.0f32 / w`), is
/// exactly `multiplier`: bf16 if one exists, else f32.
fn weight_scale_for(multiplier: f32) -> Option<(Dtype, Vec<u8>)> {
    if !(multiplier.is_finite() && multiplier != 0.0) {
        return None;
    }
    let reads_back = |w: f32| w.is_finite() && w != 0.0 && 1.0f32 / w == multiplier;
    let guess = 1.0f32 / multiplier;
    let b = bf16::from_f32(guess).to_bits();
    for d in [0i32, -1, 1, -2, 2] {
        let cand = bf16::from_bits(b.wrapping_add_signed(d as i16));
        if reads_back(cand.to_f32()) {
            return Some((Dtype::BF16, cand.to_le_bytes().to_vec()));
        }
    }
    let f = guess.to_bits();
    for d in [0i32, -1, 1, -2, 2, -3, 3, -4, 4] {
        let cand = f32::from_bits(f.wrapping_add_signed(d));
        if reads_back(cand) {
            return Some((Dtype::F32, cand.to_le_bytes().to_vec()));
        }
    }
    None
}

fn ternary(out: &mut Vec<Tensor>, module: &str, lin: &Linear, m: &TernaryMatrix) -> Result<()> {
    no_input_norm(module, lin)?;
    let (rows, cols) = (m.rows(), m.cols());
    let bad = |msg: String| Error::Invalid(format!("{module}.weight: {msg}"));
    if m.group() != 0 {
        return Err(bad(format!(
            "group-wise scales (one per {} weights) have no transformers bitnet form (one \
             weight_scale a tensor); convert to gguf-q2_0",
            m.group()
        )));
    }
    if !rows.is_multiple_of(4) {
        return Err(bad(format!(
            "{rows} output rows are not a multiple of 4 (the packed layout's 4 rows a byte)"
        )));
    }
    let mult = m.multipliers().first().copied().unwrap_or(1.0);
    if let Some(r) = m
        .multipliers()
        .iter()
        .position(|&x| x.to_bits() != mult.to_bits())
    {
        return Err(bad(format!(
            "row {r} has scale {} but row 0 has {mult}; the HF packed format holds one scale \
             a linear",
            m.multipliers()[r]
        )));
    }
    let (scale_dtype, scale_bytes) = weight_scale_for(mult).ok_or_else(|| {
        bad(format!(
            "no bf16 or f32 weight_scale w has 1/w exactly equal to the multiplier {mult}"
        ))
    })?;
    let quarter = rows / 4;
    let mut packed = vec![0u8; quarter * cols];
    for r in 0..rows {
        let (p, shift) = (r % quarter, 2 * (r / quarter));
        let dst = &mut packed[p * cols..(p + 1) * cols];
        for (c, byte) in dst.iter_mut().enumerate() {
            *byte |= ((m.trit(r, c) + 1) as u8) << shift;
        }
    }
    out.push(Tensor {
        name: format!("{module}.weight"),
        dtype: Dtype::U8,
        shape: vec![quarter, cols],
        bytes: packed,
    });
    out.push(Tensor {
        name: format!("{module}.weight_scale"),
        dtype: scale_dtype,
        shape: vec![1],
        bytes: scale_bytes,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_scales_read_back_as_the_same_multiplier() {
        // A bf16 scale: 1/ws of a bf16 ws.
        let ws = bf16::from_f32(0.3).to_f32();
        let (dt, bytes) = weight_scale_for(1.0 / ws).unwrap();
        assert_eq!(dt, Dtype::BF16);
        let back = bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
        assert_eq!(1.0f32 / back, 1.0 / ws);
        // An arbitrary f32 multiplier (online ternarization): f32 scale, still exact.
        let m = 1.0f32 / (1.0f32 / 0.013_7f32);
        let (dt, bytes) = weight_scale_for(m).unwrap();
        assert_eq!(dt, Dtype::F32);
        let back = f32::from_le_bytes(bytes.try_into().unwrap());
        assert_eq!(1.0f32 / back, m);
        assert!(weight_scale_for(0.0).is_none());
        assert!(weight_scale_for(f32::NAN).is_none());
    }
}
