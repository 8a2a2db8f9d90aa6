use bitnet_inference::tokenizer::Tokenizer;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model", "tokenizer"])))]
pub struct Args {
    /// GGUF file or model directory whose tokenizer to use.
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// A tokenizer.json file instead of a model.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The text to tokenize.
    #[arg(short, long)]
    prompt: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let tokenizer = match (&a.model, &a.tokenizer) {
        (_, Some(path)) => Tokenizer::from_file(path)?,
        (Some(path), None) => bitnet_inference::model::load_tokenizer(path)?,
        (None, None) => unreachable!("clap requires one source"),
    };
    let ids = tokenizer.encode(&a.prompt, true)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
