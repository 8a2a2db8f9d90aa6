//! Hugging Face model directory → model.
//!
//! Reads `config.json` (transformers 4 and 5 spellings), the safetensors weights (single file
//! or shards), `generation_config.json`, `tokenizer_config.json` / `chat_template.jinja` and
//! `tokenizer.json`.
//!
//! Variants, each read exactly as transformers 5 (or the model's own code) runs it:
//! - `quantization_config.quant_method = "bitnet"` (BitNet 2B-4T, Llama-architecture 1.58-bit
//!   models such as HF1BitLLM/Llama3-8B-1.58 and Falcon3 1.58bit):
//!   - `linear_class = "bitlinear"` (default; `quantization_mode` is ignored by that class):
//!     `uint8 [out/4, in]` packed trits (bits `2i..2i+1` of packed row `r` hold row
//!     `r + i·out/4`, code − 1) and a one-element `weight_scale`; `y = dot / (s · weight_scale)`,
//!     so the multiplier is `1 / weight_scale`.
//!   - `linear_class = "autobitlinear"`, `quantization_mode = "offline"`: weights stored as
//!     ternary floats `[out, in]` or packed like above; `y = dot / s · weight_scale`.
//!   - `linear_class = "autobitlinear"`, `quantization_mode = "online"`: float master weights
//!     ternarized here exactly as transformers' `WeightQuant`: in f32,
//!     `scale = 1 / max(mean|W|, 1e-5)`, `t = clamp(round_half_even(W·scale), -1, 1)`; the
//!     multiplier is `1 / scale` rounded to the weight's dtype (transformers returns
//!     `(t / scale).to(dtype)`).
//!   - `use_rms_norm`: an RMSNorm (`<linear>.rms_norm.weight`, ε = the quantization config's
//!     `rms_norm_eps`) on each converted linear's input.
//!   - `modules_to_not_convert`: listed modules stay float; when the key is absent transformers
//!     skips the output embedding (lm_head); when it is a list, only what it lists.
//! - 1bitLLM checkpoints (`architectures = ["BitnetForCausalLM"]`, custom code, no
//!   quantization_config): fp16 masters ternarized like `online` mode; sub-norms
//!   `self_attn.inner_attn_ln` / `mlp.ffn_layernorm`; SiLU.
//! - No quantization_config otherwise: a plain float model with `Linear::dense` linears. That is
//!   what transformers does for `BitNetForCausalLM` too (it keeps `nn.Linear`), so such a
//!   BitNet directory loads as a float model with its sub-norms, and the format string and
//!   metadata say so.
//!
//! Sub-norms: BitNet `self_attn.attn_sub_norm`, `mlp.ffn_sub_norm`; Llama has none.
//!
//! Memory: float matrices kept as stored (embeddings, an unconverted lm_head, float linears)
//! are views into the file map where their data is aligned, else copies; every tensor that
//! is repacked or copied is released from the map right after ([`TensorRef::release`]).

use super::rope::{self, RopeScaling};
use super::{
    Activation, GenerationDefaults, LayerWeights, Linear, LinearWeights, LoadedModel, ModelConfig,
    ModelWeights, RmsNorm, TensorSummary,
};
use crate::formats::mmap::Buffer;
use crate::formats::safetensors::{Dtype, SafetensorsModel, TensorRef};
use crate::kernels::{DenseData, DenseMatrix, TernaryMatrix};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

use rayon::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// How the ternary linears of a model are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightScheme {
    /// Float linears (`nn.Linear`).
    Float,
    /// transformers `BitLinear`: packed uint8 + `weight_scale` (divided).
    BitLinear,
    /// transformers `AutoBitLinear`, offline: ternary (float or packed) + `weight_scale`
    /// (multiplied).
    AutoBitLinearOffline,
    /// Float masters ternarized at load (`AutoBitLinear` online, 1bitLLM `BitLinear`).
    Online,
}

impl WeightScheme {
    fn describe(self) -> &'static str {
        match self {
            WeightScheme::Float => "float",
            WeightScheme::BitLinear => "HF packed (bitlinear, offline)",
            WeightScheme::AutoBitLinearOffline => "HF ternary (autobitlinear, offline)",
            WeightScheme::Online => "float masters ternarized at load (online)",
        }
    }
}

/// The model family as far as the loader cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// transformers `BitNetForCausalLM` (`model_type = "bitnet"`).
    BitNet,
    /// 1bitLLM `BitnetForCausalLM` custom code.
    OneBitLlm,
    /// `LlamaForCausalLM`.
    Llama,
    /// `Qwen3ForCausalLM`: Llama with an RMSNorm of each query and key head before RoPE.
    Qwen3,
}

/// The parsed `quantization_config` of a BitNet-quantized model.
#[derive(Debug, Clone)]
struct QuantConfig {
    scheme: WeightScheme,
    linear_class: String,
    mode: String,
    /// `Some(eps)` when `use_rms_norm` is set.
    input_norm_eps: Option<f32>,
    /// `None`: transformers' default skips (the output embedding).
    modules_to_not_convert: Option<Vec<String>>,
}

