//! Batch objects (`/io/github/Diffusiond1/batch/<n>`): progress properties, an
//! `ItemFinished` signal per item, and `Cancel`, `Resume`, `ListResults`, `ListFailures`,
//! `OpenResult`, `Remove`. Only the owner or root may call the methods. The work is the
//! batch service's ([`crate::batch::service`]), on blocking threads; properties read a
//! view that batch events keep current, so reading one touches no disk.
//!
//! Privacy (docs/dbus-api.md): progress (`State`, `Total`, `Done`, `Failed`, the rate,
//! `DiskBytes`) is public; what the submitter sent or made (`Owner`, `Label`,
//! `ManifestHash`, `BaseSeed`, `Error`) only the owner or root may read, and the batch's
//! signals are unicast to its [`Followers`]: the submitting connection, and every
//! connection of the owner (or root) that has called a method or read an owner-only
//! property since, which is how a client that reattaches from a new connection follows.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use zbus::message::Header;
use zbus::names::UniqueName;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedFd};
use zbus::{Connection, interface};

use super::events::Followers;
use super::{Error, expect_args};
use crate::batch::service::{Events, Service, Snapshot};
use crate::batch::{BatchError, BatchId, BatchState, Progress};
use crate::wire::batch::batch_path;

/// One batch on the bus.
pub struct Batch {
    id: BatchId,
    owner: u32,
    service: Service,
    view: Arc<Mutex<Snapshot>>,
    followers: Followers,
}

/// Runs blocking batch work off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BatchError> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::StorageFailed(format!("batch task failed: {e}")))?
        .map_err(Error::from)
}

impl Batch {
    /// The object of a stored batch.
    pub fn new(service: Service, snapshot: Snapshot) -> Batch {
        Batch {
            id: snapshot.row.id,
            owner: snapshot.row.owner,
            service,
            view: Arc::new(Mutex::new(snapshot)),
            followers: Followers::default(),
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Only the owner or root passes; the caller's connection then follows the batch.
    /// Returns the caller's uid.
    async fn admit(&self, conn: &Connection, header: &Header<'_>) -> Result<u32, Error> {
        self.followers.admit(conn, header, self.owner).await
    }

    /// [`Batch::admit`] for an owner-only property.
    async fn admit_read(
        &self,
        conn: &Connection,
        header: Option<&Header<'_>>,
    ) -> zbus::fdo::Result<()> {
        self.followers.admit_read(conn, header, self.owner).await
    }
}

/// Makes `sender` (the connection that submitted, or submitted again, the batch at `path`)
/// a follower of it.
pub(super) async fn follow(
    server: &zbus::ObjectServer,
    conn: &Connection,
    path: ObjectPath<'_>,
    sender: Option<&UniqueName<'_>>,
) -> zbus::Result<()> {
    let Some(sender) = sender else {
        return Ok(());
    };
    let iface = server.interface::<_, Batch>(path).await?;
    iface.get().await.followers.add(conn, sender).await;
    Ok(())
}

#[interface(name = "io.github.Diffusiond1.Batch")]
impl Batch {
    /// `running`, `paused`, `succeeded`, `failed` (some items failed) or `cancelled`.
    #[zbus(property)]
    fn state(&self) -> String {
        self.view().row.state.as_str().to_string()
    }

    /// Why the batch paused (an output error), or ""; owner or root only.
    #[zbus(property)]
    async fn error(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<String> {
        self.admit_read(conn, header.as_ref()).await?;
        Ok(self.view().row.error.clone())
    }

    /// Items in the batch.
    #[zbus(property)]
    fn total(&self) -> u32 {
        self.view().progress.counts.total as u32
    }

    /// Items whose images are written.
    #[zbus(property)]
    fn done(&self) -> u32 {
        self.view().progress.counts.done as u32
    }

    /// Items that failed.
    #[zbus(property)]
    fn failed(&self) -> u32 {
        self.view().progress.counts.failed as u32
    }

    /// Images per second since the batch (re)started running; 0 when not running.
    #[zbus(property)]
    fn images_per_second(&self) -> f64 {
        self.view().progress.images_per_second
    }

    /// Seconds left at that rate; 0 when unknown or done.
    #[zbus(property)]
    fn eta_seconds(&self) -> f64 {
        self.view().progress.eta_seconds
    }

    /// Bytes of the batch's images in the daemon's state directory.
    #[zbus(property)]
    fn disk_bytes(&self) -> u64 {
        self.view().progress.counts.bytes
    }

    /// The uid that submitted it; owner or root only.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn owner(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<u32> {
        self.admit_read(conn, header.as_ref()).await?;
        Ok(self.owner)
    }

    /// The label given at submission (diffusionctl: the output folder); owner or root only.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn label(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<String> {
        self.admit_read(conn, header.as_ref()).await?;
        Ok(self.view().row.label.clone())
    }

    /// SHA-256 of the batch's items and shard: equal for the same manifest and settings;
    /// owner or root only.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn manifest_hash(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<String> {
        self.admit_read(conn, header.as_ref()).await?;
        Ok(self.view().row.identity.clone())
    }

