//! Chat templates (Jinja, rendered with minijinja).
//!
//! Renders Hugging Face chat templates the way transformers' `apply_chat_template` does: Jinja
//! with `trim_blocks` and `lstrip_blocks`, Python string methods (minijinja-contrib pycompat),
//! `raise_exception`, `strftime_now`, and a `tojson` that writes like Python's `json.dumps`
//! (no HTML escaping, `", "` and `": "` separators, non-ASCII kept).
//!
//! Variables: `messages` (list of `{role, content}`), `bos_token`, `eos_token`,
//! `add_generation_prompt`.

use crate::{Error, Result};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The chat template of microsoft/bitnet-b1.58-2B-4T (`tokenizer_config.json`): each message as
/// `Role: content<|eot_id|>` with the content trimmed, BOS before the first, and
/// `Assistant: ` as the generation prompt.
pub const BITNET_2B4T_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

/// A compiled chat template with its BOS/EOS strings.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; `bos`/`eos` are the texts of the model's BOS and EOS tokens.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| Error::Template(format!("cannot compile: {e:#}")))?;
        Ok(ChatTemplate {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// The BitNet b1.58 2B-4T format, for files that carry no template.
    pub fn bitnet_default() -> Self {
        Self::new(BITNET_2B4T_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>")
            .expect("the built-in BitNet template compiles")
    }

    /// Renders the conversation; `add_generation_prompt` appends the assistant's opening.
    ///
    /// A template comes with the model, from anyone: its render is bounded in work and in
    /// output (see [`RenderLimits`]), so a template with nested loops or one that builds
    /// gigabytes gives an error instead of hanging or exhausting memory.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let input: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum::<usize>()
            + self.bos.len()
            + self.eos.len();
        let limits = RenderLimits::for_input(messages.len(), input);
        self.render_limited(messages, add_generation_prompt, limits)
    }

    /// [`Self::render`] with explicit limits.
    pub fn render_limited(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        limits: RenderLimits,
    ) -> Result<String> {
        let mut env = self.env.clone();
        env.set_fuel(Some(limits.fuel));
        let tmpl = env
            .get_template(NAME)
            .map_err(|e| Error::Template(e.to_string()))?;
        let mut out = LimitedWriter {
            buf: Vec::new(),
            limit: limits.max_output_bytes,
            exceeded: false,
        };
        let ctx = minijinja::context! {
            messages => messages_value(messages),
            bos_token => &self.bos,
            eos_token => &self.eos,
            add_generation_prompt => add_generation_prompt,
        };
        match tmpl.render_captured_to(ctx, &mut out) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::OutOfFuel => {
                return Err(Error::Template(format!(
                    "the render took more than its budget of {} steps (a loop that does not end, or far more work than a conversation of {} messages needs)",
                    limits.fuel,
                    messages.len()
                )))
            }
            Err(_) if out.exceeded => {
                return Err(Error::Template(format!(
                    "the render wrote more than {} bytes, the limit for a conversation of {} bytes",
                    limits.max_output_bytes,
                    messages
                        .iter()
                        .map(|m| m.content.len())
                        .sum::<usize>()
                )))
            }
            Err(e) => return Err(Error::Template(format!("{e:#}"))),
        }
        String::from_utf8(out.buf)
            .map_err(|_| Error::Template("the render is not valid UTF-8".into()))
    }
}

/// The bounds on one render of a chat template: work and memory (minijinja's fuel: about
/// one unit per instruction, and one per ~64 bytes a value allocates) and output size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderLimits {
    pub fuel: u64,
    pub max_output_bytes: usize,
}

