//! Hub downloads and the shared Hugging Face cache, against a local server in the hub's URL
//! layout (no internet), and with Python's `huggingface_hub` reading our cache and writing one
//! we read.

use crate::hub_server;

use bitnet_inference::hub::{self, cache, HubConfig, HubModelId};
use hub_server::{Access, HubServer, Repo, RepoFile};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const COMMIT2: &str = "89abcdef0123456789abcdef0123456789abcdef";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn packed_files() -> Vec<RepoFile> {
    hub_server::fixture_files(
        &fixtures().join("bitnet-packed"),
        &[
            ("config.json", false),
            ("generation_config.json", false),
            ("tokenizer.json", false),
            ("model.safetensors", true),
            // Not needed by the model: must not be downloaded.
            ("logits.npy", true),
        ],
    )
}

fn gguf_files() -> Vec<RepoFile> {
    hub_server::fixture_files(
        &fixtures().join("bitnet-packed-gguf"),
        &[("model-tq20.gguf", true), ("model-i2s.gguf", true)],
    )
}

fn repo(id: &str, files: Vec<RepoFile>, access: Access) -> Repo {
    Repo {
        id: id.into(),
        commit: COMMIT.into(),
        revisions: vec!["main".into(), "v1".into()],
        files,
        access,
    }
}

fn server() -> HubServer {
    let mut one_gguf = gguf_files();
    one_gguf.truncate(1);
    HubServer::start(vec![
        repo("test-org/tiny-packed", packed_files(), Access::Public),
        repo("test-org/tiny-gguf", gguf_files(), Access::Public),
        repo("test-org/one-gguf", one_gguf, Access::Public),
        repo(
            "test-org/private",
            packed_files(),
            Access::Private("hf_secret".into()),
        ),
        repo(
            "test-org/gated",
            gguf_files(),
            Access::Gated("hf_gated".into()),
        ),
    ])
}

fn config(server: &HubServer, cache: &Path) -> HubConfig {
    HubConfig {
        endpoint: server.url.clone(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline: false,
        progress: None,
    }
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitnet-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn id(s: &str) -> HubModelId {
    HubModelId::parse(s).unwrap()
}

fn sha256_file(p: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(p).unwrap()))
}

#[test]
fn downloads_only_the_model_files_in_the_hf_layout() {
    let s = server();
    let dir = tempdir("normal");
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let ev = events.clone();
    let cfg = config(&s, &dir).with_progress(std::sync::Arc::new(move |p: &hub::Progress| {
        ev.lock().unwrap().push(p.clone())
    }));
    let r = hub::resolve(&cfg, &id("test-org/tiny-packed")).unwrap();
    let repo_dir = dir.join("models--test-org--tiny-packed");
    assert_eq!(r.commit, COMMIT);
    assert_eq!(r.path, repo_dir.join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
    let mut files = r.files.clone();
    files.sort();
    assert_eq!(
        files,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json"
        ]
    );
    assert!(!r.path.join("logits.npy").exists());
    // Each snapshot file is a relative link to blobs/{etag}; LFS etags are sha256 digests.
    let st = r.path.join("model.safetensors");
    let target = std::fs::read_link(&st).unwrap();
    let sha = sha256_file(&fixtures().join("bitnet-packed/model.safetensors"));
    assert_eq!(target, Path::new("../../blobs").join(&sha));
    assert_eq!(sha256_file(&st), sha);
    assert_eq!(
        r.downloaded_bytes as usize,
        packed_files()[..4]
            .iter()
            .map(|f| f.data.len())
            .sum::<usize>()
    );
    let ev = events.lock().unwrap();
    assert!(ev.contains(&hub::Progress::Finish {
        file: "model.safetensors".into()
    }));
    // The model loads from the snapshot and gives the fixture's logits.
    let m = bitnet_inference::model::load(&r.path).unwrap();
    let direct = bitnet_inference::model::load(&fixtures().join("bitnet-packed")).unwrap();
    assert_eq!(m.config, direct.config);

    // A second resolve downloads nothing; offline resolves from the cache alone.
    let before = s.log().len();
    let again = hub::resolve(&config(&s, &dir), &id("test-org/tiny-packed")).unwrap();
    assert_eq!(again.downloaded_bytes, 0);
    assert!(s.log()[before..].iter().all(|l| !l.starts_with("GET /cdn")));
    let n = s.log().len();
    let off = hub::resolve(
        &config(&s, &dir).with_offline(true),
        &id("test-org/tiny-packed"),
    )
    .unwrap();
    assert_eq!(off.path, r.path);
    assert_eq!(s.log().len(), n, "offline must not touch the network");
    // A tag resolves to the same commit and gets its own ref.
    hub::resolve(&config(&s, &dir), &id("test-org/tiny-packed@v1")).unwrap();
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/v1")).unwrap(),
        COMMIT
    );
}

