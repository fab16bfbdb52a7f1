//! Waiting on a job in a terminal: the progress bar, Ctrl-C, and writing the images.

use std::future::Future;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use diffusiond::client::{Client, GenerateRequest, JobEvent, JobResult, OnInterrupt, Result};
use indicatif::{ProgressBar, ProgressStyle};
use zbus::zvariant::OwnedObjectPath;

use crate::output::write_images;

/// A progress bar on stderr for a job, hidden when stderr is not a terminal.
#[derive(Debug)]
pub struct JobProgress {
    bar: ProgressBar,
}

impl Default for JobProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl JobProgress {
    /// A bar on stderr (hidden unless stderr is a terminal).
    pub fn new() -> JobProgress {
        let bar = if std::io::stderr().is_terminal() {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        let style = ProgressStyle::with_template(
            "{msg:>9} [{bar:40.cyan/blue}] {pos}/{len} steps {elapsed_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(200));
        JobProgress { bar }
    }

    /// Shows one event.
    pub fn update(&self, event: &JobEvent) {
        match event {
            JobEvent::State(state) => self
                .bar
                .set_message(diffusiond::client::printable(state).into_owned()),
            JobEvent::Progress { step, total } => {
                if *total > 0 {
                    self.bar.set_length(u64::from(*total));
                }
                self.bar.set_position(u64::from(*step));
            }
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// A future that completes on Ctrl-C (SIGINT). The handler is installed when this is
/// called (inside a tokio runtime), so a Ctrl-C before the future is first polled still
/// counts. Never completes if the handler cannot be installed.
pub fn ctrl_c() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupts = signal(SignalKind::interrupt());
    async move {
        match interrupts {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    }
}

/// Waits for the job at `path` with a progress bar on stderr, writing its images under
/// `output` when given. When `interrupt` (e.g. [`ctrl_c`]) completes first, the job is
/// cancelled or left alone as `on_interrupt` says. Returns the result and the files written.
pub async fn wait_with_progress(
    client: &Client,
    path: &OwnedObjectPath,
    output: Option<&Path>,
    interrupt: impl Future<Output = ()>,
    on_interrupt: OnInterrupt,
) -> Result<(JobResult, Vec<PathBuf>)> {
    let bar = JobProgress::new();
    let result = client
        .wait_job(path, |e| bar.update(&e), interrupt, on_interrupt)
        .await;
    bar.finish();
    let result = result?;
    let written = match output {
        Some(out) => write_images(&result, out)?,
        None => Vec::new(),
    };
    Ok((result, written))
}

/// Generates: queues `request`, waits with a progress bar (Ctrl-C, from the moment this is
/// called, cancels the job) and writes the images as `output` names them. Returns the job
/// path, result and files.
pub async fn generate_to_files(
    client: &Client,
    request: &GenerateRequest,
    output: &Path,
) -> Result<(OwnedObjectPath, JobResult, Vec<PathBuf>)> {
    let interrupt = ctrl_c();
    let path = client.generate(request).await?;
    let (result, written) =
        wait_with_progress(client, &path, Some(output), interrupt, OnInterrupt::Cancel).await?;
    Ok((path, result, written))
}
