//! Hostile inputs to the command line (issue 18): huge prompts and lines, a chat template
//! that never ends, a failed chat turn with piped input, an output file a crash left
//! truncated. Each gives a clear error (or error row) and the process neither aborts nor
//! hangs nor loses work.

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bitnet-inference/tests/fixtures/bitnet-packed")
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitnet-untrusted-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `bitnet ARGS` under a 1.5 GB address-space limit (the tiny model needs far less; an
/// input that costs memory in proportion to its size, ~90 bytes a byte, would abort), with
/// `stdin` piped in.
fn bitnet(args: &[&str], stdin: &[u8]) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = Command::new("bash")
        .arg("-c")
        .arg("ulimit -v 1500000 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .env("BITNET_THREADS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (out, start.elapsed())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn batch_with_one_huge_line_gives_an_error_row_and_runs_the_rest() {
    let d = dir("batch-huge");
    let input = d.join("in.jsonl");
    // 40 MB of prompt: tokenizing it would take ~3.6 GB, past the limit.
    let huge = "word ".repeat(8 << 20);
    let mut lines = vec![
        serde_json::json!({"id": "huge", "prompt": huge}).to_string(),
        serde_json::json!({"id": "chat", "messages": [{"role": "user", "content": huge}]})
            .to_string(),
    ];
    lines.push(r#"{"id": "fine", "prompt": "hello", "max_tokens": 3}"#.into());
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    drop(lines);
    let out = d.join("out.jsonl");
    let m = fixture();
    let (o, _) = bitnet(
        &[
            "batch",
            "-m",
            m.to_str().unwrap(),
            "-i",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "-c",
            "128",
        ],
        b"",
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let rows: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for id in ["huge", "chat"] {
        let r = rows.iter().find(|r| r["id"] == id).unwrap();
        let e = r["error"].as_str().unwrap_or_else(|| panic!("{r}"));
        assert!(
            e.contains("refused before tokenizing") && e.contains("128 tokens"),
            "{id}: {e}"
        );
    }
    let fine = rows.iter().find(|r| r["id"] == "fine").unwrap();
    assert!(
        fine["error"].is_null() && fine["text"].is_string(),
        "{fine}"
    );
}

#[test]
fn run_refuses_a_huge_prompt_before_tokenizing() {
    let d = dir("run-huge");
    let f = d.join("prompt.txt");
    std::fs::write(&f, "word ".repeat(8 << 20)).unwrap();
    let m = fixture();
    let (o, _) = bitnet(
        &[
            "run",
            "-m",
            m.to_str().unwrap(),
            "-f",
            f.to_str().unwrap(),
            "-n",
            "2",
        ],
        b"",
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("41943040 bytes") && err.contains("context size"),
        "{err}"
    );
}

/// `perplexity` and `tokenize` tokenized a whole file of any size (~90 bytes of memory a
/// byte): a 40 MB file aborted under this 1.5 GB limit. Now `perplexity --chunks N` reads
/// only the beginning its chunks need, and a whole text is refused past 16 MiB, by its size
/// (files) or as it is read (standard input), naming it and the limit.
#[test]
fn perplexity_and_tokenize_read_a_huge_file_only_as_far_as_they_need() {
    let d = dir("ppl-huge");
    let f = d.join("text.txt");
    std::fs::write(&f, "the cat sat on. ".repeat(40 << 20 >> 4)).unwrap();
    let (m, f) = (fixture(), f.to_str().unwrap().to_string());
    let m = m.to_str().unwrap();
    let (o, took) = bitnet(
        &["perplexity", "-m", m, "-f", &f, "-c", "64", "--chunks", "2"],
        b"",
    );
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("PPL = ") && err.contains("128 tokens, 2 chunks of 64"),
        "{out}{err}"
    );
    assert!(took < Duration::from_secs(60), "{took:?}");
    // The same chunks as from a file of only their text.
    let small = d.join("small.txt");
    std::fs::write(&small, "the cat sat on. ".repeat(300)).unwrap();
    let (o2, _) = bitnet(
        &[
            "perplexity",
            "-m",
            m,
            "-f",
            small.to_str().unwrap(),
            "-c",
            "64",
            "--chunks",
            "2",
        ],
        b"",
    );
    assert_eq!(text(&o2.stdout), out);
    for args in [
        vec!["perplexity", "-m", m, "-f", &f, "-c", "64"],
        vec!["tokenize", "-m", m, "-f", &f],
    ] {
        let (o, _) = bitnet(&args, b"");
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "{f}: 41943040 bytes, more than the 16777216 this reads"
            )),
            "{args:?}: {err}"
        );
    }
    let (o, _) = bitnet(&["tokenize", "-m", m, "-p", "-"], &vec![b'a'; 17 << 20]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("<stdin>: more than the 16777216 bytes this reads"),
        "{err}"
    );
    let (o, _) = bitnet(&["tokenize", "-m", m, "-p", "-"], b"hello\n");
    assert!(
        o.status.success() && text(&o.stdout).starts_with('['),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn chat_errors_go_to_stderr_and_fail_the_exit_status_when_piped() {
    let m = fixture();
    let huge = "word ".repeat(8 << 20);
    let input = format!("hello\n/nonsense\n{huge}\nhi again\n");
    let (o, _) = bitnet(
        &["chat", "-m", m.to_str().unwrap(), "--temp", "0", "-n", "3"],
        input.as_bytes(),
    );
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "stdout {out}\nstderr {err}");
    assert!(!out.contains("error"), "errors on stdout: {out}");
    assert!(err.contains("[error: unknown command /nonsense"), "{err}");
    assert!(
        err.contains("[error: the message is 41943039 bytes"),
        "{err}"
    );
    assert!(err.contains("2 of 4 inputs"), "{err}");
    // The good turns ran: two answers' stats lines.
    assert_eq!(err.matches("| prefill ").count(), 2, "{err}");
    // A system prompt that cannot fit: refused before anything runs.
    let d = dir("chat-system");
    let f = d.join("system.txt");
    std::fs::write(&f, &huge).unwrap();
    let (o, _) = bitnet(
        &[
            "chat",
            "-m",
            m.to_str().unwrap(),
            "--system-file",
            f.to_str().unwrap(),
        ],
        b"hello\n",
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("the system prompt is 41943040 bytes"), "{err}");
    // All turns good: exit 0.
    let (o, _) = bitnet(
        &["chat", "-m", m.to_str().unwrap(), "--temp", "0", "-n", "2"],
        b"hello\n",
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
}

#[test]
fn a_chat_template_that_never_ends_is_stopped() {
    // The fixture with a template of nested loops (~10^15 steps) in tokenizer_config.json.
    let d = dir("template-loop");
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ] {
        std::fs::copy(fixture().join(f), d.join(f)).unwrap();
    }
    let tmpl = "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in \
                range(100000) %}{{ messages[0].content }}{% endfor %}{% endfor %}{% endfor %}";
    std::fs::write(
        d.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": tmpl, "bos_token": "<|begin_of_text|>"}).to_string(),
    )
    .unwrap();
    let (o, took) = bitnet(&["chat", "-m", d.to_str().unwrap(), "-n", "2"], b"hello\n");
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("chat template:"), "{err}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    // In a batch: an error row, the process goes on.
    let input = d.join("in.jsonl");
    std::fs::write(
        &input,
        r#"{"id": 1, "messages": [{"role": "user", "content": "hi"}]}"#.to_string() + "\n",
    )
    .unwrap();
    let out = d.join("out.jsonl");
    let (o, _) = bitnet(
        &[
            "batch",
            "-m",
            d.to_str().unwrap(),
            "-i",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        b"",
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let row: Value = serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
    assert!(
        row["error"]
            .as_str()
            .is_some_and(|e| e.contains("chat template")),
        "{row}"
    );
}

#[test]
fn batch_drops_an_incomplete_last_row_and_runs_its_item_again() {
    for (ext, partial) in [
        ("jsonl", r#"{"id":2,"text":"cut in the mid"#),
        ("csv", "2,\"cut in\nthe mid"),
    ] {
        let d = dir(&format!("batch-cut-{ext}"));
        let input = d.join("prompts.txt");
        std::fs::write(&input, "first prompt\nsecond prompt\nthird prompt\n").unwrap();
        let out = d.join(format!("out.{ext}"));
        let m = fixture();
        let args = [
            "batch",
            "-m",
            m.to_str().unwrap(),
            "-i",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--temp",
            "0",
            "-n",
            "3",
        ];
        let (o, _) = bitnet(&args, b"");
        assert!(o.status.success(), "{}", text(&o.stderr));
        let full = std::fs::read_to_string(&out).unwrap();
        // As a crash (a power loss mid-write) would leave it: row 2 and after gone, half of
        // row 2 there.
        let keep: String = if ext == "csv" {
            let mut lines = full.lines();
            format!("{}\n{}\n", lines.next().unwrap(), lines.next().unwrap())
        } else {
            full.lines().next().unwrap().to_string() + "\n"
        };
        assert!(keep.contains("first") || keep.contains("1,") || keep.contains("\"id\":1"));
        std::fs::write(&out, keep.clone() + partial).unwrap();
        let (o, _) = bitnet(&args, b"");
        let err = text(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(
            err.contains("dropping an incomplete last row"),
            "{ext}: {err}"
        );
        let again = std::fs::read_to_string(&out).unwrap();
        assert!(!again.contains("cut in"), "{ext}: {again}");
        assert!(again.starts_with(&keep), "{ext}: {again}");
        // Every item exactly once, the same rows as the uninterrupted run (in any order).
        let mut a: Vec<&str> = full.lines().collect();
        let mut b: Vec<&str> = again.lines().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{ext}");
    }
}
