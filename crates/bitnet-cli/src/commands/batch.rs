//! `bitnet batch`: many prompts from a file, generated together by the library's
//! continuous-batching scheduler (one forward call per step; an item is admitted as soon as a
//! slot frees up; prompts sharing a prefix reuse its KV), each result written and flushed as
//! soon as it finishes.

use super::gen_flags::GenFlags;
use bitnet_inference::chat::ChatMessage;
use bitnet_inference::engine::LoadedEngineModel;
use bitnet_inference::generate::{beam_search, GenerationConfig, SamplingStrategy};
use bitnet_inference::scheduler::{
    DynamicBatchProcessor, Event, Request, RequestStream, SchedulerConfig, Usage,
};
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face model directory (default: $BITNET_MODEL, else the
    /// bitnet-tiny model shipped in the repository).
    #[arg(short, long, env = "BITNET_MODEL")]
    model: Option<PathBuf>,
    /// Input: JSONL (`{"id": .., "prompt": .. | "messages": [..], options..}` a line) or plain
    /// text (one prompt a line).
    #[arg(short, long)]
    input: PathBuf,
    /// Output: JSONL or CSV (by extension, or --format). Ids already in it are skipped.
    #[arg(short, long)]
    output: PathBuf,
    /// Output format (default: from the extension of --output; .csv is CSV, else JSONL).
    #[arg(long, value_parser = ["jsonl", "csv"])]
    format: Option<String>,
    /// Sequences generated together (KV slots).
    #[arg(long, default_value_t = 8, value_parser = super::in_range(1, 1024))]
    parallel: usize,
    /// Context size of each sequence (default: the model's, at most 2048).
    #[arg(short = 'c', long = "ctx-size", value_parser = super::parse_ctx_size)]
    ctx_size: Option<usize>,
    /// Tokens per forward call at most (decode tokens of every sequence plus prompt chunks).
    #[arg(short = 'b', long = "batch-size", default_value_t = 256, value_parser = super::in_range(1, 65536))]
    batch_size: usize,
    #[command(flatten)]
    gen: GenFlags,
    /// Every item's output held to JSON (`--json`) or to a schema (`--json-schema FILE`).
    #[command(flatten)]
    json: super::JsonFlags,
    #[command(flatten)]
    model_flags: super::ModelFlags,
}

/// An item the scheduler is generating, and what it has sent so far.
struct Running {
    id: Value,
    stream: RequestStream,
    text: String,
    tokens: usize,
}

/// One line of the input, parsed.
struct Item {
    id: Value,
    prompt: Vec<u32>,
    config: GenerationConfig,
}