impl RenderLimits {
    /// Limits in proportion to the conversation (`messages`, and `input_bytes` of roles,
    /// contents and special tokens). Fuel: 2M (~128 MB of values, well under a second of
    /// rendering; real templates use a few hundred units a message) plus 1000 a message
    /// and 4 a byte. Output: 1 MiB plus 8 times the input (templates add markup around
    /// each message, and may repeat the system prompt).
    pub fn for_input(messages: usize, input_bytes: usize) -> Self {
        let fuel = 2_000_000u64
            .saturating_add((messages as u64).saturating_mul(1000))
            .saturating_add((input_bytes as u64).saturating_mul(4));
        RenderLimits {
            fuel,
            max_output_bytes: (1usize << 20).saturating_add(input_bytes.saturating_mul(8)),
        }
    }
}

/// Collects a render's output, failing the write that would pass `limit` bytes (minijinja
/// then stops rendering).
struct LimitedWriter {
    buf: Vec<u8>,
    limit: usize,
    exceeded: bool,
}

impl std::io::Write for LimitedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.limit {
            self.exceeded = true;
            return Err(std::io::Error::other("render output limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `[{"role": .., "content": ..}, ..]` as a Jinja value (Python dicts keep insertion order).
fn messages_value(messages: &[ChatMessage]) -> Value {
    messages
        .iter()
        .map(|m| {
            Value::from_pairs([
                ("role", Value::from(m.role.as_str())),
                ("content", Value::from(m.content.as_str())),
            ])
        })
        .collect()
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// Python's `time.strftime(format)` for the local time; this crate has no time-zone database,
/// so it formats UTC.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime_utc(&format, secs)
}

fn strftime_utc(format: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, mi, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let wd = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let mut out = String::new();
    let mut it = format.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('Y') => out += &y.to_string(),
            Some('m') => out += &format!("{m:02}"),
            Some('d') => out += &format!("{d:02}"),
            Some('-') => match it.next() {
                Some('d') => out += &d.to_string(),
                Some('m') => out += &m.to_string(),
                Some(o) => {
                    out.push_str("%-");
                    out.push(o)
                }
                None => out.push_str("%-"),
            },
            Some('H') => out += &format!("{h:02}"),
            Some('M') => out += &format!("{mi:02}"),
            Some('S') => out += &format!("{s:02}"),
            Some('B') => out += MONTHS[(m - 1) as usize],
            Some('b') => out += &MONTHS[(m - 1) as usize][..3],
            Some('A') => out += DAYS[wd],
            Some('a') => out += &DAYS[wd][..3],
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o)
            }
            None => out.push('%'),
        }
    }
    out
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let opts = JsonOpts {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    write_json(value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<usize>,
    sort_keys: bool,
    ensure_ascii: bool,
    item_sep: String,
    key_sep: String,
}

fn json_str(s: &str, ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn newline(opts: &JsonOpts, depth: usize, out: &mut String) {
    if let Some(n) = opts.indent {
        out.push('\n');
        out.push_str(&" ".repeat(n * depth));
    }
}

fn write_json(
    v: &Value,
    opts: &JsonOpts,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(f) = v.as_i64().map(|i| i as f64).filter(|_| v.is_integer()) {
                out.push_str(&(f as i64).to_string());
            } else {
                let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                out.push_str(&py_float(f));
            }
        }
        ValueKind::String | ValueKind::Bytes => json_str(&v.to_string(), opts.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(opts, depth + 1, out);
                write_json(item, opts, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(opts, depth, out);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if opts.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(opts, depth + 1, out);
                json_str(&k.to_string(), opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                write_json(&v.get_item(k)?, opts, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(opts, depth, out);
            }
            out.push('}');
        }
        _ => json_str(&v.to_string(), opts.ensure_ascii, out),
    }
    Ok(())
}

/// Python's `repr(float)` as json.dumps writes it.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if f == f.trunc() && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_are_bounded_in_work_and_output() {
        let msgs = [ChatMessage::new("user", "hi")];
        // Nested loops that would run ~10^15 steps: out of fuel, quickly.
        let t = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}{{ '' }}{% endfor %}{% endfor %}{% endfor %}",
            "", "",
        )
        .unwrap();
        let start = std::time::Instant::now();
        let e = t.render(&msgs, true).unwrap_err().to_string();
        let want = RenderLimits::for_input(1, 6).fuel;
        assert!(e.contains(&format!("budget of {want} steps")), "{e}");
        assert!(start.elapsed().as_secs() < 20, "{:?}", start.elapsed());
        // Recursion through a macro: a clear error too (minijinja's own depth limit).
        let t = ChatTemplate::new(
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "",
            "",
        )
        .unwrap();
        assert!(t.render(&msgs, true).is_err());
        // Gigabytes of output from little work per byte: stopped at the output limit.
        let t = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}{{ messages[0].content }}{% endfor %}{% endfor %}",
            "", "",
        )
        .unwrap();
        let big = "x".repeat(10_000);
        let e = t
            .render(&[ChatMessage::new("user", big.as_str())], true)
            .unwrap_err()
            .to_string();
        let want = RenderLimits::for_input(1, 10_004).max_output_bytes;
        assert!(e.contains(&format!("more than {want} bytes")), "{e}");
        // Big values built in one expression are charged too.
        let t = ChatTemplate::new(
            "{% set s = 'x' * 60000000 %}{% set t = s ~ s ~ s %}{{ t|length }}",
            "",
            "",
        )
        .unwrap();
        let e = t.render(&msgs, true).unwrap_err().to_string();
        assert!(e.contains("budget") || e.contains("too large"), "{e}");
        // Explicit limits: a render that fits its budget works, one over it does not.
        let t = ChatTemplate::new("{% for m in messages %}{{ m.content }}{% endfor %}", "", "")
            .unwrap();
        let ok = RenderLimits {
            fuel: 10_000,
            max_output_bytes: 4,
        };
        assert_eq!(t.render_limited(&msgs, true, ok).unwrap(), "hi");
        let tight = RenderLimits {
            fuel: 10_000,
            max_output_bytes: 1,
        };
        assert!(t.render_limited(&msgs, true, tight).is_err());
        let starved = RenderLimits {
            fuel: 1,
            max_output_bytes: 100,
        };
        let e = t
            .render_limited(&msgs, true, starved)
            .unwrap_err()
            .to_string();
        assert!(e.contains("budget of 1 steps"), "{e}");
    }

    use super::*;

    #[test]
    fn bitnet_default_renders_the_2b4t_format() {
        let t = ChatTemplate::bitnet_default();
        let msgs = [
            ChatMessage::new("system", "  Be brief. "),
            ChatMessage::new("user", "Hi\n"),
            ChatMessage::new("assistant", "Hello."),
            ChatMessage::new("user", "Bye"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: Hello.<|eot_id|>User: Bye<|eot_id|>Assistant: "
        );
        assert_eq!(
            t.render(&msgs[1..2], false).unwrap(),
            "<|begin_of_text|>User: Hi<|eot_id|>"
        );
    }

    #[test]
    fn tojson_writes_like_python() {
        let t2 = ChatTemplate::new(
            "{% set x = {'b': [1, 2.5, true, none], 'a': 'q\"'} %}{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ 'a<b>&é' | tojson }}|{{ x | tojson(sort_keys=true) }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t2.render(&[], false).unwrap(),
            "{\"b\": [1, 2.5, true, null], \"a\": \"q\\\"\"}|{\n  \"b\": [\n    1,\n    2.5,\n    true,\n    null\n  ],\n  \"a\": \"q\\\"\"\n}|\"a<b>&é\"|{\"a\": \"q\\\"\", \"b\": [1, 2.5, true, null]}"
        );
    }

    #[test]
    fn python_methods_and_exceptions() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content.strip().upper() }}{% if m.role not in ['user'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", " hi ")], false)
                .unwrap(),
            "HI"
        );
        let e = t
            .render(&[ChatMessage::new("tool", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad role tool"), "{e}");
    }

    #[test]
    fn strftime_known_date() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %A %b %-d %B", 1_709_211_909),
            "2024-02-29 13:05:09 Thursday Feb 29 February"
        );
    }
}
