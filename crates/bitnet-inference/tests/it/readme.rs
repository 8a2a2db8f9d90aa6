//! README.md's library quick start is the crate documentation's, which runs as a doctest.

use std::path::Path;

/// The lines of the first fenced block after `fence`, without rustdoc's hidden `# ` lines.
fn block_after<'a>(text: &'a str, fence: &str) -> Vec<&'a str> {
    let start = text
        .find(fence)
        .unwrap_or_else(|| panic!("no {fence} block"))
        + fence.len();
    text[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.trim() != "```")
        .filter(|l| !l.starts_with("# ") && *l != "#")
        .collect()
}

#[test]
fn readme_quick_start_is_the_crate_doctest() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(dir.join("../../README.md")).unwrap();
    let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
    let docs: String = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let ours = block_after(&readme, "```rust");
    assert!(ours.len() >= 5, "README.md's quick start: {ours:?}");
    assert_eq!(ours, block_after(&docs, "```"));
}
