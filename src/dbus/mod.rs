//! The D-Bus API (docs/dbus-api.md): the Manager and Job interfaces and their typed errors.
//!
//! Interface methods stay thin: they validate, then hand work to the job [`Engine`].
//! Engine events come back through [`pump_events`], which updates Job objects, emits
//! their signals, wakes `Wait()` callers and retires finished jobs.

pub mod request;
pub mod result;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath, OwnedValue, Value};
use zbus::{Connection, interface};

use crate::config::Settings;
use crate::jobs::{Engine, EngineError, Event, JobId, JobOutput, JobState, Outcome, QueuedJob};
use crate::model::ModelBundle;

/// The well-known bus name.
pub const BUS_NAME: &str = "io.github.Diffusiond1";
/// The Manager's object path.
pub const MANAGER_PATH: &str = "/io/github/Diffusiond1";
/// Job object paths are `JOB_PATH_PREFIX<n>`.
pub const JOB_PATH_PREFIX: &str = "/io/github/Diffusiond1/job/";

/// Typed errors on the wire: `io.github.Diffusiond1.Error.<Name>`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "io.github.Diffusiond1.Error")]
pub enum Error {
    /// A zbus failure.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// Unknown key, wrong type or bad value.
    InvalidArgument(String),
    /// The model is not configured.
    UnknownModel(String),
    /// The queue or the caller's share of it is full.
    QueueFull(String),
    /// The job was cancelled.
    Cancelled(String),
    /// The model could not be loaded.
    ModelLoadFailed(String),
    /// ONNX Runtime failed.
    InferenceFailed(String),
    /// The caller does not own the job.
    AccessDenied(String),
    /// The daemon is stopping.
    ShuttingDown(String),
}

impl From<EngineError> for Error {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Queue(q) => Error::QueueFull(q.to_string()),
            EngineError::ShuttingDown => Error::ShuttingDown(e.to_string()),
            EngineError::UnknownModel(_) => Error::UnknownModel(e.to_string()),
            other => Error::ModelLoadFailed(other.to_string()),
        }
    }
}

/// What a Job object shows; shared between the object and the event pump.
struct JobView {
    state: JobState,
    step: u32,
    total: u32,
    error: String,
    request: HashMap<String, OwnedValue>,
    owner: u32,
    outcome: Option<Outcome>,
    model: String,
    seed: u64,
    width: u32,
    height: u32,
    steps: u32,
}

/// One job on the bus.
pub struct Job {
    view: Arc<Mutex<JobView>>,
    done: watch::Receiver<bool>,
    engine: Engine,
    id: JobId,
}

impl Job {
    fn view(&self) -> std::sync::MutexGuard<'_, JobView> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Only the owner or root may act on a job.
async fn check_owner(conn: &Connection, header: &Header<'_>, owner: u32) -> Result<(), Error> {
    let uid = caller_uid(conn, header).await?;
    if uid == owner || uid == 0 {
        Ok(())
    } else {
        Err(Error::AccessDenied(format!(
            "this job belongs to uid {owner}"
        )))
    }
}

/// Loading and unloading models affects every caller: only root or the daemon's own
/// user (on a session bus, the user) may do it.
async fn check_admin(conn: &Connection, header: &Header<'_>) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let uid = caller_uid(conn, header).await?;
    let own = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if uid == 0 || Some(uid) == own {
        Ok(())
    } else {
        Err(Error::AccessDenied(
            "only root or the service user may load or unload models".into(),
        ))
    }
}

/// The caller's Unix uid, from the bus (never from the message body).
async fn caller_uid(conn: &Connection, header: &Header<'_>) -> Result<u32, Error> {
    let sender = header
        .sender()
        .ok_or_else(|| Error::AccessDenied("the message has no sender".into()))?;
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    dbus.get_connection_unix_user(sender.clone().into())
        .await
        .map_err(|e| Error::ZBus(e.into()))
}

#[interface(name = "io.github.Diffusiond1.Job")]
impl Job {
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    #[zbus(property)]
    fn state(&self) -> String {
        self.view().state.as_str().to_string()
    }

