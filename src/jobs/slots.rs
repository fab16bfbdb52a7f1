//! Model slots: on each worker, each configured model is unloaded, loading, ready, in use
//! by that worker, or failed (until the failure is reported to its queued jobs). Pure bookkeeping; the
//! engine starts the loads and runs the models.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Failure, Model};
use crate::request::KeepAlive;

enum Slot {
    Unloaded,
    Loading,
    Ready {
        model: Box<dyn Model>,
        last_used: Instant,
        /// Its last batch's `keep_alive` (`None`: `jobs.idle_unload_secs`).
        keep: Option<KeepAlive>,
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

/// Every configured model's slot on each worker, and the callers waiting for loads.
pub(super) struct Slots {
    /// Per model, one slot per worker.
    slots: HashMap<String, Vec<Slot>>,
    workers: usize,
    waiters: HashMap<String, Vec<Waiter>>,
}

impl Slots {
    /// All models unloaded on each of `workers` workers.
    pub fn new<'a>(names: impl Iterator<Item = &'a str>, workers: usize) -> Slots {
        let workers = workers.max(1);
        Slots {
            slots: names
                .map(|n| {
                    (
                        n.to_string(),
                        (0..workers).map(|_| Slot::Unloaded).collect(),
                    )
                })
                .collect(),
            workers,
            waiters: HashMap::new(),
        }
    }

    fn get(&self, name: &str, worker: usize) -> Option<&Slot> {
        self.slots.get(name).and_then(|v| v.get(worker))
    }

    fn get_mut(&mut self, name: &str, worker: usize) -> Option<&mut Slot> {
        self.slots.get_mut(name).and_then(|v| v.get_mut(worker))
    }

    /// Where `name` stands over all workers: loaded when any worker has it, else loading
    /// when any loads it, else failed when a load failed (unknown names read as unloaded).
    pub fn state(&self, name: &str) -> ModelState {
        let Some(v) = self.slots.get(name) else {
            return ModelState::Unloaded;
        };
        let any = |f: fn(&Slot) -> bool| v.iter().any(f);
        if any(|s| matches!(s, Slot::Ready { .. } | Slot::InUse)) {
            ModelState::Loaded
        } else if any(|s| matches!(s, Slot::Loading)) {
            ModelState::Loading
        } else if any(|s| matches!(s, Slot::Failed(_))) {
            ModelState::Failed
        } else {
            ModelState::Unloaded
        }
    }

    /// The models a worker is loading now, by name.
    pub fn loading(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .slots
            .iter()
            .filter(|(_, v)| v.iter().any(|s| matches!(s, Slot::Loading)))
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }

    /// Ready or in use on `worker`.
    pub fn is_loaded_on(&self, name: &str, worker: usize) -> bool {
        matches!(
            self.get(name, worker),
            Some(Slot::Ready { .. } | Slot::InUse)
        )
    }

    /// Loaded on every worker.
    pub fn is_loaded_everywhere(&self, name: &str) -> bool {
        (0..self.workers).all(|w| self.is_loaded_on(name, w))
    }

    /// Ready for `worker`.
    pub fn is_ready(&self, name: &str, worker: usize) -> bool {
        matches!(self.get(name, worker), Some(Slot::Ready { .. }))
    }

    /// Neither loaded nor loading nor failed on `worker`.
    pub fn is_unloaded(&self, name: &str, worker: usize) -> bool {
        matches!(self.get(name, worker), Some(Slot::Unloaded))
    }

    /// Adds unloaded slots for `name` (a model key with a LoRA set) if it has none.
    pub fn ensure(&mut self, name: &str) {
        if !self.slots.contains_key(name) {
            let slots = (0..self.workers).map(|_| Slot::Unloaded).collect();
            self.slots.insert(name.to_string(), slots);
        }
    }

    /// Forgets `name`'s slots (a LoRA set no job asks for any more).
    pub fn remove(&mut self, name: &str) {
        self.slots.remove(name);
        self.waiters.remove(name);
    }

    /// Unloaded on every worker (and known).
    pub fn is_unloaded_everywhere(&self, name: &str) -> bool {
        self.slots
            .get(name)
            .is_some_and(|v| v.iter().all(|s| matches!(s, Slot::Unloaded)))
    }

    /// The names loaded, in use or loading on `worker`.
    pub fn resident_on(&self, worker: usize) -> impl Iterator<Item = &str> {
        self.slots
            .iter()
            .filter(move |(_, v)| {
                matches!(
                    v.get(worker),
                    Some(Slot::Loading | Slot::Ready { .. } | Slot::InUse)
                )
            })
            .map(|(n, _)| n.as_str())
    }

    /// The name among `which` ready on `worker` that was used longest ago.
    pub fn lru_ready_on(&self, worker: usize, which: impl Fn(&str) -> bool) -> Option<String> {
        self.slots
            .iter()
            .filter(|(n, _)| which(n))
            .filter_map(|(n, v)| match v.get(worker) {
                Some(Slot::Ready { last_used, .. }) => Some((*last_used, n)),
                _ => None,
            })
            .min()
            .map(|(_, n)| n.clone())
    }

    /// Unloads `name` on `worker` when it is ready there.
    pub fn unload_on(&mut self, name: &str, worker: usize) {
        if let Some(slot @ Slot::Ready { .. }) = self.get_mut(name, worker) {
            *slot = Slot::Unloaded;
        }
    }

    /// Someone waits for `name` to load on every worker.
    pub fn add_waiter(&mut self, name: &str, tx: Waiter) {
        self.waiters.entry(name.to_string()).or_default().push(tx);
    }

    /// Marks `name` loading on `worker`; false when it is loading or loaded there already.
    pub fn begin_load(&mut self, name: &str, worker: usize) -> bool {
        match self.get_mut(name, worker) {
            Some(slot @ (Slot::Unloaded | Slot::Failed(_))) => {
                *slot = Slot::Loading;
                true
            }
            _ => false,
        }
    }

    /// Records a load's result on `worker`; once no worker is loading `name`, answers its
    /// waiters: success when every worker has it, else the first failure.
    pub fn finish_load(
        &mut self,
        name: &str,
        worker: usize,
        result: Result<Box<dyn Model>, Failure>,
    ) {
        let Some(slot) = self.get_mut(name, worker) else {
            return;
        };
        *slot = match result {
            Ok(model) => Slot::Ready {
                model,
                last_used: Instant::now(),
                keep: None,
            },
            Err(f) => Slot::Failed(f),
        };
        let v = &self.slots[name];
        if v.iter().any(|s| matches!(s, Slot::Loading)) {
            return;
        }
        let reply = match v.iter().find_map(|s| match s {
            Slot::Failed(f) => Some(f.clone()),
            _ => None,
        }) {
            Some(f) => Err(f),
            None => Ok(()),
        };
        for tx in self.waiters.remove(name).unwrap_or_default() {
            let _ = tx.send(reply.clone());
        }
    }

    /// Takes `worker`'s ready model (the slot is in use until [`Slots::put_back`]).
    pub fn take(&mut self, name: &str, worker: usize) -> Option<Box<dyn Model>> {
        let slot = self.get_mut(name, worker)?;
        match std::mem::replace(slot, Slot::InUse) {
            Slot::Ready { model, .. } => Some(model),
            other => {
                *slot = other;
                None
            }
        }
    }

    /// Returns a model after its batch, unless it was unloaded meanwhile.
    pub fn put_back(&mut self, name: &str, worker: usize, model: Box<dyn Model>) {
        self.put_back_keeping(name, worker, model, None);
    }

    /// [`Slots::put_back`], to stay loaded as `keep` says (`None`: the default).
    pub fn put_back_keeping(
        &mut self,
        name: &str,
        worker: usize,
        model: Box<dyn Model>,
        keep: Option<KeepAlive>,
    ) {
        if let Some(slot @ Slot::InUse) = self.get_mut(name, worker) {
            *slot = Slot::Ready {
                model,
                last_used: Instant::now(),
                keep,
            };
        }
    }

    /// Seconds until `name` is unloaded on the last worker that has it (-1: never), with
    /// `idle` the default lifetime; `None` when no worker has it. A worker running it
    /// counts with the default lifetime (its batch's own starts when the batch ends).
    pub fn expires_in(&self, name: &str, idle: Option<Duration>, now: Instant) -> Option<f64> {
        let mut longest: Option<KeepAlive> = None;
        for slot in self.slots.get(name)? {
            let left = match slot {
                Slot::Ready {
                    last_used, keep, ..
                } => match due_at(*last_used, *keep, idle) {
                    Some(at) => KeepAlive::For(at.saturating_duration_since(now)),
                    None => KeepAlive::Forever,
                },
                Slot::InUse => KeepAlive::default_for(idle),
                _ => continue,
            };
            longest = longest.max(Some(left));
        }
        longest.map(KeepAlive::as_secs)
    }

    /// Frees a model on every worker: at once when ready or failed; when in use, after
    /// its batch.
    pub fn unload(&mut self, name: &str) {
        if let Some(v) = self.slots.get_mut(name) {
            for slot in v.iter_mut() {
                if !matches!(slot, Slot::Loading) {
                    *slot = Slot::Unloaded;
                }
            }
        }
    }

    /// The models whose loads failed with no worker left that has or is loading them, and
    /// why; their slots go back to unloaded, so a later request retries. A worker whose
    /// load failed while another serves the model keeps its failure (it does not retry on
    /// every queued job) until the model is unloaded everywhere or loaded again.
    pub fn take_failures(&mut self) -> HashMap<String, Failure> {
        let mut failed = HashMap::new();
        for (name, v) in self.slots.iter_mut() {
            let live = v
                .iter()
                .any(|s| matches!(s, Slot::Loading | Slot::Ready { .. } | Slot::InUse));
            if live {
                continue;
            }
            for slot in v.iter_mut() {
                if let Slot::Failed(f) = slot {
                    failed.entry(name.clone()).or_insert_with(|| f.clone());
                    *slot = Slot::Unloaded;
                }
            }
        }
        failed
    }

    /// Unloads ready models unused for their `keep_alive`, else `idle` (`None`: never),
    /// and returns when the next one would be due. A model unloaded on its last worker
    /// forgets the failures of the others.
    pub fn unload_idle(&mut self, idle: Option<Duration>, now: Instant) -> Option<Instant> {
        let mut next = None;
        for (name, v) in self.slots.iter_mut() {
            let mut unloaded = false;
            for (worker, slot) in v.iter_mut().enumerate() {
                if let Slot::Ready {
                    last_used, keep, ..
                } = slot
                    && let Some(due) = due_at(*last_used, *keep, idle)
                {
                    if due <= now {
                        tracing::info!(model = %name, worker, "unloading idle model");
                        *slot = Slot::Unloaded;
                        unloaded = true;
                    } else {
                        next = Some(next.map_or(due, |n: Instant| n.min(due)));
                    }
                }
            }
            let live = v
                .iter()
                .any(|s| matches!(s, Slot::Loading | Slot::Ready { .. } | Slot::InUse));
            if unloaded && !live {
                for slot in v.iter_mut() {
                    if matches!(slot, Slot::Failed(_)) {
                        *slot = Slot::Unloaded;
                    }
                }
            }
        }
        next
    }
}

/// When a model last used at `last_used` is unloaded: `keep` after, else `idle` after
/// (`None`: never).
fn due_at(last_used: Instant, keep: Option<KeepAlive>, idle: Option<Duration>) -> Option<Instant> {
    match keep.unwrap_or(KeepAlive::default_for(idle)) {
        KeepAlive::For(d) => last_used.checked_add(d),
        KeepAlive::Forever => None,
    }
}

/// A batch's `keep_alive`: the longest its jobs ask for, a job without the key counting
/// with the default (`idle`); `None` when no job has the key.
pub(super) fn batch_keep(
    keeps: impl Iterator<Item = Option<KeepAlive>>,
    idle: Option<Duration>,
) -> Option<KeepAlive> {
    let keeps: Vec<Option<KeepAlive>> = keeps.collect();
    if keeps.iter().all(Option::is_none) {
        return None;
    }
    keeps
        .into_iter()
        .map(|k| k.unwrap_or(KeepAlive::default_for(idle)))
        .max()
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
        let mut slots = Slots::new(["a"].into_iter(), 1);
        assert_eq!(slots.state("a"), ModelState::Unloaded);
        assert!(slots.begin_load("a", 0));
        assert_eq!(slots.state("a"), ModelState::Loading);
        slots.finish_load("a", 0, Err(Failure::ModelLoad("x".into())));
        assert_eq!(slots.state("a"), ModelState::Failed);
        slots.take_failures();
        assert!(slots.begin_load("a", 0));
        slots.finish_load("a", 0, Ok(Box::new(Held)));
        assert_eq!(slots.state("a"), ModelState::Loaded);
        let model = slots.take("a", 0).unwrap();
        assert_eq!(slots.state("a"), ModelState::Loaded);
        slots.put_back("a", 0, model);
        slots.unload("a");
        assert_eq!(slots.state("a"), ModelState::Unloaded);
    }

