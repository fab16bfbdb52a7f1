//! Batches through the daemon: submit (or reattach to) a batch, read its progress, and
//! copy its finished images into a folder as they complete, each written whole
//! (temporary name, fsync, rename) and only once.

use std::collections::HashMap;
use std::future::Future;

use zbus::zvariant::OwnedObjectPath;

use super::{Client, ClientError, Result, next, quick};
use crate::batch::files::Output;
use crate::batch::service::Submission;
use crate::wire::batch::{BATCH_PATH_PREFIX, batch_id, submission_dict};

pub use super::proxy::BatchProxy;

/// A batch's progress, as its properties say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchInfo {
    /// Its object path.
    pub path: String,
    /// Its state.
    pub state: String,
    /// Why it paused, or "".
    pub error: String,
    /// Items.
    pub total: u32,
    /// Items done.
    pub done: u32,
    /// Items failed.
    pub failed: u32,
    /// Images per second.
    pub images_per_second: f64,
    /// Seconds left.
    pub eta_seconds: f64,
    /// Bytes of its images on the daemon's side.
    pub disk_bytes: u64,
    /// Its label (the output folder it was submitted for).
    pub label: String,
    /// Its base seed.
    pub base_seed: u64,
    /// Its identity.
    pub manifest_hash: String,
}

impl BatchInfo {
    /// Whether the batch will not change any more by itself (ended, or paused).
    pub fn settled(&self) -> bool {
        matches!(
            self.state.as_str(),
            "succeeded" | "failed" | "cancelled" | "paused"
        )
    }
}

/// What [`Client::fetch_batch`] reports while it copies.
#[derive(Debug, Clone, PartialEq)]
pub enum FetchEvent {
    /// The batch's progress.
    Progress(BatchInfo),
    /// A file was copied into the folder.
    Copied(String),
}

/// Turns `"7"` or a batch path into the batch's object path.
pub fn batch_path(reference: &str) -> Result<OwnedObjectPath> {
    let id = batch_id(reference.trim()).ok_or_else(|| {
        ClientError::InvalidArgument(format!(
            "'{reference}' is not a batch: give its number or its object path ({BATCH_PATH_PREFIX}N)"
        ))
    })?;
    Ok(crate::wire::batch::batch_path(id))
}

impl Client {
    /// `SubmitBatch`: returns the batch's path (an existing batch's when the same manifest
    /// and settings were submitted before by this user).
    pub async fn submit_batch(
        &self,
        manifest: &[u8],
        submission: &Submission,
    ) -> Result<OwnedObjectPath> {
        quick(
            &self.bus,
            "SubmitBatch",
            self.manager
                .submit_batch(manifest, submission_dict(submission)),
        )
        .await
    }

