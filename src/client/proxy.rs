//! zbus proxies for the `Manager`, `Job` and `Batch` interfaces (docs/dbus-api.md).

use std::collections::HashMap;

use zbus::proxy;
use zbus::zvariant::{ObjectPath, OwnedObjectPath, OwnedValue, Value};

use crate::wire::reply::{JobResult, ModelInfo};

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

    /// `Generate`, with images written as byte strings rather than a `Value` per byte
    /// (what `diffusionctl` sends; the same message).
    #[zbus(name = "Generate")]
    fn generate_sent(
        &self,
        request: crate::wire::keys::SentDict<'_>,
    ) -> zbus::Result<OwnedObjectPath>;

    /// One dictionary per configured model (`name`, `path`, `loaded`, `default`, `kind`,
    /// `scheduler`, `lora_sets`, and for a loaded model `expires_in` and `memory_bytes`).
    fn list_models(&self) -> zbus::Result<Vec<ModelInfo>>;

    /// One dictionary per LoRA file the model (empty: the default) may use (`name`,
    /// `size`, `hash`, `architecture`, `fits`, `trigger_words`, `error`).
    fn list_loras(&self, model: &str) -> zbus::Result<Vec<crate::wire::reply::LoraInfo>>;

    /// Loads a model now and keeps it warm.
    fn load_model(&self, name: &str) -> zbus::Result<()>;

    /// Frees a loaded model.
    fn unload_model(&self, name: &str) -> zbus::Result<()>;

    /// The jobs that exist now.
    fn list_jobs(&self) -> zbus::Result<Vec<OwnedObjectPath>>;

    /// The daemon's metrics in the Prometheus text format (root, the service user and
    /// `jobs.priority_group` members; others get `AccessDenied`).
    fn metrics(&self) -> zbus::Result<String>;

    /// Validates and stores a batch (manifest bytes, `SubmitBatch` options); returns its
    /// path (the existing batch's for the same manifest and settings).
    fn submit_batch(
        &self,
        manifest: &[u8],
        options: HashMap<&str, Value<'_>>,
    ) -> zbus::Result<OwnedObjectPath>;

    /// The caller's batches (root: all).
    fn list_batches(&self) -> zbus::Result<Vec<OwnedObjectPath>>;

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

/// `io.github.Diffusiond1.Batch` at `/io/github/Diffusiond1/batch/<n>`.
#[proxy(
    interface = "io.github.Diffusiond1.Batch",
    default_service = "io.github.Diffusiond1",
    gen_blocking = false
)]
pub trait Batch {
    /// Cancels the batch.
    fn cancel(&self) -> zbus::Result<()>;

    /// Resumes a paused batch.
    fn resume(&self) -> zbus::Result<()>;

    /// Files of finished items.
    fn list_results(&self) -> zbus::Result<Vec<String>>;

    /// Failed items: (name, error).
    fn list_failures(&self) -> zbus::Result<Vec<(String, String)>>;

    /// A read-only fd of one finished file (or a one-image item's name).
    fn open_result(&self, name: &str) -> zbus::Result<zbus::zvariant::OwnedFd>;

    /// Removes the batch and its images.
    fn remove(&self) -> zbus::Result<()>;

    /// `running`, `paused`, `succeeded`, `failed` or `cancelled`.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;

    /// Why it paused, or "".
    #[zbus(property)]
    fn error(&self) -> zbus::Result<String>;

    /// Items.
    #[zbus(property)]
    fn total(&self) -> zbus::Result<u32>;

    /// Items done.
    #[zbus(property)]
    fn done(&self) -> zbus::Result<u32>;

    /// Items failed.
    #[zbus(property)]
    fn failed(&self) -> zbus::Result<u32>;

    /// Images per second.
    #[zbus(property)]
    fn images_per_second(&self) -> zbus::Result<f64>;

    /// Seconds left.
    #[zbus(property)]
    fn eta_seconds(&self) -> zbus::Result<f64>;

    /// Bytes of its images in the daemon's state directory.
    #[zbus(property)]
    fn disk_bytes(&self) -> zbus::Result<u64>;

    /// Its owner's uid.
    #[zbus(property)]
    fn owner(&self) -> zbus::Result<u32>;

    /// Its label.
    #[zbus(property)]
    fn label(&self) -> zbus::Result<String>;

    /// Its identity.
    #[zbus(property)]
    fn manifest_hash(&self) -> zbus::Result<String>;

    /// Its base seed.
    #[zbus(property)]
    fn base_seed(&self) -> zbus::Result<u64>;

    /// An item ended.
    #[zbus(signal)]
    fn item_finished(&self, name: &str, ok: bool, error: &str) -> zbus::Result<()>;
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
