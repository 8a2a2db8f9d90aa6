//! `bitnet chat`: interactive multi-turn chat, a client of the library's scheduler. The
//! conversation is kept as the token ids the model saw and generated (not re-tokenized from
//! text, which can split an answer differently), and the scheduler's prefix cache holds their
//! keys and values: each turn prefills only the new user turn.
//! When the context fills, the oldest exchanges are left out (or, mid-answer, the window
//! slides), with a note, unless `--no-context-shift`.

use super::gen_flags::GenFlags;
use bitnet_inference::chat::ChatMessage;
use bitnet_inference::engine::LoadedEngineModel;
use bitnet_inference::generate::{ContextOverflow, GenerationConfig, SamplingStrategy};
use bitnet_inference::scheduler::{DynamicBatchProcessor, Event, Request, SchedulerConfig};
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
    /// Read the system prompt from this file.
    #[arg(long, value_name = "FILE", conflicts_with = "system")]
    system_file: Option<PathBuf>,
    #[command(flatten)]
    gen: GenFlags,
    #[command(flatten)]
    model_flags: super::ModelFlags,
    /// Context size (default: the model's, at most 4096).
    #[arg(short = 'c', long = "ctx-size", value_parser = super::parse_ctx_size)]
    ctx_size: Option<usize>,
    /// Tokens per prefill batch.
    #[arg(short = 'b', long = "batch-size", default_value_t = 64, value_parser = super::in_range(1, 65536))]
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
    /// Messages at the start of `messages` the model no longer sees (left out when the
    /// context was full); `/save` still writes them.
    dropped: usize,
    /// The conversation as the model saw it: the last turn's prompt and the ids it generated
    /// (after any slide of the window). Empty: the next turn renders the whole conversation.
    history: Vec<u32>,
    /// The template's text of the last turn's prompt, to check that the template renders
    /// the past the same way before `history` is extended.
    history_text: String,
}

/// Stands for the last answer while the template renders what follows it.
const ANSWER_MARK: &str = "\u{E000}bitnet-chat-answer\u{E001}";

impl Session {
    fn new(system: Option<String>) -> Self {
        Session {
            system,
            messages: Vec::new(),
            dropped: 0,
            history: Vec::new(),
            history_text: String::new(),
        }
    }

    /// Every message, those left out of the context included.
    fn conversation(&self) -> Vec<ChatMessage> {
        self.conversation_from(0)
    }

    /// The messages the model sees.
    fn visible(&self) -> Vec<ChatMessage> {
        self.conversation_from(self.dropped)
    }

    fn conversation_from(&self, first: usize) -> Vec<ChatMessage> {
        let mut all = Vec::with_capacity(self.messages.len() + 1);
        if let Some(s) = &self.system {
            all.push(ChatMessage::new("system", s.clone()));
        }
        all.extend(
            self.messages[first.min(self.messages.len())..]
                .iter()
                .cloned(),
        );
        all
    }

    fn reset(&mut self) {
        self.messages.clear();
        self.dropped = 0;
        self.history.clear();
        self.history_text.clear();
    }

