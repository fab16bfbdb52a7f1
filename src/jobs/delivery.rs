//! Result delivery: PNG encoding, and writing PNGs to callers' fds on threads of their own,
//! without blocking: a caller that never reads cannot wedge a job.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Engine, Event, Failure, JobId, JobOutput, Outcome, QueuedJob};
use crate::pipeline::preview::{Pending, PreviewHub, PreviewSink};
use crate::pipeline::{Generation, image};
use crate::request::Provenance;

impl Engine {
    /// Encodes a job's PNGs (with the `parameters` chunk).
    pub(super) fn encode(
        &self,
        started: Instant,
        job: &QueuedJob,
        g: Generation,
        batch_images: usize,
        device: &str,
    ) -> Outcome {
        let _png = tracing::debug_span!("png", job = job.id).entered();
        let t0 = Instant::now();
        let model_hash = self
            .shared
            .catalog
            .get(&job.request.model)
            .and_then(|e| e.bundle.as_ref().ok())
            .and_then(|b| b.short_hash().map(str::to_string));
        let provenance = Provenance {
            ort_version: self.shared.backend.runtime_version(),
            model_hash: model_hash.as_deref(),
            execution_provider: self.shared.backend.execution_provider(),
            loras: &g.loras,
        };
        let mut pngs = Vec::with_capacity(g.images.len());
        for (i, img) in g.images.iter().enumerate() {
            let text = job.request.png_parameters(&provenance, i);
            match image::encode_png(&img.rgb, &text) {
                Ok(bytes) => pngs.push(bytes),
                Err(e) => return Outcome::Failed(Failure::Output(e.to_string())),
            }
        }
        Outcome::Succeeded(Arc::new(JobOutput {
            pngs,
            scheduler: g.scheduler.to_string(),
            timings: g.timings,
            queued_secs: started
                .saturating_duration_since(job.queued_at)
                .as_secs_f64(),
            png_secs: t0.elapsed().as_secs_f64(),
            total_secs: started.elapsed().as_secs_f64(),
            batch_images,
            device: device.to_string(),
        }))
    }

    /// Writes the PNGs to the caller's fds on a thread of their own (a pipe the caller
    /// has not started reading must not stall the worker), then reports the job. The job
    /// stays active, and counted against its caller, until the images are written, the
    /// writes fail, `jobs.output_timeout_secs` passes, or it is cancelled.
    pub(super) fn write_to_fds(&self, job: QueuedJob, out: Arc<JobOutput>) {
        let id = job.id;
        let cancel = Arc::new(AtomicBool::new(false));
        self.lock().delivering.insert(id, cancel.clone());
        let engine = self.clone();
        let deadline =
            Instant::now() + Duration::from_secs(self.shared.settings.output_timeout_secs);
        let spawned = std::thread::Builder::new()
            .name(format!("fds-{id}"))
            .spawn(move || {
                let outcome = match write_fds(&job.output_fds, &out.pngs, &cancel, deadline) {
                    Ok(()) => Outcome::Succeeded(Arc::new(JobOutput {
                        pngs: Vec::new(),
                        ..(*out).clone()
                    })),
                    Err(WriteError::Cancelled) => Outcome::Cancelled,
                    Err(e) => {
                        Outcome::Failed(Failure::Output(format!("writing to output_fds: {e}")))
                    }
                };
                engine.delivered(id, outcome);
            });
        if let Err(e) = spawned {
            let message = format!("cannot start a thread to write output fds: {e}");
            self.delivered(id, Outcome::Failed(Failure::Output(message)));
        }
    }

    /// A delivery ended: the job stops counting, and is reported.
    fn delivered(&self, id: JobId, outcome: Outcome) {
        {
            let mut st = self.lock();
            st.delivering.remove(&id);
            st.admission.retire(id);
        }
        self.notify();
        self.send(Event::Finished(id, outcome));
    }
}

/// Why writing to a caller's fd stopped.
#[derive(Debug)]
enum WriteError {
    /// The job was cancelled.
    Cancelled,
    /// The reader did not take the data before the deadline.
    TimedOut,
    /// The write failed (a closed pipe, a full disk, a read-only fd ...).
    Io(std::io::Error),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Cancelled => f.write_str("cancelled"),
            WriteError::TimedOut => {
                f.write_str("the reader did not take the image within jobs.output_timeout_secs")
            }
            WriteError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// How often a blocked write looks at its cancel flag.
const POLL_INTERVAL_MS: i32 = 100;

/// Writes image `i` to fd `i` without ever blocking for longer than [`POLL_INTERVAL_MS`]:
/// each fd is switched to non-blocking mode (its flags are restored after), and a full
/// pipe is waited on with `poll` until it drains, the job is cancelled or `deadline` passes.
fn write_fds(
    fds: &[OwnedFd],
    pngs: &[Vec<u8>],
    cancel: &AtomicBool,
    deadline: Instant,
) -> Result<(), WriteError> {
    for (fd, png) in fds.iter().zip(pngs) {
        let raw = fd.as_raw_fd();
        // SAFETY: `raw` is an open fd owned by `fd` for this whole scope; F_GETFL and
        // F_SETFL only read and set its status flags.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        if flags < 0 {
            return Err(WriteError::Io(std::io::Error::last_os_error()));
        }
        // SAFETY: as above.
        unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) };
        let result = write_all(fd, png, cancel, deadline);
        // SAFETY: as above; the caller's flags come back as they were.
        unsafe { libc::fcntl(raw, libc::F_SETFL, flags) };
        result?;
    }
    Ok(())
}

