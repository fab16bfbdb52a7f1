//! The D-Bus client side of diffusiond: proxies for the `Manager` and `Job` interfaces
//! (docs/dbus-api.md), and the client logic `diffusionctl` runs on top of them.
//!
//! Every function returns a [`ClientError`] whose `Display` is one readable line; daemon
//! errors named `io.github.Diffusiond1.Error.X` read as `X: message`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use zbus::export::futures_core::Stream;
use zbus::zvariant::{DeserializeDict, ObjectPath, OwnedObjectPath, OwnedValue, Type, Value};
use zbus::{Connection, proxy};

/// The daemon's well-known bus name.
pub const SERVICE: &str = "io.github.Diffusiond1";
/// The object path of the manager.
pub const MANAGER_PATH: &str = "/io/github/Diffusiond1";
/// Job objects live under this path, followed by the job number.
pub const JOB_PATH_PREFIX: &str = "/io/github/Diffusiond1/job/";
/// The prefix of the daemon's own D-Bus error names.
pub const ERROR_PREFIX: &str = "io.github.Diffusiond1.Error.";

/// How long a call other than `Wait()` may take before the client gives up.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `io.github.Diffusiond1.Manager` at `/io/github/Diffusiond1`.
#[proxy(
    interface = "io.github.Diffusiond1.Manager",
    default_service = "io.github.Diffusiond1",
    default_path = "/io/github/Diffusiond1",
    gen_blocking = false
)]
pub trait Manager {
    /// Validates the request (`a{sv}`, keys of docs/dbus-api.md), queues a job, returns its path.
    fn generate(&self, request: HashMap<&str, Value<'_>>) -> zbus::Result<OwnedObjectPath>;

    /// One dictionary per configured model (`name`, `path`, `loaded`, `default`, `kind`,
    /// `scheduler`).
    fn list_models(&self) -> zbus::Result<Vec<HashMap<String, OwnedValue>>>;

    /// Loads a model now and keeps it warm.
    fn load_model(&self, name: &str) -> zbus::Result<()>;

    /// Frees a loaded model.
    fn unload_model(&self, name: &str) -> zbus::Result<()>;

    /// The jobs that exist now.
    fn list_jobs(&self) -> zbus::Result<Vec<OwnedObjectPath>>;

    /// diffusiond's version.
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;

    /// ONNX Runtime's version.
    #[zbus(property)]
    fn runtime_version(&self) -> zbus::Result<String>;

    /// The execution providers in use, in order.
    #[zbus(property)]
    fn execution_providers(&self) -> zbus::Result<Vec<String>>;

    /// Queued plus running jobs.
    #[zbus(property)]
    fn queue_length(&self) -> zbus::Result<u32>;

    /// The configured model names.
    #[zbus(property)]
    fn models(&self) -> zbus::Result<Vec<String>>;

    /// A job was created.
    #[zbus(signal)]
    fn job_added(&self, job: ObjectPath<'_>) -> zbus::Result<()>;

    /// A finished job was retired.
    #[zbus(signal)]
    fn job_removed(&self, job: ObjectPath<'_>, final_state: &str) -> zbus::Result<()>;
}

/// `io.github.Diffusiond1.Job` at `/io/github/Diffusiond1/job/<n>`.
#[proxy(
    interface = "io.github.Diffusiond1.Job",
    default_service = "io.github.Diffusiond1",
    gen_blocking = false
)]
pub trait Job {
    /// Replies when the job ends: the result, or the job's error.
    fn wait(&self) -> zbus::Result<JobResult>;

    /// Stops the job within one denoising step (a queued job at once).
    fn cancel(&self) -> zbus::Result<()>;

    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;

    /// Denoising steps done.
    #[zbus(property)]
    fn step(&self) -> zbus::Result<u32>;

    /// Denoising steps in all.
    #[zbus(property)]
    fn total_steps(&self) -> zbus::Result<u32>;

    /// The failure message, empty unless `failed`.
    #[zbus(property)]
    fn error(&self) -> zbus::Result<String>;

    /// The validated request, with defaults filled in.
    #[zbus(property)]
    fn request(&self) -> zbus::Result<HashMap<String, OwnedValue>>;

    /// The Unix uid of the job's creator.
    #[zbus(property)]
    fn owner(&self) -> zbus::Result<u32>;