/// Config and weights only (no tokenizer, templates or generation defaults); the format
/// string is the one [`load`] reports.
pub fn load_model_weights(dir: &Path) -> Result<(ModelConfig, ModelWeights, String)> {
    let config_path = dir.join("config.json");
    let json = read_json(&config_path)?;
    let st = SafetensorsModel::open_dir(dir)?;
    let hf = HfConfig::parse(&config_path, &json, &st)?;
    let weights = load_weights(&hf, &st)?;
    let format = format_name(&hf, &st);
    Ok((hf.config, weights, format))
}

fn format_name(hf: &HfConfig, st: &SafetensorsModel) -> String {
    format!(
        "safetensors{}, {}",
        if st.files().len() > 1 {
            format!(" ({} shards)", st.files().len())
        } else {
            String::new()
        },
        hf.scheme.describe()
    )
}

/// Loads a Hugging Face model directory.
pub fn load(dir: &Path) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    let json = read_json(&config_path)?;
    let st = SafetensorsModel::open_dir(dir)?;
    let hf = HfConfig::parse(&config_path, &json, &st)?;
    let weights = load_weights(&hf, &st)?;

    let generation = read_generation(dir, &json, hf.config.vocab_size)?;
    let chat_template = read_chat_template(dir)?;
    let tokenizer = load_tokenizer(dir)?;

    let mut tensors: Vec<TensorSummary> = st
        .names()
        .filter_map(|n| st.tensor(n))
        .map(|t| TensorSummary {
            name: t.name.to_string(),
            dtype: t.dtype.to_string(),
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            bytes: t.data.len() as u64,
        })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));

    let format = format_name(&hf, &st);
    Ok(LoadedModel {
        config: hf.config,
        weights,
        tokenizer,
        chat_template,
        generation,
        path: dir.to_path_buf(),
        format,
        tensors,
        metadata: hf.metadata,
    })
}

/// The directory's `tokenizer.json`, without loading weights.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(Error::Tokenizer(format!(
            "{}: missing (the model directory needs a Hugging Face tokenizer.json)",
            tokenizer_path.display()
        )));
    }
    Tokenizer::from_file(&tokenizer_path)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// Typed access to a JSON object's keys with errors naming the file and key.
struct Keys<'a> {
    path: &'a Path,
    obj: &'a serde_json::Map<String, Value>,
    /// Prefix for nested keys in errors (`quantization_config.`).
    prefix: &'a str,
}

impl<'a> Keys<'a> {
    fn new(path: &'a Path, v: &'a Value, prefix: &'a str) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| {
            let what = if prefix.is_empty() {
                "the file"
            } else {
                prefix.trim_end_matches('.')
            };
            Error::format(path, format!("{what} is not a JSON object"))
        })?;
        Ok(Self { path, obj, prefix })
    }

    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(self.path, format!("{}{key}", self.prefix), msg)
    }

    /// The value, treating JSON `null` as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.err(key, format!("expected a non-negative integer, found {v}"))
                }),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(key, "missing (required)"))
    }

    fn f32_opt(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| x as f32)
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| {
                    self.err(key, format!("expected a finite 32-bit number, found {v}"))
                }),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a string, found {v}"))),
        }
    }

    /// An int or a list of ints (token ids), each below `vocab`.
    fn ids_opt(&self, key: &str, vocab: usize) -> Result<Vec<u32>> {
        let bad = |v: &Value| {
            self.err(
                key,
                format!("expected a token id below the vocabulary size {vocab} or a list of them, found {v}"),
            )
        };
        let one = |v: &Value| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| (n as usize) < vocab)
                .ok_or_else(|| bad(v))
        };
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }
}

/// Everything `config.json` (and the tensor names) decide.
struct HfConfig {
    config: ModelConfig,
    family: Family,
    scheme: WeightScheme,
    quant: Option<QuantConfig>,
    /// The weights' source, for error messages about tensors that are not in one file.
    metadata: Vec<(String, String)>,
    /// Untied lm_head present and used.
    untied_lm_head: bool,
}

