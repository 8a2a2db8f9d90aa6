use super::load_with;
use bitnet_inference::eval;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face model directory (default: $BITNET_MODEL, else the
    /// bitnet-tiny model shipped in the repository).
    #[arg(short, long, env = "BITNET_MODEL")]
    model: Option<PathBuf>,
    /// The text file to score.
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Tokens per chunk.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512, value_parser = super::parse_ctx_size)]
    ctx_size: usize,
    /// Score at most this many chunks (at least 1).
    #[arg(long, value_parser = super::parse_positive)]
    chunks: Option<usize>,
    /// Tokens per forward call.
    #[arg(short = 'b', long = "batch-size", default_value_t = 64, value_parser = super::in_range(1, 65536))]
    batch_size: usize,
    #[command(flatten)]
    model_flags: super::ModelFlags,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let m = load_with(
        &super::model_or_default(a.model.as_deref())?,
        &a.model_flags.options(),
    )?;
    let text = std::fs::read_to_string(&a.file)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.file.display()))?;
    let tokens = m.tokenizer.encode(&text, true)?;
    // llama.cpp puts BOS at the start of every chunk when the model adds one.
    let adds_bos =
        m.tokenizer.bos_id().is_some() && tokens.first() == m.tokenizer.bos_id().as_ref();
    let bos = if adds_bos { m.tokenizer.bos_id() } else { None };
    eprintln!(
        "{} tokens, {} chunks of {}",
        tokens.len(),
        a.chunks.map_or(tokens.len() / a.ctx_size, |c| c
            .min(tokens.len() / a.ctx_size)),
        a.ctx_size
    );
    let started = std::time::Instant::now();
    let result = eval::perplexity(
        &m.model,
        &tokens,
        a.ctx_size,
        a.chunks,
        bos,
        a.batch_size,
        |i, ppl| eprint!("[{}]{ppl:.4} ", i + 1),
    )?;
    eprintln!();
    eprintln!(
        "{} tokens scored in {:.1} s",
        result.scored,
        started.elapsed().as_secs_f64()
    );
    println!("PPL = {:.4}", result.value());
    Ok(())
}