    /// After each denoising step.
    #[zbus(signal)]
    fn progress(&self, step: u32, total: u32) -> zbus::Result<()>;

    /// Once, when the job ends.
    #[zbus(signal)]
    fn finished(&self, state: &str) -> zbus::Result<()>;
}

/// What `Job.Wait()` returns (an `a{sv}`; keys the daemon leaves out read as defaults).
#[derive(Debug, Clone, Default, DeserializeDict, Type)]
#[zvariant(signature = "a{sv}")]
pub struct JobResult {
    /// The job's final state.
    pub state: Option<String>,
    /// The PNG files (empty when `output_fds` was given).
    pub images: Option<Vec<Vec<u8>>>,
    /// The seed used.
    pub seed: Option<u64>,
    /// The scheduler used.
    pub scheduler: Option<String>,
    /// The model used.
    pub model: Option<String>,
    /// Image width.
    pub width: Option<u32>,
    /// Image height.
    pub height: Option<u32>,
    /// Denoising steps.
    pub steps: Option<u32>,
    /// Seconds per phase (`queued`, `text_encoder`, `unet`, `scheduler`, `vae`, `png`, `total`).
    pub timings: Option<HashMap<String, f64>>,
    /// Images in the UNet batch this job ran in.
    pub batch_size: Option<u32>,
}

/// Which bus to find the daemon on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Bus {
    /// The user's session bus (`DBUS_SESSION_BUS_ADDRESS`).
    #[default]
    Session,
    /// The system bus.
    System,
    /// A bus at this D-Bus address.
    Address(String),
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bus::Session => f.write_str("the session bus"),
            Bus::System => f.write_str("the system bus"),
            Bus::Address(a) => write!(f, "the bus at {a}"),
        }
    }
}

/// A client failure, displayed as one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No connection to the bus.
    #[error("cannot connect to {bus}: {message}")]
    Connect {
        /// The bus tried.
        bus: Bus,
        /// Why.
        message: String,
    },
    /// Nobody owns `io.github.Diffusiond1` on the bus.
    #[error("diffusiond is not running on {0} (no owner for {SERVICE})")]
    NotRunning(Bus),
    /// The daemon answered with one of its errors (`io.github.Diffusiond1.Error.<name>`).
    #[error("{name}: {message}")]
    Daemon {
        /// The short error name, e.g. `UnknownModel`.
        name: String,
        /// The daemon's message.
        message: String,
    },
    /// The job reference names no job (anymore).
    #[error("no such job: {0}")]
    NoSuchJob(String),
    /// A call took longer than [`CALL_TIMEOUT`].
    #[error("diffusiond did not answer {0} within {secs} s", secs = CALL_TIMEOUT.as_secs())]
    Timeout(&'static str),
    /// The user interrupted (Ctrl-C); `cancelled` says whether the job was cancelled.
    #[error("interrupted{}", if *.cancelled { "; job cancelled" } else { "" })]
    Interrupted {
        /// Whether `Cancel()` was called and succeeded.
        cancelled: bool,
    },
    /// A bad argument caught before asking the daemon.
    #[error("{0}")]
    InvalidArgument(String),
    /// The daemon's reply lacks something the API promises.
    #[error("unexpected reply from diffusiond: {0}")]
    Protocol(String),
    /// Writing an output file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// Any other D-Bus failure.
    #[error("D-Bus: {0}")]
    DBus(String),
}

/// Result of client operations.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

impl ClientError {
    /// Maps a zbus error from a call on `bus` to a readable error.
    pub fn from_zbus(bus: &Bus, e: zbus::Error) -> ClientError {
        match e {
            zbus::Error::MethodError(name, message, _) => {
                let message = message.unwrap_or_default();
                let name = name.as_str();
                if let Some(short) = name.strip_prefix(ERROR_PREFIX) {
                    return ClientError::Daemon {
                        name: short.to_string(),
                        message,
                    };
                }
                match name {
                    "org.freedesktop.DBus.Error.ServiceUnknown"
                    | "org.freedesktop.DBus.Error.NameHasNoOwner" => {
                        ClientError::NotRunning(bus.clone())
                    }
                    "org.freedesktop.DBus.Error.NoReply" => ClientError::DBus(format!(
                        "diffusiond went away without replying ({message})"
                    )),
                    _ => {
                        let short = name.rsplit('.').next().unwrap_or(name);
                        ClientError::DBus(format!("{short}: {message}"))
                    }
                }
            }
            zbus::Error::FDO(fdo) => match *fdo {
                zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_) => {
                    ClientError::NotRunning(bus.clone())
                }
                other => ClientError::DBus(other.to_string()),
            },
            other => ClientError::DBus(other.to_string()),
        }
    }
}

