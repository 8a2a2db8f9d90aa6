//! Resolving a [`HubModelId`] to local files: the repository's file list from
//! `/api/models/{repo}/revision/{rev}`, then each needed file from `/{repo}/resolve/{commit}/{file}`
//! into the cache, resumed with HTTP Range from `blobs/{etag}.incomplete`.

use super::{is_commit_hash, HubConfig, HubModelId};
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// One event of a download, for progress bars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A file starts downloading; `done` bytes are already there (a resumed download).
    Start {
        file: String,
        done: u64,
        total: Option<u64>,
    },
    /// `done` bytes of the file so far.
    Advance { file: String, done: u64 },
    /// The file is whole and checked.
    Finish { file: String },
}

/// A model resolved to local files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    /// What to load: the GGUF file, or the snapshot directory of a safetensors model.
    pub path: PathBuf,
    /// The commit the revision resolved to.
    pub commit: String,
    /// `snapshots/{commit}` in the cache.
    pub snapshot_dir: PathBuf,
    /// The repository files of the model (relative paths).
    pub files: Vec<String>,
    /// Bytes downloaded by this call (0 when everything was cached).
    pub downloaded_bytes: u64,
}

/// Files loaded beside the weights of a safetensors model, when the repository has them.
const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];
const INDEX: &str = "model.safetensors.index.json";

/// The local path of `id`: from the cache when `config.offline` (or when the network fails and
/// the cache has it), else downloading what is missing.
pub fn resolve(config: &HubConfig, id: &HubModelId) -> Result<ResolvedModel> {
    if config.offline {
        return resolve_offline(config, id).map_err(|e| {
            Error::Invalid(format!(
                "{e} (offline mode: HF_HUB_OFFLINE=1 or --offline; run `bitnet pull {id}` \
                 with network access first)"
            ))
        });
    }
    match resolve_online(config, id) {
        Err(Failure::Network(msg)) => match resolve_offline(config, id) {
            Ok(r) => Ok(r),
            Err(_) => Err(Error::Invalid(msg)),
        },
        Err(Failure::Other(e)) => Err(e),
        Ok(r) => Ok(r),
    }
}

enum Failure {
    /// The hub could not be reached (the cache may still serve).
    Network(String),
    Other(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Other(e)
    }
}

fn invalid(msg: impl Into<String>) -> Failure {
    Failure::Other(Error::Invalid(msg.into()))
}

// ---------------------------------------------------------------- offline

fn resolve_offline(config: &HubConfig, id: &HubModelId) -> Result<ResolvedModel> {
    let repo_dir = config.repo_dir(id);
    if !repo_dir.is_dir() {
        return Err(Error::Invalid(format!(
            "{id} is not in the Hugging Face cache ({} does not exist)",
            repo_dir.display()
        )));
    }
    let commit =
        if is_commit_hash(&id.revision) && repo_dir.join("snapshots").join(&id.revision).is_dir() {
            id.revision.clone()
        } else {
            let r = repo_dir.join("refs").join(&id.revision);
            let c = fs::read_to_string(&r).map_err(|_| {
                Error::Invalid(format!(
                    "{id}: revision `{}` is not in the cache ({} is missing)",
                    id.revision,
                    r.display()
                ))
            })?;
            c.trim().to_string()
        };
    let snap = repo_dir.join("snapshots").join(&commit);
    if !snap.is_dir() {
        return Err(Error::Invalid(format!(
            "{id}: snapshot {} is missing from the cache",
            snap.display()
        )));
    }
    let present = |f: &str| snap.join(f).is_file(); // follows the symlink to the blob
    let missing_err = |f: &str| {
        Error::Invalid(format!(
            "{id}: `{f}` is missing from the cached snapshot {}",
            snap.display()
        ))
    };
    let files: Vec<String> = if let Some(f) = &id.file {
        if !present(f) {
            return Err(missing_err(f));
        }
        vec![f.clone()]
    } else if snap.join("config.json").exists() {
        let mut files: Vec<String> = SIDE_FILES
            .iter()
            .filter(|f| present(f))
            .map(|f| f.to_string())
            .collect();
        if snap.join(INDEX).exists() {
            for shard in index_shards(&snap.join(INDEX))? {
                if !present(&shard) {
                    return Err(missing_err(&shard));
                }
                files.push(shard);
            }
            files.push(INDEX.into());
        } else {
            let st = list_root(&snap, ".safetensors");
            if st.is_empty() {
                return Err(missing_err("model.safetensors"));
            }
            files.extend(st);
        }
        files
    } else {
        let ggufs = list_root(&snap, ".gguf");
        match ggufs.len() {
            1 => ggufs,
            0 => {
                return Err(Error::Invalid(format!(
                    "{id}: the cached snapshot {} has neither config.json (a safetensors \
                     model) nor a GGUF file",
                    snap.display()
                )))
            }
            _ => return Err(several_ggufs(id, &ggufs)),
        }
    };
    touch_files(&snap, &files);
    let path = model_path(&snap, id, &files);
    Ok(ResolvedModel {
        path,
        commit,
        snapshot_dir: snap,
        files,
        downloaded_bytes: 0,
    })
}

