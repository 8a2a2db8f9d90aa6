//! `bitnet pull`, hub ids as MODEL, `--offline`, `bitnet cache`, and a full disk, against a
//! local server in the Hugging Face Hub's URL layout (no internet).

use crate::hub_server;

use hub_server::{Access, HubServer, Repo};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bitnet-inference/tests/fixtures")
}

fn server() -> HubServer {
    let files = hub_server::fixture_files(
        &fixtures().join("bitnet-packed"),
        &[
            ("config.json", false),
            ("generation_config.json", false),
            ("tokenizer.json", false),
            ("model.safetensors", true),
        ],
    );
    let ggufs = hub_server::fixture_files(
        &fixtures().join("bitnet-packed-gguf"),
        &[("model-tq20.gguf", true), ("model-i2s.gguf", true)],
    );
    let repo = |id: &str, files| Repo {
        id: id.into(),
        commit: COMMIT.into(),
        revisions: vec!["main".into()],
        files,
        access: Access::Public,
    };
    HubServer::start(vec![
        repo("test-org/tiny-packed", files),
        repo("test-org/tiny-gguf", ggufs),
    ])
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitnet-cli-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn bitnet(s: &HubServer, cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .env_remove("BITNET_MODEL")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", &s.url)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HOME", cache.join("home"))
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(s: &HubServer, cache: &Path, args: &[&str]) -> (String, String) {
    let o = bitnet(s, cache, args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "bitnet {args:?} failed: {err}");
    (out, err)
}

#[test]
fn pull_run_offline_and_cache_commands() {
    let s = server();
    let dir = tempdir("pull");
    let (out, err) = ok(&s, &dir, &["pull", "test-org/tiny-packed"]);
    let snap = dir
        .join("models--test-org--tiny-packed/snapshots")
        .join(COMMIT);
    assert_eq!(out.trim(), snap.to_str().unwrap());
    assert!(
        err.contains("4 file(s)") && err.contains("downloaded"),
        "{err}"
    );
    let (_, err) = ok(&s, &dir, &["pull", "test-org/tiny-packed"]);
    assert!(err.contains("all cached"), "{err}");

    // A hub id as MODEL, offline: no request reaches the server.
    let n = s.log().len();
    let (out, _) = ok(
        &s,
        &dir,
        &[
            "--offline",
            "run",
            "-m",
            "test-org/tiny-packed",
            "-n",
            "3",
            "--prompt",
            "hello",
        ],
    );
    assert!(!out.is_empty());
    assert_eq!(s.log().len(), n);
    let direct = ok(
        &s,
        &dir,
        &[
            "run",
            "-m",
            fixtures().join("bitnet-packed").to_str().unwrap(),
            "-n",
            "3",
            "--prompt",
            "hello",
        ],
    );
    assert_eq!(
        out, direct.0,
        "the cached model must generate as the local directory does"
    );

    // Several GGUFs: the error lists them; offline, a model never pulled is named as missing.
    let o = bitnet(&s, &dir, &["pull", "test-org/tiny-gguf"]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("model-i2s.gguf, model-tq20.gguf"),
        "{err}"
    );
    let o = bitnet(
        &s,
        &dir,
        &["--offline", "pull", "test-org/tiny-gguf:model-i2s.gguf"],
    );
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("models--test-org--tiny-gguf"),
        "{err}"
    );
    ok(&s, &dir, &["pull", "test-org/tiny-gguf:model-i2s.gguf"]);

    let (ls, _) = ok(&s, &dir, &["cache", "ls"]);
    assert!(
        ls.contains("test-org/tiny-packed") && ls.contains("test-org/tiny-gguf"),
        "{ls}"
    );
    assert!(ls.contains("01234567 (main)"), "{ls}");
    let (js, _) = ok(&s, &dir, &["cache", "ls", "--json"]);
    let repos: Vec<serde_json::Value> = js
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let gguf_size = std::fs::metadata(fixtures().join("bitnet-packed-gguf/model-i2s.gguf"))
        .unwrap()
        .len();
    assert_eq!(repos[0]["model"], "test-org/tiny-gguf");
    assert_eq!(repos[0]["size"], gguf_size);

    // tiny-packed was last used by the run, before the GGUF pull: pruning to the GGUF's size
    // evicts it.
    let (out, _) = ok(
        &s,
        &dir,
        &["cache", "prune", "--max-size", &gguf_size.to_string()],
    );
    assert!(
        out.contains(&format!("removed test-org/tiny-packed@{COMMIT}")),
        "{out}"
    );
    let (out, _) = ok(&s, &dir, &["cache", "rm", "test-org/tiny-gguf"]);
    assert!(out.contains("removed test-org/tiny-gguf"), "{out}");
    let (ls, _) = ok(&s, &dir, &["cache", "ls"]);
    assert!(ls.contains("(empty)"), "{ls}");
    let o = bitnet(&s, &dir, &["cache", "rm", "test-org/tiny-gguf"]);
    assert!(!o.status.success() && text(&o).1.contains("not in the cache"));
}

#[test]
fn a_full_disk_is_a_clear_error_and_leaves_no_whole_looking_file() {
    let s = server();
    let dir = tempdir("full");
    // A file-size limit of 100 KiB (sh counts 512-byte blocks) with SIGXFSZ ignored: writes
    // past it fail with EFBIG, as writes to a full disk fail with ENOSPC.
    let o = Command::new("sh")
        .args([
            "-c",
            "trap '' XFSZ; ulimit -f 200; exec \"$0\" pull test-org/tiny-packed",
            env!("CARGO_BIN_EXE_bitnet"),
        ])
        .env("HF_ENDPOINT", &s.url)
        .env("HF_HUB_CACHE", &dir)
        .env("HF_HOME", dir.join("home"))
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("no space left") && err.contains(".incomplete"),
        "{err}"
    );
    let repo = dir.join("models--test-org--tiny-packed");
    let blobs: Vec<String> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let sha = blobs
        .iter()
        .find(|b| b.ends_with(".incomplete"))
        .expect("the partial download is kept for resuming")
        .trim_end_matches(".incomplete")
        .to_string();
    assert!(!blobs.contains(&sha), "no whole-looking blob: {blobs:?}");
    assert!(!repo
        .join("snapshots")
        .join(COMMIT)
        .join("model.safetensors")
        .exists());
    // With room again, the same pull resumes and finishes.
    ok(&s, &dir, &["pull", "test-org/tiny-packed"]);
    assert!(s
        .log()
        .iter()
        .any(|l| l.starts_with(&format!("GET /cdn/{sha} bytes="))));
    assert!(repo.join("blobs").join(&sha).is_file());
}
