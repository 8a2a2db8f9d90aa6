//! `bitnet chat`: interactive multi-turn chat. The KV cache holds the conversation so far;
//! each turn prefills only the tokens the cache does not already hold.

use super::gen_flags::GenFlags;
use bitnet_inference::chat::ChatMessage;
use bitnet_inference::engine::LoadedEngineModel;
use bitnet_inference::generate::{GenerationConfig, SamplingStrategy, TokenStream};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face model directory (default: $BITNET_MODEL, else the
    /// bitnet-tiny model shipped in the repository).
    #[arg(short, long, env = "BITNET_MODEL")]
    model: Option<PathBuf>,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    gen: GenFlags,
    #[command(flatten)]
    model_flags: super::ModelFlags,
    /// Context size (default: the model's, at most 4096).
    #[arg(short = 'c', long = "ctx-size")]
    ctx_size: Option<usize>,
    /// Tokens per prefill batch.
    #[arg(short = 'b', long = "batch-size", default_value_t = 64)]
    batch_size: usize,
    /// Line-editing history file (default: ~/.bitnet_chat_history).
    #[arg(long)]
    history_file: Option<PathBuf>,
    /// Keep no history file.
    #[arg(long)]
    no_history: bool,
}

const HELP: &str = "commands:
  /reset        start a new conversation (keeps the system prompt)
  /system TEXT  set the system prompt
  /save FILE    write the conversation as JSON
  /help         this text
  /exit         quit (or Ctrl-D)
Ctrl-C stops the current answer.";

/// The conversation and what the KV cache holds.
struct Session {
    system: Option<String>,
    messages: Vec<ChatMessage>,
    /// Tokens whose keys and values are in slot 0.
    cached: Vec<u32>,
}

impl Session {
    fn conversation(&self) -> Vec<ChatMessage> {
        let mut all = Vec::with_capacity(self.messages.len() + 1);
        if let Some(s) = &self.system {
            all.push(ChatMessage::new("system", s.clone()));
        }
        all.extend(self.messages.iter().cloned());
        all
    }
}

enum Input {
    Editor(Box<rustyline::DefaultEditor>, Option<PathBuf>),
    Plain(std::io::StdinLock<'static>),
}

impl Input {
    /// The next line; None at the end of input.
    fn read(&mut self) -> anyhow::Result<Option<String>> {
        match self {
            Input::Editor(ed, _) => loop {
                match ed.readline("> ") {
                    Ok(line) => {
                        if !line.trim().is_empty() {
                            let _ = ed.add_history_entry(line.as_str());
                        }
                        return Ok(Some(line));
                    }
                    Err(rustyline::error::ReadlineError::Interrupted) => {
                        eprintln!("(Ctrl-D or /exit to quit)");
                        continue;
                    }
                    Err(rustyline::error::ReadlineError::Eof) => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
            },
            Input::Plain(stdin) => {
                let mut line = String::new();
                if stdin.read_line(&mut line)? == 0 {
                    return Ok(None);
                }
                Ok(Some(line.trim_end_matches(['\n', '\r']).to_string()))
            }
        }
    }

    fn save_history(&mut self) {
        if let Input::Editor(ed, Some(path)) = self {
            let _ = ed.save_history(path);
        }
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut m = super::load(&super::model_or_default(a.model.as_deref())?)?;
    a.model_flags.apply(&mut m.model)?;
    let template = m.chat_template()?;
    let mut config = a.gen.config(&m.generation, 512);
    if let SamplingStrategy::BeamSearch { .. } = config.strategy {
        eprintln!("note: chat streams its answers; --beams is ignored");
        config.strategy = SamplingStrategy::Sample;
    }
    let ctx = a.ctx_size.unwrap_or(4096).min(m.model.config.max_context);
    let mut state = m.model.new_state(1, ctx, a.batch_size)?;

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))?;
    }