/// Root-level files of a snapshot ending in `ext`, sorted.
fn list_root(dir: &Path, ext: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(ext) && dir.join(n).is_file())
        .collect();
    v.sort();
    v
}

fn index_shards(index: &Path) -> Result<Vec<String>> {
    let text = fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(index, format!("not JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(index, "no `weight_map` object"))?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str().map(String::from))
        .collect();
    shards.sort();
    shards.dedup();
    for s in &shards {
        if !super::valid_file(s) {
            return Err(Error::format(index, format!("bad shard file name `{s}`")));
        }
    }
    Ok(shards)
}

fn model_path(snap: &Path, id: &HubModelId, files: &[String]) -> PathBuf {
    match (&id.file, files) {
        (Some(f), _) => snap.join(f),
        (None, [one]) if one.ends_with(".gguf") => snap.join(one),
        _ => snap.to_path_buf(),
    }
}

fn several_ggufs(id: &HubModelId, ggufs: &[String]) -> Error {
    Error::Invalid(format!(
        "{id} has {} GGUF files; name one as {}/{}:FILE: {}",
        ggufs.len(),
        id.owner,
        id.name,
        ggufs.join(", ")
    ))
}

/// Marks a model's blobs as used now (their access time, which `cache ls` and `cache prune`
/// read, as `huggingface_hub`'s cache scan does).
fn touch_files(snap: &Path, files: &[String]) {
    let now = SystemTime::now();
    for f in files {
        if let Ok(file) = File::open(snap.join(f)) {
            let _ = file.set_times(fs::FileTimes::new().set_accessed(now));
        }
    }
}

// ---------------------------------------------------------------- online

fn agent(max_redirects: u32) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(max_redirects)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(120)))
        .timeout_per_read(Some(Duration::from_secs(120)))
        .user_agent(format!("bitnet/{}", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent()
}

fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

type Response = ureq::http::Response<ureq::Body>;

fn header(r: &Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.to_string())
}

fn send(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    config: &HubConfig,
    range_from: Option<u64>,
) -> std::result::Result<Response, Failure> {
    let mut req = match method {
        "HEAD" => agent.head(url),
        _ => agent.get(url),
    };
    if let Some(t) = &config.token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(from) = range_from {
        req = req.header("range", format!("bytes={from}-"));
    }
    req.call().map_err(|e| {
        Failure::Network(format!(
            "cannot reach the Hugging Face hub at {} ({url}): {e}; check the network or \
             HF_ENDPOINT, or use the cache alone with --offline / HF_HUB_OFFLINE=1",
            config.endpoint
        ))
    })
}