    /// The base seed of lines without a seed; owner or root only.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn base_seed(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<u64> {
        self.admit_read(conn, header.as_ref()).await?;
        Ok(self.view().row.base_seed)
    }

    /// Cancels the batch: no more items run (finished images stay).
    async fn cancel(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        expect_args(&header, "Cancel", "")?;
        let uid = self.admit(conn, &header).await?;
        let (service, id) = (self.service.clone(), self.id);
        blocking(move || service.cancel(id, uid)).await
    }

    /// Resumes a batch paused by an output error.
    async fn resume(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        expect_args(&header, "Resume", "")?;
        let uid = self.admit(conn, &header).await?;
        let (service, id) = (self.service.clone(), self.id);
        blocking(move || service.resume(id, uid)).await
    }

    /// The files of finished items, in manifest order.
    #[zbus(out_args("files"))]
    async fn list_results(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<String>, Error> {
        expect_args(&header, "ListResults", "")?;
        let uid = self.admit(conn, &header).await?;
        let (service, id) = (self.service.clone(), self.id);
        let finished = blocking(move || service.results(id, uid)).await?;
        Ok(finished.into_iter().flat_map(|f| f.files).collect())
    }

    /// Failed items: (name, error).
    #[zbus(out_args("failures"))]
    async fn list_failures(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<(String, String)>, Error> {
        expect_args(&header, "ListFailures", "")?;
        let uid = self.admit(conn, &header).await?;
        let (service, id) = (self.service.clone(), self.id);
        let finished = blocking(move || service.results(id, uid)).await?;
        Ok(finished
            .into_iter()
            .filter(|f| f.files.is_empty())
            .map(|f| (f.name, f.error))
            .collect())
    }

    /// A read-only fd of one finished file: a file from `ListResults`, or the name of an
    /// item that made one image.
    #[zbus(out_args("fd"))]
    async fn open_result(
        &self,
        name: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedFd, Error> {
        expect_args(&header, "OpenResult", "s")?;
        let uid = self.admit(conn, &header).await?;
        let (service, id) = (self.service.clone(), self.id);
        let (fd, expiry) = blocking(move || service.open_result(id, uid, &name)).await?;
        if let Some(after) = expiry {
            schedule_expiry(conn.clone(), self.service.clone(), id, after);
        }
        Ok(OwnedFd::from(fd))
    }

    /// Removes the batch: cancels it if it runs, deletes its images and its state.
    async fn remove(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<(), Error> {
        expect_args(&header, "Remove", "")?;
        let uid = self.admit(conn, &header).await?;
        let (service, id) = (self.service.clone(), self.id);
        blocking(move || service.remove(id, uid)).await?;
        server.remove::<Batch, _>(batch_path(id)).await?;
        Ok(())
    }

    /// An item ended: its files are ready (`ok`), or it failed with `error`.
    #[zbus(signal)]
    async fn item_finished(
        emitter: &SignalEmitter<'_>,
        name: &str,
        ok: bool,
        error: &str,
    ) -> zbus::Result<()>;
}

/// Removes a fetched batch once its retention time has passed.
pub fn schedule_expiry(conn: Connection, service: Service, id: BatchId, after: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let removed = tokio::task::spawn_blocking(move || service.expire(id)).await;
        match removed {
            Ok(Ok(())) => {
                tracing::info!(batch = id, "fetched batch removed after its retention time");
                let _ = conn
                    .object_server()
                    .remove::<Batch, _>(batch_path(id))
                    .await;
            }
            Ok(Err(e)) => tracing::warn!(batch = id, error = %e, "could not remove a batch"),
            Err(e) => tracing::warn!(batch = id, error = %e, "could not remove a batch"),
        }
    });
}

/// What the batch service reports, on its way to the Batch objects.
#[derive(Debug)]
pub enum BatchEvent {
    /// An item ended.
    Item {
        /// The batch.
        id: BatchId,
        /// The item's name.
        name: String,
        /// Why it failed, if it did.
        error: Option<String>,
        /// Counts, rate and ETA afterwards.
        progress: Progress,
    },
    /// The state changed.
    State {
        /// The batch.
        id: BatchId,
        /// The new state.
        state: BatchState,
        /// Why, for a pause.
        error: String,
    },
}

/// [`Events`] into a channel the D-Bus side reads ([`pump_batch_events`]).
pub struct ChannelEvents(pub tokio::sync::mpsc::UnboundedSender<BatchEvent>);

impl Events for ChannelEvents {
    fn item_finished(&self, id: BatchId, name: &str, error: Option<&str>, progress: &Progress) {
        let _ = self.0.send(BatchEvent::Item {
            id,
            name: name.to_string(),
            error: error.map(str::to_string),
            progress: *progress,
        });
    }

    fn state_changed(&self, id: BatchId, state: BatchState, error: &str) {
        let _ = self.0.send(BatchEvent::State {
            id,
            state,
            error: error.to_string(),
        });
    }
}

/// Applies batch events to Batch objects (properties and signals) until the channel closes.
pub async fn pump_batch_events(
    conn: Connection,
    mut events: tokio::sync::mpsc::UnboundedReceiver<BatchEvent>,
) {
    while let Some(event) = events.recv().await {
        if let Err(e) = apply(&conn, event).await {
            tracing::debug!(error = %e, "could not publish a batch event");
        }
    }
}

async fn apply(conn: &Connection, event: BatchEvent) -> zbus::Result<()> {
    let id = match &event {
        BatchEvent::Item { id, .. } | BatchEvent::State { id, .. } => *id,
    };
    let iface = conn
        .object_server()
        .interface::<_, Batch>(batch_path(id))
        .await?;
    let batch = iface.get().await;
    // The view is updated before the followers are read: a connection that becomes one
    // after this reads the new values, one that was one gets the signals.
    match event {
        BatchEvent::Item {
            name,
            error,
            progress,
            ..
        } => {
            batch.view().progress = progress;
            let emitters = batch.followers.emitters(iface.signal_emitter());
            for emitter in &emitters {
                Batch::item_finished(
                    emitter,
                    &name,
                    error.is_none(),
                    error.as_deref().unwrap_or(""),
                )
                .await?;
                batch.done_changed(emitter).await?;
                batch.failed_changed(emitter).await?;
                batch.images_per_second_changed(emitter).await?;
                batch.eta_seconds_changed(emitter).await?;
                batch.disk_bytes_changed(emitter).await?;
            }
        }
        BatchEvent::State { state, error, .. } => {
            {
                let mut v = batch.view();
                v.row.state = state;
                v.row.error = error;
                if state.is_final() {
                    v.progress.images_per_second = 0.0;
                    v.progress.eta_seconds = 0.0;
                }
            }
            let emitters = batch.followers.emitters(iface.signal_emitter());
            for emitter in &emitters {
                batch.state_changed(emitter).await?;
                batch.error_changed(emitter).await?;
                batch.images_per_second_changed(emitter).await?;
                batch.eta_seconds_changed(emitter).await?;
            }
        }
    }
    Ok(())
}