impl HfConfig {
    fn parse(path: &Path, json: &Value, st: &SafetensorsModel) -> Result<Self> {
        let k = Keys::new(path, json, "")?;
        let model_type = k.str_opt("model_type")?.unwrap_or("");
        let architecture = match k.get("architectures") {
            Some(Value::Array(a)) => a.first().and_then(|v| v.as_str()).unwrap_or("").to_string(),
            Some(v) => return Err(k.err("architectures", format!("expected a list, found {v}"))),
            None => String::new(),
        };
        let quant_json = k.get("quantization_config");
        let one_bit_llm = quant_json.is_none()
            && (architecture == "BitnetForCausalLM"
                || st.contains("model.layers.0.self_attn.inner_attn_ln.weight"));
        let family = if one_bit_llm {
            Family::OneBitLlm
        } else if model_type == "bitnet" || architecture == "BitNetForCausalLM" {
            Family::BitNet
        } else if model_type == "llama" || architecture == "LlamaForCausalLM" {
            Family::Llama
        } else if model_type == "qwen3" || architecture == "Qwen3ForCausalLM" {
            Family::Qwen3
        } else {
            return Err(k.err(
                "model_type",
                format!(
                    "`{model_type}` (architecture `{architecture}`) is not supported; expected \
                     bitnet, llama, qwen3 or a 1bitLLM BitnetForCausalLM checkpoint"
                ),
            ));
        };

        let quant = match quant_json {
            None => None,
            Some(q) => Some(parse_quant(path, q)?),
        };
        let scheme = match (&quant, family) {
            (Some(q), _) => q.scheme,
            (None, Family::OneBitLlm) => WeightScheme::Online,
            (None, _) => WeightScheme::Float,
        };

        // transformers 5 defaults per config class.
        let (default_act, default_eps, default_theta) = match family {
            Family::BitNet => ("relu2", 1e-5, 500000.0),
            Family::OneBitLlm => ("silu", 1e-6, 10000.0),
            Family::Llama | Family::Qwen3 => ("silu", 1e-6, 10000.0),
        };
        let hidden_size = k.usize_req("hidden_size")?;
        let n_layers = k.usize_req("num_hidden_layers")?;
        let n_heads = k.usize_req("num_attention_heads")?;
        let ffn_size = k.usize_req("intermediate_size")?;
        let vocab_size = k.usize_req("vocab_size")?;
        let n_kv_heads = k.usize_opt("num_key_value_heads")?.unwrap_or(n_heads);
        if n_heads == 0 {
            return Err(k.err("num_attention_heads", "must be greater than 0"));
        }
        let head_dim = k.usize_opt("head_dim")?.unwrap_or(hidden_size / n_heads);
        let max_context = k.usize_opt("max_position_embeddings")?.unwrap_or(2048);
        let rms_norm_eps = k.f32_opt("rms_norm_eps")?.unwrap_or(default_eps);
        let hidden_act = k.str_opt("hidden_act")?.unwrap_or(default_act);
        let activation = Activation::from_hidden_act(hidden_act).ok_or_else(|| {
            k.err(
                "hidden_act",
                format!("`{hidden_act}` is not supported (expected relu2 or silu)"),
            )
        })?;
        let (rope_theta, rope_scaling) = parse_rope(&k, default_theta, max_context, head_dim)?;
        // A scaled RoPE reaches past `max_position_embeddings` (dynamic: by its factor).
        let max_context = rope_scaling.extended_context(max_context);
        for key in ["attention_bias", "mlp_bias"] {
            if k.bool_opt(key)? == Some(true) {
                return Err(k.err(key, "biases are not supported"));
            }
        }
        if family == Family::Qwen3 && k.bool_opt("use_sliding_window")? == Some(true) {
            return Err(k.err(
                "use_sliding_window",
                "sliding-window attention is not supported",
            ));
        }
        if k.usize_opt("pretraining_tp")?.is_some_and(|tp| tp > 1) {
            return Err(k.err("pretraining_tp", "tensor-parallel slicing is not supported"));
        }

        let has_sub_norms = matches!(family, Family::BitNet | Family::OneBitLlm);
        let tie = k.bool_opt("tie_word_embeddings")?.unwrap_or(false);
        let has_lm_head = st.contains("lm_head.weight");
        let untied_lm_head = !tie && has_lm_head;

        let config = ModelConfig {
            architecture: if architecture.is_empty() {
                model_type.to_string()
            } else {
                architecture.clone()
            },
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
            tied_embeddings: !untied_lm_head,
            qk_norm: family == Family::Qwen3,
        };
        config.validate(path)?;
        super::config::check_layer_count(
            path,
            "num_hidden_layers",
            n_layers,
            "model.layers.",
            st.names(),
        )?;
        if has_sub_norms && config.q_dim() != hidden_size {
            return Err(k.err(
                "head_dim",
                format!(
                    "{n_heads} heads × {head_dim} = {} must equal hidden_size {hidden_size}: the \
                     attention sub-norm spans hidden_size",
                    config.q_dim()
                ),
            ));
        }

        let mut metadata = vec![
            ("model_type".to_string(), model_type.to_string()),
            ("architecture".to_string(), config.architecture.clone()),
            ("weights".to_string(), scheme.describe().to_string()),
        ];
        if let Some(dtype) = k.str_opt("torch_dtype")?.or(k.str_opt("dtype")?) {
            metadata.push(("dtype".into(), dtype.to_string()));
        }
        if let Some(q) = &quant {
            metadata.push((
                "quantization".into(),
                format!(
                    "bitnet: linear_class {}, mode {}{}",
                    q.linear_class,
                    q.mode,
                    if q.input_norm_eps.is_some() {
                        ", use_rms_norm"
                    } else {
                        ""
                    }
                ),
            ));
        }
        if family == Family::BitNet && quant.is_none() {
            metadata.push((
                "warning".into(),
                "BitNet config without quantization_config: transformers runs it as a plain \
                 float model, and so does this engine"
                    .into(),
            ));
        }
        if !tie && !has_lm_head {
            metadata.push((
                "warning".into(),
                "tie_word_embeddings is false but there is no lm_head.weight: using the token \
                 embedding as the output layer"
                    .into(),
            ));
        }
        if st.files().len() > 1 {
            metadata.push(("shards".into(), st.files().len().to_string()));
        }
        Ok(Self {
            config,
            family,
            scheme,
            quant,
            metadata,
            untied_lm_head,
        })
    }

