use super::load_with;
use bitnet_inference::eval;
use bitnet_inference::tokenizer::Tokenizer;
use std::io::Read;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face model directory (default: $BITNET_MODEL, else the
    /// bitnet-tiny model shipped in the repository).
    #[arg(short, long, env = "BITNET_MODEL")]
    model: Option<PathBuf>,
    /// The text file to score (at most 16 MiB without --chunks; with it, only the beginning
    /// the chunks need is read).
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Tokens per chunk.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512, value_parser = super::parse_ctx_size)]
    ctx_size: usize,
    /// Score at most this many chunks (at least 1).
    #[arg(long, value_parser = super::parse_positive)]
    chunks: Option<usize>,
    /// Tokens per forward call.
    #[arg(short = 'b', long = "batch-size", default_value_t = 64, value_parser = super::in_range(1, 65536))]
    batch_size: usize,
    #[command(flatten)]
    model_flags: super::ModelFlags,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let m = load_with(
        &super::model_or_default(a.model.as_deref())?,
        &a.model_flags.options(),
    )?;
    // -c at most the model's context, checked before the file is read.
    super::context_size(Some(a.ctx_size), &m.model, a.ctx_size)?;
    // The tokens the chunks need: with --chunks, those of the text's beginning (the file is
    // read only as far as they need); otherwise the whole text's, read up to a bound.
    let tokens = match a.chunks {
        Some(n) => {
            let need = n.saturating_mul(a.ctx_size);
            let file = std::fs::File::open(&a.file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", a.file.display()))?;
            leading_tokens(
                &m.tokenizer,
                file,
                need,
                super::MAX_WHOLE_TEXT_BYTES as usize,
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", a.file.display()))?
        }
        None => {
            let text = super::read_text_at_most(
                Some(&a.file),
                super::MAX_WHOLE_TEXT_BYTES,
                "perplexity tokenizes the whole file at once without --chunks; give --chunks N \
                 to score the first N chunks of a larger file",
            )?;
            m.tokenizer.encode(&text, true)?
        }
    };
    // llama.cpp puts BOS at the start of every chunk when the model adds one.
    let adds_bos =
        m.tokenizer.bos_id().is_some() && tokens.first() == m.tokenizer.bos_id().as_ref();
    let bos = if adds_bos { m.tokenizer.bos_id() } else { None };
    eprintln!(
        "{} tokens, {} chunks of {}",
        tokens.len(),
        a.chunks.map_or(tokens.len() / a.ctx_size, |c| c
            .min(tokens.len() / a.ctx_size)),
        a.ctx_size
    );
    let started = std::time::Instant::now();
    let result = eval::perplexity(
        &m.model,
        &tokens,
        a.ctx_size,
        a.chunks,
        bos,
        a.batch_size,
        |i, ppl| eprint!("[{}]{ppl:.4} ", i + 1),
    )?;
    eprintln!();
    eprintln!(
        "{} tokens scored in {:.1} s",
        result.scored,
        started.elapsed().as_secs_f64()
    );
    println!("PPL = {:.4}", result.value());
    Ok(())
}

/// The first `need` tokens of the text `r` holds (with BOS, as the whole text's encoding
/// starts), or all of them if it has fewer, reading only as much of it as they take: a
/// beginning of the text is tokenized, and its first `need` tokens are kept when they end
/// well before the cut (by the bytes 16 tokens can cover), since only the tokens near a cut
/// can differ from the whole text's; otherwise twice as much is read, up to `cap` bytes at
/// once (tokenizing takes ~90 bytes of memory a byte): tokens that need more are refused.
pub fn leading_tokens(
    tk: &Tokenizer,
    mut r: impl Read,
    need: usize,
    cap: usize,
) -> anyhow::Result<Vec<u32>> {
    let margin = tk.max_text_bytes(16);
    let mut want = tk.max_text_bytes(need).saturating_add(margin);
    let mut buf = Vec::new();
    loop {
        // One byte past the cap tells a text of exactly `cap` bytes from a longer one.
        let limit = want.min(cap.saturating_add(1));
        let missing = limit.saturating_sub(buf.len()) as u64;
        let got = (&mut r).take(missing).read_to_end(&mut buf)?;
        let over = buf.len() > cap;
        let whole = (got as u64) < missing && !over;
        let read = &buf[..buf.len().min(cap)];
        let text = match std::str::from_utf8(read) {
            Ok(t) => t,
            // A character cut at the end of what was read: up to its start.
            Err(e) if !whole && e.error_len().is_none() => {
                std::str::from_utf8(&read[..e.valid_up_to()]).unwrap_or_default()
            }
            Err(e) => anyhow::bail!("not UTF-8 text: {e}"),
        };
        let mut ids = tk.encode(text, true)?;
        if ids.len() >= need {
            let covered: usize = ids[..need].iter().map(|&id| tk.token_bytes(id).len()).sum();
            if whole || covered.saturating_add(margin) <= text.len() {
                ids.truncate(need);
                return Ok(ids);
            }
        } else if whole {
            return Ok(ids);
        }
        if over {
            anyhow::bail!(
                "{need} tokens take more than the {cap} bytes of text read at once (tokenizing \
                 takes ~90 bytes of memory a byte); give fewer --chunks"
            );
        }
        want = want.saturating_mul(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The tokens of a text's beginning are those of the whole text, for both tokenizer
    /// kinds (tokenizer.json; GGUF BPE; and SentencePiece through SmolLM2's GGUF when
    /// $BITNET_SMOLLM2_GGUF names it), at every length, cut anywhere.
    #[test]
    fn leading_tokens_are_the_whole_texts() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut tokenizers =
            vec![
                Tokenizer::from_file(&root.join("models/bitnet-tiny/tokenizer.json")).unwrap(),
                bitnet_inference::model::load_tokenizer(&root.join(
                    "crates/bitnet-inference/tests/fixtures/bitnet-packed-gguf/model-i2s.gguf",
                ))
                .unwrap(),
            ];
        if let Ok(p) = std::env::var("BITNET_SMOLLM2_GGUF") {
            tokenizers.push(bitnet_inference::model::load_tokenizer(Path::new(&p)).unwrap());
        }
        // Prose, code and a multi-byte script, so cuts fall inside words, lines and
        // characters.
        let mut text = std::fs::read_to_string(root.join("README.md")).unwrap();
        text.push_str(
            &std::fs::read_to_string(root.join("crates/bitnet-cli/src/commands/mod.rs")).unwrap(),
        );
        text.push_str(&"日本語のテキスト、émoji 🦀 ".repeat(200));
        for tk in &tokenizers {
            let whole = tk.encode(&text, true).unwrap();
            for need in [
                1,
                7,
                64,
                500,
                3000,
                whole.len() - 1,
                whole.len(),
                whole.len() + 10,
            ] {
                let got = leading_tokens(tk, text.as_bytes(), need, usize::MAX).unwrap();
                let want = &whole[..need.min(whole.len())];
                let first_difference = got.iter().zip(want).position(|(a, b)| a != b);
                assert!(
                    got.len() == want.len() && first_difference.is_none(),
                    "{}: need {need}: {} tokens, expected {}; first difference at {first_difference:?}",
                    tk.describe(),
                    got.len(),
                    want.len()
                );
            }
            // Within a cap the tokens fit in, and past one they do not.
            let need = whole.len() / 2;
            let got = leading_tokens(tk, text.as_bytes(), need, text.len() - 1).unwrap();
            assert_eq!(got, whole[..need]);
            let e = leading_tokens(tk, text.as_bytes(), whole.len(), 1000).unwrap_err();
            assert!(
                e.to_string().contains(&format!(
                    "{} tokens take more than the 1000 bytes of text read at once",
                    whole.len()
                )),
                "{e}"
            );
        }
    }
}
