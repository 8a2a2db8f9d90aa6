//! `bitnet serve`: the OpenAI-compatible HTTP server (crate `bitnet-server`) on one model.

use bitnet_server::ServerConfig;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face model directory (default: $BITNET_MODEL, else the
    /// bitnet-tiny model shipped in the repository).
    #[arg(short, long, env = "BITNET_MODEL")]
    model: Option<PathBuf>,
    /// The model's name in the API (`model` in requests, `/v1/models`; default: the file or
    /// directory name).
    #[arg(long)]
    alias: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed on stdout).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests generated together, each with the whole --ctx-size (running KV slots);
    /// `auto`: as many as the --kv-cache budget holds (at most 256).
    #[arg(long, default_value = "8", value_parser = parse_parallel)]
    parallel: Parallel,
    /// Requests waiting for a slot at most; one more is refused with 429 and Retry-After.
    #[arg(long = "max-queue", default_value_t = 64, value_parser = super::in_range(1, 65536))]
    max_queue: usize,
    /// Tokens every request may use, prompt and completion together (default: the model's,
    /// at most 4096).
    #[arg(short = 'c', long = "ctx-size", value_parser = super::parse_ctx_size)]
    ctx_size: Option<usize>,
    /// KV cache memory for running requests and cached prefixes, in bytes (suffixes K, M, G;
    /// 1M to the machine's memory), or `auto` (a quarter of the memory available at start);
    /// divided into whole-context
    /// slots: more than --parallel slots' worth keeps more prefixes cached (default:
    /// --parallel slots; with --parallel auto, `auto`).
    #[arg(long = "kv-cache", value_parser = parse_kv_cache)]
    kv_cache: Option<KvCache>,
    /// Tokens per forward step at most (every running request's next token, then prompt
    /// chunks).
    #[arg(short = 'b', long = "batch-size", default_value_t = 256, value_parser = super::in_range(1, 65536))]
    batch_size: usize,
    /// An API key clients must send (`Authorization: Bearer KEY`); /health and /metrics
    /// need none.
    #[arg(
        long = "api-key",
        env = "BITNET_API_KEY",
        conflicts_with = "api_key_file"
    )]
    api_key: Option<String>,
    /// A file of API keys, one a line.
    #[arg(long = "api-key-file")]
    api_key_file: Option<PathBuf>,
    /// An origin browsers may call the API from (CORS; repeatable; `*` for any).
    #[arg(long = "cors-origin")]
    cors_origin: Vec<String>,
    /// Seconds in-flight requests may run on after SIGTERM/Ctrl-C; then they are cancelled.
    #[arg(long = "shutdown-timeout", default_value_t = 30.0, value_parser = parse_seconds)]
    shutdown_timeout: f64,
    /// Seconds a request's headers, and then its body, may take to arrive (408 after).
    #[arg(long = "request-timeout", default_value_t = 30.0, value_parser = parse_seconds)]
    request_timeout: f64,
    /// Request bodies larger than this many bytes are refused with 413 (suffixes K, M;
    /// 1K to 64M).
    #[arg(long = "max-body", default_value = "1M", value_parser = parse_max_body)]
    max_body: usize,
    /// Seconds without an event before a keep-alive comment on an event stream.
    #[arg(long = "keep-alive", default_value_t = 5.0, value_parser = parse_seconds)]
    keep_alive: f64,
    /// Open connections at most; more are closed at once.
    #[arg(long = "max-connections", default_value_t = 1024, value_parser = super::in_range(1, 1 << 20))]
    max_connections: usize,
    #[command(flatten)]
    model_flags: super::ModelFlags,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86400.0 => Ok(v),
        _ => Err(format!(
            "`{s}`: expected seconds, more than 0 and at most 86400"
        )),
    }
}

/// `--parallel`: a count, or `auto` (as many as the KV budget holds).
#[derive(Clone, Copy, Debug)]
struct Parallel(Option<usize>);

fn parse_parallel(s: &str) -> Result<Parallel, String> {
    if s.trim() == "auto" {
        return Ok(Parallel(None));
    }
    super::in_range(1, 1024)(s)
        .map(|n| Parallel(Some(n)))
        .map_err(|e| format!("{e}, or `auto`"))
}

