//! Durable batch generation: a manifest in, a folder of PNGs out, resumable after any
//! crash, splittable into shards.
//!
//! By concern:
//! * [`manifest`]: reading `.jsonl`/`.txt` manifests into items (names, seeds, shards),
//!   one error per bad line; [`controls`]: a line's ControlNets and their image paths;
//! * [`store`]: batch and item state in SQLite; an item is done only once its files are
//!   in place; `schema`: the database's layout and upgrades;
//! * [`quota`]: what one uid may keep stored, and when an ended batch expires;
//! * [`files`]: output files written under a temporary name, flushed, then renamed;
//! * [`runner`]: feeds a batch's items to the job engine and records each result;
//! * [`local`]: `diffusionctl batch --local`, state kept in the output folder;
//! * [`service`]: the daemon's batches, kept in its state directory and resumed at start.

pub mod controls;
pub mod files;
mod images;
pub mod local;
pub mod manifest;
pub mod quota;
pub mod runner;
mod schema;
pub mod service;
pub mod store;

pub use manifest::{Format, Item, LineError, Manifest, ManifestError, Options, Shard};
pub use runner::{Control, End, Observer, Progress};
pub use store::{BatchId, BatchRow, BatchState, Counts, Store, StoreError};

use crate::model::Catalog;
use crate::request::{Limits, RequestError};

/// Reads a manifest and resolves every item (all shards) against the models and limits,
/// as a `Generate` call would: one error per bad line, of either kind, and nothing runs
/// when there is one. A line naming a LoRA not in its model's last folder scan reads
/// the folders again once per model, as `Generate` does (file I/O: call it off async
/// threads).
pub fn read_checked(
    bytes: &[u8],
    options: &Options,
    catalog: &Catalog,
    limits: &Limits,
) -> Result<Manifest, ManifestError> {
    let rescanned = std::cell::RefCell::new(std::collections::HashSet::new());
    manifest::parse_checked(bytes, options, |item| {
        let model = item.request.model.clone();
        match catalog.resolve(&item.request, limits) {
            Err(RequestError::UnknownLora { .. })
                if rescanned.borrow_mut().insert(model.clone()) =>
            {
                catalog.rescan_loras(model.as_deref());
                catalog.resolve(&item.request, limits).err()
            }
            other => other.err(),
        }
        .map(|e| line_error(item, e))
    })
}

fn line_error(item: &Item, e: RequestError) -> LineError {
    let (key, message) = match e {
        RequestError::Invalid { key, message } => (Some(key.to_string()), message),
        RequestError::UnknownLora { key, name, known } => (
            Some(key.to_string()),
            format!("unknown LoRA '{name}' ({known})"),
        ),
        RequestError::Control {
            index,
            field,
            message,
        } => (Some(format!("controls[{index}].{field}")), message),
        RequestError::UnknownModel { .. }
        | RequestError::ModelUnavailable { .. }
        | RequestError::NoDefaultModel => (Some("model".to_string()), e.to_string()),
        other => (None, other.to_string()),
    };
    LineError {
        line: item.line(),
        key,
        message,
    }
}

/// Why a batch could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// Bad lines; nothing ran.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The output folder holds a batch made from another manifest or other settings.
    #[error("{0}")]
    Changed(String),
    /// The batch state could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A folder or file could not be used.
    #[error("{0}")]
    Io(String),
    /// The model or the runtime could not be loaded.
    #[error("{0}")]
    Model(String),
    /// No such batch.
    #[error("no batch {0}")]
    Unknown(BatchId),
    /// The caller may not use this batch.
    #[error("{0}")]
    Denied(String),
    /// A limit refused the batch.
    #[error("{0}")]
    Limit(String),
    /// The batch has no such finished file.
    #[error("{0}")]
    NoResult(String),
}
