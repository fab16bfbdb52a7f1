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
/// called, cancels the job) and writes the images as `output` names them. With `preview`,
/// the job's `Preview` signals rewrite that file as they come. Returns the job path,
/// result and files.
pub async fn generate_to_files(
    client: &Client,
    request: &GenerateRequest,
    output: &Path,
    preview: Option<&Path>,
) -> Result<(OwnedObjectPath, JobResult, Vec<PathBuf>)> {
    let interrupt = ctrl_c();
    // Listening before the job exists: its first preview cannot come first.
    let stream = preview.map(|_| zbus::MessageStream::from(client.connection()));
    let path = client.generate(request).await?;
    let writer = preview.zip(stream).map(|(file, stream)| {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(write_previews(
            stream,
            path.clone(),
            file.to_path_buf(),
            stopped,
        ));
        (stop, task)
    });
    let waited =
        wait_with_progress(client, &path, Some(output), interrupt, OnInterrupt::Cancel).await;
    if let Some((stop, task)) = writer {
        let _ = stop.send(());
        let _ = task.await;
    }
    let (result, written) = waited?;
    Ok((path, result, written))
}

/// Rewrites `file` with each `Preview` signal of the job at `path` until `stop`, then
/// with those already received (the last preview can arrive just after the job's end).
async fn write_previews(
    mut stream: zbus::MessageStream,
    path: OwnedObjectPath,
    file: PathBuf,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    use futures_lite::StreamExt;
    let handle = |msg: zbus::Message| {
        let h = msg.header();
        let ours = h.message_type() == zbus::message::Type::Signal
            && h.interface()
                .is_some_and(|i| i.as_str() == "io.github.Diffusiond1.Job")
            && h.member().is_some_and(|m| m.as_str() == "Preview")
            && h.path().is_some_and(|p| p.as_str() == path.as_str());
        if !ours {
            return;
        }
        match msg.body().deserialize::<(u32, Vec<u8>)>() {
            Ok((step, png)) => {
                if let Err(e) = crate::output::replace_file(&file, &png) {
                    eprintln!("diffusionctl: preview after step {step}: {e}");
                }
            }
            Err(e) => eprintln!("diffusionctl: a malformed preview: {e}"),
        }
    };
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(msg)) => handle(msg),
                Some(Err(_)) => {}
                None => return,
            },
            _ = &mut stop => break,
        }
    }
    let grace = tokio::time::sleep(std::time::Duration::from_millis(200));
    tokio::pin!(grace);
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(msg)) => handle(msg),
                Some(Err(_)) => {}
                None => return,
            },
            _ = &mut grace => return,
        }
    }
}
