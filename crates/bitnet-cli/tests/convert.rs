//! `bitnet convert`: HF packed → each GGUF type (and GGUF → GGUF) gives identical logits and
//! the same tokenizer ids as the source.

use bitnet_inference::model::{self, Model};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../bitnet-inference/tests/fixtures")
        .join(p)
}

fn logits_and_ids(path: &Path) -> (Vec<f32>, Vec<u32>) {
    let m = model::load(path).unwrap();
    let ids = m
        .tokenizer
        .encode("Once upon a time, the robot said: hello!", true)
        .unwrap();
    let model = Model::new(m.config, m.weights).unwrap();
    let seq: Vec<u32> = ids.iter().copied().take(12).collect();
    (
        bitnet_inference::eval::sequence_logits(&model, &seq).unwrap(),
        ids,
    )
}

fn convert(input: &Path, output: &Path, to: &str, emb: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["convert", input.to_str().unwrap(), output.to_str().unwrap()])
        .args(["--to", to, "--embedding-type", emb])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn hf_packed_to_every_gguf_type_keeps_the_logits() {
    let dir = std::env::temp_dir().join(format!("bitnet-convert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture("bitnet-packed");
    let (want, want_ids) = logits_and_ids(&src);
    for to in ["gguf-i2s", "gguf-tq2_0", "gguf-tq1_0"] {
        let out = dir.join(format!("{to}.gguf"));
        convert(&src, &out, to, "f32");
        let (got, ids) = logits_and_ids(&out);
        assert_eq!(ids, want_ids, "{to}: tokenizer");
        assert_eq!(got, want, "{to}: logits");
        // GGUF → GGUF of another type: still the same.
        let again = dir.join(format!("{to}-again.gguf"));
        convert(&out, &again, "gguf-i2s", "f32");
        assert_eq!(logits_and_ids(&again).0, want, "{to} → I2_S");
        assert!(!dir.join(format!(".{to}.gguf.partial")).exists());
    }
    // A quantized embedding changes the logits a little, not a lot.
    let q = dir.join("q8.gguf");
    convert(&src, &q, "gguf-i2s", "q8_0");
    let (got, _) = logits_and_ids(&q);
    let max = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = want.iter().map(|a| a.abs()).fold(0f32, f32::max);
    assert!(
        max > 0.0 && max < 0.2 * scale,
        "q8_0 embedding: max |Δ| {max} of {scale}"
    );
    // Q6_K too (TQ2_0 this time), with the tokenizer's pre-tokenizer under llama.cpp's name.
    let q6 = dir.join("q6.gguf");
    convert(&src, &q6, "gguf-tq2_0", "q6_k");
    let f = bitnet_inference::formats::gguf::GgufFile::open(&q6).unwrap();
    assert_eq!(
        f.tensor("token_embd.weight").unwrap().ggml_type,
        bitnet_inference::formats::ggml::GgmlType::Q6_K
    );
    let pre = f
        .metadata
        .iter()
        .find(|(k, _)| k.as_str() == "tokenizer.ggml.pre")
        .map(|(_, v)| v.clone());
    assert!(
        matches!(&pre, Some(bitnet_inference::formats::gguf::GgufValue::String(p)) if p == "gpt-2"),
        "{pre:?}"
    );
    let (got, ids) = logits_and_ids(&q6);
    assert_eq!(ids, want_ids, "q6_k: tokenizer");
    let max = max_delta(&got, &want);
    assert!(
        max > 0.0 && max < 0.2 * scale,
        "q6_k embedding: max |Δ| {max} of {scale}"
    );
    // Bad choices are clear errors, and no output is left behind.
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "convert",
            src.to_str().unwrap(),
            dir.join("x.gguf").to_str().unwrap(),
        ])
        .args(["--to", "gguf-q4"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected gguf-i2s"));
    assert!(!dir.join("x.gguf").exists());
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "convert",
            src.to_str().unwrap(),
            dir.join("x.gguf").to_str().unwrap(),
        ])
        .args(["--to", "gguf-tq2_0", "--embedding-type", "q4_k"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected f16, q8_0, q6_k or f32"));
    assert!(!dir.join("x.gguf").exists());
    std::fs::remove_dir_all(&dir).ok();
}

fn max_delta(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn hf_packed_output_gives_identical_logits() {
    let dir = std::env::temp_dir().join(format!("bitnet-convert-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // HF packed → HF packed: the same tensors, the same logits and tokenizer.
    let src = fixture("bitnet-packed");
    let (want, want_ids) = logits_and_ids(&src);
    let out = dir.join("packed");
    convert(&src, &out, "hf-packed", "f16");
    let (got, ids) = logits_and_ids(&out);
    assert_eq!(ids, want_ids, "HF → HF: tokenizer");
    assert_eq!(got, want, "HF → HF: logits");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BitNetForCausalLM");
    assert_eq!(cfg["quantization_config"]["linear_class"], "bitlinear");
    assert!(!dir.join(".packed.partial").exists());

    // HF → GGUF TQ2_0 → HF packed: the tokenizer comes back from the GGUF vocabulary.
    let tq = dir.join("tq2.gguf");
    convert(&src, &tq, "gguf-tq2_0", "f32");
    let back = dir.join("from-gguf");
    convert(&tq, &back, "hf-packed", "f16");
    let (got, ids) = logits_and_ids(&back);
    assert_eq!(ids, want_ids, "GGUF → HF: tokenizer");
    assert_eq!(got, want, "GGUF → HF: logits");

    // bf16 masters (ternarized at load) → HF packed: the same ternary model.
    let masters = fixture("bitnet-online-bf16");
    let (want, want_ids) = logits_and_ids(&masters);
    let out = dir.join("from-masters");
    convert(&masters, &out, "hf-packed", "f16");
    let (got, ids) = logits_and_ids(&out);
    assert_eq!(ids, want_ids, "masters → HF: tokenizer");
    assert_eq!(
        got,
        want,
        "masters → HF: logits (max |Δ| {})",
        max_delta(&got, &want)
    );

    // An existing output directory is refused and left alone.
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["convert", src.to_str().unwrap(), out.to_str().unwrap()])
        .args(["--to", "hf-packed"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(logits_and_ids(&out).0, got);

    // A GGUF whose tokenizer has no tokenizer.json form here: a clear error, no directory.
    let gguf = fixture("bitnet-packed-gguf/model-tq20.gguf");
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["convert", gguf.to_str().unwrap()])
        .arg(dir.join("no-tokenizer"))
        .args(["--to", "hf-packed"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("HF output needs a tokenizer.json"), "{err}");
    assert!(!dir.join("no-tokenizer").exists());
    assert!(!dir.join(".no-tokenizer.partial").exists());
    std::fs::remove_dir_all(&dir).ok();
}
