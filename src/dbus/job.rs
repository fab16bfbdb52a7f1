//! Job objects (`/io/github/Diffusiond1/job/<n>`): what each shows, `Wait()` and `Cancel()`.
//! `State`, `Step` and `TotalSteps` are public; what the caller sent or made (`Request`,
//! `Error`, `Owner`) only its owner or root may read, and the job's signals go to its
//! [`Followers`] only (docs/dbus-api.md, "Privacy").

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use zbus::message::Header;
use zbus::names::UniqueName;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedValue;
use zbus::{Connection, interface};

use super::events::Followers;
use super::{Error, expect_args};
use crate::jobs::{Engine, JobId, JobOutput, JobState, Outcome};
use crate::request::ResolvedRequest;
use crate::wire::keys;
use crate::wire::reply::{self, WaitResult};

/// What a Job object shows; shared between the object and the event pump.
pub(super) struct JobView {
    pub state: JobState,
    pub step: u32,
    pub total: u32,
    pub error: String,
    pub request: HashMap<String, OwnedValue>,
    pub owner: u32,
    pub outcome: Option<Outcome>,
    pub model: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    /// The connections that receive the job's signals.
    pub followers: Arc<Followers>,
}

impl JobView {
    /// A queued job's view of its resolved request.
    pub fn queued(owner: u32, request: &ResolvedRequest) -> JobView {
        JobView {
            state: JobState::Queued,
            step: 0,
            total: request.steps as u32,
            error: String::new(),
            request: keys::to_owned_dict(&request.to_request()),
            owner,
            outcome: None,
            model: request.model.clone(),
            seed: request.seed,
            width: request.width as u32,
            height: request.height as u32,
            steps: request.steps as u32,
            followers: Arc::default(),
        }
    }

    /// The view with `sender`, the connection that created the job, as its first follower.
    pub fn followed_by(self, sender: Option<&UniqueName<'_>>) -> JobView {
        JobView {
            followers: Arc::new(Followers::starting_with(sender)),
            ..self
        }
    }
}

/// A job's handles, kept by the registry until the job is retired.
pub(super) struct Entry {
    pub view: Arc<Mutex<JobView>>,
    pub done: watch::Sender<bool>,
}

/// One job on the bus.
pub struct Job {
    pub(super) view: Arc<Mutex<JobView>>,
    pub(super) done: watch::Receiver<bool>,
    pub(super) engine: Engine,
    pub(super) id: JobId,
}

impl Job {
    pub(super) fn view(&self) -> std::sync::MutexGuard<'_, JobView> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Only the owner or root passes; the caller's connection then follows the job.
    /// Returns the caller's uid.
    async fn admit(&self, conn: &Connection, header: &Header<'_>) -> Result<u32, Error> {
        let (owner, followers) = {
            let v = self.view();
            (v.owner, v.followers.clone())
        };
        followers.admit(conn, header, owner).await
    }

    /// [`Job::admit`] for a property read.
    async fn admit_read(
        &self,
        conn: &Connection,
        header: Option<&Header<'_>>,
    ) -> zbus::fdo::Result<()> {
        let (owner, followers) = {
            let v = self.view();
            (v.owner, v.followers.clone())
        };
        followers.admit_read(conn, header, owner).await
    }
}

/// An owner check's error as a property read's.
pub(super) fn property_error(e: Error) -> zbus::fdo::Error {
    match e {
        Error::AccessDenied(m) => zbus::fdo::Error::AccessDenied(m),
        other => zbus::fdo::Error::Failed(other.to_string()),
    }
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

    /// The failure message; empty unless the job failed. Only its owner or root may read
    /// it (it may quote the request).
    #[zbus(property)]
    async fn error(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<String> {
        self.admit_read(conn, header.as_ref()).await?;
        Ok(self.view().error.clone())
    }

    /// The validated request with defaults filled in; only its owner or root may read it
    /// (it holds the prompt).
    #[zbus(property(emits_changed_signal = "const"))]
    async fn request(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<HashMap<String, OwnedValue>> {
        self.admit_read(conn, header.as_ref()).await?;
        Ok(self
            .view()
            .request
            .iter()
            .filter_map(|(k, v)| v.try_clone().ok().map(|v| (k.clone(), v)))
            .collect())
    }

    /// The Unix uid of the caller that created the job; only that uid or root may read it.
    #[zbus(property)]
    async fn owner(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<u32> {
        self.admit_read(conn, header.as_ref()).await?;
        Ok(self.view().owner)
    }

    /// Replies when the job ends, with its result (or its error).
    #[zbus(out_args("result"))]
    async fn wait(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<WaitResult, Error> {
        expect_args(&header, "Wait", "")?;
        self.admit(conn, &header).await?;
        let mut done = self.done.clone();
        // The sender is kept alive by the pump until the job is retired.
        let _ = done.wait_for(|d| *d).await;
        let view = self.view();
        match view.outcome.clone() {
            Some(Outcome::Succeeded(out)) => Ok(wait_result(&view, &out)),
            Some(Outcome::Cancelled) | None => {
                Err(Error::Cancelled("the job was cancelled".into()))
            }
            Some(Outcome::Failed(failure)) => Err(failure.into()),
        }
    }

    /// Stops the job within one denoising step (a queued job at once).
    async fn cancel(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        expect_args(&header, "Cancel", "")?;
        self.admit(conn, &header).await?;
        self.engine.cancel(self.id);
        Ok(())
    }

    /// After each denoising step.
    #[zbus(signal)]
    pub(super) async fn progress(
        emitter: &SignalEmitter<'_>,
        step: u32,
        total: u32,
    ) -> zbus::Result<()>;

    /// Once, when the job ends.
    #[zbus(signal)]
    pub(super) async fn finished(emitter: &SignalEmitter<'_>, state: &str) -> zbus::Result<()>;

    /// A live preview of the job's first image after step `step` (request key
    /// `preview_every`): a PNG at most 256 pixels on its long side. Sent only to the
    /// connection that created the job; a preview that comes before the previous one was
    /// sent replaces it.
    #[zbus(signal)]
    pub(super) async fn preview(
        emitter: &SignalEmitter<'_>,
        step: u32,
        png: &[u8],
    ) -> zbus::Result<()>;
}

/// The `Wait()` reply.
fn wait_result(view: &JobView, out: &Arc<JobOutput>) -> WaitResult {
    WaitResult {
        state: view.state.as_str().to_string(),
        images: reply::Pngs(out.clone()),
        seed: view.seed,
        scheduler: out.scheduler.clone(),
        model: view.model.clone(),
        width: view.width,
        height: view.height,
        steps: view.steps,
        batch_size: out.batch_images as u32,
        device: out.device.clone(),
        timings: reply::timings(out),
    }
}
