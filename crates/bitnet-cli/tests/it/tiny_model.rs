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

/// `run --json-schema FILE` and `batch --json-schema FILE`: the story model's greedy answer
/// held to a schema (checked here by hand); a bad schema is an error naming the file.
#[test]
fn run_and_batch_hold_the_output_to_a_json_schema() {
    let dir = std::env::temp_dir().join(format!("bitnet-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let schema = dir.join("pet.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 10},
            "kind": {"enum": ["cat", "dog"]},
            "legs": {"type": "integer", "minimum": 0, "maximum": 4}},
          "required": ["name", "kind", "legs"], "additionalProperties": false}"#,
    )
    .unwrap();
    let check = |text: &str| {
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 3, "{text}");
        assert!(o["name"].as_str().unwrap().chars().count() <= 10, "{text}");
        assert!(
            ["cat", "dog"].contains(&o["kind"].as_str().unwrap()),
            "{text}"
        );
        assert!((0..=4).contains(&o["legs"].as_i64().unwrap()), "{text}");
    };
    let s = schema.to_str().unwrap();
    let (out, err) = bitnet_ok(&[
        "run",
        "-p",
        "Once upon a time",
        "-n",
        "100",
        "--temp",
        "0",
        "--json-schema",
        s,
    ]);
    assert!(err.contains("finish: stop"), "{err}");
    check(&out);
    let input = dir.join("in.txt");
    std::fs::write(&input, "Once upon a time\nThe dog\n").unwrap();
    let output = dir.join("out.jsonl");
    bitnet_ok(&[
        "batch",
        "-i",
        input.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
        "-n",
        "100",
        "--temp",
        "0.8",
        "--seed",
        "5",
        "--json-schema",
        s,
    ]);
    let rows = std::fs::read_to_string(&output).unwrap();
    assert_eq!(rows.lines().count(), 2, "{rows}");
    for line in rows.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(row["finish_reason"], "stop", "{row}");
        check(row["text"].as_str().unwrap());
    }
    std::fs::write(&schema, r#"{"type": "fancy"}"#).unwrap();
    let (_, err) = common::bitnet_err(&["run", "-p", "Hi", "--json-schema", s]);
    assert!(
        err.contains("--json-schema") && err.contains("fancy"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