    /// The text to append to `history` for the visible conversation (which ends with the new
    /// user message after the last answer), when the template renders the past exactly as it
    /// did for the last turn: the rest of the last answer's turn (say, its end token) and
    /// the new user turn with the assistant's opening. None otherwise.
    fn continuation(
        &self,
        template: &bitnet_inference::chat::ChatTemplate,
    ) -> anyhow::Result<Option<String>> {
        let mut conv = self.visible();
        let n = conv.len();
        if self.history.is_empty() || n < 2 || conv[n - 2].role != "assistant" {
            return Ok(None);
        }
        conv[n - 2].content = ANSWER_MARK.to_string();
        let text = template.render(&conv, true)?;
        let Some(at) = text.find(ANSWER_MARK) else {
            return Ok(None);
        };
        if text[..at] != self.history_text || text[at + ANSWER_MARK.len()..].contains(ANSWER_MARK) {
            return Ok(None);
        }
        Ok(Some(text[at + ANSWER_MARK.len()..].to_string()))
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

    /// Saves the line-editing history; a failure is said on stderr (the conversation itself
    /// is not lost: it was printed), naming the file.
    fn save_history(&mut self) {
        if let Input::Editor(ed, Some(path)) = self {
            if let Err(e) = ed.save_history(path) {
                eprintln!(
                    "warning: the chat history could not be saved to {}: {e}",
                    path.display()
                );
            }
        }
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let m = super::load_with(
        &super::model_or_default(a.model.as_deref())?,
        &a.model_flags.options(),
    )?;
    let template = m.chat_template()?;
    let mut config = a.gen.config(&m.generation, 512);
    if let SamplingStrategy::BeamSearch { .. } = config.strategy {
        eprintln!("note: chat streams its answers; --beams is ignored");
        config.strategy = SamplingStrategy::Sample;
    }
    let shift = a.gen.context_shift(true);
    if shift {
        config.context_overflow = ContextOverflow::Slide { keep: a.gen.keep };
    }
    let ctx = super::context_size(a.ctx_size, &m.model, 4096)?;
    let scheduler = SchedulerConfig {
        max_running: 1,
        max_queue: 1,
        context_size: Some(ctx),
        step_tokens: a.batch_size,
        kv_cache_bytes: None,
        prefix_cache: true,
    };
    let mut processor = DynamicBatchProcessor::new(Arc::new(m), &scheduler)?;
    let m = processor.model().clone();

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
        if let Some(h) = history.as_ref().filter(|h| h.exists()) {
            if let Err(e) = ed.load_history(h) {
                eprintln!(
                    "warning: the chat history {} could not be read ({e}); starting without it",
                    h.display()
                );
            }
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

    let system = match &a.system_file {
        Some(f) => Some(super::read_prompt(None, Some(f))?),
        None => a.system.clone(),
    };
    // A message longer than this cannot fit the context: refused before it is rendered or
    // tokenized (which costs memory in proportion).
    let max_message_bytes = m.tokenizer.max_text_bytes(ctx);
    if let Some(s) = system.as_ref().filter(|s| s.len() > max_message_bytes) {
        anyhow::bail!(
            "the system prompt is {} bytes, more than the context of {ctx} tokens can hold (at \
             most {max_message_bytes} bytes with this vocabulary)",
            s.len()
        );
    }
    let mut session = Session::new(system);
    // Piped input: a failed turn makes the exit status non-zero (the other turns still run).
    let (mut turns, mut failed) = (0usize, 0usize);
    let turn = Turn {
        m: &m,
        template: &template,
        config: &config,
        context: ctx,
        shift,
    };
    while let Some(line) = input.read()? {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        turns += 1;
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            let arg = arg.trim();
            match name {
                "help" | "?" => println!("{HELP}"),
                "reset" => {
                    session.reset();
                    println!("[conversation reset]");
                }
                "system" => {
                    session.system = (!arg.is_empty()).then(|| arg.to_string());
                    session.history.clear();
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
                            Err(e) => {
                                failed += 1;
                                eprintln!("[error: cannot write {arg}: {e}]")
                            }
                        }
                    }
                }
                "exit" | "quit" => break,
                _ => {
                    failed += 1;
                    eprintln!("[error: unknown command /{name}; /help lists them]")
                }
            }
            continue;
        }
        if line.len() > max_message_bytes {
            // Refused before it is rendered or tokenized (which costs memory in proportion).
            failed += 1;
            eprintln!(
                "[error: the message is {} bytes, more than the context of {ctx} tokens can \
                 hold (at most {max_message_bytes} bytes with this vocabulary)]",
                line.len()
            );
            continue;
        }
        session.messages.push(ChatMessage::new("user", line));
        interrupted.store(false, Ordering::SeqCst);
        match turn.answer(&mut processor, &mut session, &interrupted) {
            Ok(text) => session.messages.push(ChatMessage::new("assistant", text)),
            Err(e) => {
                failed += 1;
                eprintln!("[error: {e:#}; /reset starts a new conversation]");
                session.messages.pop();
                session.dropped = session.dropped.min(session.messages.len());
            }
        }
    }
    input.save_history();
    if failed > 0 && !interactive {
        anyhow::bail!(
            "{failed} of {turns} inputs (messages and commands) failed; see the errors above"
        );
    }
    Ok(())
}

/// What every turn of a chat shares.
struct Turn<'a> {
    m: &'a LoadedEngineModel,
    template: &'a bitnet_inference::chat::ChatTemplate,
    config: &'a GenerationConfig,
    context: usize,
    /// Leave old exchanges out when the conversation no longer fits.
    shift: bool,
}

