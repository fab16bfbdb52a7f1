//! Model slots: each configured model is unloaded, loading, ready, in use by the worker,
//! or failed (until the failure is reported to its queued jobs). Pure bookkeeping; the
//! engine starts the loads and runs the models.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Failure, Model};

enum Slot {
    Unloaded,
    Loading,
    Ready {
        model: Box<dyn Model>,
        last_used: Instant,
    },
    InUse,
    Failed(Failure),
}

type Waiter = oneshot::Sender<Result<(), Failure>>;

/// Where a model stands, as `ListModels` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    /// Not loaded (never, or unloaded since).
    Unloaded,
    /// A load is running (with TensorRT, engines are built or read from the cache then).
    Loading,
    /// Loaded: ready, or running a batch.
    Loaded,
    /// The last load failed (reported to the jobs that waited; the next request retries).
    Failed,
}

/// Every configured model's slot, and the callers waiting for loads.
pub(super) struct Slots {
    slots: HashMap<String, Slot>,
    waiters: HashMap<String, Vec<Waiter>>,
}

impl Slots {
    /// All models unloaded.
    pub fn new<'a>(names: impl Iterator<Item = &'a str>) -> Slots {
        Slots {
            slots: names.map(|n| (n.to_string(), Slot::Unloaded)).collect(),
            waiters: HashMap::new(),
        }
    }

    /// Where `name` stands (unknown names read as unloaded).
    pub fn state(&self, name: &str) -> ModelState {
        match self.slots.get(name) {
            None | Some(Slot::Unloaded) => ModelState::Unloaded,
            Some(Slot::Loading) => ModelState::Loading,
            Some(Slot::Ready { .. } | Slot::InUse) => ModelState::Loaded,
            Some(Slot::Failed(_)) => ModelState::Failed,
        }
    }

    /// Ready or in use.
    pub fn is_loaded(&self, name: &str) -> bool {
        matches!(self.slots.get(name), Some(Slot::Ready { .. } | Slot::InUse))
    }

    /// Ready for the worker.
    pub fn is_ready(&self, name: &str) -> bool {
        matches!(self.slots.get(name), Some(Slot::Ready { .. }))
    }

    /// Neither loaded nor loading nor failed.
    pub fn is_unloaded(&self, name: &str) -> bool {
        matches!(self.slots.get(name), Some(Slot::Unloaded))
    }

    /// Someone waits for `name` to load.
    pub fn add_waiter(&mut self, name: &str, tx: Waiter) {
        self.waiters.entry(name.to_string()).or_default().push(tx);
    }

    /// Marks `name` loading; false when it is loading or loaded already.
    pub fn begin_load(&mut self, name: &str) -> bool {
        match self.slots.get(name) {
            Some(Slot::Unloaded | Slot::Failed(_)) | None => {
                self.slots.insert(name.to_string(), Slot::Loading);
                true
            }
            _ => false,
        }
    }

    /// Records a load's result and answers its waiters.
    pub fn finish_load(&mut self, name: &str, result: Result<Box<dyn Model>, Failure>) {
        let reply = match result {
            Ok(model) => {
                self.slots.insert(
                    name.to_string(),
                    Slot::Ready {
                        model,
                        last_used: Instant::now(),
                    },
                );
                Ok(())
            }
            Err(f) => {
                self.slots.insert(name.to_string(), Slot::Failed(f.clone()));
                Err(f)
            }
        };
        for tx in self.waiters.remove(name).unwrap_or_default() {
            let _ = tx.send(reply.clone());
        }
    }

    /// Takes a ready model for the worker (the slot is in use until [`Slots::put_back`]).
    pub fn take(&mut self, name: &str) -> Option<Box<dyn Model>> {
        match self.slots.insert(name.to_string(), Slot::InUse) {
            Some(Slot::Ready { model, .. }) => Some(model),
            other => {
                if let Some(slot) = other {
                    self.slots.insert(name.to_string(), slot);
                }
                None
            }
        }
    }

    /// Returns a model after its batch, unless it was unloaded meanwhile.
    pub fn put_back(&mut self, name: &str, model: Box<dyn Model>) {
        if let Some(slot @ Slot::InUse) = self.slots.get_mut(name) {
            *slot = Slot::Ready {
                model,
                last_used: Instant::now(),
            };
        }
    }

    /// Frees a model: at once when ready or failed; when in use, after its batch.
    pub fn unload(&mut self, name: &str) {
        if let Some(slot) = self.slots.get_mut(name) {
            *slot = match slot {
                Slot::Ready { .. } | Slot::Failed(_) | Slot::InUse => Slot::Unloaded,
                Slot::Loading => return,
                Slot::Unloaded => Slot::Unloaded,
            };
        }
    }

    /// The failed models and why; their slots go back to unloaded, so a later request
    /// retries the load.
    pub fn take_failures(&mut self) -> HashMap<String, Failure> {
        let mut failed = HashMap::new();
        for (name, slot) in self.slots.iter_mut() {
            if let Slot::Failed(f) = slot {
                failed.insert(name.clone(), f.clone());
                *slot = Slot::Unloaded;
            }
        }
        failed
    }

    /// Unloads ready models unused for `idle`, and returns when the next one would be due.
    pub fn unload_idle(&mut self, idle: Duration, now: Instant) -> Option<Instant> {
        let mut next = None;
        for (name, slot) in self.slots.iter_mut() {
            if let Slot::Ready { last_used, .. } = slot {
                let due = *last_used + idle;
                if due <= now {
                    tracing::info!(model = %name, "unloading idle model");
                    *slot = Slot::Unloaded;
                } else {
                    next = Some(next.map_or(due, |n: Instant| n.min(due)));
                }
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::backend::RunControl;
    use crate::pipeline::{Generation, PipelineError, ProgressFn};
    use crate::request::ResolvedRequest;

    /// A model the slots only hold.
    struct Held;

    impl Model for Held {
        fn generate(
            &mut self,
            _: &[&ResolvedRequest],
            _: &RunControl,
            _: &mut ProgressFn<'_>,
        ) -> Result<Vec<Generation>, PipelineError> {
            unreachable!("the slots never run a model")
        }
    }

    #[test]
    fn states_follow_the_loads() {
        let mut slots = Slots::new(["a"].into_iter());
        assert_eq!(slots.state("a"), ModelState::Unloaded);
        assert!(slots.begin_load("a"));
        assert_eq!(slots.state("a"), ModelState::Loading);
        slots.finish_load("a", Err(Failure::ModelLoad("x".into())));
        assert_eq!(slots.state("a"), ModelState::Failed);
        slots.take_failures();
        assert!(slots.begin_load("a"));
        slots.finish_load("a", Ok(Box::new(Held)));
        assert_eq!(slots.state("a"), ModelState::Loaded);
        let model = slots.take("a").unwrap();
        assert_eq!(slots.state("a"), ModelState::Loaded);
        slots.put_back("a", model);
        slots.unload("a");
        assert_eq!(slots.state("a"), ModelState::Unloaded);
    }
}
