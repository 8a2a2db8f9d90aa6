//! The Hugging Face cache: what is in it ([`scan`]), removing a model or one revision
//! ([`remove`]), and evicting the least recently used revisions down to a size ([`prune`]).
//! Sizes are those of the blobs (a blob shared by two revisions counts once); "last used" is
//! the newest access time of a revision's blobs, as `huggingface_hub`'s `scan_cache_dir` reads
//! it (loading a model through [`super::resolve`] sets it).

use super::{is_commit_hash, HubModelId};
use crate::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// One revision (snapshot) of a cached model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedRevision {
    pub commit: String,
    /// Branches and tags (`refs/*`) pointing at this commit.
    pub refs: Vec<String>,
    /// Files of the snapshot (relative paths).
    pub files: Vec<String>,
    /// Bytes of the snapshot's blobs.
    pub size: u64,
    pub last_used: Option<SystemTime>,
    pub path: PathBuf,
}

/// One cached model repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedRepo {
    /// `owner/name`.
    pub repo_id: String,
    pub path: PathBuf,
    pub revisions: Vec<CachedRevision>,
    /// Bytes of all the repository's blobs (partial downloads included).
    pub size: u64,
    /// Bytes of unfinished downloads (`blobs/*.incomplete`).
    pub incomplete: u64,
    pub last_used: Option<SystemTime>,
}

/// The whole cache.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheStats {
    pub repos: Vec<CachedRepo>,
    pub size: u64,
}

fn atime(m: &fs::Metadata) -> Option<SystemTime> {
    let a = m.accessed().ok();
    let w = m.modified().ok();
    a.max(w)
}

/// `models--owner--name` → `owner/name`.
fn repo_id_of(folder: &str) -> Option<String> {
    let rest = folder.strip_prefix("models--")?;
    let (owner, name) = rest.split_once("--")?;
    Some(format!("{owner}/{name}"))
}

fn walk_files(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let p = e.path();
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => walk_files(&p, &rel, out),
            Ok(_) => out.push(rel),
            Err(_) => {}
        }
    }
}

/// The blob behind a snapshot file (the file itself when it is not a link).
fn blob_of(file: &Path) -> PathBuf {
    fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf())
}

/// Scans one repository folder.
pub fn scan_repo(path: &Path) -> Result<CachedRepo> {
    let folder = path
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    let repo_id = repo_id_of(&folder).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: not a model folder of the Hugging Face cache",
            path.display()
        ))
    })?;
    let mut size = 0;
    let mut incomplete = 0;
    let mut blob_meta: BTreeMap<PathBuf, fs::Metadata> = BTreeMap::new();
    if let Ok(rd) = fs::read_dir(path.join("blobs")) {
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                size += m.len();
                if e.file_name().to_string_lossy().ends_with(".incomplete") {
                    incomplete += m.len();
                } else {
                    blob_meta.insert(blob_of(&e.path()), m);
                }
            }
        }
    }
    let mut refs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut ref_names = Vec::new();
    walk_files(&path.join("refs"), "", &mut ref_names);
    for r in ref_names {
        if let Ok(c) = fs::read_to_string(path.join("refs").join(&r)) {
            refs.entry(c.trim().to_string()).or_default().push(r);
        }
    }
    let mut revisions = Vec::new();
    if let Ok(rd) = fs::read_dir(path.join("snapshots")) {
        for e in rd.flatten() {
            let commit = e.file_name().to_string_lossy().to_string();
            let snap = e.path();
            if !snap.is_dir() {
                continue;
            }
            let mut files = Vec::new();
            walk_files(&snap, "", &mut files);
            files.sort();
            let mut seen = BTreeSet::new();
            let mut rsize = 0;
            let mut last: Option<SystemTime> = None;
            for f in &files {
                let b = blob_of(&snap.join(f));
                if !seen.insert(b.clone()) {
                    continue;
                }
                let m = blob_meta.get(&b).cloned().or_else(|| fs::metadata(&b).ok());
                if let Some(m) = m {
                    rsize += m.len();
                    last = last.max(atime(&m));
                }
            }
            revisions.push(CachedRevision {
                refs: refs.get(&commit).cloned().unwrap_or_default(),
                commit,
                files,
                size: rsize,
                last_used: last,
                path: snap,
            });
        }
    }
    revisions.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.commit.cmp(&b.commit)));
    let last_used = revisions.iter().filter_map(|r| r.last_used).max();
    Ok(CachedRepo {
        repo_id,
        path: path.to_path_buf(),
        revisions,
        size,
        incomplete,
        last_used,
    })
}

/// Everything in the cache at `cache_dir` (a missing directory is an empty cache).
pub fn scan(cache_dir: &Path) -> Result<CacheStats> {
    let mut stats = CacheStats::default();
    let rd = match fs::read_dir(cache_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(stats),
        Err(e) => return Err(Error::io(cache_dir, e)),
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("models--") && e.path().is_dir() {
            let repo = scan_repo(&e.path())?;
            stats.size += repo.size;
            stats.repos.push(repo);
        }
    }
    stats.repos.sort_by(|a, b| a.repo_id.cmp(&b.repo_id));
    Ok(stats)
}

/// What [`remove`] or [`prune`] deleted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Removed {
    /// `owner/name@commit` of each revision removed (`owner/name` for a whole repository).
    pub items: Vec<String>,
    pub freed: u64,
}