    /// Whether transformers replaces module `name` (e.g. `model.layers.0.mlp.up_proj`) by a
    /// BitNet linear.
    fn converts(&self, name: &str) -> bool {
        match &self.quant {
            None => self.scheme != WeightScheme::Float && name != "lm_head",
            Some(q) => match &q.modules_to_not_convert {
                None => name != "lm_head",
                Some(patterns) => !patterns.iter().any(|p| module_matches(name, p)),
            },
        }
    }
}

/// transformers' `should_convert_module` matching (without its regular expressions): `pattern`
/// matches `name` from the start up to a module boundary, or as a suffix.
fn module_matches(name: &str, pattern: &str) -> bool {
    let pattern = pattern.strip_suffix(".weight").unwrap_or(pattern);
    name.ends_with(pattern)
        || name
            .strip_prefix(pattern)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || pattern.ends_with('.'))
}

fn parse_quant(path: &Path, q: &Value) -> Result<QuantConfig> {
    let k = Keys::new(path, q, "quantization_config.")?;
    let method = k.str_opt("quant_method")?.unwrap_or("");
    if method != "bitnet" {
        return Err(k.err(
            "quant_method",
            format!("`{method}` is not supported (only bitnet)"),
        ));
    }
    let linear_class = k
        .str_opt("linear_class")?
        .unwrap_or("bitlinear")
        .to_string();
    let mode = k
        .str_opt("quantization_mode")?
        .unwrap_or("offline")
        .to_string();
    if !matches!(mode.as_str(), "offline" | "online") {
        return Err(k.err(
            "quantization_mode",
            format!("`{mode}` is not online or offline"),
        ));
    }
    let scheme = match (linear_class.as_str(), mode.as_str()) {
        // BitLinear ignores the mode: it always holds packed weights.
        ("bitlinear", _) => WeightScheme::BitLinear,
        ("autobitlinear", "offline") => WeightScheme::AutoBitLinearOffline,
        ("autobitlinear", _) => WeightScheme::Online,
        (other, _) => {
            return Err(k.err(
                "linear_class",
                format!("`{other}` is not bitlinear or autobitlinear"),
            ))
        }
    };
    let input_norm_eps = if k.bool_opt("use_rms_norm")?.unwrap_or(false) {
        Some(k.f32_opt("rms_norm_eps")?.unwrap_or(1e-6))
    } else {
        None
    };
    let modules_to_not_convert = match k.get("modules_to_not_convert") {
        None => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        k.err(
                            "modules_to_not_convert",
                            format!("expected module names, found {v}"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        Some(v) => {
            return Err(k.err(
                "modules_to_not_convert",
                format!("expected a list, found {v}"),
            ))
        }
    };
    Ok(QuantConfig {
        scheme,
        linear_class,
        mode,
        input_norm_eps,
        modules_to_not_convert,
    })
}

/// RoPE θ and scaling from `rope_scaling` (transformers 4; it wins where both are set, as
/// transformers' `rope_scaling or rope_parameters`) or `rope_parameters` (transformers 5),
/// with the top-level `rope_theta` where the dict has none, else the model type's default.
/// `max_position` is `max_position_embeddings`: the original context of `dynamic`, and the
/// default `original_max_position_embeddings` of llama3/yarn/longrope (a top-level
/// `original_max_position_embeddings` takes precedence there, as transformers gives it).
fn parse_rope(
    k: &Keys<'_>,
    default_theta: f32,
    max_position: usize,
    head_dim: usize,
) -> Result<(f32, RopeScaling)> {
    let top_theta = k.f32_opt("rope_theta")?;
    let (key, v) = match (k.get("rope_scaling"), k.get("rope_parameters")) {
        (Some(v), _) if v.as_object().is_some_and(|o| !o.is_empty()) => ("rope_scaling", v),
        (_, Some(v)) => ("rope_parameters", v),
        (Some(v), None) => ("rope_scaling", v),
        (None, None) => return Ok((top_theta.unwrap_or(default_theta), RopeScaling::None)),
    };
    let p = Keys::new(
        k.path,
        v,
        if key == "rope_scaling" {
            "rope_scaling."
        } else {
            "rope_parameters."
        },
    )?;
    let theta = p
        .f32_opt("rope_theta")?
        .or(top_theta)
        .unwrap_or(default_theta);
    let rope_type = match p.str_opt("rope_type")? {
        Some(t) => t,
        None => p.str_opt("type")?.unwrap_or("default"),
    };
    if let Some(f) = p
        .f32_opt("partial_rotary_factor")?
        .or(k.f32_opt("partial_rotary_factor")?)
    {
        if f != 1.0 {
            return Err(p.err(
                "partial_rotary_factor",
                format!("{f}: partial RoPE is not supported (only 1.0)"),
            ));
        }
    }
    let factor = |required: bool| -> Result<Option<f32>> {
        match p.f32_opt("factor")? {
            Some(f) => Ok(Some(f)),
            None if required => {
                Err(p.err("factor", format!("missing (required by `{rope_type}`)")))
            }
            None => Ok(None),
        }
    };
    let original = || -> Result<usize> {
        Ok(match k.usize_opt("original_max_position_embeddings")? {
            Some(n) => n,
            None => p
                .usize_opt("original_max_position_embeddings")?
                .unwrap_or(max_position),
        })
    };
    // Values transformers computes from the others when they are absent, in its f64 math.
    let implied_factor = |original: usize| max_position as f64 / original.max(1) as f64;
    let factors = |name: &str| -> Result<Vec<f32>> {
        let bad = || {
            p.err(
                name,
                format!("expected a list of head_dim / 2 = {} numbers", head_dim / 2),
            )
        };
        match p.get(name) {
            Some(Value::Array(items)) if items.len() == head_dim / 2 => items
                .iter()
                .map(|v| v.as_f64().map(|x| x as f32).ok_or_else(bad))
                .collect(),
            _ => Err(bad()),
        }
    };
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: factor(true)?.unwrap_or(1.0),
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: factor(true)?.unwrap_or(1.0),
            original_context: max_position,
        },
        "llama3" => {
            let need = |name: &str| -> Result<f32> {
                p.f32_opt(name)?
                    .ok_or_else(|| p.err(name, "missing (required by `llama3`)"))
            };
            RopeScaling::Llama3 {
                factor: factor(true)?.unwrap_or(1.0),
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_context: original()?,
            }
        }
        "yarn" => {
            let original_context = original()?;
            let factor = match factor(false)? {
                Some(f) => f as f64,
                None => implied_factor(original_context),
            };
            let attention_factor = match p.f32_opt("attention_factor")? {
                Some(a) => a as f64,
                None => {
                    let mscale = p.f32_opt("mscale")?.filter(|&m| m != 0.0);
                    let all = p.f32_opt("mscale_all_dim")?.filter(|&m| m != 0.0);
                    match (mscale, all) {
                        (Some(m), Some(a)) => {
                            rope::yarn_mscale(factor, m as f64)
                                / rope::yarn_mscale(factor, a as f64)
                        }
                        _ => rope::yarn_mscale(factor, 1.0),
                    }
                }
            };
            if p.f32_opt("mscale_all_dim")?.is_some_and(|m| m != 0.0) {
                // transformers also scales the attention logits by it (MLA models only).
                return Err(p.err(
                    "mscale_all_dim",
                    "not supported (DeepSeek-style attention scaling)",
                ));
            }
            RopeScaling::Yarn {
                factor: factor as f32,
                original_context,
                // transformers: `get("beta_fast") or 32` (0 or null take the default)
                beta_fast: p
                    .f32_opt("beta_fast")?
                    .filter(|&b| b != 0.0)
                    .unwrap_or(32.0),
                beta_slow: p.f32_opt("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                attention_factor: attention_factor as f32,
                truncate: p.bool_opt("truncate")?.unwrap_or(true),
            }
        }
        "longrope" => {
            let original_context = original()?;
            let factor = match factor(false)? {
                Some(f) => f as f64,
                None => implied_factor(original_context),
            };
            let attention_factor = match p.f32_opt("attention_factor")? {
                Some(a) => a as f64,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original_context as f64).ln()).sqrt(),
            };
            RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_context,
                attention_factor: attention_factor as f32,
            }
        }
        other => {
            return Err(p.err(
                "rope_type",
                format!(
                    "`{other}` is not supported (default, linear, dynamic, llama3, yarn, longrope)"
                ),
            ))
        }
    };
    Ok((theta, scaling))
}

