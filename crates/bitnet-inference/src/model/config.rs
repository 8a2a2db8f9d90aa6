//! The one model description every loader fills in, whatever the file format.

/// The FFN's gate activation: `relu(g)²` for BitNet b1.58 (2B-4T), `silu(g)` for the
/// 1bitLLM checkpoints and Llama-architecture models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu2,
    Silu,
}

impl Activation {
    /// Reads transformers' `hidden_act` spelling.
    pub fn from_hidden_act(name: &str) -> Option<Self> {
        match name {
            "relu2" | "relu_squared" | "squared_relu" => Some(Activation::Relu2),
            "silu" | "swish" => Some(Activation::Silu),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu2 => "relu2",
            Activation::Silu => "silu",
        }
    }
}

/// The largest width a model file may claim for any dimension (hidden size, heads, head
/// size, FFN size, vocabulary; and heads × head size): 2^24, far above any real model's
/// (the largest vocabularies are ~2^18), and small enough that the products of two of them
/// fit in 64 bits.
pub const MAX_DIMENSION: usize = 1 << 24;
/// The most layers a model file may claim (real models have ≤ ~200); the loaders also
/// require the file to hold exactly that many layers of tensors.
pub const MAX_LAYERS: usize = 1 << 16;
/// The longest trained context a model file may claim: 2^24 positions (real models claim
/// ≤ ~10M). A run's own context (flags, server settings) is bounded by this too.
pub const MAX_CONTEXT: usize = 1 << 24;

/// Hyper-parameters of a decoder-only transformer of the Llama/BitNet family.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Where the model came from, for display: `bitnet-25`, `BitNetForCausalLM`, `llama`, ...
    pub architecture: String,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_size: usize,
    pub vocab_size: usize,
    /// The longest context the model was trained for.
    pub max_context: usize,
    pub rope_theta: f32,
    /// How the RoPE frequencies are scaled (transformers' `rope_type`).
    pub rope_scaling: super::rope::RopeScaling,
    pub rms_norm_eps: f32,
    pub activation: Activation,
    /// BitNet's extra RMSNorms before the attention output and FFN down projections.
    pub has_sub_norms: bool,
    /// The lm_head is the token embedding matrix.
    pub tied_embeddings: bool,
    /// Qwen3's RMSNorm of each query and key head (over `head_dim`) before RoPE.
    pub qk_norm: bool,
}

impl ModelConfig {
    /// Query heads that share one key/value head (grouped-query attention).
    pub fn gqa_group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Checks the relations the forward pass relies on; `source` names the file for errors.
    pub fn validate(&self, source: &std::path::Path) -> crate::Result<()> {
        self.validate_named(source, &|key| key.to_string())
    }

    /// [`Self::validate`] with errors naming each field by the file's own key: `key` maps
    /// the `config.json` spelling (`hidden_size`, ...) to it (`bitnet.embedding_length`).
    pub fn validate_named(
        &self,
        source: &std::path::Path,
        key: &dyn Fn(&str) -> String,
    ) -> crate::Result<()> {
        let bad = |k: &str, msg: String| Err(crate::Error::config(source, key(k), msg));
        for (key, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.n_layers),
            ("num_attention_heads", self.n_heads),
            ("num_key_value_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.ffn_size),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_context),
        ] {
            if v == 0 {
                return bad(key, "must be greater than 0".into());
            }
        }
        // Every size is later multiplied by others (heads × head size, rows × columns,
        // context × dimensions) and used to index and allocate: each must be small enough
        // that those products cannot overflow, whatever the file claims. The tensors
        // present bound the real sizes further (the loaders compare every shape).
        for (key, v) in [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.n_heads),
            ("num_key_value_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.ffn_size),
            ("vocab_size", self.vocab_size),
        ] {
            if v > MAX_DIMENSION {
                return bad(key, format!("{v} is larger than {MAX_DIMENSION}"));
            }
        }
        if self.n_layers > MAX_LAYERS {
            return bad(
                "num_hidden_layers",
                format!("{} is larger than {MAX_LAYERS}", self.n_layers),
            );
        }
        if self.max_context > MAX_CONTEXT {
            return bad(
                "max_position_embeddings",
                format!(
                    "{} is larger than {MAX_CONTEXT} positions",
                    self.max_context
                ),
            );
        }
        for (key, heads) in [
            ("num_attention_heads", self.n_heads),
            ("num_key_value_heads", self.n_kv_heads),
        ] {
            let product = heads.checked_mul(self.head_dim);
            if product.is_none_or(|p| p > MAX_DIMENSION) {
                return bad(
                    key,
                    format!(
                        "{heads} heads × head_dim {} is larger than {MAX_DIMENSION}",
                        self.head_dim
                    ),
                );
            }
        }
        // The largest matrix and the RoPE tables: their element counts must fit.
        let widest = self.hidden_size.max(self.ffn_size).max(self.q_dim());
        if self.vocab_size.checked_mul(widest).is_none()
            || self.ffn_size.checked_mul(self.hidden_size).is_none()
            || self.max_context.checked_mul(self.head_dim).is_none()
        {
            return bad(
                "hidden_size",
                "the weight matrices' element counts overflow".into(),
            );
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} query heads are not a multiple of {} key/value heads",
                    self.n_heads, self.n_kv_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(
                "head_dim",
                format!("{} is odd; RoPE needs pairs", self.head_dim),
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(
                "rope_theta",
                format!("{} is not a finite positive number", self.rope_theta),
            );
        }
        self.rope_scaling.validate(self.head_dim, &|k, msg| {
            crate::Error::config(source, key(&format!("rope_scaling.{k}")), msg)
        })?;
        if !(self.rms_norm_eps.is_finite() && (0.0..=1.0).contains(&self.rms_norm_eps)) {
            return bad(
                "rms_norm_eps",
                format!("{} is not a number in [0, 1]", self.rms_norm_eps),
            );
        }
        Ok(())
    }
}

