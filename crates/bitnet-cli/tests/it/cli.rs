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

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bitnet-tiny")
}

/// `bitnet` with no model from the environment and stdin fed `input`.
fn bitnet_stdin(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .env("BITNET_THREADS", "2")
        .env_remove("BITNET_MODEL")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The OS error of a missing file was printed twice ("No such file or directory (os error
/// 2): No such file or directory (os error 2)"): the I/O error was both in the message and
/// its source.
#[test]
fn os_errors_are_printed_once() {
    let dir = temp_dir("os-error");
    let missing = dir.join("missing.gguf");
    for args in [
        vec!["inspect", "-m", missing.to_str().unwrap()],
        vec!["run", "-m", missing.to_str().unwrap(), "-p", "hi"],
        vec![
            "convert",
            missing.to_str().unwrap(),
            dir.join("out.gguf").to_str().unwrap(),
            "--to",
            "gguf-tq2_0",
        ],
        vec![
            "tokenize",
            "--tokenizer",
            missing.to_str().unwrap(),
            "-p",
            "x",
        ],
    ] {
        let o = bitnet(&args);
        assert_clean_error(&o, &["missing.gguf"]);
        let err = stderr(&o);
        assert_eq!(err.matches("os error 2").count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn version_names_the_commit_and_features() {
    let o = bitnet(&["--version"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(
        out.starts_with(&format!("bitnet {}", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    assert!(out.contains("(commit "), "{out}");
    // A git checkout gives a hex commit; a tarball says "unknown".
    let commit = out
        .split("(commit ")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    assert!(
        commit == "unknown" || commit.chars().all(|c| c.is_ascii_hexdigit()),
        "{out}"
    );
    let features = out.split("features: ").nth(1).unwrap().trim_end();
    assert_eq!(
        features.contains("hub"),
        cfg!(feature = "hub"),
        "features listed: {out}"
    );
}

#[test]
fn prompt_comes_from_a_file_or_stdin() {
    let dir = temp_dir("prompt-file");
    let file = dir.join("prompt.txt");
    std::fs::write(&file, "Once upon a time\n").unwrap();
    let args = |p: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["run", "-n", "12", "--temp", "0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(p.iter().map(|s| s.to_string()));
        v
    };
    let run = |p: &[&str], input: &str| {
        let a = args(p);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = bitnet_stdin(&a, input);
        assert!(o.status.success(), "{p:?}: {}", stderr(&o));
        (stdout(&o), stderr(&o))
    };
    let (want, want_err) = run(&["-p", "Once upon a time"], "");
    assert!(want_err.contains("prefill: 5 tokens"), "{want_err}");
    // The file's trailing newline is dropped, as llama.cpp does.
    let (from_file, err) = run(&["-f", file.to_str().unwrap()], "");
    assert_eq!(from_file, want);
    assert!(err.contains("prefill: 5 tokens"), "{err}");
    let (from_stdin, _) = run(&["-p", "-"], "Once upon a time\n");
    assert_eq!(from_stdin, want);
    // tokenize takes them too.
    let o = bitnet_stdin(&["tokenize", "-f", file.to_str().unwrap()], "");
    let p = bitnet_stdin(&["tokenize", "-p", "Once upon a time"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), stdout(&p));
    // Both at once, or neither, is an error.
    let o = bitnet_stdin(&["run", "-p", "x", "-f", file.to_str().unwrap()], "");
    assert!(!o.status.success());
    let o = bitnet_stdin(&["run", "-n", "1"], "");
    assert!(!o.status.success());
}

/// Ctrl-C (SIGINT) during `bitnet run` ends the answer and still prints the statistics.
#[cfg(unix)]
#[test]
fn ctrl_c_still_prints_the_statistics() {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "run",
            "-p",
            "Once upon a time",
            "--temp",
            "0",
            "--ignore-eos",
        ])
        .args(["--context-shift", "-n", "100000000"])
        .env("BITNET_THREADS", "2")
        .env_remove("BITNET_MODEL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for text, so the handler is installed and decoding is under way.
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    out.read_exact(&mut first).unwrap();
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("prefill: 5 tokens") && err.contains("| finish: cancelled"),
        "{err}"
    );
    assert!(err.contains("decode: ") && err.contains("tok/s"), "{err}");
}

/// Every command that takes `-m` falls back to the shipped bitnet-tiny, as `run` does.
#[test]
fn every_model_command_defaults_to_the_shipped_model() {
    let dir = temp_dir("default-model");
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "Once upon a time there was a little fish. ".repeat(40),
    )
    .unwrap();
    let input = dir.join("in.txt");
    std::fs::write(&input, "hello\n").unwrap();
    let npy = dir.join("l.npy");
    let out = dir.join("out.jsonl");
    for args in [
        vec!["inspect"],
        vec!["tokenize", "-p", "hello"],
        vec!["logits", "--ids", "0,1,2", "-o", npy.to_str().unwrap()],
        vec![
            "perplexity",
            "-f",
            text.to_str().unwrap(),
            "-c",
            "64",
            "--chunks",
            "1",
        ],
        vec!["bench", "-p", "8", "-n", "2", "-r", "1"],
        vec![
            "batch",
            "-i",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "-n",
            "2",
        ],
    ] {
        let o = bitnet_stdin(&args, "");
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    let o = bitnet_stdin(&["inspect"], "");
    assert!(stdout(&o).contains("bitnet-tiny"), "{}", stdout(&o));
}

/// `inspect` said "adds bos: false" for bitnet-tiny while `run` and `tokenize` put BOS
/// first (its tokenizer.json's post-processor adds it).
#[test]
fn inspect_and_tokenize_agree_on_bos() {
    let o = bitnet_stdin(&["inspect"], "");
    let text = stdout(&o);
    assert!(text.contains("adds bos: true"), "{text}");
    let o = bitnet_stdin(&["tokenize", "-p", "Once upon a time"], "");
    let ids: Vec<u32> = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(ids[0], 0, "BOS <|begin_of_text|> first: {ids:?}");
    // The same on the test fixture, whatever its tokenizer does.
    let packed = fixtures().join("bitnet-packed");
    let o = bitnet(&["inspect", "-m", packed.to_str().unwrap()]);
    let text = stdout(&o);
    let adds = text.contains("adds bos: true");
    let bos: Option<u32> = text
        .split("; bos ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok());
    let o = bitnet(&["tokenize", "-m", packed.to_str().unwrap(), "-p", "hello"]);
    let ids: Vec<u32> = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        adds,
        bos.is_some() && ids.first() == bos.as_ref(),
        "{text} {ids:?}"
    );
}

/// `-n 600 -c 1024` said "context size 605"; `-c 0` said 1.
#[test]
fn context_errors_give_the_real_numbers() {
    let o = bitnet_stdin(
        &["run", "-p", "Once upon a time", "-n", "600", "-c", "1024"],
        "",
    );
    assert_clean_error(&o, &["1024", "512"]);
    assert!(!stderr(&o).contains("605"), "{}", stderr(&o));
    let o = bitnet_stdin(&["run", "-p", "Once upon a time", "-n", "600"], "");
    assert_clean_error(&o, &["5 tokens", "-n 600", "605", "context size 512"]);
    let o = bitnet_stdin(&["run", "-p", "Once upon a time", "-c", "0"], "");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--ctx-size") && err.contains("at least 1"),
        "{err}"
    );
    // What fits runs.
    let o = bitnet_stdin(
        &["run", "-p", "Once upon a time", "-n", "8", "-c", "13"],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn perplexity_chunks_zero_is_about_the_flag() {
    let o = bitnet_stdin(
        &[
            "perplexity",
            "-f",
            tiny().join("validation.txt").to_str().unwrap(),
            "--chunks",
            "0",
        ],
        "",
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("--chunks") && err.contains("at least 1"),
        "{err}"
    );
    assert!(!err.contains("the text has"), "{err}");
}

/// `run -n 0` printed a prefill rate of millions of tokens a second.
#[test]
fn run_with_no_tokens_prints_no_rates() {
    let o = bitnet_stdin(&["run", "-p", "Once upon a time", "-n", "0"], "");
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let line = err.lines().find(|l| l.starts_with("prefill:")).unwrap();
    assert!(!line.contains("tok/s"), "{line}");
    assert!(line.contains("decode: 0 tokens"), "{line}");
    // One token: a prefill rate, no decode rate.
    let o = bitnet_stdin(
        &["run", "-p", "Once upon a time", "-n", "1", "--temp", "0"],
        "",
    );
    let err = stderr(&o);
    let line = err.lines().find(|l| l.starts_with("prefill:")).unwrap();
    assert_eq!(line.matches("tok/s").count(), 1, "{line}");
}

/// `bitnet tokenize -f BIG | head -c 16`: the reader leaves early (the output is larger than
/// a pipe's buffer) and the command ends quietly, not with a "failed printing to stdout" panic.
#[test]
fn a_closed_stdout_pipe_ends_the_command_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    let dir = std::env::temp_dir().join(format!("bitnet-sigpipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let big = dir.join("big.txt");
    std::fs::write(&big, "the cat sat on the mat. ".repeat(20_000)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["tokenize", "-m"])
        .arg(fixtures().join("bitnet-packed"))
        .arg("-f")
        .arg(&big)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Sampling values out of range are refused by name, not turned into nonsense.
#[test]
fn sampling_flags_out_of_range_are_refused() {
    let m = fixtures().join("bitnet-packed");
    for (flag, value, field) in [
        ("--temp", "nan", "temperature"),
        ("--top-p", "0", "top_p"),
        ("--min-p", "2", "min_p"),
        ("--repeat-penalty=-1", "", "repetition_penalty"),
        // An empty stop string was silently ignored.
        ("--stop=", "", "stop[0] is empty"),
    ] {
        let mut args = vec![
            "run",
            "-m",
            m.to_str().unwrap(),
            "-p",
            "hi",
            "-n",
            "2",
            flag,
        ];
        if !value.is_empty() {
            args.push(value);
        }
        let o = bitnet(&args);
        assert!(!o.status.success(), "{flag} {value}");
        let err = stderr(&o);
        assert!(
            err.contains(field) && !err.contains("panicked"),
            "{flag} {value}: {err}"
        );
    }
}

/// Counts from flags are checked against their range before use: no panic, no huge
/// allocation, and the message says what is accepted.
#[test]
fn count_flags_say_their_range() {
    let m = fixtures().join("bitnet-packed");
    let m = m.to_str().unwrap();
    let tmp = std::env::temp_dir().join(format!("bitnet-flags-{}.gguf", std::process::id()));
    let out = tmp.to_str().unwrap();
    for args in [
        vec!["bench", "-m", m, "-b", "0", "-p", "8", "-n", "0"],
        vec!["run", "-m", m, "-p", "hi", "-t", "0"],
        vec!["run", "-m", m, "-p", "hi", "-t", "100000"],
        vec!["run", "-m", m, "-p", "hi", "--beams", "0"],
        vec!["run", "-m", m, "-p", "hi", "-n", "18446744073709551615"],
        vec!["dummy", "-o", out, "--heads", "0"],
        // Issue 18's second pass: every flag that takes a size or count.
        vec!["serve", "-m", m, "--max-body", "0"],
        vec!["serve", "-m", m, "--max-body", "100"],
        vec!["serve", "-m", m, "--max-body", "65G"],
        vec!["serve", "-m", m, "--kv-cache", "1K"],
        vec!["serve", "-m", m, "--kv-cache", "100000G"],
        vec!["bench", "-m", m, "-r", "0"],
        vec!["bench", "-m", m, "-r", "100000000000"],
        vec!["bench", "-m", m, "-p", "18446744073709551615"],
        vec!["bench", "-m", m, "-d", "18446744073709551610"],
        vec![
            "run",
            "-m",
            m,
            "-p",
            "hi",
            "--top-k",
            "18446744073709551615",
        ],
        vec!["run", "-m", m, "-p", "hi", "--repeat-last-n", "99999999999"],
        vec!["chat", "-m", m, "--keep", "18446744073709551615"],
    ] {
        let o = bitnet(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?}");
        assert!(err.contains("out of range (expected"), "{args:?}: {err}");
    }
    // The byte flags' messages say the range in their own units.
    let o = bitnet(&["serve", "-m", m, "--max-body", "65G"]);
    assert!(stderr(&o).contains("expected 1K to 64M"), "{}", stderr(&o));
    let o = bitnet(&["serve", "-m", m, "--kv-cache", "1K"]);
    assert!(
        stderr(&o).contains("expected 1M to") && stderr(&o).contains("or `auto`"),
        "{}",
        stderr(&o)
    );
    // Sizes that are each in range but together pass the model's context (128 tokens), and
    // a context beyond the model's for `inspect` (it used to print a KV cache of 16 EiB).
    for (args, expected) in [
        (
            vec!["bench", "-m", m, "-d", "124", "-p", "8", "-n", "0"],
            "-d 124 + -p 8 = 132 tokens: expected at most the model's context of 128",
        ),
        (
            vec!["inspect", "-m", m, "-c", "18446744073709551615"],
            "is larger than the model's maximum of",
        ),
        (
            vec![
                "perplexity",
                "-m",
                m,
                "-f",
                "/nonexistent",
                "-c",
                "18446744073709551615",
            ],
            "is larger than the model's maximum of",
        ),
    ] {
        let o = bitnet(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            err.contains(expected) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    // A shape no machine holds is refused before anything is allocated.
    let o = bitnet(&[
        "dummy",
        "-o",
        out,
        "--vocab",
        "4194304",
        "--hidden",
        "65536",
        "--heads",
        "512",
        "--kv-heads",
        "512",
        "--layers",
        "1024",
        "--ffn",
        "262144",
    ]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("GiB of weights"),
        "{err}"
    );
    assert!(!err.contains("panicked") && !tmp.exists(), "{err}");
}

/// `--device`: a bad name lists the accepted ones; `cuda` without a GPU (or in a build
/// without the `cuda` feature) is one clear line. (On a GPU machine, scripts/test-cuda runs
/// the GPU.)
#[test]
fn device_flag_errors_are_clear() {
    let o = bitnet(&["run", "-p", "Hi", "-n", "1", "--device", "gpu"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("expected cpu, cuda, cuda:N"),
        "{}",
        stderr(&o)
    );
    if std::path::Path::new("/dev/nvidiactl").exists() {
        eprintln!("SKIP: device_flag_errors_are_clear (no-driver case): this machine has a GPU");
        return;
    }
    let o = bitnet(&["run", "-p", "Hi", "-n", "1", "--device", "cuda"]);
    assert_clean_error(&o, &[]);
    // No driver library, or one whose driver finds no device.
    let wants: &[&str] = if cfg!(feature = "cuda") {
        &[
            "no NVIDIA driver",
            "the driver did not initialize",
            "no device 0",
        ]
    } else {
        &["no CUDA backend"]
    };
    let err = stderr(&o);
    assert!(wants.iter().any(|w| err.contains(w)), "{err}");
}

/// `bitnet dummy --type q2_0` (and `q2_0_g128`) writes a group-scaled model (issue 20) that
/// `inspect` lists as Q2_0 and `run` runs; converting it to a per-256-weight type is refused by name, to
/// gguf-q2_0 it goes.
#[test]
fn dummy_writes_group_scaled_q2_0_models() {
    let dir = std::env::temp_dir().join(format!("bitnet-q2_0-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for ty in ["q2_0", "q2_0_g128"] {
        let path = dir.join(format!("{ty}.gguf"));
        let p = path.to_str().unwrap();
        let o = bitnet(&[
            "dummy",
            "-o",
            p,
            "--type",
            ty,
            "--layers",
            "1",
            "--hidden",
            "256",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--ffn",
            "512",
            "--vocab",
            "300",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let o = bitnet(&["inspect", "-m", p]);
        let want = if ty == "q2_0" { "Q2_0 " } else { "Q2_0_g128" };
        assert!(stdout(&o).contains(want), "{}", stdout(&o));
        let o = bitnet(&["run", "-m", p, "-p", "hi", "-n", "3", "--temp", "0"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let tq = dir.join("tq.gguf");
        let o = bitnet(&["convert", p, tq.to_str().unwrap(), "--to", "gguf-tq2_0"]);
        assert!(
            !o.status.success() && stderr(&o).contains("group-wise scales"),
            "{}",
            stderr(&o)
        );
        let again = dir.join("again.gguf");
        let o = bitnet(&["convert", p, again.to_str().unwrap(), "--to", "gguf-q2_0"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    std::fs::remove_dir_all(&dir).ok();
}
