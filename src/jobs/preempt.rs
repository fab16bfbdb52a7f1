//! Work that cannot wait for the batch in flight: between two steps of a worker's batch,
//! a queued job of the same model may run first, on the same loaded model, while the
//! batch is suspended (its latents, scheduler state and conditioning stay where they are,
//! in the suspended generation; nothing is recomputed, so its images are those it makes
//! uninterrupted). Which job may ([`preempts`]):
//!
//! - an interactive job, over batch items;
//! - a job of higher priority;
//! - at equal priority, another caller's job, once the batch has run for
//!   `jobs.time_slice_secs` since its turn began.
//!
//! The job runs to its end (it may itself be suspended in turn, up to [`MAX_DEPTH`]
//! batches deep) and the suspended batch resumes with a new turn. A suspended batch
//! still counts in the memory estimate; when the newcomer does not fit beside it, an
//! interactive job stops a batch of batch items, whose jobs go back to the queue and run
//! again from their start (nothing is lost); otherwise the newcomer waits for the batch.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::backend::{Model, ModelInterlude, RunControl};
use super::{Engine, JobId, QueuedJob, State};
use crate::pipeline::PipelineError;

/// Most batches on one worker at once: the running one and those it suspended.
pub const MAX_DEPTH: usize = 3;

/// A batch on a worker, running or suspended: its jobs, those cancelled meanwhile, its
/// run control, its estimated memory (bytes: the peak for a worker's first batch, the
/// working set for one that runs while another is suspended, whose model it shares),
/// and what [`preempts`] weighs.
pub(super) struct Running {
    pub(super) control: Arc<RunControl>,
    pub(super) jobs: HashSet<JobId>,
    pub(super) cancelled: HashSet<JobId>,
    pub(super) peak: u64,
    /// The model it runs: its model key (the model, with its LoRA set).
    pub(super) model: String,
    /// The callers whose jobs it holds.
    pub(super) owners: HashSet<u32>,
    /// Its highest job priority.
    pub(super) priority: i32,
    /// Batch items (from `SubmitBatch`), which interactive jobs go before.
    pub(super) background: bool,
    /// When its current turn began: its start, or its resumption.
    pub(super) turn: Instant,
}

impl Running {
    /// A batch about to run, with its control and estimated memory.
    pub(super) fn new(control: Arc<RunControl>, batch: &[QueuedJob], peak: u64) -> Running {
        Running {
            control,
            jobs: batch.iter().map(|j| j.id).collect(),
            cancelled: HashSet::new(),
            peak,
            model: batch[0].request.model_key().into_owned(),
            owners: batch.iter().map(|j| j.owner).collect(),
            priority: batch.iter().map(|j| j.request.priority).max().unwrap_or(0),
            background: batch.iter().all(|j| j.background),
            turn: Instant::now(),
        }
    }
}

/// Whether the queued job `lead` runs between two steps of the running batch `top` (module
/// doc). `slice` is `jobs.time_slice_secs` (`None`: no time slice).
pub(super) fn preempts(
    top: &Running,
    lead: &QueuedJob,
    slice: Option<Duration>,
    now: Instant,
) -> bool {
    if lead.request.model_key() != top.model {
        return false;
    }
    match (top.background, lead.background) {
        (true, false) => return true,
        (false, true) => return false,
        _ => {}
    }
    let priority = lead.request.priority;
    if priority > top.priority {
        return true;
    }
    slice.is_some_and(|slice| {
        priority == top.priority
            && !top.owners.contains(&lead.owner)
            && now.saturating_duration_since(top.turn) >= slice
    })
}

impl Engine {
    /// The interlude of a batch running `depth` batches deep on `worker` (0: the worker's
    /// own batch).
    pub(super) fn interlude_for(&self, worker: usize, depth: usize) -> Box<ModelInterlude> {
        let engine = self.clone();
        Box::new(move |model: &mut dyn Model| engine.interlude(worker, depth, model))
    }

    /// Between two steps of `worker`'s top batch: runs the queued batch that goes first,
    /// if any, on `model`. `Ok(true)` when one ran; [`PipelineError::Preempted`] when the
    /// top batch (batch items) must make room for an interactive job.
    fn interlude(
        &self,
        worker: usize,
        depth: usize,
        model: &mut dyn Model,
    ) -> Result<bool, PipelineError> {
        if depth + 1 >= MAX_DEPTH {
            return Ok(false);
        }
        let batch = {
            let mut st = self.lock();
            let Some(decision) = self.next_interlude(&st, worker) else {
                return Ok(false);
            };
            let cap = match decision {
                Decision::Run(cap) => cap,
                Decision::PutBack => return Err(PipelineError::Preempted),
            };
            let control = match self.shared.backend.run_control() {
                Ok(c) => Arc::new(c),
                Err(_) => return Ok(false),
            };
            let model_name = st.running[worker]
                .last()
                .map(|r| r.model.clone())
                .unwrap_or_default();
            let batch = st.queue.take_batch(|m| m == model_name, |_| cap);
            if batch.is_empty() {
                return Ok(false);
            }
            let peak = self.working_set(&batch);
            st.running[worker].push(Running::new(control, &batch, peak));
            batch
        };
        tracing::debug!(
            worker,
            depth,
            jobs = batch.len(),
            "a queued batch runs first"
        );
        model.set_interlude(Some(self.interlude_for(worker, depth + 1)));
        self.execute(worker, batch, super::worker::Held::Nested(model));
        // Back to the suspended batch, with a new turn.
        if let Some(top) = self.lock().running[worker].last_mut() {
            top.turn = Instant::now();
        }
        Ok(true)
    }

