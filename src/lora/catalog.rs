//! The LoRA files a model may use, by name: the `.safetensors` files of the folders the
//! operator configured (`[loras] path`, `[models.NAME] loras`), or the files given on
//! `diffusionctl --local`'s command line. A request names a LoRA; only this catalog
//! turns a name into a path, so a caller never makes the daemon open a path it sent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// One LoRA file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraEntry {
    /// Its name: the file name without `.safetensors`.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes, when scanned.
    pub size: u64,
}

/// LoRA files by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoraCatalog {
    entries: BTreeMap<String, LoraEntry>,
}

static NONE: LoraCatalog = LoraCatalog {
    entries: BTreeMap::new(),
};

/// The extension LoRA files must have.
pub const EXTENSION: &str = "safetensors";

impl LoraCatalog {
    /// The empty catalog: no LoRA can be named.
    pub fn none() -> &'static LoraCatalog {
        &NONE
    }

    /// The `.safetensors` files directly inside `dirs`, in order: a name found in an
    /// earlier folder hides the same name in a later one. Returns the catalog and one
    /// warning per folder that could not be read or name that was hidden.
    pub fn scan(dirs: &[PathBuf]) -> (LoraCatalog, Vec<String>) {
        let mut catalog = LoraCatalog::default();
        let mut warnings = Vec::new();
        for dir in dirs {
            let read = match std::fs::read_dir(dir) {
                Ok(r) => r,
                Err(e) => {
                    warnings.push(format!("LoRA folder {}: {e}", dir.display()));
                    continue;
                }
            };
            let mut found: Vec<(PathBuf, u64)> = read
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let path = e.path();
                    let meta = std::fs::metadata(&path).ok()?;
                    let lora = meta.is_file() && path.extension().is_some_and(|x| x == EXTENSION);
                    lora.then_some((path, meta.len()))
                })
                .collect();
            found.sort();
            for (path, size) in found {
                let Some(name) = name_of(&path) else { continue };
                if let Some(first) = catalog.entries.get(&name) {
                    warnings.push(format!(
                        "LoRA {name}: {} is hidden by {}",
                        path.display(),
                        first.path.display()
                    ));
                    continue;
                }
                catalog.insert(LoraEntry { name, path, size });
            }
        }
        (catalog, warnings)
    }

    /// A catalog of the given files, named by their stems; two files with one name are
    /// refused (the message names both).
    pub fn from_files(paths: &[PathBuf]) -> Result<LoraCatalog, String> {
        let mut catalog = LoraCatalog::default();
        for path in paths {
            let name =
                name_of(path).ok_or_else(|| format!("{}: not a file name", path.display()))?;
            if let Some(other) = catalog.entries.get(&name) {
                if other.path != *path {
                    return Err(format!(
                        "{} and {} have the same name {name}",
                        other.path.display(),
                        path.display()
                    ));
                }
                continue;
            }
            let size = std::fs::metadata(path).map_or(0, |m| m.len());
            catalog.insert(LoraEntry {
                name,
                path: path.clone(),
                size,
            });
        }
        Ok(catalog)
    }

    /// Adds an entry (replacing one of the same name).
    pub fn insert(&mut self, entry: LoraEntry) {
        self.entries.insert(entry.name.clone(), entry);
    }

    /// The file named `name`.
    pub fn get(&self, name: &str) -> Option<&LoraEntry> {
        self.entries.get(name)
    }

    /// Every entry, by name.
    pub fn iter(&self) -> impl Iterator<Item = &LoraEntry> {
        self.entries.values()
    }

    /// How many files.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A model's LoRA folders and their last scan: requests resolve against a snapshot
/// without touching the disk; [`LoraShelf::rescan`] (file I/O: off async threads) reads
/// the folders again, when `ListLoras` runs or a request names a file not seen yet.
#[derive(Debug, Default)]
pub struct LoraShelf {
    dirs: Vec<PathBuf>,
    current: RwLock<Arc<LoraCatalog>>,
}

