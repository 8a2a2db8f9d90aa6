//! `bitnet chat` on the tiny fixture model: piped stdin for plain turns, and a
//! pseudo-terminal (tmux) for line editing, Ctrl-C mid-answer and /reset.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bitnet-inference/tests/fixtures/bitnet-packed")
}

/// The "(N reused)" figures of the stats lines.
fn reused(text: &str) -> Vec<usize> {
    text.split(" reused)")
        .filter_map(|s| s.rsplit('(').next())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

#[test]
fn piped_turns_reuse_the_cache() {
    let dir = std::env::temp_dir().join(format!("bitnet-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let save = dir.join("conv.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "chat",
            "-m",
            model().to_str().unwrap(),
            "--temp",
            "0",
            "-n",
            "6",
        ])
        .args(["--system", "be brief"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let script = format!(
        "hello\nhow are you\n/save {}\n/reset\nhello\n",
        save.display()
    );
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches(" reused)").count(), 3, "{err}");
    let r = reused(&err);
    assert_eq!(r.len(), 3, "{err}");
    assert_eq!(r[0], 0);
    assert!(r[1] > 0, "the second turn reuses the first's cache: {err}");
    // After /reset the same first turn is found in the scheduler's prefix cache (all but
    // the last prompt token, which is run again for its logits) and answered the same.
    assert!(
        err.lines().nth(2).unwrap().contains("prefill 1 new tokens"),
        "{err}"
    );
    let answers: Vec<&str> = out.lines().filter(|l| !l.starts_with('[')).collect();
    assert_eq!(answers.len(), 3, "{out}");
    assert_eq!(answers[0], answers[2], "{out}");
    assert!(out.contains("[conversation reset]"));
    let conv: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&save).unwrap()).unwrap();
    let roles: Vec<&str> = conv
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["system", "user", "assistant", "user", "assistant"]);
    assert_eq!(conv[3]["content"], "how are you");
}

struct Tmux(String);