fn write_all(
    fd: &OwnedFd,
    mut data: &[u8],
    cancel: &AtomicBool,
    deadline: Instant,
) -> Result<(), WriteError> {
    use std::io::Write;
    let mut file = std::fs::File::from(fd.try_clone().map_err(WriteError::Io)?);
    while !data.is_empty() {
        if cancel.load(Ordering::SeqCst) {
            return Err(WriteError::Cancelled);
        }
        match file.write(data) {
            Ok(0) => {
                return Err(WriteError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(WriteError::TimedOut);
                }
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: `pfd` is one valid pollfd on the stack for the duration of the
                // call; poll only writes its `revents`.
                unsafe { libc::poll(&mut pfd, 1, POLL_INTERVAL_MS) };
            }
            Err(e) => return Err(WriteError::Io(e)),
        }
    }
    Ok(())
}

/// Each engine's [`PreviewHub`] (keyed by its shared state's address; a hub lives as long
/// as its sender task or a batch's sink holds it).
static PREVIEW_HUBS: std::sync::Mutex<Vec<(usize, std::sync::Weak<PreviewHub>)>> =
    std::sync::Mutex::new(Vec::new());

impl Engine {
    /// Where this engine's previews wait to be sent (the D-Bus side takes them from it).
    pub fn preview_hub(&self) -> Arc<PreviewHub> {
        let key = Arc::as_ptr(&self.shared) as usize;
        let mut hubs = PREVIEW_HUBS.lock().unwrap_or_else(|e| e.into_inner());
        hubs.retain(|(_, hub)| hub.strong_count() > 0);
        if let Some(hub) = hubs
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, hub)| hub.upgrade())
        {
            return hub;
        }
        let hub = Arc::new(PreviewHub::default());
        hubs.push((key, Arc::downgrade(&hub)));
        hub
    }

    /// The preview sink of a batch, set on the model before it runs and taken off after
    /// ([`crate::jobs::Model::set_preview_sink`] `Some`, then `None`): request `i`'s
    /// previews go to job `batch[i]`'s slot in the [`PreviewHub`], addressed to the
    /// connection that created it. A job without a caller on the bus (a batch item) gets
    /// none; a batch where no job asked for previews gets a sink that drops everything.
    pub fn preview_sink(&self, batch: &[QueuedJob]) -> PreviewSink {
        let targets: Vec<Option<(JobId, String)>> = batch
            .iter()
            .map(|j| {
                let sender = j.sender.clone().filter(|_| j.request.preview_every > 0)?;
                Some((j.id, sender))
            })
            .collect();
        if targets.iter().all(Option::is_none) {
            return Box::new(|_, _, _| {});
        }
        let hub = self.preview_hub();
        Box::new(move |i, step, png| {
            if let Some(Some((id, destination))) = targets.get(i) {
                hub.offer(
                    *id,
                    Pending {
                        destination: destination.clone(),
                        step: u32::try_from(step).unwrap_or(u32::MAX),
                        png,
                    },
                );
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (OwnedFd, std::fs::File) {
        let (r, w) = std::io::pipe().unwrap();
        (OwnedFd::from(w), std::fs::File::from(OwnedFd::from(r)))
    }

    #[test]
    fn a_reader_that_never_reads_times_out_and_cancel_ends_it_at_once() {
        let big = vec![7u8; 1 << 20]; // more than a pipe holds
        let (w, _r) = pipe();
        let t0 = Instant::now();
        let err = write_fds(
            std::slice::from_ref(&w),
            std::slice::from_ref(&big),
            &AtomicBool::new(false),
            Instant::now() + Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(err, WriteError::TimedOut), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());

        let cancel = Arc::new(AtomicBool::new(false));
        let flag = cancel.clone();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            flag.store(true, Ordering::SeqCst);
        });
        let t0 = Instant::now();
        let err = write_fds(
            std::slice::from_ref(&w),
            std::slice::from_ref(&big),
            &cancel,
            Instant::now() + Duration::from_secs(60),
        )
        .unwrap_err();
        stopper.join().unwrap();
        assert!(matches!(err, WriteError::Cancelled), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    }

    #[test]
    fn a_reader_that_reads_gets_everything_and_errors_are_reported() {
        use std::io::Read;
        let big: Vec<u8> = (0..(1 << 20)).map(|i| i as u8).collect();
        let (w, mut r) = pipe();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            r.read_to_end(&mut got).unwrap();
            got
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        write_fds(
            std::slice::from_ref(&w),
            std::slice::from_ref(&big),
            &AtomicBool::new(false),
            deadline,
        )
        .unwrap();
        drop(w);
        assert_eq!(reader.join().unwrap(), big);

        let (w, r) = pipe();
        drop(r); // a closed pipe
        let err = write_fds(
            std::slice::from_ref(&w),
            &[vec![1u8; 10]],
            &AtomicBool::new(false),
            deadline,
        )
        .unwrap_err();
        assert!(matches!(err, WriteError::Io(_)), "{err}");
        let full = OwnedFd::from(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        );
        let err =
            write_fds(&[full], &[vec![1u8; 10]], &AtomicBool::new(false), deadline).unwrap_err();
        assert!(err.to_string().contains("No space left"), "{err}");
    }
}
