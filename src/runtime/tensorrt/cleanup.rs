//! Removing stale TensorRT engines: each key folder of `engine_cache_dir` records which
//! graphs it is for, and planning a graph removes that graph's older key folders beyond
//! `runtime.tensorrt.engine_cache_keep`.
//!
//! Every model update, driver or TensorRT update and profile change gives a graph a new
//! engine key ([`super::engine_key`]), and so a new folder of engines (hundreds of MB to
//! GB for a UNet). When [`super::plan`] plans a session with the engine cache, it writes
//! `<key>/source.json` ([`Source`]: the graph's path and a use number one above every
//! record's, atomically: temporary file and rename), then removes the key folders recorded
//! for the same graph beyond the `keep` most recently used ([`stale`]). Graphs with the
//! same contents (models that share a VAE or text encoder) share a key folder: its record
//! lists each, and a graph that moves on is only dropped from the list; the folder goes
//! when the last graph on it does.
//!
//! What is never removed: the current key's folder; a folder without a readable record
//! (made by an older diffusiond or by hand: its content is unknown); a folder this process
//! has planned since it started ([`Planned`]: another worker, e.g. on a GPU of another
//! model, may be building or running its engines); anything whose name is not a key, which
//! includes `digests/`, symbolic links and everything outside `engine_cache_dir`. Records
//! in `digests/` whose file no longer exists are dropped ([`digest_record_file`]).
//!
//! Nothing here fails a load: a record that cannot be written leaves its folder unmanaged,
//! and each error is logged with its path ([`CleanupError`]).

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::RECORD_HEADER;

/// The record in each key folder.
pub const SOURCE_FILE: &str = "source.json";
/// [`Source::version`] as written.
const SOURCE_VERSION: u32 = 1;

/// What `<key>/source.json` holds: which graphs the folder's engines are for. Usually one;
/// graphs with the same contents (models sharing a VAE or text encoder) share a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// Format version, 1.
    pub version: u32,
    /// The graphs that have used this key, each with its last use.
    pub graphs: Vec<GraphUse>,
}

/// One graph's use of a key folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphUse {
    /// The graph's path as the model gave it, made absolute without resolving symbolic
    /// links: a model updated by pointing a link at a new folder keeps this path.
    pub graph: PathBuf,
    /// The graph's real path (links resolved): the same file reached by another path.
    pub real: PathBuf,
    /// Use order: one above the highest `used` of all records when last planned. A
    /// counter rather than a clock, so a box whose clock jumps still orders uses right.
    pub used: u64,
    /// When last planned, seconds since the epoch; for people reading the file.
    pub used_at_unix_s: u64,
}

impl GraphUse {
    /// Whether this use is by `graph` (by either of its paths).
    pub fn is_for(&self, graph: &GraphPaths) -> bool {
        self.graph == graph.graph || self.real == graph.real
    }
}

impl Source {
    /// `graph`'s last use of the key, if it has used it.
    pub fn last_use(&self, graph: &GraphPaths) -> Option<&GraphUse> {
        self.graphs
            .iter()
            .filter(|u| u.is_for(graph))
            .max_by_key(|u| (u.used, u.used_at_unix_s))
    }

    /// This record with `new` as its graph's last use (earlier uses by that graph dropped).
    pub fn used_by(mut self, new: GraphUse) -> Source {
        let paths = GraphPaths {
            graph: new.graph.clone(),
            real: new.real.clone(),
        };
        self.graphs.retain(|u| !u.is_for(&paths));
        self.graphs.push(new);
        self.version = SOURCE_VERSION;
        self
    }

    /// This record without `graph`'s uses; `None` when no other graph uses the key (the
    /// folder can go).
    pub fn without(&self, graph: &GraphPaths) -> Option<Source> {
        let graphs: Vec<GraphUse> = self
            .graphs
            .iter()
            .filter(|u| !u.is_for(graph))
            .cloned()
            .collect();
        (!graphs.is_empty()).then_some(Source {
            version: self.version,
            graphs,
        })
    }
}

impl Default for Source {
    fn default() -> Source {
        Source {
            version: SOURCE_VERSION,
            graphs: Vec::new(),
        }
    }
}

/// A key folder's name and record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The folder's name, an engine key.
    pub key: String,
    /// Its `source.json`.
    pub source: Source,
}

/// The paths of the graph a session is planned for (see [`GraphUse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphPaths {
    /// As given, made absolute.
    pub graph: PathBuf,
    /// Links resolved.
    pub real: PathBuf,
}

impl GraphPaths {
    /// The paths of `graph`; each falls back to the one before when it cannot be made.
    pub fn of(graph: &Path) -> GraphPaths {
        let absolute = std::path::absolute(graph).unwrap_or_else(|_| graph.to_path_buf());
        let real = graph.canonicalize().unwrap_or_else(|_| absolute.clone());
        GraphPaths {
            graph: absolute,
            real,
        }
    }
}

