//! Logits of every fixture model (tools/make_fixtures.py) against transformers' oracle.
//! The fixtures are hardened so that a correct engine lands within ~1e-5 and every wrong
//! arithmetic scheme lands above 0.04 (see tools/README.md).

use bitnet_inference::backend::cpu::CpuBackend;
use bitnet_inference::formats::npy;
use bitnet_inference::model;
use std::path::{Path, PathBuf};

/// The ids of a fixture's `ids.json` (`{"ids": [...]}`).
fn read_ids(text: std::io::Result<String>) -> Vec<u32> {
    let v: serde_json::Value = serde_json::from_str(&text.unwrap()).unwrap();
    serde_json::from_value(v["ids"].clone()).unwrap()
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Logits of every position of `ids`, run as one sequence.
fn engine_logits(path: &Path, ids: &[u32]) -> (Vec<f32>, usize) {
    let loaded = model::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let model = CpuBackend::new(loaded.config, loaded.weights).unwrap();
    let vocab = model.config.vocab_size;
    let out = bitnet_inference::eval::sequence_logits(&model, ids).unwrap();
    (out, vocab)
}

fn argmax(row: &[f32]) -> usize {
    bitnet_inference::generate::argmax(row) as usize
}

/// Max |Δ| and whether every position's argmax agrees.
fn compare(ours: &[f32], oracle: &[f32], vocab: usize) -> (f32, Vec<usize>) {
    assert_eq!(ours.len(), oracle.len(), "logits sizes differ");
    let max = ours
        .iter()
        .zip(oracle)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let mismatched = ours
        .chunks(vocab)
        .zip(oracle.chunks(vocab))
        .enumerate()
        .filter(|(_, (a, b))| argmax(a) != argmax(b))
        .map(|(i, _)| i)
        .collect();
    (max, mismatched)
}

#[test]
fn every_fixture_matches_the_transformers_oracle() {
    let dir = fixtures_dir();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let fixtures = manifest["fixtures"].as_array().unwrap();
    assert!(
        fixtures.len() >= 9,
        "expected every variant in the manifest"
    );
    let mut report = Vec::new();
    for f in fixtures {
        let name = f["name"].as_str().unwrap();
        let ids: Vec<u32> = read_ids(std::fs::read_to_string(
            dir.join(f["ids"].as_str().unwrap()),
        ));
        let (shape, oracle) =
            npy::read_f32(&std::fs::read(dir.join(f["logits"].as_str().unwrap())).unwrap())
                .unwrap();
        let (ours, vocab) = engine_logits(&dir.join(f["path"].as_str().unwrap()), &ids);
        assert_eq!(shape, vec![ids.len(), vocab], "{name}: oracle shape");
        let (max, mismatched) = compare(&ours, &oracle, vocab);
        report.push(format!("{name}: max|Δ| = {max:.2e}"));
        assert!(
            mismatched.is_empty(),
            "{name}: argmax differs at positions {mismatched:?}"
        );
        assert!(max <= 1e-3, "{name}: max |Δ| = {max} > 1e-3");
    }
    eprintln!("{}", report.join("\n"));
}

/// One set of ternary weights stored as HF packed, TQ2_0, TQ1_0 and I2_S must give the same
/// logits (the F32 encoding is its own manifest entry, `bitnet-online-bf16-gguf`).
#[test]
fn twin_encodings_give_identical_logits() {
    let dir = fixtures_dir();
    let ids: Vec<u32> = read_ids(std::fs::read_to_string(dir.join("bitnet-packed/ids.json")));
    let (reference, vocab) = engine_logits(&dir.join("bitnet-packed"), &ids);
    for file in ["model-tq20.gguf", "model-tq10.gguf", "model-i2s.gguf"] {
        let (ours, _) = engine_logits(&dir.join("bitnet-packed-gguf").join(file), &ids);
        let (max, mismatched) = compare(&ours, &reference, vocab);
        assert!(
            mismatched.is_empty(),
            "{file}: argmax differs at {mismatched:?}"
        );
        assert!(
            max <= 1e-5,
            "{file}: max |Δ| = {max} from the HF packed model"
        );
    }
}
