//! Shared by the CLI tests: running `bitnet` and reading its figures.
#![allow(dead_code)]

use std::process::Command;

/// Runs `bitnet` with `args` (no default model from the environment); it must succeed.
/// Returns stdout and stderr.
pub fn bitnet_ok(args: &[&str]) -> (String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .env_remove("BITNET_MODEL")
        .output()
        .expect("run bitnet");
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "bitnet {args:?} failed: {err}");
    (out, err)
}

/// Runs `bitnet` with `args`; it must fail. Returns stdout and stderr.
pub fn bitnet_err(args: &[&str]) -> (String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .env_remove("BITNET_MODEL")
        .output()
        .expect("run bitnet");
    assert!(!o.status.success(), "bitnet {args:?} succeeded");
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The value of the final `PPL = <value>` line of `bitnet perplexity`.
pub fn final_ppl(stdout: &str) -> f64 {
    stdout
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("PPL = "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no PPL line in {stdout:?}"))
}
