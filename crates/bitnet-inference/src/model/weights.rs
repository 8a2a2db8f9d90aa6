//! The model's weights in the layouts the kernels want, filled by the format loaders.

use crate::kernels::{DenseMatrix, TernaryMatrix};

/// RMSNorm parameters: `y = x / sqrt(mean(x²) + eps) · weight`, computed in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Vec<f32>,
    pub eps: f32,
}

/// The weights of one linear layer `y = W x`, `W: [out, in]`.
#[derive(Debug, Clone)]
pub enum LinearWeights {
    /// W1.58A8: ternary weights, int8 per-token activations.
    Ternary(TernaryMatrix),
    /// A float linear (non-ternary models, lm_head).
    Dense(DenseMatrix),
}

#[derive(Debug, Clone)]
pub struct Linear {
    pub weights: LinearWeights,
    /// transformers' `quantization_config.use_rms_norm`: a norm applied to this linear's
    /// input before its activations are quantized.
    pub input_norm: Option<RmsNorm>,
}

impl Linear {
    pub fn ternary(m: TernaryMatrix) -> Self {
        Linear {
            weights: LinearWeights::Ternary(m),
            input_norm: None,
        }
    }
    pub fn dense(m: DenseMatrix) -> Self {
        Linear {
            weights: LinearWeights::Dense(m),
            input_norm: None,
        }
    }
    pub fn out_features(&self) -> usize {
        match &self.weights {
            LinearWeights::Ternary(m) => m.rows(),
            LinearWeights::Dense(m) => m.rows(),
        }
    }
    pub fn in_features(&self) -> usize {
        match &self.weights {
            LinearWeights::Ternary(m) => m.cols(),
            LinearWeights::Dense(m) => m.cols(),
        }
    }
    pub fn memory_bytes(&self) -> usize {
        let norm = self.input_norm.as_ref().map_or(0, |n| n.weight.len() * 4);
        norm + match &self.weights {
            LinearWeights::Ternary(m) => m.memory_bytes(),
            LinearWeights::Dense(m) => m.memory_bytes(),
        }
    }
    /// `ternary` or the float type, for display.
    pub fn kind_name(&self) -> &'static str {
        match &self.weights {
            LinearWeights::Ternary(_) => "ternary",
            LinearWeights::Dense(m) => m.data().type_name(),
        }
    }
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: RmsNorm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    /// Qwen3's RMSNorm of each query head, and of each key head, before RoPE (over
    /// `head_dim`).
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    /// BitNet's norm of the attention output before `o_proj` (over hidden).
    pub attn_sub_norm: Option<RmsNorm>,
    pub o_proj: Linear,
    pub ffn_norm: RmsNorm,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    /// BitNet's norm of `act(gate)·up` before `down_proj` (over the FFN width).
    pub ffn_sub_norm: Option<RmsNorm>,
    pub down_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct ModelWeights {
    /// `[vocab, hidden]`.
    pub token_embedding: DenseMatrix,
    pub layers: Vec<LayerWeights>,
    pub output_norm: RmsNorm,
    /// `None` when the lm_head is the token embedding (tied).
    pub lm_head: Option<Linear>,
}

impl LayerWeights {
    /// The seven linears in forward order.
    pub fn linears(&self) -> [&Linear; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }

    /// Every norm of the block, the optional sub-norms included when present.
    pub fn norms(&self) -> impl Iterator<Item = &RmsNorm> {
        [&self.attn_norm, &self.ffn_norm]
            .into_iter()
            .chain(self.attn_sub_norm.iter())
            .chain(self.ffn_sub_norm.iter())
            .chain(self.q_norm.iter())
            .chain(self.k_norm.iter())
    }
}

impl ModelWeights {
    /// Parameters as the model defines them (padding and scales not counted).
    pub fn parameter_count(&self) -> usize {
        self.tally(
            |l| {
                l.out_features() * l.in_features()
                    + l.input_norm.as_ref().map_or(0, |n| n.weight.len())
            },
            |n| n.weight.len(),
            |e| e.rows() * e.cols(),
        )
    }

    /// Bytes the weights take in memory, in their repacked layouts.
    pub fn memory_bytes(&self) -> usize {
        self.tally(
            Linear::memory_bytes,
            |n| n.weight.len() * 4,
            DenseMatrix::memory_bytes,
        )
    }

    fn tally(
        &self,
        linear: impl Fn(&Linear) -> usize,
        norm: impl Fn(&RmsNorm) -> usize,
        embedding: impl Fn(&DenseMatrix) -> usize,
    ) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.linears().into_iter().map(&linear).sum::<usize>()
                    + l.norms().map(&norm).sum::<usize>()
            })
            .sum();
        embedding(&self.token_embedding)
            + layers
            + norm(&self.output_norm)
            + self.lm_head.as_ref().map_or(0, &linear)
    }
}
