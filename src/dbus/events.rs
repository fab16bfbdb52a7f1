//! Engine events applied to Job objects (state, progress, signals, `Wait()` wake-ups),
//! finished jobs retired after the retention time, and the jobs of callers that leave the
//! bus cancelled.
//!
//! A job's or batch's own signals (`Progress`, `Finished`, `ItemFinished`, its
//! `PropertiesChanged`) carry what its caller sent or made, so they are unicast to its
//! [`Followers`], never broadcast (docs/dbus-api.md, "Privacy").

use std::sync::Mutex;
use std::time::Duration;

use zbus::Connection;
use zbus::names::{BusName, OwnedUniqueName, UniqueName};
use zbus::object_server::SignalEmitter;

use zbus::message::Header;

use super::job::property_error;
use super::{Error, Job, Manager, Registry, check_owner};
use crate::jobs::{Engine, Event, JobId, JobState, Outcome};
use crate::wire::{MANAGER_PATH, job_path};

/// The connections that receive one job's or batch's signals: the one that created it and
/// those of its owner (or root) that have since called one of its methods or read one of
/// its owner-only properties. Unique names are never reused on a bus, so a name that has
/// left can never receive another caller's signal; at [`Followers::MAX`] names the ones
/// that left are dropped (the oldest name goes when all are still there).
#[derive(Debug, Default)]
pub(super) struct Followers {
    names: Mutex<Vec<OwnedUniqueName>>,
}

impl Followers {
    /// Names kept per object.
    pub const MAX: usize = 16;

    /// How long asking the bus which names left may take.
    const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

    fn names(&self) -> std::sync::MutexGuard<'_, Vec<OwnedUniqueName>> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Followers starting with `first` (the creating connection), if any.
    pub fn starting_with(first: Option<&UniqueName<'_>>) -> Followers {
        Followers {
            names: Mutex::new(first.map(|n| n.to_owned().into()).into_iter().collect()),
        }
    }

    /// Only `owner` or root passes; the caller's connection then follows. Returns the
    /// caller's uid.
    pub async fn admit(
        &self,
        conn: &Connection,
        header: &Header<'_>,
        owner: u32,
    ) -> Result<u32, Error> {
        let uid = check_owner(conn, header, owner).await?;
        if let Some(sender) = header.sender() {
            self.add(conn, sender).await;
        }
        Ok(uid)
    }

    /// [`Followers::admit`] for an owner-only property: a read without a header is the
    /// daemon's own (a `PropertiesChanged` going to the followers).
    pub async fn admit_read(
        &self,
        conn: &Connection,
        header: Option<&Header<'_>>,
        owner: u32,
    ) -> zbus::fdo::Result<()> {
        match header {
            None => Ok(()),
            Some(header) => self
                .admit(conn, header, owner)
                .await
                .map(drop)
                .map_err(property_error),
        }
    }

    /// Adds `name` (a connection that passed the owner check).
    pub async fn add(&self, conn: &Connection, name: &UniqueName<'_>) {
        let full = {
            let names = self.names();
            if names.iter().any(|n| n.as_str() == name.as_str()) {
                return;
            }
            names.len() >= Self::MAX
        };
        if full {
            self.drop_departed(conn).await;
        }
        let mut names = self.names();
        if names.iter().any(|n| n.as_str() == name.as_str()) {
            return;
        }
        if names.len() >= Self::MAX {
            names.remove(0);
        }
        names.push(name.to_owned().into());
    }

    /// Drops the names that are no longer on the bus: one `ListNames`, bounded in time
    /// (when it fails, every name stays).
    async fn drop_departed(&self, conn: &Connection) {
        let listed = tokio::time::timeout(Self::CHECK_TIMEOUT, async {
            zbus::fdo::DBusProxy::new(conn).await?.list_names().await
        })
        .await;
        let Ok(Ok(present)) = listed else {
            return;
        };
        let present: std::collections::HashSet<&str> = present.iter().map(|n| n.as_str()).collect();
        self.names().retain(|n| present.contains(n.as_str()));
    }

    /// One emitter per follower, on `base`'s connection and path.
    pub fn emitters(&self, base: &SignalEmitter<'_>) -> Vec<SignalEmitter<'static>> {
        self.names()
            .iter()
            .map(|n| {
                base.to_owned()
                    .set_destination(BusName::Unique(n.clone().into()))
            })
            .collect()
    }
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
    let job = iface.get().await;
    // TotalSteps is announced only when it changes, not with every step.
    let mut total_changed = false;
    let emitters = {
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
                if let Outcome::Failed(failure) = outcome {
                    v.error = failure.to_string();
                }
                v.outcome = Some(outcome.clone());
            }
        }
        v.followers.emitters(iface.signal_emitter())
    };
    match event {
        Event::Barrier(_) => {}
        Event::Started(..) => {
            for emitter in &emitters {
                job.state_changed(emitter).await?;
            }
        }
        Event::Progress(_, step, total) => {
            for emitter in &emitters {
                job.step_changed(emitter).await?;
                if total_changed {
                    job.total_steps_changed(emitter).await?;
                }
                Job::progress(emitter, step, total).await?;
            }
        }
        Event::Finished(_, outcome) => {
            for emitter in &emitters {
                job.state_changed(emitter).await?;
                job.error_changed(emitter).await?;
                Job::finished(emitter, outcome.state().as_str()).await?;
            }
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
    registry.remove(id);
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

/// Sends the engine's previews ([`crate::pipeline::preview::PreviewHub`]) as the `Preview`
/// signal of each job's object, unicast to the connection that created the job (never to
/// another follower, never broadcast). One send at a time: a preview made meanwhile
/// replaces the unsent one of its job. Previews of jobs already removed from the bus are
/// dropped.
pub async fn pump_previews(
    conn: Connection,
    registry: Registry,
    hub: std::sync::Arc<crate::pipeline::preview::PreviewHub>,
) {
    loop {
        hub.offered().await;
        for (id, p) in hub.take() {
            if !registry.lock().contains_key(&id) {
                continue;
            }
            let Ok(name) = UniqueName::try_from(p.destination.as_str()) else {
                continue;
            };
            let sent = async {
                let emitter =
                    SignalEmitter::new(&conn, job_path(id))?.set_destination(BusName::Unique(name));
                Job::preview(&emitter, p.step, &p.png).await
            };
            if let Err(e) = sent.await {
                tracing::debug!(job = id, error = %e, "could not send a preview");
            }
        }
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
