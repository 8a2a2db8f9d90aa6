//! `bitnet bench`: llama-bench's tests (pp = one batched prompt, tg = generation one token at
//! a time) with its JSON keys, so scripts written for llama-bench read ours.

use super::load_with;
use bitnet_inference::backend::BatchEntry;
use bitnet_inference::backend::{Backend, BackendState};
use bitnet_inference::generate::Rng;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face model directory (default: $BITNET_MODEL, else the
    /// bitnet-tiny model shipped in the repository).
    #[arg(short, long, env = "BITNET_MODEL")]
    model: Option<PathBuf>,
    /// Prompt lengths to test (comma-separated; 0 skips).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512",
        value_parser = super::in_range(0, bitnet_inference::model::config::MAX_CONTEXT)
    )]
    n_prompt: Vec<usize>,
    /// Generation lengths to test (comma-separated; 0 skips).
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128",
        value_parser = super::in_range(0, bitnet_inference::model::config::MAX_CONTEXT)
    )]
    n_gen: Vec<usize>,
    /// Tokens already in the KV cache when each test starts (comma-separated; llama-bench's
    /// `-d`): decode and prefill at long contexts read the cache too.
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0",
        value_parser = super::in_range(0, bitnet_inference::model::config::MAX_CONTEXT)
    )]
    n_depth: Vec<usize>,
    /// Repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 5, value_parser = super::in_range(1, 1000))]
    repetitions: usize,
    /// Tokens per forward call in prompt processing.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512, value_parser = super::in_range(1, 65536))]
    batch_size: usize,
    #[command(flatten)]
    model_flags: super::ModelFlags,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Md)]
    output: Format,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Md,
    Json,
    Csv,
}

struct TestResult {
    n_prompt: usize,
    n_gen: usize,
    n_depth: usize,
    samples_ts: Vec<f64>,
}