fn dir_size(p: &Path) -> u64 {
    let mut files = Vec::new();
    walk_files(p, "", &mut files);
    files
        .iter()
        .filter_map(|f| fs::symlink_metadata(p.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// Removes a model from the cache: the whole repository for `owner/name` (revision `main`
/// given implicitly means all), or one revision for `owner/name@revision` (then the blobs no
/// other revision uses).
pub fn remove(cache_dir: &Path, id: &HubModelId, whole_repo: bool) -> Result<Removed> {
    let path = cache_dir.join(super::repo_folder_name(id));
    if !path.is_dir() {
        return Err(Error::Invalid(format!(
            "{} is not in the cache ({} does not exist)",
            id.repo_id(),
            path.display()
        )));
    }
    if whole_repo {
        let freed = scan_repo(&path)?.size;
        fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        let locks = cache_dir.join(".locks").join(super::repo_folder_name(id));
        let _ = fs::remove_dir_all(locks);
        return Ok(Removed {
            items: vec![id.repo_id()],
            freed,
        });
    }
    let commit = if is_commit_hash(&id.revision) {
        id.revision.clone()
    } else {
        let r = path.join("refs").join(&id.revision);
        fs::read_to_string(&r)
            .map_err(|_| {
                Error::Invalid(format!(
                    "{}: revision `{}` is not in the cache ({} is missing)",
                    id.repo_id(),
                    id.revision,
                    r.display()
                ))
            })?
            .trim()
            .to_string()
    };
    remove_revision(&path, &id.repo_id(), &commit)
}

/// Removes snapshot `commit`, the refs pointing at it and the blobs left unused; removes the
/// repository folder when nothing is left.
fn remove_revision(repo: &Path, repo_id: &str, commit: &str) -> Result<Removed> {
    let snap = repo.join("snapshots").join(commit);
    if !snap.is_dir() {
        return Err(Error::Invalid(format!(
            "{repo_id}: no snapshot {commit} in the cache"
        )));
    }
    let before = dir_size(&repo.join("blobs"));
    fs::remove_dir_all(&snap).map_err(|e| Error::io(&snap, e))?;
    let mut refs = Vec::new();
    walk_files(&repo.join("refs"), "", &mut refs);
    for r in refs {
        let p = repo.join("refs").join(&r);
        if fs::read_to_string(&p).is_ok_and(|c| c.trim() == commit) {
            fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    // Blobs still used by the remaining snapshots.
    let mut used = BTreeSet::new();
    if let Ok(rd) = fs::read_dir(repo.join("snapshots")) {
        for e in rd.flatten() {
            let mut files = Vec::new();
            walk_files(&e.path(), "", &mut files);
            for f in files {
                used.insert(blob_of(&e.path().join(f)));
            }
        }
    }
    if let Ok(rd) = fs::read_dir(repo.join("blobs")) {
        for e in rd.flatten() {
            let p = e.path();
            let partial = e.file_name().to_string_lossy().ends_with(".incomplete");
            if !partial && !used.contains(&blob_of(&p)) {
                fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
    }
    let after = dir_size(&repo.join("blobs"));
    if used.is_empty() {
        let _ = fs::remove_dir_all(repo);
    }
    Ok(Removed {
        items: vec![format!("{repo_id}@{commit}")],
        freed: before.saturating_sub(after),
    })
}

/// Evicts revisions, least recently used first, until the cache takes at most `max_size`
/// bytes. Unfinished downloads (`*.incomplete`) go first of all.
pub fn prune(cache_dir: &Path, max_size: u64) -> Result<Removed> {
    let stats = scan(cache_dir)?;
    let mut total = stats.size;
    let mut removed = Removed::default();
    if total <= max_size {
        return Ok(removed);
    }
    for repo in &stats.repos {
        if repo.incomplete == 0 {
            continue;
        }
        if let Ok(rd) = fs::read_dir(repo.path.join("blobs")) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().ends_with(".incomplete") {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    fs::remove_file(e.path()).map_err(|er| Error::io(e.path(), er))?;
                    total = total.saturating_sub(len);
                    removed.freed += len;
                    removed
                        .items
                        .push(format!("{} (unfinished download)", repo.repo_id));
                }
            }
        }
    }
    let mut revs: Vec<(&CachedRepo, &CachedRevision)> = stats
        .repos
        .iter()
        .flat_map(|r| r.revisions.iter().map(move |v| (r, v)))
        .collect();
    revs.sort_by_key(|r| r.1.last_used);
    for (repo, rev) in revs {
        if total <= max_size {
            break;
        }
        let r = remove_revision(&repo.path, &repo.repo_id, &rev.commit)?;
        total = total.saturating_sub(r.freed);
        removed.freed += r.freed;
        removed.items.extend(r.items);
    }
    Ok(removed)
}

/// Parses a size: `20G`, `500M`, `1.5GB`, `123` (bytes); K/M/G/T are powers of 1024.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let num_end = upper
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(upper.len());
    let (num, unit) = upper.split_at(num_end);
    let unit = unit.trim().trim_end_matches("IB").trim_end_matches('B');
    let mult: u64 = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => {
            return Err(Error::Invalid(format!(
                "`{s}` is not a size (expected a number with K, M, G or T, e.g. 20G)"
            )))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| Error::Invalid(format!("`{s}` is not a size (e.g. 20G)")))?;
    if !n.is_finite() || n < 0.0 {
        return Err(Error::Invalid(format!("`{s}` is not a size")));
    }
    Ok((n * mult as f64).round() as u64)
}

/// `1.5 GiB`-style.
pub fn format_size(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("1.5GB").unwrap(), 3 << 29);
        assert_eq!(parse_size("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("7").unwrap(), 7);
        assert!(parse_size("5X").is_err());
        assert!(parse_size("G").is_err());
        assert_eq!(format_size(1536), "1.5 KiB");
    }
}
