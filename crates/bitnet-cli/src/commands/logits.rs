use bitnet_inference::eval;
use bitnet_inference::formats::npy;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face model directory (default: $BITNET_MODEL, else the
    /// bitnet-tiny model shipped in the repository).
    #[arg(short, long, env = "BITNET_MODEL")]
    model: Option<PathBuf>,
    /// Comma-separated token ids, run as one sequence from position 0.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// Output .npy file: float32 [n_ids, vocab].
    #[arg(short, long)]
    output: PathBuf,
    /// Where the model computes: `cpu`, `cuda`, `cuda:N` or `auto` (the GPU gives the CPU's
    /// portable path's bits, `BITNET_KERNEL=scalar`).
    #[arg(long, default_value = "cpu", value_parser = super::parse_device)]
    device: bitnet_inference::backend::Device,
}

/// Always exact: activations between layers and the KV cache are f32, the lm_head the
/// file's, on every device.
pub fn run(a: Args) -> anyhow::Result<()> {
    let options = bitnet_inference::backend::ModelOptions {
        device: a.device,
        ..Default::default()
    };
    let m = super::load_with(&super::model_or_default(a.model.as_deref())?, &options)?;
    let n = a.ids.len();
    let vocab = m.model.config().vocab_size;
    let all = eval::sequence_logits(&m.model, &a.ids)?;
    let file = std::fs::File::create(&a.output)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.output.display()))?;
    npy::write_f32(std::io::BufWriter::new(file), &[n, vocab], &all)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.output.display()))?;
    Ok(())
}
