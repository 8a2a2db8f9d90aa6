//! The coverage-guided driver: afl.rs (AFL++) runs one target of the library on its inputs,
//! in persistent mode. Built and run by `scripts/fuzz-afl`:
//!
//! ```text
//! cargo afl build --profile ci -p bitnet-fuzz --features afl --bin bitnet-fuzz-afl
//! cargo afl fuzz -i SEEDS -o OUT target/ci/bitnet-fuzz-afl gguf|template|request
//! ```
//!
//! Inputs: `gguf`, a GGUF file; `template`, a chat template's source (rendered for a fixed
//! conversation); `request`, a request as `bitnet_fuzz::request_bytes` writes it. A panic
//! aborts the process, which afl records as a crash.

fn main() {
    let target = std::env::args().nth(1).unwrap_or_default();
    match target.as_str() {
        "gguf" => {
            let dir = std::env::temp_dir().join(format!("bitnet-fuzz-afl-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a work directory");
            afl::fuzz!(|data: &[u8]| {
                bitnet_fuzz::gguf(data, &dir);
            });
        }
        "template" => {
            let messages = bitnet_fuzz::fixed_conversation();
            afl::fuzz!(|data: &[u8]| {
                bitnet_fuzz::template(&String::from_utf8_lossy(data), &messages);
            });
        }
        "request" => {
            // Made in the forked child, not before the fork: the scheduler and the compute
            // pool have threads, which a fork does not copy. (Unwind safety does not matter:
            // a panic aborts the process, and afl records it.)
            let mut server = std::panic::AssertUnwindSafe(None);
            afl::fuzz!(|data: &[u8]| {
                let (endpoint, body) = bitnet_fuzz::parse_request_bytes(data);
                server
                    .get_or_insert_with(bitnet_fuzz::Server::new)
                    .request(endpoint, body);
            });
        }
        other => {
            eprintln!(
                "bitnet-fuzz-afl: unknown target {other:?}: expected gguf, template or request"
            );
            std::process::exit(2);
        }
    }
}