/// `true` for the errors a call on a job path gives when the job does not exist.
fn is_unknown_object(e: &zbus::Error) -> bool {
    let name = match e {
        zbus::Error::MethodError(name, _, _) => name.as_str().to_string(),
        zbus::Error::FDO(fdo) => match **fdo {
            zbus::fdo::Error::UnknownObject(_) => return true,
            zbus::fdo::Error::UnknownInterface(_) => return true,
            zbus::fdo::Error::UnknownMethod(_) => return true,
            zbus::fdo::Error::UnknownProperty(_) => return true,
            _ => return false,
        },
        _ => return false,
    };
    matches!(
        name.as_str(),
        "org.freedesktop.DBus.Error.UnknownObject"
            | "org.freedesktop.DBus.Error.UnknownInterface"
            | "org.freedesktop.DBus.Error.UnknownMethod"
            | "org.freedesktop.DBus.Error.UnknownProperty"
    )
}

/// A generation request. `None` fields are left out of the `a{sv}`, so the daemon fills
/// its defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateRequest {
    /// The prompt (required).
    pub prompt: String,
    /// The negative prompt.
    pub negative_prompt: Option<String>,
    /// Model name from the daemon's config.
    pub model: Option<String>,
    /// Width in pixels.
    pub width: Option<u32>,
    /// Height in pixels.
    pub height: Option<u32>,
    /// Denoising steps.
    pub steps: Option<u32>,
    /// Classifier-free guidance scale.
    pub guidance_scale: Option<f64>,
    /// Guidance rescale, 0..1.
    pub guidance_rescale: Option<f64>,
    /// The seed.
    pub seed: Option<u64>,
    /// `torch` or `numpy`.
    pub rng: Option<String>,
    /// Scheduler name.
    pub scheduler: Option<String>,
    /// Images from the prompt.
    pub num_images: Option<u32>,
    /// Higher runs first.
    pub priority: Option<i32>,
}

impl GenerateRequest {
    /// The `a{sv}` for `Manager.Generate`, with only the keys that are set.
    pub fn to_dict(&self) -> HashMap<&'static str, Value<'_>> {
        let mut d: HashMap<&'static str, Value<'_>> = HashMap::new();
        d.insert("prompt", Value::from(self.prompt.as_str()));
        let strings = [
            ("negative_prompt", &self.negative_prompt),
            ("model", &self.model),
            ("rng", &self.rng),
            ("scheduler", &self.scheduler),
        ];
        for (key, value) in strings {
            if let Some(v) = value {
                d.insert(key, Value::from(v.as_str()));
            }
        }
        let u32s = [
            ("width", self.width),
            ("height", self.height),
            ("steps", self.steps),
            ("num_images", self.num_images),
        ];
        for (key, value) in u32s {
            if let Some(v) = value {
                d.insert(key, Value::from(v));
            }
        }
        for (key, value) in [
            ("guidance_scale", self.guidance_scale),
            ("guidance_rescale", self.guidance_rescale),
        ] {
            if let Some(v) = value {
                d.insert(key, Value::from(v));
            }
        }
        if let Some(v) = self.seed {
            d.insert("seed", Value::from(v));
        }
        if let Some(v) = self.priority {
            d.insert("priority", Value::from(v));
        }
        d
    }
}

/// One configured model, from `ListModels`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelInfo {
    /// Its name in the config.
    pub name: String,
    /// Its folder.
    pub path: String,
    /// Whether it is loaded now.
    pub loaded: bool,
    /// Whether requests without `model` use it.
    pub default: bool,
    /// `sd` or `sdxl`.
    pub kind: String,
    /// Its default scheduler.
    pub scheduler: String,
}

