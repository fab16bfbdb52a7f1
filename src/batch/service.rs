//! The daemon's batches: kept in SQLite in its state directory (`batches.sqlite`, WAL),
//! their images in `batches/<id>/`, resumed when the daemon starts. Each running batch has
//! a runner thread feeding the daemon's one engine, behind interactive jobs.
//!
//! Each uid's stored batches are bounded ([`super::quota`]); an ended batch is removed
//! after its retention time ([`Service::expired`]), a cancelled one's unrun items at once.
//!
//! Every method here touches the disk: the D-Bus layer calls them on blocking threads.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::files::Output;
use super::manifest::{Format, Manifest, Options, Shard};
use super::quota::{self, Quota, Retention};
use super::runner::{Control, End, Observer, Progress, Runner};
use super::store::{Admitted, BatchId, BatchRow, BatchState, Counts, Finished, NewBatch, Store};
use super::{BatchError, read_checked};
use crate::jobs::Engine;
use crate::model::Catalog;
use crate::request::{GenerateRequest, Limits, random_seed};

/// What `SubmitBatch` asks for besides the manifest bytes.
#[derive(Debug, Clone)]
pub struct Submission {
    /// How to read the manifest.
    pub format: Format,
    /// Values for keys lines leave out.
    pub defaults: GenerateRequest,
    /// Base seed of lines without one; random when `None`.
    pub base_seed: Option<u64>,
    /// The items to run.
    pub shard: Shard,
    /// A label for listings (the client's output folder).
    pub label: String,
}

/// Batch limits and lifetimes (`[limits]` and `[jobs]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// Most items in one batch (`limits.max_batch_items`).
    pub max_items: usize,
    /// Per-uid bounds on stored batches (`limits.max_batches_per_caller`,
    /// `limits.max_stored_batches_per_caller`, `limits.max_stored_bytes_per_caller`).
    pub quota: Quota,
    /// How long ended batches stay (`jobs.batch_retention_secs`,
    /// `jobs.unfetched_batch_retention_secs`).
    pub retention: Retention,
    /// Images in the engine at once per batch (2 × `jobs.max_batch_images` × workers).
    pub window: usize,
}

/// A batch as the D-Bus object shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The stored row.
    pub row: BatchRow,
    /// Counts, rate and ETA.
    pub progress: Progress,
}

/// Batch events for the D-Bus layer.
pub trait Events: Send + Sync {
    /// An item ended.
    fn item_finished(&self, batch: BatchId, name: &str, error: Option<&str>, progress: &Progress);
    /// The batch's state changed.
    fn state_changed(&self, batch: BatchId, state: BatchState, error: &str);
}

struct Inner {
    store: Mutex<Store>,
    engine: Engine,
    catalog: Arc<Catalog>,
    limits: Limits,
    root: PathBuf,
    settings: BatchSettings,
    runs: Mutex<HashMap<BatchId, Arc<Control>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// How many batches run, for whoever waits for the daemon to be idle.
    active: tokio::sync::watch::Sender<usize>,
    rates: Mutex<HashMap<BatchId, Progress>>,
    events: Arc<dyn Events>,
}

/// The daemon's batches (a cheap handle).
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

/// Forwards the runner's item events, remembering the latest rate and ETA.
struct Forward(Arc<Inner>);

