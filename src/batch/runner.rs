//! The batch runner: feeds a batch's pending items to the job engine as background jobs,
//! a window at a time, writes each finished item's PNGs into place and marks it done.
//! The same runner serves `diffusionctl batch --local` (an engine in the client process)
//! and the daemon (its one engine, shared with interactive jobs, which run first).
//!
//! Only a window of about two UNet batches is in the engine's queue at once, so a 10,000
//! item batch is not 10,000 queue entries, and an interactive job waits for at most the
//! UNet batch that is running.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::files::Output;
use super::store::{BatchId, BatchState, Counts, PendingItem, Store, StoreError};
use crate::jobs::{Engine, EngineError, JobId, Outcome, QueuedJob};
use crate::model::Catalog;
use crate::request::{GenerateRequest, Limits, ResolvedRequest};
use crate::wire::keys;

/// How far a batch has come, for progress bars and the D-Bus properties.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Progress {
    /// Item counts.
    pub counts: Counts,
    /// Images per second since this run started.
    pub images_per_second: f64,
    /// Seconds left at that rate (0 when unknown or done).
    pub eta_seconds: f64,
}

/// Told about each finished item.
pub trait Observer: Send + Sync {
    /// Item `name` ended: its files are in place (`error` is `None`) or it failed.
    fn item_finished(&self, batch: BatchId, name: &str, error: Option<&str>, progress: &Progress);
}

/// An observer that ignores everything.
impl Observer for () {
    fn item_finished(&self, _: BatchId, _: &str, _: Option<&str>, _: &Progress) {}
}

/// Stops a batch run from another thread, and says when it has ended.
#[derive(Debug, Default)]
pub struct Control {
    cancelled: AtomicBool,
    stopped: AtomicBool,
    in_flight: Mutex<HashSet<JobId>>,
    /// Set once the run writes no more files.
    ended: Mutex<bool>,
    ended_signal: std::sync::Condvar,
}

impl Control {
    /// The run writes no more files (its output is closed).
    pub fn mark_ended(&self) {
        *self.ended.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.ended_signal.notify_all();
    }

    /// Waits until the run has ended, at most `timeout`; whether it has.
    pub fn wait_ended(&self, timeout: std::time::Duration) -> bool {
        let ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        let (ended, _) = self
            .ended_signal
            .wait_timeout_while(ended, timeout, |ended| !*ended)
            .unwrap_or_else(|e| e.into_inner());
        *ended
    }

    /// Cancels the batch: no more items start, those in the engine are cancelled.
    pub fn cancel(&self, engine: &Engine) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.cancel_in_flight(engine);
    }

    /// Stops this run without cancelling the batch (its pending items stay pending).
    pub fn stop(&self, engine: &Engine) {
        self.stopped.store(true, Ordering::SeqCst);
        self.cancel_in_flight(engine);
    }

    fn cancel_in_flight(&self, engine: &Engine) {
        let ids: Vec<JobId> = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        for id in ids {
            engine.cancel(id);
        }
    }

    /// Whether the batch was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    fn halted(&self) -> bool {
        self.is_cancelled() || self.stopped.load(Ordering::SeqCst)
    }

    fn track(&self, id: JobId, on: bool) {
        let mut set = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            set.insert(id);
        } else {
            set.remove(&id);
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// Every item ended; the batch is succeeded or failed.
    Finished(BatchState),
    /// Cancelled by its owner.
    Cancelled,
    /// Paused by an output error; the message says which file and why.
    Paused(String),
    /// Stopped (Ctrl-C, daemon shutdown); pending items run on the next run.
    Stopped,
}

/// One batch's run: everything it works with.
pub struct Runner<'a> {
    /// The engine items run on.
    pub engine: &'a Engine,
    /// The models, to resolve items against.
    pub catalog: &'a Catalog,
    /// The limits items are resolved under.
    pub limits: &'a Limits,
    /// The batch state.
    pub store: &'a Mutex<Store>,
    /// Where finished images go.
    pub output: &'a Output,
    /// Told about each finished item.
    pub observer: &'a dyn Observer,
    /// Cancels or stops the run.
    pub control: &'a Control,
    /// Images in the engine at once (about two UNet batches per worker).
    pub window: usize,
    /// Bytes the owner's stored batches may take (`limits.max_stored_bytes_per_caller`;
    /// `u64::MAX`: no bound): past it the batch pauses, saying so.
    pub stored_bytes_limit: u64,
}

/// An item ready to submit.
struct Ready {
    item: PendingItem,
    request: ResolvedRequest,
    /// Files of this item already in place, written before a crash: complete (they were
    /// renamed into place) and the same image, so they are kept, never written again.
    kept: Vec<bool>,
}