    let interactive = std::io::stdin().is_terminal();
    let mut input = if interactive {
        let mut ed = rustyline::DefaultEditor::new()?;
        let history = match &a.history_file {
            _ if a.no_history => None,
            Some(p) => Some(p.clone()),
            None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".bitnet_chat_history")),
        };
        if let Some(h) = &history {
            let _ = ed.load_history(h);
        }
        Input::Editor(Box::new(ed), history)
    } else {
        Input::Plain(std::io::stdin().lock())
    };
    if interactive {
        eprintln!(
            "bitnet chat: {} (context {ctx}, kernel {}). /help for commands.",
            m.path.display(),
            m.model.kernel_name()
        );
    }

    let mut session = Session {
        system: a.system.clone(),
        messages: Vec::new(),
        cached: Vec::new(),
    };
    while let Some(line) = input.read()? {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            let arg = arg.trim();
            match name {
                "help" | "?" => println!("{HELP}"),
                "reset" => {
                    session.messages.clear();
                    session.cached.clear();
                    println!("[conversation reset]");
                }
                "system" => {
                    session.system = (!arg.is_empty()).then(|| arg.to_string());
                    println!(
                        "[system prompt {}]",
                        if arg.is_empty() { "removed" } else { "set" }
                    );
                }
                "save" => {
                    if arg.is_empty() {
                        println!("[usage: /save FILE]");
                    } else {
                        let json = serde_json::to_string_pretty(&session.conversation())?;
                        match std::fs::write(arg, json + "\n") {
                            Ok(()) => println!(
                                "[saved {} messages to {arg}]",
                                session.conversation().len()
                            ),
                            Err(e) => println!("[cannot write {arg}: {e}]"),
                        }
                    }
                }
                "exit" | "quit" => break,
                _ => println!("[unknown command /{name}; /help lists them]"),
            }
            continue;
        }
        session.messages.push(ChatMessage::new("user", line));
        interrupted.store(false, Ordering::SeqCst);
        match answer(
            &m,
            &template,
            &mut state,
            &mut session,
            &config,
            &interrupted,
        ) {
            Ok(text) => session.messages.push(ChatMessage::new("assistant", text)),
            Err(e) => {
                println!("[error: {e:#}; /reset starts a new conversation]");
                session.messages.pop();
            }
        }
    }
    input.save_history();
    Ok(())
}

/// Generates the assistant's answer to the conversation, streaming it to stdout.
fn answer(
    m: &LoadedEngineModel,
    template: &bitnet_inference::chat::ChatTemplate,
    state: &mut bitnet_inference::model::ForwardState,
    session: &mut Session,
    config: &GenerationConfig,
    interrupted: &AtomicBool,
) -> anyhow::Result<String> {
    let start = Instant::now();
    let rendered = template.render(&session.conversation(), true)?;
    let mut prompt = m.tokenizer.encode(&rendered, false)?;
    if let (true, Some(bos)) = (m.tokenizer.adds_bos(), m.tokenizer.bos_id()) {
        if prompt.first() != Some(&bos) {
            prompt.insert(0, bos);
        }
    }
    let reuse = session
        .cached
        .iter()
        .zip(&prompt)
        .take_while(|(a, b)| a == b)
        .count();
    // Until this turn ends, the cache holds only the common prefix for sure.
    session.cached.truncate(reuse);
    let stop_ids = config.stop_ids(&m.end_tokens);
    let mut stream =
        TokenStream::new(&m.model, &m.pieces, state, &prompt, reuse, config, stop_ids)?;
    let mut text = String::new();
    let mut stdout = std::io::stdout();
    let mut cancelled = false;
    loop {
        if interrupted.swap(false, Ordering::SeqCst) {
            stream.cancel();
            cancelled = true;
        }
        match stream.next_text()? {
            Some(piece) => {
                stdout.write_all(piece.as_bytes())?;
                stdout.flush()?;
                text.push_str(piece);
            }
            None => break,
        }
    }
    let stats = stream.stats();
    session.cached = stream.sequence().cached_tokens().to_vec();
    println!();
    eprintln!(
        "[{} tokens, {:.1} tok/s | prefill {} new tokens of {} ({} reused), {:.1} tok/s | {:.2} s{}]",
        stats.generated_tokens,
        stats.decode_tokens_per_second(),
        stats.prompt_tokens - stats.cached_tokens,
        stats.prompt_tokens,
        stats.cached_tokens,
        stats.prefill_tokens_per_second(),
        start.elapsed().as_secs_f64(),
        if cancelled { " | interrupted" } else { "" }
    );
    Ok(text)
}