impl TestResult {
    fn name(&self) -> String {
        let test = if self.n_prompt > 0 {
            format!("pp{}", self.n_prompt)
        } else {
            format!("tg{}", self.n_gen)
        };
        match self.n_depth {
            0 => test,
            d => format!("{test} @ d{d}"),
        }
    }
    fn mean(&self) -> f64 {
        self.samples_ts.iter().sum::<f64>() / self.samples_ts.len() as f64
    }
    fn stdev(&self) -> f64 {
        let n = self.samples_ts.len();
        if n < 2 {
            return 0.0;
        }
        let m = self.mean();
        (self.samples_ts.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    }
}

/// Tokens a second of one run: `n_prompt` tokens in batches, or `n_gen` single steps, after
/// `depth` tokens (not timed) have filled the cache.
fn time_run(
    model: &dyn Backend,
    n_prompt: usize,
    n_gen: usize,
    depth: usize,
    batch: usize,
    seed: u64,
) -> anyhow::Result<f64> {
    let mut rng = Rng::new(seed);
    let vocab = model.config().vocab_size as u64;
    let n = n_prompt + n_gen;
    let max_batch = if n_prompt + depth > 0 {
        batch.min(n_prompt.max(depth))
    } else {
        1
    };
    let mut state = model.new_state(1, depth + n, max_batch)?;
    let mut entries = Vec::with_capacity(state.max_batch());
    let mut prefill =
        |positions: std::ops::Range<usize>, state: &mut dyn BackendState| -> anyhow::Result<()> {
            for chunk_start in positions.clone().step_by(max_batch) {
                let end = (chunk_start + max_batch).min(positions.end);
                entries.clear();
                entries.extend((chunk_start..end).map(|pos| BatchEntry {
                    token: (rng.next_u64() % vocab) as u32,
                    pos,
                    slot: 0,
                    logits: pos + 1 == positions.end,
                }));
                model.forward(&entries, state)?;
            }
            Ok(())
        };
    prefill(0..depth, &mut state)?;
    let start = Instant::now();
    if n_prompt > 0 {
        prefill(depth..depth + n_prompt, &mut state)?;
    } else {
        let mut rng = Rng::new(seed ^ 0x5eed);
        for pos in depth..depth + n_gen {
            let e = BatchEntry {
                token: (rng.next_u64() % vocab) as u32,
                pos,
                slot: 0,
                logits: true,
            };
            model.forward(std::slice::from_ref(&e), &mut state)?;
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Peak resident set size of this process (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = super::model_or_default(a.model.as_deref())?;
    let m = load_with(&path, &a.model_flags.options())?;
    let model: &dyn Backend = &m.model;
    let threads = super::threads();
    let model_size = model.weights().memory_bytes();
    let n_params = model.weights().parameter_count();
    let mut tests: Vec<TestResult> = a
        .n_prompt
        .iter()
        .filter(|&&p| p > 0)
        .map(|&p| (p, 0))
        .chain(a.n_gen.iter().filter(|&&g| g > 0).map(|&g| (0, g)))
        .flat_map(|(n_prompt, n_gen)| {
            a.n_depth.iter().map(move |&n_depth| TestResult {
                n_prompt,
                n_gen,
                n_depth,
                samples_ts: vec![],
            })
        })
        .collect();
    // Every test must fit the model's context (checked before any runs: each flag is at
    // most 2^24, so the sum cannot overflow).
    let max = model.config().max_context;
    if let Some(t) = tests
        .iter()
        .find(|t| t.n_depth + t.n_prompt + t.n_gen > max)
    {
        anyhow::bail!(
            "-d {} + {} = {} tokens: expected at most the model's context of {max}",
            t.n_depth,
            if t.n_prompt > 0 {
                format!("-p {}", t.n_prompt)
            } else {
                format!("-n {}", t.n_gen)
            },
            t.n_depth + t.n_prompt + t.n_gen
        );
    }
    for t in &mut tests {
        // One warm-up run, as llama-bench does.
        time_run(
            model,
            t.n_prompt.min(16),
            t.n_gen.min(4),
            0,
            a.batch_size,
            0,
        )?;
        for r in 0..a.repetitions {
            t.samples_ts.push(time_run(
                model,
                t.n_prompt,
                t.n_gen,
                t.n_depth,
                a.batch_size,
                r as u64 + 1,
            )?);
        }
    }
    let rss = peak_rss_bytes().unwrap_or(0);
    let kernel = model.kernel_name();
    let kv_type = format!("{:?}", m.options.kv_type).to_lowercase();
    let name = a.model.as_deref().unwrap_or(&path).display().to_string();
    match a.output {
        Format::Md => {
            println!("| model | size | params | kernel | threads | test | t/s | peak RSS |");
            println!("|---|---:|---:|---|---:|---|---:|---:|");
            for t in &tests {
                println!(
                    "| {name} | {:.2} GiB | {:.2} B | {kernel} | {threads} | {} | {:.2} ± {:.2} | {:.2} GiB |",
                    model_size as f64 / (1u64 << 30) as f64,
                    n_params as f64 / 1e9,
                    t.name(),
                    t.mean(),
                    t.stdev(),
                    rss as f64 / (1u64 << 30) as f64
                );
            }
        }
        Format::Json => {
            let rows: Vec<serde_json::Value> = tests
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "model_filename": name,
                        "model_size": model_size,
                        "model_n_params": n_params,
                        "n_threads": threads,
                        "n_batch": a.batch_size,
                        "n_prompt": t.n_prompt,
                        "n_gen": t.n_gen,
                        "n_depth": t.n_depth,
                        "type_k": kv_type,
                        "type_v": kv_type,
                        "avg_ts": t.mean(),
                        "stddev_ts": t.stdev(),
                        "samples_ts": t.samples_ts,
                        "kernel": kernel,
                        "peak_rss_bytes": rss,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Format::Csv => {
            println!("model_filename,model_size,model_n_params,n_threads,n_prompt,n_gen,avg_ts,stddev_ts,kernel,peak_rss_bytes,n_depth");
            for t in &tests {
                println!(
                    "{name},{model_size},{n_params},{threads},{},{},{:.4},{:.4},{kernel},{rss},{}",
                    t.n_prompt,
                    t.n_gen,
                    t.mean(),
                    t.stdev(),
                    t.n_depth
                );
            }
        }
    }
    Ok(())
}