/// What `diffusionctl status` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// diffusiond's version.
    pub version: String,
    /// ONNX Runtime's version.
    pub runtime_version: String,
    /// Execution providers in use.
    pub execution_providers: Vec<String>,
    /// Queued plus running jobs.
    pub queue_length: u32,
    /// The configured models.
    pub models: Vec<ModelInfo>,
}

/// One job, as `diffusionctl jobs` lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobSummary {
    /// The job's object path.
    pub path: String,
    /// Its state.
    pub state: String,
    /// Denoising steps done.
    pub step: u32,
    /// Denoising steps in all.
    pub total_steps: u32,
}

/// What happens to a job while a client waits on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// The `State` property changed (or was first read).
    State(String),
    /// Denoising progress.
    Progress {
        /// Steps done.
        step: u32,
        /// Steps in all.
        total: u32,
    },
}

/// What to do when the interrupt future passed to [`Client::wait_job`] completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInterrupt {
    /// Call `Job.Cancel()` (the job is ours).
    Cancel,
    /// Only stop waiting.
    Detach,
}

/// A connection to diffusiond.
#[derive(Debug, Clone)]
pub struct Client {
    bus: Bus,
    connection: Connection,
    manager: ManagerProxy<'static>,
}

/// Runs a quick call with [`CALL_TIMEOUT`] and maps its error.
async fn quick<T>(
    bus: &Bus,
    what: &'static str,
    call: impl Future<Output = zbus::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result.map_err(|e| ClientError::from_zbus(bus, e)),
        Err(_) => Err(ClientError::Timeout(what)),
    }
}

/// The next item of a stream.
async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

/// Turns `"7"` or `"/io/github/Diffusiond1/job/7"` into the job's object path.
pub fn job_path(reference: &str) -> Result<OwnedObjectPath> {
    let reference = reference.trim();
    let path = if reference.starts_with('/') {
        reference.to_string()
    } else if !reference.is_empty() && reference.bytes().all(|b| b.is_ascii_digit()) {
        format!("{JOB_PATH_PREFIX}{reference}")
    } else {
        return Err(ClientError::InvalidArgument(format!(
            "'{reference}' is not a job: give its number or its object path ({JOB_PATH_PREFIX}N)"
        )));
    };
    OwnedObjectPath::try_from(path.as_str())
        .map_err(|_| ClientError::InvalidArgument(format!("'{reference}' is not an object path")))
}

/// The number at the end of a job path, or the whole path when there is none.
pub fn job_label(path: &str) -> &str {
    path.strip_prefix(JOB_PATH_PREFIX).unwrap_or(path)
}