impl LoraShelf {
    /// Scans `dirs` (warnings logged).
    pub fn open(dirs: Vec<PathBuf>) -> LoraShelf {
        let shelf = LoraShelf {
            dirs,
            current: RwLock::default(),
        };
        shelf.rescan();
        shelf
    }

    /// The folders, in search order.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The catalog as last scanned.
    pub fn snapshot(&self) -> Arc<LoraCatalog> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Scans the folders again and keeps the result.
    pub fn rescan(&self) -> Arc<LoraCatalog> {
        if self.dirs.is_empty() {
            return self.snapshot();
        }
        let (catalog, warnings) = LoraCatalog::scan(&self.dirs);
        for w in warnings {
            tracing::warn!("{w}");
        }
        let catalog = Arc::new(catalog);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = catalog.clone();
        catalog
    }
}

/// The name of a LoRA file: its file name without `.safetensors` (any other file name
/// whole).
pub fn name_of(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    Some(
        file.strip_suffix(".safetensors")
            .unwrap_or(file)
            .to_string(),
    )
}

/// A `--lora` argument, `FILE[:SCALE]` or `NAME[:SCALE]`: the text after the last `:`
/// is the scale when it reads as a number (else the whole argument is the file or name,
/// at scale 1.0).
pub fn split_scale(arg: &str) -> Result<(String, f64), String> {
    if let Some((file, scale)) = arg.rsplit_once(':')
        && let Ok(scale) = scale.trim().parse::<f64>()
    {
        if file.is_empty() {
            return Err(format!("{arg}: no file or name before the scale"));
        }
        if !scale.is_finite() {
            return Err(format!("{arg}: the scale is not a finite number"));
        }
        return Ok((file.to_string(), scale));
    }
    if arg.is_empty() {
        return Err("needs a file or a name".into());
    }
    Ok((arg.to_string(), 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_arguments_take_an_optional_scale() {
        assert_eq!(
            split_scale("a.safetensors").unwrap(),
            ("a.safetensors".into(), 1.0)
        );
        assert_eq!(
            split_scale("/x/a.safetensors:0.5").unwrap(),
            ("/x/a.safetensors".into(), 0.5)
        );
        assert_eq!(split_scale("style:-1").unwrap(), ("style".into(), -1.0));
        assert_eq!(split_scale("dir:v2/a").unwrap(), ("dir:v2/a".into(), 1.0));
        assert!(split_scale(":0.5").is_err());
        assert!(split_scale("a:inf").is_err());
        assert!(split_scale("").is_err());
    }

    #[test]
    fn folders_are_scanned_in_order_and_earlier_names_win() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(a.path().join("style.safetensors"), b"x").unwrap();
        std::fs::write(a.path().join("notes.txt"), b"x").unwrap();
        std::fs::write(b.path().join("style.safetensors"), b"yy").unwrap();
        std::fs::write(b.path().join("char.safetensors"), b"zzz").unwrap();
        let missing = a.path().join("missing");
        let dirs = [a.path().to_path_buf(), b.path().to_path_buf(), missing];
        let (catalog, warnings) = LoraCatalog::scan(&dirs);
        let names: Vec<&str> = catalog.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["char", "style"]);
        assert_eq!(catalog.get("style").unwrap().size, 1);
        assert_eq!(catalog.get("char").unwrap().size, 3);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("is hidden by"), "{warnings:?}");
        assert!(warnings[1].contains("missing"), "{warnings:?}");
    }

    #[test]
    fn files_are_named_by_their_stem_and_clashing_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("a/x.safetensors");
        let two = dir.path().join("b/x.safetensors");
        let c = LoraCatalog::from_files(std::slice::from_ref(&one)).unwrap();
        assert_eq!(c.get("x").unwrap().path, one);
        let err = LoraCatalog::from_files(&[one, two]).unwrap_err();
        assert!(err.contains("have the same name x"), "{err}");
    }
}