/// Sampling defaults and stop tokens the model's files ask for (`generation_config.json`,
/// GGUF `tokenizer.ggml.*` ids). Unset fields leave the engine's defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Token ids that end generation (EOS, EOT, `<|eot_id|>`, ...).
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// Values the files set that were out of range and so were ignored (the engine's
    /// default is used instead), each naming the file and key; front ends show them.
    pub warnings: Vec<String>,
}

impl GenerationDefaults {
    /// Drops each sampling default that is not finite and in its range (the same ranges
    /// [`crate::generate::GenerationConfig::validate`] applies to requests), with a warning
    /// naming `source` and the key. A model file's sampling values are only defaults a
    /// request may override, so a bad one is ignored rather than refusing the model.
    /// `keys` names the file's own spelling of temperature, top_k, top_p and
    /// repetition penalty.
    pub fn drop_invalid_sampling(&mut self, source: &std::path::Path, keys: [&str; 4]) {
        let mut warn = |key: &str, v: String, range: &str| {
            self.warnings.push(format!(
                "{}: `{key}` = {v} is not {range}; ignored (the engine's default is used)",
                source.display()
            ));
        };
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t >= 0.0) {
                warn(keys[0], t.to_string(), "a number ≥ 0");
                self.temperature = None;
            }
        }
        if let Some(k) = self.top_k {
            if k > MAX_DIMENSION {
                warn(
                    keys[1],
                    k.to_string(),
                    "at most the largest vocabulary (2^24)",
                );
                self.top_k = None;
            }
        }
        if let Some(p) = self.top_p {
            if !(p.is_finite() && p > 0.0 && p <= 1.0) {
                warn(keys[2], p.to_string(), "a number in (0, 1]");
                self.top_p = None;
            }
        }
        if let Some(r) = self.repetition_penalty {
            if !(r.is_finite() && r > 0.0) {
                warn(keys[3], r.to_string(), "a number > 0");
                self.repetition_penalty = None;
            }
        }
    }
}

/// Checks that the layer count a file's metadata claims (`key`) is the number of layers its
/// tensors hold: every tensor named `{prefix}{i}.…` has `i < n_layers`, and layer
/// `n_layers - 1` has tensors. Loaders call it before allocating anything per layer, so a
/// claimed count cannot cost memory the file does not back. Missing tensors of the layers
/// in between are reported by name when the layers load.
pub fn check_layer_count<'a>(
    source: &std::path::Path,
    key: &str,
    n_layers: usize,
    prefix: &str,
    names: impl Iterator<Item = &'a str>,
) -> crate::Result<()> {
    let mut present: Option<usize> = None;
    for name in names {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let digits = rest.split('.').next().unwrap_or("");
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A layer number past usize (a hostile name) counts as past any claim.
        let i = digits.parse::<usize>().unwrap_or(usize::MAX);
        present = Some(present.map_or(i, |p| p.max(i)));
    }
    let found = present.map_or(0, |p| p.saturating_add(1));
    let have = match present {
        _ if found == n_layers => return Ok(()),
        None => format!("no `{prefix}N.*` tensors"),
        Some(usize::MAX) => format!("a `{prefix}N.*` tensor with an impossible layer number"),
        Some(p) if found < n_layers => {
            format!("tensors up to layer {p} only: `{prefix}{found}.*` are missing")
        }
        Some(p) => format!("tensors up to layer {p} (`{prefix}{p}.*`)"),
    };
    Err(crate::Error::config(
        source,
        key,
        format!("{n_layers} layers claimed, but the file has {have}"),
    ))
}
