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
    pub rms_norm_eps: f32,
    pub activation: Activation,
    /// BitNet's extra RMSNorms before the attention output and FFN down projections.
    pub has_sub_norms: bool,
    /// The lm_head is the token embedding matrix.
    pub tied_embeddings: bool,
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
        let bad = |key: &str, msg: String| Err(crate::Error::config(source, key, msg));
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
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return bad("rope_theta", format!("{} is not positive", self.rope_theta));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps < 0.0 {
            return bad("rms_norm_eps", format!("{} is negative", self.rms_norm_eps));
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
}