    /// Denoising steps done.
    #[zbus(property)]
    fn step(&self) -> u32 {
        self.view().step
    }

    /// Denoising steps in all.
    #[zbus(property)]
    fn total_steps(&self) -> u32 {
        self.view().total
    }

    /// The failure message; empty unless the job failed.
    #[zbus(property)]
    fn error(&self) -> String {
        self.view().error.clone()
    }

    /// The validated request with defaults filled in; only its owner or root may read it
    /// (it holds the prompt).
    #[zbus(property(emits_changed_signal = "const"))]
    async fn request(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<HashMap<String, OwnedValue>> {
        let owner = self.view().owner;
        if let Some(header) = &header {
            check_owner(conn, header, owner)
                .await
                .map_err(|e| match e {
                    Error::AccessDenied(m) => zbus::fdo::Error::AccessDenied(m),
                    other => zbus::fdo::Error::Failed(other.to_string()),
                })?;
        }
        Ok(self
            .view()
            .request
            .iter()
            .filter_map(|(k, v)| v.try_clone().ok().map(|v| (k.clone(), v)))
            .collect())
    }

    /// The Unix uid of the caller that created the job.
    #[zbus(property)]
    fn owner(&self) -> u32 {
        self.view().owner
    }

    /// Replies when the job ends, with its result (or its error).
    #[zbus(out_args("result"))]
    async fn wait(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<result::WaitResult, Error> {
        let owner = self.view().owner;
        check_owner(conn, &header, owner).await?;
        let mut done = self.done.clone();
        // The sender is kept alive by the pump until the job is retired.
        let _ = done.wait_for(|d| *d).await;
        let view = self.view();
        match view.outcome.clone() {
            Some(Outcome::Succeeded(out)) => Ok(wait_result(&view, &out)),
            Some(Outcome::Cancelled) | None => {
                Err(Error::Cancelled("the job was cancelled".into()))
            }
            Some(Outcome::Failed {
                message,
                model_load: true,
            }) => Err(Error::ModelLoadFailed(message)),
            Some(Outcome::Failed { message, .. }) => Err(Error::InferenceFailed(message)),
        }
    }

    /// Stops the job within one denoising step (a queued job at once).
    async fn cancel(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        let owner = self.view().owner;
        check_owner(conn, &header, owner).await?;
        self.engine.cancel(self.id);
        Ok(())
    }

    /// After each denoising step.
    #[zbus(signal)]
    async fn progress(emitter: &SignalEmitter<'_>, step: u32, total: u32) -> zbus::Result<()>;

    /// Once, when the job ends.
    #[zbus(signal)]
    async fn finished(emitter: &SignalEmitter<'_>, state: &str) -> zbus::Result<()>;
}

/// The `Wait()` reply.
fn wait_result(view: &JobView, out: &Arc<JobOutput>) -> result::WaitResult {
    result::WaitResult {
        state: view.state.as_str().to_string(),
        images: result::Pngs(out.clone()),
        seed: view.seed,
        scheduler: out.scheduler.clone(),
        model: view.model.clone(),
        width: view.width,
        height: view.height,
        steps: view.steps,
        batch_size: out.batch_images as u32,
        timings: result::timings(out),
    }
}

/// A job's handles, kept by the registry until the job is retired.
struct Entry {
    view: Arc<Mutex<JobView>>,
    done: watch::Sender<bool>,
}

/// Jobs that exist on the bus.
#[derive(Default, Clone)]
pub struct Registry {
    entries: Arc<Mutex<HashMap<JobId, Entry>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Path of job `id`.
pub fn job_path(id: JobId) -> OwnedObjectPath {
    ObjectPath::try_from(format!("{JOB_PATH_PREFIX}{id}"))
        .map(OwnedObjectPath::from)
        .unwrap_or_else(|_| {
            OwnedObjectPath::from(ObjectPath::from_static_str_unchecked(MANAGER_PATH))
        })
}

/// The Manager object.
pub struct Manager {
    engine: Engine,
    settings: Arc<Settings>,
    registry: Registry,
    next_id: AtomicU64,
    runtime_version: String,
    providers: Vec<String>,
}

impl Manager {
    /// A Manager over an engine.
    pub fn new(
        engine: Engine,
        settings: Arc<Settings>,
        registry: Registry,
        runtime_version: String,
        providers: Vec<String>,
    ) -> Self {
        Manager {
            engine,
            settings,
            registry,
            next_id: AtomicU64::new(1),
            runtime_version,
            providers,
        }
    }

    fn resolve_model(&self, requested: Option<String>) -> Result<(String, ModelBundle), Error> {
        let name = match requested {
            Some(n) => n,
            None => self
                .settings
                .default_model_name()
                .ok_or_else(|| {
                    Error::UnknownModel("no model named and no default_model configured".into())
                })?
                .to_string(),
        };
        let entry = self.settings.models.get(&name).ok_or_else(|| {
            Error::UnknownModel(format!(
                "unknown model '{name}' (configured: {})",
                self.model_names().join(", ")
            ))
        })?;
        let bundle =
            ModelBundle::open(&entry.path).map_err(|e| Error::ModelLoadFailed(e.to_string()))?;
        Ok((name, bundle))
    }

    fn model_names(&self) -> Vec<String> {
        self.settings.models.keys().cloned().collect()
    }
}

#[interface(name = "io.github.Diffusiond1.Manager")]
impl Manager {
    /// Validates the request, queues a job, returns its object path at once.
    #[zbus(out_args("job"))]
    async fn generate(
        &self,
        request: HashMap<String, OwnedValue>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &zbus::ObjectServer,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<OwnedObjectPath, Error> {
        let mut req =
            request::parse(&request, &self.settings.limits).map_err(Error::InvalidArgument)?;
        let (model, bundle) = self.resolve_model(req.model.take())?;
        let p = &mut req.params;
        if p.width == 0 {
            p.width = bundle.default_size;
        }
        if p.height == 0 {
            p.height = bundle.default_size;
        }
        if p.scheduler.is_none() {
            p.scheduler = bundle.default_scheduler.map(str::to_string);
        }
        if !req.seed_given {
            p.seed = crate::local::random_seed();
        }
        p.validate_shape(bundle.vae_scale_factor)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        // The scheduler refuses step counts it cannot run: say so now, not mid-run.
        let name = p.scheduler.as_deref().ok_or_else(|| {
            Error::InvalidArgument(
                "'scheduler': the model's own scheduler is not one diffusiond knows; name one"
                    .into(),
            )
        })?;
        crate::scheduler::create(name, &bundle.scheduler_config, p.steps)
            .map_err(|e| Error::InvalidArgument(format!("'steps': {e}")))?;
        p.check_limits(&self.settings.limits)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let owner = caller_uid(conn, &header).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let path = job_path(id);
        let (done_tx, done_rx) = watch::channel(false);
        let view = Arc::new(Mutex::new(JobView {
            state: JobState::Queued,
            step: 0,
            total: p.steps as u32,
            error: String::new(),
            request: request::to_dict(&model, req.priority, p),
            owner,
            outcome: None,
            model: model.clone(),
            seed: p.seed,
            width: p.width as u32,
            height: p.height as u32,
            steps: p.steps as u32,
        }));
        let job = Job {
            view: view.clone(),
            done: done_rx,
            engine: self.engine.clone(),
            id,
        };
        server.at(&path, job).await?;
        self.registry.lock().insert(
            id,
            Entry {
                view,
                done: done_tx,
            },
        );
        let queued = QueuedJob {
            id,
            priority: req.priority,
            model,
            owner,
            sender: header
                .sender()
                .filter(|_| req.cancel_on_disconnect)
                .map(|s| s.to_string()),
            params: req.params,
            output_fds: req.output_fds,
            queued_at: std::time::Instant::now(),
        };
        if let Err(e) = self.engine.submit(queued) {
            self.registry.lock().remove(&id);
            server.remove::<Job, _>(&path).await?;
            return Err(e.into());
        }
        Self::job_added(&emitter, path.as_ref()).await?;
        self.queue_length_changed(&emitter).await?;
        Ok(path)
    }

    /// One dict per configured model.
    #[zbus(out_args("models"))]
    fn list_models(&self) -> Vec<HashMap<String, OwnedValue>> {
        let default = self.settings.default_model_name().map(str::to_string);
        self.settings
            .models
            .iter()
            .map(|(name, entry)| {
                let bundle = ModelBundle::open(&entry.path).ok();
                let mut d = HashMap::new();
                let mut put = |k: &str, v: Value<'_>| {
                    if let Ok(o) = v.try_to_owned() {
                        d.insert(k.to_string(), o);
                    }
                };
                put("name", Value::from(name.as_str()));
                put("path", Value::from(entry.path.display().to_string()));
                put("loaded", Value::Bool(self.engine.is_loaded(name)));
                put("default", Value::Bool(default.as_deref() == Some(name)));
                let kind = match bundle.as_ref().map(|b| b.kind) {
                    Some(crate::model::PipelineKind::StableDiffusionXl) => "sdxl",
                    Some(_) => "sd",
                    None => "unreadable",
                };
                put("kind", Value::from(kind));
                let sched = bundle.and_then(|b| b.default_scheduler).unwrap_or("");
                put("scheduler", Value::from(sched));
                d
            })
            .collect()
    }

    /// Loads a model now and keeps it warm.
    async fn load_model(
        &self,
        name: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        check_admin(conn, &header).await?;
        let rx = self.engine.load_model(&name)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(Error::ModelLoadFailed(format!("model '{name}': {message}"))),
            Err(_) => Err(Error::ShuttingDown("diffusiond is shutting down".into())),
        }
    }

    /// Frees a loaded model; it reloads on next use.
    async fn unload_model(
        &self,
        name: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        check_admin(conn, &header).await?;
        Ok(self.engine.unload_model(&name)?)
    }

    /// The jobs that exist now.
    #[zbus(out_args("jobs"))]
    fn list_jobs(&self) -> Vec<OwnedObjectPath> {
        let mut ids: Vec<JobId> = self.registry.lock().keys().copied().collect();
        ids.sort_unstable();
        ids.into_iter().map(job_path).collect()
    }

    /// diffusiond's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        crate::VERSION.to_string()
    }

    /// ONNX Runtime's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn runtime_version(&self) -> String {
        self.runtime_version.clone()
    }

    /// Execution providers in use, in order.
    #[zbus(property(emits_changed_signal = "const"))]
    fn execution_providers(&self) -> Vec<String> {
        self.providers.clone()
    }

    /// Jobs queued or running.
    #[zbus(property)]
    fn queue_length(&self) -> u32 {
        self.engine.queue_length() as u32
    }

    /// Configured model names.
    #[zbus(property(emits_changed_signal = "const"))]
    fn models(&self) -> Vec<String> {
        self.model_names()
    }

    /// A job was created.
    #[zbus(signal)]
    async fn job_added(emitter: &SignalEmitter<'_>, job: ObjectPath<'_>) -> zbus::Result<()>;

    /// A finished job was removed from the bus.
    #[zbus(signal)]
    async fn job_removed(
        emitter: &SignalEmitter<'_>,
        job: ObjectPath<'_>,
        final_state: &str,
    ) -> zbus::Result<()>;
}

/// Applies engine events to Job objects until the channel closes.
pub async fn pump_events(
    conn: Connection,
    registry: Registry,
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    retention: Duration,
) {
    while let Some(event) = events.recv().await {
        if let Err(e) = apply_event(&conn, &registry, event, retention).await {
            tracing::warn!(error = %e, "could not publish a job event");
        }
    }
}

async fn apply_event(
    conn: &Connection,
    registry: &Registry,
    event: Event,
    retention: Duration,
) -> zbus::Result<()> {
    let id = match &event {
        Event::Started(id, _) | Event::Progress(id, _, _) | Event::Finished(id, _) => *id,
        Event::Barrier(reply) => {
            let _ = reply.send(());
            return Ok(());
        }
    };
    let Some(view) = registry.lock().get(&id).map(|e| e.view.clone()) else {
        return Ok(());
    };
    let path = job_path(id);
    let iface = conn.object_server().interface::<_, Job>(&path).await?;
    let emitter = iface.signal_emitter();
    let job = iface.get().await;
    // TotalSteps is announced only when it changes, not with every step.
    let mut total_changed = false;
    {
        let mut v = view.lock().unwrap_or_else(|e| e.into_inner());
        if v.state.is_final() {
            return Ok(()); // Late progress from a batch this job already left.
        }
        match &event {
            Event::Started(..) => v.state = JobState::Running,
            Event::Progress(_, step, total) => {
                v.step = *step;
                total_changed = v.total != *total;
                v.total = *total;
            }
            Event::Barrier(_) => {}
            Event::Finished(_, outcome) => {
                v.state = outcome.state();
                if let Outcome::Failed { message, .. } = outcome {
                    v.error = message.clone();
                }
                v.outcome = Some(outcome.clone());
            }
        }
    }
    match event {
        Event::Barrier(_) => {}
        Event::Started(..) => job.state_changed(emitter).await?,
        Event::Progress(_, step, total) => {
            job.step_changed(emitter).await?;
            if total_changed {
                job.total_steps_changed(emitter).await?;
            }
            Job::progress(emitter, step, total).await?;
        }
        Event::Finished(_, outcome) => {
            job.state_changed(emitter).await?;
            job.error_changed(emitter).await?;
            Job::finished(emitter, outcome.state().as_str()).await?;
            if let Some(e) = registry.lock().get(&id) {
                let _ = e.done.send(true);
            }
            publish_queue_length(conn).await?;
            schedule_retirement(
                conn.clone(),
                registry.clone(),
                id,
                outcome.state(),
                retention,
            );
        }
    }
    Ok(())
}

async fn publish_queue_length(conn: &Connection) -> zbus::Result<()> {
    let manager = conn
        .object_server()
        .interface::<_, Manager>(MANAGER_PATH)
        .await?;
    manager
        .get()
        .await
        .queue_length_changed(manager.signal_emitter())
        .await
}

/// Removes a finished job from the bus after the retention time.
fn schedule_retirement(
    conn: Connection,
    registry: Registry,
    id: JobId,
    state: JobState,
    retention: Duration,
) {
    tokio::spawn(async move {
        tokio::time::sleep(retention).await;
        retire(&conn, &registry, id, state).await;
    });
}

async fn retire(conn: &Connection, registry: &Registry, id: JobId, state: JobState) {
    registry.lock().remove(&id);
    let path = job_path(id);
    let _ = conn.object_server().remove::<Job, _>(&path).await;
    if let Ok(manager) = conn
        .object_server()
        .interface::<_, Manager>(MANAGER_PATH)
        .await
    {
        let _ = Manager::job_removed(manager.signal_emitter(), path.as_ref(), state.as_str()).await;
    }
}

/// Cancels the jobs of callers that leave the bus.
pub async fn watch_disconnects(conn: Connection, engine: Engine) -> zbus::Result<()> {
    use futures_lite::StreamExt;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
    let mut changes = dbus.receive_name_owner_changed().await?;
    while let Some(signal) = changes.next().await {
        let Ok(args) = signal.args() else { continue };
        let name = args.name().to_string();
        if name.starts_with(':') && args.new_owner().is_none() {
            let n = engine.cancel_sender(&name);
            if n > 0 {
                tracing::info!(caller = %name, jobs = n, "caller left the bus; its jobs were cancelled");
            }
        }
    }
    Ok(())
}