/// An error for a non-success status, in words a user can act on.
fn status_error(config: &HubConfig, id: &HubModelId, what: &str, r: &Response) -> Failure {
    let code = r.status().as_u16();
    let hub_code = header(r, "x-error-code").unwrap_or_default();
    let hub_msg = header(r, "x-error-message")
        .map(|m| format!(" (hub says: {m})"))
        .unwrap_or_default();
    let repo = id.repo_id();
    let token_help = "set HF_TOKEN, or put a token in $HF_HOME/token \
                      (~/.cache/huggingface/token; `huggingface-cli login` writes it)";
    let msg = match code {
        401 if config.token.is_none() => format!(
            "{what}: 401 Unauthorized{hub_msg}: {repo} is private, gated or does not exist; \
             if it exists, {token_help}"
        ),
        401 => format!(
            "{what}: 401 Unauthorized{hub_msg}: the token was refused, or {repo} does not \
             exist; check the token in HF_TOKEN / $HF_HOME/token"
        ),
        403 if hub_code == "GatedRepo" || config.token.is_some() => format!(
            "{what}: 403 Forbidden{hub_msg}: {repo} is gated and this token's account has \
             no access; accept its terms at {}/{repo} while logged in, then retry",
            config.endpoint
        ),
        403 => format!("{what}: 403 Forbidden{hub_msg}: {repo} is gated; {token_help}"),
        404 if hub_code == "RevisionNotFound" => format!(
            "{what}: revision `{}` of {repo} not found{hub_msg}",
            id.revision
        ),
        404 if hub_code == "EntryNotFound" => format!("{what}: file not found{hub_msg}"),
        404 => format!(
            "{what}: 404 Not Found{hub_msg}: no repository {repo} at revision `{}` on {}",
            id.revision, config.endpoint
        ),
        500.. => {
            return Failure::Network(format!(
                "{what}: the hub answered {code}{hub_msg}; try again later"
            ))
        }
        _ => format!("{what}: unexpected HTTP status {code}{hub_msg}"),
    };
    invalid(msg)
}

#[derive(Debug)]
struct Sibling {
    name: String,
    size: Option<u64>,
    sha256: Option<String>,
    blob_id: Option<String>,
}

struct RepoInfo {
    commit: String,
    siblings: Vec<Sibling>,
}

