//! The trained model shipped in `models/bitnet-tiny` (issue 6) end to end: it is the default
//! model, and its perplexity matches transformers' on the held-out stories.

use std::path::{Path, PathBuf};

use crate::common;
use common::{bitnet_ok, final_ppl};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bitnet-tiny")
}

/// `tools/train/eval_ppl.py models/bitnet-tiny models/bitnet-tiny/validation.txt --chunks 16`
/// (transformers, float32, llama.cpp's method) gives 4.7995; the issue asks for 1%.
#[test]
fn perplexity_matches_transformers() {
    let dir = tiny();
    let (out, _) = bitnet_ok(&[
        "perplexity",
        "-m",
        dir.to_str().unwrap(),
        "-f",
        dir.join("validation.txt").to_str().unwrap(),
        "-c",
        "512",
        "--chunks",
        "16",
    ]);
    let ppl = final_ppl(&out);
    assert!(
        (ppl - 4.7995).abs() / 4.7995 < 0.01,
        "PPL {ppl}, transformers 4.7995"
    );
}

#[test]
fn run_without_a_model_uses_the_shipped_one() {
    let (out, err) = bitnet_ok(&["run", "-p", "Once upon a time", "-n", "24", "--temp", "0"]);
    assert!(err.contains("decode: 24 tokens"), "{err}");
    // A trained model writes words, not byte soup.
    let words = out
        .split_whitespace()
        .filter(|w| w.chars().all(|c| c.is_alphabetic() || ",.!'\"".contains(c)))
        .count();
    assert!(words >= 12, "{out:?}");
}
