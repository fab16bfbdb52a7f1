//! The worker thread: waits for a runnable batch, runs it on its model, reports every
//! job exactly once. It sleeps on the engine's condition variable; the only timed wait
//! is for the next idle-model unload.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Engine, Event, Failure, JobId, Model, Outcome, QueuedJob, Running, State};
use crate::pipeline::{Generation, PipelineError};
use crate::request::ResolvedRequest;

impl Engine {
    /// The worker loop: pick a batch, run it, repeat; exit once shutting down and idle.
    pub(super) fn work(self) {
        while let Some((batch, model)) = self.next_batch() {
            self.run_batch(batch, model);
        }
    }

    /// Waits for a runnable batch; starts loads for queued jobs whose model is cold, and
    /// fails jobs whose model cannot load. `None` once shutting down with nothing queued.
    fn next_batch(&self) -> Option<(Vec<QueuedJob>, Box<dyn Model>)> {
        let mut st = self.lock();
        loop {
            self.fail_unloadable(&mut st);
            let cold: Vec<String> = st
                .queue
                .iter()
                .filter(|j| st.slots.is_unloaded(&j.request.model))
                .map(|j| j.request.model.clone())
                .collect();
            for m in cold {
                self.start_load(&mut st, &m);
            }
            let state = &mut *st;
            let slots = &state.slots;
            let batch = state
                .queue
                .take_batch(|m| slots.is_ready(m), |lead| self.batch_cap(lead));
            if let Some(first) = batch.first() {
                let name = first.request.model.clone();
                match (st.slots.take(&name), self.shared.backend.run_control()) {
                    (Some(model), Ok(control)) => {
                        st.running = Some(Running {
                            control: Arc::new(control),
                            jobs: batch.iter().map(|j| j.id).collect(),
                            cancelled: HashSet::new(),
                        });
                        return Some((batch, model));
                    }
                    (model, result) => {
                        // Only out of memory makes run options fail: fail these jobs, keep serving.
                        if let Some(model) = model {
                            st.slots.put_back(&name, model);
                        }
                        let message = result.err().unwrap_or_else(|| "model not ready".into());
                        for j in batch {
                            st.admission.retire(j.id);
                            let failure = Failure::Inference(message.clone());
                            self.send(Event::Finished(j.id, Outcome::Failed(failure)));
                        }
                    }
                }
            }
            if st.shutting_down && st.queue.is_empty() {
                return None;
            }
            let idle = self.shared.settings.idle_unload_secs;
            let next_unload = (idle > 0)
                .then(|| {
                    st.slots
                        .unload_idle(Duration::from_secs(idle), Instant::now())
                })
                .flatten();
            st = match next_unload {
                Some(due) => {
                    let wait = due.saturating_duration_since(Instant::now());
                    self.shared
                        .wake
                        .wait_timeout(st, wait)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0)
                }
                None => self.shared.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }

    /// The most images a batch led by `lead` may hold: `jobs.max_batch_images`, fewer
    /// when the memory budget would not hold them together (never fewer than the lead's
    /// own, which was admitted alone).
    fn batch_cap(&self, lead: &QueuedJob) -> usize {
        let r = &lead.request;
        let mut cap = self.shared.settings.max_batch_images.max(r.num_images);
        let profile = self
            .shared
            .catalog
            .get(&r.model)
            .and_then(|e| e.bundle.as_ref().ok())
            .map(|b| &b.memory);
        if let (Some(budget), Some(profile)) = (self.shared.memory_budget, profile) {
            while cap > r.num_images && profile.peak(r.width, r.height, cap, r.do_cfg()) > budget {
                cap -= 1;
            }
        }
        cap
    }

    /// Jobs whose model failed to load end with that error.
    fn fail_unloadable(&self, st: &mut State) {
        let failed: HashMap<String, Failure> = st.slots.take_failures();
        if failed.is_empty() {
            return;
        }
        let dropped = st
            .queue
            .drain_where(|j| failed.contains_key(&j.request.model));
        for j in dropped {
            st.admission.retire(j.id);
            let model = &j.request.model;
            let message = format!("model '{model}' failed to load: {}", failed[model]);
            self.send(Event::Finished(
                j.id,
                Outcome::Failed(Failure::ModelLoad(message)),
            ));
        }
    }

    /// Runs one batch on the worker thread; every job gets exactly one Finished event.
    fn run_batch(&self, batch: Vec<QueuedJob>, mut model: Box<dyn Model>) {
        let started = Instant::now();
        let name = batch[0].request.model.clone();
        let control = self.lock().running.as_ref().map(|r| r.control.clone());
        let images: usize = batch.iter().map(|j| j.request.num_images).sum();
        let _batch =
            tracing::info_span!("batch", model = %name, jobs = batch.len(), images).entered();
        for j in &batch {
            self.send(Event::Started(j.id, images as u32));
        }
        let requests: Vec<&ResolvedRequest> = batch.iter().map(|j| &j.request).collect();
        let ids: Vec<JobId> = batch.iter().map(|j| j.id).collect();
        let result = match &control {
            Some(control) => {
                let mut progress = |step: usize, total: usize| self.progress(&ids, step, total);
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    model.generate(&requests, control, &mut progress)
                }))
                .unwrap_or_else(|_| {
                    Err(PipelineError::Inference {
                        component: "pipeline".into(),
                        message: "internal error (panic); the job was stopped".into(),
                    })
                })
            }
            None => Err(PipelineError::Inference {
                component: "runtime".into(),
                message: "the batch has no run control".into(),
            }),
        };
        let cancelled = {
            let mut st = self.lock();
            st.slots.put_back(&name, model);
            st.running.take().map(|r| r.cancelled).unwrap_or_default()
        };
        self.release_memory(&batch);
        self.notify();
        self.finish_batch(batch, result, &cancelled, images, started);
    }

    /// After a batch with a large working set, hands the freed memory back to the system,
    /// so a daemon that served one large request does not keep its peak for good.
    fn release_memory(&self, batch: &[QueuedJob]) {
        let r = &batch[0].request;
        let images = batch.iter().map(|j| j.request.num_images).sum();
        let large = self
            .shared
            .catalog
            .get(&r.model)
            .and_then(|e| e.bundle.as_ref().ok())
            .is_some_and(|b| {
                b.memory.working_set(r.width, r.height, images, r.do_cfg())
                    > crate::model::memory::RELEASE_ABOVE
            });
        if large {
            // SAFETY: malloc_trim only returns free heap pages to the system; it does not
            // touch memory in use.
            unsafe { libc::malloc_trim(0) };
        }
    }

    /// Progress for every live job of the batch; false (stop) once all are cancelled.
    fn progress(&self, ids: &[JobId], step: usize, total: usize) -> bool {
        let live: Vec<JobId> = {
            let st = self.lock();
            let cancelled = st.running.as_ref().map(|r| &r.cancelled);
            ids.iter()
                .copied()
                .filter(|id| !cancelled.is_some_and(|c| c.contains(id)))
                .collect()
        };
        for &id in &live {
            self.send(Event::Progress(id, step as u32, total as u32));
        }
        !live.is_empty()
    }

    fn finish_batch(
        &self,
        batch: Vec<QueuedJob>,
        result: Result<Vec<Generation>, PipelineError>,
        cancelled: &HashSet<JobId>,
        images: usize,
        started: Instant,
    ) {
        let generations: Vec<Result<Generation, Failure>> = match result {
            Ok(g) => g.into_iter().map(Ok).collect(),
            Err(e) => {
                let failure = match e {
                    PipelineError::InvalidArgument { .. } | PipelineError::Request(_) => {
                        Failure::InvalidArgument(e.to_string())
                    }
                    _ => Failure::Inference(e.to_string()),
                };
                batch.iter().map(|_| Err(failure.clone())).collect()
            }
        };
        for (job, generation) in batch.into_iter().zip(generations) {
            if cancelled.contains(&job.id) {
                continue; // Already reported as cancelled.
            }
            let generation = match generation {
                // A batch item's PNGs are encoded beside the next batch's denoising.
                Ok(g) if job.background => match self.encode_aside(job, g, images, started) {
                    Ok(()) => continue,
                    Err(back) => (back.0, Ok(back.1)),
                },
                other => (job, other),
            };
            let (job, generation) = generation;
            let outcome = match generation {
                Ok(g) => self.encode(started, &job, g, images),
                Err(f) => Outcome::Failed(f),
            };
            match outcome {
                // Still active (and counted against its caller) until its fds are written.
                Outcome::Succeeded(out) if !job.output_fds.is_empty() => {
                    self.write_to_fds(job, out)
                }
                other => {
                    self.lock().admission.retire(job.id);
                    self.notify();
                    self.send(Event::Finished(job.id, other));
                }
            }
        }
    }

    /// Encodes a batch item's images on a thread of their own and reports the job from
    /// there, so the worker goes on to the next batch. Gives the job back when no thread
    /// can be started.
    fn encode_aside(
        &self,
        job: QueuedJob,
        g: Generation,
        images: usize,
        started: Instant,
    ) -> Result<(), Box<(QueuedJob, Generation)>> {
        let engine = self.clone();
        let slot = Arc::new(std::sync::Mutex::new(Some((job, g))));
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("png".into())
            .spawn(move || {
                let taken = theirs.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some((job, g)) = taken {
                    let outcome = engine.encode(started, &job, g, images);
                    engine.send(Event::Finished(job.id, outcome));
                }
            });
        match spawned {
            Ok(_) => Ok(()),
            Err(_) => slot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .map_or(Ok(()), |back| Err(Box::new(back))),
        }
    }
}
