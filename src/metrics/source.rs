//! Where the daemon's gauges come from: the engine (queue, running jobs, loaded models),
//! the catalog (each model's estimated memory), the budget, the batch store and the
//! workers' providers. One [`Source`] serves both `Manager.Metrics()` and the textfile.

use std::sync::Arc;

use super::{BatchItems, Gauges, ModelGauge};
use crate::batch::service::Service;
use crate::jobs::Engine;
use crate::model::Catalog;

/// What the metrics text is made from.
#[derive(Clone)]
pub struct Source {
    /// The job engine.
    pub engine: Engine,
    /// The configured models.
    pub catalog: Arc<Catalog>,
    /// The memory budget, when there is one.
    pub memory_budget: Option<u64>,
    /// Execution providers in use, in order.
    pub providers: Vec<String>,
    /// The batch store, when batches are available.
    pub batches: Option<Service>,
}

impl Source {
    /// The gauges now; the batch store is read off the async threads.
    pub async fn gauges(&self) -> Gauges {
        let (queued, running, loaded) = self.engine.load_figures();
        let models = loaded
            .into_iter()
            .map(|(name, loaded_workers)| ModelGauge {
                memory_bytes: model_memory_bytes(&self.catalog, &name, loaded_workers),
                name,
                loaded_workers,
            })
            .collect();
        let batch_items = match self.batches.clone() {
            Some(service) => tokio::task::spawn_blocking(move || batch_items(&service))
                .await
                .ok()
                .flatten(),
            None => None,
        };
        Gauges {
            queued,
            running,
            models,
            memory_budget: self.memory_budget,
            batch_items,
            workers: self
                .engine
                .devices()
                .iter()
                .map(|d| (d.clone(), super::worker_provider(d, &self.providers)))
                .collect(),
        }
    }

    /// The metrics text now.
    pub async fn render(&self) -> String {
        super::render(&self.gauges().await)
    }
}

/// A model's estimated resident bytes with `workers` loaded copies: its weights per copy.
pub fn model_memory_bytes(catalog: &Catalog, name: &str, workers: usize) -> u64 {
    catalog
        .get(name)
        .and_then(|e| e.bundle.as_ref().ok())
        .map_or(0, |b| b.memory.weights_bytes.saturating_mul(workers as u64))
}

/// Stored batch items by state, summed over every batch (`None` when the store cannot
/// be read).
fn batch_items(service: &Service) -> Option<BatchItems> {
    let mut items = BatchItems::default();
    for row in service.batches().ok()? {
        let Ok(snapshot) = service.snapshot(row.id) else {
            continue; // Removed meanwhile.
        };
        let c = snapshot.progress.counts;
        items.done += c.done;
        items.failed += c.failed;
        items.pending += c.total.saturating_sub(c.done + c.failed);
    }
    Some(items)
}
