//! `bitnet cache ls|rm|prune`: the models in the Hugging Face cache (shared with Python's
//! `huggingface_hub`; `HF_HUB_CACHE`, `HF_HOME`).

use bitnet_inference::hub::{self, cache, HubModelId};
use std::time::SystemTime;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// List cached models: revisions, sizes, last use.
    Ls {
        /// One JSON object per model instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a model (owner/name) or one revision of it (owner/name@revision).
    Rm { model: String },
    /// Evict revisions, least recently used first, until the cache is at most this size.
    Prune {
        /// e.g. 20G, 500M.
        #[arg(long)]
        max_size: String,
    },
}

fn ago(t: Option<SystemTime>) -> String {
    let Some(t) = t else { return "never".into() };
    let s = SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

fn unix(t: Option<SystemTime>) -> Option<u64> {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let dir = hub::default_cache_dir();
    match a.command {
        Sub::Ls { json } => {
            let stats = cache::scan(&dir)?;
            if json {
                for r in &stats.repos {
                    let revs: Vec<_> = r
                        .revisions
                        .iter()
                        .map(|v| {
                            serde_json::json!({
                                "commit": v.commit, "refs": v.refs, "size": v.size,
                                "files": v.files, "last_used": unix(v.last_used),
                                "path": v.path,
                            })
                        })
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({
                            "model": r.repo_id, "size": r.size, "incomplete": r.incomplete,
                            "last_used": unix(r.last_used), "revisions": revs,
                        })
                    );
                }
                return Ok(());
            }
            println!("cache: {}", dir.display());
            if stats.repos.is_empty() {
                println!("(empty)");
                return Ok(());
            }
            println!(
                "{:<48} {:>10} {:>10}  revisions",
                "MODEL", "SIZE", "LAST USE"
            );
            for r in &stats.repos {
                let revs: Vec<String> = r
                    .revisions
                    .iter()
                    .map(|v| {
                        let short = &v.commit[..v.commit.len().min(8)];
                        if v.refs.is_empty() {
                            short.to_string()
                        } else {
                            format!("{short} ({})", v.refs.join(", "))
                        }
                    })
                    .collect();
                let partial = if r.incomplete > 0 {
                    format!(" [+{} unfinished]", cache::format_size(r.incomplete))
                } else {
                    String::new()
                };
                println!(
                    "{:<48} {:>10} {:>10}  {}{partial}",
                    r.repo_id,
                    cache::format_size(r.size),
                    ago(r.last_used),
                    revs.join("; ")
                );
            }
            println!("total {}", cache::format_size(stats.size));
        }
        Sub::Rm { model } => {
            let id = HubModelId::parse(&model)?;
            let whole = !model.contains('@');
            let r = cache::remove(&dir, &id, whole)?;
            for i in &r.items {
                println!("removed {i}");
            }
            println!("freed {}", cache::format_size(r.freed));
        }
        Sub::Prune { max_size } => {
            let max = cache::parse_size(&max_size)?;
            let r = cache::prune(&dir, max)?;
            for i in &r.items {
                println!("removed {i}");
            }
            let left = cache::scan(&dir)?.size;
            println!(
                "freed {}; the cache now takes {}",
                cache::format_size(r.freed),
                cache::format_size(left)
            );
        }
    }
    Ok(())
}