#[derive(Clone, Copy, Debug)]
enum KvCache {
    Bytes(usize),
    Auto,
}

fn parse_kv_cache(s: &str) -> Result<KvCache, String> {
    if s.trim() == "auto" {
        return Ok(KvCache::Auto);
    }
    let max = total_memory().unwrap_or(1 << 40);
    bytes_in_range(s, 1 << 20, max)
        .map(KvCache::Bytes)
        .map_err(|e| format!("{e}, or `auto`"))
}

/// `--max-body`: 1 KiB (a small request) to 64 MiB (more text than any context holds; each
/// body read is held in memory, and its text may be tokenized at ~90 bytes a byte).
fn parse_max_body(s: &str) -> Result<usize, String> {
    bytes_in_range(s, 1 << 10, 64 << 20)
}

/// A byte count (as [`parse_bytes`]) in `lo..=hi`; the error says the accepted range.
fn bytes_in_range(s: &str, lo: usize, hi: usize) -> Result<usize, String> {
    let n = parse_bytes(s)?;
    if (lo..=hi).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "`{s}` ({n} bytes) is out of range (expected {} to {})",
            human_bytes(lo),
            human_bytes(hi)
        ))
    }
}

/// `n` bytes with the largest K/M/G suffix that divides it (as `parse_bytes` reads them).
fn human_bytes(n: usize) -> String {
    for (shift, suffix) in [(30, "G"), (20, "M"), (10, "K")] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", n >> shift);
        }
    }
    n.to_string()
}

/// The machine's memory (`MemTotal` of /proc/meminfo), where it can be read.
fn total_memory() -> Option<usize> {
    let t = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = t.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// `--kv-cache auto`: a quarter of the memory available now (`MemAvailable` of
/// /proc/meminfo), or 1 GiB where that cannot be read.
fn auto_kv_budget() -> usize {
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        let line = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        kb.checked_mul(1024)
    });
    available.map_or(1 << 30, |b| b / 4)
}

/// A byte count with an optional K/M/G suffix (powers of 1024); its range is checked by
/// [`bytes_in_range`].
fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1usize << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("`{s}`: expected a byte count such as 65536, 512K, 4M or 2G"))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = super::model_or_default(a.model.as_deref())?;
    let mut api_keys: Vec<String> = a.api_key.into_iter().collect();
    if let Some(f) = &a.api_key_file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| anyhow::anyhow!("cannot read --api-key-file {}: {e}", f.display()))?;
        api_keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
        if api_keys.is_empty() {
            anyhow::bail!("--api-key-file {} has no key", f.display());
        }
    }
    if api_keys.iter().any(|k| k.is_empty()) {
        anyhow::bail!("--api-key is empty");
    }
    let model_id = a.alias.clone().unwrap_or_else(|| {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_else(|| "model".into());
        name.strip_suffix(".gguf").map(String::from).unwrap_or(name)
    });
    let config = ServerConfig {
        host: a.host,
        port: a.port,
        model_id,
        parallel: a.parallel.0,
        max_queue: a.max_queue,
        ctx_size: a.ctx_size,
        kv_cache_bytes: match (a.kv_cache, a.parallel.0) {
            (Some(KvCache::Bytes(b)), _) => Some(b),
            (Some(KvCache::Auto), _) | (None, None) => Some(auto_kv_budget()),
            (None, Some(_)) => None,
        },
        step_tokens: a.batch_size,
        api_keys,
        cors_origins: a.cors_origin,
        shutdown_timeout: Duration::from_secs_f64(a.shutdown_timeout),
        max_body_bytes: a.max_body,
        request_timeout: Duration::from_secs_f64(a.request_timeout),
        keep_alive: Duration::from_secs_f64(a.keep_alive),
        max_connections: a.max_connections,
    };
    let options = a.model_flags.options();
    let ctx_size = a.ctx_size;
    bitnet_server::run(config, move || {
        let m = super::load_with(&path, &options)?;
        // A context larger than the model's is an error naming both.
        super::context_size(ctx_size, &m.model, 4096)?;
        Ok(m)
    })
}
