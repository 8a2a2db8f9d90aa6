//! Stop strings, matched across token boundaries and never emitted.
//!
//! Text goes in as tokens produce it; what comes out is the text that can no longer be the
//! start of a stop string. A tail that could still grow into one waits; when a stop string is
//! complete, the text before it is released and the rest (the stop string included) dropped.

/// The matcher of one sequence. Its buffer is reused: nothing is allocated per token once warm.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
}

impl StopStrings {
    /// Empty strings are ignored.
    pub fn new<S: AsRef<str>>(stops: &[S]) -> Self {
        StopStrings {
            stops: stops
                .iter()
                .map(|s| s.as_ref().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            held: String::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Appends `text`; appends to `out` what is safe to show. Returns true when a stop string
    /// is complete (the text before it has been appended to `out`, nothing after).
    pub fn push(&mut self, text: &str, out: &mut String) -> bool {
        if self.stops.is_empty() {
            out.push_str(text);
            return false;
        }
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            out.push_str(&self.held[..at]);
            self.held.clear();
            return true;
        }
        // The longest tail of `held` that is a proper prefix of a stop string waits.
        let mut hold = 0;
        for s in &self.stops {
            let max = (s.len() - 1).min(self.held.len());
            for k in (hold + 1..=max).rev() {
                if s.is_char_boundary(k) && self.held.ends_with(&s[..k]) {
                    hold = k;
                    break;
                }
            }
        }
        let emit = self.held.len() - hold;
        out.push_str(&self.held[..emit]);
        self.held.drain(..emit);
        false
    }

    /// The end of the text: whatever was held is released.
    pub fn finish(&mut self, out: &mut String) {
        out.push_str(&self.held);
        self.held.clear();
    }

    pub fn reset(&mut self) {
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `pieces` through a matcher; returns each step's output and whether it stopped.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut m = StopStrings::new(stops);
        let mut outs = Vec::new();
        for p in pieces {
            let mut out = String::new();
            let stopped = m.push(p, &mut out);
            outs.push(out);
            if stopped {
                return (outs, true);
            }
        }
        let mut out = String::new();
        m.finish(&mut out);
        outs.push(out);
        (outs, false)
    }

    #[test]
    fn stop_string_split_over_three_tokens_is_not_emitted() {
        let (outs, stopped) = run(&["<|END|>"], &["Hello <", "|EN", "D|> tail"]);
        assert!(stopped);
        assert_eq!(outs, ["Hello ", "", ""]);
    }

    #[test]
    fn a_false_start_is_released() {
        let (outs, stopped) = run(&["###"], &["a #", "# b", " c"]);
        assert!(!stopped);
        assert_eq!(outs.concat(), "a ## b c");
        assert_eq!(outs[0], "a ");
        assert_eq!(outs[1], "## b");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (outs, stopped) = run(&["World", "lo W"], &["Hello", " World"]);
        assert!(stopped);
        assert_eq!(outs.concat(), "Hel");
    }

    #[test]
    fn multibyte_stop_strings() {
        let (outs, stopped) = run(&["。終"], &["日本語", "。", "終わり"]);
        assert!(stopped);
        assert_eq!(outs.concat(), "日本語");
        assert_eq!(outs[1], "", "the 。 waits");
    }

    #[test]
    fn no_stops_passes_through() {
        let (outs, stopped) = run(&[], &["a", "b"]);
        assert!(!stopped);
        assert_eq!(outs, ["a", "b", ""]);
    }
}
