//! A local HTTP server with the Hugging Face Hub's URL layout, for the hub tests (no internet):
//! `GET /api/models/{owner}/{name}/revision/{rev}` (file list with sizes and LFS sha256),
//! `HEAD|GET /{owner}/{name}/resolve/{rev}/{file}` (ETag, X-Repo-Commit; LFS files answer 302
//! to `/cdn/{sha256}` with X-Linked-Etag / X-Linked-Size as the hub does), Range requests,
//! private and gated repositories, and a connection cut mid-file on demand.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct RepoFile {
    pub name: String,
    pub data: Vec<u8>,
    /// Stored with git LFS: the hub gives its sha256 and redirects to a CDN.
    pub lfs: bool,
}

impl RepoFile {
    pub fn sha256(&self) -> String {
        format!("{:x}", Sha256::digest(&self.data))
    }
    /// The hub's ETag: the sha256 for LFS files, the git blob id (40 hex digits) otherwise.
    pub fn etag(&self) -> String {
        if self.lfs {
            self.sha256()
        } else {
            let mut h = Sha256::new();
            h.update(b"blob ");
            h.update(&self.data);
            format!("{:x}", h.finalize())[..40].to_string()
        }
    }
}

#[derive(Clone)]
pub enum Access {
    Public,
    /// 401 without a token (or with a wrong one): private.
    Private(String),
    /// 401 without a token, 403 (`GatedRepo`) with a wrong one.
    Gated(String),
}

#[derive(Clone)]
pub struct Repo {
    pub id: String,
    pub commit: String,
    pub revisions: Vec<String>,
    pub files: Vec<RepoFile>,
    pub access: Access,
}

#[derive(Default)]
pub struct State {
    pub repos: Vec<Repo>,
    /// (file name, bytes): the next GET of that file sends the full Content-Length but only
    /// this many bytes, then closes the connection.
    pub cut: Option<(String, usize)>,
    /// "METHOD path range" of every request.
    pub log: Vec<String>,
}

pub struct HubServer {
    pub url: String,
    pub state: Arc<Mutex<State>>,
}

impl HubServer {
    pub fn start(repos: Vec<Repo>) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            repos,
            ..Default::default()
        }));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &st);
                });
            }
        });
        HubServer { url, state }
    }

    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

fn respond(
    s: &mut TcpStream,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
    head_only: bool,
    content_length: Option<usize>,
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\n\r\n",
        content_length.unwrap_or(body.len())
    ));
    s.write_all(out.as_bytes())?;
    if !head_only {
        s.write_all(body)?;
    }
    s.flush()
}

fn err(s: &mut TcpStream, status: &str, code: &str, msg: &str, head: bool) -> std::io::Result<()> {
    let body = format!("{{\"error\":\"{msg}\"}}");
    respond(
        s,
        status,
        &[
            ("X-Error-Code".into(), code.into()),
            ("X-Error-Message".into(), msg.into()),
            ("Content-Type".into(), "application/json".into()),
        ],
        body.as_bytes(),
        head,
        None,
    )
}