/// The text form of an id, for resuming.
fn id_key(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn get_f32(o: &Map<String, Value>, key: &str) -> anyhow::Result<Option<f32>> {
    o.get(key)
        .filter(|v| !v.is_null())
        .map(|v| {
            v.as_f64()
                .map(|f| f as f32)
                .ok_or_else(|| anyhow::anyhow!("`{key}` must be a number, got {v}"))
        })
        .transpose()
}

fn get_u64(o: &Map<String, Value>, key: &str) -> anyhow::Result<Option<u64>> {
    o.get(key)
        .filter(|v| !v.is_null())
        .map(|v| {
            v.as_u64()
                .ok_or_else(|| anyhow::anyhow!("`{key}` must be a non-negative integer, got {v}"))
        })
        .transpose()
}

/// Applies the OpenAI-named options of an item over the command line's config.
fn item_config(
    o: &Map<String, Value>,
    base: &GenerationConfig,
) -> anyhow::Result<GenerationConfig> {
    let mut c = base.clone();
    if let Some(n) = get_u64(o, "max_tokens")?.or(get_u64(o, "max_completion_tokens")?) {
        c.max_new_tokens = n as usize;
    }
    if let Some(t) = get_f32(o, "temperature")? {
        c.temperature = t;
    }
    if let Some(p) = get_f32(o, "top_p")? {
        c.top_p = p;
    }
    if let Some(k) = get_u64(o, "top_k")? {
        c.top_k = k as usize;
    }
    if let Some(p) = get_f32(o, "min_p")? {
        c.min_p = p;
    }
    if let Some(p) = get_f32(o, "typical_p")? {
        c.typical_p = p;
    }
    if let Some(p) = get_f32(o, "repetition_penalty")? {
        c.repetition_penalty = p;
    }
    if let Some(p) = get_f32(o, "presence_penalty")? {
        c.presence_penalty = p;
    }
    if let Some(p) = get_f32(o, "frequency_penalty")? {
        c.frequency_penalty = p;
    }
    if let Some(s) = get_u64(o, "seed")? {
        c.seed = s;
    }
    match o.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => c.stop_strings = vec![s.clone()],
        Some(Value::Array(a)) => {
            c.stop_strings = a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| anyhow::anyhow!("`stop` entries must be strings, got {v}"))
                })
                .collect::<anyhow::Result<_>>()?
        }
        Some(v) => anyhow::bail!("`stop` must be a string or a list of strings, got {v}"),
    }
    if let Some(b) = o.get("logit_bias").filter(|v| !v.is_null()) {
        let map = b
            .as_object()
            .ok_or_else(|| anyhow::anyhow!("`logit_bias` must be an object of token id to bias"))?;
        c.logit_bias = map
            .iter()
            .map(|(k, v)| {
                let id: u32 = k
                    .parse()
                    .map_err(|_| anyhow::anyhow!("`logit_bias` key `{k}` is not a token id"))?;
                let bias = v
                    .as_f64()
                    .ok_or_else(|| anyhow::anyhow!("`logit_bias` value of {k} must be a number"))?;
                Ok((id, bias as f32))
            })
            .collect::<anyhow::Result<_>>()?;
    }
    if let Some(n) = get_u64(o, "n")? {
        anyhow::ensure!(
            n == 1,
            "`n` = {n}: only one completion per item is supported"
        );
    }
    Ok(c)
}

/// The keys an input item may have.
const KNOWN_KEYS: [&str; 17] = [
    "id",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "logit_bias",
    "n",
];

/// Levenshtein distance, to suggest the key a typo meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// An error for the first key of `o` that is not an option this command knows.
fn check_keys(o: &Map<String, Value>) -> anyhow::Result<()> {
    if let Some(k) = o.keys().find(|k| !KNOWN_KEYS.contains(&k.as_str())) {
        let near = KNOWN_KEYS
            .iter()
            .min_by_key(|known| edit_distance(k, known))
            .filter(|known| edit_distance(k, known) <= 2)
            .map(|known| format!(" (did you mean `{known}`?)"))
            .unwrap_or_default();
        anyhow::bail!(
            "unknown key `{k}`{near}; the keys are {}",
            KNOWN_KEYS.join(", ")
        );
    }
    Ok(())
}

/// Parses one JSONL line into an item (or the id and the reason it is bad).
fn parse_json_item(
    m: &LoadedEngineModel,
    line: &str,
    line_no: usize,
    base: &GenerationConfig,
    ctx: usize,
) -> Result<Item, (Value, String)> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| (json!(line_no), format!("line {line_no}: not JSON: {e}")))?;
    let o = v
        .as_object()
        .ok_or_else(|| (json!(line_no), format!("line {line_no}: not a JSON object")))?;
    let id = o.get("id").cloned().unwrap_or(json!(line_no));
    let fail = |msg: String| (id.clone(), msg);
    check_keys(o).map_err(|e| fail(format!("item {id} (line {line_no}): {e}")))?;
    let config = item_config(o, base).map_err(|e| fail(e.to_string()))?;
    let prompt = match (o.get("prompt"), o.get("messages")) {
        (Some(Value::String(p)), None) => m
            .encode_prompt_within(p, ctx)
            .map_err(|e| fail(e.to_string()))?,
        (None, Some(msgs)) => {
            let msgs: Vec<ChatMessage> = serde_json::from_value(msgs.clone()).map_err(|e| {
                fail(format!(
                    "`messages` must be a list of {{role, content}}: {e}"
                ))
            })?;
            m.encode_chat_within(&msgs, ctx)
                .map_err(|e| fail(e.to_string()))?
        }
        (Some(_), Some(_)) => return Err(fail("give `prompt` or `messages`, not both".into())),
        (Some(p), None) => return Err(fail(format!("`prompt` must be a string, got {p}"))),
        (None, None) => return Err(fail("no `prompt` or `messages`".into())),
    };
    Ok(Item { id, prompt, config })
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Jsonl,
    Csv,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The CSV records of `text` (quoted fields may hold newlines and commas): each one's text