    /// What the interlude of `worker`'s top batch does now; `None`: nothing.
    fn next_interlude(&self, st: &State, worker: usize) -> Option<Decision> {
        if st.shutting_down {
            return None;
        }
        let top = st.running[worker].last()?;
        let lead = st
            .queue
            .iter()
            .find(|j| j.request.model_key() == top.model)?;
        let slice = match self.shared.settings.time_slice_secs {
            0 => None,
            s => Some(Duration::from_secs(s)),
        };
        if !preempts(top, lead, slice, Instant::now()) {
            return None;
        }
        match self.nested_limit(st, lead) {
            Some(cap) => Some(Decision::Run(cap)),
            // An interactive job stops batch items that leave it no room.
            None if top.background && !lead.background => Some(Decision::PutBack),
            None => None,
        }
    }

    /// The most images a batch led by `lead` may hold beside every batch running or
    /// suspended now; `None` when not even the lead fits.
    fn nested_limit(&self, st: &State, lead: &QueuedJob) -> Option<usize> {
        let r = &lead.request;
        let mut cap = self.shared.settings.max_batch_images.max(r.num_images);
        let (Some(budget), Some(profile)) =
            (self.shared.memory_budget, self.memory_profile(&r.model))
        else {
            return Some(cap);
        };
        let others: u64 = st.running.iter().flatten().map(|b| b.peak).sum();
        let left = budget.saturating_sub(others);
        let fits = |n: usize| {
            let images = n * r.memory_images() / r.num_images.max(1);
            profile.working_set(r.width, r.height, images, r.do_cfg()) <= left
        };
        if !fits(r.num_images) {
            return None;
        }
        while cap > r.num_images && !fits(cap) {
            cap -= 1;
        }
        Some(cap)
    }

    /// A batch's working set (its model's weights are counted with the batch it
    /// interrupts); 0 without a memory budget.
    fn working_set(&self, batch: &[QueuedJob]) -> u64 {
        let r = &batch[0].request;
        let images = batch.iter().map(|j| j.request.memory_images()).sum();
        match (self.shared.memory_budget, self.memory_profile(&r.model)) {
            (Some(_), Some(profile)) => profile.working_set(r.width, r.height, images, r.do_cfg()),
            _ => 0,
        }
    }
}

/// What an interlude does.
enum Decision {
    /// Run a batch of at most this many images first.
    Run(usize),
    /// Stop the top batch and put its jobs back in the queue.
    PutBack,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::tests::resolved;

    fn queued(id: JobId) -> QueuedJob {
        QueuedJob {
            id,
            owner: 1,
            sender: None,
            request: resolved("m", 4),
            output_fds: Vec::new(),
            queued_at: Instant::now(),
            background: false,
            reply: None,
        }
    }

    fn running(owner: u32, priority: i32, background: bool, turn: Instant) -> Running {
        let mut job = queued(1);
        job.owner = owner;
        job.request.priority = priority;
        job.background = background;
        let mut r = Running::new(Arc::new(RunControl::default()), &[job], 0);
        r.turn = turn;
        r
    }

    fn lead(owner: u32, priority: i32, background: bool) -> QueuedJob {
        let mut job = queued(2);
        job.owner = owner;
        job.request.priority = priority;
        job.background = background;
        job
    }

    #[test]
    fn who_goes_between_two_steps() {
        let now = Instant::now();
        let slice = Some(Duration::from_secs(10));
        let fresh = running(1, 0, false, now);
        let old = running(1, 0, false, now - Duration::from_secs(11));
        let items = running(1, 0, true, now);
        // Interactive over batch items, whatever the priorities.
        assert!(preempts(&items, &lead(1, -5, false), slice, now));
        assert!(!preempts(&fresh, &lead(2, 5, true), slice, now));
        // Higher priority at once; equal priority only after the slice, and only for
        // another caller.
        assert!(preempts(&fresh, &lead(1, 1, false), slice, now));
        assert!(!preempts(&fresh, &lead(2, 0, false), slice, now));
        assert!(preempts(&old, &lead(2, 0, false), slice, now));
        assert!(!preempts(&old, &lead(1, 0, false), slice, now));
        assert!(!preempts(&old, &lead(2, -1, false), slice, now));
        assert!(!preempts(&old, &lead(2, 0, false), None, now));
        // Another model never.
        let mut other = lead(2, 9, false);
        other.request.model = "n".into();
        assert!(!preempts(&items, &other, slice, now));
    }
}
