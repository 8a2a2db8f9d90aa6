use super::gen_flags::GenFlags;
use super::{context_size, load};
use bitnet_inference::generate::{generate, ContextOverflow};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face model directory (default: $BITNET_MODEL, else the
    /// bitnet-tiny model shipped in the repository).
    #[arg(short, long, env = "BITNET_MODEL")]
    model: Option<PathBuf>,
    /// The prompt text.
    #[arg(short, long)]
    prompt: String,
    #[command(flatten)]
    gen: GenFlags,
    /// Context size (default: the model's, at most 4096).
    #[arg(short = 'c', long = "ctx-size")]
    ctx_size: Option<usize>,
    /// Tokens per prefill batch.
    #[arg(short = 'b', long = "batch-size", default_value_t = 64)]
    batch_size: usize,
    #[command(flatten)]
    model_flags: super::ModelFlags,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut m = load(&super::model_or_default(a.model.as_deref())?)?;
    a.model_flags.apply(&mut m.model)?;
    let config = a.gen.config(&m.generation, 128);
    let prompt = m.tokenizer.encode(&a.prompt, true)?;
    let mut ctx = context_size(a.ctx_size, &m.model);
    if config.context_overflow == ContextOverflow::Error {
        // The cache need not be larger than this run can use.
        ctx = ctx.min(prompt.len() + config.max_new_tokens);
    }
    let mut state =
        m.model
            .new_state(a.gen.slots(), ctx.max(1), a.batch_size.max(a.gen.slots()))?;
    let stdout = std::io::stdout();
    let g = generate(
        &m.model,
        &m.tokenizer,
        &mut state,
        &prompt,
        &config,
        |text| {
            let mut out = stdout.lock();
            out.write_all(text.as_bytes())
                .and_then(|_| out.flush())
                .map_err(|e| bitnet_inference::Error::io("<stdout>", e))
        },
    )?;
    println!();
    let s = &g.stats;
    eprintln!(
        "prefill: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | finish: {} | kernel {}",
        s.prompt_tokens,
        s.prefill_tokens_per_second(),
        s.generated_tokens,
        s.decode_tokens_per_second(),
        g.finish_reason.as_str(),
        m.model.kernel_name()
    );
    Ok(())
}
