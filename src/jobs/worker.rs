//! A worker thread (one per device): waits for a runnable batch, runs it on its own copy
//! of the model, reports every job exactly once. It sleeps on the engine's condition
//! variable; the only timed wait is for the next idle-model unload.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Engine, Event, Failure, JobId, Model, Outcome, QueuedJob, Running, State};
use crate::pipeline::{Generation, PipelineError};
use crate::request::ResolvedRequest;

impl Engine {
    /// The loop of worker `worker`: pick a batch, run it, repeat; exit once shutting down
    /// and idle.
    pub(super) fn work(self, worker: usize) {
        while let Some((batch, model)) = self.next_batch(worker) {
            self.run_batch(worker, batch, model);
        }
    }

    /// Waits for a batch `worker` can run; starts its loads of models that queued jobs
    /// need, and fails jobs whose model cannot load. `None` once shutting down with
    /// nothing queued.
    fn next_batch(&self, worker: usize) -> Option<(Vec<QueuedJob>, Box<dyn Model>)> {
        let mut st = self.lock();
        loop {
            self.fail_unloadable(&mut st);
            let mut cold: Vec<String> = st
                .queue
                .iter()
                .filter(|j| st.slots.is_unloaded(&j.request.model_key(), worker))
                .map(|j| j.request.model_key().into_owned())
                .collect();
            cold.sort();
            cold.dedup();
            for m in cold {
                self.start_load(&mut st, &m, worker);
            }
            let cap = self.batch_limit(&st, worker);
            let state = &mut *st;
            let slots = &state.slots;
            let batch = match cap {
                Some(cap) => state
                    .queue
                    .take_batch(|m| slots.is_ready(m, worker), |_| cap),
                None => Vec::new(),
            };
            if let Some(first) = batch.first() {
                let name = first.request.model_key().into_owned();
                match (
                    st.slots.take(&name, worker),
                    self.shared.backend.run_control(),
                ) {
                    (Some(model), Ok(control)) => {
                        let peak = self.peak(&batch);
                        st.running[worker].push(Running::new(Arc::new(control), &batch, peak));
                        return Some((batch, model));
                    }
                    (model, result) => {
                        // Only out of memory makes run options fail: fail these jobs, keep serving.
                        if let Some(model) = model {
                            st.slots.put_back(&name, worker, model);
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
            let next_unload = st.slots.unload_idle(
                (idle > 0).then(|| Duration::from_secs(idle)),
                Instant::now(),
            );
            super::lora_sets::prune(&mut st);
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

    /// The most images `worker`'s next batch may hold, or `None` when it must wait: its
    /// lead does not fit in the memory the other workers' batches leave. The limit is
    /// `jobs.max_batch_images`; an equal share of the compatible queued images when other
    /// workers with the model loaded are idle too ([`super::queue::fair_share`]); fewer
    /// when the memory budget would not hold them beside the other running batches. Never
    /// fewer than the lead's own images (it was admitted alone).
    fn batch_limit(&self, st: &State, worker: usize) -> Option<usize> {
        let (lead, compatible) = st.queue.peek_batch(|m| st.slots.is_ready(m, worker))?;
        let r = &lead.request;
        let mut cap = self.shared.settings.max_batch_images;
        let idle = (0..st.running.len())
            .filter(|&w| st.running[w].is_empty() && st.slots.is_ready(&r.model_key(), w))
            .count();
        if idle > 1 {
            cap = cap.min(super::queue::fair_share(compatible, idle));
        }
        cap = cap.max(r.num_images);
        let Some(budget) = self.shared.memory_budget else {
            return Some(cap);
        };
        let Some(profile) = self.memory_profile(&r.model) else {
            return Some(cap);
        };
        let others: u64 = st.running.iter().flatten().map(|b| b.peak).sum();
        let left = budget.saturating_sub(others);
        let fits = |n: usize| {
            let images = n * r.memory_images() / r.num_images.max(1);
            profile.peak(r.width, r.height, images, r.do_cfg()) <= left
        };
        if others > 0 && !fits(r.num_images) {
            return None;
        }
        while cap > r.num_images && !fits(cap) {
            cap -= 1;
        }
        Some(cap)
    }

    pub(super) fn memory_profile(
        &self,
        model: &str,
    ) -> Option<&crate::model::memory::MemoryProfile> {
        self.shared
            .catalog
            .get(model)
            .and_then(|e| e.bundle.as_ref().ok())
            .map(|b| &b.memory)
    }

    /// A batch's estimated peak memory (0 without a memory budget).
    fn peak(&self, batch: &[QueuedJob]) -> u64 {
        let r = &batch[0].request;
        let images = batch.iter().map(|j| j.request.memory_images()).sum();
        match (self.shared.memory_budget, self.memory_profile(&r.model)) {
            (Some(_), Some(profile)) => profile.peak(r.width, r.height, images, r.do_cfg()),
            _ => 0,
        }
    }

    /// Jobs whose model failed to load end with that error.
    fn fail_unloadable(&self, st: &mut State) {
        let failed: HashMap<String, Failure> = st.slots.take_failures();
        if failed.is_empty() {
            return;
        }
        let dropped = st
            .queue
            .drain_where(|j| failed.contains_key(&*j.request.model_key()));
        for j in dropped {
            st.admission.retire(j.id);
            let failure = match &failed[&*j.request.model_key()] {
                // A LoRA that does not fit: the request's fault, said as it is.
                Failure::InvalidArgument(m) => Failure::InvalidArgument(m.clone()),
                f => {
                    let model = &j.request.model;
                    Failure::ModelLoad(format!("model '{model}' failed to load: {f}"))
                }
            };
            self.send(Event::Finished(j.id, Outcome::Failed(failure)));
        }
    }

    /// Runs one batch on worker `worker`'s thread, with the model taken from its slot
    /// (and put back after); every job gets exactly one Finished event. Queued work that
    /// goes first runs between its steps ([`super::preempt`]).
    fn run_batch(&self, worker: usize, batch: Vec<QueuedJob>, mut model: Box<dyn Model>) {
        let idle = self.shared.settings.idle_unload_secs;
        let keep = super::slots::batch_keep(
            batch.iter().map(|j| j.request.keep_alive),
            (idle > 0).then(|| Duration::from_secs(idle)),
        );
        model.set_interlude(Some(self.interlude_for(worker, 0)));
        let mut slot = Some((model, keep));
        self.execute(worker, batch, Held::Slot(&mut slot));
        // `execute` put it back, before any job of the batch was reported.
        debug_assert!(slot.is_none());
    }

    /// Runs the batch on top of `worker`'s running stack on `model`, then takes it off the
    /// stack (a worker's own batch also puts its model back in its slot, at once) and
    /// reports every job exactly once; a batch stopped to make room for an interactive job
    /// puts its jobs back in the queue.
    pub(super) fn execute(&self, worker: usize, batch: Vec<QueuedJob>, mut held: Held<'_>) {
        let model: &mut dyn Model = match &mut held {
            Held::Slot(slot) => match slot.as_mut() {
                Some((m, _)) => m.as_mut(),
                None => return,
            },
            Held::Nested(m) => &mut **m,
        };
        let started = Instant::now();
        let name = batch[0].request.model_key().into_owned();
        let control = self.lock().running[worker]
            .last()
            .map(|r| r.control.clone());
        let images: usize = batch.iter().map(|j| j.request.num_images).sum();
        let device = self.device(worker).to_string();
        let _batch =
            tracing::info_span!("batch", model = %name, %device, jobs = batch.len(), images)
                .entered();
        for j in &batch {
            self.send(Event::Started(j.id, images as u32));
        }
        let requests: Vec<&ResolvedRequest> = batch.iter().map(|j| &j.request).collect();
        let ids: Vec<JobId> = batch.iter().map(|j| j.id).collect();
        let result = match &control {
            Some(control) => {
                let mut progress = |step: usize, total: usize| {
                    crate::metrics::unet_step(images);
                    self.progress(worker, &ids, step, total)
                };
                // Set and cleared in pairs: a batch that runs between two steps of this one
                // stacks its own sink on top.
                model.set_preview_sink(Some(self.preview_sink(&batch)));
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    model.generate(&requests, control, &mut progress)
                }));
                model.set_preview_sink(None);
                result.unwrap_or_else(|_| {
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
        let preempted = matches!(result, Err(PipelineError::Preempted));
        let cancelled = {
            let mut st = self.lock();
            if let Held::Slot(slot) = held
                && let Some((mut model, keep)) = slot.take()
            {
                model.set_interlude(None);
                st.slots.put_back_keeping(&name, worker, model, keep);
            }
            let cancelled = st.running[worker]
                .pop()
                .map(|r| r.cancelled)
                .unwrap_or_default();
            if preempted {
                // Back in the queue, in their places; they run again from the start.
                for job in batch {
                    if !cancelled.contains(&job.id) {
                        st.queue.push(job);
                    }
                }
                drop(st);
                self.notify();
                return;
            }
            cancelled
        };
        self.release_memory(&batch);
        self.notify();
        let done = Done {
            cancelled: &cancelled,
            images,
            started,
            device: &device,
        };
        self.finish_batch(batch, result, &done);
    }

    /// After a batch with a large working set, hands the freed memory back to the system,
    /// so a daemon that served one large request does not keep its peak for good.
    fn release_memory(&self, batch: &[QueuedJob]) {
        let r = &batch[0].request;
        let images = batch.iter().map(|j| j.request.memory_images()).sum();
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
            crate::heap::give_back();
        }
    }

    /// Progress for every live job of `worker`'s batch; false (stop) once all are
    /// cancelled.
    fn progress(&self, worker: usize, ids: &[JobId], step: usize, total: usize) -> bool {
        let live: Vec<JobId> = {
            let st = self.lock();
            let cancelled = st.running[worker].last().map(|r| &r.cancelled);
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
        done: &Done<'_>,
    ) {
        let Done {
            cancelled,
            images,
            started,
            device,
        } = *done;
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
                Ok(g) if job.background => match self.encode_aside(job, g, done) {
                    Ok(()) => continue,
                    Err(back) => (back.0, Ok(back.1)),
                },
                other => (job, other),
            };
            let (job, generation) = generation;
            let outcome = match generation {
                Ok(g) => self.encode(started, &job, g, images, device),
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
        done: &Done<'_>,
    ) -> Result<(), Box<(QueuedJob, Generation)>> {
        let engine = self.clone();
        let (images, started, device) = (done.images, done.started, done.device.to_string());
        let slot = Arc::new(std::sync::Mutex::new(Some((job, g))));
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("png".into())
            .spawn(move || {
                let taken = theirs.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some((job, g)) = taken {
                    let outcome = engine.encode(started, &job, g, images, &device);
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

/// The model a batch runs on: a worker's own, taken from its slot (put back when the
/// batch ends), or the one of the batch it interrupts.
pub(super) enum Held<'a> {
    /// The model and how long it stays loaded after this batch.
    Slot(&'a mut Option<(Box<dyn Model>, Option<crate::request::KeepAlive>)>),
    /// Borrowed from the suspended batch.
    Nested(&'a mut dyn Model),
}

/// What every job of a finished batch shares.
#[derive(Clone, Copy)]
struct Done<'a> {
    /// Jobs cancelled while it ran (already reported).
    cancelled: &'a HashSet<JobId>,
    /// Images in the batch.
    images: usize,
    /// When it started.
    started: Instant,
    /// The worker's device.
    device: &'a str,
}
