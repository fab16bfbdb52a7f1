//! Reading the small files of a model folder (its JSON configs and tokenizer files) so
//! that no folder can stall or exhaust the daemon: a file is read only when it is a
//! regular file (a FIFO would block the read forever, `/dev/zero` would fill memory), and
//! only up to a size cap.
//!
//! [`read_capped`] is the one way model folders' small files are read
//! (`model_index.json`, component `config.json`s, `scheduler_config.json`, tokenizer
//! files); [`open_regular`] opens the large ones (ONNX graphs) under the same file-type
//! rule. The type is checked on the path before opening (so no device is ever opened),
//! then again on the open file with `fstat` (so a path swapped in between is caught); the
//! open uses `O_NONBLOCK`, so even a FIFO swapped in cannot block it.

use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The most bytes a model folder's JSON config may have (`model_index.json`, a
/// component's `config.json`, `scheduler_config.json`, `tokenizer_config.json`,
/// `special_tokens_map.json`). Real ones are a few KB; 4 MiB is generous.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// The most bytes a tokenizer vocabulary file may have (`tokenizer.json`, `vocab.json`,
/// `merges.txt`). CLIP's `tokenizer.json` (SD 1.x/2.x, both of SDXL's) is about 2.2 MB,
/// the test fixtures' 1.7 MB, `vocab.json` 1 MB and `merges.txt` 0.5 MB; 32 MiB leaves
/// room for larger vocabularies.
pub const MAX_TOKENIZER_BYTES: u64 = 32 << 20;

/// Why a model file could not be read. The messages do not name the file: callers do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SmallFileError {
    /// Nothing is at the path (or a symlink on it dangles).
    #[error("file is missing")]
    Missing,
    /// The path is a symlink loop.
    #[error("is a symlink loop (too many levels of symbolic links)")]
    SymlinkLoop,
    /// The path is not a regular file.
    #[error("is a {0}, not a regular file: model files are read from regular files only")]
    NotRegular(&'static str),
    /// The file is larger than the cap for its kind.
    #[error("is larger than the {cap}-byte limit for this file ({size} bytes or more)")]
    TooLarge {
        /// Its size (or the bytes read before the cap was passed).
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// Any other I/O error.
    #[error("{0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for SmallFileError {
    fn from(e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ELOOP) => SmallFileError::SymlinkLoop,
            _ if e.kind() == std::io::ErrorKind::NotFound => SmallFileError::Missing,
            _ => SmallFileError::Io(e),
        }
    }
}

impl From<SmallFileError> for std::io::Error {
    fn from(e: SmallFileError) -> Self {
        match e {
            SmallFileError::Io(e) => e,
            SmallFileError::Missing => std::io::Error::new(std::io::ErrorKind::NotFound, e),
            other => std::io::Error::other(other),
        }
    }
}

/// What kind of non-regular file `meta` describes, `None` for a regular file.
fn non_regular(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("folder")
    } else if t.is_fifo() {
        Some("FIFO (named pipe)")
    } else if t.is_char_device() {
        Some("character device")
    } else if t.is_block_device() {
        Some("block device")
    } else if t.is_socket() {
        Some("socket")
    } else {
        Some("special file")
    }
}

/// Opens `path` for reading if (following symlinks) it is a regular file: checked before
/// the open, so no device or FIFO is opened, and on the open file, so one swapped in
/// between is refused too. Returns the file and its metadata.
pub fn open_regular(path: &Path) -> Result<(File, Metadata), SmallFileError> {
    if let Some(kind) = non_regular(&std::fs::metadata(path)?) {
        return Err(SmallFileError::NotRegular(kind));
    }
    // O_NONBLOCK: a FIFO swapped in after the check cannot block the open (it has no
    // effect on regular files). O_NOCTTY: a terminal never becomes ours.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if let Some(kind) = non_regular(&meta) {
        return Err(SmallFileError::NotRegular(kind));
    }
    Ok((file, meta))
}

/// Reads a whole regular file of at most `cap` bytes ([`MAX_CONFIG_BYTES`],
/// [`MAX_TOKENIZER_BYTES`]). A file that grows past the cap while it is read is refused
/// too: never more than `cap + 1` bytes are read.
pub fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, SmallFileError> {
    let (file, meta) = open_regular(path)?;
    if meta.len() > cap {
        return Err(SmallFileError::TooLarge {
            size: meta.len(),
            cap,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(cap.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(SmallFileError::TooLarge {
            size: bytes.len() as u64,
            cap,
        });
    }
    Ok(bytes)
}

/// [`read_capped`], as UTF-8 text.
pub fn read_text_capped(path: &Path, cap: u64) -> Result<String, SmallFileError> {
    String::from_utf8(read_capped(path, cap)?)
        .map_err(|e| SmallFileError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo {}", path.display());
    }

    #[test]
    fn a_regular_file_within_the_cap_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        std::fs::write(&p, b"{}").unwrap();
        assert_eq!(read_capped(&p, 2).unwrap(), b"{}");
        assert_eq!(read_text_capped(&p, 10).unwrap(), "{}");
        let e = read_capped(&p, 1).unwrap_err();
        assert!(
            matches!(e, SmallFileError::TooLarge { size: 2, cap: 1 }),
            "{e:?}"
        );
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model_index.json");
        mkfifo(&p);
        let e = read_capped(&p, MAX_CONFIG_BYTES).unwrap_err();
        assert!(matches!(e, SmallFileError::NotRegular(_)), "{e:?}");
        assert!(e.to_string().contains("FIFO"), "{e}");
        let e = open_regular(&p).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn devices_folders_loops_and_missing_files_are_refused_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let zero = dir.path().join("zero.json");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let e = read_capped(&zero, MAX_CONFIG_BYTES).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = read_capped(dir.path(), MAX_CONFIG_BYTES).unwrap_err();
        assert!(e.to_string().contains("folder"), "{e}");
        let lp = dir.path().join("loop.json");
        std::os::unix::fs::symlink(&lp, &lp).unwrap();
        let e = read_capped(&lp, MAX_CONFIG_BYTES).unwrap_err();
        assert!(matches!(e, SmallFileError::SymlinkLoop), "{e:?}");
        assert!(e.to_string().contains("symlink loop"), "{e}");
        let e = read_capped(&dir.path().join("none.json"), 1).unwrap_err();
        assert!(matches!(e, SmallFileError::Missing), "{e:?}");
        let io: std::io::Error = e.into();
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn the_caps_fit_the_shipped_tokenizers_and_configs() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/tiny-sdxl");
        for f in ["tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json"] {
            read_capped(&root.join(f), MAX_TOKENIZER_BYTES).unwrap();
        }
        for f in ["model_index.json", "scheduler/scheduler_config.json"] {
            read_capped(&root.join(f), MAX_CONFIG_BYTES).unwrap();
        }
    }
}
