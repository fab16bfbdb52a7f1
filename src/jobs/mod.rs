//! Jobs: the engine between the D-Bus layer and the pipelines. Independent of D-Bus: the
//! daemon submits [`QueuedJob`]s (resolved requests) and receives [`Event`]s.
//!
//! By concern:
//! * [`queue`]: run order (priority, then arrival) and the choice of the next batch;
//! * [`admission`]: queue depth and per-caller limits, and which jobs are active;
//! * `slots`: model slots (unloaded, loading, ready, in use, failed) and idle unloading;
//! * `worker`: the worker thread that takes batches and runs them;
//! * `delivery`: PNG encoding and writing to callers' fds;
//! * [`backend`]: the small trait the worker loads and runs models through, so unit tests
//!   drive the engine with a fake pipeline ([`backend::OrtBackend`] is the real one).
//!
//! Threads: one worker thread per device (`runtime.devices`, [`Backend::workers`]) runs
//! the pipelines (ONNX Runtime calls block), each on its own sessions; the queue hands each
//! idle worker the next batch for a model it has loaded, split fairly when several idle
//! workers could take it. Models load on their own threads, so a load (a TensorRT engine
//! build) never holds up jobs on a model that is already loaded.
//! All shared state sits behind one mutex; every change that another thread waits for
//! (a job queued, a model loaded, a batch finished, shutdown) is signalled on one
//! condition variable. Nothing polls.

pub mod admission;
pub mod backend;
mod delivery;
mod ids;
mod loading;
mod lora_sets;
mod preempt;
pub mod queue;
mod slots;
#[cfg(test)]
mod tests;
mod worker;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::config::JobSettings;
use crate::model::Catalog;
use crate::pipeline::StageTimings;
use crate::request::ResolvedRequest;
pub use admission::Admission;
pub use backend::{Backend, Model, OrtBackend, RunControl};
pub use ids::{next_job_id, unix_micros};
use preempt::Running;
pub use queue::{Queue, QueueError};
pub use slots::ModelState;
use slots::Slots;

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

/// A resolved request waiting to run.
pub struct QueuedJob {
    /// The job's number.
    pub id: JobId,
    /// Unix uid of the caller.
    pub owner: u32,
    /// The caller's unique bus name, to cancel its jobs when it leaves.
    pub sender: Option<String>,
    /// What to generate: model, priority and every parameter, resolved.
    pub request: ResolvedRequest,
    /// Where to write the PNGs instead of returning them.
    pub output_fds: Vec<OwnedFd>,
    /// When it was queued.
    pub queued_at: Instant,
    /// A batch item: runs only when no interactive job can, and is not counted against
    /// the queue depth or its owner's share (its batch was admitted as a whole).
    pub background: bool,
    /// Where the job's one outcome goes instead of an [`Event::Finished`] (batch items).
    pub reply: Option<Reply>,
}

/// A channel for one job's outcome: the batch runner's own, so it never goes through
/// the D-Bus event pump.
pub type Reply = std::sync::mpsc::Sender<(JobId, Outcome)>;

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
    /// The worker's device the batch ran on (`cpu`, `cpu#1`, `cuda:0`, ...).
    pub device: String,
}

/// Why a job or a model load failed; each kind maps to one D-Bus error (`wire::error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The model could not be loaded.
    #[error("{0}")]
    ModelLoad(String),
    /// Generation failed (ONNX Runtime, or an internal error).
    #[error("{0}")]
    Inference(String),
    /// The request proved invalid only when it ran (an init image whose header was fine
    /// but whose data does not decode, a prompt over the chunk limit once tokenized).
    #[error("{0}")]
    InvalidArgument(String),
    /// The images could not be delivered (writing to `output_fds`, encoding).
    #[error("{0}")]
    Output(String),
}

/// How a job ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Images.
    Succeeded(Arc<JobOutput>),
    /// A failure a person can act on.
    Failed(Failure),
    /// Cancelled.
    Cancelled,
}

impl Outcome {
    /// The final state this outcome means.
    pub fn state(&self) -> JobState {
        match self {
            Outcome::Succeeded(_) => JobState::Succeeded,
            Outcome::Failed(_) => JobState::Failed,
            Outcome::Cancelled => JobState::Cancelled,
        }
    }
}

/// What the engine tells the daemon layer.
#[derive(Debug, Clone)]
pub enum Event {
    /// The job left the queue and runs (with the images of its batch).
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
    /// A model load failed.
    #[error("{0}")]
    Failed(Failure),
}

