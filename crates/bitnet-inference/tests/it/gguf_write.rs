//! Our GGUF writer against our loader: a random model written as TQ2_0, TQ1_0 and I2_S
//! loads back with the same trits, scales and logits as the model in memory.

use bitnet_inference::backend::cpu::CpuBackend;
use bitnet_inference::formats::ggml::GgmlType;
use bitnet_inference::model::save_gguf::{write_gguf, GgufExport};
use bitnet_inference::model::{self, dummy, ModelConfig};

fn small_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 256,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        ffn_size: 512,
        vocab_size: 300,
        max_context: 64,
        ..dummy::bitnet_2b_4t()
    }
}

fn logits(model: &CpuBackend, ids: &[u32]) -> Vec<f32> {
    bitnet_inference::eval::sequence_logits(model, ids).unwrap()
}

#[test]
fn written_gguf_files_load_back_identically() {
    let config = small_config();
    let ids = [1u32, 77, 255, 299, 3, 42];
    let reference =
        CpuBackend::new(config.clone(), dummy::random_weights(&config, 5).unwrap()).unwrap();
    let expected = logits(&reference, &ids);
    let dir = std::env::temp_dir().join(format!("bitnet-gguf-write-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (ty, arch) in [
        (GgmlType::TQ2_0, "bitnet"),
        (GgmlType::TQ1_0, "bitnet-b1.58"),
        (GgmlType::I2_S, "bitnet-25"),
    ] {
        let path = dir.join(format!("{}.gguf", ty.name()));
        write_gguf(
            &reference.config,
            &reference.weights,
            &dummy::byte_vocab_metadata(config.vocab_size),
            &GgufExport {
                architecture: arch.into(),
                ternary_type: ty,
                embedding_type: GgmlType::F16,
                name: "test".into(),
                round_scales: false,
            },
            &path,
        )
        .unwrap();
        let loaded = model::load(&path).unwrap();
        assert_eq!(loaded.config.activation, config.activation, "{arch}");
        assert_eq!(loaded.tokenizer.vocab_size(), config.vocab_size);
        let m = CpuBackend::new(loaded.config, loaded.weights).unwrap();
        assert_eq!(logits(&m, &ids), expected, "{} ({arch})", ty.name());
    }
    std::fs::remove_dir_all(&dir).ok();
}
