//! GGUF → model: architecture metadata to [`ModelConfig`], tensors to [`ModelWeights`].
//!
//! Architectures: `bitnet-25` (microsoft's official 2B-4T file), `bitnet-b1.58`
//! (ik_llama.cpp / microsoft's converter), `bitnet` (llama.cpp's 1bitLLM conversions) and
//! `llama` (ordinary Llama models and Llama-architecture ternary conversions) and `qwen3`
//! (Qwen3: `attn_q_norm`/`attn_k_norm` per-head norms before RoPE; NeoX RoPE, HF row order
//! as llama.cpp's Qwen converters write it; SiLU).
//!
//! # Q/K row order and RoPE
//!
//! Our forward pass applies NeoX-style RoPE (`rotate_half`, pairs `i` and `i + d/2`) to Q/K
//! rows in Hugging Face order.
//! - `llama`: llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.modify_tensors`, and the same
//!   in microsoft/BitNet's `utils/convert-hf-to-gguf-bitnet.py`) permutes the rows of
//!   `q_proj`/`k_proj` (`reshape(n_head, 2, d/2, in).swapaxes(1, 2)`) so that llama.cpp's
//!   "normal" RoPE on adjacent pairs is equivalent; llama.cpp's `llama_model_rope_type`
//!   returns `LLAMA_ROPE_TYPE_NORM` for `LLM_ARCH_LLAMA`. We undo that permutation at load:
//!   HF row `h·d + j·d/2 + i` is GGUF row `h·d + 2i + j`.
//! - `bitnet`: llama.cpp's `BitnetModel.modify_tensors` (convert_hf_to_gguf.py) and
//!   microsoft's `BitnetModel` only ternarize the weights and do not permute, and
//!   `llama_model_rope_type` lists `LLM_ARCH_BITNET` with the NeoX types. Loaded as stored.
//! - `bitnet-25`, `bitnet-b1.58`: written by microsoft's BitNet converters (and ported to
//!   ik_llama.cpp), whose BitNet classes do not call `LlamaModel.permute`; the Llama class
//!   cannot write these files at all (its tensor map has no `attn_sub_norm`/`ffn_sub_norm`).
//!   Loaded as stored, with NeoX RoPE, as transformers' `modeling_bitnet.py` does.
//!
//! # Ternary weights
//!
//! - TQ1_0/TQ2_0: per-256-block f16 scale `d`; the row multiplier is the `d` shared by the
//!   row's blocks that hold any non-zero trit. If a row's blocks disagree, the whole tensor
//!   is loaded as a dense f32 matrix instead (exact, slower) rather than computing wrong
//!   results.
//! - I2_S: one f32 tensor scale (a multiplier) at byte `n/4`.
//! - Q2_0 (llama.cpp, groups of 64; PrismML's fork, groups of 128): ternary with group-wise
//!   scales ([`crate::kernels::group`]); a tensor with a code 3 (+2) loads dense (exact).
//! - F32/F16/BF16 (or other float/quant types) linears in a BitNet architecture still run
//!   ternary: if every non-zero weight has the same magnitude `c` (what llama.cpp's and
//!   microsoft's converters write: `t·c`), trits are the signs and the multiplier is `c`;
//!   otherwise the weights are master weights and are ternarized as transformers' online
//!   mode and the 1bitLLM code do: `γ = mean|W|` (f32, floored at 1e-5),
//!   `t = clamp(round_half_even(W · (1/γ)), -1, 1)`, multiplier `1 / (1/γ)`.
//! - `llama` files: float/quant linears stay dense (F16/BF16/F32 as stored, Q4_0, Q4_1,
//!   Q8_0 and Q6_K kept in their blocks, other types dequantized to f32); ternary-typed
//!   tensors (TQ*/I2_S) run ternary.
//! - Optional llama.cpp `blk.N.<linear>.scale` tensors (one f32) multiply the multiplier.
//!
//! # Memory
//!
//! F16/BF16/F32 matrices whose rows are not reordered (the token embedding, the lm_head,
//! float linears) are not copied: they are views into the file map, which they keep alive.
//! Every tensor that is repacked or copied is released from the map right after
//! ([`GgufFile::release`]), so the resident set holds the repacked weights, the mapped ones
//! that are read, and not the file a second time.
//!
//! # Activation
//!
//! `bitnet-25`/`bitnet-b1.58`: ReLU² (llama.cpp's `build_bitnet_158`: `LLM_FFN_RELU_SQR`);
//! `llama`: SiLU. `bitnet`: llama.cpp's `build_bitnet` always uses `LLM_FFN_SILU` and reads
//! no metadata for it; we do the same unless the file carries `bitnet.hidden_act`
//! (a key our converter writes) saying otherwise.

use super::config::{Activation, GenerationDefaults, ModelConfig};
use super::weights::{LayerWeights, Linear, ModelWeights, RmsNorm};
use super::{LoadedModel, TensorSummary};
use crate::formats::ggml::{self, GgmlType};
use crate::formats::gguf::{GgufFile, GgufTensorInfo, MetadataReader};
use crate::kernels::qblock::{self, BlockType};
use crate::kernels::{DenseData, DenseMatrix, TernaryMatrix, BLOCK_WEIGHTS};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use half::{bf16, f16};
use std::path::Path;

/// The architectures this loader reads.
pub const SUPPORTED_ARCHS: [&str; 5] = ["bitnet-25", "bitnet-b1.58", "bitnet", "llama", "qwen3"];

pub fn load(path: &Path) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let (config, weights) = load_model(&file)?;
    let tokenizer = Tokenizer::from_gguf(&file.metadata, path)?;
    let generation = generation_defaults(&file)?;
    let chat_template = file.opt_str("tokenizer.chat_template")?.map(str::to_string);
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
        chat_template,
        generation,
        path: path.to_path_buf(),
        format: format!("GGUF v{}", file.version),
        tensors: tensor_summaries(&file),
        metadata: metadata_summary(&file),
    })
}

/// Config and weights of an opened file (everything but the tokenizer).
pub fn load_model(file: &GgufFile) -> Result<(ModelConfig, ModelWeights)> {
    let config = read_config(file)?;
    let weights = load_weights(file, &config)?;
    Ok((config, weights))
}

