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
    /// Ternary weight type: tq2_0, tq1_0, q2_0, q2_0_g128 (llama.cpp; q2_0 with random
    /// group-wise scales, one per 64 weights; q2_0_g128 one per 128, as Ternary-Bonsai's
    /// files) or i2_s (bitnet.cpp).
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
    #[arg(long, value_parser = super::in_range(1, 65536))]
    hidden: Option<usize>,
    #[arg(long, value_parser = super::in_range(1, 1024))]
    layers: Option<usize>,
    #[arg(long, value_parser = super::in_range(1, 1024))]
    heads: Option<usize>,
    #[arg(long, value_parser = super::in_range(1, 1024))]
    kv_heads: Option<usize>,
    #[arg(long, value_parser = super::in_range(1, 262144))]
    ffn: Option<usize>,
    /// Vocabulary size: at least 258 (the 256 byte tokens, a merge and an end token).
    #[arg(long, value_parser = super::in_range(258, 4194304))]
    vocab: Option<usize>,
    #[arg(long, value_parser = super::in_range(1, 4194304))]
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
        "q2_0" => GgmlType::Q2_0,
        "q2_0_g128" => GgmlType::Q2_0_G128,
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
    check_memory(&c)?;
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
    let weights = dummy::random_weights(&c, a.seed).and_then(|mut w| {
        if matches!(ternary_type, GgmlType::Q2_0 | GgmlType::Q2_0_G128) {
            dummy::random_group_scales(&mut w, ternary_type.block_size(), a.seed)?;
        }
        Ok(w)
    });
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

/// Refuses a shape whose weights cannot fit in this machine's memory, before allocating
/// them: an f16 embedding and 2-bit ternary linears, counted with checked arithmetic.
fn check_memory(c: &ModelConfig) -> anyhow::Result<()> {
    let bytes = (|| {
        let attn = c.q_dim().checked_add(c.kv_dim())?.checked_mul(2)?;
        let per_layer = c
            .hidden_size
            .checked_mul(attn.checked_add(c.ffn_size.checked_mul(3)?)?)?;
        let ternary = per_layer.checked_mul(c.n_layers)? / 4;
        let embedding = c.vocab_size.checked_mul(c.hidden_size)?.checked_mul(2)?;
        embedding.checked_add(ternary)
    })()
    .ok_or_else(|| anyhow::anyhow!("this shape has more weights than a machine can address"))?;
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<usize>()
            .ok()?
            .checked_mul(1024)
    });
    if let Some(available) = available {
        if bytes > available {
            anyhow::bail!(
                "this shape needs about {:.1} GiB of weights; {:.1} GiB of memory is available",
                bytes as f64 / (1u64 << 30) as f64,
                available as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}
