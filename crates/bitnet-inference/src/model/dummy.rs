//! Models with chosen shapes and random ternary weights, for benchmarks that need no
//! download (how bitnet.cpp made its own published charts).

use super::config::{Activation, ModelConfig};
use super::weights::{LayerWeights, Linear, ModelWeights, RmsNorm};
use crate::formats::gguf::GgufValue;
use crate::kernels::{DenseData, DenseMatrix, TernaryMatrix};
use crate::rng::Rng;
use crate::Result;
use half::f16;

/// The shapes of microsoft/bitnet-b1.58-2B-4T.
pub fn bitnet_2b_4t() -> ModelConfig {
    ModelConfig {
        architecture: "bitnet-b1.58 (2B-4T shapes)".into(),
        hidden_size: 2560,
        n_layers: 30,
        n_heads: 20,
        n_kv_heads: 5,
        head_dim: 128,
        ffn_size: 6912,
        vocab_size: 128256,
        max_context: 4096,
        rope_theta: 500000.0,
        rope_scaling: crate::model::RopeScaling::None,
        rms_norm_eps: 1e-5,
        activation: Activation::Relu2,
        has_sub_norms: true,
        tied_embeddings: true,
        qk_norm: false,
    }
}

/// Random weights for `config`: uniform trits with one power-of-two scale per tensor
/// (exact in f16 and bf16, so every file format stores it unchanged), norms near 1, an f16
/// embedding with values of a trained model's magnitude.
pub fn random_weights(config: &ModelConfig, seed: u64) -> Result<ModelWeights> {
    let mut rng = Rng::new(seed);
    let (hd, qd, kvd, ffn) = (
        config.hidden_size,
        config.q_dim(),
        config.kv_dim(),
        config.ffn_size,
    );
    let mut ternary = |rows: usize, cols: usize| -> Result<Linear> {
        let scale = 1.0 / 64.0;
        let m = TernaryMatrix::from_rows(rows, cols, |_, t| {
            for chunk in t.chunks_mut(32) {
                let mut bits = rng.next_u64();
                for v in chunk {
                    // 2 bits → {-1, 0, 0, +1}: about half the weights zero, as in trained models.
                    *v = [-1, 0, 0, 1][(bits & 3) as usize];
                    bits >>= 2;
                }
            }
            Ok(scale)
        })?;
        Ok(Linear::ternary(m))
    };
    let norm = |n: usize, eps: f32| RmsNorm {
        weight: vec![1.0; n],
        eps,
    };
    let eps = config.rms_norm_eps;
    let mut layers = Vec::with_capacity(config.n_layers);
    for _ in 0..config.n_layers {
        layers.push(LayerWeights {
            attn_norm: norm(hd, eps),
            q_proj: ternary(qd, hd)?,
            k_proj: ternary(kvd, hd)?,
            v_proj: ternary(kvd, hd)?,
            q_norm: None,
            k_norm: None,
            attn_sub_norm: config.has_sub_norms.then(|| norm(qd, eps)),
            o_proj: ternary(hd, qd)?,
            ffn_norm: norm(hd, eps),
            gate_proj: ternary(ffn, hd)?,
            up_proj: ternary(ffn, hd)?,
            ffn_sub_norm: config.has_sub_norms.then(|| norm(ffn, eps)),
            down_proj: ternary(hd, ffn)?,
        });
    }
    let embedding: Vec<f16> = (0..config.vocab_size * hd)
        .map(|_| f16::from_f32((rng.next_f32() - 0.5) * 0.05))
        .collect();
    Ok(ModelWeights {
        token_embedding: DenseMatrix::new(config.vocab_size, hd, DenseData::F16(embedding.into()))?,
        layers,
        output_norm: norm(hd, eps),
        lm_head: None,
    })
}

/// A byte-level BPE vocabulary of `vocab_size` tokens for GGUF metadata: the 256 byte
/// tokens (GPT-2's printable mapping), one merge (two spaces; llama.cpp rejects an empty
/// merge list), and control tokens filling the rest.
/// Enough for llama.cpp and this engine to load and run the model on any text.
///
/// # Panics
///
/// If `vocab_size` is below 258 (`bitnet dummy --vocab` refuses such sizes first).
pub fn byte_vocab_metadata(vocab_size: usize) -> Vec<(String, GgufValue)> {
    assert!(
        vocab_size >= 258,
        "a byte vocabulary needs at least 258 tokens"
    );
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for b in 0..=255u8 {
        tokens.push(GgufValue::String(gpt2_byte_char(b).to_string()));
        types.push(GgufValue::I32(1));
    }
    tokens.push(GgufValue::String("ĠĠ".into()));
    types.push(GgufValue::I32(1));
    for i in 257..vocab_size {
        tokens.push(GgufValue::String(format!("<|reserved_{i}|>")));
        types.push(GgufValue::I32(3));
    }
    let (bos, eos) = (vocab_size as u32 - 2, vocab_size as u32 - 1);
    vec![
        (
            "tokenizer.ggml.model".into(),
            GgufValue::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".into(),
            GgufValue::String("default".into()),
        ),
        ("tokenizer.ggml.tokens".into(), GgufValue::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(vec![GgufValue::String("Ġ Ġ".into())]),
        ),
        ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(bos)),
        ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(eos)),
        ("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(true)),
    ]
}

/// GPT-2's byte → printable character map.
fn gpt2_byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let offset = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + offset).expect("valid code point")
}

/// Gives every ternary linear of the layers random group-wise scales, one per `group`
/// weights (64 or 128), each `k/2048` for `k` in 16..48 (exact in f16, so Q2_0 stores them
/// unchanged), as group-scaled ternary models (Q2_0 files) have.
pub fn random_group_scales(weights: &mut ModelWeights, group: usize, seed: u64) -> Result<()> {
    use super::weights::LinearWeights;
    let mut rng = Rng::new(seed ^ 0x9e37_79b9_7f4a_7c15);
    for layer in &mut weights.layers {
        for lin in [
            &mut layer.q_proj,
            &mut layer.k_proj,
            &mut layer.v_proj,
            &mut layer.o_proj,
            &mut layer.gate_proj,
            &mut layer.up_proj,
            &mut layer.down_proj,
        ] {
            let LinearWeights::Ternary(m) = &lin.weights else {
                continue;
            };
            let n = m.rows() * (m.cols() / group.max(1));
            let scales: Vec<f32> = (0..n)
                .map(|_| (16 + rng.next_u64() % 32) as f32 / 2048.0)
                .collect();
            let m = m.clone().with_group_scales(group, &scales)?;
            lin.weights = LinearWeights::Ternary(m);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn byte_chars_are_distinct() {
        let chars: std::collections::HashSet<char> =
            (0..=255u8).map(super::gpt2_byte_char).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(super::gpt2_byte_char(b' '), 'Ġ');
        assert_eq!(super::gpt2_byte_char(b'a'), 'a');
    }
}