fn load_weights(hf: &HfConfig, st: &SafetensorsModel) -> Result<ModelWeights> {
    let c = &hf.config;
    let embed = st.require("model.embed_tokens.weight")?;
    embed.expect_shape(&[c.vocab_size, c.hidden_size])?;
    let token_embedding = dense_matrix(&embed)?;
    let output_norm = norm(st, "model.norm.weight", c.hidden_size, c.rms_norm_eps)?;
    let lm_head = if hf.untied_lm_head {
        Some(linear(hf, st, "lm_head", c.vocab_size, c.hidden_size)?)
    } else {
        None
    };
    if lm_head.is_none() && hf.converts("lm_head") {
        return Err(Error::config(
            st.source(),
            "quantization_config.modules_to_not_convert",
            "converts lm_head to a BitNet linear, but the embeddings are tied: a ternary tied \
             lm_head is not supported",
        ));
    }
    let (attn_sub, ffn_sub) = match hf.family {
        Family::BitNet => ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"),
        Family::OneBitLlm => ("self_attn.inner_attn_ln", "mlp.ffn_layernorm"),
        Family::Llama | Family::Qwen3 => ("", ""),
    };
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let p = format!("model.layers.{i}");
        let sub = |name: &str, n: usize| -> Result<Option<RmsNorm>> {
            if c.has_sub_norms {
                Ok(Some(norm(
                    st,
                    &format!("{p}.{name}.weight"),
                    n,
                    c.rms_norm_eps,
                )?))
            } else {
                Ok(None)
            }
        };
        let head_norm = |name: &str| -> Result<Option<RmsNorm>> {
            if c.qk_norm {
                norm(
                    st,
                    &format!("{p}.{name}.weight"),
                    c.head_dim,
                    c.rms_norm_eps,
                )
                .map(Some)
            } else {
                Ok(None)
            }
        };
        let h = c.hidden_size;
        layers.push(LayerWeights {
            attn_norm: norm(
                st,
                &format!("{p}.input_layernorm.weight"),
                h,
                c.rms_norm_eps,
            )?,
            q_proj: linear(hf, st, &format!("{p}.self_attn.q_proj"), c.q_dim(), h)?,
            k_proj: linear(hf, st, &format!("{p}.self_attn.k_proj"), c.kv_dim(), h)?,
            v_proj: linear(hf, st, &format!("{p}.self_attn.v_proj"), c.kv_dim(), h)?,
            q_norm: head_norm("self_attn.q_norm")?,
            k_norm: head_norm("self_attn.k_norm")?,
            attn_sub_norm: sub(attn_sub, h)?,
            o_proj: linear(hf, st, &format!("{p}.self_attn.o_proj"), h, c.q_dim())?,
            ffn_norm: norm(
                st,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                c.rms_norm_eps,
            )?,
            gate_proj: linear(hf, st, &format!("{p}.mlp.gate_proj"), c.ffn_size, h)?,
            up_proj: linear(hf, st, &format!("{p}.mlp.up_proj"), c.ffn_size, h)?,
            ffn_sub_norm: sub(ffn_sub, c.ffn_size)?,
            down_proj: linear(hf, st, &format!("{p}.mlp.down_proj"), h, c.ffn_size)?,
        });
    }
    Ok(ModelWeights {
        token_embedding,
        layers,
        output_norm,
        lm_head,
    })
}

