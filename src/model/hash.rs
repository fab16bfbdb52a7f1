//! The model hash: one SHA-256 over the files of a model folder that decide its images,
//! written into every PNG's `parameters` chunk as `Model hash` (its first 10 hex digits)
//! and checked by `diffusionctl verify`.
//!
//! Which files, in which order (docs/diffusionctl.md, "verify"):
//!
//! * `model_index.json`, and every regular file (symlinks followed) directly inside the
//!   component folders [`HASHED_FOLDERS`] that exist, names starting with `.` left out:
//!   graphs (`model.onnx`), external data (`model.onnx_data`, or whatever names a graph's
//!   tensors use), configs, tokenizer files. Sub-folders and other top-level files
//!   (README, LICENSE, `safety_checker/`, ...) are not read.
//! * Relative paths with `/`, sorted by their bytes (`LC_ALL=C sort`).
//! * The hash is the SHA-256 of the manifest `sha256sum` prints for them: one line
//!   `<file's SHA-256 in hex>  <relative path>\n` per file. So
//!   `sha256sum $(files) | sha256sum` in the folder gives the same digits, and a file's
//!   own digest can be cached.
//!
//! [`HashCache`] keeps each file's digest keyed by its path and identity (device, inode,
//! size, modification and change times in nanoseconds), in memory and, when given one, in
//! a small JSON file (the daemon's state directory), so a restart or a second open of an
//! unchanged folder reads no graph again. A file modified in the two seconds before it was
//! hashed is not cached (a change within the file system's timestamp granularity would
//! otherwise go unseen), as git treats "racily clean" index entries.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ModelError;
use super::small_file;

/// The component folders whose files the hash covers (those the pipelines read, present
/// or not).
pub const HASHED_FOLDERS: &[&str] = &[
    "scheduler",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "transformer",
    "unet",
    "vae_decoder",
    "vae_decoder_fp32",
    "vae_encoder",
];

/// The name of the cache file in a state directory.
pub const CACHE_FILE: &str = "model-hashes.json";

/// Most entries the cache file keeps (a few dozen files per model).
const MAX_ENTRIES: usize = 4096;
/// Largest cache file read back.
const MAX_CACHE_BYTES: u64 = 4 << 20;
/// Files modified this recently (seconds) before hashing began are not cached.
const RACY_SECS: i64 = 2;

/// A model folder's hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelHash {
    /// The SHA-256, 64 lowercase hex digits.
    pub hex: String,
    /// Files hashed.
    pub files: usize,
    /// Bytes read to compute it (0 when every file's digest came from the cache).
    pub bytes_read: u64,
}

impl ModelHash {
    /// The first 10 hex digits: the PNG's `Model hash`.
    pub fn short(&self) -> &str {
        &self.hex[..10]
    }
}

/// A file's identity: what must be unchanged for its cached digest to stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> FileId {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    path: PathBuf,
    id: FileId,
    sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    files: Vec<Entry>,
}

/// Per-file digests, in memory and optionally in a file (see the module docs).
#[derive(Debug, Default)]
pub struct HashCache {
    file: Option<PathBuf>,
    entries: Mutex<HashMap<PathBuf, Entry>>,
}

impl HashCache {
    /// A cache that lives as long as this value (nothing is read or written on disk).
    pub fn in_memory() -> HashCache {
        HashCache::default()
    }

