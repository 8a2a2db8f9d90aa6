use super::{context_size, load};
use bitnet_inference::generate::{generate, Sampler, SamplingParams};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face model directory.
    #[arg(short, long)]
    model: PathBuf,
    /// The prompt text.
    #[arg(short, long)]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(long, default_value_t = 0x5EED)]
    seed: u64,
    /// Context size (default: the model's, at most 4096).
    #[arg(short = 'c', long = "ctx-size")]
    ctx_size: Option<usize>,
    /// Tokens per prefill batch.
    #[arg(short = 'b', long = "batch-size", default_value_t = 64)]
    batch_size: usize,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let m = load(&a.model)?;
    let prompt = m.tokenizer.encode(&a.prompt, true)?;
    let ctx = context_size(a.ctx_size, &m.model).min(prompt.len() + a.max_tokens);
    let mut state = m.model.new_state(1, ctx.max(1), a.batch_size)?;
    let mut sampler = Sampler::new(SamplingParams {
        temperature: a.temp,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repeat_penalty,
        repeat_last_n: a.repeat_last_n,
        seed: a.seed,
    });
    let mut stop = m.generation.eos_token_ids.clone();
    stop.extend_from_slice(m.tokenizer.eos_ids());
    let stdout = std::io::stdout();
    let (_, stats) = generate(
        &m.model,
        &m.tokenizer,
        &mut state,
        &prompt,
        a.max_tokens,
        &mut sampler,
        &stop,
        |text| {
            let mut out = stdout.lock();
            out.write_all(text.as_bytes())
                .and_then(|_| out.flush())
                .map_err(|e| bitnet_inference::Error::io("<stdout>", e))
        },
    )?;
    println!();
    eprintln!(
        "prefill: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | kernel {}",
        stats.prompt_tokens,
        stats.prefill_tokens_per_second(),
        stats.generated_tokens,
        stats.decode_tokens_per_second(),
        m.model.kernel_name()
    );
    Ok(())
}
