//! Vision features of recently seen images, keyed by the decoded image's content: a client
//! that sends the same image again (a follow-up question, a canary probe) skips preprocessing
//! and the vision tower. Bounded by bytes, least recently used out first.
use std::collections::VecDeque;

use mlx_rs::Array;
use sha2::{Digest, Sha256};

use crate::vision::preprocess::DecodedImage;

/// SHA-256 of an image's size and RGB pixels (not of its file bytes: the same picture
/// re-encoded hits too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageDigest([u8; 32]);

impl ImageDigest {
    pub fn of(image: &DecodedImage) -> Self {
        let mut h = Sha256::new();
        h.update(image.width().to_le_bytes());
        h.update(image.height().to_le_bytes());
        h.update(image.rgb().as_raw());
        Self(h.finalize().into())
    }
}

/// The tower's output for one image, already in the language model's dtype.
#[derive(Debug, Clone)]
pub struct CachedFeatures {
    pub grid_thw: [u32; 3],
    /// `[tokens, hidden]`.
    pub features: Array,
}

impl CachedFeatures {
    fn bytes(&self) -> usize {
        self.features.nbytes()
    }
}

#[derive(Debug)]
pub struct FeatureCache {
    budget_bytes: usize,
    held_bytes: usize,
    /// Most recently used last.
    entries: VecDeque<(ImageDigest, CachedFeatures)>,
    hits: u64,
    misses: u64,
}

impl FeatureCache {
    /// `budget_bytes` 0 turns the cache off.
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget_bytes,
            held_bytes: 0,
            entries: VecDeque::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// Whether anything can be kept (a budget above zero).
    pub fn is_enabled(&self) -> bool {
        self.budget_bytes > 0
    }

    pub fn get(&mut self, key: &ImageDigest) -> Option<CachedFeatures> {
        let Some(i) = self.entries.iter().position(|(k, _)| k == key) else {
            self.misses += 1;
            return None;
        };
        self.hits += 1;
        let entry = self.entries.remove(i).expect("index from position");
        let value = entry.1.clone();
        self.entries.push_back(entry);
        Some(value)
    }

    /// Keeps `value` unless it alone exceeds the budget; evicts the least recently used.
    pub fn insert(&mut self, key: ImageDigest, value: CachedFeatures) {
        let size = value.bytes();
        if size > self.budget_bytes {
            return;
        }
        if let Some(i) = self.entries.iter().position(|(k, _)| *k == key) {
            let (_, old) = self.entries.remove(i).expect("index from position");
            self.held_bytes -= old.bytes();
        }
        while self.held_bytes + size > self.budget_bytes {
            let Some((_, old)) = self.entries.pop_front() else {
                break;
            };
            self.held_bytes -= old.bytes();
        }
        self.held_bytes += size;
        self.entries.push_back((key, value));
    }

    /// (hits, misses) since start.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> ImageDigest {
        ImageDigest([n; 32])
    }

    fn features(rows: i32) -> CachedFeatures {
        CachedFeatures {
            grid_thw: [1, 2, 2],
            features: Array::zeros::<f32>(&[rows, 4]).unwrap(),
        }
    }

    #[test]
    fn least_recently_used_goes_first_and_the_budget_holds() {
        // Each entry is rows × 4 × 4 bytes.
        let mut c = FeatureCache::new(3 * 64);
        c.insert(key(1), features(4));
        c.insert(key(2), features(4));
        c.insert(key(3), features(4));
        assert!(c.get(&key(1)).is_some()); // 1 is now the most recent
        c.insert(key(4), features(4)); // evicts 2
        assert!(c.get(&key(2)).is_none());
        assert!(c.get(&key(1)).is_some());
        assert!(c.get(&key(3)).is_some());
        assert!(c.get(&key(4)).is_some());
        assert_eq!(c.held_bytes(), 3 * 64);
        assert_eq!(c.stats(), (4, 1));
    }

    #[test]
    fn too_large_or_disabled_is_not_kept() {
        let mut c = FeatureCache::new(32);
        c.insert(key(1), features(4));
        assert!(c.is_empty());
        let mut off = FeatureCache::new(0);
        assert!(!off.is_enabled());
        off.insert(key(1), features(1));
        assert!(off.get(&key(1)).is_none());
    }

    #[test]
    fn reinserting_a_key_replaces_it() {
        let mut c = FeatureCache::new(1024);
        c.insert(key(1), features(4));
        c.insert(key(1), features(8));
        assert_eq!(c.len(), 1);
        assert_eq!(c.held_bytes(), 8 * 16);
    }

    #[test]
    fn digest_depends_on_pixels_and_size() {
        let a = DecodedImage::from_rgb(image::RgbImage::from_pixel(4, 2, image::Rgb([1, 2, 3])));
        let b = DecodedImage::from_rgb(image::RgbImage::from_pixel(2, 4, image::Rgb([1, 2, 3])));
        let c = DecodedImage::from_rgb(image::RgbImage::from_pixel(4, 2, image::Rgb([1, 2, 4])));
        assert_eq!(ImageDigest::of(&a), ImageDigest::of(&a.clone()));
        assert_ne!(ImageDigest::of(&a), ImageDigest::of(&b));
        assert_ne!(ImageDigest::of(&a), ImageDigest::of(&c));
    }
}
