//! The HF loader decodes every weight layout exactly as transformers does. The model
//! directories and their `expected.safetensors` (trits and multipliers taken from transformers'
//! own modules) are made by `tools/make_hf_loader_refs.py`.

use bitnet_inference::formats::safetensors::SafetensorsModel;
use bitnet_inference::model::load_hf::load_model_weights;
use bitnet_inference::model::{Activation, Linear, LinearWeights};
use std::path::{Path, PathBuf};

fn dir(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/hf_loader")
        .join(variant)
}

fn check_linear(exp: &SafetensorsModel, name: &str, lin: &Linear) {
    let LinearWeights::Ternary(m) = &lin.weights else {
        panic!("{name}: not ternary");
    };
    let trits = exp.require(&format!("{name}.trits")).unwrap();
    let (rows, cols) = (trits.shape[0], trits.shape[1]);
    assert_eq!((m.rows(), m.cols()), (rows, cols), "{name}");
    for r in 0..rows {
        for c in 0..cols {
            assert_eq!(
                m.trit(r, c),
                trits.data[r * cols + c] as i8,
                "{name} ({r},{c})"
            );
        }
    }
    let mult = exp
        .require(&format!("{name}.multiplier"))
        .unwrap()
        .scalar_f32()
        .unwrap();
    for &mm in m.multipliers() {
        // transformers' multiplier in f32. The masters' mean |W| may differ in the last bit:
        // torch sums in f32 in its own order, we sum in f64 and round once.
        assert!(
            (mm - mult).abs() <= mult * 2.5e-7,
            "{name} multiplier {mm} vs transformers' {mult}"
        );
    }
}

fn check_variant(
    variant: &str,
) -> (
    bitnet_inference::model::ModelConfig,
    bitnet_inference::model::ModelWeights,
) {
    let d = dir(variant);
    let (config, weights, format) = load_model_weights(&d).unwrap();
    let exp = SafetensorsModel::open_file(&d.join("expected.safetensors")).unwrap();
    let l = &weights.layers[0];
    for (n, lin) in [
        ("self_attn.q_proj", &l.q_proj),
        ("self_attn.k_proj", &l.k_proj),
        ("self_attn.v_proj", &l.v_proj),
        ("self_attn.o_proj", &l.o_proj),
        ("mlp.gate_proj", &l.gate_proj),
        ("mlp.up_proj", &l.up_proj),
        ("mlp.down_proj", &l.down_proj),
    ] {
        check_linear(&exp, &format!("model.layers.0.{n}"), lin);
    }
    assert!(format.starts_with("safetensors"), "{format}");
    (config, weights)
}

#[test]
fn bitlinear_packed() {
    let (c, w) = check_variant("bitlinear");
    assert_eq!(c.activation, Activation::Relu2);
    assert!(c.has_sub_norms && c.tied_embeddings && w.lm_head.is_none());
    assert_eq!(w.token_embedding.data().type_name(), "bf16");
    assert!(w.layers[0].attn_sub_norm.is_some() && w.layers[0].ffn_sub_norm.is_some());
    assert!(w.layers[0].q_proj.input_norm.is_none());
}

#[test]
fn autobitlinear_offline() {
    check_variant("autobitlinear_offline");
}

#[test]
fn autobitlinear_online_with_input_norms() {
    let (_, w) = check_variant("autobitlinear_online");
    let n = w.layers[0]
        .down_proj
        .input_norm
        .as_ref()
        .expect("use_rms_norm");
    assert_eq!((n.weight.len(), n.eps), (32, 1e-6));
}

#[test]
fn llama_bitlinear_untied() {
    let (c, w) = check_variant("llama_bitlinear");
    assert_eq!(c.activation, Activation::Silu);
    assert!(!c.has_sub_norms && !c.tied_embeddings);
    assert!(w.layers[0].attn_sub_norm.is_none());
    let head = w.lm_head.as_ref().expect("untied lm_head");
    assert_eq!(head.kind_name(), "bf16");
}

#[test]
fn onebitllm_masters() {
    let (c, w) = check_variant("onebitllm");
    assert_eq!(c.activation, Activation::Silu);
    assert!(c.has_sub_norms && w.layers[0].ffn_sub_norm.as_ref().unwrap().weight.len() == 32);
    assert_eq!(w.token_embedding.data().type_name(), "f16");
}

/// Copies a variant to a scratch directory so a test can break it.
fn scratch(variant: &str, tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitnet-hf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir(variant).join(f), d.join(f)).unwrap();
    }
    d
}

fn edit_config(d: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = d.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, v.to_string()).unwrap();
}

fn err(d: &Path) -> String {
    match load_model_weights(d) {
        Ok(_) => panic!("{} loaded", d.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_errors_name_the_key() {
    let d = scratch("bitlinear", "cfg");
    edit_config(&d, |c| {
        c.remove("hidden_size");
    });
    let e = err(&d);
    assert!(
        e.contains("config.json") && e.contains("`hidden_size`") && e.contains("missing"),
        "{e}"
    );

    let d = scratch("bitlinear", "cfg2");
    edit_config(&d, |c| {
        c.insert("num_key_value_heads".into(), 3.into());
    });
    assert!(err(&d).contains("`num_key_value_heads`"));

    let d = scratch("bitlinear", "cfg3");
    edit_config(&d, |c| {
        c.insert("hidden_act".into(), "gelu".into());
    });
    assert!(err(&d).contains("`hidden_act`"));

    let d = scratch("bitlinear", "cfg4");
    edit_config(&d, |c| {
        c.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
        );
    });
    // llama3 scaling is read (issue 20); one without its frequency factors names the key.
    assert!(err(&d).contains("rope_scaling.low_freq_factor"));

    let d = scratch("bitlinear", "cfg5");
    edit_config(&d, |c| {
        c["quantization_config"]["linear_class"] = "fancy".into();
    });
    assert!(err(&d).contains("`quantization_config.linear_class`"));

    // transformers 5 style rope_parameters is read.
    let d = scratch("bitlinear", "cfg6");
    edit_config(&d, |c| {
        c.remove("rope_theta");
        c.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "default", "rope_theta": 1234.0}),
        );
    });
    assert_eq!(load_model_weights(&d).unwrap().0.rope_theta, 1234.0);

    // num_key_value_heads defaults to the head count; the packed k_proj then no longer fits.
    let d = scratch("bitlinear", "cfg7");
    edit_config(&d, |c| {
        c.remove("num_key_value_heads");
    });
    let e = err(&d);
    assert!(
        e.contains("k_proj") && e.contains("expected shape [4, 16], found [2, 16]"),
        "{e}"
    );
}

#[test]
fn tensor_errors_name_the_tensor() {
    // Wrong shape: a config that disagrees with the tensors.
    let d = scratch("llama_bitlinear", "shape");
    edit_config(&d, |c| {
        c.insert("vocab_size".into(), 25.into());
    });
    let e = err(&d);
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains("expected shape [25, 16]"),
        "{e}"
    );

    // Missing tensor: a config asking for two layers.
    let d = scratch("llama_bitlinear", "missing");
    edit_config(&d, |c| {
        c.insert("num_hidden_layers".into(), 2.into());
    });
    let e = err(&d);
    assert!(
        e.contains("model.layers.1.") && e.contains("missing"),
        "{e}"
    );

    // Truncated safetensors.
    let d = scratch("bitlinear", "trunc");
    let p = d.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&d);
    assert!(e.contains("model.safetensors"), "{e}");

    // No config.json.
    let d = scratch("bitlinear", "noconfig");
    std::fs::remove_file(d.join("config.json")).unwrap();
    assert!(err(&d).contains("config.json"));
}
