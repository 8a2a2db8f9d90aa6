use super::gen_flags::GenFlags;
use super::{context_size, load_with};
use bitnet_inference::generate::{
    generate_with, ContextOverflow, GenerationStats, SamplingStrategy, TokenStream,
};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face model directory (default: $BITNET_MODEL, else the
    /// bitnet-tiny model shipped in the repository).
    #[arg(short, long, env = "BITNET_MODEL")]
    model: Option<PathBuf>,
    /// The prompt text; `-` reads it from standard input.
    #[arg(short, long, required_unless_present = "file", conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
    #[command(flatten)]
    gen: GenFlags,
    #[command(flatten)]
    json: super::JsonFlags,
    /// Context size (default: the model's, at most 4096).
    #[arg(short = 'c', long = "ctx-size", value_parser = super::parse_ctx_size)]
    ctx_size: Option<usize>,
    /// Tokens per prefill batch.
    #[arg(short = 'b', long = "batch-size", default_value_t = 64, value_parser = super::in_range(1, 65536))]
    batch_size: usize,
    #[command(flatten)]
    model_flags: super::ModelFlags,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let text = super::read_prompt(a.prompt.as_deref(), a.file.as_deref())?;
    let m = load_with(
        &super::model_or_default(a.model.as_deref())?,
        &a.model_flags.options(),
    )?;
    let config = a.gen.config(&m.generation, 128);
    let constraint = a.json.constraint(&m)?;
    if constraint.is_some() && matches!(config.strategy, SamplingStrategy::BeamSearch { .. }) {
        anyhow::bail!("--json and --json-schema do not work with --beams");
    }
    let mut ctx = context_size(a.ctx_size, &m.model, 4096)?;
    // A prompt far too long for the context is refused by its length in bytes before
    // tokenizing it costs memory in proportion; the token count is checked below.
    let max_bytes = m.tokenizer.max_text_bytes(ctx);
    if text.len() > max_bytes {
        anyhow::bail!(
            "the prompt is {} bytes, more than the context size {ctx} can hold (at most \
             {max_bytes} bytes with this vocabulary)",
            text.len()
        );
    }
    let prompt = m.tokenizer.encode(&text, true)?;
    if prompt.len() > ctx {
        anyhow::bail!(
            "the prompt is {} tokens, more than the context size {ctx}{}",
            prompt.len(),
            if a.ctx_size.is_some() {
                String::new()
            } else {
                format!(" (the model's is {})", m.model.config().max_context)
            }
        );
    }
    if config.context_overflow == ContextOverflow::Error {
        let need = prompt.len() + config.max_new_tokens;
        if need > ctx {
            anyhow::bail!(
                "the prompt ({} tokens) and -n {} need {need} tokens, more than the context \
                 size {ctx}; lower -n{}, or pass --context-shift",
                prompt.len(),
                config.max_new_tokens,
                if ctx < m.model.config().max_context {
                    format!(
                        ", raise -c (the model allows {})",
                        m.model.config().max_context
                    )
                } else {
                    String::new()
                }
            );
        }
        // The cache need not be larger than this run can use.
        ctx = need.max(1);
    }
    let mut state = m
        .model
        .new_state(a.gen.slots(), ctx, a.batch_size.max(a.gen.slots()))?;
    let stdout = std::io::stdout();
    let write = |text: &str| {
        let mut out = stdout.lock();
        out.write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| bitnet_inference::Error::io("<stdout>", e))
    };
    let stop_ids = config.stop_ids(m.tokenizer.eos_ids());
    let (stats, finish): (GenerationStats, &str) =
        if let SamplingStrategy::BeamSearch { .. } = config.strategy {
            let g = generate_with(
                &m.model, &m.pieces, &mut state, &prompt, &config, stop_ids, write,
            )?;
            (g.stats, g.finish_reason.as_str())
        } else {
            // Ctrl-C ends the answer and still prints the statistics; a second one quits.
            let interrupted = Arc::new(AtomicBool::new(false));
            {
                let flag = interrupted.clone();
                ctrlc::set_handler(move || {
                    if flag.swap(true, Ordering::SeqCst) {
                        std::process::exit(130);
                    }
                })?;
            }
            let mut stream = TokenStream::new(
                &m.model, &m.pieces, &mut state, &prompt, 0, &config, stop_ids,
            )?;
            if let Some(c) = &constraint {
                stream.set_constraint(c.start().map_err(anyhow::Error::msg)?);
            }
            loop {
                if interrupted.load(Ordering::SeqCst) {
                    stream.cancel();
                }
                match stream.next_text()? {
                    Some(piece) => write(piece)?,
                    None => break,
                }
            }
            let reason = stream.finish_reason().map_or("cancelled", |r| r.as_str());
            (stream.stats(), reason)
        };
    println!();
    eprintln!(
        "{} | kernel {}",
        super::stats_line(&stats, finish),
        m.model.kernel_name()
    );
    if finish == "cancelled" {
        // As for any program stopped by Ctrl-C (SIGINT).
        std::process::exit(130);
    }
    Ok(())
}
