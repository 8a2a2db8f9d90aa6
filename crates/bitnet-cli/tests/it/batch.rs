//! `bitnet batch` on the tiny fixture model: good and bad items, formats, resume after a
//! kill, and results equal to generating each prompt alone.

use bitnet_inference::engine::{GenerationConfig, InferenceEngine};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bitnet-inference/tests/fixtures/bitnet-packed")
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitnet-batch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn batch(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bitnet"));
    c.arg("batch")
        .arg("-m")
        .arg(model())
        .args(args)
        .env("BITNET_THREADS", "2");
    c
}

fn rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn greedy_alone(prompt: &str, n: usize) -> String {
    let mut e = InferenceEngine::new();
    e.load_model(model()).unwrap();
    e.generate(prompt, &GenerationConfig::greedy(n))
        .unwrap()
        .text
}

#[test]
fn mixed_items_give_rows_and_errors_equal_to_single_runs() {
    let d = dir("mixed");
    let input = d.join("in.jsonl");
    std::fs::write(
        &input,
        [
            r#"{"id": "a", "prompt": "hello", "max_tokens": 12}"#,
            r#"{"id": "b", "prompt": "the cat sat", "max_tokens": 7}"#,
            r#"{"id": "bad-stop", "prompt": "x", "stop": 5}"#,
            r#"{"id": "empty-stop", "prompt": "x", "stop": ["a", ""]}"#,
            r#"{"id": "none"}"#,
            r#"this is not json"#,
            r#"{"id": 7, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}"#,
            &format!(r#"{{"id": "long", "prompt": "{}"}}"#, "word ".repeat(300)),
            r#"{"id": "c", "prompt": "1 2 3", "max_tokens": 9, "temperature": 0.0}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = d.join("out.jsonl");
    let o = batch(&[
        "-i",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--temp",
        "0",
    ])
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = rows(&out);
    assert_eq!(rows.len(), 9, "{rows:?}");
    let by_id: HashMap<String, &Value> = rows
        .iter()
        .map(|r| (r["id"].to_string().trim_matches('"').to_string(), r))
        .collect();
    for (id, prompt, n) in [
        ("a", "hello", 12),
        ("b", "the cat sat", 7),
        ("c", "1 2 3", 9),
    ] {
        let r = by_id[id];
        assert_eq!(r["text"], greedy_alone(prompt, n), "{id}");
        assert_eq!(r["completion_tokens"], n);
        assert_eq!(r["finish_reason"], "length");
        assert!(r["prompt_tokens"].as_u64().unwrap() > 0);
    }
    assert_eq!(by_id["7"]["completion_tokens"], 5);
    for (id, why) in [
        ("bad-stop", "`stop`"),
        ("empty-stop", "stop[1] is empty"),
        ("none", "no `prompt`"),
        ("6", "not JSON"),
        ("long", "does not fit the context"),
    ] {
        let e = by_id[id]["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{id}: {:?}", by_id[id]));
        assert!(e.contains(why), "{id}: {e}");
        assert_eq!(by_id[id]["finish_reason"], "error");
    }

    // CSV by extension, same results.
    let csv = d.join("out.csv");
    let o = batch(&[
        "-i",
        input.to_str().unwrap(),
        "-o",
        csv.to_str().unwrap(),
        "--temp",
        "0",
    ])
    .output()
    .unwrap();
    assert!(o.status.success());
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.starts_with("id,text,error,finish_reason,prompt_tokens,completion_tokens\n"));
    assert!(text.contains(&format!(
        "\na,{},,length,",
        by_id["a"]["text"].as_str().unwrap()
    )));
}

#[test]
fn killed_run_resumes_where_it_stopped() {
    let d = dir("resume");
    let input = d.join("prompts.txt");
    let n = 120;
    let prompts: Vec<String> = (0..n).map(|i| format!("prompt number {i} says")).collect();
    std::fs::write(&input, prompts.join("\n")).unwrap();
    let args = |out: &Path, parallel: &str| {
        let mut c = batch(&[
            "-i",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--temp",
            "0",
            "-n",
            "40",
            "--parallel",
            parallel,
        ]);
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    // Uninterrupted reference, 4 at a time.
    let reference = d.join("ref.jsonl");
    assert!(args(&reference, "4").status().unwrap().success());
    let want: HashMap<u64, String> = rows(&reference)
        .iter()
        .map(|r| {
            (
                r["id"].as_u64().unwrap(),
                r["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(want.len(), n);

    // Killed after a few rows, then resumed, 2 at a time.
    let out = d.join("out.jsonl");
    let mut child = args(&out, "2").spawn().unwrap();
    let start = Instant::now();
    loop {
        let lines = std::fs::read_to_string(&out).map_or(0, |t| t.lines().count());
        if lines >= 4 || start.elapsed() > Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = std::fs::read_to_string(&out).unwrap().lines().count();
    assert!(
        partial >= 4 && partial < n,
        "killed with {partial} rows of {n}"
    );
    let o = args(&out, "2")
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(o.status.success());
    let got = rows(&out);
    assert_eq!(got.len(), n, "each id exactly once");
    for r in &got {
        let id = r["id"].as_u64().unwrap();
        assert_eq!(r["text"].as_str().unwrap(), want[&id], "id {id}");
    }
    // And the third run has nothing left to do.
    let o = args(&out, "2")
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("{n} skipped")), "{err}");
    assert_eq!(rows(&out).len(), n);
}

/// An item with a key this command does not know (`max_tokenz`) ran with the defaults; now
/// it is an error row naming the key and the item.
#[test]
fn unknown_keys_are_errors_naming_key_and_item() {
    let d = dir("unknown-key");
    let input = d.join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"typo\", \"prompt\": \"hello\", \"max_tokenz\": 5}\n\
         {\"id\": \"fine\", \"prompt\": \"hello\", \"max_tokens\": 3}\n",
    )
    .unwrap();
    let out = d.join("out.jsonl");
    let o = batch(&["-i", input.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = rows(&out);
    let typo = rows.iter().find(|r| r["id"] == "typo").unwrap();
    let e = typo["error"].as_str().unwrap_or_else(|| panic!("{typo}"));
    assert!(
        e.contains("`max_tokenz`") && e.contains("typo") && e.contains("`max_tokens`"),
        "{e}"
    );
    let fine = rows.iter().find(|r| r["id"] == "fine").unwrap();
    assert_eq!(fine["completion_tokens"], 3);
}

/// Errored rows counted as done, so a re-run after fixing the input skipped them.
#[test]
fn a_rerun_retries_the_items_that_failed() {
    let d = dir("retry");
    let input = d.join("in.jsonl");
    let good = "{\"id\": \"item-one\", \"prompt\": \"hello\", \"max_tokens\": 4}";
    std::fs::write(
        &input,
        format!("{good}\n{{\"id\": \"item-two\", \"prompt\": \"the cat\", \"stop\": 5}}\n"),
    )
    .unwrap();
    for out in [d.join("out.jsonl"), d.join("out.csv")] {
        let run = || {
            let o = batch(&[
                "-i",
                input.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--temp",
                "0",
                "-n",
                "6",
            ])
            .output()
            .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8_lossy(&o.stderr).into_owned()
        };
        run();
        let first = std::fs::read_to_string(&out).unwrap();
        assert!(first.contains("`stop`"), "{first}");
        // The input fixed: the failed item runs again, the done one is skipped.
        std::fs::write(
            &input,
            format!(
                "{good}\n{{\"id\": \"item-two\", \"prompt\": \"the cat\", \"stop\": \"ZZQQ\"}}\n"
            ),
        )
        .unwrap();
        let err = run();
        assert!(
            err.contains("1 skipped") && err.contains("0 errors"),
            "{err}"
        );
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(
            !text.contains("`stop`"),
            "the old error row is gone: {text}"
        );
        assert_eq!(text.matches("item-two").count(), 1, "{text}");
        assert_eq!(text.matches("item-one").count(), 1, "{text}");
        if out.extension().unwrap() == "jsonl" {
            let later = rows(&out)
                .into_iter()
                .find(|r| r["id"] == "item-two")
                .unwrap();
            assert_eq!(later["text"], greedy_alone("the cat", 6));
        } else {
            assert!(text.contains("\nitem-two,"), "{text}");
        }
        // Put the bad input back for the other format.
        std::fs::write(
            &input,
            format!("{good}\n{{\"id\": \"item-two\", \"prompt\": \"the cat\", \"stop\": 5}}\n"),
        )
        .unwrap();
    }
}

/// An item that reached the end of the context lost its text (an error row); it keeps it
/// now, with finish reason `length`.
#[test]
fn an_item_that_fills_the_context_keeps_its_text() {
    let d = dir("ctx-end");
    let input = d.join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"long\", \"prompt\": \"hello\", \"max_tokens\": 500}\n",
    )
    .unwrap();
    let out = d.join("out.jsonl");
    let o = batch(&[
        "-i",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--temp",
        "0",
        "--ignore-eos",
        "-c",
        "24",
    ])
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = &rows(&out)[0];
    assert_eq!(r["finish_reason"], "length", "{r}");
    assert!(r.get("error").is_none(), "{r}");
    let (p, c) = (
        r["prompt_tokens"].as_u64().unwrap(),
        r["completion_tokens"].as_u64().unwrap(),
    );
    assert!(c > 0 && p + c >= 24, "{r}");
    assert!(!r["text"].as_str().unwrap().is_empty(), "{r}");
}

/// Ids key the output and resuming: a repeated id (explicit, or a line number used as the
/// default id) is an error row naming both lines, the other items run, and a re-run neither
/// skips a duplicate as done nor piles up its complaint.
#[test]
fn duplicate_ids_are_errors_and_never_skipped_as_done() {
    let d = dir("dup-ids");
    let input = d.join("in.jsonl");
    std::fs::write(
        &input,
        [
            r#"{"id": 3, "prompt": "hello", "max_tokens": 4}"#,
            r#"{"id": "x", "prompt": "the cat", "max_tokens": 4}"#,
            r#"{"prompt": "no id: line 3 is its id", "max_tokens": 4}"#,
            r#"{"id": "x", "prompt": "a second x", "max_tokens": 4}"#,
            r#"{"id": "y", "prompt": "fine", "max_tokens": 4}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = d.join("out.jsonl");
    for run in 0..2 {
        let o = batch(&["-i", input.to_str().unwrap(), "-o", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let rs = rows(&out);
        let errors: Vec<&Value> = rs
            .iter()
            .filter(|r| r["finish_reason"] == "error")
            .collect();
        let done: Vec<&Value> = rs
            .iter()
            .filter(|r| r["finish_reason"] != "error")
            .collect();
        assert_eq!(done.len(), 3, "run {run}: {rs:?}");
        assert_eq!(errors.len(), 2, "run {run}: {rs:?}");
        let msgs: Vec<&str> = errors
            .iter()
            .map(|r| r["error"].as_str().unwrap())
            .collect();
        assert!(
            msgs.iter()
                .any(|m| m.contains("line 3") && m.contains("line 1")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("line 4") && m.contains("line 2")),
            "{msgs:?}"
        );
    }
}

/// `-c` above the model's maximum was clamped silently; it is an error naming both numbers,
/// before any item runs or any output is written.
#[test]
fn a_context_above_the_models_maximum_is_refused() {
    let d = dir("ctx-too-big");
    let input = d.join("in.jsonl");
    std::fs::write(&input, "{\"id\": \"a\", \"prompt\": \"hello\"}\n").unwrap();
    let out = d.join("out.jsonl");
    let o = batch(&[
        "-i",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-c",
        "100000",
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("100000") && err.contains("maximum of"),
        "{err}"
    );
    assert!(!out.exists() || rows(&out).is_empty(), "no item ran");
}