impl Tmux {
    /// A detached tmux session `name`, `width` × 40, running the shell command `cmd`.
    fn start(name: String, width: u32, cmd: &str) -> Self {
        let ok = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                &name,
                "-x",
                &width.to_string(),
                "-y",
                "40",
                cmd,
            ])
            .status()
            .expect("tmux");
        assert!(ok.success());
        Tmux(name)
    }
    fn keys(&self, keys: &[&str]) {
        let ok = Command::new("tmux")
            .args(["send-keys", "-t", &self.0])
            .args(keys)
            .status()
            .unwrap();
        assert!(ok.success());
    }
    fn screen(&self) -> String {
        let o = Command::new("tmux")
            .args(["capture-pane", "-p", "-J", "-S", "-10000", "-t", &self.0])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    /// Waits until `pred` holds for the screen.
    fn wait(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "waiting for {what}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}

#[test]
fn terminal_session_ctrl_c_stops_the_answer_and_keeps_the_session() {
    let name = format!("bitnet-chat-test-{}", std::process::id());
    let cmd = format!(
        "BITNET_THREADS=2 {} chat -m {} --temp 0 --ignore-eos --context-shift -n 1000000 --no-history; echo \"[chat exited with status $?]\"; sleep 60",
        env!("CARGO_BIN_EXE_bitnet"),
        model().display()
    );
    let t = Tmux::start(name, 120, &cmd);
    t.wait("the banner", |s| s.contains("/help for commands"));
    t.keys(&["/help", "Enter"]);
    t.wait("help", |s| s.contains("Ctrl-C stops the current answer"));

    // An endless answer (no EOS, sliding window): only Ctrl-C ends it.
    t.keys(&["hello", "Enter"]);
    std::thread::sleep(Duration::from_millis(700));
    t.keys(&["C-c"]);
    let s = t.wait("the first interrupt", |s| {
        s.matches("| interrupted]").count() == 1
    });
    assert!(s.contains("tok/s"));
    // The session goes on, reusing the cache.
    t.keys(&["again", "Enter"]);
    std::thread::sleep(Duration::from_millis(700));
    t.keys(&["C-c"]);
    let s = t.wait("the second interrupt", |s| {
        s.matches("| interrupted]").count() == 2
    });
    let r = reused(&s);
    assert!(
        r.len() == 2 && r[1] > 0,
        "second turn reuses the cache: {r:?}"
    );
    t.keys(&["/reset", "Enter"]);
    t.wait("reset", |s| s.contains("[conversation reset]"));
    t.keys(&["third", "Enter"]);
    std::thread::sleep(Duration::from_millis(500));
    t.keys(&["C-c"]);
    let s = t.wait("the third interrupt", |s| {
        s.matches("| interrupted]").count() == 3
    });
    // After /reset only the template's opening can match the cached conversation.
    let after_reset = *reused(&s).last().unwrap();
    assert!(after_reset <= 4, "reused after /reset: {after_reset}");
    // Line editing: Up recalls the last line.
    t.keys(&["Up"]);
    t.wait("history recall", |s| {
        s.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| l.contains("> third"))
    });
    t.keys(&["C-u", "/exit", "Enter"]);
    // The shell prints chat's exit status once it has quit.
    t.wait("exit", |s| s.contains("[chat exited with status 0]"));
}

/// A history file that cannot be written is said on stderr, naming it, and chat still ends
/// normally (the conversation was printed; only the line-editing history is lost).
#[test]
fn terminal_session_says_when_its_history_cannot_be_saved() {
    let name = format!("bitnet-chat-history-{}", std::process::id());
    let cmd = format!(
        "BITNET_THREADS=2 {} chat -m {} --history-file /nonexistent-dir/chat-history; echo \"[chat exited with status $?]\"; sleep 60",
        env!("CARGO_BIN_EXE_bitnet"),
        model().display()
    );
    let t = Tmux::start(name, 160, &cmd);
    t.wait("the banner", |s| s.contains("/help for commands"));
    t.keys(&["/exit", "Enter"]);
    let s = t.wait("exit", |s| s.contains("[chat exited with status 0]"));
    assert!(
        s.contains("the chat history could not be saved to /nonexistent-dir/chat-history"),
        "{s}"
    );
}

/// Runs `bitnet chat` with `args` (no model from the environment) on the piped `script`;
/// returns its exit status, stdout and stderr.
fn chat_piped(args: &[&str], script: &str) -> (std::process::ExitStatus, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .arg("chat")
        .args(args)
        .env("BITNET_THREADS", "2")
        .env_remove("BITNET_MODEL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    (
        o.status,
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The "prefill N new tokens" figures of the stats lines.
fn prefilled(text: &str) -> Vec<usize> {
    text.split(" new tokens of")
        .filter_map(|s| s.rsplit("prefill ").next())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// With the shipped model, turn 2 re-prefilled 385 of 399 tokens: the template's "Assistant: "
/// ends with a space, and the answer re-tokenized with it splits differently from the ids the
/// model generated. The history is now the ids themselves: turn 2 prefills the new user turn
/// (its end token, "User: ...", the assistant's opening) and the last answer token.
#[test]
fn shipped_model_turn_two_prefills_only_the_new_turn() {
    let (status, _, err) = chat_piped(
        &["--temp", "0", "-n", "40"],
        "Tell me a story about a fish\nwhat happened next\n",
    );
    assert!(status.success(), "{err}");
    let (p, r) = (prefilled(&err), reused(&err));
    assert_eq!((p.len(), r.len()), (2, 2), "{err}");
    assert_eq!(r[0], 0);
    assert!(r[1] > 10, "turn 2 reuses turn 1: {err}");
    // "<|eot_id|>User: what happened next<|eot_id|>Assistant: " and the last answer token.
    assert!(p[1] <= 16, "turn 2 prefills {} tokens: {err}", p[1]);
}

/// A full context no longer ends the chat on turn 3: the window slides (or the oldest
/// exchanges are left out), with a note; `--no-context-shift` gives the old error.
#[test]
fn full_context_slides_with_a_note() {
    let script = "hello there\ntell me more\nand then what\nwhy is that\n";
    let args = ["--temp", "0", "--ignore-eos", "-n", "40", "-c", "96"];
    let (status, out, err) = chat_piped(&args, script);
    assert!(status.success(), "{err}");
    assert!(!out.contains("[error"), "{out}\n{err}");
    assert_eq!(reused(&err).len(), 4, "four answers: {err}");
    assert!(err.contains("[context full (96 tokens)"), "{err}");
    let mut off = args.to_vec();
    off.push("--no-context-shift");
    // Errors go to stderr, and with piped input a failed turn fails the exit status.
    let (status, out, err) = chat_piped(&off, script);
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("[error:") && err.contains("context") && !out.contains("[error"),
        "{out}\n{err}"
    );
    assert!(!err.contains("[context full"), "{err}");
}

/// The system prompt may come from a file, as run's prompt may (`-f`).
#[test]
fn system_prompt_from_a_file() {
    let dir = std::env::temp_dir().join(format!("bitnet-chat-sysf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("system.txt");
    std::fs::write(&file, "You answer in one line.\n").unwrap();
    let save = dir.join("conv.json");
    let script = format!("hi\n/save {}\n", save.display());
    let (status, _, err) = chat_piped(
        &[
            "--temp",
            "0",
            "-n",
            "4",
            "--system-file",
            file.to_str().unwrap(),
        ],
        &script,
    );
    assert!(status.success(), "{err}");
    let conv: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&save).unwrap()).unwrap();
    assert_eq!(conv[0]["role"], "system");
    assert_eq!(conv[0]["content"], "You answer in one line.");
}