/// Why a cleanup step did not happen; logged, never returned from a load.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// The current key's record could not be written: the folder stays unmanaged.
    #[error("cannot write the TensorRT engine cache record {file}: {source}")]
    Record {
        /// `<key>/source.json`.
        file: PathBuf,
        /// The I/O or encoding error.
        source: io::Error,
    },
    /// A folder could not be listed.
    #[error("cannot list the TensorRT engine cache folder {dir}: {source}")]
    List {
        /// `engine_cache_dir` or its `digests/`.
        dir: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A stale key folder could not be removed (all or part of it).
    #[error("cannot remove the stale TensorRT engine folder {dir} (key {key}): {source}")]
    Remove {
        /// The key folder.
        dir: PathBuf,
        /// Its key.
        key: String,
        /// The I/O error.
        source: io::Error,
    },
    /// A digest record of a file that no longer exists could not be removed.
    #[error("cannot remove the digest record {record} (of {file}, which is gone): {source}")]
    Digest {
        /// The record in `digests/`.
        record: PathBuf,
        /// The file it is for.
        file: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// Whether `name` is an engine key: 16 lowercase hex digits ([`super::engine_key`]).
pub fn is_key(name: &str) -> bool {
    name.len() == 16
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The `used` number for a key planned now: one above every record's.
pub fn next_use(records: &[KeyRecord]) -> u64 {
    records
        .iter()
        .flat_map(|r| &r.source.graphs)
        .map(|u| u.used)
        .max()
        .unwrap_or(0)
        + 1
}

/// The key folders that are stale for `graph` after planning it with key `current`: those
/// it has used, beyond the `keep` it used last, `current` counting as the last (`keep` 0
/// counts as 1). Keys in `live` (planned by this process) are never returned, nor
/// `current`, nor keys `graph` has not used. A returned folder that other graphs use too
/// only loses `graph` from its record ([`Source::without`]).
pub fn stale(
    records: &[KeyRecord],
    current: &str,
    graph: &GraphPaths,
    keep: usize,
    live: &HashSet<String>,
) -> Vec<String> {
    let mut older: Vec<(&GraphUse, &str)> = records
        .iter()
        .filter(|r| r.key != current)
        .filter_map(|r| Some((r.source.last_use(graph)?, r.key.as_str())))
        .collect();
    older.sort_by(|(a, ka), (b, kb)| {
        (b.used, b.used_at_unix_s, kb).cmp(&(a.used, a.used_at_unix_s, ka))
    });
    older
        .into_iter()
        .skip(keep.saturating_sub(1))
        .filter(|(_, key)| !live.contains(*key))
        .map(|(_, key)| key.to_string())
        .collect()
}

/// The file a `digests/` record is for (its fifth line), if `text` is such a record.
pub fn digest_record_file(text: &str) -> Option<PathBuf> {
    let mut lines = text.lines();
    (lines.next()? == RECORD_HEADER).then_some(())?;
    let file = lines.nth(3)?;
    (!file.is_empty()).then(|| PathBuf::from(file))
}

/// Key folders this process has planned, by path: never removed while it runs. Its lock
/// also runs one cleanup at a time, so workers never rewrite a record at once.
#[derive(Debug, Default)]
pub struct Planned(Mutex<HashSet<PathBuf>>);

impl Planned {
    /// This process's set.
    pub fn process() -> &'static Planned {
        static PLANNED: OnceLock<Planned> = OnceLock::new();
        PLANNED.get_or_init(Planned::default)
    }
}

/// The keys of `planned` under `root`.
fn keys_in(planned: &HashSet<PathBuf>, root: &Path) -> HashSet<String> {
    planned
        .iter()
        .filter(|d| d.parent() == Some(root))
        .filter_map(|d| Some(d.file_name()?.to_str()?.to_string()))
        .collect()
}

/// Records that `root/<key>/` (created) holds engines for `graph`, then removes the
/// graph's stale key folders (or, for a folder other graphs use too, drops `graph` from
/// its record) and the digest records of files that are gone. Errors are logged with
/// their path; none fails the load.
pub fn after_plan(root: &Path, key: &str, graph: &Path, keep: usize, planned: &Planned) {
    let mut live = planned.0.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = root.join(key);
    live.insert(dir.clone());
    let paths = GraphPaths::of(graph);
    let records = match key_records(root) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                dir = %root.display(),
                error = %e,
                "no TensorRT engine cache cleanup"
            );
            Vec::new()
        }
    };
    let now = GraphUse {
        graph: paths.graph.clone(),
        real: paths.real.clone(),
        used: next_use(&records),
        used_at_unix_s: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let source = records
        .iter()
        .find(|r| r.key == key)
        .map_or_else(Source::default, |r| r.source.clone())
        .used_by(now);
    if let Err(e) = write_source(&dir, &source) {
        tracing::warn!(
            dir = %dir.display(),
            error = %e,
            "this TensorRT engine folder will not be cleaned up"
        );
    }
    for old in stale(&records, key, &paths, keep, &keys_in(&live, root)) {
        let dir = root.join(&old);
        let others = records
            .iter()
            .find(|r| r.key == old)
            .and_then(|r| r.source.without(&paths));
        if let Some(others) = others {
            match write_source(&dir, &others) {
                Ok(()) => tracing::debug!(
                    dir = %dir.display(),
                    graph = %paths.graph.display(),
                    "stale TensorRT engines kept for the other graphs that use them"
                ),
                Err(e) => tracing::warn!(
                    dir = %dir.display(),
                    error = %e,
                    "stale TensorRT engine record left"
                ),
            }
            continue;
        }
        match remove_key_dir(&dir) {
            Ok(()) => tracing::info!(
                dir = %dir.display(),
                graph = %paths.graph.display(),
                "removed stale TensorRT engines"
            ),
            // Another process removed it first.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                let e = CleanupError::Remove {
                    dir: dir.clone(),
                    key: old,
                    source,
                };
                tracing::warn!(dir = %dir.display(), error = %e, "stale TensorRT engines left");
            }
        }
    }
    prune_digests(&root.join("digests"));
}

