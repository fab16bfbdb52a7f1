//! Output files that are never half-written: each is written under a temporary name in a
//! folder of its own on the same file system, flushed to disk, then renamed into place,
//! and the folder's entry flushed too. A final name always holds a complete file.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Opens a finished file to hand to a caller (`OpenResult`): read-only, and only when the
/// name is a regular file itself. A symlink is refused (`O_NOFOLLOW`: the file a caller
/// gets is never one a link points at), and so is anything but a regular file (opened
/// with `O_NONBLOCK`, so a FIFO cannot block the open).
pub fn open_finished(path: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => std::io::Error::other("it is a symlink, which is never opened"),
            _ => e,
        })?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("it is not a regular file"));
    }
    Ok(file)
}

/// An output folder and the folder its temporary files live in.
#[derive(Debug, Clone)]
pub struct Output {
    dir: PathBuf,
    tmp: PathBuf,
}

impl Output {
    /// Uses `dir` for finished files and `tmp` (on the same file system, owned by this
    /// writer alone) for files being written; both are created, and temporary files left
    /// by an earlier run that died are removed.
    pub fn open(dir: &Path, tmp: &Path) -> std::io::Result<Output> {
        std::fs::create_dir_all(dir)?;
        std::fs::create_dir_all(tmp)?;
        for entry in std::fs::read_dir(tmp)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(Output {
            dir: dir.to_path_buf(),
            tmp: tmp.to_path_buf(),
        })
    }

    /// The folder finished files go to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The final path of `file`.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Whether `file` is in place.
    pub fn exists(&self, file: &str) -> bool {
        self.path(file).is_file()
    }

    /// Writes `bytes` as `file`: temporary file, fsync, rename, fsync of the folder.
    /// Returns the size written.
    pub fn write(&self, file: &str, bytes: &[u8]) -> std::io::Result<u64> {
        let tmp = self.tmp.join(format!("{file}.partial"));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, self.path(file))?;
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|()| bytes.len() as u64)
    }

    /// Copies what `reader` holds into `file`, the same way as [`Output::write`].
    pub fn copy_from(&self, file: &str, reader: &mut impl std::io::Read) -> std::io::Result<u64> {
        let tmp = self.tmp.join(format!("{file}.partial"));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            let n = std::io::copy(reader, &mut f)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, self.path(file))?;
            std::fs::File::open(&self.dir)?.sync_all()?;
            Ok(n)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Removes the temporary folder when nothing is left in it.
    pub fn close(&self) {
        let _ = std::fs::remove_dir(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_appear_whole_and_leftovers_are_cleared() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        let tmp = root.path().join("out/.state/tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("a.png.partial"), b"half").unwrap();
        let out = Output::open(&dir, &tmp).unwrap();
        assert_eq!(
            std::fs::read_dir(&tmp).unwrap().count(),
            0,
            "leftover removed"
        );
        assert_eq!(out.write("a.png", b"png bytes").unwrap(), 9);
        assert_eq!(std::fs::read(dir.join("a.png")).unwrap(), b"png bytes");
        assert!(out.exists("a.png"));
        let n = out.copy_from("b.png", &mut &b"more"[..]).unwrap();
        assert_eq!(n, 4);
        out.close();
        assert!(!tmp.exists());
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".state", "a.png", "b.png"]);
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let out = Output::open(&root.path().join("o"), &root.path().join("t")).unwrap();
        // A name with a folder that does not exist: the rename fails.
        assert!(out.write("missing/a.png", b"x").is_err());
        assert_eq!(std::fs::read_dir(root.path().join("t")).unwrap().count(), 0);
    }

    #[test]
    fn finished_files_open_but_links_and_folders_do_not() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("a.png");
        std::fs::write(&file, b"png").unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut open_finished(&file).unwrap(), &mut bytes).unwrap();
        assert_eq!(bytes, b"png");
        let secret = root.path().join("secret");
        std::fs::write(&secret, b"not yours").unwrap();
        let link = root.path().join("b.png");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let e = open_finished(&link).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        let e = open_finished(root.path()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
}
