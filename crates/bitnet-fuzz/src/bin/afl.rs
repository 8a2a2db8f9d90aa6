//! The coverage-guided driver: afl.rs (AFL++) runs one target of the library on its inputs,
//! in persistent mode. Built and run by `scripts/fuzz-afl`:
//!
//! ```text
//! cargo afl build --profile ci -p bitnet-fuzz --features afl --bin bitnet-fuzz-afl
//! cargo afl fuzz -i SEEDS -o OUT target/ci/bitnet-fuzz-afl TARGET
//! ```
//!
//! Inputs (as `bitnet-fuzz --write-seeds TARGET DIR` writes them): `gguf`, a GGUF file; `hf`,
//! a model directory as `bitnet_fuzz::files_bytes` writes it; `tokenizer`, a text; `template`,
//! a chat template's source (rendered for a fixed conversation); `request`, a request as
//! `bitnet_fuzz::request_bytes` writes it; `schema`, a JSON schema; `jsonl`, a line of a
//! `bitnet batch` input. A panic aborts the process, which afl records as a crash.
//!
//! What an input does never depends on the inputs before it in the same process (afl's
//! stability): each model or request gets fresh state; only read-only things (a tokenizer,
//! the model's weights, the schema compiler's vocabulary) are shared.

use std::panic::AssertUnwindSafe;

fn work_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("bitnet-fuzz-afl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a work directory");
    dir
}

fn main() {
    let target = std::env::args().nth(1).unwrap_or_default();
    // Made in the forked child, on its first input, not before the fork: a model and a
    // scheduler have threads (the compute pool), which a fork does not copy. (Unwind safety
    // does not matter: a panic aborts the process, and afl records it.)
    match target.as_str() {
        "gguf" => {
            let dir = work_dir();
            afl::fuzz!(|data: &[u8]| {
                bitnet_fuzz::gguf(data, &dir);
            });
        }
        "hf" => {
            let dir = work_dir();
            afl::fuzz!(|data: &[u8]| {
                bitnet_fuzz::hf(
                    &bitnet_fuzz::parse_files(data, &bitnet_fuzz::HF_FILES),
                    &dir,
                );
            });
        }
        "tokenizer" => {
            let mut tokenizers = AssertUnwindSafe(None);
            afl::fuzz!(|data: &[u8]| {
                let t = tokenizers.get_or_insert_with(bitnet_fuzz::tokenizers);
                bitnet_fuzz::tokenize(t, &String::from_utf8_lossy(data));
            });
        }
        "template" => {
            let messages = bitnet_fuzz::fixed_conversation();
            afl::fuzz!(|data: &[u8]| {
                bitnet_fuzz::template(&String::from_utf8_lossy(data), &messages);
            });
        }
        "request" => {
            let mut server = AssertUnwindSafe(None);
            afl::fuzz!(|data: &[u8]| {
                let (endpoint, body) = bitnet_fuzz::parse_request_bytes(data);
                server
                    .get_or_insert_with(bitnet_fuzz::Server::new)
                    .request(endpoint, body);
            });
        }
        "schema" => {
            let mut compiler = AssertUnwindSafe(None);
            afl::fuzz!(|data: &[u8]| {
                let (grammars, vocab) = compiler.get_or_insert_with(|| {
                    let m = bitnet_fuzz::tiny_model();
                    (bitnet_fuzz::json_grammars(&m), m.pieces.len())
                });
                bitnet_fuzz::schema(grammars, *vocab, data);
            });
        }
        "jsonl" => {
            let mut model = AssertUnwindSafe(None);
            afl::fuzz!(|data: &[u8]| {
                bitnet_fuzz::jsonl(model.get_or_insert_with(bitnet_fuzz::tiny_model), data);
            });
        }
        other => {
            eprintln!(
                "bitnet-fuzz-afl: unknown target {other:?}: expected gguf, hf, tokenizer, \
                 template, request, schema or jsonl"
            );
            std::process::exit(2);
        }
    }
}
