//! Text-encoder outputs of recent prompts, kept by the pipeline: a batch repeats prompts
//! and negative prompts (often the empty one), and an encoder's output for a text does not
//! change.

use ndarray::{Array2, Array3};

/// Encoded prompts by text, at most [`TextCache::CAPACITY`]; emptied when full (batches
/// repeat a few texts, so recency bookkeeping would buy little).
#[derive(Default)]
pub(super) struct TextCache {
    entries: std::collections::HashMap<String, (Array3<f32>, Option<Array2<f32>>)>,
}

impl TextCache {
    /// Texts kept (SDXL: about 0.6 MB each).
    const CAPACITY: usize = 32;

    pub(super) fn get(&self, text: &str) -> Option<(Array3<f32>, Option<Array2<f32>>)> {
        self.entries.get(text).cloned()
    }

    pub(super) fn put(&mut self, text: &str, encoded: &(Array3<f32>, Option<Array2<f32>>)) {
        if self.entries.len() >= Self::CAPACITY {
            self.entries.clear();
        }
        self.entries.insert(text.to_string(), encoded.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_come_back_as_stored_and_a_full_cache_starts_over() {
        let mut cache = TextCache::default();
        let entry = |v: f32| (Array3::from_elem((1, 2, 3), v), None);
        cache.put("a", &entry(1.0));
        assert_eq!(cache.get("a"), Some(entry(1.0)));
        assert_eq!(cache.get("b"), None);
        for i in 0..TextCache::CAPACITY {
            cache.put(&format!("t{i}"), &entry(i as f32));
        }
        assert!(cache.entries.len() <= TextCache::CAPACITY);
        assert_eq!(cache.get("a"), None, "emptied when it filled up");
    }
}
