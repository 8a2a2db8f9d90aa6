//! Constrained decoding: a rule, per sequence, over which tokens may come next.
//!
//! Before each sampling step a [`TokenConstraint`] fills a [`TokenMask`] with the tokens it
//! allows and says whether the output may end there; the sequence sets every other logit to
//! −∞ before the sampler chain runs (so greedy picks the best allowed token, and bias,
//! penalties and filters only ever see allowed ones), lets its end tokens through only where
//! the output may end, tells the constraint the token it chose, and finishes with
//! [`FinishReason::Stop`](super::FinishReason::Stop) once the constraint says the output is
//! complete. A [`ConstraintSource`] is the compiled rule a request carries: each sequence
//! (each choice of `n`) starts its own constraint from it.
//!
//! The JSON-schema implementation is [`super::json`] (cargo feature `constrained`).

use std::fmt;
use std::sync::Arc;

/// The tokens allowed at one step: one bit a token id. A sequence keeps one and refills it
/// every step, so masking allocates nothing once it has its size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenMask {
    words: Vec<u32>,
    len: usize,
}

impl TokenMask {
    /// Sizes the mask for `len` token ids, none allowed.
    pub fn clear(&mut self, len: usize) {
        self.len = len;
        self.words.clear();
        self.words.resize(len.div_ceil(32), 0);
    }

    /// Token ids the mask covers.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn allow(&mut self, id: u32) {
        let i = id as usize;
        if i < self.len {
            self.words[i / 32] |= 1 << (i % 32);
        }
    }

    pub fn is_allowed(&self, id: u32) -> bool {
        let i = id as usize;
        i < self.len && (self.words[i / 32] >> (i % 32)) & 1 == 1
    }

    /// The bits, 32 ids a word, lowest id in the lowest bit (llguidance's layout), to be
    /// filled in bulk. Bits past `len` are ignored.
    pub fn words_mut(&mut self) -> &mut [u32] {
        &mut self.words
    }

    /// How many ids are allowed.
    pub fn count(&self) -> usize {
        let full = self.len / 32;
        let mut n: usize = self.words[..full]
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum();
        if !self.len.is_multiple_of(32) {
            n += (self.words[full] & ((1u32 << (self.len % 32)) - 1)).count_ones() as usize;
        }
        n
    }

    /// Sets the logit of every token the mask does not allow to −∞ (ids past the mask
    /// included).
    pub fn apply(&self, logits: &mut [f32]) {
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = self.words.get(w).copied().unwrap_or(0);
            let whole = chunk.len() == 32 && (w + 1) * 32 <= self.len;
            if whole && bits == u32::MAX {
                continue;
            }
            // Most words of a grammar's mask allow nothing.
            if bits == 0 || w * 32 >= self.len {
                chunk.fill(f32::NEG_INFINITY);
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                let id = w * 32 + b;
                if id >= self.len || (bits >> b) & 1 == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// One sequence's rule over its output, consulted once per generated token.
pub trait TokenConstraint: Send {
    /// Fills `mask` (already sized to the vocabulary and cleared) with the tokens that may
    /// come next, end tokens aside, and returns whether the output may end here (then the
    /// sequence's end tokens are allowed too). An error ends the sequence with it.
    fn next_allowed(&mut self, mask: &mut TokenMask) -> Result<bool, String>;
    /// Takes the token the sequence chose (one the last mask allowed).
    fn accept(&mut self, token: u32) -> Result<(), String>;
    /// Whether the output is complete: nothing may follow, so the sequence stops here.
    fn is_complete(&self) -> bool;
}

/// A compiled rule from which each sequence starts its own [`TokenConstraint`].
pub trait ConstraintSource: Send + Sync {
    fn start(&self) -> Result<Box<dyn TokenConstraint>, String>;
    /// A short description for logs and `Debug` (e.g. `json_schema "person"`).
    fn describe(&self) -> String;
}

/// A [`ConstraintSource`] shared by the requests (the choices) that use it; cheap to clone.
/// Two are equal when they are the same compiled rule.
#[derive(Clone)]
pub struct SharedConstraint(Arc<dyn ConstraintSource>);

impl SharedConstraint {
    pub fn new(source: impl ConstraintSource + 'static) -> Self {
        SharedConstraint(Arc::new(source))
    }

    /// A fresh constraint for one sequence.
    pub fn start(&self) -> Result<Box<dyn TokenConstraint>, String> {
        self.0.start()
    }
}

impl fmt::Debug for SharedConstraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedConstraint({})", self.0.describe())
    }
}

impl PartialEq for SharedConstraint {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_allows_only_its_bits_and_covers_partial_words() {
        let mut m = TokenMask::default();
        m.clear(70);
        for id in [0, 31, 32, 63, 69, 70, 1000] {
            m.allow(id);
        }
        assert_eq!(m.count(), 5);
        assert!(m.is_allowed(69) && !m.is_allowed(70) && !m.is_allowed(1));
        let mut logits: Vec<f32> = (0..75).map(|i| i as f32).collect();
        m.apply(&mut logits);
        for (i, &l) in logits.iter().enumerate() {
            let kept = [0, 31, 32, 63, 69].contains(&i);
            assert_eq!(l == f32::NEG_INFINITY, !kept, "id {i}");
            if kept {
                assert_eq!(l, i as f32);
            }
        }
        // A full word is left alone; the mask reused for another size starts empty.
        m.words_mut()[0] = u32::MAX;
        let mut logits = vec![1.0f32; 40];
        m.apply(&mut logits);
        assert!(logits[..32].iter().all(|&l| l == 1.0));
        m.clear(10);
        assert_eq!(m.count(), 0);
    }
}
