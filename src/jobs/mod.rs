//! Jobs: the queue in front of one worker, model loading and unloading, batching,
//! cancellation and shutdown. Independent of D-Bus: the daemon layer submits
//! [`QueuedJob`]s and receives [`Event`]s.
//!
//! Threads: one worker thread runs the pipelines (ONNX Runtime calls block); models load
//! on their own threads, so a load never holds up jobs on a model that is already loaded.
//! All shared state sits behind one mutex with a condition variable.

pub mod queue;

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ort::session::RunOptions;
use tokio::sync::mpsc::UnboundedSender;

use crate::config::JobSettings;
use crate::pipeline::{GenerateParams, Generation, Pipeline, PipelineError, StageTimings, image};
use crate::runtime::Runtime;
pub use queue::{Queue, QueueError};

/// A job's number; its D-Bus path ends with it.
pub type JobId = u64;

/// A job's state, as the D-Bus `State` property spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Waiting in the queue.
    Queued,
    /// In the denoise loop.
    Running,
    /// Finished with images.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Cancelled by its owner, its caller leaving, or shutdown.
    Cancelled,
}

impl JobState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// A validated request waiting to run.
pub struct QueuedJob {
    /// The job's number.
    pub id: JobId,
    /// Higher runs first.
    pub priority: i32,
    /// Configured model name.
    pub model: String,
    /// Unix uid of the caller.
    pub owner: u32,
    /// The caller's unique bus name, to cancel its jobs when it leaves.
    pub sender: Option<String>,
    /// What to generate (scheduler resolved, size filled in).
    pub params: GenerateParams,
    /// Where to write the PNGs instead of returning them.
    pub output_fds: Vec<OwnedFd>,
    /// When it was queued.
    pub queued_at: Instant,
}

/// What a successful job produced.
#[derive(Debug, Clone)]
pub struct JobOutput {
    /// PNG files (empty when they went to `output_fds`).
    pub pngs: Vec<Vec<u8>>,
    /// The scheduler used.
    pub scheduler: String,
    /// Stage timings of the batch the job ran in.
    pub timings: StageTimings,
    /// Seconds spent queued.
    pub queued_secs: f64,
    /// Seconds spent encoding PNGs.
    pub png_secs: f64,
    /// Seconds from start of the batch to the end of this job.
    pub total_secs: f64,
    /// Images in the UNet batch.
    pub batch_images: usize,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Images.
    Succeeded(Arc<JobOutput>),
    /// An error a person can act on; `model_load` tells a load failure from an inference one.
    Failed {
        /// The message.
        message: String,
        /// Whether the model failed to load (else inference failed).
        model_load: bool,
    },
    /// Cancelled.
    Cancelled,
}

impl Outcome {
    /// The final state this outcome means.
    pub fn state(&self) -> JobState {
        match self {
            Outcome::Succeeded(_) => JobState::Succeeded,
            Outcome::Failed { .. } => JobState::Failed,
            Outcome::Cancelled => JobState::Cancelled,
        }
    }
}

/// What the engine tells the daemon layer.
#[derive(Debug, Clone)]
pub enum Event {
    /// The job left the queue and runs.
    Started(JobId, u32),
    /// A denoising step finished.
    Progress(JobId, u32, u32),
    /// The job ended; sent exactly once per job.
    Finished(JobId, Outcome),
    /// Answered once every earlier event has been published (used at shutdown).
    Barrier(tokio::sync::mpsc::UnboundedSender<()>),
}

/// Why a job was refused or a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// Queue limits.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The daemon is stopping.
    #[error("diffusiond is shutting down and takes no new jobs")]
    ShuttingDown,
    /// No such model in the config.
    #[error("unknown model '{0}'")]
    UnknownModel(String),
    /// The model could not be loaded.
    #[error("model '{name}' failed to load: {message}")]
    ModelLoad {
        /// Model name.
        name: String,
        /// Why.
        message: String,
    },
}