    /// A cache kept in `dir/model-hashes.json`: read now (a missing or unreadable file is
    /// an empty cache), written by [`HashCache::save`].
    pub fn in_dir(dir: &Path) -> HashCache {
        let file = dir.join(CACHE_FILE);
        let entries = match small_file::read_capped(&file, MAX_CACHE_BYTES) {
            Ok(bytes) => match serde_json::from_slice::<CacheFile>(&bytes) {
                Ok(c) if c.version == 1 => c.files,
                Ok(_) | Err(_) => {
                    tracing::debug!(file = %file.display(), "model hash cache unreadable; starting empty");
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        };
        HashCache {
            file: Some(file),
            entries: Mutex::new(entries.into_iter().map(|e| (e.path.clone(), e)).collect()),
        }
    }

    /// The cache `diffusionctl --local` uses: the user's state directory
    /// (`$XDG_STATE_HOME/diffusiond`, else `~/.local/state/diffusiond`, which a session
    /// daemon uses too), or memory only when neither variable is set.
    pub fn for_user() -> HashCache {
        match crate::config::state_dir(None, false, |v| std::env::var(v).ok()) {
            Some(dir) => HashCache::in_dir(&dir),
            None => HashCache::in_memory(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lookup(&self, path: &Path, id: FileId) -> Option<String> {
        self.lock()
            .get(path)
            .filter(|e| e.id == id)
            .map(|e| e.sha256.clone())
    }

    fn insert(&self, path: PathBuf, id: FileId, sha256: String) {
        self.lock().insert(path.clone(), Entry { path, id, sha256 });
    }

    /// Writes the cache file (write, rename), when this cache has one. Failures are
    /// logged, never fatal: the next open hashes again.
    pub fn save(&self) {
        let Some(file) = &self.file else { return };
        let mut files: Vec<Entry> = self.lock().values().cloned().collect();
        // Entries of files that are gone are dropped; the newest are kept.
        files.retain(|e| e.path.exists());
        files.sort_by_key(|e| std::cmp::Reverse(e.id.mtime_ns));
        files.truncate(MAX_ENTRIES);
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let text = match serde_json::to_vec_pretty(&CacheFile { version: 1, files }) {
            Ok(t) => t,
            Err(_) => return,
        };
        let written = (|| -> std::io::Result<()> {
            let dir = file.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!(".{CACHE_FILE}.tmp-{}", std::process::id()));
            std::fs::write(&tmp, &text)?;
            std::fs::rename(&tmp, file)
        })();
        if let Err(e) = written {
            tracing::debug!(file = %file.display(), error = %e, "cannot write the model hash cache");
        }
    }
}

/// The files the hash covers, as sorted relative paths (see the module docs). Errors name
/// the folder or file.
pub fn hashed_files(dir: &Path) -> Result<Vec<String>, ModelError> {
    let malformed = |path: &Path, message: String| ModelError::Malformed {
        path: path.to_path_buf(),
        message,
    };
    let mut files = vec!["model_index.json".to_string()];
    for folder in HASHED_FOLDERS {
        let path = dir.join(folder);
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => continue,
            Err(e) => return Err(malformed(&path, format!("cannot list: {e}"))),
        };
        for entry in entries {
            let entry = entry.map_err(|e| malformed(&path, format!("cannot list: {e}")))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(malformed(
                    &entry.path(),
                    "the file name is not UTF-8, which the model hash lists by name".into(),
                ));
            };
            if name.starts_with('.') {
                continue;
            }
            // Symlinks followed: a file they point at counts, a folder does not.
            match std::fs::metadata(entry.path()) {
                Ok(m) if m.is_file() => files.push(format!("{folder}/{name}")),
                Ok(_) => {}
                Err(e) => return Err(malformed(&entry.path(), e.to_string())),
            }
        }
    }
    files.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(files)
}

/// The manifest the hash is taken over: `sha256sum`'s output for `(digest, path)` pairs,
/// in the order given. Pure.
pub fn manifest(digests: &[(String, String)]) -> String {
    digests
        .iter()
        .map(|(sha, rel)| format!("{sha}  {rel}\n"))
        .collect()
}

/// Hashes the folder `dir` (file I/O: call it off async threads), taking each file's
/// digest from `cache` when its identity is unchanged and recording new ones. The caller
/// saves the cache.
pub fn model_hash(dir: &Path, cache: &HashCache) -> Result<ModelHash, ModelError> {
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let mut bytes_read = 0;
    let mut digests = Vec::new();
    for rel in hashed_files(dir)? {
        let path = dir.join(&rel);
        let key = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
        let unreadable = |e: std::io::Error| ModelError::Malformed {
            path: path.clone(),
            message: format!("cannot read for the model hash: {e}"),
        };
        let meta = std::fs::metadata(&path).map_err(unreadable)?;
        let id = FileId::of(&meta);
        let sha = match cache.lookup(&key, id) {
            Some(sha) => sha,
            None => {
                let (sha, read) = file_sha256(&path).map_err(unreadable)?;
                bytes_read += read;
                // Re-read the identity: a file written while it was hashed is not cached.
                let after = std::fs::metadata(&path).map(|m| FileId::of(&m)).ok();
                let settled = id.mtime_ns < started - RACY_SECS * 1_000_000_000;
                if after == Some(id) && settled {
                    cache.insert(key, id, sha.clone());
                }
                sha
            }
        };
        digests.push((sha, rel));
    }
    let hex = hex(&Sha256::digest(manifest(&digests).as_bytes()));
    Ok(ModelHash {
        hex,
        files: digests.len(),
        bytes_read,
    })
}

/// A file's SHA-256 in hex and the bytes read.
fn file_sha256(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex(&hasher.finalize()), total))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A small folder in the layout, its files' times set an hour back (settled).
    fn folder() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for (rel, text) in [
            ("model_index.json", "{}"),
            ("unet/model.onnx", "graph"),
            ("unet/model.onnx_data", "weights"),
            ("unet/config.json", "{\"a\": 1}"),
            ("tokenizer/vocab.json", "{}"),
            ("tokenizer/.hidden", "not hashed"),
            ("README.md", "not hashed"),
            ("safety_checker/model.onnx", "not hashed"),
        ] {
            let p = d.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, text).unwrap();
            settle(&p);
        }
        tmp
    }

    fn settle(p: &Path) {
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
    }

    #[test]
    fn the_listed_files_are_the_documented_ones_in_byte_order() {
        let tmp = folder();
        assert_eq!(
            hashed_files(tmp.path()).unwrap(),
            [
                "model_index.json",
                "tokenizer/vocab.json",
                "unet/config.json",
                "unet/model.onnx",
                "unet/model.onnx_data"
            ]
        );
    }

    #[test]
    fn the_hash_is_sha256sum_of_sha256sum() {
        let tmp = folder();
        let h = model_hash(tmp.path(), &HashCache::in_memory()).unwrap();
        // sha256("{}") and friends, as sha256sum prints them.
        let sum = |s: &str| hex(&Sha256::digest(s.as_bytes()));
        let text = format!(
            "{}  model_index.json\n{}  tokenizer/vocab.json\n{}  unet/config.json\n{}  unet/model.onnx\n{}  unet/model.onnx_data\n",
            sum("{}"),
            sum("{}"),
            sum("{\"a\": 1}"),
            sum("graph"),
            sum("weights")
        );
        assert_eq!(h.hex, sum(&text));
        assert_eq!((h.files, h.short().len()), (5, 10));
    }

    #[test]
    fn an_unchanged_folder_is_not_read_again_and_a_changed_byte_is_seen() {
        let tmp = folder();
        let state = tempfile::tempdir().unwrap();
        let cache = HashCache::in_dir(state.path());
        let first = model_hash(tmp.path(), &cache).unwrap();
        assert_eq!(first.bytes_read, 2 + 5 + 7 + 8 + 2);
        let again = model_hash(tmp.path(), &cache).unwrap();
        assert_eq!((again.bytes_read, &again.hex), (0, &first.hex));
        // A restart: the cache file alone.
        cache.save();
        let reopened = HashCache::in_dir(state.path());
        let restarted = model_hash(tmp.path(), &reopened).unwrap();
        assert_eq!((restarted.bytes_read, &restarted.hex), (0, &first.hex));
        // One byte of a config, same size: only that file is read again.
        let config = tmp.path().join("unet/config.json");
        std::fs::write(&config, "{\"a\": 2}").unwrap();
        settle(&config);
        let changed = model_hash(tmp.path(), &reopened).unwrap();
        assert_eq!(changed.bytes_read, 8);
        assert_ne!(changed.hex, first.hex);
    }

    #[test]
    fn a_file_changed_just_now_is_hashed_every_time() {
        let tmp = folder();
        std::fs::write(tmp.path().join("unet/model.onnx"), "graph").unwrap();
        let cache = HashCache::in_memory();
        model_hash(tmp.path(), &cache).unwrap();
        let again = model_hash(tmp.path(), &cache).unwrap();
        assert_eq!(again.bytes_read, 5, "only the fresh file is read again");
    }

    #[test]
    fn a_missing_index_is_an_error_naming_it() {
        let tmp = folder();
        std::fs::remove_file(tmp.path().join("model_index.json")).unwrap();
        let e = model_hash(tmp.path(), &HashCache::in_memory()).unwrap_err();
        assert!(e.to_string().contains("model_index.json"), "{e}");
    }
}