impl Turn<'_> {
    /// The whole visible conversation rendered and tokenized (BOS added as the model asks).
    fn render(&self, session: &Session) -> anyhow::Result<(Vec<u32>, String)> {
        let rendered = self.template.render(&session.visible(), true)?;
        let mut prompt = self.m.tokenizer.encode(&rendered, false)?;
        if let (true, Some(bos)) = (self.m.tokenizer.adds_bos(), self.m.tokenizer.bos_id()) {
            if prompt.first() != Some(&bos) {
                prompt.insert(0, bos);
            }
        }
        Ok((prompt, rendered))
    }

    /// This turn's prompt: the history and the new user turn, else the whole conversation
    /// rendered again. With context shift, the oldest exchanges are left out until the
    /// prompt leaves room for an answer.
    fn prompt(&self, session: &mut Session) -> anyhow::Result<Vec<u32>> {
        let mut prompt = match session.continuation(self.template)? {
            Some(delta) => {
                let mut ids = session.history.clone();
                ids.extend(self.m.tokenizer.encode(&delta, false)?);
                ids
            }
            None => self.render(session)?.0,
        };
        // Room for at least part of the answer (the window slides for the rest).
        let room = self.config.max_new_tokens.min(self.context / 4).max(1);
        if !self.shift || prompt.len() + room <= self.context {
            return Ok(prompt);
        }
        let before = session.dropped;
        // Leave out whole exchanges (a user message and its answer), oldest first; the new
        // user message always stays.
        while prompt.len() + room > self.context && session.messages.len() - session.dropped > 1 {
            session.dropped = (session.dropped + 2).min(session.messages.len() - 1);
            prompt = self.render(session)?.0;
        }
        if session.dropped > before {
            session.history.clear();
            eprintln!(
                "[context full ({} tokens): the oldest {} messages are left out \
                 (--no-context-shift to stop instead)]",
                self.context,
                session.dropped - before
            );
        }
        Ok(prompt)
    }

    /// Generates the assistant's answer to the conversation, streaming it to stdout.
    fn answer(
        &self,
        processor: &mut DynamicBatchProcessor,
        session: &mut Session,
        interrupted: &AtomicBool,
    ) -> anyhow::Result<String> {
        let start = Instant::now();
        let prompt = self.prompt(session)?;
        let stream = processor.submit(Request::new(prompt.clone(), self.config.clone()))?;
        let mut text = String::new();
        let mut generated = Vec::new();
        let mut stdout = std::io::stdout();
        let mut cancelled = false;
        let mut finished = None;
        while finished.is_none() {
            if interrupted.swap(false, Ordering::SeqCst) {
                stream.cancel();
                cancelled = true;
            }
            processor.step();
            while let Some(event) = stream.try_recv() {
                let piece = match event {
                    Event::Token { id, text, .. } => {
                        generated.push(id);
                        text
                    }
                    Event::Finished { text, stats, .. } => {
                        finished = Some(stats);
                        text
                    }
                    Event::Error(e) => return Err(e.into()),
                };
                stdout.write_all(piece.as_bytes())?;
                stdout.flush()?;
                text.push_str(&piece);
            }
        }
        let stats = finished.unwrap_or_default();
        // The ids the model saw, unless the window slid (then the next turn renders again).
        session.history.clear();
        if stats.context_shifts == 0 {
            session.history.extend_from_slice(&prompt);
            session.history.extend_from_slice(&generated);
        }
        session.history_text = self.template.render(&session.visible(), true)?;
        println!();
        if stats.context_shifts > 0 {
            eprintln!(
                "[context full ({} tokens): the window slid {} time{} during this answer, \
                 dropping older tokens (--no-context-shift to stop instead)]",
                self.context,
                stats.context_shifts,
                if stats.context_shifts == 1 { "" } else { "s" }
            );
        }
        let rate = |n: usize, r: f64| {
            if n == 0 {
                String::new()
            } else {
                format!(", {r:.1} tok/s")
            }
        };
        eprintln!(
            "[{} tokens{} | prefill {} new tokens of {} ({} reused){} | {:.2} s{}]",
            stats.generated_tokens,
            rate(
                stats.generated_tokens.saturating_sub(1),
                stats.decode_tokens_per_second()
            ),
            stats.prompt_tokens - stats.cached_tokens,
            stats.prompt_tokens,
            stats.cached_tokens,
            rate(
                stats.prompt_tokens - stats.cached_tokens,
                stats.prefill_tokens_per_second()
            ),
            start.elapsed().as_secs_f64(),
            if cancelled { " | interrupted" } else { "" }
        );
        Ok(text)
    }
}