/// Every tensor as the file stores it.
pub fn tensor_summaries(file: &GgufFile) -> Vec<TensorSummary> {
    file.tensors
        .iter()
        .map(|t| TensorSummary {
            name: t.name.clone(),
            dtype: t.ggml_type.name().to_string(),
            shape: t.dims.clone(),
            bytes: t.n_bytes,
        })
        .collect()
}

fn metadata_summary(file: &GgufFile) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for key in [
        "general.name",
        "general.architecture",
        "general.basename",
        "general.size_label",
        "general.finetune",
        "general.organization",
        "general.license",
        "general.file_type",
        "general.quantization_version",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
    ] {
        if let Some(v) = file.get(key) {
            out.push((key.to_string(), v.display()));
        }
    }
    out.push(("general.alignment".into(), file.alignment.to_string()));
    out
}

/// BOS/EOS/EOT ids and llama.cpp's `general.sampling.*` defaults.
pub fn generation_defaults(file: &GgufFile) -> Result<GenerationDefaults> {
    let mut eos = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = file.opt_u32(key)? {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    const KEYS: [&str; 4] = [
        "general.sampling.temp",
        "general.sampling.top_k",
        "general.sampling.top_p",
        "general.sampling.penalty_repeat",
    ];
    // A sampling value of the wrong type is ignored like an out-of-range one (it is only
    // a default), with a warning naming the key.
    let mut warnings = Vec::new();
    let mut lenient = |v: Result<Option<f32>>| {
        v.unwrap_or_else(|e| {
            warnings.push(format!("{e}; ignored (the engine's default is used)"));
            None
        })
    };
    let temperature = lenient(file.opt_f32(KEYS[0]));
    let top_p = lenient(file.opt_f32(KEYS[2]));
    let repetition_penalty = lenient(file.opt_f32(KEYS[3]));
    let top_k = file.opt_usize(KEYS[1]).unwrap_or_else(|e| {
        warnings.push(format!("{e}; ignored (the engine's default is used)"));
        None
    });
    let mut g = GenerationDefaults {
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        eos_token_ids: eos,
        bos_token_id: file.opt_u32("tokenizer.ggml.bos_token_id")?,
        warnings,
    };
    g.drop_invalid_sampling(&file.path, KEYS);
    Ok(g)
}

fn is_bitnet(arch: &str) -> bool {
    arch.starts_with("bitnet")
}

/// A per-model integer that llama.cpp also accepts as a per-layer array (all equal here).
fn uniform_usize(file: &GgufFile, key: &str) -> Result<Option<usize>> {
    match file.get(key) {
        Some(v) if v.as_array().is_some() => {
            let arr = v.as_array().unwrap_or_default();
            let vals: Vec<u64> = arr.iter().filter_map(|x| x.as_u64()).collect();
            match vals.first() {
                Some(&first) if vals.len() == arr.len() && vals.iter().all(|&x| x == first) => {
                    Ok(Some(first as usize))
                }
                _ => Err(Error::config(
                    &file.path,
                    key,
                    "per-layer values that differ are not supported",
                )),
            }
        }
        _ => file.opt_usize(key),
    }
}

/// Reads `{arch}.*` hyper-parameters into a validated [`ModelConfig`].
pub fn read_config(file: &GgufFile) -> Result<ModelConfig> {
    let path = &file.path;
    let arch = file.architecture()?.to_string();
    if !SUPPORTED_ARCHS.contains(&arch.as_str()) {
        return Err(Error::config(
            path,
            "general.architecture",
            format!(
                "`{arch}` is not supported; supported: {}",
                SUPPORTED_ARCHS.join(", ")
            ),
        ));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let need = |key: String| -> Result<usize> {
        uniform_usize(file, &key)?
            .ok_or_else(|| Error::config(path, &key, "missing from the GGUF metadata"))
    };
    let hidden_size = need(k("embedding_length"))?;
    let n_layers = need(k("block_count"))?;
    let n_heads = need(k("attention.head_count"))?;
    let n_kv_heads = uniform_usize(file, &k("attention.head_count_kv"))?.unwrap_or(n_heads);
    let ffn_size = need(k("feed_forward_length"))?;
    let max_context = need(k("context_length"))?;
    let rope_theta = file.opt_f32(&k("rope.freq_base"))?.unwrap_or(10000.0);
    let rms_norm_eps = file.get_f32(&k("attention.layer_norm_rms_epsilon"))?;
    let head_dim = match file.opt_usize(&k("attention.key_length"))? {
        Some(d) => d,
        None => {
            if n_heads == 0 || hidden_size % n_heads != 0 {
                return Err(Error::config(
                    path,
                    k("attention.head_count"),
                    format!("{n_heads} heads do not divide the embedding length {hidden_size}"),
                ));
            }
            hidden_size / n_heads
        }
    };
    if let Some(vd) = file.opt_usize(&k("attention.value_length"))? {
        if vd != head_dim {
            return Err(Error::config(
                path,
                k("attention.value_length"),
                format!("{vd} differs from the key length {head_dim}; not supported"),
            ));
        }
    }
    if let Some(rd) = file.opt_usize(&k("rope.dimension_count"))? {
        if rd != head_dim {
            return Err(Error::config(
                path,
                k("rope.dimension_count"),
                format!("{rd} differs from the head dimension {head_dim}; partial RoPE is not supported"),
            ));
        }
    }
    let vocab_size = match file.opt_usize(&k("vocab_size"))? {
        Some(v) => v,
        None => {
            let t = file
                .tensor("token_embd.weight")
                .ok_or_else(|| Error::tensor(path, "token_embd.weight", "missing"))?;
            t.dims.get(1).copied().unwrap_or(0) as usize
        }
    };
    let activation = match arch.as_str() {
        "bitnet-25" | "bitnet-b1.58" => Activation::Relu2,
        "llama" | "qwen3" => Activation::Silu,
        _ => match file.opt_str(&k("hidden_act"))? {
            None => Activation::Silu,
            Some(name) => Activation::from_hidden_act(name).ok_or_else(|| {
                Error::config(
                    path,
                    k("hidden_act"),
                    format!("unknown activation `{name}`"),
                )
            })?,
        },
    };
    let rope_scaling = read_rope_scaling(file, &arch, head_dim, max_context)?;
    let max_context = rope_scaling.extended_context(max_context);
    // llama.cpp's qwen3 graph norms each query and key head (`attn_q_norm`/`attn_k_norm`).
    let qk_norm = arch == "qwen3";
    let has_sub_norms = file.tensor("blk.0.attn_sub_norm.weight").is_some()
        || file.tensor("blk.0.ffn_sub_norm.weight").is_some();
    let tied_embeddings = file.tensor("output.weight").is_none();
    let config = ModelConfig {
        architecture: arch.clone(),
        hidden_size,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn_size,
        vocab_size,
        max_context,
        rope_theta,
        rope_scaling,
        rms_norm_eps,
        activation,
        has_sub_norms,
        tied_embeddings,
        qk_norm,
    };
    config.validate_named(path, &|name| {
        let gguf = match name {
            "hidden_size" => "embedding_length",
            "num_hidden_layers" => "block_count",
            "num_attention_heads" => "attention.head_count",
            "num_key_value_heads" => "attention.head_count_kv",
            "head_dim" => "attention.key_length",
            "intermediate_size" => "feed_forward_length",
            "vocab_size" => "vocab_size",
            "max_position_embeddings" => "context_length",
            "rope_theta" => "rope.freq_base",
            "rms_norm_eps" => "attention.layer_norm_rms_epsilon",
            "rope_scaling.rope_freqs" => return "rope_freqs.weight".into(),
            "rope_scaling.original_max_position_embeddings" => {
                "rope.scaling.original_context_length"
            }
            "rope_scaling.beta_fast" => "rope.scaling.yarn_beta_fast",
            "rope_scaling.beta_slow" => "rope.scaling.yarn_beta_slow",
            "rope_scaling.attention_factor" => "rope.scaling.yarn_attn_factor",
            other if other.starts_with("rope_scaling.") => "rope.scaling.factor",
            other => return other.to_string(),
        };
        k(gguf)
    })?;
    Ok(config)
}

/// llama.cpp's RoPE scaling keys (`{arch}.rope.scaling.type` `none`/`linear`/`yarn`, its
/// `factor`, `original_context_length`, YaRN's `yarn_beta_fast`/`yarn_beta_slow`/
/// `yarn_attn_factor`, the older `rope.scale_linear`) and the `rope_freqs` tensor of
/// per-dimension divisors (Llama 3's scaling as llama.cpp's converter stores it). llama.cpp's
/// YaRN is transformers' with the correction range truncated and the attention factor
/// `yarn_attn_factor · (1 + 0.1·ln factor)`.
fn read_rope_scaling(
    file: &GgufFile,
    arch: &str,
    head_dim: usize,
    context: usize,
) -> Result<crate::model::RopeScaling> {
    use crate::model::{rope, RopeScaling};
    let path = &file.path;
    let k = |s: &str| format!("{arch}.rope.{s}");
    let kind = file.opt_str(&k("scaling.type"))?.unwrap_or("none");
    let factor = match file.opt_f32(&k("scaling.factor"))? {
        Some(f) => Some(f),
        None => file.opt_f32(&k("scale_linear"))?,
    };
    let original = file
        .opt_usize(&k("scaling.original_context_length"))?
        .unwrap_or(context);
    for key in ["scaling.yarn_log_multiplier", "scaling.attn_factor"] {
        if let Some(v) = file.opt_f32(&k(key))?.filter(|&v| v != 0.0 && v != 1.0) {
            return Err(Error::config(path, k(key), format!("{v}: not supported")));
        }
    }
    if let Some(v) = file.opt_f32(&k("scaling.yarn_ext_factor"))? {
        if v != 1.0 && v >= 0.0 {
            return Err(Error::config(
                path,
                k("scaling.yarn_ext_factor"),
                format!("{v}: only 1 (full YaRN) is supported"),
            ));
        }
    }
    let need_factor = || {
        factor.ok_or_else(|| {
            Error::config(
                path,
                k("scaling.factor"),
                format!("missing (needed by `{kind}`)"),
            )
        })
    };
    let scaling = match kind {
        "none" => match factor {
            // The old key alone means linear scaling in llama.cpp.
            Some(f) if f != 1.0 && f != 0.0 => RopeScaling::Linear { factor: f },
            _ => RopeScaling::None,
        },
        "linear" => RopeScaling::Linear {
            factor: need_factor()?,
        },
        "yarn" => {
            let factor = need_factor()?;
            let attn = file.opt_f32(&k("scaling.yarn_attn_factor"))?.unwrap_or(1.0);
            RopeScaling::Yarn {
                factor,
                original_context: original,
                beta_fast: file.opt_f32(&k("scaling.yarn_beta_fast"))?.unwrap_or(32.0),
                beta_slow: file.opt_f32(&k("scaling.yarn_beta_slow"))?.unwrap_or(1.0),
                attention_factor: (attn as f64 * rope::yarn_mscale(factor as f64, 1.0)) as f32,
                truncate: true,
            }
        }
        other => {
            return Err(Error::config(
                path,
                k("scaling.type"),
                format!("`{other}` is not supported (none, linear, yarn)"),
            ))
        }
    };
    let Some(t) = file.tensor("rope_freqs.weight") else {
        return Ok(scaling);
    };
    if scaling != RopeScaling::None {
        return Err(Error::tensor(
            path,
            "rope_freqs.weight",
            format!("per-dimension factors together with `{kind}` scaling are not supported"),
        ));
    }
    if t.n_elements() != (head_dim / 2) as u64 {
        return Err(Error::tensor(
            path,
            "rope_freqs.weight",
            format!(
                "{} values, expected head_dim / 2 = {}",
                t.n_elements(),
                head_dim / 2
            ),
        ));
    }
    let mut f = vec![0f32; head_dim / 2];
    ggml::dequantize_row(t.ggml_type, file.tensor_data(t)?, &mut f)
        .map_err(|e| Error::tensor(path, "rope_freqs.weight", e.to_string()))?;
    Ok(RopeScaling::FreqFactors(f))
}

struct Loader<'a> {
    file: &'a GgufFile,
    config: &'a ModelConfig,
}

/// Drops trailing 1-sized dimensions (`[576, 1]` is `[576]`).
fn trimmed(dims: &[u64]) -> &[u64] {
    let mut n = dims.len();
    while n > 1 && dims[n - 1] == 1 {
        n -= 1;
    }
    &dims[..n]
}

impl<'a> Loader<'a> {
    fn err(&self, name: &str, msg: impl Into<String>) -> Error {
        Error::tensor(&self.file.path, name, msg)
    }

    /// The tensor, checked to have `dims` (ggml order).
    fn get(&self, name: &str, dims: &[usize]) -> Result<&'a GgufTensorInfo> {
        let t = self
            .file
            .tensor(name)
            .ok_or_else(|| self.err(name, "missing"))?;
        let want: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        if trimmed(&t.dims) != trimmed(&want) {
            return Err(self.err(
                name,
                format!("expected shape {want:?} (ggml order), found {:?}", t.dims),
            ));
        }
        Ok(t)
    }

    fn data(&self, t: &GgufTensorInfo) -> Result<&'a [u8]> {
        self.file.tensor_data(t)
    }

    fn norm(&self, name: &str, len: usize) -> Result<RmsNorm> {
        let t = self.get(name, &[len])?;
        let mut weight = vec![0f32; len];
        ggml::dequantize_row(t.ggml_type, self.data(t)?, &mut weight)
            .map_err(|e| self.err(name, e.to_string()))?;
        self.file.release(t);
        Ok(RmsNorm {
            weight,
            eps: self.config.rms_norm_eps,
        })
    }

    /// Decodes source row `r` of a float/quant tensor `[rows, cols]` to f32.
    fn row_f32(
        &self,
        t: &GgufTensorInfo,
        data: &[u8],
        r: usize,
        cols: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let rb = t.ggml_type.row_bytes(cols).ok_or_else(|| {
            self.err(
                &t.name,
                format!(
                    "{} rows cannot be decoded one at a time",
                    t.ggml_type.name()
                ),
            )
        })?;
        ggml::dequantize_row(t.ggml_type, &data[r * rb..(r + 1) * rb], out)
            .map_err(|e| self.err(&t.name, e.to_string()))
    }

    /// A dense `[rows, cols]` matrix whose row `r` is source row `map(r)`: F32/F16/BF16
    /// kept as stored (viewed in the map when the rows are in order, else copied), other
    /// types dequantized to f32.
    fn dense(
        &self,
        t: &GgufTensorInfo,
        rows: usize,
        cols: usize,
        map: &dyn Fn(usize) -> usize,
    ) -> Result<DenseMatrix> {
        if (0..rows).all(|r| map(r) == r) && t.n_elements() == (rows * cols) as u64 {
            let mapped = match t.ggml_type {
                GgmlType::F16 => self.file.mapped::<f16>(t).map(|m| DenseData::F16(m.into())),
                GgmlType::BF16 => self
                    .file
                    .mapped::<bf16>(t)
                    .map(|m| DenseData::BF16(m.into())),
                GgmlType::F32 => self.file.mapped::<f32>(t).map(|m| DenseData::F32(m.into())),
                GgmlType::Q6_K if cols.is_multiple_of(ggml::QK_K) => {
                    self.file.mapped::<u8>(t).map(|m| DenseData::Q6K(m.into()))
                }
                ty => match BlockType::from_ggml(ty) {
                    Some(bt) if cols.is_multiple_of(qblock::QK) => self
                        .file
                        .mapped::<u8>(t)
                        .map(|m| DenseData::Q32(bt, m.into())),
                    _ => None,
                },
            };
            if let Some(d) = mapped {
                return DenseMatrix::new(rows, cols, d)
                    .map_err(|e| self.err(&t.name, e.to_string()));
            }
        }
        let data = self.data(t)?;
        let n = rows * cols;
        let d = match t.ggml_type {
            GgmlType::F16 => {
                DenseData::F16(gather2(data, rows, cols, map, f16::from_le_bytes).into())
            }
            GgmlType::BF16 => {
                DenseData::BF16(gather2(data, rows, cols, map, bf16::from_le_bytes).into())
            }
            // Q6_K rows stay in their blocks (6.56 bits a weight instead of 32).
            GgmlType::Q6_K if cols.is_multiple_of(ggml::QK_K) => {
                let rb = cols / ggml::QK_K * GgmlType::Q6_K.block_bytes();
                let mut v = Vec::with_capacity(rows * rb);
                for r in 0..rows {
                    v.extend_from_slice(&data[map(r) * rb..(map(r) + 1) * rb]);
                }
                DenseData::Q6K(v.into())
            }
            // Q4_0/Q4_1/Q8_0 rows stay in their blocks too (reordered Q/K rows are copied).
            ty if BlockType::from_ggml(ty).is_some() && cols.is_multiple_of(qblock::QK) => {
                let bt = BlockType::from_ggml(ty).expect("checked by the guard");
                let rb = bt.row_bytes(cols).expect("whole blocks (the guard)");
                if data.len() != rows * rb {
                    return Err(self.err(
                        &t.name,
                        format!("{} bytes, expected {}", data.len(), rows * rb),
                    ));
                }
                let mut v = Vec::with_capacity(rows * rb);
                for r in 0..rows {
                    v.extend_from_slice(&data[map(r) * rb..(map(r) + 1) * rb]);
                }
                DenseData::Q32(bt, v.into())
            }
            GgmlType::I2_S => {
                let scale =
                    ggml::i2s_scale(data, n).map_err(|e| self.err(&t.name, e.to_string()))?;
                let mut v = vec![0f32; n];
                let mut trits = vec![0i8; cols];
                for r in 0..rows {
                    ggml::i2s_decode(data, map(r) * cols, &mut trits)
                        .map_err(|e| self.err(&t.name, e.to_string()))?;
                    for (o, &tr) in v[r * cols..(r + 1) * cols].iter_mut().zip(&trits) {
                        *o = tr as f32 * scale;
                    }
                }
                DenseData::F32(v.into())
            }
            _ => {
                let mut v = vec![0f32; n];
                for r in 0..rows {
                    self.row_f32(t, data, map(r), cols, &mut v[r * cols..(r + 1) * cols])?;
                }
                DenseData::F32(v.into())
            }
        };
        self.file.release(t);
        DenseMatrix::new(rows, cols, d).map_err(|e| self.err(&t.name, e.to_string()))
    }

    /// The optional llama.cpp per-linear scale `<base>.scale` (one value).
    fn extra_scale(&self, weight_name: &str) -> Result<f32> {
        let name = format!("{}.scale", weight_name.trim_end_matches(".weight"));
        match self.file.tensor(&name) {
            None => Ok(1.0),
            Some(_) => {
                let t = self.get(&name, &[1])?;
                let mut v = [0f32; 1];
                ggml::dequantize_row(t.ggml_type, self.data(t)?, &mut v)
                    .map_err(|e| self.err(&name, e.to_string()))?;
                self.file.release(t);
                Ok(v[0])
            }
        }
    }

    /// A linear `W: [out, in]` (GGUF dims `[in, out]`).
    fn linear(
        &self,
        name: &str,
        in_f: usize,
        out_f: usize,
        map: &dyn Fn(usize) -> usize,
    ) -> Result<Linear> {
        let t = self.get(name, &[in_f, out_f])?;
        let extra = self.extra_scale(name)?;
        let data = self.data(t)?;
        let ty = t.ggml_type;
        let (rows, cols) = (out_f, in_f);
        match ty {
            GgmlType::TQ1_0 | GgmlType::TQ2_0 => {
                let rb = ty
                    .row_bytes(cols)
                    .ok_or_else(|| self.err(name, "bad row length"))?;
                // The rows are repacked in parallel, which wants a `Sync` row map.
                let src_rows: Vec<usize> = (0..rows).map(map).collect();
                let padded = cols.div_ceil(BLOCK_WEIGHTS) * BLOCK_WEIGHTS;
                let built = TernaryMatrix::from_packed_rows_parallel_with(
                    rows,
                    cols,
                    || vec![0i8; padded],
                    |trits, r, out| {
                        let src = &data[src_rows[r] * rb..(src_rows[r] + 1) * rb];
                        if ty == GgmlType::TQ2_0 {
                            if let Some(d) = tq2_packed_row(src, out)? {
                                return Ok(d * extra);
                            }
                        }
                        trits.fill(0);
                        let d = tq_row_scale(ty, src, &mut trits[..cols])?;
                        TernaryMatrix::pack_row(trits, out, r)?;
                        Ok(d * extra)
                    },
                );
                match built {
                    Ok(m) => {
                        self.file.release(t);
                        Ok(Linear::ternary(m))
                    }
                    // Only when the first failing row is a mixed one, as `from_rows` would.
                    Err(Error::Invalid(msg)) if msg == MIXED_SCALES => {
                        let m = self.dense(t, rows, cols, map)?;
                        Ok(Linear::dense(scale_dense(m, extra)?))
                    }
                    Err(e) => Err(self.err(name, e.to_string())),
                }
            }
            GgmlType::I2_S => {
                let scale = ggml::i2s_scale(data, rows * cols)
                    .map_err(|e| self.err(name, e.to_string()))?;
                let src_rows: Vec<usize> = (0..rows).map(map).collect();
                let padded = cols.div_ceil(BLOCK_WEIGHTS) * BLOCK_WEIGHTS;
                let m = TernaryMatrix::from_packed_rows_parallel_with(
                    rows,
                    cols,
                    || vec![0i8; padded],
                    |trits, r, out| {
                        let start = src_rows[r] * cols;
                        if !i2s_packed_row(data, start, cols, out) {
                            trits.fill(0);
                            ggml::i2s_decode(data, start, &mut trits[..cols])?;
                            TernaryMatrix::pack_row(trits, out, r)?;
                        }
                        Ok(scale * extra)
                    },
                )
                .map_err(|e| self.err(name, e.to_string()))?;
                self.file.release(t);
                Ok(Linear::ternary(m))
            }
            GgmlType::Q2_0 | GgmlType::Q2_0_G128 => {
                let (group, bb) = (ty.block_size(), ty.block_bytes());
                let rb = ty
                    .row_bytes(cols)
                    .ok_or_else(|| self.err(name, "bad row length"))?;
                let src_rows: Vec<usize> = (0..rows).map(map).collect();
                let groups = cols / group;
                // The f16 group scales, and whether any code is 3 (+2: not ternary).
                let mut scales = vec![0f32; rows * groups];
                let mut code3 = false;
                for (r, s) in scales.chunks_exact_mut(groups).enumerate() {
                    let src = &data[src_rows[r] * rb..(src_rows[r] + 1) * rb];
                    for (b, s) in src.chunks_exact(bb).zip(s.iter_mut()) {
                        *s = f16::from_le_bytes([b[0], b[1]]).to_f32() * extra;
                        code3 |= b[2..].iter().any(|&x| has_code3(x));
                    }
                }
                if code3 {
                    // Not ternary: exact float weights instead.
                    let m = self.dense(t, rows, cols, map)?;
                    return Ok(Linear::dense(scale_dense(m, extra)?));
                }
                let m = TernaryMatrix::from_rows_parallel_with(
                    rows,
                    cols,
                    || vec![0f32; groups],
                    |scratch, r, trits| {
                        let src = &data[src_rows[r] * rb..(src_rows[r] + 1) * rb];
                        ggml::q2_0_row(ty, src, trits, scratch)?;
                        Ok(1.0)
                    },
                )
                .and_then(|m| m.with_group_scales(group, &scales))
                .map_err(|e| self.err(name, e.to_string()))?;
                self.file.release(t);
                Ok(Linear::ternary(m))
            }
            _ if !ty.can_dequantize() => {
                Err(self.err(name, format!("type {} cannot be decoded", ty.name())))
            }
            _ if is_bitnet(&self.config.architecture) => self.ternarize(t, rows, cols, extra, map),
            _ => {
                let m = self.dense(t, rows, cols, map)?;
                Ok(Linear::dense(scale_dense(m, extra)?))
            }
        }
    }

    /// Float weights of a BitNet linear → ternary (see the module docs).
    fn ternarize(
        &self,
        t: &GgufTensorInfo,
        rows: usize,
        cols: usize,
        extra: f32,
        map: &dyn Fn(usize) -> usize,
    ) -> Result<Linear> {
        let data = self.data(t)?;
        let mut row = vec![0f32; cols];
        let mut sum_abs = 0f64;
        let mut magnitude: Option<f32> = None;
        let mut single_magnitude = true;
        for r in 0..rows {
            self.row_f32(t, data, r, cols, &mut row)?;
            for &w in &row {
                let a = w.abs();
                sum_abs += a as f64;
                if a != 0.0 && single_magnitude {
                    match magnitude {
                        None => magnitude = Some(a),
                        Some(c) if c == a => {}
                        Some(_) => single_magnitude = false,
                    }
                }
            }
        }
        let (inv, mult) = match magnitude {
            Some(c) if single_magnitude => (1.0 / c, c),
            _ => {
                let gamma = ((sum_abs / (rows * cols).max(1) as f64) as f32).max(1e-5);
                let inv = 1.0 / gamma;
                (inv, 1.0 / inv)
            }
        };
        let src_rows: Vec<usize> = (0..rows).map(map).collect();
        let m = TernaryMatrix::from_rows_parallel_with(
            rows,
            cols,
            || vec![0f32; cols],
            |row, r, trits| {
                self.row_f32(t, data, src_rows[r], cols, row)?;
                for (o, &w) in trits.iter_mut().zip(row.iter()) {
                    *o = (w * inv).round_ties_even().clamp(-1.0, 1.0) as i8;
                }
                Ok(mult * extra)
            },
        )
        .map_err(|e| self.err(&t.name, e.to_string()))?;
        self.file.release(t);
        Ok(Linear::ternary(m))
    }
}

