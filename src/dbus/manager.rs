//! The Manager object (`/io/github/Diffusiond1`): `Generate`, the model commands, the
//! job list and the daemon's properties. Each method reads, resolves once, and hands over.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath};
use zbus::{Connection, interface};

use super::batch::{Batch, blocking};
use super::job::{Entry, JobView};
use super::{Error, Job, Registry, caller_uid, expect_args};
use crate::batch::service::Service;
use crate::jobs::{Engine, JobId, QueuedJob};
use crate::model::Catalog;
use crate::request::{Limits, RequestError};
use crate::wire::batch::batch_path;
use crate::wire::reply::{LoraInfo, ModelInfo};
use crate::wire::{self, job_path, keys};

/// What the Manager says of ONNX Runtime.
#[derive(Debug, Clone, Default)]
pub struct RuntimeInfo {
    /// ONNX Runtime's version.
    pub version: String,
    /// Execution providers in use, in order.
    pub providers: Vec<String>,
}

/// The Manager object.
pub struct Manager {
    engine: Engine,
    catalog: Arc<Catalog>,
    limits: Limits,
    registry: Registry,
    runtime_version: String,
    providers: Vec<String>,
    /// The daemon's own uid: it may load and unload models, as root may.
    own_uid: Option<u32>,
    /// Members of this group may ask for a priority above 0 (`jobs.priority_group`).
    priority_gid: Option<u32>,
    /// Durable batches, or why the state directory could not be used.
    batches: Result<Service, String>,
    /// Batch submissions being read.
    intake: super::intake::Intake,
    /// What `Metrics()` reports ([`Manager::serving_metrics`]).
    metrics: Option<crate::metrics::source::Source>,
    /// `ListLoras`' descriptions, kept until a file changes.
    lora_descriptions: Arc<crate::lora::describe::DescribeCache>,
}

impl Manager {
    /// A Manager over an engine and the opened models. `priority_gid`: the group whose
    /// members may ask for a priority above 0, besides root and the service user.
    pub fn new(
        engine: Engine,
        catalog: Arc<Catalog>,
        limits: Limits,
        registry: Registry,
        runtime: RuntimeInfo,
        priority_gid: Option<u32>,
        batches: Result<Service, String>,
    ) -> Self {
        let RuntimeInfo {
            version: runtime_version,
            providers,
        } = runtime;
        use std::os::unix::fs::MetadataExt;
        let own_uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        Manager {
            engine,
            catalog,
            limits,
            registry,
            runtime_version,
            providers,
            own_uid,
            priority_gid,
            batches,
            intake: super::intake::Intake::default(),
            metrics: None,
            lora_descriptions: Arc::default(),
        }
    }

    /// Serves `Metrics()` from `source`.
    pub fn serving_metrics(mut self, source: crate::metrics::source::Source) -> Self {
        self.metrics = Some(source);
        self
    }

    /// Root, the service user and members of `jobs.priority_group`: they may ask for a
    /// priority above 0 and read the metrics.
    async fn is_trusted(
        &self,
        conn: &Connection,
        header: &Header<'_>,
        uid: u32,
    ) -> Result<bool, Error> {
        if uid == 0 || Some(uid) == self.own_uid {
            return Ok(true);
        }
        if let Some(gid) = self.priority_gid {
            let creds = super::callers::credentials(conn, header).await?;
            return Ok(creds.groups.is_some_and(|g| g.contains(&gid)));
        }
        Ok(false)
    }

    /// A priority above 0 jumps other callers' jobs: only root, the service user and
    /// members of `jobs.priority_group` may ask for one.
    async fn check_priority(
        &self,
        conn: &Connection,
        header: &Header<'_>,
        uid: u32,
    ) -> Result<(), Error> {
        if self.is_trusted(conn, header, uid).await? {
            return Ok(());
        }
        Err(Error::AccessDenied(
            "'priority': above 0 only for root, the service user and members of jobs.priority_group; 0 and below are open to everyone".into(),
        )
        .refused())
    }

    /// The batch service, or why batches are unavailable.
    fn batches(&self) -> Result<Service, Error> {
        self.batches
            .clone()
            .map_err(|e| Error::StorageFailed(format!("batches are unavailable: {e}")))
    }

    /// Loading and unloading models affects every caller: only root or the daemon's own
    /// user (on a session bus, the user) may do it.
    async fn check_admin(&self, conn: &Connection, header: &Header<'_>) -> Result<(), Error> {
        let uid = caller_uid(conn, header).await?;
        if uid == 0 || Some(uid) == self.own_uid {
            Ok(())
        } else {
            Err(Error::AccessDenied(
                "only root or the service user may load or unload models".into(),
            )
            .refused())
        }
    }
}

/// A request key error, counted as a refusal.
fn refused_argument(message: String) -> Error {
    Error::InvalidArgument(message).refused()
}