/// Removes a key folder, its record last: a folder that is only partly removed keeps
/// its record, so the next cleanup tries again.
fn remove_key_dir(dir: &Path) -> io::Result<()> {
    let mut first_error = None;
    for entry in std::fs::read_dir(dir)? {
        let removed = entry.and_then(|entry| {
            if entry.file_name() == SOURCE_FILE {
                Ok(())
            } else if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())
            } else {
                std::fs::remove_file(entry.path())
            }
        });
        if let Err(e) = removed {
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    std::fs::remove_file(dir.join(SOURCE_FILE))?;
    std::fs::remove_dir(dir)
}

/// The records of the key folders under `root`; folders without a readable record, names
/// that are not keys and anything but real folders are left out.
fn key_records(root: &Path) -> Result<Vec<KeyRecord>, CleanupError> {
    let list = |source| CleanupError::List {
        dir: root.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).map_err(list)? {
        let entry = entry.map_err(list)?;
        let Some(key) = entry
            .file_name()
            .to_str()
            .filter(|n| is_key(n))
            .map(str::to_string)
        else {
            continue;
        };
        // `file_type` does not follow links: a link named like a key is not ours.
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let source = std::fs::read(entry.path().join(SOURCE_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<Source>(&b).ok())
            .filter(|s| s.version == SOURCE_VERSION);
        if let Some(source) = source {
            out.push(KeyRecord { key, source });
        }
    }
    Ok(out)
}

/// Writes `dir/source.json` atomically: a temporary file named for this process and
/// write (workers may plan the same key at once), then a rename.
fn write_source(dir: &Path, source: &Source) -> Result<(), CleanupError> {
    let file = dir.join(SOURCE_FILE);
    let err = |source| CleanupError::Record {
        file: file.clone(),
        source,
    };
    let text = serde_json::to_vec_pretty(source).map_err(|e| err(io::Error::other(e)))?;
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!("{SOURCE_FILE}.{}.{n}.tmp", std::process::id()));
    let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &file));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(err)
}

/// Drops the records in `digests/` whose file no longer exists (only those known not to:
/// a file that cannot be checked keeps its record).
fn prune_digests(records: &Path) {
    let entries = match std::fs::read_dir(records) {
        Ok(e) => e,
        Err(source) => {
            let e = CleanupError::List {
                dir: records.to_path_buf(),
                source,
            };
            tracing::warn!(dir = %records.display(), error = %e, "digest records not pruned");
            return;
        }
    };
    for entry in entries.flatten() {
        let record = entry.path();
        if record.extension().is_none_or(|e| e != "txt")
            || !entry.file_type().is_ok_and(|t| t.is_file())
        {
            continue;
        }
        let Some(file) = std::fs::read_to_string(&record)
            .ok()
            .as_deref()
            .and_then(digest_record_file)
        else {
            continue;
        };
        if !matches!(file.try_exists(), Ok(false)) {
            continue;
        }
        match std::fs::remove_file(&record) {
            Ok(()) => tracing::debug!(
                record = %record.display(),
                file = %file.display(),
                "dropped the digest record of a removed file"
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                let e = CleanupError::Digest {
                    record: record.clone(),
                    file,
                    source,
                };
                tracing::warn!(record = %record.display(), error = %e, "digest record left");
            }
        }
    }
}

#[cfg(test)]
#[path = "cleanup_tests.rs"]
mod tests;