fn norm(st: &SafetensorsModel, name: &str, n: usize, eps: f32) -> Result<RmsNorm> {
    let t = st.require(name)?;
    t.expect_shape(&[n])?;
    let weight = t.to_f32_vec()?;
    t.release();
    Ok(RmsNorm { weight, eps })
}

/// A 2-D float tensor kept in its file precision: viewed in the map if its data is aligned,
/// else copied (and its pages released).
fn dense_matrix(t: &TensorRef<'_>) -> Result<DenseMatrix> {
    let [rows, cols] = *t.shape else {
        return Err(t.error(format!("expected a 2-D tensor, found shape {:?}", t.shape)));
    };
    fn copied<T>(t: &TensorRef<'_>, v: Result<Vec<T>>) -> Result<Buffer<T>> {
        let v = v?;
        t.release();
        Ok(v.into())
    }
    let data = match t.dtype {
        Dtype::BF16 => DenseData::BF16(match t.mapped() {
            Some(m) => m.into(),
            None => copied(t, t.to_bf16_vec())?,
        }),
        Dtype::F16 => DenseData::F16(match t.mapped() {
            Some(m) => m.into(),
            None => copied(t, t.to_f16_vec())?,
        }),
        Dtype::F32 => DenseData::F32(match t.mapped() {
            Some(m) => m.into(),
            None => copied(t, t.to_f32_vec())?,
        }),
        other => {
            return Err(t.error(format!(
                "dtype {other} is not a float type (expected BF16, F16 or F32)"
            )))
        }
    };
    DenseMatrix::new(rows, cols, data).map_err(|e| t.error(e.to_string()))
}