/// The daemon's own uid (the service user): its jobs, as root's, may keep a model loaded
/// longer than `jobs.max_keep_alive_secs`.
fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    static UID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UID.get_or_init(|| std::fs::metadata("/proc/self").map_or(0, |m| m.uid()))
}

struct State {
    queue: Queue,
    slots: Slots,
    admission: Admission,
    /// Each worker's batches, by worker number: the one running last, below it those it
    /// suspended between two of their steps ([`preempt`]).
    running: Vec<Vec<Running>>,
    /// Jobs writing their images to callers' fds, with their cancel flags.
    delivering: HashMap<JobId, Arc<AtomicBool>>,
    shutting_down: bool,
    /// The LoRA sets queued jobs asked for, by model key ([`lora_sets`]).
    lora_sets: lora_sets::LoraSets,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled on every change another thread may wait for.
    wake: Condvar,
    events: UnboundedSender<Event>,
    settings: JobSettings,
    /// Batches are kept under this estimated peak (bytes), when set.
    memory_budget: Option<u64>,
    catalog: Arc<Catalog>,
    backend: Arc<dyn Backend>,
    /// Each worker's device name ([`Backend::workers`]).
    devices: Vec<String>,
    /// Jobs whose outcome goes to a [`Reply`] channel. Its own lock, never held while
    /// waiting for `state`.
    replies: Mutex<HashMap<JobId, Reply>>,
    /// The models loading now ([`Engine::loads`]).
    loads: tokio::sync::watch::Sender<Vec<String>>,
    /// The last job number given out ([`Engine::next_id`]).
    last_id: std::sync::atomic::AtomicU64,
}

/// The worker threads; [`Workers::join`] returns once every one has exited.
pub struct Workers(Vec<JoinHandle<()>>);

impl Workers {
    /// Waits for every worker thread (they exit after [`Engine::shutdown`]).
    pub fn join(self) {
        for handle in self.0 {
            let _ = handle.join();
        }
    }
}

