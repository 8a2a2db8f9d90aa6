//! Untrusted model files (issue 18): one edited value in an otherwise valid GGUF file or
//! Hugging Face directory gives one clear error naming the file, the key or tensor and what
//! was expected — never a panic, an abort or an allocation the file does not back. Sampling
//! defaults out of range are ignored with a warning naming the key.

use bitnet_inference::formats::gguf::{GgufFile, GgufValue, GgufWriter};
use bitnet_inference::model;
use std::path::{Path, PathBuf};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn tmp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bitnet-untrusted-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The I2_S fixture (bitnet-b1.58, 2 layers, vocabulary 320) rewritten to `name` with its
/// metadata edited by `edit` (which may insert, change or remove keys).
fn edited_gguf(name: &str, edit: impl FnOnce(&mut Vec<(String, GgufValue)>)) -> PathBuf {
    let src = GgufFile::open(format!("{FIXTURES}/bitnet-packed-gguf/model-i2s.gguf")).unwrap();
    let mut meta: Vec<(String, GgufValue)> = src
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    edit(&mut meta);
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.add_metadata(k, v);
    }
    for t in &src.tensors {
        w.add_tensor_raw(
            &t.name,
            &t.dims,
            t.type_id,
            src.tensor_data(t).unwrap().to_vec(),
        );
    }
    let path = tmp_dir("gguf").join(format!("{name}.gguf"));
    w.write(&path).unwrap();
    path
}

fn set(meta: &mut Vec<(String, GgufValue)>, key: &str, v: GgufValue) {
    match meta.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = v,
        None => meta.push((key.to_string(), v)),
    }
}

/// Loads `path`, expecting an error whose text holds every piece of `want`.
fn load_err(path: &Path, want: &[&str]) -> String {
    let e = match model::load(path) {
        Ok(_) => panic!("{} loaded; expected an error with {want:?}", path.display()),
        Err(e) => e.to_string(),
    };
    for w in want {
        assert!(e.contains(w), "error `{e}` lacks `{w}`");
    }
    e
}