impl Client {
    /// Connects to `bus`. `Wait()` has no method timeout on this connection (it may take
    /// minutes); other calls time out after [`CALL_TIMEOUT`].
    pub async fn connect(bus: &Bus) -> Result<Client> {
        let connect_error = |e: zbus::Error| ClientError::Connect {
            bus: bus.clone(),
            message: e.to_string(),
        };
        let builder = match bus {
            Bus::Session => zbus::connection::Builder::session(),
            Bus::System => zbus::connection::Builder::system(),
            Bus::Address(a) => zbus::connection::Builder::address(a.as_str()),
        }
        .map_err(connect_error)?;
        let connection = match tokio::time::timeout(CALL_TIMEOUT, builder.build()).await {
            Ok(c) => c.map_err(connect_error)?,
            Err(_) => return Err(ClientError::Timeout("the connection")),
        };
        let manager = ManagerProxy::builder(&connection)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|e| ClientError::from_zbus(bus, e))?;
        Ok(Client {
            bus: bus.clone(),
            connection,
            manager,
        })
    }

    /// The bus this client is on.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The underlying connection.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// The manager proxy.
    pub fn manager(&self) -> &ManagerProxy<'static> {
        &self.manager
    }

    /// The daemon's versions, providers, queue length and models.
    pub async fn status(&self) -> Result<Status> {
        let m = &self.manager;
        let b = &self.bus;
        Ok(Status {
            version: quick(b, "Version", m.version()).await?,
            runtime_version: quick(b, "RuntimeVersion", m.runtime_version()).await?,
            execution_providers: quick(b, "ExecutionProviders", m.execution_providers()).await?,
            queue_length: quick(b, "QueueLength", m.queue_length()).await?,
            models: self.models().await?,
        })
    }

    /// `ListModels`, parsed.
    pub async fn models(&self) -> Result<Vec<ModelInfo>> {
        let list = quick(&self.bus, "ListModels", self.manager.list_models()).await?;
        Ok(list.iter().map(model_info).collect())
    }

    /// `ListJobs` with each job's state and progress; jobs retired meanwhile are skipped.
    pub async fn jobs(&self) -> Result<Vec<JobSummary>> {
        let paths = quick(&self.bus, "ListJobs", self.manager.list_jobs()).await?;
        let mut jobs = Vec::with_capacity(paths.len());
        for path in paths {
            match self.job_summary(&path).await {
                Ok(s) => jobs.push(s),
                Err(ClientError::NoSuchJob(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(jobs)
    }

    async fn job_summary(&self, path: &OwnedObjectPath) -> Result<JobSummary> {
        let job = self.plain_job(path).await?;
        let state = self.job_call(path, "State", job.state()).await?;
        let step = self.job_call(path, "Step", job.step()).await?;
        let total_steps = self.job_call(path, "TotalSteps", job.total_steps()).await?;
        Ok(JobSummary {
            path: path.to_string(),
            state,
            step,
            total_steps,
        })
    }

    /// A job proxy that caches nothing (for one-off calls).
    async fn plain_job(&self, path: &OwnedObjectPath) -> Result<JobProxy<'static>> {
        JobProxy::builder(&self.connection)
            .path(path.clone())
            .map_err(|e| ClientError::from_zbus(&self.bus, e))?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|e| ClientError::from_zbus(&self.bus, e))
    }

    /// Runs a quick call on a job, mapping "no such object" to [`ClientError::NoSuchJob`].
    async fn job_call<T>(
        &self,
        path: &OwnedObjectPath,
        what: &'static str,
        call: impl Future<Output = zbus::Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if is_unknown_object(&e) => Err(ClientError::NoSuchJob(path.to_string())),
            Ok(Err(e)) => Err(ClientError::from_zbus(&self.bus, e)),
            Err(_) => Err(ClientError::Timeout(what)),
        }
    }

    /// `Generate`: queues a job and returns its path.
    pub async fn generate(&self, request: &GenerateRequest) -> Result<OwnedObjectPath> {
        if request.prompt.is_empty() {
            return Err(ClientError::InvalidArgument("the prompt is empty".into()));
        }
        quick(
            &self.bus,
            "Generate",
            self.manager.generate(request.to_dict()),
        )
        .await
    }

    /// `Job.Cancel()` on the job named by `reference` (a number or a path).
    pub async fn cancel(&self, reference: &str) -> Result<OwnedObjectPath> {
        let path = job_path(reference)?;
        let job = self.plain_job(&path).await?;
        self.job_call(&path, "Cancel", job.cancel()).await?;
        Ok(path)
    }

    /// Waits for the job at `path` to end and returns its result.
    ///
    /// Subscribes to `Progress`, `Finished` and the `State` property first, reports the
    /// current state and progress to `on_event`, then calls `Wait()` (no timeout) and keeps
    /// reporting until it replies, so no event between the first read and the end is lost.
    /// When `interrupt` completes first, the job is cancelled or left alone as `on_interrupt`
    /// says, and the result is [`ClientError::Interrupted`].
    pub async fn wait_job(
        &self,
        path: &OwnedObjectPath,
        mut on_event: impl FnMut(JobEvent),
        interrupt: impl Future<Output = ()>,
        on_interrupt: OnInterrupt,
    ) -> Result<JobResult> {
        let map = |e: zbus::Error| {
            if is_unknown_object(&e) {
                ClientError::NoSuchJob(path.to_string())
            } else {
                ClientError::from_zbus(&self.bus, e)
            }
        };
        // A plain read first: a missing job fails here with a clear error.
        let plain = self.plain_job(path).await?;
        self.job_call(path, "State", plain.state()).await?;
        // Caching properties upfront subscribes to PropertiesChanged before reading them.
        let job = tokio::time::timeout(
            CALL_TIMEOUT,
            JobProxy::builder(&self.connection)
                .path(path.clone())
                .map_err(map)?
                .cache_properties(zbus::proxy::CacheProperties::Yes)
                .build(),
        )
        .await
        .map_err(|_| ClientError::Timeout("the job's properties"))?
        .map_err(map)?;
        let mut progress = job.receive_progress().await.map_err(map)?;
        let mut finished = job.receive_finished().await.map_err(map)?;
        let mut states = job.receive_state_changed().await;
        let mut steps = job.receive_step_changed().await;

        let total = job.total_steps().await.map_err(map)?;
        let step = job.step().await.map_err(map)?;
        let mut last_total = total;
        on_event(JobEvent::State(job.state().await.map_err(map)?));
        on_event(JobEvent::Progress { step, total });

        let wait = job.wait();
        tokio::pin!(wait);
        tokio::pin!(interrupt);
        loop {
            tokio::select! {
                result = &mut wait => {
                    let result = result.map_err(map)?;
                    if let Some(state) = &result.state {
                        on_event(JobEvent::State(state.clone()));
                    }
                    return Ok(result);
                }
                Some(signal) = next(&mut progress) => {
                    if let Ok(args) = signal.args() {
                        last_total = args.total;
                        on_event(JobEvent::Progress { step: args.step, total: args.total });
                    }
                }
                Some(change) = next(&mut steps) => {
                    if let Ok(step) = change.get().await {
                        on_event(JobEvent::Progress { step, total: last_total });
                    }
                }
                Some(change) = next(&mut states) => {
                    if let Ok(state) = change.get().await {
                        on_event(JobEvent::State(state));
                    }
                }
                Some(signal) = next(&mut finished) => {
                    // Wait() replies next; show the final state meanwhile.
                    if let Ok(args) = signal.args() {
                        on_event(JobEvent::State(args.state.to_string()));
                    }
                }
                () = &mut interrupt => {
                    let cancelled = on_interrupt == OnInterrupt::Cancel
                        && matches!(
                            tokio::time::timeout(CALL_TIMEOUT, job.cancel()).await,
                            Ok(Ok(()))
                        );
                    return Err(ClientError::Interrupted { cancelled });
                }
            }
        }
    }
}