/// Reads a stored item's canonical line back into a request.
pub fn stored_request(item: &PendingItem) -> Result<GenerateRequest, String> {
    let value: serde_json::Value =
        serde_json::from_str(&item.request).map_err(|e| format!("stored item: {e}"))?;
    let object = value
        .as_object()
        .ok_or_else(|| "stored item is not an object".to_string())?;
    let (mut request, _, errors) = keys::from_json(object, super::manifest::STORED_EXTRA_KEYS);
    if let Some((k, m)) = errors.first() {
        return Err(format!("stored item: '{k}': {m}"));
    }
    super::manifest::read_stored_images(object, &mut request)?;
    Ok(request)
}

impl Runner<'_> {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the batch's pending items until none is left, or it is cancelled, paused or
    /// stopped. `resumed`: items whose files are all in place already (written before a
    /// crash, not yet marked) are marked done without running again, and an item with
    /// some of its files in place runs again but writes only the missing ones.
    pub fn run(&self, id: BatchId, owner: u32, resumed: bool) -> Result<End, StoreError> {
        let pending = self.store().pending(id)?;
        // Counted here from the store's start, not queried per item (only this runner
        // changes the batch's items while it runs).
        let mut tally = Tally::new(self.store().counts(id)?);
        let mut queue = VecDeque::new();
        for item in pending {
            let request = stored_request(&item).and_then(|r| {
                self.catalog
                    .resolve(&r, self.limits)
                    .map_err(|e| e.to_string())
            });
            match request {
                Ok(request) => {
                    let files = super::manifest::file_names(&item.name, request.num_images);
                    let kept: Vec<bool> = files
                        .iter()
                        .map(|f| resumed && self.output.exists(f))
                        .collect();
                    if kept.iter().all(|&k| k) {
                        let bytes = files
                            .iter()
                            .filter_map(|f| std::fs::metadata(self.output.path(f)).ok())
                            .map(|m| m.len())
                            .sum();
                        self.store().mark_done(id, item.index, bytes)?;
                        tally.resumed(request.num_images, bytes);
                        continue;
                    }
                    queue.push_back(Ready {
                        item,
                        request,
                        kept,
                    });
                }
                Err(message) => {
                    self.store().mark_failed(id, item.index, &message)?;
                    let images = stored_images(&item);
                    let p = tally.failed(images);
                    self.observer
                        .item_finished(id, &item.name, Some(&message), &p);
                }
            }
        }
        // Compatible items next to each other, so they share UNet batches.
        queue.make_contiguous().sort_by(|a, b| {
            let key = |r: &Ready| (r.request.model.clone(), r.request.batch_key(), r.item.index);
            key(a)
                .partial_cmp(&key(b))
                .unwrap_or(std::cmp::Ordering::Equal)
        });

        let (tx, rx) = std::sync::mpsc::channel();
        let mut in_flight: HashMap<JobId, (PendingItem, usize, Vec<bool>)> = HashMap::new();
        let mut images_in_flight = 0usize;
        let mut paused: Option<String> = self.over_quota(owner)?;
        let mut stopped = false;
        loop {
            while paused.is_none() && !stopped && !self.control.halted() {
                let fits = in_flight.is_empty()
                    || queue
                        .front()
                        .is_some_and(|r| images_in_flight + r.request.num_images <= self.window);
                if !fits {
                    break;
                }
                let Some(ready) = queue.pop_front() else {
                    break;
                };
                let job = self.engine.next_id();
                let images = ready.request.num_images;
                let submitted = self.engine.submit(QueuedJob {
                    id: job,
                    owner,
                    sender: None,
                    request: ready.request,
                    output_fds: Vec::new(),
                    queued_at: Instant::now(),
                    background: true,
                    reply: Some(tx.clone()),
                });
                match submitted {
                    Ok(()) => {
                        self.control.track(job, true);
                        images_in_flight += images;
                        in_flight.insert(job, (ready.item, images, ready.kept));
                    }
                    Err(EngineError::ShuttingDown) => stopped = true,
                    Err(e) => {
                        let message = e.to_string();
                        self.store().mark_failed(id, ready.item.index, &message)?;
                        let p = tally.failed(images);
                        self.observer
                            .item_finished(id, &ready.item.name, Some(&message), &p);
                    }
                }
            }
            if in_flight.is_empty() {
                break;
            }
            // Every submitted job reports exactly once; `tx` lives here, so this ends.
            let Ok((job, outcome)) = rx.recv() else { break };
            self.control.track(job, false);
            let Some((item, images, kept)) = in_flight.remove(&job) else {
                continue;
            };
            images_in_flight -= images;
            match outcome {
                Outcome::Succeeded(out) => {
                    let files = super::manifest::file_names(&item.name, images);
                    let mut bytes = 0;
                    let mut failed = None;
                    for ((file, png), &kept) in files.iter().zip(&out.pngs).zip(&kept) {
                        if kept {
                            bytes += std::fs::metadata(self.output.path(file))
                                .map_or(png.len() as u64, |m| m.len());
                            continue;
                        }
                        match self.output.write(file, png) {
                            Ok(n) => bytes += n,
                            Err(e) => {
                                failed = Some(format!(
                                    "cannot write {}: {e}",
                                    self.output.path(file).display()
                                ));
                                break;
                            }
                        }
                    }
                    match failed {
                        // The item stays pending; the batch pauses, and nothing is lost.
                        Some(message) => {
                            tracing::error!(batch = id, error = %message, "batch paused");
                            paused.get_or_insert(message);
                        }
                        None => {
                            self.store().mark_done(id, item.index, bytes)?;
                            let p = tally.done(images, bytes);
                            self.observer.item_finished(id, &item.name, None, &p);
                            if paused.is_none() {
                                paused = self.over_quota(owner)?;
                            }
                        }
                    }
                }
                Outcome::Failed(failure) => {
                    let message = failure.to_string();
                    self.store().mark_failed(id, item.index, &message)?;
                    let p = tally.failed(images);
                    self.observer
                        .item_finished(id, &item.name, Some(&message), &p);
                }
                // Cancelled by the batch's owner, a stop, or the engine shutting down:
                // the item stays pending.
                Outcome::Cancelled => {
                    if !self.control.is_cancelled() {
                        stopped = true;
                    }
                }
            }
        }
        let end = if self.control.is_cancelled() {
            self.store().set_state(id, BatchState::Cancelled, "")?;
            End::Cancelled
        } else if let Some(message) = paused {
            self.store().set_state(id, BatchState::Paused, &message)?;
            End::Paused(message)
        } else if stopped || self.control.halted() || !queue.is_empty() {
            End::Stopped
        } else {
            let state = if tally.counts.failed > 0 {
                BatchState::Failed
            } else {
                BatchState::Succeeded
            };
            self.store().set_state(id, state, "")?;
            End::Finished(state)
        };
        Ok(end)
    }

    /// Why the batch must pause for its owner's stored bytes, if it must.
    fn over_quota(&self, owner: u32) -> Result<Option<String>, StoreError> {
        if self.stored_bytes_limit == u64::MAX {
            return Ok(None);
        }
        let used = self.store().usage(owner)?.bytes;
        Ok((used > self.stored_bytes_limit).then(|| {
            format!(
                "your batches take {used} bytes of the daemon's state, past limits.max_stored_bytes_per_caller = {}; \
                 remove batches you no longer need (diffusionctl batch remove N), then resume this one",
                self.stored_bytes_limit
            )
        }))
    }
}

