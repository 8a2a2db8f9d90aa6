//! End-to-end tests of the `bitnet` command: real files in, text and exit codes out.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The ids of a fixture's `ids.json` (`{"ids": [...]}`).
fn read_ids(text: std::io::Result<String>) -> Vec<u32> {
    let v: serde_json::Value = serde_json::from_str(&text.unwrap()).unwrap();
    serde_json::from_value(v["ids"].clone()).unwrap()
}

fn bitnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .env("BITNET_THREADS", "2")
        .output()
        .expect("run bitnet")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bitnet-inference/tests/fixtures")
}

/// A failure is one line on stderr, exit code 1, and never a panic.
fn assert_clean_error(o: &Output, expected: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for e in expected {
        assert!(err.contains(e), "stderr lacks {e:?}: {err}");
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bitnet-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn logits_command_writes_the_oracle_logits() {
    let dir = temp_dir("logits");
    let out = dir.join("logits.npy");
    let ids: Vec<u32> = read_ids(std::fs::read_to_string(
        fixtures().join("bitnet-packed/ids.json"),
    ));
    let ids_arg: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let o = bitnet(&[
        "logits",
        "-m",
        fixtures().join("bitnet-packed").to_str().unwrap(),
        "--ids",
        &ids_arg.join(","),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let npy = bitnet_inference::formats::npy::read_f32;
    let (shape, ours) = npy(&std::fs::read(&out).unwrap()).unwrap();
    let (oracle_shape, oracle) =
        npy(&std::fs::read(fixtures().join("bitnet-packed/logits.npy")).unwrap()).unwrap();
    assert_eq!(shape, oracle_shape);
    let max = ours
        .iter()
        .zip(&oracle)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max <= 1e-3, "max |Δ| {max}");
}

#[test]
fn inspect_describes_the_model() {
    let o = bitnet(&[
        "inspect",
        "-m",
        fixtures().join("bitnet-packed").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for want in [
        "hidden 256",
        "layers 2",
        "relu2",
        "ternary",
        "model.layers.0.self_attn.q_proj.weight",
        "KV cache",
    ] {
        assert!(
            text.contains(want),
            "inspect output lacks {want:?}:\n{text}"
        );
    }
}

#[test]
fn missing_and_foreign_files_are_clean_errors() {
    let dir = temp_dir("bad");
    assert_clean_error(
        &bitnet(&["inspect", "-m", dir.join("nope.gguf").to_str().unwrap()]),
        &["nope.gguf"],
    );
    let foreign = dir.join("foreign.bin");
    std::fs::write(&foreign, b"PK\x03\x04 not a model").unwrap();
    assert_clean_error(
        &bitnet(&["inspect", "-m", foreign.to_str().unwrap()]),
        &["foreign.bin", "GGUF"],
    );
}

#[test]
fn truncated_gguf_names_the_file() {
    let dir = temp_dir("trunc");
    let src = fixtures().join("bitnet-packed-gguf/model-tq20.gguf");
    let bytes = std::fs::read(&src).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    assert_clean_error(
        &bitnet(&[
            "logits",
            "-m",
            cut.to_str().unwrap(),
            "--ids",
            "1,2",
            "-o",
            dir.join("x.npy").to_str().unwrap(),
        ]),
        &["cut.gguf"],
    );
}

#[test]
fn run_streams_text_and_reports_speed() {
    let o = bitnet(&[
        "run",
        "-m",
        fixtures().join("bitnet-packed").to_str().unwrap(),
        "-p",
        "hello",
        "-n",
        "8",
        "--temp",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("prefill:") && err.contains("tok/s"), "{err}");
}

#[test]
fn prompt_longer_than_context_is_an_error() {
    let o = bitnet(&[
        "run",
        "-m",
        fixtures().join("bitnet-packed").to_str().unwrap(),
        "-p",
        &"word ".repeat(400),
        "-n",
        "8",
        "-c",
        "64",
    ]);
    assert_clean_error(&o, &["context"]);
}
