//! `bitnet`: run, inspect and evaluate BitNet b1.58 models from the command line.

use bitnet_cli::commands;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "bitnet",
    // The version, git commit and enabled cargo features (build.rs).
    version = env!("BITNET_VERSION_LONG"),
    about = "Exact, fast inference for BitNet b1.58 models"
)]
struct Cli {
    /// Compute threads in total (default: one per core).
    #[arg(short = 't', long, global = true, env = "BITNET_THREADS", value_parser = commands::parse_threads)]
    threads: Option<usize>,
    /// Resolve Hugging Face hub ids from the local cache alone (as HF_HUB_OFFLINE=1).
    #[arg(long, global = true)]
    offline: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Complete a prompt, streaming the text to stdout.
    Run(commands::run::Args),
    /// Chat with a model interactively (its chat template, the KV cache kept between turns).
    Chat(commands::chat::Args),
    /// Generate for every prompt of a JSONL or text file, together in batches.
    Batch(commands::batch::Args),
    /// Show a model's architecture, tensors, tokenizer, chat template and memory needs.
    Inspect(commands::inspect::Args),
    /// Print the token ids of a text as a JSON list.
    Tokenize(commands::tokenize::Args),
    /// Write the float32 logits of every position of a token sequence to a .npy file.
    Logits(commands::logits::Args),
    /// Perplexity of a text file, computed as llama.cpp's llama-perplexity does.
    Perplexity(commands::perplexity::Args),
    /// Serve the model over HTTP with OpenAI's API (continuous batching, streaming).
    Serve(commands::serve::Args),
    /// Measure prompt processing (pp) and generation (tg) speed, as llama-bench does.
    Bench(commands::bench::Args),
    /// Write a model of any shape with random ternary weights (GGUF), for benchmarks.
    Dummy(commands::dummy::Args),
    /// Convert a model (any supported input) to GGUF I2_S, TQ2_0 or TQ1_0.
    Convert(commands::convert::Args),
    /// Download a model from the Hugging Face hub into the shared cache, without running it.
    #[cfg(feature = "hub")]
    Pull(commands::pull::Args),
    /// List, remove or prune the models in the Hugging Face cache.
    #[cfg(feature = "hub")]
    Cache(commands::cache::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A server must survive clients that hang up; every other command writes to stdout.
    if !matches!(cli.command, Command::Serve(_)) {
        restore_sigpipe();
    }
    match try_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `bitnet inspect | head` should end quietly, as Unix tools do, not panic in `println!`:
/// Rust ignores SIGPIPE by default, so a write to a closed pipe is an error that `println!`
/// turns into a panic. Every subcommand here writes its results to stdout; a network server
/// subcommand must not do this (a client hanging up would end the process).
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE and no handler of ours is replaced.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Runs `f` in a rayon pool of `-t` threads (one per core by default).
fn on_threads(f: impl FnOnce() -> anyhow::Result<()> + Send) -> anyhow::Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(commands::threads())
        .thread_name(|i| format!("bitnet-pool-{i}"))
        .build()?
        .install(f)
}

fn try_main(cli: Cli) -> anyhow::Result<()> {
    // Every model the commands load computes (and loads) on `-t` threads in total;
    // `convert` and `dummy`, which work on weights outside a model, get a pool of as many.
    commands::set_threads(cli.threads);
    commands::set_offline(cli.offline);
    match cli.command {
        Command::Run(a) => commands::run::run(a),
        Command::Chat(a) => commands::chat::run(a),
        Command::Batch(a) => commands::batch::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Tokenize(a) => commands::tokenize::run(a),
        Command::Logits(a) => commands::logits::run(a),
        Command::Perplexity(a) => commands::perplexity::run(a),
        Command::Serve(a) => commands::serve::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Dummy(a) => on_threads(|| commands::dummy::run(a)),
        Command::Convert(a) => on_threads(|| commands::convert::run(a)),
        #[cfg(feature = "hub")]
        Command::Pull(a) => commands::pull::run(a),
        #[cfg(feature = "hub")]
        Command::Cache(a) => commands::cache::run(a),
    }
}