/// A batch's counts as this run changes them, and its rate.
struct Tally {
    counts: Counts,
    started: Instant,
    images_this_run: u64,
}

impl Tally {
    fn new(counts: Counts) -> Tally {
        Tally {
            counts,
            started: Instant::now(),
            images_this_run: 0,
        }
    }

    /// An item's files were found in place from an earlier run.
    fn resumed(&mut self, images: usize, bytes: u64) {
        self.counts.done += 1;
        self.counts.images_left = self.counts.images_left.saturating_sub(images as u64);
        self.counts.images_done += images as u64;
        self.counts.bytes += bytes;
    }

    /// An item was made now.
    fn done(&mut self, images: usize, bytes: u64) -> Progress {
        self.resumed(images, bytes);
        self.images_this_run += images as u64;
        self.progress()
    }

    /// An item failed.
    fn failed(&mut self, images: usize) -> Progress {
        self.counts.failed += 1;
        self.counts.images_left = self.counts.images_left.saturating_sub(images as u64);
        self.progress()
    }

    fn progress(&self) -> Progress {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            self.images_this_run as f64 / secs
        } else {
            0.0
        };
        let eta = if rate > 0.0 {
            self.counts.images_left as f64 / rate
        } else {
            0.0
        };
        Progress {
            counts: self.counts,
            images_per_second: rate,
            eta_seconds: eta,
        }
    }
}

/// Images of a stored item (from its line; 1 when unreadable).
fn stored_images(item: &PendingItem) -> usize {
    stored_request(item)
        .ok()
        .and_then(|r| r.num_images)
        .map_or(1, |n| n as usize)
}