#[test]
fn gguf_repos_pick_one_file() {
    let s = server();
    let dir = tempdir("gguf");
    let e = hub::resolve(&config(&s, &dir), &id("test-org/tiny-gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model-tq20.gguf") && e.contains("model-i2s.gguf") && e.contains(":FILE"),
        "{e}"
    );
    let r = hub::resolve(&config(&s, &dir), &id("test-org/tiny-gguf:model-i2s.gguf")).unwrap();
    assert!(r.path.ends_with("model-i2s.gguf"));
    assert_eq!(r.files, ["model-i2s.gguf"]);
    assert!(!r.snapshot_dir.join("model-tq20.gguf").exists());
    bitnet_inference::model::load(&r.path).unwrap();
    let one = hub::resolve(&config(&s, &dir), &id("test-org/one-gguf")).unwrap();
    assert!(one.path.ends_with("model-tq20.gguf"));
    // Offline: the file taken is there, the other one is named as missing.
    let off = config(&s, &dir).with_offline(true);
    hub::resolve(&off, &id("test-org/tiny-gguf:model-i2s.gguf")).unwrap();
    let e = hub::resolve(&off, &id("test-org/tiny-gguf:model-tq20.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model-tq20.gguf") && e.contains("missing") && e.contains("offline"),
        "{e}"
    );
    let e = hub::resolve(&off, &id("test-org/never-pulled"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("models--test-org--never-pulled") && e.contains("not in the"),
        "{e}"
    );
    let e = hub::resolve(&off, &id("test-org/one-gguf@v9"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("refs/v9") || e.contains("refs\\v9"), "{e}");
}

#[test]
fn not_found_errors() {
    let s = server();
    let dir = tempdir("404");
    let cfg = config(&s, &dir);
    let e = hub::resolve(&cfg, &id("test-org/nothing"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("404") && e.contains("test-org/nothing"), "{e}");
    let e = hub::resolve(&cfg, &id("test-org/tiny-packed@nobranch"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("revision `nobranch`"), "{e}");
    let e = hub::resolve(&cfg, &id("test-org/tiny-gguf:other.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no file `other.gguf`") && e.contains("model-i2s.gguf"),
        "{e}"
    );
    // Nothing was written for the failures.
    assert!(!dir.join("models--test-org--nothing").exists());
    // Unreachable hub, empty cache: a network error naming the endpoint.
    let mut bad = config(&s, &dir);
    bad.endpoint = "http://127.0.0.1:9".into();
    let e = hub::resolve(&bad, &id("test-org/tiny-packed"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot reach") && e.contains("127.0.0.1:9"),
        "{e}"
    );
}

#[test]
fn private_and_gated_repos_need_a_token() {
    let s = server();
    let dir = tempdir("auth");
    let e = hub::resolve(&config(&s, &dir), &id("test-org/private"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("401") && e.contains("HF_TOKEN") && e.contains("token"),
        "{e}"
    );
    let mut cfg = config(&s, &dir);
    cfg.token = Some("hf_secret".into());
    hub::resolve(&cfg, &id("test-org/private")).unwrap();

    let gated = id("test-org/gated:model-tq20.gguf");
    let e = hub::resolve(&config(&s, &dir), &gated)
        .unwrap_err()
        .to_string();
    assert!(e.contains("401") && e.contains("HF_TOKEN"), "{e}");
    let mut wrong = config(&s, &dir);
    wrong.token = Some("hf_wrong".into());
    let e = hub::resolve(&wrong, &gated).unwrap_err().to_string();
    assert!(
        e.contains("403") && e.contains("gated") && e.contains("accept its terms"),
        "{e}"
    );
    let mut right = config(&s, &dir);
    right.token = Some("hf_gated".into());
    let r = hub::resolve(&right, &gated).unwrap();
    assert_eq!(
        sha256_file(&r.path),
        sha256_file(&fixtures().join("bitnet-packed-gguf/model-tq20.gguf"))
    );
}

#[test]
fn a_cut_download_resumes_with_a_range_request() {
    let s = server();
    let dir = tempdir("resume");
    s.state.lock().unwrap().cut = Some(("model.safetensors".into(), 100_000));
    let e = hub::resolve(&config(&s, &dir), &id("test-org/tiny-packed"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("broke after 100000") && e.contains("resume"),
        "{e}"
    );
    let sha = sha256_file(&fixtures().join("bitnet-packed/model.safetensors"));
    let blobs = dir.join("models--test-org--tiny-packed/blobs");
    let partial = blobs.join(format!("{sha}.incomplete"));
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), 100_000);
    assert!(
        !blobs.join(&sha).exists(),
        "a partial blob must not pass for a whole one"
    );
    let snap = dir
        .join("models--test-org--tiny-packed/snapshots")
        .join(COMMIT);
    assert!(!snap.join("model.safetensors").exists());
    // Offline, the cut model is reported missing, not loaded half-written.
    let e = hub::resolve(
        &config(&s, &dir).with_offline(true),
        &id("test-org/tiny-packed"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("not in the cache") || e.contains("missing"),
        "{e}"
    );

    let r = hub::resolve(&config(&s, &dir), &id("test-org/tiny-packed")).unwrap();
    let total = std::fs::metadata(fixtures().join("bitnet-packed/model.safetensors"))
        .unwrap()
        .len();
    assert!(s
        .log()
        .iter()
        .any(|l| l.starts_with(&format!("GET /cdn/{sha} bytes=100000-"))));
    assert_eq!(r.downloaded_bytes, total - 100_000);
    assert!(!partial.exists());
    assert_eq!(sha256_file(&r.path.join("model.safetensors")), sha);
}

#[test]
fn cache_stats_remove_and_prune() {
    let s = server();
    let dir = tempdir("cache");
    let cfg = config(&s, &dir);
    hub::resolve(&cfg, &id("test-org/tiny-packed")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    hub::resolve(&cfg, &id("test-org/one-gguf")).unwrap();
    let stats = cache::scan(&dir).unwrap();
    let ids: Vec<&str> = stats.repos.iter().map(|r| r.repo_id.as_str()).collect();
    assert_eq!(ids, ["test-org/one-gguf", "test-org/tiny-packed"]);
    let packed = &stats.repos[1];
    let want: u64 = packed_files()[..4]
        .iter()
        .map(|f| f.data.len() as u64)
        .sum();
    assert_eq!(packed.size, want);
    assert_eq!(packed.revisions.len(), 1);
    assert_eq!(packed.revisions[0].refs, ["main"]);
    assert_eq!(packed.revisions[0].size, want);
    assert!(stats.repos[0].last_used >= packed.last_used);
    assert_eq!(stats.size, want + stats.repos[0].size);

    // Prune to just above the GGUF model: the least recently used (tiny-packed) goes.
    let gguf_size = stats.repos[0].size;
    let removed = cache::prune(&dir, gguf_size + 10).unwrap();
    assert_eq!(removed.items, [format!("test-org/tiny-packed@{COMMIT}")]);
    assert_eq!(removed.freed, want);
    assert!(!dir.join("models--test-org--tiny-packed").exists());
    let stats = cache::scan(&dir).unwrap();
    assert_eq!(stats.size, gguf_size);

    // Using a model makes it recent: re-pull tiny-packed, touch one-gguf, prune again.
    hub::resolve(&cfg, &id("test-org/tiny-packed")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    hub::resolve(&cfg.clone().with_offline(true), &id("test-org/one-gguf")).unwrap();
    let removed = cache::prune(&dir, gguf_size + 10).unwrap();
    assert_eq!(removed.items, [format!("test-org/tiny-packed@{COMMIT}")]);

    let r = cache::remove(&dir, &id("test-org/one-gguf"), true).unwrap();
    assert_eq!(r.freed, gguf_size);
    assert!(cache::scan(&dir).unwrap().repos.is_empty());
    let e = cache::remove(&dir, &id("test-org/one-gguf"), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not in the cache"), "{e}");
}

#[test]
fn removing_one_revision_keeps_shared_blobs() {
    let s = server();
    let dir = tempdir("revs");
    hub::resolve(&config(&s, &dir), &id("test-org/tiny-packed")).unwrap();
    // A second commit sharing every blob but config.json.
    {
        let mut st = s.state.lock().unwrap();
        let r = st
            .repos
            .iter_mut()
            .find(|r| r.id == "test-org/tiny-packed")
            .unwrap();
        r.commit = COMMIT2.into();
        r.files[0].data.extend_from_slice(b"\n");
    }
    hub::resolve(&config(&s, &dir), &id("test-org/tiny-packed")).unwrap();
    let repo_dir = dir.join("models--test-org--tiny-packed");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT2
    );
    let stats = cache::scan(&dir).unwrap();
    assert_eq!(stats.repos[0].revisions.len(), 2);
    let blobs_before = std::fs::read_dir(repo_dir.join("blobs")).unwrap().count();
    assert_eq!(blobs_before, 5); // 4 files + the changed config.json
    let r = cache::remove(&dir, &id(&format!("test-org/tiny-packed@{COMMIT}")), false).unwrap();
    assert_eq!(r.items, [format!("test-org/tiny-packed@{COMMIT}")]);
    assert_eq!(
        std::fs::read_dir(repo_dir.join("blobs")).unwrap().count(),
        4
    );
    bitnet_inference::model::load(&repo_dir.join("snapshots").join(COMMIT2)).unwrap();
}

// ---------------------------------------------------------------- Python huggingface_hub

fn python_hub() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import huggingface_hub"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("BITNET_SKIP_PY_HUB").is_ok_and(|v| v == "1") {
        eprintln!("huggingface_hub not installed; skipped (BITNET_SKIP_PY_HUB=1)");
        return false;
    }
    assert!(
        ok,
        "Python's huggingface_hub is needed (`pip install huggingface_hub`), or set \
         BITNET_SKIP_PY_HUB=1 to skip"
    );
    true
}

fn python(script: &str, envs: &[(&str, &str)]) -> String {
    let mut c = Command::new("python3");
    c.args(["-c", script])
        .env_remove("HF_TOKEN")
        .env_remove("HF_HOME")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env("HF_HUB_DISABLE_XET", "1");
    for (k, v) in envs {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn python_huggingface_hub_reads_our_cache() {
    if !python_hub() {
        return;
    }
    let s = server();
    let dir = tempdir("py-reads");
    let ours = hub::resolve(&config(&s, &dir), &id("test-org/tiny-packed")).unwrap();
    hub::resolve(&config(&s, &dir), &id("test-org/tiny-gguf:model-i2s.gguf")).unwrap();
    let out = python(
        "from huggingface_hub import hf_hub_download, scan_cache_dir\n\
         p = hf_hub_download('test-org/tiny-packed', 'model.safetensors')\n\
         g = hf_hub_download('test-org/tiny-gguf', 'model-i2s.gguf')\n\
         info = {r.repo_id: (r.size_on_disk, sorted(r.refs)) for r in scan_cache_dir().repos}\n\
         print(p); print(g); print(sorted(info.items()))",
        &[
            ("HF_HUB_CACHE", dir.to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
            // Any request would fail: offline must not need one.
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(Path::new(lines[0]), ours.path.join("model.safetensors"));
    assert_eq!(
        sha256_file(Path::new(lines[1])),
        sha256_file(&fixtures().join("bitnet-packed-gguf/model-i2s.gguf"))
    );
    let want: u64 = packed_files()[..4]
        .iter()
        .map(|f| f.data.len() as u64)
        .sum();
    assert!(
        lines[2].contains(&format!("('test-org/tiny-packed', ({want}, ['main']))")),
        "{out}"
    );
}

#[test]
fn we_read_a_cache_written_by_python() {
    if !python_hub() {
        return;
    }
    let s = server();
    let dir = tempdir("py-writes");
    // Python downloads from the local server, into its cache layout.
    python(
        "from huggingface_hub import hf_hub_download\n\
         for f in ['config.json', 'generation_config.json', 'tokenizer.json', 'model.safetensors']:\n\
         \x20   hf_hub_download('test-org/tiny-packed', f)\n\
         hf_hub_download('test-org/tiny-gguf', 'model-tq20.gguf', revision='v1')",
        &[
            ("HF_HUB_CACHE", dir.to_str().unwrap()),
            ("HF_ENDPOINT", &s.url),
        ],
    );
    let n = s.log().len();
    let off = config(&s, &dir).with_offline(true);
    let r = hub::resolve(&off, &id("test-org/tiny-packed")).unwrap();
    assert_eq!(r.commit, COMMIT);
    let m = bitnet_inference::model::load(&r.path).unwrap();
    let direct = bitnet_inference::model::load(&fixtures().join("bitnet-packed")).unwrap();
    assert_eq!(m.config, direct.config);
    let g = hub::resolve(&off, &id("test-org/tiny-gguf@v1:model-tq20.gguf")).unwrap();
    bitnet_inference::model::load(&g.path).unwrap();
    assert_eq!(s.log().len(), n);
    // Online, everything is already there: no file is downloaded again.
    let again = hub::resolve(&config(&s, &dir), &id("test-org/tiny-packed")).unwrap();
    assert_eq!(again.downloaded_bytes, 0);
    let stats = cache::scan(&dir).unwrap();
    assert_eq!(stats.repos.len(), 2);
    let gg = stats
        .repos
        .iter()
        .find(|r| r.repo_id == "test-org/tiny-gguf")
        .unwrap();
    assert_eq!(gg.revisions[0].refs, ["v1"]);
}
