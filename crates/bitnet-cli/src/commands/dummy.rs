//! `bitnet dummy`: a model of any shape with random ternary weights, written as GGUF, so
//! every benchmark runs with no download and llama.cpp can run the very same file.

use bitnet_inference::formats::ggml::GgmlType;
use bitnet_inference::model::dummy;
use bitnet_inference::model::save_gguf::{write_gguf_with_progress, GgufExport};
use bitnet_inference::model::{Activation, ModelConfig};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Output GGUF file.
    #[arg(short, long)]
    output: PathBuf,
    /// Named shapes: `2b-4t` (microsoft/bitnet-b1.58-2B-4T). Flags below override them.
    #[arg(long, default_value = "2b-4t")]
    preset: String,
    /// Ternary weight type: tq2_0, tq1_0 (llama.cpp) or i2_s (bitnet.cpp).
    #[arg(long = "type", default_value = "tq2_0")]
    ternary_type: String,
    /// Token embedding / tied lm_head type: f16, f32, q8_0 or q6_k (hidden size a multiple
    /// of 256).
    #[arg(long, default_value = "f16")]
    embedding_type: String,
    /// GGUF architecture (default: `bitnet` for TQ types, which llama.cpp loads; `bitnet-25`
    /// for I2_S, which bitnet.cpp loads).
    #[arg(long)]
    arch: Option<String>,
    #[arg(long)]
    hidden: Option<usize>,
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long)]
    heads: Option<usize>,
    #[arg(long)]
    kv_heads: Option<usize>,
    #[arg(long)]
    ffn: Option<usize>,
    #[arg(long)]
    vocab: Option<usize>,
    #[arg(long)]
    context: Option<usize>,
    /// FFN activation: relu2 or silu.
    #[arg(long)]
    activation: Option<String>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn ggml_type(name: &str) -> anyhow::Result<GgmlType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "tq1_0" => GgmlType::TQ1_0,
        "tq2_0" => GgmlType::TQ2_0,
        "i2_s" => GgmlType::I2_S,
        "f16" => GgmlType::F16,
        "f32" => GgmlType::F32,
        "q8_0" => GgmlType::Q8_0,
        "q6_k" => GgmlType::Q6_K,
        other => anyhow::bail!("unknown tensor type {other:?}"),
    })
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut c: ModelConfig = match a.preset.as_str() {
        "2b-4t" => dummy::bitnet_2b_4t(),
        other => anyhow::bail!("unknown preset {other:?} (known: 2b-4t)"),
    };
    let set = |field: &mut usize, v: Option<usize>| {
        if let Some(v) = v {
            *field = v;
        }
    };
    set(&mut c.hidden_size, a.hidden);
    set(&mut c.n_layers, a.layers);
    set(&mut c.n_heads, a.heads);
    set(&mut c.n_kv_heads, a.kv_heads);
    set(&mut c.ffn_size, a.ffn);
    set(&mut c.vocab_size, a.vocab);
    set(&mut c.max_context, a.context);
    if a.hidden.is_some() || a.heads.is_some() {
        c.head_dim = c.hidden_size / c.n_heads;
    }
    if let Some(act) = &a.activation {
        c.activation = Activation::from_hidden_act(act)
            .ok_or_else(|| anyhow::anyhow!("unknown activation {act:?} (relu2, silu)"))?;
    }
    c.validate(&a.output)?;
    let ternary_type = ggml_type(&a.ternary_type)?;
    let arch = a.arch.clone().unwrap_or_else(|| {
        if ternary_type == GgmlType::I2_S {
            "bitnet-25".into()
        } else {
            "bitnet".into()
        }
    });
    let started = std::time::Instant::now();
    let sp = super::spinner(format!("random weights for {} layers", c.n_layers));
    let weights = dummy::random_weights(&c, a.seed);
    sp.finish_and_clear();
    let weights = weights?;
    let bar = super::progress_bar(
        c.n_layers as u64 + 2,
        format!("writing {}", a.output.display()),
    );
    let res = write_gguf_with_progress(
        &c,
        &weights,
        &dummy::byte_vocab_metadata(c.vocab_size),
        &GgufExport {
            architecture: arch,
            ternary_type,
            embedding_type: ggml_type(&a.embedding_type)?,
            name: format!("dummy {} seed {}", a.preset, a.seed),
            round_scales: false,
        },
        &a.output,
        &mut |done, _| bar.set_position(done as u64),
    );
    bar.finish_and_clear();
    res?;
    let size = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({:.1} MiB, {} parameters) in {:.1} s",
        a.output.display(),
        size as f64 / (1 << 20) as f64,
        weights.parameter_count(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
