//! Hugging Face Hub: model ids (`owner/name`, `owner/name@revision`, `owner/name:FILE.gguf`),
//! downloads into the standard Hugging Face cache (the one Python's `huggingface_hub` uses, both
//! ways), and management of that cache.
//!
//! - [`HubModelId`]: a parsed model id.
//! - [`HubConfig`]: endpoint (`HF_ENDPOINT`), cache directory (`HF_HUB_CACHE`, `HF_HOME`),
//!   token (`HF_TOKEN`, `$HF_HOME/token`), offline mode (`HF_HUB_OFFLINE`), progress callback.
//! - [`resolve`]: the local path of a model (a GGUF file or a snapshot directory), downloading
//!   only the files the model needs: resumed when interrupted, checked against the sizes and
//!   sha256 the hub gives, renamed into place only once whole.
//! - [`cache`]: statistics ([`cache::scan`]), removal ([`cache::remove`]) and least-recently-used
//!   eviction ([`cache::prune`]).
//!
//! Cache layout (as `huggingface_hub` writes it):
//! `models--{owner}--{name}/blobs/{etag}`, `snapshots/{commit}/{file}` (a relative symlink to the
//! blob) and `refs/{revision}` (the commit a branch or tag pointed to when last resolved).

pub mod cache;
mod download;

pub use download::{resolve, Progress, ResolvedModel};

use crate::{Error, Result};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The default hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// A model on the hub: `owner/name`, a revision (branch, tag or commit; default `main`) and
/// optionally one file of the repository (a GGUF among several).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HubModelId {
    pub owner: String,
    pub name: String,
    pub revision: String,
    pub file: Option<String>,
}

fn valid_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
        && !s.contains("--")
        && !s.contains("..")
}

fn valid_file(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('/')
        && !s.contains('\\')
        && s.split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

impl HubModelId {
    /// `owner/name` at `main`.
    pub fn new(owner: impl Into<String>, name: impl Into<String>) -> Self {
        HubModelId {
            owner: owner.into(),
            name: name.into(),
            revision: "main".into(),
            file: None,
        }
    }

    /// `owner/name`.
    pub fn repo_id(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }

    /// Parses `owner/name`, `owner/name@revision`, `owner/name:FILE`, `owner/name@revision:FILE`
    /// (or `owner/name:FILE@revision`).
    ///
    /// ```
    /// use bitnet_inference::hub::HubModelId;
    /// let id = HubModelId::parse("microsoft/bitnet-b1.58-2B-4T-gguf@v2:ggml-model-i2_s.gguf").unwrap();
    /// assert_eq!(id.repo_id(), "microsoft/bitnet-b1.58-2B-4T-gguf");
    /// assert_eq!(id.revision, "v2");
    /// assert_eq!(id.file.as_deref(), Some("ggml-model-i2_s.gguf"));
    /// assert!(HubModelId::parse("no-slash").is_err());
    /// assert!(HubModelId::parse("a/b/c").is_err());
    /// assert!(HubModelId::parse("owner/../x").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::Invalid(format!(
                "`{s}` is not a Hugging Face model id ({why}; expected owner/name, \
                 owner/name@revision or owner/name:FILE.gguf)"
            ))
        };
        let (head, mut file) = match s.split_once(':') {
            Some((h, f)) => (h, Some(f)),
            None => (s, None),
        };
        let (id, mut rev) = match head.split_once('@') {
            Some((i, r)) => (i, Some(r)),
            None => (head, None),
        };
        if let (Some(f), None) = (file, rev) {
            if let Some((f2, r)) = f.rsplit_once('@') {
                file = Some(f2);
                rev = Some(r);
            }
        }
        let (owner, name) = id.split_once('/').ok_or_else(|| bad("no `/`"))?;
        if !valid_name_part(owner) || !valid_name_part(name) {
            return Err(bad(
                "owner and name are letters, digits, `-`, `_` and `.`, without `/`",
            ));
        }
        let revision = match rev {
            Some(r) if r.is_empty() || r.contains("..") || r.starts_with('/') => {
                return Err(bad("bad revision"))
            }
            Some(r) => r.to_string(),
            None => "main".to_string(),
        };
        if let Some(f) = file {
            if !valid_file(f) {
                return Err(bad("bad file name"));
            }
        }
        Ok(HubModelId {
            owner: owner.into(),
            name: name.into(),
            revision,
            file: file.map(String::from),
        })
    }
}