fn gather2<T>(
    data: &[u8],
    rows: usize,
    cols: usize,
    map: &dyn Fn(usize) -> usize,
    conv: impl Fn([u8; 2]) -> T,
) -> Vec<T> {
    let mut v = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let src = &data[map(r) * cols * 2..(map(r) + 1) * cols * 2];
        v.extend(src.chunks_exact(2).map(|b| conv([b[0], b[1]])));
    }
    v
}

fn scale_dense(m: DenseMatrix, s: f32) -> Result<DenseMatrix> {
    if s == 1.0 {
        return Ok(m);
    }
    let (rows, cols) = (m.rows(), m.cols());
    let mut v = vec![0f32; rows * cols];
    for r in 0..rows {
        m.row_to_f32(r, &mut v[r * cols..(r + 1) * cols]);
    }
    v.iter_mut().for_each(|x| *x *= s);
    // A mapped `m` has been copied: its pages are not needed any more.
    m.release_rows(0..rows);
    DenseMatrix::new(rows, cols, DenseData::F32(v.into()))
}

/// The error a TQ row with differently scaled blocks gives [`Loader::linear`], which then
/// loads the tensor dense.
const MIXED_SCALES: &str = "mixed block scales";

/// Decodes a TQ1_0/TQ2_0 row into `trits`; returns the scale its non-zero blocks share
/// (0 if all are zero), or the [`MIXED_SCALES`] error.
fn tq_row_scale(ty: GgmlType, src: &[u8], trits: &mut [i8]) -> Result<f32> {
    let scales = ggml::ternary_row(ty, src, trits)?;
    let mut d: Option<f32> = None;
    for (blk, &s) in trits.chunks(ggml::QK_K).zip(&scales) {
        if blk.iter().any(|&x| x != 0) {
            match d {
                None => d = Some(s),
                Some(prev) if prev.to_bits() == s.to_bits() => {}
                Some(_) => return Err(Error::Invalid(MIXED_SCALES.into())),
            }
        }
    }
    Ok(d.unwrap_or(0.0))
}