/// (without its newline) and fields.
fn csv_records(text: &str) -> Vec<(&str, Vec<String>)> {
    let mut out = Vec::new();
    let (mut fields, mut field) = (Vec::new(), String::new());
    let (mut in_quotes, mut start) = (false, 0);
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' if in_quotes && chars.peek().is_some_and(|&(_, n)| n == '"') => {
                chars.next();
                field.push('"');
            }
            '"' => in_quotes = !in_quotes,
            ',' if !in_quotes => fields.push(std::mem::take(&mut field)),
            '\n' if !in_quotes => {
                fields.push(std::mem::take(&mut field));
                let raw = text[start..i].strip_suffix('\r').unwrap_or(&text[start..i]);
                out.push((raw, std::mem::take(&mut fields)));
                start = i + 1;
            }
            _ => field.push(c),
        }
    }
    out
}

const CSV_HEADER: &str = "id,text,error,finish_reason,prompt_tokens,completion_tokens\n";

/// One row of an existing output: its raw text, and its id and whether it is an error row
/// (None for a line that is not a row, such as a truncated last line or the CSV header).
type OutputRow<'a> = (&'a str, Option<(String, bool)>);

/// The rows of an existing output (a truncated last line is not a row).
fn output_rows(text: &str, format: Format) -> Vec<OutputRow<'_>> {
    match format {
        Format::Jsonl => text
            .lines()
            .map(|l| {
                let row = serde_json::from_str::<Value>(l).ok().and_then(|v| {
                    let error = v.get("error").is_some_and(|e| !e.is_null());
                    v.get("id").map(|id| (id_key(id), error))
                });
                (l, row)
            })
            .collect(),
        Format::Csv => {
            // Only complete records (ending with a newline) count.
            let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            let mut rows: Vec<OutputRow<'_>> = csv_records(complete)
                .into_iter()
                .enumerate()
                .map(|(i, (raw, f))| {
                    let row = (i > 0 && !f.is_empty()).then(|| {
                        let error = f.get(2).is_some_and(|e| !e.is_empty());
                        (f[0].clone(), error)
                    });
                    (raw, row)
                })
                .collect();
            let rest = &text[complete.len()..];
            if !rest.is_empty() {
                rows.push((rest, None));
            }
            rows
        }
    }
}

/// What an earlier run left in `path`: the ids done (rows without an error) and the ids that
/// failed (to be tried again).
fn previous_results(
    path: &Path,
    format: Format,
) -> anyhow::Result<(HashSet<String>, HashSet<String>)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
    };
    let (mut done, mut failed) = (HashSet::new(), HashSet::new());
    for (_, row) in output_rows(&text, format) {
        match row {
            Some((id, false)) => {
                done.insert(id);
            }
            Some((id, true)) => {
                failed.insert(id);
            }
            None => {}
        }
    }
    failed.retain(|id| !done.contains(id));
    Ok((done, failed))
}

