//! Incremental detokenization: token bytes in, whole UTF-8 characters out.

/// Turns token bytes into text as they come, holding back an incomplete UTF-8 character
/// until its last byte arrives. Its buffer is reused: pushing allocates nothing once warm.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Appends `bytes` and returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        let mut out = String::new();
        self.push_into(bytes, &mut out);
        out
    }

    /// Appends `bytes` and appends the text that is now complete to `out`. An invalid
    /// sequence (not just an unfinished one) is emitted as U+FFFD.
    pub fn push_into(&mut self, bytes: &[u8], out: &mut String) {
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    // from_utf8 vouched for these bytes: this never falls back.
                    out.push_str(std::str::from_utf8(&self.pending[start..valid]).unwrap_or(""));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + n;
                        }
                        None => {
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
    }

    /// Whatever is left at the end, invalid bytes replaced.
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        self.finish_into(&mut out);
        out
    }

    pub fn finish_into(&mut self, out: &mut String) {
        out.push_str(&String::from_utf8_lossy(&self.pending));
        self.pending.clear();
    }

    pub fn reset(&mut self) {
        self.pending.clear();
    }
}

/// Every token's bytes in one flat table, built once per model, so decoding a token borrows
/// instead of allocating.
#[derive(Debug, Clone, Default)]
pub struct TokenPieces {
    bytes: Vec<u8>,
    offsets: Vec<usize>,
}

impl TokenPieces {
    pub fn new(tokenizer: &crate::tokenizer::Tokenizer, vocab_size: usize) -> Self {
        let n = vocab_size.max(tokenizer.vocab_size());
        let mut t = TokenPieces {
            bytes: Vec::new(),
            offsets: Vec::with_capacity(n + 1),
        };
        t.offsets.push(0);
        for id in 0..n {
            t.bytes.extend_from_slice(&tokenizer.token_bytes(id as u32));
            t.offsets.push(t.bytes.len());
        }
        t
    }

    /// The bytes of token `id` (empty outside the table).
    pub fn get(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.bytes[a..b],
            _ => &[],
        }
    }

    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn memory_bytes(&self) -> usize {
        self.bytes.len() + self.offsets.len() * std::mem::size_of::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` in pieces of the given sizes and checks no piece has a broken character.
    fn stream_in_pieces(text: &str, sizes: &[usize]) -> Vec<String> {
        let bytes = text.as_bytes();
        let mut s = Utf8Stream::default();
        let mut out = Vec::new();
        let mut at = 0;
        for &n in sizes.iter().cycle() {
            if at >= bytes.len() {
                break;
            }
            let end = (at + n).min(bytes.len());
            let mut piece = String::new();
            s.push_into(&bytes[at..end], &mut piece);
            out.push(piece);
            at = end;
        }
        out.push(s.finish());
        out
    }

    #[test]
    fn utf8_stream_holds_split_characters() {
        let mut s = Utf8Stream::default();
        let emoji = "🦀".as_bytes();
        assert_eq!(s.push(b"a"), "a");
        assert_eq!(s.push(&emoji[..2]), "");
        assert_eq!(s.push(&emoji[2..]), "🦀");
        assert_eq!(s.push(&"日".as_bytes()[..1]), "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }

    #[test]
    fn emoji_and_cjk_never_split_whatever_the_token_boundaries() {
        let text = "héllo 日本語のテキスト 👩‍👩‍👧 🦀 and 한국어 ✓";
        for sizes in [&[1usize][..], &[2], &[3], &[5, 1, 2], &[7, 3]] {
            let pieces = stream_in_pieces(text, sizes);
            assert_eq!(pieces.concat(), text, "sizes {sizes:?}");
            assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
        }
    }

    #[test]
    fn invalid_bytes_become_replacement_and_stream_goes_on() {
        let mut s = Utf8Stream::default();
        let mut out = String::new();
        s.push_into(b"a\xFFb", &mut out);
        s.push_into(&"é".as_bytes()[..1], &mut out);
        assert_eq!(out, "a\u{FFFD}b");
        s.push_into(&"é".as_bytes()[1..], &mut out);
        assert_eq!(out, "a\u{FFFD}bé");
    }
}
