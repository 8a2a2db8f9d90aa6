//! `bitnet pull MODEL`: download a model from the Hugging Face hub into the shared cache.

use bitnet_inference::hub::{self, cache::format_size, HubModelId};

#[derive(clap::Args)]
pub struct Args {
    /// owner/name, owner/name@revision or owner/name:FILE.gguf.
    model: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let id = HubModelId::parse(&a.model)?;
    let cfg = super::hub_config();
    let r = hub::resolve(&cfg, &id)?;
    eprintln!(
        "{id}: commit {}, {} file(s){}",
        r.commit,
        r.files.len(),
        if r.downloaded_bytes > 0 {
            format!(", {} downloaded", format_size(r.downloaded_bytes))
        } else {
            ", all cached".to_string()
        }
    );
    println!("{}", r.path.display());
    Ok(())
}
