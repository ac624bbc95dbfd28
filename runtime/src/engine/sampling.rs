//! Token selection from the last position's logits: greedy at temperature 0, otherwise
//! temperature → top-k → top-p → min-p → draw from a seeded generator (same seed, same
//! tokens).
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Decoding parameters of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 → greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 keeps everything.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// Drop tokens below `min_p · p_max`; 0 keeps everything.
    pub min_p: f32,
    pub seed: Option<u64>,
    /// Generation ends before any of these strings; they are not emitted.
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// A reason the parameters are unusable, phrased for the client.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return Err("stop strings must not be empty".into());
        }
        Ok(())
    }
}

/// Draws tokens for one generation.
#[derive(Debug)]
pub struct Sampler {
    rng: StdRng,
}

impl Sampler {
    pub fn new(seed: Option<u64>) -> Self {
        Self {
            rng: match seed {
                Some(s) => StdRng::seed_from_u64(s),
                None => StdRng::from_entropy(),
            },
        }
    }

    pub fn sample(&mut self, logits: &[f32], p: &SamplingParams) -> u32 {
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        // Candidates sorted by logit, best first (ties by id for determinism).
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, l)| (i as u32, l * inv_t))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_logit);
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|(_, l)| ((l - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p as f64;
            keep = keep.min(probs.iter().take_while(|q| **q >= floor).count().max(1));
        }
        let mass: f64 = probs[..keep].iter().sum();
        let mut r = self.rng.gen::<f64>() * mass;
        for (i, q) in probs[..keep].iter().enumerate() {
            if r < *q {
                return cand[i].0;
            }
            r -= q;
        }
        cand[keep - 1].0
    }
}

/// Index of the largest logit (the first one on ties, as MLX's argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(Some(1));
        assert_eq!(s.sample(&[0.1, 3.0, 2.0, 3.0], &params(0.0)), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(Some(seed));
            (0..50)
                .map(|_| s.sample(&logits, &params(1.0)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn top_k_one_is_greedy_and_min_p_filters() {
        let logits = [1.0, 5.0, 4.9, -2.0];
        let mut s = Sampler::new(Some(3));
        let p = SamplingParams {
            top_k: 1,
            ..params(2.0)
        };
        assert!((0..20).all(|_| s.sample(&logits, &p) == 1));
        let p = SamplingParams {
            min_p: 0.5,
            ..params(1.0)
        };
        assert!((0..50).all(|_| matches!(s.sample(&logits, &p), 1 | 2)));
        let p = SamplingParams {
            top_p: 0.1,
            ..params(1.0)
        };
        assert!((0..20).all(|_| s.sample(&logits, &p) == 1));
    }

    #[test]
    fn validation_names_the_field() {
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .contains("top_p"));
        assert!(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