    /// A batch proxy that caches nothing.
    pub async fn batch(&self, path: &OwnedObjectPath) -> Result<BatchProxy<'static>> {
        self.plain(path).await
    }

    /// Runs a quick call on a batch; "no such object" reads as a missing batch.
    async fn batch_call<T>(
        &self,
        path: &OwnedObjectPath,
        what: &'static str,
        call: impl Future<Output = zbus::Result<T>>,
    ) -> Result<T> {
        self.object_call(what, call, || {
            ClientError::InvalidArgument(format!("no such batch: {path}"))
        })
        .await
    }

    /// The batch's properties.
    pub async fn batch_info(&self, path: &OwnedObjectPath) -> Result<BatchInfo> {
        let b = self.batch(path).await?;
        Ok(BatchInfo {
            path: path.to_string(),
            state: self.batch_call(path, "State", b.state()).await?,
            error: self.batch_call(path, "Error", b.error()).await?,
            total: self.batch_call(path, "Total", b.total()).await?,
            done: self.batch_call(path, "Done", b.done()).await?,
            failed: self.batch_call(path, "Failed", b.failed()).await?,
            images_per_second: self
                .batch_call(path, "ImagesPerSecond", b.images_per_second())
                .await?,
            eta_seconds: self.batch_call(path, "EtaSeconds", b.eta_seconds()).await?,
            disk_bytes: self.batch_call(path, "DiskBytes", b.disk_bytes()).await?,
            label: self.batch_call(path, "Label", b.label()).await?,
            base_seed: self.batch_call(path, "BaseSeed", b.base_seed()).await?,
            manifest_hash: self
                .batch_call(path, "ManifestHash", b.manifest_hash())
                .await?,
        })
    }

    /// Every batch of the caller, with its properties.
    pub async fn batches(&self) -> Result<Vec<BatchInfo>> {
        let paths = quick(&self.bus, "ListBatches", self.manager.list_batches()).await?;
        let mut out = Vec::with_capacity(paths.len());
        for p in paths {
            match self.batch_info(&p).await {
                Ok(info) => out.push(info),
                // Removed meanwhile.
                Err(ClientError::InvalidArgument(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// `Batch.Cancel()`.
    pub async fn cancel_batch(&self, path: &OwnedObjectPath) -> Result<()> {
        let b = self.batch(path).await?;
        self.batch_call(path, "Cancel", b.cancel()).await
    }

    /// `Batch.Remove()`.
    pub async fn remove_batch(&self, path: &OwnedObjectPath) -> Result<()> {
        let b = self.batch(path).await?;
        self.batch_call(path, "Remove", b.remove()).await
    }

    /// `Batch.Resume()`.
    pub async fn resume_batch(&self, path: &OwnedObjectPath) -> Result<()> {
        let b = self.batch(path).await?;
        self.batch_call(path, "Resume", b.resume()).await
    }

    /// `Batch.ListFailures()`.
    pub async fn batch_failures(&self, path: &OwnedObjectPath) -> Result<Vec<(String, String)>> {
        let b = self.batch(path).await?;
        self.batch_call(path, "ListFailures", b.list_failures())
            .await
    }

    /// Copies one finished file into `output` (unless it is there already).
    async fn copy_result(
        &self,
        batch: &BatchProxy<'_>,
        path: &OwnedObjectPath,
        output: &Output,
        file: &str,
    ) -> Result<bool> {
        if output.exists(file) {
            return Ok(false);
        }
        let fd = self
            .batch_call(path, "OpenResult", batch.open_result(file))
            .await?;
        let fd: std::os::fd::OwnedFd = fd.into();
        let (output, name) = (output.clone(), file.to_string());
        let target = output.path(file);
        tokio::task::spawn_blocking(move || {
            let mut f = std::fs::File::from(fd);
            output.copy_from(&name, &mut f)
        })
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))?
        .map_err(|source| ClientError::Io {
            path: target,
            source,
        })?;
        Ok(true)
    }

    /// Copies the batch's finished images into `output` as they complete, until the batch
    /// ends or pauses, or `interrupt` completes (then it returns
    /// [`ClientError::Interrupted`], leaving the batch running). `files` names each item's
    /// files, so an `ItemFinished` signal needs no listing. Files already in the folder are
    /// not copied again.
    pub async fn fetch_batch(
        &self,
        path: &OwnedObjectPath,
        output: &Output,
        files: &HashMap<String, Vec<String>>,
        mut on_event: impl FnMut(FetchEvent),
        interrupt: impl Future<Output = ()>,
    ) -> Result<BatchInfo> {
        let map = |e: zbus::Error| ClientError::from_zbus(&self.bus, e);
        let batch = self.batch(path).await?;
        // Subscribe first, then list: no item is missed between the two. ListResults also
        // makes this connection one the daemon sends the batch's signals to (they are
        // unicast to the owner's connections that use the batch: docs/dbus-api.md).
        let mut items = batch.receive_item_finished().await.map_err(map)?;
        // The batch's PropertiesChanged as a plain signal stream: a proxy that caches
        // nothing (as this one) yields no `receive_state_changed` events, and a wait for the
        // final state after the last item's signal would never end.
        let properties = zbus::fdo::PropertiesProxy::builder(batch.inner().connection())
            .destination(crate::wire::BUS_NAME)
            .map_err(map)?
            .path(path.clone())
            .map_err(map)?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(map)?;
        let mut states = properties.receive_properties_changed().await.map_err(map)?;
        let listed = self
            .batch_call(path, "ListResults", batch.list_results())
            .await?;
        for file in listed {
            if self.copy_result(&batch, path, output, &file).await? {
                on_event(FetchEvent::Copied(file));
            }
        }
        let mut info = self.batch_info(path).await?;
        on_event(FetchEvent::Progress(info.clone()));
        tokio::pin!(interrupt);
        while !info.settled() {
            tokio::select! {
                Some(signal) = next(&mut items) => {
                    let Ok(args) = signal.args() else { continue };
                    if args.ok {
                        for file in files.get(args.name).into_iter().flatten() {
                            if self.copy_result(&batch, path, output, file).await? {
                                on_event(FetchEvent::Copied(file.clone()));
                            }
                        }
                    }
                }
                Some(_) = next(&mut states) => {}
                () = &mut interrupt => {
                    return Err(ClientError::Interrupted { cancelled: false });
                }
            }
            info = self.batch_info(path).await?;
            on_event(FetchEvent::Progress(info.clone()));
        }
        // The last items may have finished just before the state changed.
        let listed = self
            .batch_call(path, "ListResults", batch.list_results())
            .await?;
        for file in listed {
            if self.copy_result(&batch, path, output, &file).await? {
                on_event(FetchEvent::Copied(file));
            }
        }
        Ok(info)
    }
}
