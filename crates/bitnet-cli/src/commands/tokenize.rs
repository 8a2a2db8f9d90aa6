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
    /// The text to tokenize; `-` reads it from standard input.
    #[arg(short, long, required_unless_present = "file", conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the text from this file.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let text = super::read_prompt(a.prompt.as_deref(), a.file.as_deref())?;
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