/// Reads one `ListModels` entry; missing keys read as empty.
fn model_info(d: &HashMap<String, OwnedValue>) -> ModelInfo {
    let string = |key: &str| {
        d.get(key)
            .and_then(|v| v.downcast_ref::<&str>().ok().map(str::to_string))
            .unwrap_or_default()
    };
    let flag = |key: &str| {
        d.get(key)
            .and_then(|v| v.downcast_ref::<bool>().ok())
            .unwrap_or(false)
    };
    ModelInfo {
        name: string("name"),
        path: string("path"),
        loaded: flag("loaded"),
        default: flag("default"),
        kind: string("kind"),
        scheduler: string("scheduler"),
    }
}

/// Writes a job's images to `OUT.png`, or `OUT-0.png`, `OUT-1.png`, ... for several
/// (the same names as `diffusionctl generate --local`). Returns the files written.
pub fn write_images(result: &JobResult, output: &Path) -> Result<Vec<PathBuf>> {
    let images = result.images.as_deref().unwrap_or_default();
    if images.is_empty() {
        return Err(ClientError::Protocol("the result holds no images".into()));
    }
    let paths = crate::local::output_paths(output, images.len());
    for (png, path) in images.iter().zip(&paths) {
        std::fs::write(path, png).map_err(|source| ClientError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(paths)
}

/// A one-line summary of a result: seed, scheduler, size, steps, total time.
pub fn describe_result(result: &JobResult) -> String {
    let mut s = String::new();
    if let Some(model) = &result.model {
        let _ = write!(s, "model {model}");
    }
    if let Some(seed) = result.seed {
        let _ = write!(s, "{}seed {seed}", sep(&s));
    }
    if let Some(scheduler) = &result.scheduler {
        let _ = write!(s, "{}scheduler {scheduler}", sep(&s));
    }
    if let (Some(w), Some(h)) = (result.width, result.height) {
        let _ = write!(s, "{}{w}x{h}", sep(&s));
    }
    if let Some(steps) = result.steps {
        let _ = write!(s, "{}{steps} steps", sep(&s));
    }
    if let Some(total) = result.timings.as_ref().and_then(|t| t.get("total")) {
        let _ = write!(s, "{}{total:.2} s", sep(&s));
    }
    s
}

fn sep(s: &str) -> &'static str {
    if s.is_empty() { "" } else { ", " }
}

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
            JobEvent::State(state) => self.bar.set_message(state.clone()),
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

/// Formats `status` for people.
pub fn format_status(status: &Status) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "diffusiond {}", status.version);
    let _ = writeln!(s, "ONNX Runtime {}", status.runtime_version);
    let _ = writeln!(
        s,
        "execution providers: {}",
        status.execution_providers.join(", ")
    );
    let _ = writeln!(s, "queue length: {}", status.queue_length);
    let models: Vec<String> = status
        .models
        .iter()
        .map(|m| {
            let mut tags = Vec::new();
            if m.default {
                tags.push("default");
            }
            if m.loaded {
                tags.push("loaded");
            }
            if tags.is_empty() {
                m.name.clone()
            } else {
                format!("{} ({})", m.name, tags.join(", "))
            }
        })
        .collect();
    let _ = writeln!(s, "models: {}", models.join(", "));
    s
}