/// One linear `[out, in]` named `module` (without `.weight`), in the model's scheme.
fn linear(
    hf: &HfConfig,
    st: &SafetensorsModel,
    module: &str,
    out: usize,
    inp: usize,
) -> Result<Linear> {
    let w = st.require(&format!("{module}.weight"))?;
    let bias = format!("{module}.bias");
    if st.contains(&bias) {
        return Err(Error::tensor(
            st.source(),
            bias,
            "linear biases are not supported",
        ));
    }
    let converted = hf.converts(module);
    let scheme = if converted {
        hf.scheme
    } else {
        WeightScheme::Float
    };
    let mut lin = match scheme {
        WeightScheme::Float => {
            w.expect_shape(&[out, inp])?;
            Linear::dense(dense_matrix(&w)?)
        }
        WeightScheme::BitLinear => {
            let ws = weight_scale(st, module)?;
            Linear::ternary(packed_ternary(&w, out, inp, 1.0 / ws)?)
        }
        WeightScheme::AutoBitLinearOffline => {
            let ws = weight_scale(st, module)?;
            // transformers unpacks a uint8 weight whose rows × 4 equal out_features.
            if w.dtype == Dtype::U8 && w.shape.first().map(|r| r * 4) == Some(out) {
                Linear::ternary(packed_ternary(&w, out, inp, ws)?)
            } else {
                Linear::ternary(float_ternary(&w, out, inp, ws)?)
            }
        }
        WeightScheme::Online => Linear::ternary(online_ternary(&w, out, inp)?),
    };
    if matches!(lin.weights, LinearWeights::Ternary(_)) {
        // Repacked: the file's copy is not read again.
        w.release();
    }
    if converted {
        if let Some(eps) = hf.quant.as_ref().and_then(|q| q.input_norm_eps) {
            lin.input_norm = Some(norm(st, &format!("{module}.rms_norm.weight"), inp, eps)?);
        }
    }
    Ok(lin)
}

fn weight_scale(st: &SafetensorsModel, module: &str) -> Result<f32> {
    let t = st.require(&format!("{module}.weight_scale"))?;
    let s = t.scalar_f32()?;
    t.release();
    if !(s.is_finite() && s != 0.0) {
        return Err(t.error(format!("weight_scale {s} is not a finite non-zero number")));
    }
    Ok(s)
}

/// transformers' packed layout: `uint8 [out/4, in]`; bits `2i..2i+1` of packed row `p` hold
/// row `p + i·out/4` as `trit + 1`.
pub fn packed_ternary(
    w: &TensorRef<'_>,
    out: usize,
    inp: usize,
    multiplier: f32,
) -> Result<TernaryMatrix> {
    w.expect_dtype(&[Dtype::U8])?;
    if !out.is_multiple_of(4) {
        return Err(w.error(format!(
            "packed weights need out_features divisible by 4, found {out}"
        )));
    }
    let packed_rows = out / 4;
    w.expect_shape(&[packed_rows, inp])?;
    TernaryMatrix::from_rows_parallel(out, inp, |r, trits| {
        let (p, shift) = (r % packed_rows, 2 * (r / packed_rows));
        let row = &w.data[p * inp..(p + 1) * inp];
        for (c, (t, &byte)) in trits.iter_mut().zip(row).enumerate() {
            let code = (byte >> shift) & 3;
            if code == 3 {
                return Err(w.error(format!(
                    "packed code 3 (not a trit) for row {r}, column {c} (byte {p},{c})"
                )));
            }
            *t = code as i8 - 1;
        }
        Ok(multiplier)
    })
}

/// Float weights that hold exactly -1, 0 or +1.
fn float_ternary(
    w: &TensorRef<'_>,
    out: usize,
    inp: usize,
    multiplier: f32,
) -> Result<TernaryMatrix> {
    w.expect_shape(&[out, inp])?;
    w.expect_dtype(&[Dtype::BF16, Dtype::F16, Dtype::F32])?;
    TernaryMatrix::from_rows_parallel_with(
        out,
        inp,
        || vec![0.0f32; inp],
        |row, r, trits| {
            w.row_f32(r, row)?;
            for (c, (t, &v)) in trits.iter_mut().zip(row.iter()).enumerate() {
                *t = match v {
                    -1.0 => -1,
                    0.0 => 0,
                    1.0 => 1,
                    _ => {
                        return Err(w.error(format!(
                            "offline autobitlinear weight {v} at ({r},{c}) is not -1, 0 or 1"
                        )))
                    }
                };
            }
            Ok(multiplier)
        },
    )
}

/// The ternarization of transformers' `WeightQuant` (and 1bitLLM's `weight_quant`), in f32:
/// `scale = 1 / max(mean|W|, 1e-5)`; returns `scale`.
pub fn online_scale(w: &TensorRef<'_>) -> Result<f32> {
    let [rows, cols] = *w.shape else {
        return Err(w.error(format!("expected a 2-D tensor, found shape {:?}", w.shape)));
    };
    // torch sums f32 with pairwise/vectorized partial sums; an f64 sum rounded once is the
    // correctly rounded f32 sum, which torch's result matches except in rare last-bit cases.
    // Row sums are taken in parallel and added in row order (the same sum as a serial loop).
    let row_sums = (0..rows)
        .into_par_iter()
        .map_init(
            || vec![0.0f32; cols],
            |row, r| {
                w.row_f32(r, row)?;
                Ok(row.iter().map(|v| v.abs() as f64).sum::<f64>())
            },
        )
        .collect::<Vec<Result<f64>>>();
    let sum = row_sums
        .into_iter()
        .try_fold(0.0f64, |acc, s| s.map(|s| acc + s))?;
    // CPU `mean` is `sum / n` in the tensor's dtype.
    let mean = (sum as f32) / (rows * cols) as f32;
    Ok(1.0f32 / mean.max(1e-5f32))
}