    #[test]
    fn each_worker_has_its_own_slot() {
        let mut slots = Slots::new(["a"].into_iter(), 2);
        assert!(slots.begin_load("a", 0) && slots.begin_load("a", 1));
        assert!(!slots.begin_load("a", 1), "already loading there");
        let (tx, mut rx) = oneshot::channel();
        slots.add_waiter("a", tx);
        slots.finish_load("a", 1, Ok(Box::new(Held)));
        assert_eq!(slots.state("a"), ModelState::Loaded);
        assert!(slots.is_ready("a", 1) && !slots.is_ready("a", 0));
        assert!(rx.try_recv().is_err(), "waiters wait for every worker");
        slots.finish_load("a", 0, Ok(Box::new(Held)));
        assert!(matches!(rx.try_recv(), Ok(Ok(()))));
        assert!(slots.is_loaded_everywhere("a"));
        let model = slots.take("a", 0).unwrap();
        assert!(slots.take("a", 0).is_none(), "in use on worker 0");
        assert!(slots.is_ready("a", 1), "worker 1 still has its own");
        slots.put_back("a", 0, model);
        assert!(slots.is_ready("a", 0));
    }

    #[test]
    fn a_failure_is_reported_only_when_no_worker_serves_the_model() {
        let mut slots = Slots::new(["a"].into_iter(), 2);
        slots.begin_load("a", 0);
        slots.begin_load("a", 1);
        let (tx, mut rx) = oneshot::channel();
        slots.add_waiter("a", tx);
        slots.finish_load("a", 0, Err(Failure::ModelLoad("out of memory on 0".into())));
        assert!(slots.take_failures().is_empty(), "worker 1 still loads");
        slots.finish_load("a", 1, Ok(Box::new(Held)));
        assert_eq!(
            rx.try_recv().unwrap(),
            Err(Failure::ModelLoad("out of memory on 0".into())),
            "a waiter hears of the worker that failed"
        );
        assert!(slots.take_failures().is_empty(), "worker 1 serves it");
        assert!(
            !slots.is_unloaded("a", 0),
            "the failed worker does not retry on its own"
        );
        // Unloaded everywhere: the old failure is forgotten, not reported later.
        let due = slots.unload_idle(
            Some(Duration::ZERO),
            Instant::now() + Duration::from_secs(1),
        );
        assert!(due.is_none());
        assert!(slots.is_unloaded("a", 0) && slots.is_unloaded("a", 1));
        assert!(slots.take_failures().is_empty());
        // Failed on both: reported once, and both retry afterwards.
        slots.begin_load("a", 0);
        slots.begin_load("a", 1);
        slots.finish_load("a", 0, Err(Failure::ModelLoad("x".into())));
        slots.finish_load("a", 1, Err(Failure::ModelLoad("y".into())));
        assert_eq!(slots.take_failures().len(), 1);
        assert!(slots.is_unloaded("a", 0) && slots.is_unloaded("a", 1));
    }