/// The job engine: a handle the daemon layer clones freely.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Starts one worker thread per [`Backend::workers`] entry over the configured models
    /// (`catalog`) and a backend that loads and runs them. The batches running at once
    /// stay under `memory_budget` (bytes) together when it is set.
    pub fn start(
        backend: Arc<dyn Backend>,
        catalog: Arc<Catalog>,
        settings: JobSettings,
        memory_budget: Option<u64>,
        events: UnboundedSender<Event>,
    ) -> std::io::Result<(Engine, Workers)> {
        let mut devices = backend.workers();
        if devices.is_empty() {
            devices.push("default".into());
        }
        let workers = devices.len();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: Queue::default(),
                slots: Slots::new(catalog.names(), workers),
                admission: Admission::default(),
                running: (0..workers).map(|_| Vec::new()).collect(),
                delivering: HashMap::new(),
                shutting_down: false,
                lora_sets: Default::default(),
            }),
            wake: Condvar::new(),
            events,
            settings,
            memory_budget,
            catalog,
            backend,
            devices,
            loads: tokio::sync::watch::Sender::new(Vec::new()),
            replies: Mutex::new(HashMap::new()),
            last_id: std::sync::atomic::AtomicU64::new(0),
        });
        let engine = Engine { shared };
        let mut handles = Vec::with_capacity(workers);
        for (n, device) in engine.shared.devices.iter().enumerate() {
            let worker = engine.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("worker-{device}"))
                .spawn(move || worker.work(n));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // Those already started exit once told to stop.
                    engine.shutdown(Duration::ZERO);
                    Workers(handles).join();
                    return Err(e);
                }
            }
        }
        Ok((engine, Workers(handles)))
    }

    /// The workers' devices, one per worker thread (`cpu`, `cpu#1`, `cuda:0`, ...).
    pub fn devices(&self) -> &[String] {
        &self.shared.devices
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is caught per job; the state stays usable.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes an event; a job's outcome goes to its [`Reply`] channel when it has one.
    fn send(&self, event: Event) {
        crate::metrics::engine_event(&event);
        if let Event::Finished(id, outcome) = &event {
            let reply = self
                .shared
                .replies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            if let Some(reply) = reply {
                let _ = reply.send((*id, outcome.clone()));
                return;
            }
        }
        let _ = self.shared.events.send(event);
    }

    /// A new job number: the clock in microseconds, or one more than the last number
    /// ([`next_job_id`]). Jobs and batches share the numbers.
    pub fn next_id(&self) -> JobId {
        next_job_id(&self.shared.last_id, unix_micros())
    }

    fn notify(&self) {
        self.shared.wake.notify_all();
    }

    /// Queues a job, or says why not.
    pub fn submit(&self, job: QueuedJob) -> Result<(), EngineError> {
        if !self.shared.catalog.contains(&job.request.model) {
            return Err(EngineError::UnknownModel(job.request.model.clone()));
        }
        let s = &self.shared.settings;
        let mut st = self.lock();
        if st.shutting_down {
            return Err(EngineError::ShuttingDown);
        }
        if !job.background {
            let edit_bytes = job.request.edit.as_ref().map_or(0, |e| {
                e.init.bytes().len() + e.mask.as_ref().map_or(0, |m| m.bytes().len())
            });
            let control_bytes: usize = job
                .request
                .controls
                .iter()
                .map(|c| c.image.bytes().len())
                .sum();
            let image_bytes = edit_bytes + control_bytes;
            let bounds = admission::Bounds {
                queue_depth: s.queue_depth,
                per_caller: s.jobs_per_caller,
                image_bytes_per_caller: s.image_bytes_per_caller,
            };
            st.admission
                .admit(job.id, job.owner, job.sender.clone(), image_bytes, bounds)?;
        }
        let mut job = job;
        if job.owner != 0 && job.owner != own_uid() {
            let max = Duration::from_secs(s.max_keep_alive_secs);
            job.request.keep_alive = job.request.keep_alive.map(|k| k.capped(max));
        }
        let images = u32::try_from(job.request.num_images).unwrap_or(u32::MAX);
        crate::metrics::job_queued(job.id, &job.request.model, images, job.queued_at);
        if let Some(reply) = job.reply.take() {
            self.shared
                .replies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(job.id, reply);
        }
        lora_sets::register(&mut st, &job.request);
        st.queue.push(job);
        drop(st);
        self.notify();
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
        self.lock().admission.len()
    }

    /// Whether a model is loaded (ready or in use) on any worker, as its
    /// [`Engine::model_state`] `Loaded` says.
    pub fn is_loaded(&self, model: &str) -> bool {
        self.model_state(model) == ModelState::Loaded
    }

    /// The models loading now, by name; changes as loads start and end (the daemon says
    /// so in sd_notify's `STATUS=`).
    pub fn loads(&self) -> tokio::sync::watch::Receiver<Vec<String>> {
        self.shared.loads.subscribe()
    }

    /// Publishes the models loading now when the set changed.
    fn publish_loads(&self, st: &State) {
        let now = st.slots.loading();
        self.shared.loads.send_if_modified(|seen| {
            let changed = *seen != now;
            if changed {
                *seen = now;
            }
            changed
        });
    }

    /// Where a model stands over the workers: loaded (on any), loading, failed or
    /// unloaded.
    pub fn model_state(&self, model: &str) -> ModelState {
        self.lock().slots.state(model)
    }

    /// Seconds until a loaded model is unloaded (its last job's `keep_alive`, else
    /// `jobs.idle_unload_secs`), -1 for never; `None` when it is not loaded.
    pub fn expires_in(&self, model: &str) -> Option<f64> {
        let idle = self.shared.settings.idle_unload_secs;
        let idle = (idle > 0).then(|| Duration::from_secs(idle));
        self.lock().slots.expires_in(model, idle, Instant::now())
    }

    /// For metrics: jobs queued, jobs in running batches, and for each configured model
    /// the workers that have it loaded.
    pub fn load_figures(&self) -> (usize, usize, Vec<(String, usize)>) {
        let st = self.lock();
        let running = st
            .running
            .iter()
            .flatten()
            .map(|r| r.jobs.len().saturating_sub(r.cancelled.len()))
            .sum();
        let models = self
            .shared
            .catalog
            .names()
            .map(|n| {
                let workers = (0..st.running.len())
                    .filter(|&w| st.slots.is_loaded_on(n, w))
                    .count();
                (n.to_string(), workers)
            })
            .collect();
        (st.queue.len(), running, models)
    }

    /// Cancels a job. A queued job ends at once; a running one within one step (and a
    /// session run in flight is terminated when every job of its batch is cancelled).
    /// Returns false if the job is not active.
    pub fn cancel(&self, id: JobId) -> bool {
        let mut st = self.lock();
        if st.queue.remove(id).is_some() {
            st.admission.retire(id);
            drop(st);
            self.send(Event::Finished(id, Outcome::Cancelled));
            self.notify();
            return true;
        }
        if let Some(flag) = st.delivering.get(&id) {
            // The writer sees the flag within its poll interval and reports the job.
            return !flag.swap(true, std::sync::atomic::Ordering::SeqCst);
        }
        let Some(run) = st
            .running
            .iter_mut()
            .flatten()
            .find(|r| r.jobs.contains(&id))
        else {
            return false;
        };
        if !run.jobs.contains(&id) || !run.cancelled.insert(id) {
            return false;
        }
        if run.cancelled.len() == run.jobs.len() {
            run.control.terminate();
        }
        st.admission.retire(id);
        drop(st);
        self.send(Event::Finished(id, Outcome::Cancelled));
        self.notify();
        true
    }

    /// Cancels every job of a caller that left the bus.
    pub fn cancel_sender(&self, sender: &str) -> usize {
        let ids = self.lock().admission.jobs_of_sender(sender);
        ids.into_iter().filter(|&id| self.cancel(id)).count()
    }

    /// Loads a model now on every worker and keeps it warm; resolves when every worker
    /// has it (or with the first failure).
    pub fn load_model(
        &self,
        name: &str,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), Failure>>, EngineError> {
        if !self.shared.catalog.contains(name) {
            return Err(EngineError::UnknownModel(name.into()));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut st = self.lock();
        if st.slots.is_loaded_everywhere(name) {
            let _ = tx.send(Ok(()));
        } else {
            st.slots.add_waiter(name, tx);
            for worker in 0..st.running.len() {
                if !st.slots.is_loaded_on(name, worker) {
                    self.start_load(&mut st, name, worker);
                }
            }
        }
        Ok(rx)
    }

    /// Unloads a model, and its loaded LoRA sets, on every worker (at once if idle, else
    /// after its current batch).
    pub fn unload_model(&self, name: &str) -> Result<(), EngineError> {
        if !self.shared.catalog.contains(name) {
            return Err(EngineError::UnknownModel(name.into()));
        }
        let mut st = self.lock();
        st.slots.unload(name);
        for key in lora_sets::keys_of(&st, name) {
            st.slots.unload(&key);
        }
        Ok(())
    }

    /// Stops taking jobs, cancels the queued ones, gives running ones `grace` to finish,
    /// then cancels them. Returns once nothing runs; the worker thread then exits.
    pub fn shutdown(&self, grace: Duration) {
        let queued = {
            let mut st = self.lock();
            st.shutting_down = true;
            let drained = st.queue.drain_where(|_| true);
            for j in &drained {
                st.admission.retire(j.id);
            }
            drained
        };
        for j in queued {
            self.send(Event::Finished(j.id, Outcome::Cancelled));
        }
        self.notify();
        let deadline = Instant::now() + grace;
        let live = |st: &mut State| {
            st.running
                .iter()
                .flatten()
                .any(|r| r.cancelled.len() < r.jobs.len())
        };
        let st = self.lock();
        let (mut st, _) = self
            .shared
            .wake
            .wait_timeout_while(st, grace, |st| live(st))
            .unwrap_or_else(|e| e.into_inner());
        if live(&mut st) {
            let running: Vec<JobId> = st
                .running
                .iter()
                .flatten()
                .flat_map(|r| r.jobs.difference(&r.cancelled).copied())
                .collect();
            drop(st);
            for id in running {
                self.cancel(id);
            }
            st = self.lock();
        }
        // Cancelled batches stop within one step; wait for the worker to let go.
        let st = self
            .shared
            .wake
            .wait_while(st, |st| st.running.iter().any(|r| !r.is_empty()))
            .unwrap_or_else(|e| e.into_inner());
        // Images still being written to callers' fds: what is left of the grace period,
        // then cancelled (a writer notices within its poll interval).
        let left = deadline.saturating_duration_since(Instant::now());
        let (st, _) = self
            .shared
            .wake
            .wait_timeout_while(st, left, |st| !st.delivering.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        for flag in st.delivering.values() {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let _unused = self
            .shared
            .wake
            .wait_while(st, |st| !st.delivering.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        self.notify();
    }

    /// A worker's device, as results and logs name it.
    fn device(&self, worker: usize) -> &str {
        self.shared.devices.get(worker).map_or("?", String::as_str)
    }
}