fn online_ternary(w: &TensorRef<'_>, out: usize, inp: usize) -> Result<TernaryMatrix> {
    w.expect_shape(&[out, inp])?;
    w.expect_dtype(&[Dtype::BF16, Dtype::F16, Dtype::F32])?;
    let scale = online_scale(w)?;
    // transformers returns `(t / scale).to(dtype)`; in the f32 computation this engine
    // reproduces (the model loaded in float32), that is 1/scale in f32.
    let multiplier = 1.0f32 / scale;
    TernaryMatrix::from_rows_parallel_with(
        out,
        inp,
        || vec![0.0f32; inp],
        |row, r, trits| {
            w.row_f32(r, row)?;
            for (t, &v) in trits.iter_mut().zip(row.iter()) {
                *t = (v * scale).round_ties_even().clamp(-1.0, 1.0) as i8;
            }
            Ok(multiplier)
        },
    )
}

/// `generation_config.json` (if any), falling back to `config.json`'s token ids.
fn read_generation(dir: &Path, config: &Value, vocab: usize) -> Result<GenerationDefaults> {
    let path = dir.join("generation_config.json");
    let config_path = dir.join("config.json");
    let ck = Keys::new(&config_path, config, "")?;
    let mut g = GenerationDefaults {
        eos_token_ids: ck.ids_opt("eos_token_id", vocab)?,
        bos_token_id: ck.ids_opt("bos_token_id", vocab)?.first().copied(),
        ..Default::default()
    };
    if !path.is_file() {
        return Ok(g);
    }
    let json = read_json(&path)?;
    let k = Keys::new(&path, &json, "")?;
    let eos = k.ids_opt("eos_token_id", vocab)?;
    if !eos.is_empty() {
        g.eos_token_ids = eos;
    }
    if let Some(&bos) = k.ids_opt("bos_token_id", vocab)?.first() {
        g.bos_token_id = Some(bos);
    }
    // Sampling values are defaults a request may override: one of the wrong type or out of
    // range is ignored with a warning naming the key, not a reason to refuse the model.
    let mut warnings = Vec::new();
    let mut lenient = |v: Result<Option<f32>>| {
        v.unwrap_or_else(|e| {
            warnings.push(format!("{e}; ignored (the engine's default is used)"));
            None
        })
    };
    g.temperature = lenient(k.f32_opt("temperature"));
    g.top_p = lenient(k.f32_opt("top_p"));
    g.repetition_penalty = lenient(k.f32_opt("repetition_penalty"));
    g.top_k = k.usize_opt("top_k").unwrap_or_else(|e| {
        warnings.push(format!("{e}; ignored (the engine's default is used)"));
        None
    });
    g.warnings = warnings;
    g.drop_invalid_sampling(
        &path,
        ["temperature", "top_k", "top_p", "repetition_penalty"],
    );
    // transformers decodes greedily when do_sample is false, whatever the temperature says.
    if k.bool_opt("do_sample")? == Some(false) {
        g.temperature = Some(0.0);
    }
    Ok(g)
}

/// `chat_template.jinja` (transformers ≥ 4.43 writes it there), else `tokenizer_config.json`'s
/// `chat_template`: a string, or a list of `{name, template}` of which "default" is used.
fn read_chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| Error::io(&jinja, e));
    }
    let path: PathBuf = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let json = read_json(&path)?;
    let k = Keys::new(&path, &json, "")?;
    match k.get("chat_template") {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => {
            for item in items {
                if item.get("name").and_then(|n| n.as_str()) == Some("default") {
                    return match item.get("template").and_then(|t| t.as_str()) {
                        Some(t) => Ok(Some(t.to_string())),
                        None => Err(k.err(
                            "chat_template",
                            "the `default` entry has no template string",
                        )),
                    };
                }
            }
            Err(k.err(
                "chat_template",
                "a list of templates without one named `default`",
            ))
        }
        Some(v) => Err(k.err(
            "chat_template",
            format!("expected a string or a list, found {v}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_patterns_match_like_transformers() {
        assert!(module_matches("lm_head", "lm_head"));
        assert!(module_matches(
            "model.layers.1.mlp.up_proj",
            "model.layers.1"
        ));
        assert!(!module_matches(
            "model.layers.11.mlp.up_proj",
            "model.layers.1"
        ));
        assert!(module_matches("model.layers.3.mlp.down_proj", "down_proj"));
        assert!(!module_matches("model.layers.3.mlp.gate_proj", "mlp.gate"));
        assert!(module_matches("lm_head", "lm_head.weight"));
    }
}