/// Whether a byte holds a 2-bit code 3 (not a ternary value) in any of its four fields.
fn has_code3(b: u8) -> bool {
    b & (b >> 1) & 0x55 != 0
}

/// A TQ2_0 row straight into [`TernaryMatrix`]'s layout, which is TQ2_0's own: each
/// 32-byte half of a block's `qs` holds elements `m + 32·l` of its 128 in bits `2l` of
/// byte `m`, as `trit + 1`. Returns what [`tq_row_scale`] would (`Ok(None)` for a row
/// with a code 3, which [`tq_row_scale`] then reports).
fn tq2_packed_row(src: &[u8], out: &mut [u8]) -> Result<Option<f32>> {
    const BLOCK: usize = 66; // 64 bytes of codes, an f16 scale
    let mut d: Option<f32> = None;
    let mut mixed = false;
    for (b, o) in src.chunks_exact(BLOCK).zip(out.chunks_exact_mut(64)) {
        let qs = &b[..64];
        if qs.iter().any(|&x| has_code3(x)) {
            return Ok(None);
        }
        o.copy_from_slice(qs);
        // 0x55: four codes 1, four zero trits.
        if qs.iter().any(|&x| x != 0x55) {
            let s = f16::from_le_bytes([b[64], b[65]]).to_f32();
            match d {
                None => d = Some(s),
                Some(prev) if prev.to_bits() == s.to_bits() => {}
                // A code 3 later in the row still wins, as in `tq_row_scale`.
                Some(_) => mixed = true,
            }
        }
    }
    if mixed {
        return Err(Error::Invalid(MIXED_SCALES.into()));
    }
    Ok(Some(d.unwrap_or(0.0)))
}