/// Removes the error rows of `retry` from `path` (they are about to be tried again), by
/// writing the rest beside it and renaming.
fn drop_error_rows(path: &Path, format: Format, retry: &HashSet<String>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    // An incomplete last row is left out (`Output::open` would drop it too).
    let text = &text[..complete_len(text.as_bytes(), format)];
    let mut kept = String::with_capacity(text.len());
    for (raw, row) in output_rows(text, format) {
        if matches!(&row, Some((id, true)) if retry.contains(id)) {
            continue;
        }
        kept.push_str(raw);
        kept.push('\n');
    }
    replace_file(path, kept.as_bytes())
}

struct Output {
    file: std::fs::File,
    format: Format,
    path: PathBuf,
}

/// The length of `text`'s complete rows: up to the last newline that ends a row (for CSV,
/// one outside quotes: a quoted field may hold newlines).
fn complete_len(text: &[u8], format: Format) -> usize {
    match format {
        Format::Jsonl => text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1),
        Format::Csv => {
            let (mut in_quotes, mut end) = (false, 0);
            for (i, &b) in text.iter().enumerate() {
                match b {
                    b'"' => in_quotes = !in_quotes,
                    b'\n' if !in_quotes => end = i + 1,
                    _ => {}
                }
            }
            end
        }
    }
}

/// Replaces `path` by `bytes` atomically: written beside it, synced, renamed over it.
fn replace_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.partial",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

impl Output {
    /// Opens `path` for appending rows. Rows are appended whole (one write each, synced to
    /// disk), so the file only ever holds complete rows; if a crash or a full disk left an
    /// incomplete last row, it is dropped first (its item runs again).
    fn open(path: &Path, format: Format) -> anyhow::Result<Self> {
        let existing = std::fs::read(path).unwrap_or_default();
        let complete = complete_len(&existing, format);
        if complete < existing.len() {
            eprintln!(
                "{}: dropping an incomplete last row ({} bytes) that an interrupted run left; \
                 its item runs again",
                path.display(),
                existing.len() - complete
            );
            replace_file(path, &existing[..complete])?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if complete == 0 && format == Format::Csv {
            file.write_all(CSV_HEADER.as_bytes())
                .and_then(|_| file.sync_data())
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        Ok(Output {
            file,
            format,
            path: path.to_path_buf(),
        })
    }

    fn write(&mut self, row: &Value) -> anyhow::Result<()> {
        let line = match self.format {
            Format::Jsonl => format!("{row}\n"),
            Format::Csv => {
                let f = |k: &str| match row.get(k) {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => csv_field(s),
                    Some(v) => csv_field(&v.to_string()),
                };
                format!(
                    "{},{},{},{},{},{}\n",
                    f("id"),
                    f("text"),
                    f("error"),
                    f("finish_reason"),
                    f("prompt_tokens"),
                    f("completion_tokens")
                )
            }
        };
        // One write of the whole row, then synced: a row is on disk entirely or not at all
        // (but for a power loss mid-write, which `open` repairs).
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))
    }
}

