use bitnet_inference::tokenizer::Tokenizer;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or model directory whose tokenizer to use (default: $BITNET_MODEL, else the
    /// bitnet-tiny model shipped in the repository).
    #[arg(short, long, env = "BITNET_MODEL")]
    model: Option<PathBuf>,
    /// A tokenizer.json file instead of a model (wins over -m).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The text to tokenize; `-` reads it from standard input (at most 16 MiB).
    #[arg(short, long, required_unless_present = "file", conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the text from this file (at most 16 MiB).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    // A text from a file or standard input is read up to a bound (tokenizing it takes ~90
    // bytes of memory a byte); one on the command line is bounded by the system's.
    let text = match (a.prompt.as_deref(), a.file.as_deref()) {
        (Some("-"), None) => read_text(None)?,
        (None, Some(f)) => read_text(Some(f))?,
        (p, f) => super::read_prompt(p, f)?,
    };
    let tokenizer = match &a.tokenizer {
        Some(path) => Tokenizer::from_file(path)?,
        None => {
            bitnet_inference::model::load_tokenizer(&super::model_or_default(a.model.as_deref())?)?
        }
    };
    let ids = tokenizer.encode(&text, true)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

/// A whole file's (or standard input's) text, as `-f`/`-p -` give it: one trailing newline
/// dropped, as `read_prompt` does.
fn read_text(file: Option<&std::path::Path>) -> anyhow::Result<String> {
    let mut text = super::read_text_at_most(
        file,
        super::MAX_WHOLE_TEXT_BYTES,
        "tokenize encodes the whole text at once",
    )?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}