#[interface(name = "io.github.Diffusiond1.Manager")]
impl Manager {
    /// Validates the request, queues a job, returns its object path at once.
    #[zbus(out_args("job"))]
    async fn generate(
        &self,
        request: keys::RawDict<'_>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &zbus::ObjectServer,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<OwnedObjectPath, Error> {
        expect_args(&header, "Generate", "a{sv}")?;
        let mut incoming =
            keys::parse(&request, self.limits.max_image_bytes).map_err(refused_argument)?;
        drop(request);
        if incoming.has_pending_images() {
            // File reads and hashing stay off the async threads.
            let fds = std::mem::take(&mut incoming.image_fds);
            let bytes = std::mem::take(&mut incoming.image_bytes);
            let max = self.limits.max_image_bytes;
            let mut request = std::mem::take(&mut incoming.request);
            let request = tokio::task::spawn_blocking(move || {
                crate::wire::images::finish(&mut request, bytes, fds, max).map(|()| request)
            })
            .await
            .map_err(|e| Error::InvalidArgument(e.to_string()))?
            .map_err(Error::InvalidArgument)?;
            incoming.request = request;
        }
        let resolved = match self.catalog.resolve(&incoming.request, &self.limits) {
            // A LoRA file added since the folders were last read: read them again (off
            // the async threads) and resolve once more.
            Err(RequestError::UnknownLora { .. }) => {
                let catalog = self.catalog.clone();
                let model = incoming.request.model.clone();
                let _ = tokio::task::spawn_blocking(move || catalog.rescan_loras(model.as_deref()))
                    .await;
                self.catalog.resolve(&incoming.request, &self.limits)?
            }
            other => other?,
        };
        incoming
            .check_delivery(resolved.num_images)
            .map_err(refused_argument)?;
        let owner = caller_uid(conn, &header).await?;
        if resolved.priority > 0 {
            self.check_priority(conn, &header, owner).await?;
        }
        let id = self.engine.next_id();
        let path = job_path(id);
        let (done_tx, done_rx) = watch::channel(false);
        let view = Arc::new(Mutex::new(
            JobView::queued(owner, &resolved).followed_by(header.sender()),
        ));
        let job = Job {
            view: view.clone(),
            done: done_rx,
            engine: self.engine.clone(),
            id,
        };
        server.at(&path, job).await?;
        self.registry.insert(
            id,
            Entry {
                view,
                done: done_tx,
            },
        );
        let queued = QueuedJob {
            id,
            owner,
            sender: header
                .sender()
                .filter(|_| incoming.cancel_on_disconnect)
                .map(|s| s.to_string()),
            request: resolved,
            output_fds: incoming.output_fds,
            queued_at: std::time::Instant::now(),
            background: false,
            reply: None,
        };
        if let Err(e) = self.engine.submit(queued) {
            self.registry.remove(id);
            server.remove::<Job, _>(&path).await?;
            return Err(e.into());
        }
        Self::job_added(&emitter, path.as_ref()).await?;
        self.queue_length_changed(&emitter).await?;
        Ok(path)
    }

    /// Reads a batch manifest (bytes, never a path), validates every line and stores the
    /// batch; returns its object path. The same manifest and settings from the same uid
    /// return the existing batch (resumed if it was paused) instead of a second one.
    #[zbus(out_args("batch"))]
    async fn submit_batch(
        &self,
        manifest: &[u8],
        options: keys::RawDict<'_>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<OwnedObjectPath, Error> {
        expect_args(&header, "SubmitBatch", "aya{sv}")?;
        let submission = wire::batch::parse_submission(&options).map_err(Error::InvalidArgument)?;
        let owner = caller_uid(conn, &header).await?;
        let service = self.batches()?;
        // The manifest is borrowed from the message; it is copied once its turn comes.
        let ticket = self.intake.enter(owner)?;
        let turn = ticket.turn().await;
        let manifest = manifest.to_vec();
        let (id, snapshot) = blocking(move || {
            let submitted = service.submit(owner, &manifest, &submission);
            if manifest.len() >= super::intake::TRIM_AFTER_BYTES {
                drop(manifest);
                crate::heap::give_back();
            }
            let (id, _) = submitted?;
            Ok((id, service.snapshot(id)?))
        })
        .await?;
        drop((turn, ticket));
        let path = batch_path(id);
        if server.interface::<_, Batch>(path.as_ref()).await.is_err() {
            server
                .at(&path, Batch::new(self.batches()?, snapshot))
                .await?;
        }
        super::batch::follow(server, conn, path.as_ref(), header.sender()).await?;
        Ok(path)
    }

