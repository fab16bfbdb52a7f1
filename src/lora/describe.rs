//! What `ListLoras` says of a LoRA file: its A1111 short hash, the base model it was
//! trained for (from its metadata, else from its keys), its trigger words, and whether
//! it applies to a model ([`super::plan::check`]). Reading the file is file I/O (the
//! hash reads the whole payload): callers run it off async threads and keep the result
//! ([`DescribeCache`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::Value;

use super::apply::LoraSpec;
use super::catalog::LoraEntry;
use super::file::Header;

/// Most trigger words listed from `ss_tag_frequency`.
pub const MAX_TRIGGER_WORDS: usize = 10;

/// A LoRA file, described.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Description {
    /// A1111's short hash (`Lora hashes`), empty when the file cannot be read.
    pub hash: String,
    /// The base model it names or its keys imply (`sd1`, `sd2`, `sdxl`, or the metadata's
    /// own words); empty when unknown.
    pub architecture: String,
    /// Its trigger words: `modelspec.trigger_phrase`, else the most frequent training
    /// tags of `ss_tag_frequency`.
    pub trigger_words: Vec<String>,
    /// Whether it applies to the model (every key maps to a weight that fits).
    pub fits: bool,
    /// Why it does not apply, or why it cannot be read; empty when it fits.
    pub error: String,
}

/// Describes `entry` for the model folder `model_dir`.
pub fn describe(model_dir: &Path, entry: &LoraEntry) -> Description {
    let header = match Header::read(&entry.path) {
        Ok(h) => h,
        Err(e) => {
            return Description {
                error: e.to_string(),
                ..Description::default()
            };
        }
    };
    let spec = LoraSpec {
        name: entry.name.clone(),
        path: entry.path.clone(),
        scale: 1.0,
    };
    let check = super::plan::check(model_dir, &spec);
    Description {
        hash: header.addnet_hash(),
        architecture: architecture(&header),
        trigger_words: trigger_words(&header.metadata),
        fits: check.is_ok(),
        error: check.err().map(|e| e.to_string()).unwrap_or_default(),
    }
}

/// The base model from the metadata (`modelspec.architecture`, kohya's
/// `ss_base_model_version`), else from the keys (`lora_te2_`/`text_encoder_2.` or SGM
/// block names: SDXL).
fn architecture(header: &Header) -> String {
    let m = &header.metadata;
    if let Some(a) = m.get("modelspec.architecture") {
        return a.split('/').next().unwrap_or(a).to_string();
    }
    if let Some(v) = m.get("ss_base_model_version") {
        return match v.as_str() {
            v if v.starts_with("sdxl") => "sdxl".into(),
            v if v.starts_with("sd_v2") || v.starts_with("sd_2") => "sd2".into(),
            v if v.starts_with("sd_v1") || v.starts_with("sd_1") => "sd1".into(),
            v => v.to_string(),
        };
    }
    let sdxl = header.tensors.keys().any(|k| {
        k.starts_with("lora_te2_")
            || k.starts_with("text_encoder_2.")
            || k.starts_with("lora_unet_input_blocks_")
            || k.starts_with("lora_unet_output_blocks_")
    });
    if sdxl { "sdxl".into() } else { String::new() }
}

/// `modelspec.trigger_phrase` (comma-separated), else the most frequent tags of kohya's
/// `ss_tag_frequency` (`{"dataset": {"tag": count}}`), most frequent first.
pub fn trigger_words(metadata: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    if let Some(p) = metadata.get("modelspec.trigger_phrase") {
        return p
            .split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect();
    }
    let Some(Ok(Value::Object(sets))) = metadata
        .get("ss_tag_frequency")
        .map(|f| serde_json::from_str::<Value>(f))
    else {
        return Vec::new();
    };
    let mut counts: HashMap<String, u64> = HashMap::new();
    for tags in sets.values() {
        if let Value::Object(tags) = tags {
            for (tag, n) in tags {
                *counts.entry(tag.trim().to_string()).or_default() += n.as_u64().unwrap_or(0);
            }
        }
    }
    let mut tags: Vec<(String, u64)> = counts.into_iter().filter(|(t, _)| !t.is_empty()).collect();
    tags.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    tags.into_iter()
        .take(MAX_TRIGGER_WORDS)
        .map(|(t, _)| t)
        .collect()
}

/// What identifies a description: the model folder, and the file with its size and
/// modification time.
type FileKey = (PathBuf, PathBuf, u64, Option<SystemTime>);

/// Descriptions kept per (model folder, file, size, modification time): a file is read
/// and hashed again only when it changed.
#[derive(Debug, Default)]
pub struct DescribeCache {
    seen: Mutex<HashMap<FileKey, Description>>,
}

impl DescribeCache {
    /// [`describe`], from the cache when the file has not changed.
    pub fn describe(&self, model_dir: &Path, entry: &LoraEntry) -> Description {
        let meta = std::fs::metadata(&entry.path).ok();
        let key = (
            model_dir.to_path_buf(),
            entry.path.clone(),
            meta.as_ref().map_or(0, |m| m.len()),
            meta.and_then(|m| m.modified().ok()),
        );
        if let Some(d) = self.lock().get(&key) {
            return d.clone();
        }
        let d = describe(model_dir, entry);
        self.lock().insert(key, d.clone());
        d
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FileKey, Description>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_words_come_from_the_phrase_else_the_most_frequent_tags() {
        let mut m = std::collections::BTreeMap::new();
        m.insert(
            "ss_tag_frequency".to_string(),
            r#"{"10_a": {"cat": 3, " hat": 5}, "5_b": {"cat": 4, "": 9}}"#.to_string(),
        );
        assert_eq!(trigger_words(&m), ["cat", "hat"]);
        m.insert("modelspec.trigger_phrase".into(), "zzz style, blue".into());
        assert_eq!(trigger_words(&m), ["zzz style", "blue"]);
        assert!(trigger_words(&Default::default()).is_empty());
    }

    #[test]
    fn the_committed_fixture_loras_fit_their_models_only() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let entry = |name: &str| LoraEntry {
            name: name.into(),
            path: root.join(format!("tests/golden/lora/loras/{name}.safetensors")),
            size: 0,
        };
        let sd15 = root.join("onnx/tiny-sd15");
        let sdxl = root.join("onnx/tiny-sdxl");
        let d = describe(&sd15, &entry("sd15_kohya"));
        assert!(d.fits, "{d:?}");
        assert_eq!(d.hash.len(), 12);
        assert_eq!(d.architecture, "");
        let d = describe(&sdxl, &entry("sdxl_kohya"));
        assert!(d.fits, "{d:?}");
        assert_eq!(d.architecture, "sdxl");
        // An SDXL LoRA on SD 1.5: its SGM block numbers are not in this UNet.
        let d = describe(&sd15, &entry("sdxl_kohya"));
        assert!(!d.fits);
        assert!(
            d.error
                .contains("sdxl_kohya.safetensors: LoRA key lora_unet_"),
            "{}",
            d.error
        );
        // An SD 1.5 LoRA on SDXL: same module names, other shapes.
        let d = describe(&sdxl, &entry("sd15_kohya"));
        assert!(!d.fits);
        assert!(d.error.contains("sd15_kohya.safetensors"), "{}", d.error);
    }
}