/// Formats `ListModels` as a table.
pub fn format_models(models: &[ModelInfo]) -> String {
    let rows: Vec<[String; 6]> = models
        .iter()
        .map(|m| {
            [
                m.name.clone(),
                m.kind.clone(),
                m.scheduler.clone(),
                yes_no(m.loaded),
                yes_no(m.default),
                m.path.clone(),
            ]
        })
        .collect();
    table(
        ["NAME", "KIND", "SCHEDULER", "LOADED", "DEFAULT", "PATH"],
        &rows,
    )
}

/// Formats `ListJobs` as a table.
pub fn format_jobs(jobs: &[JobSummary]) -> String {
    let rows: Vec<[String; 4]> = jobs
        .iter()
        .map(|j| {
            [
                job_label(&j.path).to_string(),
                j.state.clone(),
                format!("{}/{}", j.step, j.total_steps),
                j.path.clone(),
            ]
        })
        .collect();
    table(["JOB", "STATE", "STEP", "PATH"], &rows)
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// Left-aligned columns, two spaces apart, no trailing spaces.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_references_become_paths() {
        assert_eq!(
            job_path("7").unwrap().as_str(),
            "/io/github/Diffusiond1/job/7"
        );
        assert_eq!(
            job_path("/io/github/Diffusiond1/job/12").unwrap().as_str(),
            "/io/github/Diffusiond1/job/12"
        );
        assert!(job_path("seven").is_err());
        assert!(job_path("/bad//path").is_err());
        assert_eq!(job_label("/io/github/Diffusiond1/job/3"), "3");
    }

    #[test]
    fn requests_carry_only_the_keys_set() {
        let r = GenerateRequest {
            prompt: "a cat".into(),
            steps: Some(4),
            seed: Some(5),
            guidance_scale: Some(1.0),
            ..Default::default()
        };
        let d = r.to_dict();
        let mut keys: Vec<&str> = d.keys().copied().collect();
        keys.sort_unstable();
        assert_eq!(keys, ["guidance_scale", "prompt", "seed", "steps"]);
        assert_eq!(d["steps"], Value::U32(4));
        assert_eq!(d["seed"], Value::U64(5));
        assert_eq!(d["guidance_scale"], Value::F64(1.0));
    }

    #[test]
    fn daemon_errors_read_as_name_and_message() {
        let name =
            zbus::names::OwnedErrorName::try_from("io.github.Diffusiond1.Error.UnknownModel")
                .unwrap();
        let msg = zbus::message::Message::method_call("/", "X")
            .unwrap()
            .build(&())
            .unwrap();
        let e = zbus::Error::MethodError(name, Some("no model 'x'".into()), msg);
        assert_eq!(
            ClientError::from_zbus(&Bus::Session, e).to_string(),
            "UnknownModel: no model 'x'"
        );
    }

    #[test]
    fn tables_align_columns() {
        let t = format_jobs(&[JobSummary {
            path: "/io/github/Diffusiond1/job/1".into(),
            state: "running".into(),
            step: 3,
            total_steps: 20,
        }]);
        assert_eq!(
            t,
            "JOB  STATE    STEP  PATH\n1    running  3/20  /io/github/Diffusiond1/job/1\n"
        );
    }
}