    /// The caller's batches (root: every batch).
    #[zbus(out_args("batches"))]
    async fn list_batches(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<OwnedObjectPath>, Error> {
        expect_args(&header, "ListBatches", "")?;
        let uid = caller_uid(conn, &header).await?;
        let service = self.batches()?;
        let rows = blocking(move || service.batches()).await?;
        Ok(rows
            .into_iter()
            .filter(|r| uid == 0 || r.owner == uid)
            .map(|r| batch_path(r.id))
            .collect())
    }

    /// One dict per LoRA file `model` may use (its folders read again first): name,
    /// size, A1111 hash, base architecture, whether it fits the model, trigger words.
    #[zbus(out_args("loras"))]
    async fn list_loras(
        &self,
        model: &str,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<Vec<LoraInfo>, Error> {
        expect_args(&header, "ListLoras", "s")?;
        let name = if model.is_empty() { None } else { Some(model) };
        let entry = self.catalog.lookup(name).map_err(Error::from)?;
        let dir = entry.bundle.dir.clone();
        let shelf = self
            .catalog
            .get(entry.name)
            .map(|e| e.loras.clone())
            .unwrap_or_default();
        let cache = self.lora_descriptions.clone();
        // Reading the folders and hashing the files stay off the async threads.
        tokio::task::spawn_blocking(move || {
            shelf
                .rescan()
                .iter()
                .map(|e| {
                    let d = cache.describe(&dir, e);
                    LoraInfo {
                        name: e.name.clone(),
                        size: e.size,
                        hash: d.hash,
                        architecture: d.architecture,
                        fits: d.fits,
                        trigger_words: d.trigger_words,
                        error: d.error,
                    }
                })
                .collect()
        })
        .await
        .map_err(|e| Error::StorageFailed(format!("listing LoRAs: {e}")))
    }

    /// One dict per configured model.
    #[zbus(out_args("models"))]
    fn list_models(&self, #[zbus(header)] header: Header<'_>) -> Result<Vec<ModelInfo>, Error> {
        expect_args(&header, "ListModels", "")?;
        let default = self.catalog.default_name();
        Ok(self
            .catalog
            .entries()
            .map(|(name, entry)| {
                let bundle = entry.bundle.as_ref().ok();
                let expires_in = self.engine.expires_in(name);
                let workers = self.engine.devices().len();
                ModelInfo {
                    name: name.to_string(),
                    path: entry.path.display().to_string(),
                    loaded: self.engine.is_loaded(name),
                    default: default == Some(name),
                    kind: bundle.map_or("unreadable", |b| b.kind.name()).to_string(),
                    scheduler: bundle
                        .and_then(|b| b.default_scheduler)
                        .unwrap_or("")
                        .to_string(),
                    state: crate::wire::reply::model_state_name(
                        self.engine.model_state(name),
                        self.providers.iter().any(|p| p == "tensorrt"),
                    )
                    .to_string(),
                    error: entry.bundle.as_ref().err().cloned().unwrap_or_default(),
                    expires_in,
                    // Every worker's copy, as the metrics count it (an estimate).
                    memory_bytes: expires_in.map(|_| {
                        crate::metrics::source::model_memory_bytes(&self.catalog, name, workers)
                    }),
                    lora_sets: self.engine.loaded_lora_sets(name),
                    controlnets: bundle.map_or_else(Vec::new, |b| {
                        b.controlnets.iter().map(|c| c.name.clone()).collect()
                    }),
                }
            })
            .collect())
    }

    /// Loads a model now and keeps it warm.
    async fn load_model(
        &self,
        name: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        expect_args(&header, "LoadModel", "s")?;
        self.check_admin(conn, &header).await?;
        let rx = self.engine.load_model(&name)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(failure)) => Err(Error::ModelLoadFailed(format!("model '{name}': {failure}"))),
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
        expect_args(&header, "UnloadModel", "s")?;
        self.check_admin(conn, &header).await?;
        Ok(self.engine.unload_model(&name)?)
    }

    /// The daemon's metrics in the Prometheus text format (what `[metrics] textfile`
    /// holds): for root, the service user and members of `jobs.priority_group` only.
    #[zbus(out_args("metrics"))]
    async fn metrics(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, Error> {
        expect_args(&header, "Metrics", "")?;
        let uid = caller_uid(conn, &header).await?;
        if !self.is_trusted(conn, &header, uid).await? {
            return Err(Error::AccessDenied(
                "the metrics are for root, the service user and members of jobs.priority_group (they tell of every caller's jobs)".into(),
            )
            .refused());
        }
        match &self.metrics {
            Some(source) => Ok(source.render().await),
            None => Err(Error::InvalidArgument(
                "this daemon serves no metrics".into(),
            )),
        }
    }

    /// The jobs that exist now.
    #[zbus(out_args("jobs"))]
    fn list_jobs(&self, #[zbus(header)] header: Header<'_>) -> Result<Vec<OwnedObjectPath>, Error> {
        expect_args(&header, "ListJobs", "")?;
        let mut ids: Vec<JobId> = self.registry.lock().keys().copied().collect();
        ids.sort_unstable();
        Ok(ids.into_iter().map(job_path).collect())
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
        self.catalog.names().map(str::to_string).collect()
    }

    /// A job was created.
    #[zbus(signal)]
    async fn job_added(emitter: &SignalEmitter<'_>, job: ObjectPath<'_>) -> zbus::Result<()>;

    /// A finished job was removed from the bus.
    #[zbus(signal)]
    pub(super) async fn job_removed(
        emitter: &SignalEmitter<'_>,
        job: ObjectPath<'_>,
        final_state: &str,
    ) -> zbus::Result<()>;
}
