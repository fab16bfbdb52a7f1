//! Result delivery: PNG encoding, and writing PNGs to callers' fds on threads of their own.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use super::{Engine, Event, Failure, JobOutput, Outcome, QueuedJob};
use crate::pipeline::{Generation, image};

impl Engine {
    /// Encodes a job's PNGs (with the `parameters` chunk).
    pub(super) fn encode(
        &self,
        started: Instant,
        job: &QueuedJob,
        g: Generation,
        batch_images: usize,
    ) -> Outcome {
        let _png = tracing::debug_span!("png", job = job.id).entered();
        let t0 = Instant::now();
        let text = job
            .request
            .png_parameters(self.shared.backend.runtime_version());
        let mut pngs = Vec::with_capacity(g.images.len());
        for img in &g.images {
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
        }))
    }

    /// Writes the PNGs to the caller's fds on a thread of their own (a pipe the caller
    /// has not started reading must not stall the worker), then reports the job.
    pub(super) fn write_to_fds(&self, job: QueuedJob, out: Arc<JobOutput>) {
        let engine = self.clone();
        let id = job.id;
        let spawned = std::thread::Builder::new()
            .name(format!("fds-{}", job.id))
            .spawn(move || {
                let outcome = match write_fds(&job.output_fds, &out.pngs) {
                    Ok(()) => Outcome::Succeeded(Arc::new(JobOutput {
                        pngs: Vec::new(),
                        ..(*out).clone()
                    })),
                    Err(e) => {
                        Outcome::Failed(Failure::Output(format!("writing to output_fds: {e}")))
                    }
                };
                engine.send(Event::Finished(job.id, outcome));
            });
        if let Err(e) = spawned {
            let message = format!("cannot start a thread to write output fds: {e}");
            self.send(Event::Finished(
                id,
                Outcome::Failed(Failure::Output(message)),
            ));
        }
    }
}

/// Writes image `i` to fd `i`.
fn write_fds(fds: &[OwnedFd], pngs: &[Vec<u8>]) -> std::io::Result<()> {
    use std::io::Write;
    for (fd, png) in fds.iter().zip(pngs) {
        let mut file = std::fs::File::from(fd.try_clone()?);
        file.write_all(png)?;
        file.flush()?;
    }
    Ok(())
}
