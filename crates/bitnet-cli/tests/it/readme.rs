//! README.md's first command prints the sample the README shows (`tools/readme_sample.py`
//! regenerates it).

use std::path::Path;
use std::process::Command;

/// Splits a command line as a POSIX shell would for the README's simple quoting.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted, mut in_word) = (Vec::new(), String::new(), false, false);
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            ' ' if !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                }
                in_word = false;
            }
            _ => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[test]
fn readme_sample() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let (line_start, line) = readme
        .match_indices("target/release/bitnet run ")
        .next()
        .map(|(i, _)| (i, readme[i..].lines().next().unwrap()))
        .expect("README.md has a `target/release/bitnet run` line");
    let args = shell_words(line.trim_start_matches("target/release/bitnet "));
    let block_start = readme[line_start..].find("```text\n").unwrap() + line_start + 8;
    let block = &readme[block_start..block_start + readme[block_start..].find("```").unwrap()];
    let (text, stats) = block.trim_end().rsplit_once('\n').unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(&args)
        .current_dir(&root)
        .env_remove("BITNET_MODEL")
        .env_remove("BITNET_KERNEL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let our_stats = stderr.trim_end().lines().last().unwrap();
    // The statistics line: the same counts and finish reason (speeds differ).
    let counts = |s: &str| {
        s.split(" | ")
            .map(|part| part.split(',').next().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let (ours, readmes) = (counts(our_stats), counts(stats));
    assert_eq!(ours[..3], readmes[..3], "{our_stats}\nvs README:\n{stats}");
    // The text, where this machine runs the kernel the README's sample was made with.
    if ours.last() == readmes.last() {
        assert_eq!(
            stdout.trim_end(),
            text,
            "README.md's sample is stale: run tools/readme_sample.py"
        );
    } else {
        eprintln!(
            "this machine's kernel ({}) is not the README sample's ({}): text not compared",
            ours.last().unwrap(),
            readmes.last().unwrap()
        );
    }
}
