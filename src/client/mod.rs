//! The D-Bus client library of diffusiond: connect, generate, wait with progress events,
//! cancel, list, and batches (`batch`: submit, follow, copy the images). Free of presentation: `diffusionctl` (src/bin/diffusionctl/) draws the
//! progress bar and the tables, handles Ctrl-C and names the output files.
//!
//! Every function returns a [`ClientError`] whose `Display` is one readable line.

mod batch;
mod error;
mod proxy;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use zbus::Connection;
use zbus::export::futures_core::Stream;
use zbus::zvariant::OwnedObjectPath;

pub use crate::request::GenerateRequest;
pub use crate::wire::Bus;
pub use crate::wire::reply::{JobResult, LoraInfo, ModelInfo};
use crate::wire::{JOB_PATH_PREFIX, keys};
pub use batch::{BatchInfo, BatchProxy, FetchEvent, batch_path};
use error::is_unknown_object;
pub use error::{ClientError, Result, printable, printable_lines};
pub use proxy::{JobProxy, ManagerProxy};

/// How long a call other than `Wait()` may take before the client gives up.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What `diffusionctl status` shows.
#[derive(Debug, Clone, Default, PartialEq)]
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

impl Client {
    /// Connects to `bus`. `Wait()` has no method timeout on this connection (it may take
    /// minutes); other calls time out after [`CALL_TIMEOUT`].
    pub async fn connect(bus: &Bus) -> Result<Client> {
        let connect_error = |e: zbus::Error| ClientError::Connect {
            bus: bus.clone(),
            message: e.to_string(),
        };
        let builder = bus.builder().map_err(connect_error)?;
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
        quick(&self.bus, "ListModels", self.manager.list_models()).await
    }

    /// `ListLoras(model)`, parsed (`None`: the default model). Reading and hashing the
    /// files can take a while the first time: no short timeout.
    pub async fn loras(&self, model: Option<&str>) -> Result<Vec<LoraInfo>> {
        self.manager
            .list_loras(model.unwrap_or(""))
            .await
            .map_err(|e| ClientError::from_zbus(&self.bus, e))
    }

    /// `Metrics()`: the daemon's metrics in the Prometheus text format.
    pub async fn metrics(&self) -> Result<String> {
        quick(&self.bus, "Metrics", self.manager.metrics()).await
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
        self.plain(path).await
    }

    /// A proxy of object `path` (a job, a batch) that caches nothing.
    async fn plain<P>(&self, path: &OwnedObjectPath) -> Result<P>
    where
        P: From<zbus::Proxy<'static>> + zbus::proxy::Defaults,
    {
        zbus::proxy::Builder::<P>::new(&self.connection)
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
        self.object_call(what, call, || ClientError::NoSuchJob(path.to_string()))
            .await
    }

    /// Runs a quick call on an object (a job, a batch); "no such object" becomes `missing()`.
    async fn object_call<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = zbus::Result<T>>,
        missing: impl FnOnce() -> ClientError,
    ) -> Result<T> {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if is_unknown_object(&e) => Err(missing()),
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
            self.manager.generate_sent(keys::to_sent_dict(request)),
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
}