    #[test]
    fn a_batch_keep_alive_decides_when_its_model_unloads() {
        let hour = Some(Duration::from_secs(3600));
        let mut slots = Slots::new(["a"].into_iter(), 1);
        assert_eq!(
            slots.expires_in("a", hour, Instant::now()),
            None,
            "not loaded"
        );
        slots.begin_load("a", 0);
        slots.finish_load("a", 0, Ok(Box::new(Held)));
        let left = slots.expires_in("a", hour, Instant::now()).unwrap();
        assert!((3599.0..=3600.0).contains(&left), "{left}");
        // Kept for good: never due, even with a default idle time.
        let model = slots.take("a", 0).unwrap();
        assert_eq!(slots.expires_in("a", None, Instant::now()), Some(-1.0));
        slots.put_back_keeping("a", 0, model, Some(KeepAlive::Forever));
        let later = Instant::now() + Duration::from_secs(7200);
        assert_eq!(slots.unload_idle(hour, later), None);
        assert!(slots.is_ready("a", 0));
        assert_eq!(slots.expires_in("a", hour, later), Some(-1.0));
        // Ten seconds: due then and not before, whatever the default.
        let model = slots.take("a", 0).unwrap();
        let ten = Duration::from_secs(10);
        slots.put_back_keeping("a", 0, model, Some(KeepAlive::For(ten)));
        let now = Instant::now();
        let due = slots.unload_idle(None, now).expect("due in ten seconds");
        assert!(due > now + Duration::from_secs(9) && slots.is_ready("a", 0));
        assert_eq!(slots.unload_idle(None, due), None);
        assert!(slots.is_unloaded("a", 0));
        // Zero: unloaded at the next look.
        slots.begin_load("a", 0);
        slots.finish_load("a", 0, Ok(Box::new(Held)));
        let model = slots.take("a", 0).unwrap();
        slots.put_back_keeping("a", 0, model, Some(KeepAlive::For(Duration::ZERO)));
        slots.unload_idle(None, Instant::now());
        assert!(slots.is_unloaded("a", 0));
    }

    #[test]
    fn a_batch_keeps_its_model_as_long_as_its_longest_job_asks() {
        let idle = Some(Duration::from_secs(600));
        let five = KeepAlive::For(Duration::from_secs(5));
        assert_eq!(batch_keep([None, None].into_iter(), idle), None);
        assert_eq!(batch_keep([Some(five)].into_iter(), idle), Some(five));
        assert_eq!(
            batch_keep([Some(five), None].into_iter(), idle),
            Some(KeepAlive::For(Duration::from_secs(600))),
            "a job without the key counts with the default"
        );
        assert_eq!(
            batch_keep([Some(five), Some(KeepAlive::Forever)].into_iter(), idle),
            Some(KeepAlive::Forever)
        );
    }
}
