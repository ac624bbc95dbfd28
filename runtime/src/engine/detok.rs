//! Incremental detokenisation and stop strings: text deltas never split a UTF-8 character
//! (a byte-level BPE token may carry half of one), and text that could be the start of a stop
//! string is held back until it is known not to be one.
use tokenizers::Tokenizer;

/// Turns a growing token sequence into text deltas.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds one token; returns the newly completed text (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, String> {
        self.ids.push(id);
        let decode = |ids: &[u32]| tokenizer.decode(ids, false).map_err(|e| e.to_string());
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            if let Some(delta) = full.get(prefix.len()..) {
                let delta = delta.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(delta);
            }
        }
        Ok(String::new())
    }
}

/// Outcome of feeding text to [`StopMatcher`].
#[derive(Debug, PartialEq, Eq)]
pub enum StopScan {
    /// Safe to emit now.
    Emit(String),
    /// A stop string matched: emit this (the text before it) and finish.
    Stopped(String),
}

/// Holds back possible stop-string prefixes.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> StopScan {
        self.pending.push_str(delta);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return StopScan::Stopped(out);
        }
        let hold = self.held_suffix_len();
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopScan::Emit(out)
    }

    /// Whatever is still held back (generation ended without a stop match).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Longest suffix of `pending` that is a proper prefix of some stop string.
    fn held_suffix_len(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for s in &self.stops {
            for k in (1..s.len().min(p.len() + 1)).rev() {
                if k <= best {
                    break;
                }
                if s.is_char_boundary(k) && p.is_char_boundary(p.len() - k) && p.ends_with(&s[..k])
                {
                    best = k;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_across_deltas_is_not_emitted() {
        let mut m = StopMatcher::new(&["STOP".to_string()]);
        assert_eq!(m.push("hello S"), StopScan::Emit("hello ".into()));
        assert_eq!(m.push("T"), StopScan::Emit(String::new()));
        assert_eq!(m.push("OP and more"), StopScan::Stopped(String::new()));
    }

    #[test]
    fn false_prefix_is_released() {
        let mut m = StopMatcher::new(&["STOP".to_string()]);
        assert_eq!(m.push("ST"), StopScan::Emit(String::new()));
        assert_eq!(m.push("ART"), StopScan::Emit("START".into()));
        assert_eq!(m.push("ok S"), StopScan::Emit("ok ".into()));
        assert_eq!(m.flush(), "S");
    }

    #[test]
    fn multibyte_stop_and_text() {
        let mut m = StopMatcher::new(&["é!".to_string()]);
        assert_eq!(m.push("café"), StopScan::Emit("caf".into()));
        assert_eq!(m.push("!x"), StopScan::Stopped(String::new()));
    }
}