impl fmt::Display for HubModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)?;
        if self.revision != "main" {
            write!(f, "@{}", self.revision)?;
        }
        if let Some(file) = &self.file {
            write!(f, ":{file}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for HubModelId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        HubModelId::parse(s)
    }
}

/// A progress callback: called with each [`Progress`] event of a download.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Where and how to reach the hub.
#[derive(Clone)]
pub struct HubConfig {
    /// `HF_ENDPOINT` (default <https://huggingface.co>), without a trailing `/`.
    pub endpoint: String,
    /// The hub cache: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// `HF_TOKEN`, else the contents of `$HF_HOME/token` (`HF_TOKEN_PATH` if set).
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE=1`: resolve from the cache alone.
    pub offline: bool,
    pub progress: Option<ProgressFn>,
}

impl fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .finish()
    }
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

fn env_true(key: &str) -> bool {
    env_nonempty(key)
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(h) = env_nonempty("HF_HOME") {
        return PathBuf::from(h);
    }
    match env_nonempty("XDG_CACHE_HOME") {
        Some(x) => PathBuf::from(x).join("huggingface"),
        None => home_dir().join(".cache/huggingface"),
    }
}

/// The hub cache directory as `huggingface_hub` finds it.
pub fn default_cache_dir() -> PathBuf {
    match env_nonempty("HF_HUB_CACHE") {
        Some(c) => PathBuf::from(c),
        None => hf_home().join("hub"),
    }
}

/// `HF_TOKEN`, else the token file (`HF_TOKEN_PATH`, else `$HF_HOME/token`).
pub fn default_token() -> Option<String> {
    if let Some(t) = env_nonempty("HF_TOKEN") {
        return Some(t.trim().to_string());
    }
    let path = env_nonempty("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home().join("token"));
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

impl HubConfig {
    /// Everything from the environment, as `huggingface_hub` reads it.
    pub fn from_env() -> Self {
        HubConfig {
            endpoint: env_nonempty("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
                .trim_end_matches('/')
                .to_string(),
            cache_dir: default_cache_dir(),
            token: default_token(),
            offline: env_true("HF_HUB_OFFLINE"),
            progress: None,
        }
    }

    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = self.offline || offline;
        self
    }

    pub fn with_progress(mut self, f: ProgressFn) -> Self {
        self.progress = Some(f);
        self
    }

    /// `models--{owner}--{name}` in the cache.
    pub fn repo_dir(&self, id: &HubModelId) -> PathBuf {
        self.cache_dir.join(repo_folder_name(id))
    }
}

/// `models--{owner}--{name}`.
pub fn repo_folder_name(id: &HubModelId) -> String {
    format!("models--{}--{}", id.owner, id.name)
}

/// Whether `s` names a hub model rather than a local file: it parses as a hub id and no file or
/// directory of that name exists.
pub fn is_hub_id(s: &str) -> bool {
    !Path::new(s).exists() && HubModelId::parse(s).is_ok()
}

/// A 40-hex-digit commit hash.
pub(crate) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        let id = HubModelId::parse("o/n").unwrap();
        assert_eq!((id.revision.as_str(), id.file.as_deref()), ("main", None));
        let id = HubModelId::parse("o/n:x.gguf@abc").unwrap();
        assert_eq!(
            (id.revision.as_str(), id.file.as_deref()),
            ("abc", Some("x.gguf"))
        );
        let id = HubModelId::parse("o/n@r:sub/x.gguf").unwrap();
        assert_eq!(
            (id.revision.as_str(), id.file.as_deref()),
            ("r", Some("sub/x.gguf"))
        );
        assert_eq!(id.to_string(), "o/n@r:sub/x.gguf");
        for bad in [
            "", "/n", "o/", "o/n@", "o/n:", "o/n:../x", "o--x/n", ".o/n", "o/n/x",
        ] {
            assert!(HubModelId::parse(bad).is_err(), "{bad}");
        }
    }
}