fn repo_info(
    agent: &ureq::Agent,
    config: &HubConfig,
    id: &HubModelId,
) -> std::result::Result<RepoInfo, Failure> {
    let url = format!(
        "{}/api/models/{}/{}/revision/{}?blobs=true",
        config.endpoint,
        id.owner,
        id.name,
        encode(&id.revision, false)
    );
    let what = format!("{id}");
    let mut r = send(agent, "GET", &url, config, None)?;
    if !r.status().is_success() {
        return Err(status_error(config, id, &what, &r));
    }
    let text = r
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .map_err(|e| Failure::Network(format!("{what}: reading {url}: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| invalid(format!("{what}: {url} did not return JSON: {e}")))?;
    let commit = v
        .get("sha")
        .and_then(|s| s.as_str())
        .filter(|s| is_commit_hash(s))
        .ok_or_else(|| {
            invalid(format!(
                "{what}: {url}: no commit hash (`sha`) in the answer"
            ))
        })?
        .to_string();
    let siblings = v
        .get("siblings")
        .and_then(|s| s.as_array())
        .ok_or_else(|| invalid(format!("{what}: {url}: no `siblings` file list")))?
        .iter()
        .filter_map(|s| {
            let name = s.get("rfilename")?.as_str()?.to_string();
            let lfs = s.get("lfs");
            Some(Sibling {
                size: lfs
                    .and_then(|l| l.get("size"))
                    .or_else(|| s.get("size"))
                    .and_then(|n| n.as_u64()),
                sha256: lfs
                    .and_then(|l| l.get("sha256"))
                    .and_then(|h| h.as_str())
                    .map(|h| h.to_ascii_lowercase()),
                blob_id: s.get("blobId").and_then(|b| b.as_str()).map(String::from),
                name,
            })
        })
        .filter(|s| super::valid_file(&s.name))
        .collect();
    Ok(RepoInfo { commit, siblings })
}

/// The files of the repository the model needs (the index's shards are added once the index
/// is downloaded).
fn choose_files(id: &HubModelId, names: &[&str]) -> Result<Vec<String>> {
    let mut ggufs: Vec<String> = names
        .iter()
        .filter(|n| n.ends_with(".gguf"))
        .map(|n| n.to_string())
        .collect();
    ggufs.sort();
    if let Some(f) = &id.file {
        if names.contains(&f.as_str()) {
            return Ok(vec![f.clone()]);
        }
        return Err(Error::Invalid(format!(
            "{id}: the repository has no file `{f}`{}",
            if ggufs.is_empty() {
                String::new()
            } else {
                format!("; its GGUF files: {}", ggufs.join(", "))
            }
        )));
    }
    let root_st: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !n.contains('/') && n.ends_with(".safetensors"))
        .collect();
    if !root_st.is_empty() || names.contains(&INDEX) {
        if !names.contains(&"config.json") {
            return Err(Error::Invalid(format!(
                "{id}: the repository has safetensors weights but no config.json"
            )));
        }
        let mut files: Vec<String> = SIDE_FILES
            .iter()
            .filter(|f| names.contains(f))
            .map(|f| f.to_string())
            .collect();
        if names.contains(&INDEX) {
            files.push(INDEX.into());
        } else if root_st.contains(&"model.safetensors") {
            files.push("model.safetensors".into());
        } else {
            files.extend(root_st.iter().map(|s| s.to_string()));
        }
        return Ok(files);
    }
    match ggufs.len() {
        1 => Ok(ggufs),
        0 => Err(Error::Invalid(format!(
            "{id}: the repository has no model this program loads (safetensors with config.json, \
             or GGUF); its files: {}",
            names.join(", ")
        ))),
        _ => Err(several_ggufs(id, &ggufs)),
    }
}

fn resolve_online(
    config: &HubConfig,
    id: &HubModelId,
) -> std::result::Result<ResolvedModel, Failure> {
    let api = agent(10);
    let info = repo_info(&api, config, id)?;
    let names: Vec<&str> = info.siblings.iter().map(|s| s.name.as_str()).collect();
    let mut files = choose_files(id, &names)?;
    let repo_dir = config.repo_dir(id);
    let snap = repo_dir.join("snapshots").join(&info.commit);
    let mut downloaded = 0u64;
    let mut i = 0;
    while i < files.len() {
        let name = files[i].clone();
        let sib = info.siblings.iter().find(|s| s.name == name);
        downloaded += fetch_file(&api, config, id, &repo_dir, &info.commit, &name, sib)?;
        if name == INDEX {
            for shard in index_shards(&snap.join(INDEX))? {
                if !names.contains(&shard.as_str()) {
                    return Err(invalid(format!(
                        "{id}: {INDEX} names `{shard}`, which the repository does not have"
                    )));
                }
                if !files.contains(&shard) {
                    files.push(shard);
                }
            }
        }
        i += 1;
    }
    if id.revision != info.commit {
        let refs = repo_dir.join("refs").join(&id.revision);
        write_small_atomic(&refs, info.commit.as_bytes())?;
    }
    touch_files(&snap, &files);
    let path = model_path(&snap, id, &files);
    Ok(ResolvedModel {
        path,
        commit: info.commit,
        snapshot_dir: snap,
        files,
        downloaded_bytes: downloaded,
    })
}

fn write_small_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().expect("a file in a directory");
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, data).map_err(|e| write_error(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A write error, with disk-full and size-limit failures said plainly.
fn write_error(path: &Path, e: io::Error) -> Error {
    let full = matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge | io::ErrorKind::QuotaExceeded
    );
    if full {
        Error::Invalid(format!(
            "{}: no space left to write it ({e}); free some disk space (`bitnet cache prune \
             --max-size SIZE` evicts old models) and run again: the download resumes where it \
             stopped",
            path.display()
        ))
    } else {
        Error::io(path, e)
    }
}

fn strip_etag(e: &str) -> String {
    e.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// Downloads one file of the commit into the cache (unless its blob is there) and links it
/// into the snapshot. Returns the bytes downloaded.
fn fetch_file(
    api: &ureq::Agent,
    config: &HubConfig,
    id: &HubModelId,
    repo_dir: &Path,
    commit: &str,
    name: &str,
    sib: Option<&Sibling>,
) -> std::result::Result<u64, Failure> {
    let url = format!(
        "{}/{}/{}/resolve/{commit}/{}",
        config.endpoint,
        id.owner,
        id.name,
        encode(name, true)
    );
    let what = format!("{id}: {name}");
    // The hub redirects big files to a CDN; the metadata we need is on the first answer.
    // Same-host relative redirects (a renamed repository) are followed.
    let mut head = send(&agent(0), "HEAD", &url, config, None)?;
    for _ in 0..5 {
        let loc = header(&head, "location").filter(|l| l.starts_with('/'));
        match loc {
            Some(l)
                if head.status().is_redirection() && header(&head, "x-linked-etag").is_none() =>
            {
                head = send(
                    &agent(0),
                    "HEAD",
                    &format!("{}{l}", config.endpoint),
                    config,
                    None,
                )?;
            }
            _ => break,
        }
    }
    let status = head.status().as_u16();
    if !(head.status().is_success() || (300..400).contains(&status)) {
        return Err(status_error(config, id, &what, &head));
    }
    let etag = header(&head, "x-linked-etag")
        .or_else(|| header(&head, "etag"))
        .map(|e| strip_etag(&e))
        .or_else(|| sib.and_then(|s| s.sha256.clone().or(s.blob_id.clone())))
        .filter(|e| !e.is_empty() && !e.contains(['/', '\\']) && e != "." && e != "..")
        .ok_or_else(|| invalid(format!("{what}: the hub gave no ETag for {url}")))?;
    let size = sib.and_then(|s| s.size).or_else(|| {
        header(&head, "x-linked-size")
            .or_else(|| {
                head.status()
                    .is_success()
                    .then(|| header(&head, "content-length"))
                    .flatten()
            })
            .and_then(|s| s.parse().ok())
    });
    let sha256 = sib.and_then(|s| s.sha256.clone()).or_else(|| {
        // For LFS files the ETag is the sha256 of the content.
        header(&head, "x-linked-etag")
            .map(|e| strip_etag(&e).to_ascii_lowercase())
            .filter(|e| e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit()))
    });

    let blobs = repo_dir.join("blobs");
    fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
    let blob = blobs.join(&etag);
    let locks = repo_dir
        .parent()
        .expect("the cache directory")
        .join(".locks")
        .join(repo_dir.file_name().expect("a repo folder"));
    fs::create_dir_all(&locks).map_err(|e| Error::io(&locks, e))?;
    let lock_path = locks.join(format!("{etag}.lock"));
    let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    // Another process (ours or huggingface_hub) downloading the same blob holds this lock.
    lock.lock().map_err(|e| Error::io(&lock_path, e))?;

    let mut downloaded = 0;
    let have = fs::metadata(&blob).ok().filter(|m| m.is_file());
    if have.is_none() || size.is_some_and(|s| have.as_ref().is_some_and(|m| m.len() != s)) {
        downloaded = download_blob(
            api,
            config,
            &url,
            &what,
            name,
            &blob,
            (size, sha256.as_deref()),
        )?;
    }
    drop(lock);

    // snapshots/{commit}/{name} -> ../../blobs/{etag} (one more ../ per directory of name).
    let link = repo_dir.join("snapshots").join(commit).join(name);
    let depth = name.matches('/').count();
    let mut target = PathBuf::new();
    for _ in 0..depth + 2 {
        target.push("..");
    }
    target.push("blobs");
    target.push(&etag);
    let link_dir = link.parent().expect("a file in the snapshot");
    fs::create_dir_all(link_dir).map_err(|e| Error::io(link_dir, e))?;
    if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
        let tmp = link.with_file_name(format!(
            ".{}.tmp{}",
            link.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let _ = fs::remove_file(&tmp);
        make_link(&target, &blob, &tmp)?;
        fs::rename(&tmp, &link).map_err(|e| Error::io(&link, e))?;
    }
    Ok(downloaded)
}

#[cfg(unix)]
fn make_link(target: &Path, _blob: &Path, at: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, at).map_err(|e| Error::io(at, e))
}

#[cfg(not(unix))]
fn make_link(_target: &Path, blob: &Path, at: &Path) -> Result<()> {
    // huggingface_hub copies the blob where symlinks are not available.
    fs::copy(blob, at).map(|_| ()).map_err(|e| Error::io(at, e))
}

fn progress(config: &HubConfig, p: Progress) {
    if let Some(f) = &config.progress {
        f(&p);
    }
}

/// Downloads `url` into `blob` through `blob.incomplete`, resuming what an earlier attempt left
/// there; checks size and sha256; renames into place only when whole.
fn download_blob(
    api: &ureq::Agent,
    config: &HubConfig,
    url: &str,
    what: &str,
    name: &str,
    blob: &Path,
    (size, sha256): (Option<u64>, Option<&str>),
) -> std::result::Result<u64, Failure> {
    let inc = blob.with_file_name(format!(
        "{}.incomplete",
        blob.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(&inc)
        .map_err(|e| write_error(&inc, e))?;
    let mut start = file.metadata().map_err(|e| Error::io(&inc, e))?.len();
    if size.is_some_and(|s| start > s) {
        file.set_len(0).map_err(|e| Error::io(&inc, e))?;
        start = 0;
    }
    // Hash what an earlier attempt wrote.
    let mut hasher = Sha256::new();
    if start > 0 {
        file.seek(io::SeekFrom::Start(0))
            .map_err(|e| Error::io(&inc, e))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = start;
        while left > 0 {
            let n = (left.min(buf.len() as u64)) as usize;
            file.read_exact(&mut buf[..n])
                .map_err(|e| Error::io(&inc, e))?;
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
    }
    let mut got = 0u64;
    if size != Some(start) {
        let mut r = send(api, "GET", url, config, (start > 0).then_some(start))?;
        let status = r.status().as_u16();
        if status == 416 {
            // The partial file does not fit the server's; start over.
            drop(file);
            let _ = fs::remove_file(&inc);
            return Err(Failure::Network(format!(
                "{what}: the server refused to resume the partial download; it was removed, \
                 run again"
            )));
        }
        if !r.status().is_success() {
            return Err(invalid(format!(
                "{what}: download failed with HTTP {status} ({url})"
            )));
        }
        if start > 0 && status != 206 {
            // The server sent the whole file.
            file.set_len(0).map_err(|e| Error::io(&inc, e))?;
            start = 0;
            hasher = Sha256::new();
        }
        let total = size.or_else(|| {
            header(&r, "content-length")
                .and_then(|l| l.parse::<u64>().ok())
                .map(|l| l + start)
        });
        progress(
            config,
            Progress::Start {
                file: name.into(),
                done: start,
                total,
            },
        );
        let mut reader = r.body_mut().as_reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut done = start;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = file.sync_data();
                    return Err(Failure::Other(Error::Invalid(format!(
                        "{what}: the connection broke after {done}{} bytes ({e}); run the \
                         same command again to resume from {}",
                        total.map(|t| format!(" of {t}")).unwrap_or_default(),
                        inc.display()
                    ))));
                }
            };
            file.write_all(&buf[..n])
                .map_err(|e| write_error(&inc, e))?;
            hasher.update(&buf[..n]);
            done += n as u64;
            got += n as u64;
            progress(
                config,
                Progress::Advance {
                    file: name.into(),
                    done,
                },
            );
        }
        file.flush().map_err(|e| write_error(&inc, e))?;
    }
    file.sync_all().map_err(|e| write_error(&inc, e))?;
    let len = file.metadata().map_err(|e| Error::io(&inc, e))?.len();
    drop(file);
    if let Some(s) = size {
        if len != s {
            if len > s {
                let _ = fs::remove_file(&inc);
            }
            return Err(invalid(format!(
                "{what}: got {len} bytes, the hub says {s}; run again to resume"
            )));
        }
    }
    if let Some(expected) = sha256 {
        let actual = format!("{:x}", hasher.finalize());
        if actual != expected {
            let _ = fs::remove_file(&inc);
            return Err(invalid(format!(
                "{what}: sha256 mismatch (got {actual}, the hub says {expected}); the corrupt \
                 download was removed, run again"
            )));
        }
    }
    fs::rename(&inc, blob).map_err(|e| Error::io(blob, e))?;
    progress(config, Progress::Finish { file: name.into() });
    Ok(got)
}