#[test]
fn gguf_sizes_and_counts_from_metadata_are_checked_before_use() {
    let arch = "bitnet-b1.58";
    let k = |s: &str| format!("{arch}.{s}");
    let cases: Vec<(&str, String, GgufValue, Vec<String>)> = vec![
        // A layer count that is not the number of layers the tensors hold: more (the
        // allocation for them used to come first), fewer (layers silently ignored), absurd.
        (
            "more-layers",
            k("block_count"),
            GgufValue::U32(3),
            vec![
                k("block_count"),
                "3 layers claimed".into(),
                "up to layer 1".into(),
            ],
        ),
        (
            "fewer-layers",
            k("block_count"),
            GgufValue::U32(1),
            vec![k("block_count"), "1 layers claimed".into()],
        ),
        (
            "huge-layers",
            k("block_count"),
            GgufValue::U64(1 << 40),
            vec![k("block_count"), "larger than 65536".into()],
        ),
        // Context: bounded (the RoPE tables and KV cache are sized from it).
        (
            "huge-context",
            k("context_length"),
            GgufValue::U64(1 << 40),
            vec![k("context_length"), "larger than 16777216".into()],
        ),
        // Widths: each bounded, and heads × head size checked for overflow.
        (
            "huge-embedding",
            k("embedding_length"),
            GgufValue::U64(u64::MAX),
            vec!["embedding length 18446744073709551615".into()],
        ),
        (
            "huge-heads",
            k("attention.head_count"),
            GgufValue::U64(1 << 62),
            vec![k("attention.head_count"), "do not divide".into()],
        ),
        (
            "key-length",
            k("attention.key_length"),
            GgufValue::U32(1 << 23),
            vec![k("rope.dimension_count"), "head dimension 8388608".into()],
        ),
        (
            "huge-ffn",
            k("feed_forward_length"),
            GgufValue::U64(1 << 50),
            vec![k("feed_forward_length"), "larger than".into()],
        ),
        (
            "huge-vocab",
            k("vocab_size"),
            GgufValue::U64(1 << 60),
            vec![k("vocab_size"), "larger than".into()],
        ),
        // A plausible but wrong size is caught by the tensor it describes.
        (
            "vocab-mismatch",
            k("vocab_size"),
            GgufValue::U32(321),
            vec!["token_embd.weight".into(), "expected shape".into()],
        ),
        (
            "ffn-mismatch",
            k("feed_forward_length"),
            GgufValue::U32(1024),
            vec!["blk.0.ffn_gate.weight".into(), "expected shape".into()],
        ),
        (
            "zero-heads",
            k("attention.head_count"),
            GgufValue::U32(0),
            vec![k("attention.head_count")],
        ),
        // Floats: finite and in range.
        (
            "inf-theta",
            k("rope.freq_base"),
            GgufValue::F32(f32::INFINITY),
            vec![k("rope.freq_base"), "finite".into()],
        ),
        (
            "nan-eps",
            k("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(f32::NAN),
            vec![k("attention.layer_norm_rms_epsilon")],
        ),
        (
            "big-eps",
            k("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(1e30),
            vec![k("attention.layer_norm_rms_epsilon"), "[0, 1]".into()],
        ),
        // Token ids: below the vocabulary.
        (
            "bos-id",
            "tokenizer.ggml.bos_token_id".into(),
            GgufValue::U32(320),
            vec!["tokenizer.ggml.bos_token_id".into(), "320".into()],
        ),
        (
            "eos-id",
            "tokenizer.ggml.eos_token_id".into(),
            GgufValue::U32(u32::MAX),
            vec!["tokenizer.ggml.eos_token_id".into()],
        ),
        (
            "type-confusion",
            k("block_count"),
            GgufValue::String("2".into()),
            vec![k("block_count")],
        ),
    ];
    for (name, key, value, want) in cases {
        let path = edited_gguf(name, |m| set(m, &key, value));
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        let e = load_err(&path, &want);
        assert!(
            e.contains(&format!("{name}.gguf")),
            "{name}: `{e}` does not name the file"
        );
    }
    // Heads × head size past the bound, each factor within it.
    let path = edited_gguf("heads-product", |m| {
        set(m, &k("attention.key_length"), GgufValue::U32(1 << 23));
        set(m, &k("attention.value_length"), GgufValue::U32(1 << 23));
        set(m, &k("rope.dimension_count"), GgufValue::U32(1 << 23));
    });
    load_err(
        &path,
        &[&k("attention.head_count"), "4 heads × head_dim 8388608"],
    );
}

#[test]
fn gguf_tokenizer_larger_than_the_vocabulary_is_refused() {
    // 325 tokens for a 320-row embedding: ids 320..325 would index past the weights.
    let path = edited_gguf("tokens-past-vocab", |m| {
        for (k, v) in m.iter_mut() {
            if let GgufValue::Array(items) = v {
                match k.as_str() {
                    "tokenizer.ggml.tokens" => {
                        items.extend((0..5).map(|i| GgufValue::String(format!("<extra_{i}>"))))
                    }
                    "tokenizer.ggml.token_type" => items.extend((0..5).map(|_| GgufValue::I32(4))),
                    _ => {}
                }
            }
        }
    });
    // Loading for inspect or convert shows it as it is; loading to run refuses it.
    let m = model::load(&path).unwrap();
    assert_eq!((m.tokenizer.vocab_size(), m.config.vocab_size), (325, 320));
    let e = match bitnet_inference::engine::LoadedEngineModel::load(&path) {
        Ok(_) => panic!("a tokenizer past the vocabulary was accepted"),
        Err(e) => e.to_string(),
    };
    for want in ["tokens-past-vocab.gguf", "325 tokens", "320"] {
        assert!(e.contains(want), "`{e}` lacks `{want}`");
    }
}

#[test]
fn gguf_sampling_defaults_out_of_range_are_ignored_with_a_warning() {
    let path = edited_gguf("sampling", |m| {
        set(m, "general.sampling.temp", GgufValue::F32(f32::NAN));
        set(m, "general.sampling.top_p", GgufValue::F32(1.5));
        set(
            m,
            "general.sampling.top_k",
            GgufValue::String("forty".into()),
        );
        set(m, "general.sampling.penalty_repeat", GgufValue::F32(1.1));
    });
    let m = model::load(&path).unwrap();
    let g = &m.generation;
    assert_eq!((g.temperature, g.top_p, g.top_k), (None, None, None));
    assert_eq!(g.repetition_penalty, Some(1.1), "a valid value is kept");
    let w = g.warnings.join("\n");
    for key in [
        "general.sampling.temp",
        "general.sampling.top_p",
        "general.sampling.top_k",
    ] {
        assert!(w.contains(key), "no warning names {key}: {w}");
    }
    assert!(!w.contains("penalty_repeat"), "{w}");
    assert_eq!(g.warnings.len(), 3, "{w}");
}

/// The `bitnet-packed` fixture directory copied, with `file`'s JSON edited by `edit`.
fn edited_hf(
    name: &str,
    file: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> PathBuf {
    let src = Path::new(FIXTURES).join("bitnet-packed");
    let dir = tmp_dir(name);
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let text = std::fs::read_to_string(dir.join(file)).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(json.as_object_mut().unwrap());
    std::fs::write(dir.join(file), json.to_string()).unwrap();
    dir
}

#[test]
fn hf_config_sizes_and_ids_are_checked_before_use() {
    use serde_json::json;
    let cases: Vec<(&str, &str, serde_json::Value, Vec<&str>)> = vec![
        (
            "num_hidden_layers",
            "layers-huge",
            json!(1u64 << 40),
            vec!["larger than 65536"],
        ),
        (
            "num_hidden_layers",
            "layers-more",
            json!(3),
            vec![
                "3 layers claimed",
                "`model.layers.2.*` are missing",
                "up to layer 1",
            ],
        ),
        (
            "num_hidden_layers",
            "layers-fewer",
            json!(1),
            vec!["1 layers claimed"],
        ),
        (
            "max_position_embeddings",
            "context-huge",
            json!(u64::MAX),
            vec!["larger than 16777216"],
        ),
        (
            "head_dim",
            "head-dim-overflow",
            json!(1u64 << 62),
            vec!["larger than"],
        ),
        (
            "head_dim",
            "heads-product",
            json!(1 << 23),
            vec!["4 heads × head_dim 8388608"],
        ),
        (
            "intermediate_size",
            "ffn-huge",
            json!(1u64 << 40),
            vec!["larger than"],
        ),
        (
            "vocab_size",
            "vocab-mismatch",
            json!(319),
            vec!["model.embed_tokens.weight"],
        ),
        (
            "rms_norm_eps",
            "eps-overflows-f32",
            json!(1e300),
            vec!["finite"],
        ),
        (
            "rope_theta",
            "theta-negative",
            json!(-1.0),
            vec!["finite positive"],
        ),
        (
            "hidden_size",
            "hidden-string",
            json!("256"),
            vec!["non-negative integer"],
        ),
    ];
    for (key, name, value, want) in cases {
        let dir = edited_hf(name, "config.json", |o| {
            o.insert(key.into(), value);
        });
        let e = load_err(&dir, &want);
        // Tensor errors name the safetensors file; config errors name config.json and the key.
        if !e.contains("tensor `") {
            assert!(
                e.contains(&format!("{name}/config.json")) && e.contains(key),
                "{name}: `{e}` does not name config.json and `{key}`"
            );
        }
    }
}

#[test]
fn hf_token_ids_must_be_below_the_vocabulary() {
    // config.json's ids count when generation_config.json has none.
    let dir = edited_hf("config-eos", "config.json", |o| {
        o.insert("eos_token_id".into(), serde_json::json!([318, 5000]));
    });
    std::fs::remove_file(dir.join("generation_config.json")).unwrap();
    load_err(
        &dir,
        &["config-eos/config.json", "eos_token_id", "5000", "320"],
    );
    let dir = edited_hf("gen-bos", "generation_config.json", |o| {
        o.insert("bos_token_id".into(), serde_json::json!(320));
    });
    load_err(&dir, &["generation_config.json", "bos_token_id", "320"]);
}

#[test]
fn hf_generation_config_sampling_values_are_validated() {
    let dir = edited_hf("gen-sampling", "generation_config.json", |o| {
        o.insert("do_sample".into(), serde_json::json!(true));
        o.insert("temperature".into(), serde_json::json!(-0.5));
        o.insert("top_p".into(), serde_json::json!(0.0));
        o.insert("top_k".into(), serde_json::json!("50"));
        o.insert("repetition_penalty".into(), serde_json::json!(1e300));
    });
    let m = model::load(&dir).unwrap();
    let g = &m.generation;
    assert_eq!(
        (g.temperature, g.top_p, g.top_k, g.repetition_penalty),
        (None, None, None, None)
    );
    let w = g.warnings.join("\n");
    assert_eq!(g.warnings.len(), 4, "{w}");
    for key in ["temperature", "top_p", "top_k", "repetition_penalty"] {
        assert!(
            w.contains(&format!("`{key}`")) && w.contains("generation_config.json"),
            "{w}"
        );
    }
    // Valid values are kept as the file says.
    let dir = edited_hf("gen-sampling-ok", "generation_config.json", |o| {
        o.insert("do_sample".into(), serde_json::json!(true));
        o.insert("temperature".into(), serde_json::json!(0.7));
        o.insert("top_p".into(), serde_json::json!(0.9));
        o.insert("top_k".into(), serde_json::json!(50));
    });
    let g = model::load(&dir).unwrap().generation;
    assert_eq!(
        (g.temperature, g.top_p, g.top_k),
        (Some(0.7), Some(0.9), Some(50))
    );
    assert!(g.warnings.is_empty(), "{:?}", g.warnings);
}

#[test]
fn tokenizer_json_ids_must_stay_in_proportion_to_the_file() {
    // One vocabulary entry with id 4e9: the piece table used to be sized by the largest id
    // (~100 GB).
    let dir = edited_hf("sparse-ids", "tokenizer.json", |o| {
        let vocab = o["model"]["vocab"].as_object_mut().unwrap();
        vocab.insert("far_away".into(), serde_json::json!(4_000_000_000u64));
    });
    load_err(&dir, &["tokenizer.json", "4000000000", "sparse"]);
}

/// RoPE scaling values from a config (issue 20): every one checked (finite, in range,
/// lengths equal to head_dim / 2), each error naming the key.
#[test]
fn hf_rope_scaling_values_are_checked() {
    use serde_json::json;
    let cases: Vec<(&str, serde_json::Value, Vec<&str>)> = vec![
        (
            "nan-factor",
            json!({"rope_type": "linear", "factor": "NaN"}),
            vec!["rope_parameters.factor"],
        ),
        (
            "zero-factor",
            json!({"rope_type": "linear", "factor": 0.0}),
            vec!["factor", "not a finite number > 0"],
        ),
        (
            "no-factor",
            json!({"rope_type": "dynamic"}),
            vec!["rope_parameters.factor", "missing"],
        ),
        (
            "dynamic-below-one",
            json!({"rope_type": "dynamic", "factor": 0.5}),
            vec!["factor", "≥ 1"],
        ),
        (
            "llama3-no-low",
            json!({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}),
            vec!["low_freq_factor", "missing"],
        ),
        (
            "llama3-inverted",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
            vec!["high_freq_factor", "greater than low_freq_factor"],
        ),
        (
            "yarn-huge-original",
            json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1u64 << 40}),
            vec!["original_max_position_embeddings"],
        ),
        (
            "longrope-short-list",
            json!({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}),
            vec!["short_factor", "head_dim / 2 = 32"],
        ),
        (
            "unknown-type",
            json!({"rope_type": "su-per"}),
            vec!["rope_type", "`su-per` is not supported"],
        ),
        (
            "partial",
            json!({"rope_type": "default", "partial_rotary_factor": 0.5}),
            vec!["partial RoPE"],
        ),
    ];
    for (name, rope, want) in cases {
        let dir = edited_hf(name, "config.json", |c| {
            c.insert("rope_parameters".into(), rope.clone());
        });
        load_err(&dir, &want);
    }
}

#[test]
fn gguf_rope_scaling_keys_and_rope_freqs_are_checked() {
    use bitnet_inference::formats::gguf::GgufValue as V;
    let k = |s: &str| format!("bitnet-b1.58.rope.scaling.{s}");
    type Case = (&'static str, Vec<(String, V)>, Vec<String>);
    let cases: Vec<Case> = vec![
        (
            "unknown",
            vec![(k("type"), V::String("longrope".into()))],
            vec![k("type"), "not supported".into()],
        ),
        (
            "yarn-no-factor",
            vec![(k("type"), V::String("yarn".into()))],
            vec![k("factor"), "missing".into()],
        ),
        (
            "linear-nan",
            vec![
                (k("type"), V::String("linear".into())),
                (k("factor"), V::F32(f32::NAN)),
            ],
            vec![k("factor"), "finite".into()],
        ),
        (
            "yarn-beta",
            vec![
                (k("type"), V::String("yarn".into())),
                (k("factor"), V::F32(4.0)),
                (k("yarn_beta_fast"), V::F32(-1.0)),
            ],
            vec![k("yarn_beta_fast")],
        ),
    ];
    for (name, keys, want) in cases {
        let path = edited_gguf(name, |meta| {
            for (key, v) in keys.clone() {
                set(meta, &key, v);
            }
        });
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        load_err(&path, &want);
    }
    // A rope_freqs tensor of the wrong length names the tensor and both lengths.
    let src = GgufFile::open(format!("{FIXTURES}/bitnet-packed-gguf/model-i2s.gguf")).unwrap();
    let mut w = GgufWriter::new();
    for (key, v) in src
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment")
    {
        w.add_metadata(key.clone(), v.clone());
    }
    for t in &src.tensors {
        w.add_tensor_raw(
            &t.name,
            &t.dims,
            t.type_id,
            src.tensor_data(t).unwrap().to_vec(),
        );
    }
    w.add_f32("rope_freqs.weight", &[3], &[1.0, 2.0, 3.0]);
    let path = tmp_dir("rope-freqs").join("m.gguf");
    w.write(&path).unwrap();
    load_err(
        &path,
        &["rope_freqs.weight", "3 values", "head_dim / 2 = 32"],
    );
}