fn error_row(id: &Value, msg: &str) -> Value {
    json!({"id": id, "error": msg, "finish_reason": "error"})
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let format = match a.format.as_deref() {
        Some("csv") => Format::Csv,
        Some(_) => Format::Jsonl,
        None if a
            .output
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv")) =>
        {
            Format::Csv
        }
        None => Format::Jsonl,
    };
    let input =
        std::fs::File::open(&a.input).map_err(|e| anyhow::anyhow!("{}: {e}", a.input.display()))?;
    let lines: Vec<String> = std::io::BufReader::new(input)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.input.display()))?;
    let is_jsonl = a
        .input
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json")
        || lines
            .iter()
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| l.trim_start().starts_with('{'));

    let m = super::load_with(
        &super::model_or_default(a.model.as_deref())?,
        &a.model_flags.options(),
    )?;
    let base = a.gen.config(&m.generation, 128);
    let constraint = a.json.constraint(&m)?;
    let (done, failed) = previous_results(&a.output, format)?;
    // The context the scheduler will use (below): prompts longer are error rows, refused
    // before they are tokenized when their length in bytes already says so.
    let ctx = super::context_size(a.ctx_size, &m.model, 2048)?;

    // Parse everything first: bad lines become error rows at once.
    let mut queue: VecDeque<Item> = VecDeque::new();
    let mut bad: Vec<(Value, String)> = Vec::new();
    let mut retried: HashSet<String> = HashSet::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    let mut repeated: HashSet<String> = HashSet::new();
    let (mut skipped, mut errors, mut total) = (0usize, 0usize, 0usize);
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_no = i + 1;
        let parsed = if is_jsonl {
            parse_json_item(&m, line, line_no, &base, ctx)
        } else {
            m.encode_prompt_within(line, ctx)
                .map(|prompt| Item {
                    id: json!(line_no),
                    prompt,
                    config: base.clone(),
                })
                .map_err(|e| (json!(line_no), e.to_string()))
        };
        let id = match &parsed {
            Ok(item) => &item.id,
            Err((id, _)) => id,
        };
        let key = id_key(id);
        // Ids key the output and resuming: a second item with an id already used in this
        // input (explicitly, or as the line-number default) is an error, never run as if
        // it were the first.
        if let Some(&first) = first_line.get(&key) {
            let msg = format!(
                "line {line_no}: id {key} is already the id of line {first}; ids must be unique \
                 (give this item its own \"id\")"
            );
            total += 1;
            bad.push((id.clone(), msg));
            // This run writes the complaint again: last run's copy goes.
            repeated.insert(key);
            continue;
        }
        first_line.insert(key.clone(), line_no);
        if done.contains(&key) {
            skipped += 1;
            continue;
        }
        if failed.contains(&key) {
            retried.insert(key);
        }
        total += 1;
        match parsed {
            Ok(item) => queue.push_back(item),
            Err(e) => bad.push(e),
        }
    }
    // Items that failed before are tried again, and repeated ids are reported again: their
    // old error rows go.
    let stale: HashSet<String> = retried.union(&repeated).cloned().collect();
    if !stale.is_empty() && a.output.exists() {
        drop_error_rows(&a.output, format, &stale)?;
    }
    let mut out = Output::open(&a.output, format)?;
    for (id, msg) in bad {
        out.write(&error_row(&id, &msg))?;
        errors += 1;
    }

    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} items | {per_sec} | ETA {eta} | {msg}",
    )?);
    bar.inc(errors as u64);
    if skipped > 0 {
        bar.println(format!(
            "skipping {skipped} items already in {}",
            a.output.display()
        ));
    }
    if !retried.is_empty() {
        bar.println(format!(
            "trying again {} items that failed before",
            retried.len()
        ));
    }

    let slots = a.parallel.max(1);
    let scheduler = SchedulerConfig {
        max_running: slots,
        // Items are handed over as slots free up: `slots` running, `slots` waiting.
        max_queue: 2 * slots,
        context_size: Some(ctx),
        step_tokens: a.batch_size.max(slots),
        kv_cache_bytes: None,
        prefix_cache: true,
    };
    let mut processor = DynamicBatchProcessor::new(Arc::new(m), &scheduler)?;
    let m = processor.model().clone();
    let ctx = processor.context_size();
    let mut beam_state = None;
    let mut running: Vec<Running> = Vec::with_capacity(2 * slots);
    let start = Instant::now();
    let mut tokens_out = 0usize;
    loop {
        // Hand items to the scheduler while it has room; beam search runs here, alone.
        while running.len() < 2 * slots {
            let Some(item) = queue.pop_front() else { break };
            if let SamplingStrategy::BeamSearch { beams, .. } = item.config.strategy {
                if constraint.is_some() {
                    out.write(&error_row(
                        &item.id,
                        "--json and --json-schema do not work with beam search",
                    ))?;
                    errors += 1;
                    bar.inc(1);
                    continue;
                }
                let st = match &mut beam_state {
                    Some(s) => s,
                    None => {
                        beam_state.insert(m.model.new_state(beams, ctx, a.batch_size.max(beams))?)
                    }
                };
                let stop = item.config.stop_ids(&m.end_tokens);
                let row = match beam_search(
                    &m.model,
                    &m.pieces,
                    st,
                    &item.prompt,
                    &item.config,
                    &stop,
                ) {
                    Ok(g) => {
                        tokens_out += g.tokens.len();
                        json!({"id": item.id, "text": g.text, "finish_reason": g.finish_reason.as_str(),
                               "prompt_tokens": item.prompt.len(), "completion_tokens": g.tokens.len()})
                    }
                    Err(e) => {
                        errors += 1;
                        error_row(&item.id, &e.to_string())
                    }
                };
                out.write(&row)?;
                bar.inc(1);
                continue;
            }
            let mut request = Request::new(item.prompt, item.config);
            if let Some(c) = &constraint {
                request = request.with_constraint(c.clone());
            }
            match processor.submit(request) {
                Ok(stream) => running.push(Running {
                    id: item.id,
                    stream,
                    text: String::new(),
                    tokens: 0,
                }),
                Err(e) => {
                    out.write(&error_row(&item.id, &e.to_string()))?;
                    errors += 1;
                    bar.inc(1);
                }
            }
        }
        if running.is_empty() && queue.is_empty() {
            break;
        }
        processor.step();
        let mut i = 0;
        while i < running.len() {
            let r = &mut running[i];
            let mut row = None;
            while let Some(event) = r.stream.try_recv() {
                match event {
                    Event::Token { text, .. } => {
                        r.text.push_str(&text);
                        r.tokens += 1;
                    }
                    Event::Finished {
                        text,
                        reason,
                        stats,
                    } => {
                        let usage = Usage::of(&stats);
                        r.text.push_str(&text);
                        row = Some(
                            json!({"id": r.id, "text": r.text, "finish_reason": reason.as_str(),
                            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}),
                        );
                    }
                    Event::Error(e) => {
                        errors += 1;
                        row = Some(error_row(&r.id, &e.to_string()));
                    }
                }
            }
            let Some(row) = row else {
                i += 1;
                continue;
            };
            tokens_out += r.tokens;
            out.write(&row)?;
            running.swap_remove(i);
            bar.inc(1);
            bar.set_message(format!(
                "{:.1} tok/s",
                tokens_out as f64 / start.elapsed().as_secs_f64().max(1e-9)
            ));
        }
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{total} items ({errors} errors, {skipped} skipped) in {secs:.2} s | {tokens_out} tokens generated, {:.1} tok/s | {slots} sequences at a time",
        tokens_out as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// The JSONL batch reader as a fuzz target (issue 18): item lines and earlier outputs,
/// mutated from valid ones; run by this module's test and by `crates/bitnet-fuzz` (both of
/// its drivers). A panic is the finding.
pub mod fuzz {
    use super::*;
    use bitnet_inference::rng::Rng;

    /// Valid lines the mutations start from.
    pub const SEEDS: [&str; 8] = [
        r#"{"id": "a", "prompt": "hello", "max_tokens": 12}"#,
        r#"{"id": 7, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}"#,
        r#"{"prompt": "x", "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 3}"#,
        r#"{"id": "s", "prompt": "y", "stop": ["\n", "."], "logit_bias": {"5": -100}}"#,
        r#"{"id": "b", "prompt": "z", "beams": 2, "max_completion_tokens": 3}"#,
        r#"{"id": null, "prompt": "", "repetition_penalty": 1.1, "min_p": 0.05}"#,
        r#"{"id": [1], "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}"#,
        "plain text prompt",
    ];

    const EDGES: [&str; 20] = [
        "-1",
        "0",
        "1e309",
        "-0",
        "NaN",
        "null",
        "[]",
        "{}",
        "\"\"",
        "4294967296",
        "18446744073709551616",
        "1e-320",
        "true",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "[[[[[[",
        "}",
        "\"🦀\"",
        "9999999999999999999999",
        "0.5",
    ];

    fn below(rng: &mut Rng, n: usize) -> usize {
        (rng.next_u64() % n.max(1) as u64) as usize
    }

    /// One to four mutations of `line`: bit flips, edge values inserted, bytes deleted, a
    /// known key given an edge value, truncation.
    pub fn mutate(rng: &mut Rng, line: &str) -> String {
        let mut b = line.as_bytes().to_vec();
        for _ in 0..1 + below(rng, 4) {
            let len = b.len();
            match below(rng, 5) {
                0 if len > 0 => {
                    let i = below(rng, len);
                    b[i] ^= 1 << below(rng, 8);
                }
                1 => {
                    let at = below(rng, len + 1);
                    let e = EDGES[below(rng, EDGES.len())];
                    b.splice(at..at, e.bytes());
                }
                2 if len > 0 => {
                    let at = below(rng, len);
                    let n = 1 + below(rng, (len - at).min(16));
                    b.drain(at..at + n);
                }
                3 => {
                    // A known key with an edge value.
                    let key = KNOWN_KEYS[below(rng, KNOWN_KEYS.len())];
                    let e = EDGES[below(rng, EDGES.len())];
                    let at = b.iter().position(|&c| c == b'{').map_or(0, |i| i + 1);
                    let ins = format!("\"{key}\": {e}, ");
                    b.splice(at..at, ins.bytes());
                }
                _ => b.truncate(below(rng, len + 1)),
            }
        }
        String::from_utf8_lossy(&b).into_owned()
    }

    /// The context the target reads items for (a prompt must fit it).
    const CONTEXT: usize = 128;

    /// One line read as `bitnet batch` reads it: as an input item (for model `m`, whose
    /// prompt must fit a 128-token context), and as an earlier output (JSONL and CSV) being
    /// resumed. Returns the item's outcome: its error, or `ok` and its config's validation.
    pub fn line(m: &LoadedEngineModel, line: &str) -> String {
        let base = GenerationConfig::default();
        let outcome = match parse_json_item(m, line, 1, &base, CONTEXT) {
            Ok(item) => {
                // (An empty prompt is refused when it is submitted.)
                assert!(item.prompt.len() <= CONTEXT, "{line}");
                item.config.validate().map_or_else(|e| e, |_| "ok".into())
            }
            Err((_, e)) => e,
        };
        for format in [Format::Jsonl, Format::Csv] {
            let text = format!("{line}\n{line}");
            let rows = output_rows(&text, format);
            let n = complete_len(text.as_bytes(), format);
            assert!(n <= text.len());
            assert!(rows.len() <= text.len() + 1);
        }
        outcome
    }

    /// Runs for `BITNET_FUZZ_SECONDS` (default 3); a panic fails the test.
    #[cfg(test)]
    #[test]
    fn jsonl_items_and_outputs_never_panic() {
        let seconds: f64 = std::env::var("BITNET_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0);
        let seed = std::env::var("BITNET_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../bitnet-inference/tests/fixtures/bitnet-packed");
        let m = LoadedEngineModel::load(&fixture).unwrap();
        let mut rng = Rng::new(seed);
        let mut corpus: Vec<String> = SEEDS.iter().map(|s| s.to_string()).collect();
        let mut seen = HashSet::new();
        let (mut execs, mut ok) = (0u64, 0u64);
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < seconds {
            let parent = below(&mut rng, corpus.len());
            let text = mutate(&mut rng, &corpus[parent]);
            execs += 1;
            let outcome = line(&m, &text);
            ok += u64::from(outcome == "ok");
            let sig: String = outcome
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .take(60)
                .collect();
            if seen.insert(sig) && corpus.len() < 1000 {
                corpus.push(text);
            }
        }
        eprintln!(
            "jsonl fuzz: {execs} lines in {:.0} s, {ok} parsed into valid items, corpus {} ({} seeds)",
            start.elapsed().as_secs_f64(),
            corpus.len(),
            SEEDS.len()
        );
        assert!(execs > 100, "only {execs} executions");
    }
}