enum Slot {
    Unloaded,
    Loading,
    Ready {
        pipeline: Box<Pipeline>,
        last_used: Instant,
    },
    InUse,
    Failed(String),
}

struct Running {
    run_options: Arc<RunOptions>,
    jobs: HashSet<JobId>,
    cancelled: HashSet<JobId>,
}

struct State {
    queue: Queue,
    slots: HashMap<String, Slot>,
    /// Owner uid of every queued or running job.
    active: HashMap<JobId, u32>,
    senders: HashMap<JobId, String>,
    running: Option<Running>,
    shutting_down: bool,
    load_waiters: HashMap<String, Vec<tokio::sync::oneshot::Sender<Result<(), String>>>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    events: UnboundedSender<Event>,
    settings: JobSettings,
    models: HashMap<String, PathBuf>,
    runtime: Arc<Runtime>,
}

/// The job engine: a handle the daemon layer clones freely.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Starts the worker thread. `models` maps configured names to folders.
    pub fn start(
        runtime: Arc<Runtime>,
        models: HashMap<String, PathBuf>,
        settings: JobSettings,
        events: UnboundedSender<Event>,
    ) -> (Engine, JoinHandle<()>) {
        let slots = models.keys().map(|k| (k.clone(), Slot::Unloaded)).collect();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: Queue::default(),
                slots,
                active: HashMap::new(),
                senders: HashMap::new(),
                running: None,
                shutting_down: false,
                load_waiters: HashMap::new(),
            }),
            wake: Condvar::new(),
            events,
            settings,
            models,
            runtime,
        });
        let engine = Engine { shared };
        let worker = engine.clone();
        let handle = std::thread::Builder::new()
            .name("diffusiond-worker".into())
            .spawn(move || worker.work())
            .unwrap_or_else(|e| panic!("cannot start the worker thread: {e}"));
        (engine, handle)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is caught per job; the state stays usable.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, event: Event) {
        let _ = self.shared.events.send(event);
    }

    /// Queues a job, or says why not.
    pub fn submit(&self, job: QueuedJob) -> Result<(), EngineError> {
        if !self.shared.models.contains_key(&job.model) {
            return Err(EngineError::UnknownModel(job.model));
        }
        let s = &self.shared.settings;
        let mut st = self.lock();
        if st.shutting_down {
            return Err(EngineError::ShuttingDown);
        }
        if st.active.len() >= s.queue_depth {
            return Err(QueueError::Full(s.queue_depth).into());
        }
        let mine = st.active.values().filter(|&&o| o == job.owner).count();
        if mine >= s.jobs_per_caller {
            return Err(QueueError::CallerFull(mine).into());
        }
        st.active.insert(job.id, job.owner);
        if let Some(sender) = &job.sender {
            st.senders.insert(job.id, sender.clone());
        }
        st.queue.push(job);
        drop(st);
        self.shared.wake.notify_all();
        Ok(())
    }

    /// Resolves once every event sent before it has been handled.
    pub async fn flush_events(&self) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        self.send(Event::Barrier(tx));
        let _ = rx.recv().await;
    }

    /// Jobs queued or running.
    pub fn queue_length(&self) -> usize {
        self.lock().active.len()
    }

    /// Whether a model is loaded (ready or in use).
    pub fn is_loaded(&self, model: &str) -> bool {
        matches!(
            self.lock().slots.get(model),
            Some(Slot::Ready { .. } | Slot::InUse)
        )
    }

    /// Cancels a job. A queued job ends at once; a running one within one step (and a
    /// session run in flight is terminated when every job of its batch is cancelled).
    /// Returns false if the job is not active.
    pub fn cancel(&self, id: JobId) -> bool {
        let mut st = self.lock();
        if let Some(job) = st.queue.remove(id) {
            Self::retire(&mut st, job.id);
            drop(st);
            self.send(Event::Finished(id, Outcome::Cancelled));
            return true;
        }
        let Some(run) = st.running.as_mut() else {
            return false;
        };
        if !run.jobs.contains(&id) || !run.cancelled.insert(id) {
            return false;
        }
        if run.cancelled.len() == run.jobs.len() {
            let _ = run.run_options.terminate();
        }
        Self::retire(&mut st, id);
        drop(st);
        self.send(Event::Finished(id, Outcome::Cancelled));
        true
    }

    /// Cancels every job of a caller that left the bus.
    pub fn cancel_sender(&self, sender: &str) -> usize {
        let ids: Vec<JobId> = {
            let st = self.lock();
            st.senders
                .iter()
                .filter(|(_, s)| *s == sender)
                .map(|(id, _)| *id)
                .collect()
        };
        ids.into_iter().filter(|&id| self.cancel(id)).count()
    }

    fn retire(st: &mut State, id: JobId) {
        st.active.remove(&id);
        st.senders.remove(&id);
    }

    /// Loads a model now and keeps it warm; resolves when it is ready.
    pub fn load_model(
        &self,
        name: &str,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, EngineError> {
        if !self.shared.models.contains_key(name) {
            return Err(EngineError::UnknownModel(name.into()));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut st = self.lock();
        match st.slots.get(name) {
            Some(Slot::Ready { .. } | Slot::InUse) => {
                let _ = tx.send(Ok(()));
            }
            _ => {
                st.load_waiters.entry(name.into()).or_default().push(tx);
                self.start_load(&mut st, name);
            }
        }
        Ok(rx)
    }

    /// Unloads a model (at once if idle, else after its current batch).
    pub fn unload_model(&self, name: &str) -> Result<(), EngineError> {
        if !self.shared.models.contains_key(name) {
            return Err(EngineError::UnknownModel(name.into()));
        }
        let mut st = self.lock();
        if let Some(slot @ (Slot::Ready { .. } | Slot::Failed(_))) = st.slots.get_mut(name) {
            *slot = Slot::Unloaded;
        }
        Ok(())
    }

    /// Stops taking jobs, cancels the queued ones, gives running ones `grace` to finish,
    /// then cancels them. The worker thread exits when nothing runs.
    pub fn shutdown(&self, grace: Duration) {
        let queued = {
            let mut st = self.lock();
            st.shutting_down = true;
            let drained = st.queue.drain_where(|_| true);
            for j in &drained {
                Self::retire(&mut st, j.id);
            }
            drained
        };
        for j in queued {
            self.send(Event::Finished(j.id, Outcome::Cancelled));
        }
        self.shared.wake.notify_all();
        let deadline = Instant::now() + grace;
        loop {
            let running: Vec<JobId> = {
                let st = self.lock();
                st.running
                    .as_ref()
                    .map(|r| r.jobs.difference(&r.cancelled).copied().collect())
                    .unwrap_or_default()
            };
            if running.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for id in running {
                    self.cancel(id);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.shared.wake.notify_all();
    }

    /// Marks a model loading and loads it on its own thread.
    fn start_load(&self, st: &mut State, name: &str) {
        if !matches!(
            st.slots.get(name),
            Some(Slot::Unloaded | Slot::Failed(_)) | None
        ) {
            return;
        }
        st.slots.insert(name.into(), Slot::Loading);
        let engine = self.clone();
        let name = name.to_string();
        let dir = self.shared.models.get(&name).cloned().unwrap_or_default();
        let spawned = std::thread::Builder::new()
            .name(format!("load-{name}"))
            .spawn(move || engine.finish_load(&name, Pipeline::load(&engine.shared.runtime, &dir)));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a model-loading thread");
        }
    }

    fn finish_load(&self, name: &str, result: Result<Pipeline, PipelineError>) {
        let mut st = self.lock();
        let reply = match result {
            Ok(p) => {
                tracing::info!(model = name, "model loaded");
                st.slots.insert(
                    name.into(),
                    Slot::Ready {
                        pipeline: Box::new(p),
                        last_used: Instant::now(),
                    },
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!(model = name, error = %e, "model failed to load");
                st.slots.insert(name.into(), Slot::Failed(e.to_string()));
                Err(e.to_string())
            }
        };
        for tx in st.load_waiters.remove(name).unwrap_or_default() {
            let _ = tx.send(reply.clone());
        }
        drop(st);
        self.shared.wake.notify_all();
    }

    /// The worker loop: pick a batch, run it, repeat; exit once shutting down and idle.
    fn work(self) {
        loop {
            let Some((batch, pipeline)) = self.next_batch() else {
                return;
            };
            self.run_batch(batch, pipeline);
        }
    }

    /// Waits for a runnable batch; starts loads for queued jobs whose model is cold, and
    /// fails jobs whose model cannot load.
    fn next_batch(&self) -> Option<(Vec<QueuedJob>, Box<Pipeline>)> {
        let mut st = self.lock();
        loop {
            self.fail_unloadable(&mut st);
            let cold: Vec<String> = st
                .queue
                .iter()
                .filter(|j| matches!(st.slots.get(&j.model), Some(Slot::Unloaded)))
                .map(|j| j.model.clone())
                .collect();
            for m in cold {
                self.start_load(&mut st, &m);
            }
            let state = &mut *st;
            let slots = &state.slots;
            let batch = state.queue.take_batch(
                |m| matches!(slots.get(m), Some(Slot::Ready { .. })),
                self.shared.settings.max_batch_images,
            );
            if let Some(first) = batch.first() {
                let model = first.model.clone();
                match (
                    st.slots.insert(model.clone(), Slot::InUse),
                    RunOptions::new(),
                ) {
                    (Some(Slot::Ready { pipeline, .. }), Ok(run_options)) => {
                        st.running = Some(Running {
                            run_options: Arc::new(run_options),
                            jobs: batch.iter().map(|j| j.id).collect(),
                            cancelled: HashSet::new(),
                        });
                        return Some((batch, pipeline));
                    }
                    (slot, result) => {
                        // Only out of memory makes RunOptions fail: fail these jobs, keep serving.
                        if let Some(slot) = slot {
                            st.slots.insert(model, slot);
                        }
                        let message = result
                            .err()
                            .map_or_else(|| "model not ready".into(), |e| e.to_string());
                        for j in batch {
                            Self::retire(&mut st, j.id);
                            self.send(Event::Finished(
                                j.id,
                                Outcome::Failed {
                                    message: message.clone(),
                                    model_load: false,
                                },
                            ));
                        }
                    }
                }
            }
            if st.shutting_down && st.queue.is_empty() {
                return None;
            }
            self.unload_idle(&mut st);
            st = self
                .shared
                .wake
                .wait_timeout(st, Duration::from_millis(500))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Jobs whose model failed to load end with that error.
    fn fail_unloadable(&self, st: &mut State) {
        let failed: HashMap<String, String> = st
            .slots
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Failed(m) => Some((k.clone(), m.clone())),
                _ => None,
            })
            .collect();
        if failed.is_empty() {
            return;
        }
        let dropped = st.queue.drain_where(|j| failed.contains_key(&j.model));
        for j in dropped {
            Self::retire(st, j.id);
            let message = format!("model '{}' failed to load: {}", j.model, failed[&j.model]);
            self.send(Event::Finished(
                j.id,
                Outcome::Failed {
                    message,
                    model_load: true,
                },
            ));
        }
        // A later request may retry the load.
        for name in failed.keys() {
            st.slots.insert(name.clone(), Slot::Unloaded);
        }
    }

    fn unload_idle(&self, st: &mut State) {
        let idle = self.shared.settings.idle_unload_secs;
        if idle == 0 {
            return;
        }
        for (name, slot) in st.slots.iter_mut() {
            if let Slot::Ready { last_used, .. } = slot
                && last_used.elapsed() >= Duration::from_secs(idle)
            {
                tracing::info!(model = %name, "unloading idle model");
                *slot = Slot::Unloaded;
            }
        }
    }

    /// Runs one batch on the worker thread; every job gets exactly one Finished event.
    fn run_batch(&self, batch: Vec<QueuedJob>, mut pipeline: Box<Pipeline>) {
        let started = Instant::now();
        let model = batch[0].model.clone();
        let run_options = self.lock().running.as_ref().map(|r| r.run_options.clone());
        let images: usize = batch.iter().map(|j| j.params.num_images).sum();
        let _batch =
            tracing::info_span!("batch", model = %model, jobs = batch.len(), images).entered();
        for j in &batch {
            self.send(Event::Started(j.id, images as u32));
        }
        let params: Vec<&GenerateParams> = batch.iter().map(|j| &j.params).collect();
        let ids: Vec<JobId> = batch.iter().map(|j| j.id).collect();
        let result = match &run_options {
            Some(ro) => {
                let mut progress = |step: usize, total: usize| self.progress(&ids, step, total);
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    pipeline.generate_batch(&params, ro, &mut progress)
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
                message: "could not create run options".into(),
            }),
        };
        let cancelled = {
            let mut st = self.lock();
            st.slots.insert(
                model,
                Slot::Ready {
                    pipeline,
                    last_used: Instant::now(),
                },
            );
            st.running.take().map(|r| r.cancelled).unwrap_or_default()
        };
        self.shared.wake.notify_all();
        self.finish_batch(batch, result, &cancelled, images, started);
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
        let mut generations = match result {
            Ok(g) => g.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => batch.iter().map(|_| Err(e.to_string())).collect(),
        };
        for (job, generation) in batch.into_iter().zip(generations.drain(..)) {
            if cancelled.contains(&job.id) {
                continue; // Already reported as cancelled.
            }
            let outcome = match generation {
                Ok(g) => self.deliver(job.queued_at, started, &job, g, images),
                Err(message) => Outcome::Failed {
                    message,
                    model_load: false,
                },
            };
            Self::retire(&mut self.lock(), job.id);
            match outcome {
                Outcome::Succeeded(out) if !job.output_fds.is_empty() => {
                    self.write_to_fds(job, out)
                }
                other => self.send(Event::Finished(job.id, other)),
            }
        }
    }

    /// Encodes the PNGs.
    fn deliver(
        &self,
        queued_at: Instant,
        started: Instant,
        job: &QueuedJob,
        g: Generation,
        batch_images: usize,
    ) -> Outcome {
        let _png = tracing::debug_span!("png", job = job.id).entered();
        let t0 = Instant::now();
        let ort_version = self.shared.runtime.version();
        let text = job
            .params
            .png_parameters(g.scheduler, &job.model, ort_version);
        let mut pngs = Vec::with_capacity(g.images.len());
        for img in &g.images {
            match image::encode_png(&img.rgb, &text) {
                Ok(bytes) => pngs.push(bytes),
                Err(e) => {
                    return Outcome::Failed {
                        message: e.to_string(),
                        model_load: false,
                    };
                }
            }
        }
        Outcome::Succeeded(Arc::new(JobOutput {
            pngs,
            scheduler: g.scheduler.to_string(),
            timings: g.timings,
            queued_secs: started.saturating_duration_since(queued_at).as_secs_f64(),
            png_secs: t0.elapsed().as_secs_f64(),
            total_secs: started.elapsed().as_secs_f64(),
            batch_images,
        }))
    }
}

impl Engine {
    /// Writes the PNGs to the caller's fds on a thread of their own (a pipe the caller
    /// has not started reading must not stall the worker), then reports the job.
    fn write_to_fds(&self, job: QueuedJob, out: Arc<JobOutput>) {
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
                    Err(e) => Outcome::Failed {
                        message: format!("writing to output_fds: {e}"),
                        model_load: false,
                    },
                };
                engine.send(Event::Finished(job.id, outcome));
            });
        if let Err(e) = spawned {
            let message = format!("cannot start a thread to write output fds: {e}");
            self.send(Event::Finished(
                id,
                Outcome::Failed {
                    message,
                    model_load: false,
                },
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
