//! The `bitnet` command's subcommands (`src/main.rs` is the command line), a library so that
//! the fuzzer (`crates/bitnet-fuzz`) reaches the readers of untrusted input they hold, such
//! as `bitnet batch`'s JSONL reader.

pub mod commands;