fn handle(mut conn: TcpStream, st: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range = headers.get("range").cloned();
    st.lock().unwrap().log.push(format!(
        "{method} {target} {}",
        range.clone().unwrap_or_default()
    ));
    let head = method == "HEAD";
    let token = headers
        .get("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(String::from);
    let path = target.split('?').next().unwrap_or("").to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();

    // CDN: /cdn/{sha256}
    if segs.len() == 2 && segs[0] == "cdn" {
        let file = {
            let s = st.lock().unwrap();
            s.repos
                .iter()
                .flat_map(|r| r.files.iter())
                .find(|f| f.lfs && f.sha256() == segs[1])
                .cloned()
        };
        return match file {
            Some(f) => send_file(&mut conn, st, &f, range.as_deref(), head, &[]),
            None => err(
                &mut conn,
                "404 Not Found",
                "EntryNotFound",
                "no such blob",
                head,
            ),
        };
    }

    let (repo_id, api, rest) = if segs.len() >= 5 && segs[0] == "api" && segs[1] == "models" {
        (format!("{}/{}", segs[2], segs[3]), true, &segs[4..])
    } else if segs.len() >= 2 {
        (format!("{}/{}", segs[0], segs[1]), false, &segs[2..])
    } else {
        return err(&mut conn, "404 Not Found", "RepoNotFound", "bad path", head);
    };
    let repo = st
        .lock()
        .unwrap()
        .repos
        .iter()
        .find(|r| r.id == repo_id)
        .cloned();
    let Some(repo) = repo else {
        return err(
            &mut conn,
            "404 Not Found",
            "RepoNotFound",
            "Repository not found",
            head,
        );
    };
    match &repo.access {
        Access::Public => {}
        Access::Private(t) if token.as_deref() == Some(t) => {}
        Access::Gated(t) if token.as_deref() == Some(t) => {}
        Access::Private(_) => {
            return err(
                &mut conn,
                "401 Unauthorized",
                "RepoNotFound",
                "Repository not found",
                head,
            )
        }
        Access::Gated(_) if token.is_none() => {
            return err(
                &mut conn,
                "401 Unauthorized",
                "GatedRepo",
                "Access to this model is restricted. You must be authenticated.",
                head,
            )
        }
        Access::Gated(_) => {
            return err(
                &mut conn,
                "403 Forbidden",
                "GatedRepo",
                "Access to this model is restricted and you are not in the authorized list.",
                head,
            )
        }
    }
    let rev_ok = |r: &str| r == repo.commit || repo.revisions.iter().any(|x| x == r);
    if api {
        // revision/{rev}
        if rest.len() != 2 || rest[0] != "revision" || !rev_ok(&decode(rest[1])) {
            return err(
                &mut conn,
                "404 Not Found",
                "RevisionNotFound",
                "Invalid rev id",
                head,
            );
        }
        let siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|f| {
                let mut v = serde_json::json!({
                    "rfilename": f.name, "blobId": f.etag(), "size": f.data.len()
                });
                if f.lfs {
                    v["lfs"] = serde_json::json!({
                        "sha256": f.sha256(), "size": f.data.len(), "pointerSize": 134
                    });
                }
                v
            })
            .collect();
        let body = serde_json::json!({
            "id": repo.id, "modelId": repo.id, "sha": repo.commit, "siblings": siblings
        })
        .to_string();
        return respond(
            &mut conn,
            "200 OK",
            &[("Content-Type".into(), "application/json".into())],
            body.as_bytes(),
            head,
            None,
        );
    }
    // resolve/{rev}/{file...}
    if rest.len() < 3 || rest[0] != "resolve" {
        return err(
            &mut conn,
            "404 Not Found",
            "EntryNotFound",
            "bad path",
            head,
        );
    }
    if !rev_ok(&decode(rest[1])) {
        return err(
            &mut conn,
            "404 Not Found",
            "RevisionNotFound",
            "Invalid rev id",
            head,
        );
    }
    let name = decode(&rest[2..].join("/"));
    let Some(f) = repo.files.iter().find(|f| f.name == name).cloned() else {
        return err(
            &mut conn,
            "404 Not Found",
            "EntryNotFound",
            "Entry not found",
            head,
        );
    };
    let common = vec![("X-Repo-Commit".to_string(), repo.commit.clone())];
    if f.lfs {
        let mut h = common;
        h.push(("X-Linked-Etag".into(), format!("\"{}\"", f.sha256())));
        h.push(("X-Linked-Size".into(), f.data.len().to_string()));
        h.push(("ETag".into(), format!("\"{}\"", f.etag())));
        // Another host, like the hub's CDN (clients follow same-host redirects on HEAD).
        let port = conn.local_addr()?.port();
        h.push((
            "Location".into(),
            format!("http://localhost:{port}/cdn/{}", f.sha256()),
        ));
        return respond(&mut conn, "302 Found", &h, b"", head, None);
    }
    let mut h = common;
    h.push(("ETag".into(), format!("\"{}\"", f.etag())));
    send_file(&mut conn, st, &f, range.as_deref(), head, &h)
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn send_file(
    conn: &mut TcpStream,
    st: &Mutex<State>,
    f: &RepoFile,
    range: Option<&str>,
    head: bool,
    extra: &[(String, String)],
) -> std::io::Result<()> {
    let start = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok());
    let mut h = extra.to_vec();
    h.push(("Accept-Ranges".into(), "bytes".into()));
    let (status, body) = match start {
        Some(s) if s >= f.data.len() => {
            return respond(conn, "416 Range Not Satisfiable", &h, b"", head, None)
        }
        Some(s) => {
            h.push((
                "Content-Range".into(),
                format!("bytes {s}-{}/{}", f.data.len() - 1, f.data.len()),
            ));
            ("206 Partial Content", &f.data[s..])
        }
        None => ("200 OK", &f.data[..]),
    };
    let cut = {
        let mut s = st.lock().unwrap();
        match &s.cut {
            Some((name, n)) if *name == f.name && !head => {
                let n = *n;
                s.cut = None;
                Some(n)
            }
            _ => None,
        }
    };
    if let Some(n) = cut {
        let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in &h {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        conn.write_all(out.as_bytes())?;
        conn.write_all(&body[..n.min(body.len())])?;
        conn.flush()?;
        return conn.shutdown(std::net::Shutdown::Both);
    }
    respond(conn, status, &h, body, head, None)
}

/// Reads a whole file of the fixtures.
pub fn fixture_files(dir: &std::path::Path, names: &[(&str, bool)]) -> Vec<RepoFile> {
    names
        .iter()
        .map(|(n, lfs)| RepoFile {
            name: n.to_string(),
            data: std::fs::read(dir.join(n)).unwrap(),
            lfs: *lfs,
        })
        .collect()
}
