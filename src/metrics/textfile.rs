//! The metrics file for node_exporter's textfile collector (`[metrics] textfile`):
//! rewritten every `interval_secs` and at exit, atomically, so the collector never reads
//! half a file: a temporary file in the same folder (a name not ending in `.prom`, which
//! the collector skips), flushed to disk, renamed over the file, the folder flushed.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::source::Source;

/// Writes `text` to `path` atomically. The file is readable by everyone (0644, whatever
/// the service's umask): node_exporter runs as a user of its own.
pub fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "metrics.textfile names no file",
        )
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.set_permissions(Permissions::from_mode(0o644))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Renders the metrics and writes them to `path` (off the async threads).
pub async fn write(source: &Source, path: &Path) -> io::Result<()> {
    let text = source.render().await;
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || write_atomic(&path, &text))
        .await
        .map_err(io::Error::other)?
}

/// Rewrites `path` every `interval`, from now on, until the task is dropped. A failure
/// is logged when it starts and when it ends, not at every interval.
pub async fn every(source: Source, path: PathBuf, interval: Duration) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match write(&source, &path).await {
            Ok(()) if failing => {
                tracing::info!(path = %path.display(), "metrics file written again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the metrics file (metrics.textfile)");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("diffusiond.prom");
        write_atomic(&path, "a 1\n").unwrap();
        write_atomic(&path, "a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["diffusiond.prom"]);
        let missing = dir.path().join("no/such/folder/x.prom");
        assert!(write_atomic(&missing, "a 1\n").is_err());
    }
}
