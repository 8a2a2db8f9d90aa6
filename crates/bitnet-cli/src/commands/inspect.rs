use bitnet_inference::model::{self, LinearWeights};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face model directory (default: $BITNET_MODEL, else the
    /// bitnet-tiny model shipped in the repository).
    #[arg(short, long, env = "BITNET_MODEL")]
    model: Option<PathBuf>,
    /// Context size to size the KV cache for (default: the model's).
    #[arg(short = 'c', long = "ctx-size", value_parser = super::parse_ctx_size)]
    ctx_size: Option<usize>,
    /// Also load the model onto this device (`cuda`, `cuda:N`, `auto`) and report the device
    /// memory it takes: weights, the KV cache of one sequence of the context size, buffers.
    #[arg(long, default_value = "cpu", value_parser = super::parse_device)]
    device: bitnet_inference::backend::Device,
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = super::model_or_default(a.model.as_deref())?;
    let sp = super::loading_spinner(&path);
    let m = model::load(&path);
    sp.finish_and_clear();
    let m = m?;
    let c = &m.config;
    if let Some(ctx) = a.ctx_size.filter(|&ctx| ctx > c.max_context) {
        anyhow::bail!(
            "context size {ctx} (-c) is larger than the model's maximum of {} tokens",
            c.max_context
        );
    }
    println!("model:        {}", m.path.display());
    println!("format:       {}", m.format);
    for (k, v) in &m.metadata {
        println!("  {k}: {v}");
    }
    println!("architecture: {}", c.architecture);
    println!(
        "shape:        hidden {}, layers {}, heads {} (kv {}, head_dim {}), ffn {}, vocab {}",
        c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_size, c.vocab_size
    );
    println!(
        "              context {}, rope θ {}, rms ε {}, activation {}, sub-norms {}, tied embeddings {}",
        c.max_context,
        c.rope_theta,
        c.rms_norm_eps,
        c.activation.name(),
        c.has_sub_norms,
        c.tied_embeddings
    );
    if c.rope_scaling != bitnet_inference::model::RopeScaling::None || c.qk_norm {
        println!(
            "              rope scaling {}, q/k head norms {}",
            c.rope_scaling.describe(),
            c.qk_norm
        );
    }
    let layer0 = m.weights.layers.first();
    if let Some(l) = layer0 {
        let kind = |w: &LinearWeights| match w {
            LinearWeights::Ternary(t) if t.group() != 0 => match t.group() {
                64 => "ternary (W1.58A8), a scale per 64 weights",
                _ => "ternary (W1.58A8), a scale per 128 weights",
            },
            LinearWeights::Ternary(_) => "ternary (W1.58A8)",
            LinearWeights::Dense(d) => d.data().type_name(),
        };
        println!(
            "linears:      q {} | ffn down {}",
            kind(&l.q_proj.weights),
            kind(&l.down_proj.weights)
        );
    }
    println!(
        "lm_head:      {}",
        match &m.weights.lm_head {
            None => format!(
                "tied to the token embedding ({})",
                m.weights.token_embedding.data().type_name()
            ),
            Some(h) => h.kind_name().to_string(),
        }
    );
    println!("tokenizer:    {}", m.tokenizer.describe());
    match &m.chat_template {
        Some(t) => println!("chat template ({} chars):\n{t}", t.len()),
        None => println!("chat template: none in the files (BitNet 2B-4T format used)"),
    }
    println!("\ntensors ({}):", m.tensors.len());
    let mut file_bytes = 0u64;
    for t in &m.tensors {
        file_bytes += t.bytes;
        println!(
            "  {:<48} {:>6} {:?} {} B",
            t.name, t.dtype, t.shape, t.bytes
        );
    }
    let ctx = a.ctx_size.unwrap_or(c.max_context);
    let weights = m.weights.memory_bytes();
    // Saturating: -c is at most the model's context, but the product must not wrap.
    let kv = [2, ctx, c.kv_dim(), 4]
        .iter()
        .fold(c.n_layers, |a, &b| a.saturating_mul(b));
    println!("\nmemory:");
    println!("  tensors in file:   {}", mib(file_bytes as usize));
    println!("  weights in memory: {} (repacked)", mib(weights));
    println!("  KV cache (f32):    {} for {ctx} tokens", mib(kv));
    println!("  total:             {}", mib(weights.saturating_add(kv)));
    if a.device != bitnet_inference::backend::Device::Cpu {
        report_device(m, ctx, a.device)?;
    }
    Ok(())
}

/// Loads the model onto `device` and prints what it holds there, as the engine plans it
/// (one sequence of `ctx` tokens, forward calls of the engine's default batch).
fn report_device(
    m: model::LoadedModel,
    ctx: usize,
    device: bitnet_inference::backend::Device,
) -> anyhow::Result<()> {
    let options = bitnet_inference::backend::ModelOptions {
        device,
        ..Default::default()
    };
    let backend = bitnet_inference::backend::build(m.config, m.weights, &options)?;
    let batch = bitnet_inference::engine::EngineConfig::default().batch_size;
    let state = backend.new_state(1, ctx, batch)?;
    println!(
        "
device: {}",
        backend.kernel_name()
    );
    match backend.device_memory() {
        Some(d) => {
            let held = d.weights_bytes + state.kv_bytes() + state.scratch_bytes();
            println!("  weights:           {}", mib(d.weights_bytes));
            println!(
                "  KV cache (f32):    {} for {ctx} tokens",
                mib(state.kv_bytes())
            );
            println!(
                "  buffers:           {} for forward calls of {batch} tokens",
                mib(state.scratch_bytes())
            );
            println!("  total:             {}", mib(held));
            if let (Some(free), Some(total)) = (d.free_bytes, d.total_bytes) {
                println!(
                    "  {}: {} free of {} with these held",
                    d.device,
                    mib(free),
                    mib(total)
                );
            }
        }
        None => println!("  (computes in host memory: the figures above)"),
    }
    Ok(())
}
