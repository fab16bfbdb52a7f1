//! zbus proxies for the `Manager` and `Job` interfaces (docs/dbus-api.md).

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

    /// One dictionary per configured model (`name`, `path`, `loaded`, `default`, `kind`,
    /// `scheduler`).
    fn list_models(&self) -> zbus::Result<Vec<ModelInfo>>;

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
