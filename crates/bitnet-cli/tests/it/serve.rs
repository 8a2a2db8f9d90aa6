//! `bitnet serve`: the Python tests (crates/bitnet-server/tests/python) drive the real binary
//! with the official `openai` client, raw sockets and 64 concurrent clients; flag errors here.

use super::common::bitnet_err;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether python3 with `openai`, `httpx`, `pytest`, `selenium` and `jsonschema` is here. Missing, it is a failure
/// unless BITNET_SKIP_PY_SERVER=1.
fn python_ok() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import openai, httpx, pytest, selenium, jsonschema"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("BITNET_SKIP_PY_SERVER").is_ok_and(|v| v == "1") {
        eprintln!(
            "python3 with openai, httpx, pytest, selenium, jsonschema not found; skipped \
             (BITNET_SKIP_PY_SERVER=1)"
        );
        return false;
    }
    assert!(
        ok,
        "the server tests need python3 with `openai`, `httpx`, `pytest`, `selenium` and \
         `jsonschema` \
         (scripts/test installs them in its venv), or set BITNET_SKIP_PY_SERVER=1 to skip"
    );
    true
}

#[test]
fn serve_python_suite() {
    if !python_ok() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bitnet-server/tests/python");
    let mut child = Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"])
        .arg(&dir)
        .env("BITNET_BIN", env!("CARGO_BIN_EXE_bitnet"))
        .env("BITNET_SCREENSHOT_DIR", env!("CARGO_TARGET_TMPDIR"))
        .env_remove("BITNET_MODEL")
        .env_remove("BITNET_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python3 -m pytest");
    // Bounded: the suite takes about 80 s on a quiet 2-core machine, 7 minutes on a busy one.
    let limit = Duration::from_secs(900);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for pytest") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server tests ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    let mut err = String::new();
    let _ = child.stdout.take().map(|mut s| s.read_to_string(&mut out));
    let _ = child.stderr.take().map(|mut s| s.read_to_string(&mut err));
    println!("{out}");
    assert!(status.success(), "server tests failed:\n{out}\n{err}");
}

#[test]
fn serve_flag_errors() {
    let (_, err) = bitnet_err(&["serve", "--parallel", "0"]);
    assert!(err.contains("--parallel"), "{err}");
    let (_, err) = bitnet_err(&["serve", "--max-body", "lots"]);
    assert!(err.contains("byte count"), "{err}");
    let (_, err) = bitnet_err(&["serve", "--api-key-file", "/nonexistent/keys"]);
    assert!(err.contains("--api-key-file"), "{err}");
    let (_, err) = bitnet_err(&["serve", "--port", "0", "--cors-origin", "bad\norigin"]);
    assert!(err.contains("--cors-origin"), "{err}");
    // The shipped model's context is 512 tokens.
    let (_, err) = bitnet_err(&["serve", "--port", "0", "-c", "100000"]);
    assert!(err.contains("100000") && err.contains("512"), "{err}");
    // A KV budget that holds no whole context of bitnet-tiny (5,242,880 bytes at -c 256);
    // and one below --parallel's needs: each refused with the figures.
    let (_, err) = bitnet_err(&[
        "serve",
        "--port",
        "0",
        "-c",
        "256",
        "--parallel",
        "auto",
        "--kv-cache",
        "4M",
    ]);
    assert!(
        err.contains("holds no sequence of 256 tokens") && err.contains("5242880"),
        "{err}"
    );
    let (_, err) = bitnet_err(&[
        "serve",
        "--port",
        "0",
        "-c",
        "256",
        "--parallel",
        "4",
        "--kv-cache",
        "15M",
    ]);
    assert!(err.contains("holds 3 sequences of 256 tokens"), "{err}");
    let (_, err) = bitnet_err(&["serve", "--parallel", "many"]);
    assert!(err.contains("`auto`"), "{err}");
}