/// An I2_S row (elements `start..start + cols`) straight into [`TernaryMatrix`]'s layout:
/// I2_S byte `j` of a 128-element block holds elements `j + 32·i` in bits `6 - 2i` (ours in
/// bits `2i`), so each byte's four fields are reversed. Returns false, writing nothing
/// useful, when this does not apply (rows not whole blocks, bytes missing, a code 3): the
/// caller then decodes the row element by element, which reports any error.
fn i2s_packed_row(data: &[u8], start: usize, cols: usize, out: &mut [u8]) -> bool {
    if !cols.is_multiple_of(ggml::I2S_BLOCK) || !start.is_multiple_of(ggml::I2S_BLOCK) {
        return false;
    }
    let Some(src) = data.get(start / 4..(start + cols) / 4) else {
        return false;
    };
    if src.iter().any(|&x| has_code3(x)) {
        return false;
    }
    for (o, &x) in out.iter_mut().zip(src) {
        *o = (x >> 6) | ((x >> 2) & 0x0C) | ((x << 2) & 0x30) | (x << 6);
    }
    true
}

/// HF row of a llama.cpp-permuted Q/K matrix → its GGUF row (see the module docs).
pub fn unpermute_row(r: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (h, w) = (r / head_dim, r % head_dim);
    let (j, i) = (w / half, w % half);
    h * head_dim + 2 * i + j
}