impl Observer for Forward {
    fn item_finished(&self, batch: BatchId, name: &str, error: Option<&str>, progress: &Progress) {
        self.0
            .rates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(batch, *progress);
        self.0.events.item_finished(batch, name, error, progress);
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The longest `Remove` waits for a running batch's runner to stop.
const REMOVE_WAIT: Duration = Duration::from_secs(30);

impl Service {
    /// Opens (creating) the state under `root`; [`Service::resume_unfinished`] starts the
    /// batches a stopped daemon left unfinished.
    pub fn open(
        root: &Path,
        engine: Engine,
        catalog: Arc<Catalog>,
        limits: Limits,
        settings: BatchSettings,
        events: Arc<dyn Events>,
    ) -> Result<Service, BatchError> {
        std::fs::create_dir_all(root.join("batches"))
            .map_err(|e| BatchError::Io(format!("cannot create {}: {e}", root.display())))?;
        let store = Store::open(&root.join("batches.sqlite"))?;
        let service = Service {
            inner: Arc::new(Inner {
                store: Mutex::new(store),
                engine,
                catalog,
                limits,
                root: root.to_path_buf(),
                settings,
                runs: Mutex::new(HashMap::new()),
                threads: Mutex::new(Vec::new()),
                active: tokio::sync::watch::Sender::new(0),
                rates: Mutex::new(HashMap::new()),
                events,
            }),
        };
        let rows = service.store().listing()?;
        let bytes: u64 = rows.iter().map(|(_, c)| c.bytes).sum();
        tracing::info!(
            batches = rows.len(),
            disk = %crate::request::resolve_gib(bytes),
            database = %crate::request::resolve_gib(service.store().file_bytes()),
            dir = %root.display(),
            "batch state opened"
        );
        Ok(service)
    }

    /// Starts every batch that was running when the daemon stopped (or died).
    pub fn resume_unfinished(&self) -> Result<usize, BatchError> {
        let rows = self.batches()?;
        let mut n = 0;
        for row in rows.iter().filter(|r| r.state == BatchState::Running) {
            tracing::info!(batch = row.id, "resuming an unfinished batch");
            self.spawn(row.id, row.owner, true);
            n += 1;
        }
        Ok(n)
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.inner.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The folder of a batch's images.
    fn dir(&self, id: BatchId) -> PathBuf {
        self.inner.root.join("batches").join(id.to_string())
    }

    /// Every stored batch.
    pub fn batches(&self) -> Result<Vec<BatchRow>, BatchError> {
        Ok(self.store().batches()?)
    }

    /// The number of running batches, published on every change.
    pub fn running(&self) -> tokio::sync::watch::Receiver<usize> {
        self.inner.active.subscribe()
    }

    fn set_run(&self, id: BatchId, control: Option<Arc<Control>>) {
        let mut runs = self.inner.runs.lock().unwrap_or_else(|e| e.into_inner());
        match control {
            Some(c) => runs.insert(id, c),
            None => runs.remove(&id),
        };
        self.inner.active.send_replace(runs.len());
    }

    /// Reads, validates and stores a batch for `owner`, and starts it. A batch of the
    /// same owner with the same identity (same manifest, settings and shard) is not
    /// made twice: its number is returned (`false`), and it resumes if it was paused.
    /// Past the owner's quota ([`BatchSettings::quota`]) it is refused
    /// ([`BatchError::Limit`], naming the key); the check and the insert are one
    /// transaction ([`Store::admit`]).
    pub fn submit(
        &self,
        owner: u32,
        manifest: &[u8],
        submission: &Submission,
    ) -> Result<(BatchId, bool), BatchError> {
        let options = Options {
            format: submission.format,
            defaults: submission.defaults.clone(),
            base_seed: submission.base_seed.unwrap_or_else(random_seed),
            shard: submission.shard,
            max_items: self.inner.settings.max_items,
            base_dir: None,
        };
        let parsed = read_checked(manifest, &options, &self.inner.catalog, &self.inner.limits)?;
        let id = self.inner.engine.next_id();
        // The shard's items, moved out of the manifest (no second copy of a large one).
        let Manifest {
            items,
            shard,
            identity,
        } = parsed;
        let items: Vec<_> = items.into_iter().filter(|i| shard.holds(i.index)).collect();
        let batch = NewBatch {
            id,
            owner,
            identity: &identity,
            label: &submission.label,
            base_seed: options.base_seed,
            items: &items,
        };
        // One transaction under the store's lock: the owner's count and the insert.
        let admitted = self.store().admit(&batch, &self.inner.settings.quota)?;
        match admitted {
            Admitted::Created => {
                self.spawn(id, owner, false);
                Ok((id, true))
            }
            Admitted::Existing(row) => {
                if row.state == BatchState::Paused {
                    self.resume(row.id, owner)?;
                }
                Ok((row.id, false))
            }
            Admitted::Refused(e) => Err(BatchError::Limit(e.to_string())),
        }
    }

    /// The batch, when `caller` may act on it (its owner, or root).
    pub fn owned(&self, id: BatchId, caller: u32) -> Result<BatchRow, BatchError> {
        let row = self.store().batch(id)?.ok_or(BatchError::Unknown(id))?;
        if caller != 0 && caller != row.owner {
            return Err(BatchError::Denied(format!(
                "batch {id} belongs to uid {}; only its owner or root may use it",
                row.owner
            )));
        }
        Ok(row)
    }

    /// Its row, counts, rate and ETA.
    pub fn snapshot(&self, id: BatchId) -> Result<Snapshot, BatchError> {
        let row = self.store().batch(id)?.ok_or(BatchError::Unknown(id))?;
        let counts = self.store().counts(id)?;
        let running = self
            .inner
            .runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&id);
        let mut progress = self
            .inner
            .rates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .copied()
            .filter(|_| running)
            .unwrap_or_default();
        progress.counts = counts;
        Ok(Snapshot { row, progress })
    }

    /// Cancels a batch: no more of its items run.
    pub fn cancel(&self, id: BatchId, caller: u32) -> Result<(), BatchError> {
        let row = self.owned(id, caller)?;
        if row.state.is_final() {
            return Ok(());
        }
        let control = self.control(id);
        match control {
            Some(c) => c.cancel(&self.inner.engine),
            None => {
                self.store().set_state(id, BatchState::Cancelled, "")?;
                self.store().prune_cancelled(id)?;
                self.inner
                    .events
                    .state_changed(id, BatchState::Cancelled, "");
            }
        }
        Ok(())
    }

    /// Resumes a paused batch.
    pub fn resume(&self, id: BatchId, caller: u32) -> Result<(), BatchError> {
        let row = self.owned(id, caller)?;
        if row.state == BatchState::Paused && self.control(id).is_none() {
            self.store().set_state(id, BatchState::Running, "")?;
            self.inner.events.state_changed(id, BatchState::Running, "");
            self.spawn(id, row.owner, true);
        }
        Ok(())
    }

    /// Finished items: files of those done, errors of those failed.
    pub fn results(&self, id: BatchId, caller: u32) -> Result<Vec<Finished>, BatchError> {
        self.owned(id, caller)?;
        Ok(self.store().finished(id)?)
    }

    /// A read-only fd of one finished file. Returns the fd, and the retention time left
    /// when this was the batch's last file not yet fetched.
    pub fn open_result(
        &self,
        id: BatchId,
        caller: u32,
        file: &str,
    ) -> Result<(OwnedFd, Option<Duration>), BatchError> {
        self.owned(id, caller)?;
        let finished = self.store().finished(id)?;
        // A file from ListResults, or the name of an item that made one file.
        let (item, file) = finished
            .iter()
            .find_map(|f| f.files.iter().find(|x| *x == file).map(|x| (f, x)))
            .or_else(|| {
                finished
                    .iter()
                    .find(|f| f.name == file && f.files.len() == 1)
                    .map(|f| (f, &f.files[0]))
            })
            .ok_or_else(|| {
                BatchError::NoResult(format!(
                    "batch {id} has no finished file '{}' (ListResults names them)",
                    crate::wire::error::echo(file)
                ))
            })?;
        let path = self.dir(id).join(file);
        let f = super::files::open_finished(&path)
            .map_err(|e| BatchError::Io(format!("cannot open {}: {e}", path.display())))?;
        let fetched = self.store().mark_fetched(id, &item.name)?;
        let expiry =
            fetched.then(|| Duration::from_secs(self.inner.settings.retention.fetched_secs));
        Ok((OwnedFd::from(f), expiry))
    }

    /// Ended batches, with the retention time each has left ([`quota::expires_at`]).
    pub fn expiring(&self) -> Result<Vec<(BatchId, Duration)>, BatchError> {
        let now = now_secs();
        let retention = self.inner.settings.retention;
        Ok(self
            .batches()?
            .into_iter()
            .filter_map(|r| {
                quota::expires_at(r.ended_at, r.fetched_at, &retention)
                    .map(|t| (r.id, Duration::from_secs(t.saturating_sub(now))))
            })
            .collect())
    }

    /// Ended batches whose retention time has passed (to [`Service::expire`]).
    pub fn expired(&self) -> Result<Vec<BatchId>, BatchError> {
        Ok(self
            .expiring()?
            .into_iter()
            .filter(|(_, left)| left.is_zero())
            .map(|(id, _)| id)
            .collect())
    }

    /// How often [`Service::expired`] is worth asking: a tenth of the shortest retention
    /// time, between 1 s and 10 minutes.
    pub fn sweep_interval(&self) -> Duration {
        let r = self.inner.settings.retention;
        Duration::from_secs((r.fetched_secs.min(r.unfetched_secs) / 10).clamp(1, 600))
    }

    /// Removes a batch: cancels it if it runs, deletes its images and its state.
    pub fn remove(&self, id: BatchId, caller: u32) -> Result<(), BatchError> {
        self.owned(id, caller)?;
        self.expire(id)
    }

    /// Removes a batch whatever its owner (retention).
    ///
    /// A running batch is cancelled first, and its runner waited for (at most
    /// [`REMOVE_WAIT`]): `Remove` right after `Cancel` must not race an item's files.
    pub fn expire(&self, id: BatchId) -> Result<(), BatchError> {
        if let Some(c) = self.control(id) {
            c.cancel(&self.inner.engine);
            // The runner ends within a step; its files must be written (or not) before
            // the folder goes, or a file written meanwhile makes the removal fail.
            if !c.wait_ended(REMOVE_WAIT) {
                return Err(BatchError::Io(format!(
                    "batch {id} is still stopping after {} s; remove it again",
                    REMOVE_WAIT.as_secs()
                )));
            }
        }
        let dir = self.dir(id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(BatchError::Io(format!(
                    "cannot remove {}: {e}",
                    dir.display()
                )));
            }
            _ => {}
        }
        self.store().remove(id)?;
        // A batch's requests, rows and buffers were many small allocations: hand the
        // pages they leave back to the system.
        crate::heap::give_back();
        Ok(())
    }

    /// Item counts (for `DiskBytes` and listings).
    pub fn counts(&self, id: BatchId) -> Result<Counts, BatchError> {
        Ok(self.store().counts(id)?)
    }

    /// Stops every runner and waits for their threads (daemon shutdown); their batches
    /// resume at the next start.
    pub fn stop_all(&self) {
        let controls: Vec<Arc<Control>> = self
            .inner
            .runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for c in controls {
            c.stop(&self.inner.engine);
        }
        let threads =
            std::mem::take(&mut *self.inner.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }

    fn control(&self, id: BatchId) -> Option<Arc<Control>> {
        self.inner
            .runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// Starts the runner thread of a batch.
    fn spawn(&self, id: BatchId, owner: u32, resumed: bool) {
        let control = Arc::new(Control::default());
        self.set_run(id, Some(control.clone()));
        let service = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("batch-{id}"))
            .spawn(move || service.run(id, owner, resumed, &control));
        match spawned {
            Ok(handle) => {
                let mut threads = self.inner.threads.lock().unwrap_or_else(|e| e.into_inner());
                threads.retain(|t| !t.is_finished());
                threads.push(handle);
            }
            Err(e) => {
                tracing::error!(batch = id, error = %e, "cannot start a batch thread");
                self.set_run(id, None);
            }
        }
    }

    fn run(&self, id: BatchId, owner: u32, resumed: bool, control: &Control) {
        let dir = self.dir(id);
        let tmp = self.inner.root.join("batches").join(format!(".{id}.tmp"));
        let end = match Output::open(&dir, &tmp) {
            Ok(output) => {
                let observer = Forward(self.inner.clone());
                let runner = Runner {
                    engine: &self.inner.engine,
                    catalog: &self.inner.catalog,
                    limits: &self.inner.limits,
                    store: &self.inner.store,
                    output: &output,
                    observer: &observer,
                    control,
                    window: self.inner.settings.window,
                    stored_bytes_limit: self.inner.settings.quota.bytes,
                };
                let end = runner.run(id, owner, resumed);
                output.close();
                control.mark_ended();
                end.map_err(|e| e.to_string())
            }
            Err(e) => {
                control.mark_ended();
                let message = format!("cannot use {}: {e}", dir.display());
                let _ = self.store().set_state(id, BatchState::Paused, &message);
                Ok(End::Paused(message))
            }
        };
        self.set_run(id, None);
        let (state, error) = match end {
            Ok(End::Finished(state)) => (state, String::new()),
            Ok(End::Cancelled) => {
                if let Err(e) = self.store().prune_cancelled(id) {
                    tracing::warn!(batch = id, error = %e, "could not delete a cancelled batch's items");
                }
                (BatchState::Cancelled, String::new())
            }
            Ok(End::Paused(message)) => (BatchState::Paused, message),
            Ok(End::Stopped) => {
                tracing::info!(batch = id, "batch stopped; it resumes at the next start");
                return;
            }
            Err(message) => {
                tracing::error!(batch = id, error = %message, "batch state could not be written");
                (BatchState::Paused, message)
            }
        };
        tracing::info!(batch = id, state = state.as_str(), "batch ended");
        self.inner.events.state_changed(id, state, &error);
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