/// Loads and validates every tensor the config implies.
pub fn load_weights(file: &GgufFile, config: &ModelConfig) -> Result<ModelWeights> {
    let l = Loader { file, config };
    let c = config;
    let (h, q, kv, ff) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.ffn_size);
    let ident = |r: usize| r;
    let hd = c.head_dim;
    let unperm = move |r: usize| unpermute_row(r, hd);
    let qk_map: &dyn Fn(usize) -> usize = if c.architecture == "llama" {
        &unperm
    } else {
        &ident
    };

    let arch = file.architecture().unwrap_or(c.architecture.as_str());
    super::config::check_layer_count(
        &file.path,
        &format!("{arch}.block_count"),
        c.n_layers,
        "blk.",
        file.tensors.iter().map(|t| t.name.as_str()),
    )?;
    let emb = l.get("token_embd.weight", &[h, c.vocab_size])?;
    let token_embedding = l.dense(emb, c.vocab_size, h, &ident)?;
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let sub = |s: &str, len: usize| -> Result<Option<RmsNorm>> {
            if c.has_sub_norms {
                l.norm(&n(s), len).map(Some)
            } else {
                Ok(None)
            }
        };
        let head_norm = |s: &str| -> Result<Option<RmsNorm>> {
            if c.qk_norm {
                l.norm(&n(s), c.head_dim).map(Some)
            } else {
                Ok(None)
            }
        };
        layers.push(LayerWeights {
            attn_norm: l.norm(&n("attn_norm"), h)?,
            q_proj: l.linear(&n("attn_q"), h, q, qk_map)?,
            k_proj: l.linear(&n("attn_k"), h, kv, qk_map)?,
            v_proj: l.linear(&n("attn_v"), h, kv, &ident)?,
            q_norm: head_norm("attn_q_norm")?,
            k_norm: head_norm("attn_k_norm")?,
            attn_sub_norm: sub("attn_sub_norm", q)?,
            o_proj: l.linear(&n("attn_output"), q, h, &ident)?,
            ffn_norm: l.norm(&n("ffn_norm"), h)?,
            gate_proj: l.linear(&n("ffn_gate"), h, ff, &ident)?,
            up_proj: l.linear(&n("ffn_up"), h, ff, &ident)?,
            ffn_sub_norm: sub("ffn_sub_norm", ff)?,
            down_proj: l.linear(&n("ffn_down"), ff, h, &ident)?,
        });
    }
    let output_norm = l.norm("output_norm.weight", h)?;
    let lm_head = if c.tied_embeddings {
        None
    } else {
        // The lm_head is never ternary in these models: keep it dense.
        let t = l.get("output.weight", &[h, c.vocab_size])?;
        Some(Linear::dense(l.dense(t, c.vocab_size, h, &ident)?))
    };
    Ok(ModelWeights {
        token_embedding,
        layers,
        output_norm,
        lm_head,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::GgufWriter;

    /// Bytes of random valid 2-bit codes (0, 1 or 2 in every field).
    fn random_codes(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                (0..4).fold(0u8, |b, i| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    b | (((x >> 33) % 3) as u8) << (2 * i)
                })
            })
            .collect()
    }

    #[test]
    fn ternary_rows_repack_directly_like_decoded_ones() {
        let cols = 768; // three TQ2_0 blocks: bytes 0..66, 66..132, 132..198
        let rb = GgmlType::TQ2_0.row_bytes(cols).unwrap();
        let one = f16::from_f32(0.75).to_le_bytes();
        let mut trits = vec![0i8; cols];
        let (mut fast, mut slow) = (vec![0u8; cols / 4], vec![0u8; cols / 4]);
        // Same scales; an all-zero block with another scale; mixed scales; a code 3 after a
        // mixed block (the code 3 is reported, as the decoder does).
        for case in 0..4 {
            let mut row = random_codes(case, rb);
            for b in row.chunks_exact_mut(66) {
                b[64..].copy_from_slice(&one);
            }
            match case {
                1 => {
                    row[66..130].fill(0x55);
                    row[130..132].copy_from_slice(&[0, 0x3c]);
                }
                2 => row[130..132].copy_from_slice(&[0, 0x3c]),
                3 => {
                    row[130..132].copy_from_slice(&[0, 0x3c]);
                    row[140] = 0xC0 | 0x15;
                }
                _ => {}
            }
            let want = tq_row_scale(GgmlType::TQ2_0, &row, &mut trits)
                .and_then(|d| TernaryMatrix::pack_row(&trits, &mut slow, 0).map(|()| d));
            match (tq2_packed_row(&row, &mut fast), want) {
                (Ok(Some(d)), Ok(w)) => {
                    assert_eq!((d, &fast), (w, &slow), "case {case}");
                    assert!(case < 2 && d == 0.75);
                }
                (Ok(None), Err(e)) => assert!(case == 3 && e.to_string().contains("code 3")),
                (Err(a), Err(b)) => assert_eq!((case, a.to_string()), (2, b.to_string())),
                (got, want) => panic!("case {case}: {got:?} vs {want:?}"),
            }
        }
        // I2_S: rows at any whole-block offset; a code 3 falls back to the decoder.
        let mut data = random_codes(7, 3 * cols / 4);
        for start in [0, cols, 2 * cols] {
            ggml::i2s_decode(&data, start, &mut trits).unwrap();
            TernaryMatrix::pack_row(&trits, &mut slow, 0).unwrap();
            assert!(i2s_packed_row(&data, start, cols, &mut fast));
            assert_eq!(fast, slow, "start {start}");
        }
        assert!(!i2s_packed_row(&data, 3 * cols, cols, &mut fast));
        assert!(!i2s_packed_row(&data, 64, 384, &mut fast[..96]));
        data[5] = 0x0F;
        assert!(!i2s_packed_row(&data, 0, cols, &mut fast));
    }

    #[test]
    fn q4_and_q8_matrices_stay_in_their_blocks_and_truncation_names_the_tensor() {
        let (rows, cols) = (8, 64);
        let dir = std::env::temp_dir().join(format!("bitnet-load-q32-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let rb = ty.row_bytes(cols).unwrap();
            let mut bytes: Vec<u8> = (0..rows * rb).map(|i| (i * 37 % 251) as u8).collect();
            for blk in bytes.chunks_exact_mut(ty.block_bytes()) {
                blk[..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
                if ty == GgmlType::Q4_1 {
                    blk[2..4].copy_from_slice(&f16::from_f32(-0.05).to_le_bytes());
                }
            }
            let mut w = GgufWriter::new();
            w.add_tensor_raw("m", &[cols as u64, rows as u64], ty.id(), bytes.clone());
            let p = dir.join(format!("{}.gguf", ty.name()));
            w.write(&p).unwrap();
            let file = GgufFile::open(&p).unwrap();
            let config = ModelConfig {
                architecture: "llama".into(),
                hidden_size: cols,
                n_layers: 1,
                n_heads: 1,
                n_kv_heads: 1,
                head_dim: cols,
                ffn_size: cols,
                vocab_size: rows,
                max_context: 8,
                rope_theta: 10000.0,
                rope_scaling: crate::model::RopeScaling::None,
                rms_norm_eps: 1e-5,
                activation: Activation::Silu,
                has_sub_norms: false,
                tied_embeddings: true,
                qk_norm: false,
            };
            let l = Loader {
                file: &file,
                config: &config,
            };
            let t = file.tensor("m").unwrap();
            let m = l.dense(t, rows, cols, &|r| r).unwrap();
            assert!(m.data().is_mapped(), "{}", ty.name());
            assert_eq!(m.data().type_name(), ty.name().to_lowercase());
            assert_eq!(m.memory_bytes(), rows * rb);
            // Reordered rows are copied in blocks; both decode as ggml's reference.
            let rev = l.dense(t, rows, cols, &|r| rows - 1 - r).unwrap();
            assert!(!rev.data().is_mapped());
            let (mut a, mut b, mut want) = (vec![0f32; cols], vec![0f32; cols], vec![0f32; cols]);
            for r in 0..rows {
                m.row_to_f32(r, &mut a);
                rev.row_to_f32(rows - 1 - r, &mut b);
                ggml::dequantize_row(ty, &bytes[r * rb..(r + 1) * rb], &mut want).unwrap();
                assert_eq!((&a, &b), (&want, &want), "{} row {r}", ty.name());
            }
            drop(file);
            // A file cut inside the tensor: an error naming it.
            let len = std::fs::metadata(&p).unwrap().len();
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len(len - 5).unwrap();
            drop(f);
            let e = match GgufFile::open(&p) {
                Err(e) => e.to_string(),
                Ok(file) => {
                    let l = Loader {
                        file: &file,
                        config: &config,
                    };
                    let t = file.tensor("m").unwrap();
                    l.dense(t, rows, cols, &|r| r).unwrap_err().to_string()
                }
            };
            assert!(e.contains("tensor `m`"), "{e}");
        }
    }

    #[test]
    fn float_matrices_in_row_order_are_read_in_place() {
        let (rows, cols) = (300, 48);
        let vals: Vec<f16> = (0..rows * cols)
            .map(|i| f16::from_f32(i as f32 * 0.25 - 1000.0))
            .collect();
        let bytes = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut w = GgufWriter::new();
        w.add_tensor_raw("m", &[cols as u64, rows as u64], GgmlType::F16.id(), bytes);
        let dir = std::env::temp_dir().join(format!("bitnet-load-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("mapped.gguf");
        w.write(&p).unwrap();
        let file = GgufFile::open(&p).unwrap();
        let config = ModelConfig {
            architecture: "llama".into(),
            hidden_size: cols,
            n_layers: 1,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: cols,
            ffn_size: cols,
            vocab_size: rows,
            max_context: 8,
            rope_theta: 10000.0,
            rope_scaling: crate::model::RopeScaling::None,
            rms_norm_eps: 1e-5,
            activation: Activation::Silu,
            has_sub_norms: false,
            tied_embeddings: true,
            qk_norm: false,
        };
        let l = Loader {
            file: &file,
            config: &config,
        };
        let t = file.tensor("m").unwrap();
        let in_place = l.dense(t, rows, cols, &|r| r).unwrap();
        assert!(in_place.data().is_mapped());
        assert_eq!(in_place.data().type_name(), "f16");
        // Reordered rows are copied, and the copy releases the tensor's pages.
        let reversed = l.dense(t, rows, cols, &|r| rows - 1 - r).unwrap();
        assert!(!reversed.data().is_mapped());
        drop(file);
        // The view outlives the file and reads the same values after its pages went.
        let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
        for r in 0..rows {
            in_place.row_to_f32(r, &mut a);
            reversed.row_to_f32(rows - 1 - r, &mut b);
            assert_eq!(a, b);
            assert_eq!(a[7], vals[r * cols + 7].to_f32());
        }
        in_place.release_rows(0..rows);
        in_place.row_to_f32(rows - 1, &mut a);
        assert_eq!(a[0], vals[(rows - 1) * cols].to_f32());
        let x = vec![1f32; cols];
        assert_eq!(in_place.dot_row(3, &x), reversed.dot_row(rows - 4, &x));
    }
}
